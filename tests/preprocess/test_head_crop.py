"""Head and brain crop: square output, nothing outside the head kept, the skull removed in
brain mode, the same pixels in training (prepare) and prediction (infer.inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ichscan.data.phantom import make_phantom
from ichscan.preprocess.head_crop import (
    CENTRE_SHARE,
    centre_zoom,
    crop_box,
    crop_slice,
    extra_planes,
)
from ichscan.preprocess.window import apply_window

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def brain_slice(rows: int = 256, cols: int = 256, seed: int = 0) -> np.ndarray:
    phantom = make_phantom((8, rows, cols), seed=seed, findings=["intraparenchymal"])
    return apply_window(phantom.hu[4], "brain")


def with_clutter(grey: np.ndarray) -> np.ndarray:
    """A table line and a burnt-in letter block far from the head."""
    out = np.pad(grey, ((0, 60), (40, 40)))
    out[-20:-16, 10:-10] = 200  # table
    out[5:15, 5:25] = 255  # letters
    return out


def test_head_crop_is_square_and_drops_the_clutter() -> None:
    grey = with_clutter(brain_slice())
    out = crop_slice(grey[..., None], "head")
    assert out.shape[0] == out.shape[1]
    assert out.shape[2] == 1
    # The head is about 256 px across: the square is the head plus a small margin, not the
    # padded 336 x 316 canvas with its table and letters.
    assert out.shape[0] < 0.9 * max(grey.shape)
    assert out[..., 0].sum() == pytest.approx(
        grey[grey > 0].sum() - 200 * 4 * (grey.shape[1] - 20) - 255 * 200, rel=0.02
    )


def test_brain_crop_zeroes_the_skull() -> None:
    grey = brain_slice()
    head = crop_slice(grey[..., None], "head")[..., 0]
    brain = crop_slice(grey[..., None], "brain")[..., 0]
    assert head.shape == brain.shape
    # Bone saturates a brain window; with the skull removed, almost nothing is left at 255
    # (only blood or calcification inside the brain could be).
    assert (head >= 250).sum() > 500
    assert (brain >= 250).sum() < 0.1 * (head >= 250).sum()
    assert (brain > 0).sum() > 0.5 * (head > 0).sum()


def test_unsaturated_skull_is_removed_too() -> None:
    # Figures re-encoded for papers (much of the Kaggle head_ct set) put the skull at
    # 225-245 instead of 255: the bone level follows the head's brightest grey.
    grey = (brain_slice().astype(np.float32) * 0.93).astype(np.uint8)
    head = crop_slice(grey[..., None], "head")[..., 0]
    brain = crop_slice(grey[..., None], "brain")[..., 0]
    assert (head >= 230).sum() > 500
    assert (brain >= 230).sum() < 0.1 * (head >= 230).sum()
    assert (brain > 0).sum() > 0.5 * (head > 0).sum()


def test_grey_figure_background_is_not_head() -> None:
    grey = brain_slice()
    framed = np.pad(grey, 40)
    framed[framed == 0] = 45  # the grey page around a figure
    out = crop_slice(framed[..., None], "head")
    assert out.shape[0] < 0.85 * framed.shape[0]
    # The faint scalp goes with the page, the skull stays in: about the same square.
    assert crop_box(framed)[2] == pytest.approx(crop_box(np.pad(grey, 40))[2], rel=0.15)


def test_bleed_as_bright_as_bone_next_to_the_skull_is_kept() -> None:
    # A drawn head: brain at 120, an 8 px skull at 255, a saturated bleed 20 px inside the
    # skull and joined to it by a 3 px bright seam (as on head_ct 075): no hole by itself.
    yy, xx = np.mgrid[:256, :256]
    radius = np.hypot((yy - 128) / 110, (xx - 128) / 95)
    rng = np.random.default_rng(0)
    grey = np.where(radius < 1, rng.integers(100, 140, (256, 256)), 0).astype(np.uint8)
    grey[(radius >= 0.92) & (radius < 1)] = 255
    bleed = np.hypot(yy - 196, xx - 128) <= 12
    grey[bleed] = 255
    grey[196:232, 127:130] = 255
    brain = crop_slice(grey[..., None], "brain")[..., 0]
    top, left, _ = crop_box(grey)
    inside = brain[196 - top - 8 : 196 - top + 9, 128 - left - 8 : 128 - left + 9]
    assert (inside == 255).all()
    assert (brain == 255).sum() < 1.3 * bleed.sum()  # and the skull is gone


def skull_base() -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """A drawn skull-base slice: brain at 100-140 in three compartments parted by bone (the
    petrous ridges behind two temporal lobes, the sphenoid between them, all at 255), inside
    a skull, and a thick jaw muscle at 130 against the skull's outside on the left. Returns
    the slice and a point inside each part."""
    yy, xx = np.mgrid[:256, :320]
    radius = np.hypot((yy - 128) / 110, (xx - 180) / 95)
    rng = np.random.default_rng(0)
    grey = np.where(radius < 1, rng.integers(100, 140, yy.shape), 0).astype(np.uint8)
    grey[(radius >= 0.9) & (radius < 1)] = 255  # the skull (scalp too thin to matter)
    grey[108:118][radius[108:118] < 1] = 255  # the petrous ridges
    grey[:118, 174:186][radius[:118, 174:186] < 1] = 255  # the sphenoid
    grey[(np.hypot((yy - 128) / 45, (xx - 85) / 50) < 1) & (radius >= 1)] = 130
    return grey, {
        "posterior": (180, 180),
        "left temporal": (70, 132),
        "right temporal": (70, 228),
        "muscle": (128, 60),
    }


def test_every_brain_compartment_of_the_skull_base_is_kept() -> None:
    """Below the skull base the brain lies in compartments parted by bone; each must stay
    in the brain crop (a temporal-lobe bleed is a common finding), and soft tissue outside
    the skull must not (crop version 4: until then only the largest part was kept, and 10
    of the 100 RSNA slices lost their temporal or frontal lobes)."""
    grey, parts = skull_base()
    brain = crop_slice(grey[..., None], "brain")[..., 0]
    top, left, _ = crop_box(grey)
    kept = {name: bool(brain[r - top, c - left]) for name, (r, c) in parts.items()}
    assert kept == {
        "posterior": True,
        "left temporal": True,
        "right temporal": True,
        "muscle": False,
    }
    assert (brain == 255).sum() < 0.02 * (brain > 0).sum()  # the bone between them is gone


def test_brain_and_head_crops_side_by_side() -> None:
    """``brain+head`` is the brain crop's planes and then the head crop of the brain window,
    pixel for pixel, in one square (what the small-set ensemble's readers take)."""
    grey = with_clutter(brain_slice(seed=1))
    planes = np.stack([grey, 255 - grey], axis=2)  # a second window, cropped as the first
    both = crop_slice(planes, "brain+head")
    assert both.shape[2] == 3
    np.testing.assert_array_equal(both[..., :2], crop_slice(planes, "brain"))
    np.testing.assert_array_equal(both[..., 2], crop_slice(planes, "head")[..., 0])
    assert (both[..., 2] > 0).sum() > (both[..., 0] > 0).sum()  # the skull is kept


@pytest.mark.parametrize("crop", ["head", "brain", "brain+head"])
def test_a_slice_with_no_head_crops_to_zeros(crop: str) -> None:
    """Air with the table's arcs below the head: nothing of it is inside a head or brain,
    so no arc reaches a network (crop version 3)."""
    table = np.zeros((40, 60, 2), dtype=np.uint8)
    table[30, 5:55] = 255  # a thin arc: opened away, never a head
    assert crop_slice(table[..., :1], "none").any()
    out = crop_slice(table, crop)
    assert out.shape == (60, 60, 2 + extra_planes(crop))
    assert not out.any()
    assert crop_box(table[..., 0]) == (-10, 0, 60)


def test_crop_box_matches_the_cut() -> None:
    grey = with_clutter(brain_slice(seed=3))
    top, left, side = crop_box(grey)
    out = crop_slice(grey[..., None], "head")[..., 0]
    assert out.shape == (side, side)
    r0, c0 = max(top, 0), max(left, 0)
    window = grey[r0 : top + side, c0 : left + side]
    inside = out[r0 - top : r0 - top + window.shape[0], c0 - left : c0 - left + window.shape[1]]
    kept = inside > 0
    assert np.array_equal(inside[kept], window[kept])


def test_unknown_crop_and_bad_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="crop must be one of"):
        crop_slice(np.zeros((4, 4, 1), np.uint8), "skull")
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        crop_slice(np.zeros((4, 4), np.uint8), "head")


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(8, 80),
    cols=st.integers(8, 80),
    seed=st.integers(0, 2**16),
    crop=st.sampled_from(["head", "brain", "brain+head"]),
)
def test_any_slice_gives_a_square_without_new_values(
    rows: int, cols: int, seed: int, crop: str
) -> None:
    grey = np.random.default_rng(seed).integers(0, 256, (rows, cols, 2), dtype=np.uint8)
    out = crop_slice(grey, crop)
    assert out.ndim == 3 and out.shape[0] == out.shape[1]
    assert out.shape[2] == 2 + extra_planes(crop)
    # Cropping only keeps or zeroes pixels: every value comes from the input.
    assert set(np.unique(out)) <= set(np.unique(grey)) | {0}


