"""A simple synthetic head CT phantom for tests and the demo.

It is a cartoon: an ellipsoidal head (scalp, skull, grey/white matter, two lateral
ventricles) with an optional hyperdense intraparenchymal bleed. It exercises the pipeline
end to end; it is not a stand-in for real head CT and says nothing about detection accuracy.

Everything is defined in millimetres about the centre of the volume, so the same seed gives
the same anatomy at any spacing. Array axes are [slices, rows, cols] = [z, y, x] with slice 0
the most inferior, rows running anterior to posterior and columns right to left (LPS).
"""

from __future__ import annotations

import numpy as np

# Semi-axes of the outer (scalp) surface in mm: 150 mm left-right, 180 mm antero-posterior,
# 150 mm superior-inferior.
HEAD_SEMI_AXES_MM = (75.0, 90.0, 75.0)  # (z, y, x)
SCALP_MM = 4.0
SKULL_MM = 6.0
CORTEX_MM = 3.0

AIR_HU = -1000.0
SCALP_HU = 40.0
GREY_HU = 37.0
WHITE_HU = 27.0
CSF_HU = 5.0
NOISE_SD_HU = 4.0
BLEED_HU_RANGE = (60.0, 85.0)

# Lateral ventricles: (centre z, y, x) and semi-axes (z, y, x) in mm, mirrored left/right.
_VENTRICLE_CENTRE_MM = (12.0, -5.0, 11.0)
_VENTRICLE_SEMI_AXES_MM = (12.0, 28.0, 6.0)
# Keeps the bleed centre intraparenchymal rather than intraventricular.
_BLEED_VENTRICLE_MARGIN_MM = 12.0


def make_head_phantom(
    shape: tuple[int, int, int] = (32, 256, 256),
    spacing: tuple[float, float, float] = (5.0, 0.9, 0.9),
    *,
    seed: int = 0,
    bleed: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(hu, bleed_mask)``: int16 HU and a bool mask, both ``[slices, rows, cols]``.

    ``spacing`` is (slice, row, column) spacing in mm. The bleed (when ``bleed``) is a union
    of a few spheres at a seeded position in the cerebral white matter; the mask marks exactly
    the voxels painted as blood, and always holds at least one voxel.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values in mm, got {spacing}")
    rng = np.random.default_rng(seed)
    z, y, x = _grid_mm(shape, spacing)

    depth = _depth_below_surface(z, y, x)
    inside_head = depth >= 0
    brain = depth >= SCALP_MM + SKULL_MM
    ventricles = _ventricles(z, y, x) & brain

    hu = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), AIR_HU, dtype=np.float32)
    hu[inside_head] = SCALP_HU
    skull = inside_head & ~brain & (depth >= SCALP_MM)
    hu[skull] = _skull_hu(depth[skull])
    hu[brain] = _parenchyma_hu(depth, z, y, x)[brain]
    hu[ventricles] = CSF_HU

    mask = np.zeros(hu.shape, dtype=bool)
    if bleed:
        parenchyma = brain & ~ventricles
        mask = _bleed_mask(z, y, x, parenchyma, rng)
        hu[mask] = rng.uniform(66.0, 76.0)

    # Scanner noise everywhere, then blood clipped so its texture stays inside the stated range.
    hu += rng.normal(0.0, NOISE_SD_HU, size=hu.shape).astype(np.float32)
    hu[mask] = np.clip(hu[mask], *BLEED_HU_RANGE)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return np.rint(hu).astype(np.int16), mask


