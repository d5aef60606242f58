"""Synthetic head CT phantoms with known ground truth, for tests and the demo.

They are cartoons. They exercise the pipeline end to end and give every finding a mask to
check against; they are not a stand-in for real head CT and say nothing about detection
accuracy.

- :func:`make_head_phantom`: the simple phantom: an ellipsoidal head (scalp, skull,
  grey/white matter, two lateral ventricles) with an optional intraparenchymal bleed.
- :func:`make_phantom`: a richer head (sulci, fissures, basal cisterns, deep grey nuclei,
  four ventricles) with any of the findings of :data:`FINDINGS`: the five hemorrhage
  subtypes in their typical places and shapes, a chronic subdural collection, a calvarial
  fracture, mass effect and midline shift; a mask for each, scan- and slice-level truth
  (:func:`slice_labels`), a seeded head pose and optional gantry tilt.

Everything is defined in millimetres about the centre of the volume, so the same seed gives
the same anatomy at any spacing. Array axes are [slices, rows, cols] = [z, y, x] with slice 0
the most inferior, rows running anterior to posterior and columns right to left (LPS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


# =========================================================================================
# The full phantom: every finding the label sets name, with per-finding masks.
# =========================================================================================

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
FINDINGS = (*SUBTYPES, "chronic", "fracture", "mass_effect", "midline_shift")
# The order of the RSNA challenge CSV: the five subtypes, then "any".
LABELS = (*SUBTYPES, "any")
# Findings drawn as a bleed or a break; the other two deform the anatomy instead.
LESIONS = (*SUBTYPES, "chronic", "fracture")
# Lesions big enough to push the brain aside.
MASS_LESIONS = ("epidural", "intraparenchymal", "subdural", "chronic")

ACUTE_BLOOD_HU = (50.0, 90.0)
CHRONIC_HU = (10.0, 25.0)
BONE_HU = (700.0, 1500.0)
# A slice shows a finding when it holds at least this much of it (at 0.9 mm pixels, ~25
# voxels): a few stray voxels at a lesion's tip are not something a reader would call.
MIN_SLICE_AREA_MM2 = 20.0

# Tissue classes of the label volume the phantom is painted from.
_AIR, _SCALP, _SKULL, _WHITE, _GREY, _DEEP_GREY = 0, 1, 2, 3, 4, 5
_SULCAL, _FISSURE, _SYLVIAN_L, _SYLVIAN_R, _CISTERN = 6, 7, 8, 9, 10
_VENT_L, _VENT_R, _VENT_3, _VENT_4 = 11, 12, 13, 14
# Their names, for Phantom.tissue.
TISSUES: dict[str, int] = {
    "air": _AIR,
    "scalp": _SCALP,
    "skull": _SKULL,
    "white_matter": _WHITE,
    "grey_matter": _GREY,
    "deep_grey_matter": _DEEP_GREY,
    "sulcal_csf": _SULCAL,
    "interhemispheric_fissure": _FISSURE,
    "sylvian_fissure_left": _SYLVIAN_L,
    "sylvian_fissure_right": _SYLVIAN_R,
    "basal_cisterns": _CISTERN,
    "lateral_ventricle_left": _VENT_L,
    "lateral_ventricle_right": _VENT_R,
    "third_ventricle": _VENT_3,
    "fourth_ventricle": _VENT_4,
}
_CSF_CLASSES = (_SULCAL, _FISSURE, _SYLVIAN_L, _SYLVIAN_R, _CISTERN)
_VENTRICLE_CLASSES = (_VENT_L, _VENT_R, _VENT_3, _VENT_4)
_PARENCHYMA_CLASSES = (_WHITE, _GREY, _DEEP_GREY)


@dataclass
class Phantom:
    """A synthetic head CT with the truth about every finding in it.

    ``hu`` is int16 ``[slices, rows, cols]`` (slice 0 most inferior, rows anterior to
    posterior, columns from the patient's right to left). ``masks`` has one bool volume per
    finding present: for a bleed or a fracture exactly the voxels painted as it (masks never
    overlap); for ``mass_effect`` and ``midline_shift`` the voxels whose tissue the
    deformation changed. ``findings`` is the scan-level truth for every key of
    :data:`FINDINGS`. ``chronic`` is a chronic (hypodense) subdural collection; the
    reader-style labels (:func:`slice_labels`, :func:`scan_labels`) count it as ``subdural``,
    as the RSNA and CQ500 readers did. ``sides`` says where each lesion lies ("left",
    "right", "both" or "midline", the patient's side); ``midline_shift_mm`` is the largest
    displacement of the midline, positive towards the patient's left. ``tissue`` is the
    anatomy under the lesions (uint8, codes in :data:`TISSUES`), after any mass effect.
    """

    hu: np.ndarray
    masks: dict[str, np.ndarray]
    findings: dict[str, bool]
    spacing: tuple[float, float, float]
    seed: int
    pose_deg: float = 0.0
    tilt_deg: float = 0.0
    sides: dict[str, str] = field(default_factory=dict)
    midline_shift_mm: float = 0.0
    tissue: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]


def make_phantom(
    shape: tuple[int, int, int] = (32, 256, 256),
    spacing: tuple[float, float, float] = (5.0, 0.9, 0.9),
    *,
    seed: int = 0,
    findings: Sequence[str] | None = None,
    pose_deg: float | None = None,
    tilt_deg: float = 0.0,
) -> Phantom:
    """Build a head CT phantom with the given ``findings`` (keys of :data:`FINDINGS`).

    ``findings=None`` draws them from ``seed``: about half the scans are normal, the others
    hold one to three hemorrhage subtypes, sometimes with a chronic subdural collection, a
    calvarial fracture, mass effect and midline shift. ``midline_shift`` implies
    ``mass_effect`` (it is one; no CQ500 reader marked a shift without it).

    Anatomy, lesion sizes and positions, noise and the head's in-plane rotation
    (``pose_deg``, about the patient's z axis; positive turns the back of the head towards
    the patient's left; drawn from the seed within ±8° when None) all come from ``seed`` and are
    defined in millimetres, so the same seed gives the same head on any grid, and adding a
    finding leaves the anatomy and the other findings where they were. ``tilt_deg`` samples
    the head on the sheared grid of a tilted gantry, laid out exactly as
    :func:`ichscan.io.dicom_write.write_ct_series` writes it with the same ``tilt_deg``, so the
    written series shows an undistorted head in patient space.

    Lesion centres are drawn within the slab the grid covers, so a short stack still shows
    the findings asked for; a lesion that falls between the voxel centres of a very coarse
    grid is represented by the eligible voxel nearest its centre.
    """
    _check_geometry(shape, spacing)
    if abs(tilt_deg) >= 60:
        raise ValueError(f"tilt_deg must be within (-60, 60), got {tilt_deg}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    chosen = _random_findings(seed) if findings is None else _checked_findings(findings)
    if "midline_shift" in chosen:
        chosen.add("mass_effect")
    anat = _draw_anatomy(np.random.default_rng([seed, 0]))
    if pose_deg is None:
        pose_deg = float(np.random.default_rng([seed, 1]).uniform(-8.0, 8.0))
    grid = _Grid.build(shape, spacing, pose_deg, tilt_deg)
    plan = _plan(chosen, anat, grid, seed)

    label, brain_depth, structural, drift = _paint_anatomy(grid, anat, plan)
    hu = _base_hu(label, brain_depth, anat)
    hu.ravel()[drift[0]] += drift[1]
    claimed = np.zeros(grid.shape, dtype=bool)
    masks: dict[str, np.ndarray] = {}
    for name in _PAINT_ORDER:
        if name in plan.lesions:
            masks[name] = _paint_lesion(name, plan, grid, anat, label, brain_depth, hu, claimed)
    for name, mask in structural.items():
        masks[name] = mask & ~claimed

    noise_rng = np.random.default_rng([seed, 2])
    hu += noise_rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(anat.noise_sd)
    for name, mask in masks.items():
        if name in SUBTYPES:
            hu[mask] = np.clip(hu[mask], *ACUTE_BLOOD_HU)
        elif name == "chronic":
            hu[mask] = np.clip(hu[mask], *CHRONIC_HU)
    bone = label == _SKULL
    if "fracture" in masks:
        bone &= ~masks["fracture"]
    hu[bone] = np.clip(hu[bone], *BONE_HU)
    np.clip(hu, -1024.0, 3071.0, out=hu)

    ordered = {name: masks[name] for name in FINDINGS if name in masks}
    return Phantom(
        hu=np.rint(hu).astype(np.int16),
        masks=ordered,
        findings={name: name in chosen for name in FINDINGS},
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        seed=int(seed),
        pose_deg=float(pose_deg),
        tilt_deg=float(tilt_deg),
        sides={name: _side_of(grid, masks[name]) for name in LESIONS if name in masks},
        midline_shift_mm=plan.shift_mm,
        tissue=label,
    )


def label_mask(phantom: Phantom, label: str) -> np.ndarray:
    """The voxels behind one reader-style label (a subtype or "any"): ``subdural`` is the
    acute subdural mask together with any chronic collection, ``any`` every bleed."""
    if label == "any":
        names: tuple[str, ...] = (*SUBTYPES, "chronic")
    elif label == "subdural":
        names = ("subdural", "chronic")
    elif label in SUBTYPES:
        names = (label,)
    else:
        raise ValueError(f"label must be one of {', '.join(LABELS)}; got {label!r}")
    out = np.zeros(phantom.hu.shape, dtype=bool)
    for name in names:
        if name in phantom.masks:
            out |= phantom.masks[name]
    return out


def slice_labels(
    phantom: Phantom, min_area_mm2: float = MIN_SLICE_AREA_MM2
) -> dict[str, np.ndarray]:
    """Per-slice truth (bool ``[slices]``) for each subtype and ``any``, in RSNA order.

    A slice is positive for a subtype when it holds at least ``min_area_mm2`` of it, or, for
    a lesion too small to reach that anywhere, the most of it: a scan with a bleed always
    has a positive slice, so slice and scan truth never disagree.
    """
    pixel_area = phantom.spacing[1] * phantom.spacing[2]
    out: dict[str, np.ndarray] = {}
    for name in SUBTYPES:
        area = label_mask(phantom, name).sum(axis=(1, 2)) * pixel_area
        peak = float(area.max()) if area.size else 0.0
        out[name] = area >= min(min_area_mm2, peak) if peak > 0 else np.zeros(area.shape, bool)
    out["any"] = np.logical_or.reduce([out[name] for name in SUBTYPES])
    return out


def scan_labels(phantom: Phantom) -> dict[str, bool]:
    """Scan-level reader-style truth for each subtype and ``any``, in RSNA order."""
    return {name: bool(values.any()) for name, values in slice_labels(phantom).items()}


# -- choosing findings --------------------------------------------------------------------


def _checked_findings(findings: Sequence[str]) -> set[str]:
    if isinstance(findings, str):
        raise TypeError("findings must be a sequence of names, not a single string")
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown findings {unknown}; known: {', '.join(FINDINGS)}")
    return set(findings)


def _random_findings(seed: int) -> set[str]:
    rng = np.random.default_rng([seed, 3])
    if rng.random() < 0.5:
        return set()
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    chosen = {str(s) for s in rng.choice(SUBTYPES, size=count, replace=False)}
    if rng.random() < 0.25:
        chosen.add("chronic")
    # Epidural bleeds come from a torn meningeal artery under a fracture more often than not.
    if rng.random() < (0.6 if "epidural" in chosen else 0.2):
        chosen.add("fracture")
    if chosen & set(MASS_LESIONS) and rng.random() < 0.45:
        chosen.add("mass_effect")
        if rng.random() < 0.6:
            chosen.add("midline_shift")
    return chosen


# -- anatomy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    semi: tuple[float, float, float]  # outer surface semi-axes (z, y, x), mm
    scalp: float
    skull: float
    scalp_hu: float
    grey_hu: float
    white_hu: float
    csf_hu: float
    noise_sd: float
    cortex: float  # grey-matter ribbon thickness
    csf_rim: float  # subarachnoid CSF between the inner table and the cortex
    sulcus_half_width: float
    sulcus_depth: float
    fissure_half_width: float
    ventricle_scale: tuple[float, float, float]
    waves: np.ndarray  # [n, 3] wave vectors (z, y, x) of the gyral pattern, rad/mm
    phases: np.ndarray  # [n]

    @property
    def inner(self) -> float:
        """Depth of the inner table below the outer surface."""
        return self.scalp + self.skull


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    scale = rng.uniform(0.94, 1.04)
    aspect = rng.uniform(0.97, 1.03, size=3)
    semi = tuple(float(v) for v in np.array(HEAD_SEMI_AXES_MM) * scale * aspect)
    directions = rng.normal(size=(6, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(24.0, 36.0, size=(6, 1))
    atrophy = rng.uniform(0.85, 1.3)
    return _Anatomy(
        semi=semi,  # type: ignore[arg-type]
        scalp=float(rng.uniform(3.0, 5.0)),
        skull=float(rng.uniform(5.0, 7.5)),
        scalp_hu=float(rng.uniform(35.0, 45.0)),
        grey_hu=float(rng.uniform(33.0, 38.0)),
        white_hu=float(rng.uniform(23.0, 28.0)),
        csf_hu=float(rng.uniform(2.0, 8.0)),
        noise_sd=float(rng.uniform(3.0, 6.0)),
        cortex=float(rng.uniform(2.5, 3.5)),
        csf_rim=float(rng.uniform(0.6, 1.2)) * atrophy,
        sulcus_half_width=float(rng.uniform(0.5, 0.9)) * atrophy,
        sulcus_depth=float(rng.uniform(8.0, 13.0)),
        fissure_half_width=float(rng.uniform(0.8, 1.3)),
        ventricle_scale=(
            float(atrophy * rng.uniform(0.9, 1.1)),
            float(atrophy * rng.uniform(0.9, 1.1)),
            float(atrophy * rng.uniform(0.9, 1.2)),
        ),
        waves=((2.0 * np.pi / wavelengths) * directions).astype(np.float32),
        phases=rng.uniform(0.0, 2.0 * np.pi, size=6).astype(np.float32),
    )


@dataclass
class _Grid:
    """Voxel-centre coordinates in the head's own frame (mm about the centre of the volume;
    z superior, y posterior, x towards the patient's left), plus patient-frame y, which is
    where gravity points in a supine patient whatever the head's pose."""

    shape: tuple[int, int, int]
    z: np.ndarray  # [S, H]: with a tilted gantry z depends on the row as well as the slice
    y: np.ndarray  # [H, W]
    x: np.ndarray  # [H, W]
    patient_y: np.ndarray  # [H]

    @classmethod
    def build(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        pose_deg: float,
        tilt_deg: float,
    ) -> _Grid:
        n_slices, rows, cols = shape
        k = (np.arange(n_slices, dtype=np.float64) - (n_slices - 1) / 2) * spacing[0]
        i = (np.arange(rows, dtype=np.float64) - (rows - 1) / 2) * spacing[1]
        j = (np.arange(cols, dtype=np.float64) - (cols - 1) / 2) * spacing[2]
        tilt = np.radians(tilt_deg)
        # write_ct_series steps rows along [0, cos t, -sin t] and slices along z by
        # spacing / cos t, so planes stay `spacing` apart along their normal.
        py = i * np.cos(tilt)
        pz = k[:, None] / np.cos(tilt) - i[None, :] * np.sin(tilt)
        pose = np.radians(pose_deg)
        hx = np.cos(pose) * j[None, :] - np.sin(pose) * py[:, None]
        hy = np.sin(pose) * j[None, :] + np.cos(pose) * py[:, None]
        f32 = np.float32
        return cls(shape, pz.astype(f32), hy.astype(f32), hx.astype(f32), py.astype(f32))

    @property
    def z_range(self) -> tuple[float, float]:
        return float(self.z.min()), float(self.z.max())

    def points(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head-frame (z, y, x) of flat voxel indices."""
        _, rows, cols = self.shape
        # z is indexed by (slice, row) = idx // cols, y and x by (row, col) = idx % plane:
        # two integer divisions instead of four.
        in_plane = idx % (rows * cols)
        return self.z.ravel()[idx // cols], self.y.ravel()[in_plane], self.x.ravel()[in_plane]

    def patient_y_of(self, idx: np.ndarray) -> np.ndarray:
        _, rows, cols = self.shape
        return self.patient_y[(idx // cols) % rows]

    def near(self, centre: np.ndarray, radius: float) -> np.ndarray:
        """Flat indices of the voxels within a cylinder of ``radius`` about ``centre``: a cheap
        superset that lesion shapes are then evaluated on."""
        in_z = np.abs(self.z - centre[0]) <= radius
        in_plane = (self.y - centre[1]) ** 2 + (self.x - centre[2]) ** 2 <= radius**2
        return np.flatnonzero(in_z[:, :, None] & in_plane[None, :, :])


def _ray_depth(grid: _Grid, semi: tuple[float, float, float]) -> np.ndarray:
    """Depth (mm) below the outer surface along the ray from the centre (see
    _depth_below_surface), on the head-frame grid."""
    az, ay, ax = semi
    zz = (grid.z / az) ** 2
    plane = (grid.y / ay) ** 2 + (grid.x / ax) ** 2
    r = np.sqrt(zz[:, :, None] + plane[None, :, :])
    dist = np.sqrt((grid.z**2)[:, :, None] + (grid.y**2 + grid.x**2)[None, :, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = dist * (1.0 - r) / r
    return np.where(r > 0, depth, np.float32(min(semi))).astype(np.float32)


def _surface_distance(semi: tuple[float, float, float], direction: np.ndarray) -> float:
    """Distance from the centre to the outer surface along a unit direction."""
    return float(1.0 / np.sqrt(np.sum((direction / np.array(semi)) ** 2)))


def _ellipsoid(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
) -> np.ndarray:
    return (
        ((z - centre[0]) / semi[0]) ** 2
        + ((y - centre[1]) / semi[1]) ** 2
        + ((x - centre[2]) / semi[2]) ** 2
    ) <= 1.0


# Radius of the sphere the gyral pattern is drawn on (about the cortex's own).
_GYRAL_SPHERE_MM = 65.0

# Midline shift: a bow of the falx and the deep structures, largest at the level of the
# ventricles and fading towards the frontal and occipital poles, where the falx is anchored.
_SHIFT_CENTRE_MM = (12.0, -5.0)  # (z, y)
_SHIFT_SIGMA_MM = (30.0, 40.0)


def _shift_at(z: np.ndarray, y: np.ndarray, shift_mm: float) -> np.ndarray:
    if shift_mm == 0.0:
        return np.zeros(np.broadcast_shapes(z.shape, y.shape), dtype=np.float32)
    dz = (z - _SHIFT_CENTRE_MM[0]) / _SHIFT_SIGMA_MM[0]
    dy = (y - _SHIFT_CENTRE_MM[1]) / _SHIFT_SIGMA_MM[1]
    return (shift_mm * np.exp(-0.5 * (dz**2 + dy**2))).astype(np.float32)


def _deep_labels(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    depth: np.ndarray,
    anat: _Anatomy,
    shift_mm: float,
    compress_side: int,
    compress: float,
) -> np.ndarray:
    """Tissue class of the midline and deep structures at brain points (0 where none):
    deep grey nuclei, Sylvian and interhemispheric fissures, basal cisterns, ventricles.
    Everything but the Sylvian fissures moves with the midline; the lateral ventricle on
    ``compress_side`` (+1 left, -1 right) is squeezed by a mass beside it."""
    xs = x - _shift_at(z, y, shift_mm)
    out = np.zeros(z.shape, dtype=np.uint8)
    for side in (1, -1):
        # Sylvian fissure: an oblique CSF cleft from the lateral surface in towards the insula.
        lateral = np.abs(x) - 30.0
        cleft = np.abs(y + 10.0 + 0.35 * lateral) < 1.3 + 0.02 * lateral
        sylvian = (side * x > 30.0) & cleft & (np.abs(z + 10.0) < 14.0) & (depth < 32.0)
        out[sylvian] = _SYLVIAN_L if side > 0 else _SYLVIAN_R
    out[(np.abs(xs) < anat.fissure_half_width) & (depth < 28.0)] = _FISSURE

    # Everything else lies in a central box (for any ventricle scale drawn); evaluating the
    # ellipsoids only there keeps them cheap.
    core = np.flatnonzero((z > -50.0) & (z < 32.0) & (y > -48.0) & (y < 52.0) & (np.abs(xs) < 34.0))
    z, y, xs = z[core], y[core], xs[core]
    inner = np.zeros(core.shape, dtype=np.uint8)
    vz, vy, vx = anat.ventricle_scale
    for side in (1, -1):
        nuclei = _ellipsoid(z, y, xs, (2.0, 9.0, side * 10.0), (9.0, 12.0, 7.0)) | _ellipsoid(
            z, y, xs, (4.0, -4.0, side * 22.0), (9.0, 14.0, 5.0)
        )
        inner[nuclei] = _DEEP_GREY
    # Basal cisterns: a CSF ring around the midbrain plus the suprasellar cistern before it.
    zc = -20.0
    ring = _ellipsoid(z, y, xs, (zc, 5.0, 0.0), (8.0, 14.0, 16.0)) & (
        ((y - 6.0) / 10.5) ** 2 + (xs / 13.0) ** 2 > 1.0
    )
    suprasellar = _ellipsoid(z, y, xs, (zc + 2.0, -13.0, 0.0), (4.0, 7.0, 12.0))
    inner[ring | suprasellar] = _CISTERN
    for side, cls in ((1, _VENT_L), (-1, _VENT_R)):
        squeeze = compress if side == compress_side else 1.0
        body = _ellipsoid(
            z,
            y,
            xs,
            (12.0, -5.0, side * (3.0 + 6.0 * vx)),
            (11.0 * vz, 26.0 * vy * (0.85 + 0.15 * squeeze), 6.0 * vx * squeeze),
        )
        occipital = _ellipsoid(
            z,
            y,
            xs,
            (6.0, 24.0 * vy, side * (6.0 + 8.0 * vx)),
            (6.0 * vz, 10.0 * vy, 3.5 * vx * squeeze),
        )
        inner[body | occipital] = cls
    inner[_ellipsoid(z, y, xs, (0.0, 2.0, 0.0), (8.0 * vz, 11.0, 1.6 * vx))] = _VENT_3
    inner[_ellipsoid(z, y, xs, (-42.0, 30.0, 0.0), (5.0, 5.0, 7.0))] = _VENT_4
    found = inner > 0
    out[core[found]] = inner[found]
    return out


def _gyral_distance(
    z: np.ndarray, y: np.ndarray, x: np.ndarray, anat: _Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm, to first order) to the nearest sulcus, and the local sulcal depth.

    Sulci are the zero set of a sum of a few plane waves evaluated on a sphere about the
    centre, so they fold into a labyrinth of gyri over the surface and run radially inwards
    from it, as real sulci do; |f| / |grad f| is the distance to that zero set.
    """
    radius = np.maximum(np.sqrt(z**2 + y**2 + x**2), np.float32(1.0))
    unit = np.stack([z, y, x]) / radius  # [3, n]
    on_sphere = unit * np.float32(_GYRAL_SPHERE_MM)
    phase = anat.waves @ on_sphere + anat.phases[:, None]  # [waves, n]
    value = np.cos(phase).sum(axis=0)
    grad = -(anat.waves.T @ np.sin(phase))  # [3, n], with respect to the sphere point
    # Only the part along the surface moves the sphere point; it scales with the radius.
    grad -= unit * (grad * unit).sum(axis=0)
    slope = np.sqrt((grad**2).sum(axis=0)) * np.float32(_GYRAL_SPHERE_MM) / radius
    distance = np.abs(value) / np.maximum(slope, np.float32(1e-3))
    depth = anat.sulcus_depth * (0.75 + 0.25 * np.cos(phase[0] - phase[1]))
    return distance.astype(np.float32), depth.astype(np.float32)


def _paint_anatomy(
    grid: _Grid, anat: _Anatomy, plan: _Plan
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The tissue-class volume, the depth below the inner table, the masks of the
    structural findings (voxels whose class the mass effect or the midline shift changed)
    and the white-matter drift (flat indices, HU offsets)."""
    depth = _ray_depth(grid, anat.semi)
    brain_depth = depth - np.float32(anat.inner)
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[depth >= 0] = _SCALP
    label[(depth >= anat.scalp) & (brain_depth < 0)] = _SKULL

    idx = np.flatnonzero(brain_depth >= 0)
    z, y, x = grid.points(idx)
    bd = brain_depth.ravel()[idx]
    classes = np.full(idx.shape, _WHITE, dtype=np.uint8)
    shell = np.flatnonzero(bd < anat.sulcus_depth * 1.25 + anat.cortex)
    distance, sulcus_depth = _gyral_distance(z[shell], y[shell], x[shell], anat)
    sb = bd[shell]
    sulcal = ((distance < anat.sulcus_half_width) & (sb < sulcus_depth)) | (sb < anat.csf_rim)
    grey = (sb < anat.csf_rim + anat.cortex) | (
        (distance < anat.sulcus_half_width + anat.cortex) & (sb < sulcus_depth + anat.cortex)
    )
    effaced = np.zeros(shell.shape, dtype=bool)
    if plan.efface is not None:
        centre, radius, side = plan.efface
        near = _arc_distance(z[shell], y[shell], x[shell], centre) < radius
        # Swollen cortex closes the sulci beside the mass; the CSF rim under the bone goes too.
        effaced = sulcal & near & (side * x[shell] > 0)
        sulcal &= ~effaced
    classes[shell[grey]] = _GREY
    classes[shell[sulcal]] = _SULCAL

    shift, side, squeeze = plan.shift_mm, plan.compress_side, plan.compress
    deep = _deep_labels(z, y, x, bd, anat, shift, side, squeeze)
    has_deep = deep > 0
    classes[has_deep] = deep[has_deep]
    label.ravel()[idx] = classes
    white = classes == _WHITE
    # A gentle low-frequency drift through the white matter, as real scans have.
    drift = (
        idx[white],
        1.5 * np.sin(z[white] / 17.0) * np.cos(y[white] / 23.0) * np.cos(x[white] / 19.0),
    )

    structural: dict[str, np.ndarray] = {}
    if "midline_shift" in plan.findings or "mass_effect" in plan.findings:
        unshifted = _deep_labels(z, y, x, bd, anat, 0.0, 0, 1.0)
        shifted = _deep_labels(z, y, x, bd, anat, shift, 0, 1.0) if shift else unshifted
        moved = unshifted != shifted
        changed = moved | (shifted != deep)
        changed[shell[effaced]] = True
        if "mass_effect" in plan.findings:
            structural["mass_effect"] = _scatter(grid.shape, idx[changed])
        if "midline_shift" in plan.findings:
            structural["midline_shift"] = _scatter(grid.shape, idx[moved])
    return label, brain_depth, structural, drift


def _scatter(shape: tuple[int, int, int], idx: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask.ravel()[idx] = True
    return mask


def _base_hu(label: np.ndarray, brain_depth: np.ndarray, anat: _Anatomy) -> np.ndarray:
    lut = np.full(256, anat.csf_hu, dtype=np.float32)
    lut[_AIR] = AIR_HU
    lut[_SCALP] = anat.scalp_hu
    lut[_WHITE] = anat.white_hu
    lut[_GREY] = anat.grey_hu
    lut[_DEEP_GREY] = anat.grey_hu - 2.0
    hu = lut[label]
    skull = np.flatnonzero(label == _SKULL)
    frac = np.clip((brain_depth.ravel()[skull] + anat.skull) / anat.skull, 0.0, 1.0)
    # Dense outer and inner tables around a lighter diploe.
    hu.ravel()[skull] = BONE_HU[0] + (BONE_HU[1] - BONE_HU[0]) * np.abs(np.cos(np.pi * frac))
    return hu


# -- planning the findings ----------------------------------------------------------------


@dataclass
class _Surface:
    """A patch centre on the brain surface: the point (head frame, mm), its unit direction
    from the head centre and its distance from it."""

    point: np.ndarray
    direction: np.ndarray
    radius: float
    side: int  # +1 the patient's left, -1 right


@dataclass
class _Plan:
    findings: set[str]
    lesions: dict[str, dict] = field(default_factory=dict)
    shift_mm: float = 0.0
    compress_side: int = 0
    compress: float = 1.0
    efface: tuple[_Surface, float, int] | None = None  # (patch centre, arc radius mm, side)


def _pick(rng: np.random.Generator, lo: float, hi: float, zmin: float, zmax: float) -> float:
    """A height in [lo, hi] that the grid covers; the covered height nearest the range when
    they do not overlap."""
    a, b = max(lo, zmin), min(hi, zmax)
    if a <= b:
        return float(rng.uniform(a, b))
    return float(np.clip((lo + hi) / 2, zmin, zmax))


def _surface(
    anat: _Anatomy, z: float, side: int, angle: float, depth: float | None = None
) -> _Surface:
    """The point ``depth`` mm below the outer surface (the inner table by default) at height
    ``z``, on ``side``, ``angle`` radians from the lateral direction towards the front."""
    az, ay, ax = anat.semi
    q = np.sqrt(max(1.0 - (z / az) ** 2, 0.04))
    on_ellipsoid = np.array([z, -ay * q * np.sin(angle), side * ax * q * np.cos(angle)])
    direction = on_ellipsoid / np.linalg.norm(on_ellipsoid)
    radius = _surface_distance(anat.semi, direction) - (anat.inner if depth is None else depth)
    return _Surface(direction * radius, direction, radius, side)


def _arc_distance(z: np.ndarray, y: np.ndarray, x: np.ndarray, at: _Surface) -> np.ndarray:
    """Distance along the surface (mm, at the patch's radius) from the patch centre to the
    projection of each point."""
    norm = np.sqrt(z**2 + y**2 + x**2)
    norm = np.maximum(norm, 1e-3)
    cos = (z * at.direction[0] + y * at.direction[1] + x * at.direction[2]) / norm
    return (np.arccos(np.clip(cos, -1.0, 1.0)) * at.radius).astype(np.float32)


def _plan(chosen: set[str], anat: _Anatomy, grid: _Grid, seed: int) -> _Plan:
    """Sizes and places of every finding. Each finding has its own random stream, so adding
    one leaves the others where they were; related findings are then tied together (a
    fracture over the epidural bleed, the midline pushed away from the biggest mass)."""
    zmin, zmax = grid.z_range
    plan = _Plan(set(chosen))

    def rng(name: str) -> np.random.Generator:
        return np.random.default_rng([seed, 10 + FINDINGS.index(name)])

    mass = [name for name in MASS_LESIONS if name in chosen]
    dominant = None
    if "mass_effect" in chosen and mass:
        dominant = mass[int(np.random.default_rng([seed, 4]).integers(len(mass)))]

    if "epidural" in chosen:
        r = rng("epidural")
        z = _pick(r, -15.0, 40.0, zmin, zmax)
        at = _surface(anat, z, int(r.choice([-1, 1])), r.uniform(-1.0, 1.0))
        big = dominant == "epidural"
        thick = r.uniform(12.0, 20.0) if big else r.uniform(6.0, 14.0)
        plan.lesions["epidural"] = {
            "at": at,
            "reach": max(r.uniform(18.0, 32.0), 2.2 * thick),
            "thickness": thick,
            "hu": r.uniform(60.0, 80.0),
        }
    for name in ("subdural", "chronic"):
        if name not in chosen:
            continue
        r = rng(name)
        side = int(r.choice([-1, 1]))
        if name == "chronic" and "subdural" in plan.lesions and r.random() < 0.7:
            side = -plan.lesions["subdural"]["at"].side
        z = _pick(r, -5.0, 45.0, zmin, zmax)
        at = _surface(anat, z, side, r.uniform(-0.6, 0.8))
        big = dominant == name
        if name == "subdural":
            thick = r.uniform(8.0, 14.0) if big else r.uniform(3.0, 9.0)
            hu = r.uniform(55.0, 80.0)
        else:
            thick = r.uniform(10.0, 16.0) if big else r.uniform(5.0, 12.0)
            hu = r.uniform(14.0, 22.0)
        plan.lesions[name] = {
            "at": at,
            "reach": r.uniform(45.0, 80.0),
            "thickness": thick,
            "hu": hu,
        }
    if "intraparenchymal" in chosen:
        r = rng("intraparenchymal")
        centre = _iph_centre(r, anat, zmin, zmax)
        big = dominant == "intraparenchymal"
        radius = r.uniform(14.0, 20.0) if big else r.uniform(5.0, 13.0)
        lobes = []
        for _ in range(int(r.integers(2, 6))):
            direction = r.normal(size=3)
            direction /= np.linalg.norm(direction)
            lobes.append(
                (centre + direction * radius * r.uniform(0.6, 1.0), radius * r.uniform(0.35, 0.65))
            )
        side = 1 if centre[2] > 0 else -1
        plan.lesions["intraparenchymal"] = {
            "at": _Surface(
                centre, centre / np.linalg.norm(centre), float(np.linalg.norm(centre)), side
            ),
            "spheres": [(centre, radius), *lobes],
            "edema": r.uniform(1.5, 4.0) * (1.0 + radius / 15.0),
            "hu": r.uniform(58.0, 82.0),
        }
    if "intraventricular" in chosen:
        r = rng("intraventricular")
        sides = [int(r.choice([-1, 1]))] if r.random() < 0.6 else [-1, 1]
        plan.lesions["intraventricular"] = {
            "sides": sides,
            "fill": r.uniform(0.25, 0.6),
            "third": bool(r.random() < 0.35),
            "fourth": bool(r.random() < 0.2),
            "hu": r.uniform(55.0, 75.0),
        }
    if "subarachnoid" in chosen:
        r = rng("subarachnoid")
        parts = {"convexity": r.random() < 0.7, "sylvian": r.random() < 0.5}
        parts["cisterns"] = r.random() < 0.4 or not any(parts.values())
        side = int(r.choice([-1, 1]))
        z = _pick(r, 0.0, 50.0, zmin, zmax)
        plan.lesions["subarachnoid"] = {
            "at": _surface(anat, z, side, r.uniform(-1.2, 1.2)),
            "reach": r.uniform(25.0, 50.0),
            "parts": parts,
            "hu": r.uniform(52.0, 70.0),
        }
    if "fracture" in chosen:
        r = rng("fracture")
        if "epidural" in plan.lesions:
            edh = plan.lesions["epidural"]["at"]
            at = _Surface(
                edh.direction * (edh.radius + anat.skull / 2),
                edh.direction,
                edh.radius + anat.skull / 2,
                edh.side,
            )
        else:
            z = _pick(r, -10.0, 50.0, zmin, zmax)
            at = _surface(
                anat,
                z,
                int(r.choice([-1, 1])),
                r.uniform(-1.3, 1.3),
                depth=anat.scalp + anat.skull / 2,
            )
        tangent = np.cross(at.direction, r.normal(size=3))
        tangent /= np.linalg.norm(tangent)
        plan.lesions["fracture"] = {
            "at": at,
            "normal": np.cross(at.direction, tangent),
            "reach": r.uniform(15.0, 40.0),
            "width": r.uniform(1.2, 2.0),
            "hu": r.uniform(25.0, 45.0),
        }

    if "mass_effect" in chosen:
        r = np.random.default_rng([seed, 5])
        if dominant is not None:
            at = plan.lesions[dominant]["at"]
            side = at.side
            direction = at.direction
        else:
            side = int(r.choice([-1, 1]))
            direction = _surface(anat, 20.0, side, 0.0).direction
        plan.compress_side = side
        plan.compress = float(r.uniform(0.35, 0.6))
        patch = _Surface(direction * 60.0, direction, 60.0, side)
        plan.efface = (patch, float(r.uniform(50.0, 80.0)), side)
        if "midline_shift" in chosen:
            # Away from the mass: a left-sided mass pushes the midline to the right.
            plan.shift_mm = float(-side * r.uniform(4.0, 12.0))
    return plan


def _iph_centre(rng: np.random.Generator, anat: _Anatomy, zmin: float, zmax: float) -> np.ndarray:
    """A point in the cerebral parenchyma, clear of the ventricles and the midline: the
    basal ganglia and thalami (hypertensive bleeds) or a lobe (amyloid, contusion)."""
    brain = np.array(anat.semi) - anat.inner
    zlo, zhi = max(-30.0, zmin), min(45.0, zmax)
    if zlo > zhi:
        zlo = zhi = float(np.clip(10.0, zmin, zmax))
    vz, vy, vx = anat.ventricle_scale
    for _ in range(1000):
        unit = rng.uniform(-1.0, 1.0, size=3)
        if np.sum(unit**2) > 0.6**2:
            continue
        centre = unit * brain
        centre[0] = rng.uniform(zlo, zhi)
        if abs(centre[2]) < 12.0:
            continue
        near_ventricle = (
            ((centre[0] - 12.0) / (11.0 * vz + 8.0)) ** 2
            + ((centre[1] + 5.0) / (26.0 * vy + 8.0)) ** 2
            + ((abs(centre[2]) - 3.0 - 6.0 * vx) / (6.0 * vx + 8.0)) ** 2
        ) <= 1.0
        if not near_ventricle:
            return centre
    return np.array([float(np.clip(10.0, zmin, zmax)), 0.0, 35.0])  # pragma: no cover


# -- painting the findings ----------------------------------------------------------------

# Each lesion takes only voxels no earlier one took, so masks never overlap; bone first,
# then from the skull inwards.
_PAINT_ORDER = (
    "fracture",
    "epidural",
    "subdural",
    "chronic",
    "subarachnoid",
    "intraventricular",
    "intraparenchymal",
)


def _paint_lesion(
    name: str,
    plan: _Plan,
    grid: _Grid,
    anat: _Anatomy,
    label: np.ndarray,
    brain_depth: np.ndarray,
    hu: np.ndarray,
    claimed: np.ndarray,
) -> np.ndarray:
    spec = plan.lesions[name]
    flat_label = label.ravel()
    flat_depth = brain_depth.ravel()
    flat_claimed = claimed.ravel()

    if name in ("epidural", "subdural", "chronic"):
        at: _Surface = spec["at"]
        reach, thick = spec["reach"], spec["thickness"]
        idx = grid.near(at.point, reach + thick + 2.0)
        z, y, x = grid.points(idx)
        rho = _arc_distance(z, y, x, at) / reach
        depth = flat_depth[idx]
        if name == "epidural":
            # Biconvex: the dura peels off the bone in a lens, thickest at the centre.
            profile = thick * (1.0 - rho**2)
            keep = depth >= 0
        else:
            # Crescent: even thickness along the convexity, tapering only at its ends; the
            # falx stops it at the midline.
            profile = thick * np.sqrt(np.clip(1.0 - rho**4, 0.0, None))
            xs = x - _shift_at(z, y, plan.shift_mm)
            keep = (depth >= 0) & (at.side * xs > anat.fissure_half_width)
        chosen = idx[keep & (rho < 1.0) & (depth < profile) & ~flat_claimed[idx]]
        eligible = brain_depth >= 0
        anchor = at.point
    elif name == "subarachnoid":
        at = spec["at"]
        parts = spec["parts"]
        pieces = []
        csf = np.isin(flat_label, (_SULCAL, _FISSURE))
        if parts["convexity"]:
            idx = grid.near(at.point, spec["reach"] + 15.0)
            z, y, x = grid.points(idx)
            near = (_arc_distance(z, y, x, at) < spec["reach"]) & (flat_depth[idx] < 15.0)
            pieces.append(idx[near & csf[idx]])
        if parts["sylvian"]:
            pieces.append(np.flatnonzero(flat_label == (_SYLVIAN_L if at.side > 0 else _SYLVIAN_R)))
        if parts["cisterns"]:
            pieces.append(np.flatnonzero(flat_label == _CISTERN))
        chosen = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        chosen = chosen[~flat_claimed[chosen]]
        eligible = np.isin(label, _CSF_CLASSES)
        anchor = at.point
    elif name == "intraventricular":
        pieces = []
        for side in spec["sides"]:
            vent = np.flatnonzero(flat_label == (_VENT_L if side > 0 else _VENT_R))
            if vent.size:
                # Blood settles in the dependent (posterior, in a supine patient) horn.
                py = grid.patient_y_of(vent)
                level = np.quantile(py, 1.0 - spec["fill"])
                pieces.append(vent[py >= level])
        if spec["third"]:
            pieces.append(np.flatnonzero(flat_label == _VENT_3))
        if spec["fourth"]:
            pieces.append(np.flatnonzero(flat_label == _VENT_4))
        chosen = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        chosen = chosen[~flat_claimed[chosen]]
        eligible = np.isin(label, _VENTRICLE_CLASSES)
        anchor = np.array([12.0, 10.0, 9.0 * spec["sides"][0]])
    elif name == "intraparenchymal":
        spheres = spec["spheres"]
        centre, radius = spheres[0]
        edema = spec["edema"]
        idx = grid.near(centre, 2.0 * radius + edema)
        z, y, x = grid.points(idx)
        # Signed distance to the union of spheres: negative inside the clot.
        dist = np.full(idx.shape, np.inf, dtype=np.float32)
        for (cz, cy, cx), r in spheres:
            d = np.sqrt((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) - r
            np.minimum(dist, d, out=dist)
        tissue = np.isin(flat_label[idx], _PARENCHYMA_CLASSES) & ~flat_claimed[idx]
        chosen = idx[tissue & (dist <= 0)]
        # Oedema: a hypodense rim around the clot; it is not blood, so not in the mask.
        rim = idx[tissue & (dist > 0) & (dist <= edema)]
        hu.ravel()[rim] = anat.white_hu - 8.0
        eligible = np.isin(label, _PARENCHYMA_CLASSES)
        anchor = centre
    elif name == "fracture":
        at = spec["at"]
        idx = grid.near(at.point, spec["reach"] + 10.0)
        z, y, x = grid.points(idx)
        off_plane = np.abs(z * spec["normal"][0] + y * spec["normal"][1] + x * spec["normal"][2])
        line = (off_plane < spec["width"] / 2) & (_arc_distance(z, y, x, at) < spec["reach"])
        chosen = idx[line & (flat_label[idx] == _SKULL) & ~flat_claimed[idx]]
        eligible = label == _SKULL
        anchor = at.point
    else:  # pragma: no cover
        raise AssertionError(name)

    if chosen.size == 0:
        # A grid too coarse to sample the lesion, or the structure it belongs in: the nearest
        # free voxel of that structure, else of the brain, stands in for it.
        free = eligible & ~claimed
        if not free.any():
            free = (brain_depth >= 0) & ~claimed
        chosen = _nearest(grid, free, anchor, name)
    flat_claimed[chosen] = True
    hu.ravel()[chosen] = spec["hu"]
    return _scatter(grid.shape, chosen)


def _nearest(grid: _Grid, eligible: np.ndarray, anchor: np.ndarray, name: str) -> np.ndarray:
    """The eligible voxel nearest the intended centre: stands in for a lesion that fell
    between the voxel centres of a coarse grid."""
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        raise ValueError(f"the volume holds no tissue to place the {name} finding in")
    z, y, x = grid.points(idx)
    d2 = (z - anchor[0]) ** 2 + (y - anchor[1]) ** 2 + (x - anchor[2]) ** 2
    return idx[[int(np.argmin(d2))]]


def _side_of(grid: _Grid, mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return "midline"
    _, _, x = grid.points(idx)
    left = np.count_nonzero(x > 1.0)
    right = np.count_nonzero(x < -1.0)
    floor = max(1, int(0.1 * idx.size))
    if left >= floor and right >= floor:
        return "both"
    if left >= floor:
        return "left"
    if right >= floor:
        return "right"
    return "midline"


def _check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> None:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values in mm, got {spacing}")