@pytest.mark.skipif(not (SHARED / "head_ct").exists(), reason="../shared/data/head_ct absent")
def test_real_head_ct_images_crop_to_the_head() -> None:
    from ichscan.io.image import read_grey

    for name in ("000.png", "100.png"):
        grey = read_grey(SHARED / "head_ct" / "images" / name)
        out = crop_slice(grey[..., None], "brain")[..., 0]
        assert out.shape[0] == out.shape[1]
        assert 0.6 * max(grey.shape) < out.shape[0] < 1.2 * max(grey.shape)
        # The brain fills a good part of the square, and its border ring is empty.
        assert (out > 0).mean() > 0.3
        ring = np.concatenate([out[:3].ravel(), out[-3:].ravel(), out[:, :3].ravel()])
        assert ring.max() == 0


@pytest.mark.skipif(not (SHARED / "head_ct").exists(), reason="../shared/data/head_ct absent")
@pytest.mark.parametrize(
    ("name", "what"),
    [("161.png", "unsaturated skull"), ("010.png", "grey background"), ("075.png", "bleed")],
)
def test_real_head_ct_quirks(name: str, what: str) -> None:
    from ichscan.io.image import read_grey

    grey = read_grey(SHARED / "head_ct" / "images" / name)
    out = crop_slice(grey[..., None], "brain")[..., 0]
    brain = out > 0
    if what == "unsaturated skull":  # skull at 230-245: 20% of the kept pixels before
        assert (out[brain] >= 225).mean() < 0.02
    elif what == "grey background":  # the page at ~40 was taken for head: 74% kept before
        assert brain.mean() < 0.6
        assert (out[brain] >= 225).mean() < 0.04
    else:  # a saturated parietal bleed joined to the skull by a bright seam
        assert (out >= 240).sum() > 2500