def _grid_mm(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open (broadcastable) voxel-centre coordinates in mm, origin at the volume centre."""
    axes = [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)
        for n, s in zip(shape, spacing, strict=True)
    ]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _depth_below_surface(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Approximate depth (mm) below the head's outer surface; negative outside the head.

    Measured along the ray from the centre, which is close to the true normal depth for an
    ellipsoid this round and keeps every shell a closed-form expression.
    """
    az, ay, ax = HEAD_SEMI_AXES_MM
    r = np.sqrt((z / az) ** 2 + (y / ay) ** 2 + (x / ax) ** 2)
    dist = np.sqrt(z**2 + y**2 + x**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = dist * (1.0 - r) / r
    # At the exact centre the ray is undefined; it is as deep as the shortest semi-axis.
    return np.where(r > 0, depth, min(HEAD_SEMI_AXES_MM)).astype(np.float32)


def _skull_hu(depth: np.ndarray) -> np.ndarray:
    """Dense inner and outer tables (~1500 HU) around a lighter diploe (~700 HU)."""
    frac = np.clip((depth - SCALP_MM) / SKULL_MM, 0.0, 1.0)
    return 700.0 + 800.0 * np.abs(np.cos(np.pi * frac))


def _parenchyma_hu(depth: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A grey-matter ribbon under the skull whose thickness undulates like gyri, over white
    matter with a gentle low-frequency drift, all within roughly 25-38 HU."""
    brain_depth = depth - (SCALP_MM + SKULL_MM)
    azimuth = np.arctan2(y, x)
    elevation = np.arctan2(z, np.sqrt(x**2 + y**2))
    ribbon = CORTEX_MM * (1.0 + 0.6 * np.sin(9.0 * azimuth) * np.cos(7.0 * elevation))
    in_cortex = brain_depth < ribbon
    drift = 1.5 * np.sin(z / 17.0) * np.cos(y / 23.0) * np.cos(x / 19.0)
    return np.where(in_cortex, GREY_HU, WHITE_HU + drift).astype(np.float32)


def _ventricles(z: np.ndarray, y: np.ndarray, x: np.ndarray, *, margin: float = 0.0) -> np.ndarray:
    cz, cy, cx = _VENTRICLE_CENTRE_MM
    az, ay, ax = (a + margin for a in _VENTRICLE_SEMI_AXES_MM)
    base = ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2
    return (base + ((x - cx) / ax) ** 2 <= 1.0) | (base + ((x + cx) / ax) ** 2 <= 1.0)


def _bleed_centre_mm(rng: np.random.Generator) -> np.ndarray:
    """A random point deep in the brain and clear of the ventricles, in mm.

    Drawn in physical space, independent of the grid, so every spacing gets the same bleed.
    """
    brain_semi = np.array(HEAD_SEMI_AXES_MM) - (SCALP_MM + SKULL_MM)
    for _ in range(10_000):
        unit = rng.uniform(-1.0, 1.0, size=3)
        if np.sum(unit**2) > 0.55**2:
            continue
        centre = unit * brain_semi
        point = [np.array([c]) for c in centre]
        if not _ventricles(*point, margin=_BLEED_VENTRICLE_MARGIN_MM).any():
            return centre
    raise RuntimeError("could not place a bleed clear of the ventricles")  # pragma: no cover


def _bleed_mask(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    parenchyma: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """An irregular blob (one main sphere plus a few smaller lobes on its rim), limited to
    parenchyma. If the grid is too coarse, or the field of view too small, for any voxel
    centre to fall inside the blob, the parenchyma voxel nearest its centre stands in, so a
    phantom asked to bleed always does."""
    centre = _bleed_centre_mm(rng)
    main_radius = rng.uniform(7.0, 11.0)
    spheres = [(centre, main_radius)]
    for _ in range(int(rng.integers(2, 5))):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        offset = direction * main_radius * rng.uniform(0.5, 0.9)
        spheres.append((centre + offset, main_radius * rng.uniform(0.35, 0.6)))
    mask = np.zeros(parenchyma.shape, dtype=bool)
    for (cz, cy, cx), radius in spheres:
        mask |= (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    mask &= parenchyma
    if not mask.any():
        if not parenchyma.any():
            raise ValueError("the volume holds no brain parenchyma to place a bleed in")
        dist2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        nearest = np.argmin(np.where(parenchyma, dist2, np.inf))
        mask.flat[nearest] = True
    return mask
