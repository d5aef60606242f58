"""The head phantoms look like head CT where the pipeline looks.

make_head_phantom: air, scalp, skull, brain, ventricles and (optionally) one hyperdense bleed
whose mask marks exactly that bleed. make_phantom: the same cartoon with sulci and cisterns,
every hemorrhage subtype in its typical place and shape, chronic collections, fractures,
mass effect and midline shift, each with a mask of exactly what it changed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from ichscan.data.phantom import (
    FINDINGS,
    LABELS,
    SUBTYPES,
    TISSUES,
    Phantom,
    label_mask,
    make_head_phantom,
    make_phantom,
    scan_labels,
    slice_labels,
)

SPACING = (5.0, 0.9, 0.9)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_head_phantom((32, 256, 256), SPACING, seed=0)


def test_shapes_and_types(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, mask = phantom
    assert hu.shape == mask.shape == (32, 256, 256)
    assert hu.dtype == np.int16 and mask.dtype == bool


def test_air_outside_the_head(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, _ = phantom
    corners = hu[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.abs(corners + 1000).max() <= 25
    # The head is 150 mm tall in a 160 mm stack: the end slices miss it.
    for k in (0, -1):
        assert np.abs(hu[k].astype(np.int32) + 1000).max() <= 25


def test_profile_through_the_side_of_the_head(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    """Left to right along the middle row: air, thin scalp, ~6 mm of dense skull, then brain."""
    hu, _ = phantom
    row = hu[16, 128].astype(np.int32)
    first_tissue = int(np.argmax(row > -500))
    first_bone = int(np.argmax(row > 500))
    bone = np.flatnonzero(row[: row.size // 2] > 500)
    scalp = row[first_tissue:first_bone]
    assert 2 <= scalp.size <= 7
    assert 25 <= np.median(scalp) <= 55
    assert 4.0 <= bone.size * SPACING[2] <= 8.0
    assert row[bone].max() > 1400 and row[bone].min() > 600
    inside = row[bone[-1] + 3 : bone[-1] + 20]
    assert 20 <= np.median(inside) <= 45


def test_skull_density(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, _ = phantom
    bone = hu[hu > 300]
    assert bone.size > 10_000
    assert bone.min() > 680 and np.median(bone) > 700 and bone.max() <= 1520


def test_brain_and_ventricles() -> None:
    hu, _ = make_head_phantom((32, 256, 256), SPACING, seed=0, bleed=False)
    soft = hu[(hu > -100) & (hu < 100)]
    assert 20 <= np.median(soft) <= 45
    # Deep white matter lateral to the ventricles sits below the ~37 HU cortical ribbon.
    white = hu[16, 100:156, 65:85]
    assert 22 <= np.median(white) <= 32
    # CSF-dense ventricles either side of the midline, above the centre of the head.
    slab = hu[18:21, 110:140]
    for cols in (slice(112, 122), slice(134, 144)):
        assert np.median(slab[:, :, cols]) < 12
    assert np.median(slab[:, :, 125:131]) > 20


def test_bleed_is_hyperdense_and_inside_the_mask(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, mask = phantom
    assert mask.sum() > 50
    blood = hu[mask]
    assert blood.min() >= 60 and blood.max() <= 90
    assert 60 <= np.median(blood) <= 90
    # Nothing outside the mask is blood-dense except bone.
    lookalike = (hu >= 58) & (hu <= 100) & ~mask
    assert lookalike.sum() < 0.01 * mask.sum()


def test_mask_is_only_inside_the_brain(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, mask = phantom
    # A few millimetres around the bleed is still soft tissue: no skull, no air.
    around = ndimage.binary_dilation(mask, structure=np.ones((1, 11, 11), dtype=bool)) & ~mask
    assert around.any()
    assert hu[around].min() > -100 and hu[around].max() < 100


def test_no_bleed_means_empty_mask() -> None:
    hu, mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=5, bleed=False)
    assert not mask.any()
    assert not ((hu >= 60) & (hu <= 100)).any()


def test_same_seed_same_phantom_other_seed_other_bleed() -> None:
    a_hu, a_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=7)
    b_hu, b_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=7)
    c_hu, c_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=8)
    np.testing.assert_array_equal(a_hu, b_hu)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_mask, c_mask)
    assert not np.array_equal(a_hu, c_hu)


def _centroid_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    centre_index = (np.array(mask.shape) - 1) / 2
    return (np.argwhere(mask).mean(axis=0) - centre_index) * np.array(spacing)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anatomy_is_defined_in_millimetres(
    phantom: tuple[np.ndarray, np.ndarray], seed: int
) -> None:
    fine_mask = phantom[1] if seed == 0 else make_head_phantom(seed=seed)[1]
    coarse_hu, coarse_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=seed)
    np.testing.assert_allclose(
        _centroid_mm(coarse_mask, (10.0, 1.8, 1.8)), _centroid_mm(fine_mask, SPACING), atol=6.0
    )
    # Head width (left-right) is ~150 mm at either spacing.
    width = np.count_nonzero(coarse_hu[8, 64] > -500) * 1.8
    assert 140 <= width <= 160


def test_small_or_coarse_grids_still_bleed() -> None:
    _, small = make_head_phantom((6, 64, 64), SPACING, seed=3)
    _, coarse = make_head_phantom((2, 8, 8), (40.0, 30.0, 30.0), seed=3)
    assert small.any() and coarse.any()


def test_volume_without_brain_cannot_bleed() -> None:
    with pytest.raises(ValueError, match="parenchyma"):
        make_head_phantom((1, 2, 2), (1.0, 200.0, 200.0), seed=0)  # four voxels of air


@pytest.mark.parametrize(
    ("shape", "spacing"), [((0, 8, 8), SPACING), ((4, 8), SPACING), ((4, 8, 8), (1.0, 0.0, 1.0))]
)
def test_bad_geometry_is_refused(shape: tuple, spacing: tuple) -> None:
    with pytest.raises(ValueError):
        make_head_phantom(shape, spacing)


def test_builds_quickly() -> None:
    make_head_phantom((8, 64, 64))  # warm up
    start = time.perf_counter()
    make_head_phantom((32, 256, 256), seed=11)
    # Generous bound for loaded CI machines; a per-voxel Python loop would take minutes.
    assert time.perf_counter() - start < 2.0


# -- make_phantom: every finding, with masks and truth --------------------------------------


PIXEL_MM2 = SPACING[1] * SPACING[2]
SKULL = TISSUES["skull"]
VENTRICLES = [v for k, v in TISSUES.items() if "ventricle" in k]
PARENCHYMA = [TISSUES["white_matter"], TISSUES["grey_matter"], TISSUES["deep_grey_matter"]]
CSF_SPACES = [
    TISSUES[k]
    for k in (
        "sulcal_csf",
        "interhemispheric_fissure",
        "sylvian_fissure_left",
        "sylvian_fissure_right",
        "basal_cisterns",
    )
]
IN_PLANE = np.ones((1, 3, 3), dtype=bool)


@pytest.fixture(scope="module")
def single() -> dict[str, Phantom]:
    """One phantom per lesion finding, alone, at full resolution (seed 1)."""
    names = (*SUBTYPES, "chronic", "fracture")
    return {name: make_phantom(seed=1, findings=[name]) for name in names}


@pytest.fixture(scope="module")
def normal() -> Phantom:
    return make_phantom(seed=1, findings=[])


def _touches_skull(p: Phantom, mask: np.ndarray) -> float:
    """Fraction of the mask within two in-plane voxels of bone."""
    near_bone = ndimage.binary_dilation(p.tissue == SKULL, IN_PLANE, iterations=2)
    return float((mask & near_bone).sum() / mask.sum())


def test_phantom_fields(single: dict[str, Phantom]) -> None:
    p = single["epidural"]
    assert p.hu.shape == p.tissue.shape == (32, 256, 256) and p.hu.dtype == np.int16
    assert list(p.findings) == list(FINDINGS)
    assert p.findings["epidural"] and sum(p.findings.values()) == 1
    assert list(p.masks) == ["epidural"] and p.masks["epidural"].dtype == bool
    assert p.spacing == SPACING and p.seed == 1


def test_anatomy_of_a_normal_head(normal: Phantom) -> None:
    hu, tissue = normal.hu, normal.tissue
    assert not normal.masks and not any(normal.findings.values())
    bone = hu[tissue == SKULL]
    assert bone.min() >= 700 and bone.max() <= 1500
    assert 30 <= np.median(hu[tissue == TISSUES["grey_matter"]]) <= 40
    assert 20 <= np.median(hu[tissue == TISSUES["white_matter"]]) <= 30
    for name in ("lateral_ventricle_left", "lateral_ventricle_right", "sulcal_csf"):
        assert np.median(hu[tissue == TISSUES[name]]) < 12, name
        assert (tissue == TISSUES[name]).sum() > 500, name
    assert (tissue == TISSUES["basal_cisterns"]).sum() > 200
    # Sulci are thin clefts: an in-plane erosion leaves little of them.
    sulci = tissue == TISSUES["sulcal_csf"]
    assert ndimage.binary_erosion(sulci, IN_PLANE).sum() < 0.1 * sulci.sum()
    # Left ventricle on the patient's left (higher column index), right on the right.
    cols = np.arange(256)
    left = (tissue == TISSUES["lateral_ventricle_left"]).sum(axis=(0, 1)) @ cols
    right = (tissue == TISSUES["lateral_ventricle_right"]).sum(axis=(0, 1)) @ cols
    assert left / (tissue == TISSUES["lateral_ventricle_left"]).sum() > 128
    assert right / (tissue == TISSUES["lateral_ventricle_right"]).sum() < 128
    # No blood-dense soft tissue to speak of in a normal head.
    assert ((hu >= 60) & (hu <= 90)).sum() < 0.001 * hu.size


@pytest.mark.parametrize("name", SUBTYPES)
def test_acute_blood_is_50_to_90_hu(single: dict[str, Phantom], name: str) -> None:
    p = single[name]
    blood = p.hu[p.masks[name]]
    assert blood.size > 50
    assert blood.min() >= 50 and blood.max() <= 90
    assert 55 <= np.median(blood) <= 85


@pytest.mark.parametrize("name", ["epidural", "subdural", "chronic"])
def test_extra_axial_collections_lie_under_the_inner_table(
    single: dict[str, Phantom], name: str
) -> None:
    p = single[name]
    mask = p.masks[name]
    assert _touches_skull(p, mask) > 0.2
    # Inside the skull: painted over brain and CSF, never over bone or scalp.
    assert not np.isin(p.tissue[mask], [SKULL, TISSUES["scalp"], TISSUES["air"]]).any()


def _aspect(p: Phantom, name: str) -> float:
    """Area / thickness^2 of the lesion on its largest slice: a lens is stubby, a crescent
    long and thin."""
    mask = p.masks[name]
    sl = mask[int(np.argmax(mask.sum(axis=(1, 2))))]
    thickness = 2 * ndimage.distance_transform_edt(sl).max()
    return float(sl.sum() / thickness**2)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_subdural_is_a_longer_thinner_crescent_than_the_epidural_lens(seed: int) -> None:
    edh = make_phantom(seed=seed, findings=["epidural"])
    sdh = make_phantom(seed=seed, findings=["subdural"])
    assert _aspect(sdh, "subdural") > 1.5 * _aspect(edh, "epidural")
    # The falx stops a subdural at the midline: it stays on one side.
    assert sdh.sides["subdural"] in ("left", "right")


def test_intraventricular_blood_layers_in_the_dependent_ventricle(
    single: dict[str, Phantom],
) -> None:
    p = single["intraventricular"]
    mask = p.masks["intraventricular"]
    assert np.isin(p.tissue[mask], VENTRICLES).all()
    lateral = np.isin(p.tissue, VENTRICLES[:2])
    # Supine patient: blood sinks to the back (higher row index) of the ventricle.
    rows = np.arange(256)
    blood_row = mask.sum(axis=(0, 2)) @ rows / mask.sum()
    ventricle_row = lateral.sum(axis=(0, 2)) @ rows / lateral.sum()
    assert blood_row > ventricle_row + 3


def test_intraparenchymal_blood_is_in_the_parenchyma(single: dict[str, Phantom]) -> None:
    p = single["intraparenchymal"]
    mask = p.masks["intraparenchymal"]
    assert np.isin(p.tissue[mask], PARENCHYMA).all()
    assert _touches_skull(p, mask) == 0
    # A blob, not a sliver: it has a solid core.
    assert ndimage.binary_erosion(mask, IN_PLANE, iterations=2).sum() > 0.2 * mask.sum()
    # Hypodense oedema rims the clot.
    rim = ndimage.binary_dilation(mask, IN_PLANE, iterations=2) & ~mask
    assert np.median(p.hu[rim]) < np.median(p.hu[np.isin(p.tissue, PARENCHYMA) & ~mask])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_subarachnoid_blood_fills_thin_csf_spaces(seed: int) -> None:
    p = make_phantom(seed=seed, findings=["subarachnoid"])
    mask = p.masks["subarachnoid"]
    assert mask.sum() > 100
    assert np.isin(p.tissue[mask], CSF_SPACES).all()
    assert ndimage.binary_erosion(mask, IN_PLANE).sum() < 0.5 * mask.sum()


def test_chronic_collection_is_hypodense(single: dict[str, Phantom]) -> None:
    p = single["chronic"]
    fluid = p.hu[p.masks["chronic"]]
    assert fluid.min() >= 10 and fluid.max() <= 25
    brain = p.hu[np.isin(p.tissue, PARENCHYMA) & ~p.masks["chronic"]]
    assert np.median(fluid) < np.median(brain) - 5


def test_fracture_is_a_gap_in_the_skull(single: dict[str, Phantom], normal: Phantom) -> None:
    p = single["fracture"]
    gap = p.masks["fracture"]
    assert gap.sum() > 20
    assert (p.tissue[gap] == SKULL).all()
    assert normal.hu[gap].min() >= 700  # bone before
    assert p.hu[gap].max() < 100  # soft tissue after
    # A line through the full thickness of the calvarium: the gap reaches from the scalp
    # side to the brain side on some row of some slice.
    brain_side = ndimage.binary_dilation(np.isin(p.tissue, PARENCHYMA + CSF_SPACES), IN_PLANE)
    scalp_side = ndimage.binary_dilation(p.tissue == TISSUES["scalp"], IN_PLANE)
    assert (gap & brain_side).any() and (gap & scalp_side).any()


def test_masks_hold_exactly_the_voxels_painted(normal: Phantom) -> None:
    # Same seed, so same anatomy and noise: every changed voxel belongs to a mask.
    names = ["epidural", "subdural", "chronic", "subarachnoid", "intraventricular", "fracture"]
    p = make_phantom(seed=1, findings=names)
    union = np.zeros(p.hu.shape, dtype=bool)
    total = 0
    for name in names:
        total += int(p.masks[name].sum())
        union |= p.masks[name]
    assert total == union.sum()  # no overlaps
    changed = p.hu != normal.hu
    assert not (changed & ~union).any()
    assert changed.sum() >= 0.95 * union.sum()


def test_midline_shift_pushes_the_ventricles_away_from_the_bleed() -> None:
    base = make_phantom(seed=4, findings=["subdural"])
    shifted = make_phantom(seed=4, findings=["subdural", "midline_shift"])
    assert shifted.findings["mass_effect"]  # a shift is a mass effect
    side = 1 if base.sides["subdural"] == "left" else -1
    assert shifted.midline_shift_mm * side < -3

    def centre_col(p: Phantom) -> float:
        vent = np.isin(p.tissue, VENTRICLES)
        return float(vent.sum(axis=(0, 1)) @ np.arange(256) / vent.sum())

    moved_mm = (centre_col(shifted) - centre_col(base)) * SPACING[2]
    assert moved_mm * side < -2.5
    assert shifted.masks["midline_shift"].any() and shifted.masks["mass_effect"].any()


def test_mass_effect_squeezes_the_ventricle_beside_the_mass() -> None:
    base = make_phantom(seed=5, findings=["intraparenchymal"])
    mass = make_phantom(seed=5, findings=["intraparenchymal", "mass_effect"])
    side = base.sides["intraparenchymal"]
    assert side in ("left", "right")
    same = TISSUES[f"lateral_ventricle_{side}"]
    other = TISSUES[f"lateral_ventricle_{'right' if side == 'left' else 'left'}"]
    assert (mass.tissue == same).sum() < 0.8 * (base.tissue == same).sum()
    assert (mass.tissue == other).sum() == (base.tissue == other).sum()
    # Sulci beside the mass are effaced.
    sulci = TISSUES["sulcal_csf"]
    assert (mass.tissue == sulci).sum() < (base.tissue == sulci).sum()


def test_same_seed_same_phantom() -> None:
    a = make_phantom((12, 96, 96), (10.0, 2.4, 2.4), seed=9)
    b = make_phantom((12, 96, 96), (10.0, 2.4, 2.4), seed=9)
    c = make_phantom((12, 96, 96), (10.0, 2.4, 2.4), seed=10)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.findings == b.findings and a.pose_deg == b.pose_deg
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        np.testing.assert_array_equal(a.masks[name], b.masks[name])
    assert not np.array_equal(a.hu, c.hu)


def test_random_findings_cover_everything_over_twenty_seeds() -> None:
    seen: set[str] = set()
    normals = 0
    for seed in range(20):
        p = make_phantom((12, 64, 64), (12.5, 3.6, 3.6), seed=seed)
        present = {k for k, v in p.findings.items() if v}
        assert set(p.masks) == present
        seen |= present
        subtypes = present & set(SUBTYPES)
        if not present:
            normals += 1
        else:
            assert 1 <= len(subtypes) <= 3
    assert seen == set(FINDINGS)
    assert 5 <= normals <= 15


def test_findings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown findings"):
        make_phantom((4, 32, 32), (10.0, 7.0, 7.0), findings=["stroke"])
    with pytest.raises(TypeError):
        make_phantom((4, 32, 32), (10.0, 7.0, 7.0), findings="epidural")
    with pytest.raises(ValueError):
        make_phantom((4, 32), (10.0, 7.0, 7.0))


def test_slice_labels_follow_the_masks() -> None:
    p = make_phantom(seed=2, findings=["epidural", "intraventricular", "chronic"])
    labels = slice_labels(p)
    assert tuple(labels) == LABELS
    for name in SUBTYPES:
        area = label_mask(p, name).sum(axis=(1, 2)) * PIXEL_MM2
        assert labels[name].dtype == bool and labels[name].shape == (32,)
        np.testing.assert_array_equal(labels[name], area >= min(20.0, area.max() or np.inf))
    np.testing.assert_array_equal(
        labels["any"], np.logical_or.reduce([labels[n] for n in SUBTYPES])
    )
    # The chronic collection is read as subdural.
    assert labels["subdural"].any()
    assert scan_labels(p) == {
        "epidural": True,
        "intraparenchymal": False,
        "intraventricular": True,
        "subarachnoid": False,
        "subdural": True,
        "any": True,
    }
    assert not slice_labels(make_phantom(seed=2, findings=[]))["any"].any()


def test_a_tiny_lesion_still_gives_a_positive_slice() -> None:
    p = make_phantom((2, 8, 8), (40.0, 30.0, 30.0), seed=3, findings=FINDINGS)
    labels = slice_labels(p)
    for name in SUBTYPES:
        assert p.masks[name].any() and labels[name].any(), name


def test_pose_rotates_the_head_in_plane() -> None:
    def axis_deg(p: Phantom) -> float:
        head = p.hu[16] > -500
        rows, cols = np.nonzero(head)
        cov = np.cov(np.stack([cols - cols.mean(), rows - rows.mean()]))
        major = np.linalg.eigh(cov)[1][:, -1]  # the long (antero-posterior) axis
        if major[1] < 0:
            major = -major
        return float(np.degrees(np.arctan2(major[0], major[1])))

    upright = make_phantom(seed=6, findings=[], pose_deg=0.0)
    plus = make_phantom(seed=6, findings=[], pose_deg=8.0)
    minus = make_phantom(seed=6, findings=[], pose_deg=-8.0)
    assert abs(axis_deg(upright)) < 1.0
    assert abs(abs(axis_deg(plus)) - 8.0) < 1.5
    assert axis_deg(plus) * axis_deg(minus) < 0


def test_tilted_grid_keeps_the_head_where_it_is_in_patient_space() -> None:
    tilt = 20.0

    def centroid_mm(p: Phantom, t_deg: float) -> np.ndarray:
        # Patient coordinates as write_ct_series lays out a tilted series (centred).
        t = np.radians(t_deg)
        k, i, j = (np.argwhere(p.masks["intraparenchymal"]) - (np.array(p.shape) - 1) / 2).T
        z = k * p.spacing[0] / np.cos(t) - i * p.spacing[1] * np.sin(t)
        return np.array(
            [z.mean(), (i * p.spacing[1] * np.cos(t)).mean(), (j * p.spacing[2]).mean()]
        )

    flat = make_phantom(seed=7, findings=["intraparenchymal"], pose_deg=0.0)
    tilted = make_phantom(seed=7, findings=["intraparenchymal"], pose_deg=0.0, tilt_deg=tilt)
    assert tilted.tilt_deg == tilt
    np.testing.assert_allclose(centroid_mm(tilted, tilt), centroid_mm(flat, 0.0), atol=3.0)


def test_lesions_are_defined_in_millimetres() -> None:
    fine = make_phantom(seed=8, findings=["intraparenchymal"])
    coarse = make_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=8, findings=["intraparenchymal"])
    np.testing.assert_allclose(
        _centroid_mm(coarse.masks["intraparenchymal"], (10.0, 1.8, 1.8)),
        _centroid_mm(fine.masks["intraparenchymal"], SPACING),
        atol=5.0,
    )
    assert coarse.findings == fine.findings and coarse.pose_deg == fine.pose_deg


def test_a_grid_without_brain_cannot_hold_a_bleed() -> None:
    with pytest.raises(ValueError, match="no tissue"):
        make_phantom((1, 2, 2), (1.0, 200.0, 200.0), findings=["fracture"])
    assert make_phantom((1, 2, 2), (1.0, 200.0, 200.0), findings=[]).hu.shape == (1, 2, 2)


def test_full_phantom_builds_quickly() -> None:
    make_phantom((8, 64, 64))  # warm up
    start = time.perf_counter()
    make_phantom(seed=3, findings=FINDINGS)
    # Generous for loaded CI machines; it takes ~0.3 s on a laptop core.
    assert time.perf_counter() - start < 3.0