def test_a_thin_band_between_two_bright_lines_is_not_brain() -> None:
    """Some head_ct figures draw a bright line around the head: the scalp between it and the
    skull is enclosed by bright pixels but thin, and stays out of the brain crop."""
    yy, xx = np.mgrid[:256, :256]
    radius = np.hypot((yy - 128) / 110, (xx - 128) / 95)
    grey = np.where(radius < 1, 120, 0).astype(np.uint8)
    grey[(radius >= 0.88) & (radius < 0.93)] = 255  # the skull
    grey[(radius >= 0.985) & (radius < 1)] = 255  # the drawn line; scalp between at 120
    brain = crop_slice(grey[..., None], "brain")[..., 0]
    top, left, _ = crop_box(grey)
    assert brain[128 - top, 128 - left] == 120  # the brain is kept
    scalp = (radius >= 0.94) & (radius < 0.975)
    rows, cols = np.nonzero(scalp)
    assert not brain[rows - top, cols - left].any()


SKULL_BASE_SLICES = ["ID_d407e1eaf", "ID_198af7f49", "ID_4114ab2b0"]


@pytest.mark.skipif(not (SHARED / "rsna_png").exists(), reason="../shared/data/rsna_png absent")
@pytest.mark.parametrize("name", SKULL_BASE_SLICES)
def test_real_rsna_skull_base_keeps_its_lobes(name: str) -> None:
    """Real RSNA slices through the skull base: the brain crop holds the posterior fossa and
    both temporal lobes, where crop version 3 kept only the largest part (on
    ID_d407e1eaf the bleed is in a temporal lobe it dropped)."""
    from scipy import ndimage as ndi

    from ichscan.io.image import read_grey

    grey = read_grey(SHARED / "rsna_png" / "images" / f"{name}.png")
    brain = crop_slice(grey[..., None], "brain")[..., 0] > 0
    labels, n = ndi.label(brain)
    sizes = ndi.sum_labels(brain, labels, np.arange(1, n + 1))
    assert (sizes >= 0.05 * sizes.max()).sum() >= 2
    assert sizes.sum() > 1.3 * sizes.max()  # the other parts are no crumbs


def brain_cropped(seed: int = 0) -> np.ndarray:
    out = crop_slice(brain_slice(seed=seed)[..., None], "brain")[..., 0]
    return np.asarray(Image.fromarray(out).resize((320, 320), Image.Resampling.BILINEAR))


def test_centre_zoom_magnifies_the_middle_of_the_brain() -> None:
    grey = brain_cropped()
    zoom = centre_zoom(grey)
    assert zoom.shape == grey.shape and zoom.dtype == np.uint8
    # A marked pixel block at the brain's centre grows by 1 / CENTRE_SHARE in each direction.
    brain = grey > 0
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    cy, cx = (rows[0] + rows[-1] + 1) // 2, (cols[0] + cols[-1] + 1) // 2
    marked = grey.copy()
    marked[cy - 4 : cy + 4, cx - 4 : cx + 4] = 255
    bright = centre_zoom(marked) == 255
    side = np.sqrt(bright.sum())
    extent = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    expected = 8 * grey.shape[0] / (CENTRE_SHARE * extent)
    assert abs(side - expected) <= 3, (side, expected)
    # ...and stays in the middle of the zoom.
    r, c = np.nonzero(bright)
    assert abs(r.mean() - 160) < 3 and abs(c.mean() - 160) < 3


def test_centre_zoom_of_a_blank_slice_is_blank() -> None:
    assert not centre_zoom(np.zeros((320, 320), np.uint8)).any()


@given(seed=st.integers(0, 50))
@settings(max_examples=10, deadline=None)
def test_centre_zoom_commutes_with_the_mirror(seed: int) -> None:
    """Flip TTA mirrors the input and the model zooms it: that must be the mirror of the zoom
    the centre reader was trained on (up to one grey level of PIL's rounding)."""
    grey = brain_cropped(seed)
    a = centre_zoom(np.ascontiguousarray(grey[:, ::-1]))[:, ::-1].astype(int)
    b = centre_zoom(grey).astype(int)
    assert np.abs(a - b).max() <= 1
    assert (a != b).mean() < 0.01


@pytest.mark.parametrize(
    ("name", "finding"),
    [
        ("ID_2008dd408", "epidural against the inner table"),
        ("ID_1b5ac170c", "intraparenchymal"),
        ("ID_4f3e8c5c1", "intraventricular"),
        ("ID_afb1bcdab", "intraparenchymal"),
    ],
)
def test_real_rsna_dicom_bleeds_stay_in_the_brain_crop(
    rsna_dicom_dir: Path, name: str, finding: str
) -> None:
    """On real scanner slices the brain window puts acute blood below the skull's level, so
    the crop that zeroes the skull keeps the blood, an epidural lens against the bone too.
    The bleed: the largest region of 55-95 HU inside the skull (a crop that took blood over
    ~62 HU for bone keeps 4% of the epidural; this one 93%)."""
    from scipy import ndimage as ndi

    from ichscan.io.dicom import read_slice_hu
    from ichscan.preprocess.head_crop import brain_mask, head_mask

    hu, _ = read_slice_hu(rsna_dicom_dir / "stage_2_train" / f"{name}.dcm")
    skull = ndi.binary_closing(hu >= 300, iterations=4)
    inside = ndi.binary_fill_holes(skull) & ~skull
    blood = ndi.binary_opening((hu >= 55) & (hu <= 95) & inside, iterations=3)
    labels, n = ndi.label(blood)
    sizes = ndi.sum_labels(blood, labels, np.arange(1, n + 1))
    bleed = labels == 1 + int(np.argmax(sizes))
    assert bleed.sum() >= 300, f"{name}: no {finding} bleed found to check"

    grey = apply_window(hu, "brain")
    head = head_mask(grey)
    assert head is not None
    kept = (bleed & brain_mask(grey, head)).sum() / bleed.sum()
    assert kept >= 0.9, f"{name}: the brain crop keeps {kept:.0%} of the {finding} bleed"
