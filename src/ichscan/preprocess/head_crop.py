"""Crop a brain-window slice to the head, optionally keeping the brain only.

Real head CT images carry a lot that is not the patient: the scanner table, rulers, burnt-in
letters, and a head that fills a different share of the field in every source (the Kaggle
head_ct PNGs are tight crops, RSNA slices a 512² field of view). A small model learns those
differences instead of the bleed. Cropping every slice to a square around the head, with
everything outside it zeroed, puts all sources on one scale; zeroing the skull and scalp as
well (``brain``) removes the brightest structure, which otherwise dominates pooled features.
On the real head_ct and RSNA PNGs the crop raised the frozen-feature AUC by 0.03–0.09 on RSNA
(research/recipe_lab/RECIPE.md, experiments 1 and 5–6). ``brain+head`` gives both: the
brain-only planes, then the first plane again with the skull kept, in the same square. The
small-set ensemble reads each with its own networks: a bleed against the inner table that
saturates like bone (re-encoded figures, head_ct) goes with the skull from the brain crop but
not from the head crop (research/recipe_lab/SESSION6.md, section 3). On real scanner slices
acute blood stays below the skull's level in a brain window and the brain crop keeps it, an
epidural lens too (tests/preprocess/test_head_crop.py).

The masks are computed on the first channel, which must be a brain window (40/80): air and
fat are 0 there, bone saturates at 255, brain and blood lie between. Other channels (subdural,
bone windows) are cropped with the same box and mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

BRAIN_AND_HEAD = "brain+head"  # the brain crop's planes, then the head crop of the first
CROPS = ("none", "head", "brain", BRAIN_AND_HEAD)
# Bumped whenever the masks change, so prepared caches are redone and a bundle trained on
# another version says so. 2: tissue and bone levels follow the image (grey figure pages,
# unsaturated skulls); bright seams between a bleed and the skull are sealed. 3: a slice with
# no head in it crops to zeros, not to the whole slice (table arcs and all). 4: every
# compartment of the brain that bone encloses is kept, not only the largest (skull base).
CROP_VERSION = 4

_HEAD_MIN = 30  # grey level above which a pixel is tissue, in a brain window
_ABOVE_BACKGROUND = 20  # tissue must be this much brighter than a grey figure background
_BONE = 245  # the highest bone level (a saturated skull in a true brain window)
_BELOW_SKULL = 15  # an unsaturated skull: bone from this far below its brightest level
_BONE_FLOOR = 200  # never lower: acute blood (60-80 HU) lies at 190-255 in a brain window
_ERODE = 3  # px the soft-tissue mask is eroded by, to part the brain from the scalp
_SEAL = 0.01  # the brain mask's closing radius beyond the erosion, as a share of the extent
_MARGIN = 0.04  # each side of the square box, as a share of the head's extent
_COMPARTMENT = 0.05  # smallest brain compartment kept, as a share of the largest soft part
_DEPTH = 0.04  # and its least depth (eroded), as a share of the head's extent: no thin rims
_RAYS = 16  # directions in which bone must enclose a compartment
_OPEN_RAYS = 1  # rays allowed to leave the head without meeting bone (foramina, thin bone)
CENTRE_SHARE = 0.6  # the centre zoom's side, as a share of the brain's larger extent
_CENTRE_MIN_HALF = 16  # px: a crumb of brain is not magnified past this


def _sizeable_parts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component labels of mask, the labels of its parts at least _COMPARTMENT the size of
    the largest, largest first); no labels when mask is empty."""
    labels, n = ndi.label(mask)
    sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
    order = np.argsort(-sizes, kind="stable")
    return labels, 1 + order[sizes[order] >= _COMPARTMENT * sizes.max(initial=0)]


def tissue_level(grey: np.ndarray) -> float:
    """Grey level above which a pixel is tissue. Figures cut from papers (the Kaggle head_ct
    set) often sit on a grey background of 35-60 rather than black: the background, the
    image's darkest 5%, must not count as head."""
    return max(_HEAD_MIN, float(np.percentile(grey, 5)) + _ABOVE_BACKGROUND)


def bone_level(grey: np.ndarray, head: np.ndarray) -> float:
    """Grey level from which a pixel of the head is bone. In a true brain window the skull
    saturates; images re-encoded for figures often put it at 225-245 instead, so the level
    follows the head's brightest percentile, never below where acute blood lies."""
    top = float(np.percentile(grey[head], 99)) if head.any() else 255.0
    return min(_BONE, max(_BONE_FLOOR, top - _BELOW_SKULL))


def head_mask(grey: np.ndarray) -> np.ndarray | None:
    """The head in a brain-window slice: the largest tissue component with its holes filled
    (None when the slice shows no tissue). The opening detaches table arcs and letters."""
    tissue = ndi.binary_opening(grey > tissue_level(grey), iterations=2)
    labels, parts = _sizeable_parts(tissue)
    if not parts.size:
        return None
    return ndi.binary_dilation(ndi.binary_fill_holes(labels == parts[0]), iterations=2)


def _enclosed_by_bone(centre: np.ndarray, bone: np.ndarray, head: np.ndarray) -> bool:
    """Whether rays from a point meet bone before they leave the head in all but _OPEN_RAYS
    of _RAYS directions: the skull around a part of the brain, which an eye (fat, then the
    lid), a scalp muscle or the nasopharynx (air, then the face) does not have."""
    angles = np.linspace(0, 2 * np.pi, _RAYS, endpoint=False)
    steps = np.arange(1, sum(bone.shape))
    rows = np.rint(centre[0] + np.outer(np.sin(angles), steps)).astype(int)
    cols = np.rint(centre[1] + np.outer(np.cos(angles), steps)).astype(int)
    inside = (rows >= 0) & (rows < bone.shape[0]) & (cols >= 0) & (cols < bone.shape[1])
    rows, cols = rows.clip(0, bone.shape[0] - 1), cols.clip(0, bone.shape[1] - 1)
    in_head = inside & head[rows, cols]
    # where each ray first leaves the head; bone met before that point encloses it
    leaves = np.where(in_head.all(axis=1), steps.size, np.argmin(in_head, axis=1))
    met = bone[rows, cols] & inside & (np.arange(steps.size) < leaves[:, None])
    return int((~met.any(axis=1)).sum()) <= _OPEN_RAYS


def _brain_compartments(
    soft: np.ndarray, bone: np.ndarray, head: np.ndarray, extent: int
) -> np.ndarray | None:
    """The parts of the eroded soft-tissue mask that are brain. Above the skull base the
    brain is one piece; below it the temporal lobes, the frontal lobes and the posterior
    fossa lie in compartments parted by bone, beside the eyes, jaw muscles and nasopharynx,
    which are soft tissue too. Every sizeable, thick part enclosed by bone is kept; the
    largest part alone when none is (a skull opened by surgery, the face below the brain)."""
    labels, sizeable = _sizeable_parts(soft)
    if sizeable.size <= 1:  # above the skull base: one piece, nothing to decide
        return labels == sizeable[0] if sizeable.size else None
    boxes, keep = ndi.find_objects(labels), []
    for part in sizeable:
        box = boxes[part - 1]
        # the part's deepest point, not its centroid: a ring of scalp is centred on the brain
        depth = ndi.distance_transform_edt(np.pad(labels[box] == part, 1))[1:-1, 1:-1]
        if depth.max() < _DEPTH * extent:
            continue
        deepest = np.unravel_index(np.argmax(depth), depth.shape)
        if _enclosed_by_bone(np.add(deepest, [box[0].start, box[1].start]), bone, head):
            keep.append(part)
    return np.isin(labels, keep or sizeable[:1])


def brain_mask(grey: np.ndarray, head: np.ndarray) -> np.ndarray:
    """The inside of the skull: non-bone tissue within the head, eroded apart from the scalp,
    the compartments bone encloses (`_brain_compartments`), holes filled (which puts back
    saturated blood inside the brain)."""
    level = bone_level(grey, head)
    soft = ndi.binary_erosion(head & (grey < level) & (grey > 5), iterations=_ERODE)
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    brain = _brain_compartments(soft, head & (grey >= level), head, extent)
    if brain is None:
        return head
    # A bleed as bright as bone that touches the skull through a thin bright seam is no hole:
    # the closing seals seams (widened by the erosion) so the fill puts the bleed back.
    seal = _ERODE + round(_SEAL * extent)
    yy, xx = np.mgrid[-seal : seal + 1, -seal : seal + 1]
    disk = yy**2 + xx**2 <= seal**2  # round: iterated crosses leave short seams open
    brain = ndi.binary_closing(np.pad(brain, seal), structure=disk)[seal:-seal, seal:-seal]
    return ndi.binary_dilation(ndi.binary_fill_holes(brain), iterations=2) & head


def _square_box(mask: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of a square around the mask with a small margin, centred on it."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(1, int(max(bottom - top, right - left) * (1 + 2 * _MARGIN)))
    return (top + bottom) // 2 - side // 2, (left + right) // 2 - side // 2, side


def _cut(image: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """image[top:top+side, left:left+side], zero-padded where the square leaves the image."""
    out = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, image.shape[0]), min(left + side, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


def _pad_box(shape: tuple[int, ...]) -> tuple[int, int, int]:
    rows, cols = shape[:2]
    side = max(rows, cols)
    return (rows - side) // 2, (cols - side) // 2, side


def crop_box(grey: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the square that `crop_slice` cuts from this brain-window slice,
    in its pixel coordinates: what maps a heatmap of the model input back onto the slice."""
    head = head_mask(grey)
    return _pad_box(grey.shape) if head is None else _square_box(head)


def extra_planes(crop: str) -> int:
    """Planes a crop adds to the C it is given: one for ``brain+head`` (the head plane)."""
    return 1 if crop == BRAIN_AND_HEAD else 0


def crop_slice(planes: np.ndarray, crop: str) -> np.ndarray:
    """uint8 [H, W, C] (channel 0 a brain window) → uint8 [s, s, C], square.

    ``head``: everything outside the head zeroed, cropped to a square around it. ``brain``:
    the skull, scalp and face zeroed too (at the skull base every lobe's compartment is
    kept, crop version 4). ``brain+head``: [s, s, C + 1], the ``brain`` planes and
    then channel 0 as ``head`` crops it. A slice with no head in it (air, the table below
    the head) is a padded square of zeros: nothing is inside a head or a brain there. Until
    crop version 3 it kept the whole slice, and the table's arcs, the only thing left in it,
    looked like a bright rim to the networks (a blank RSNA slice scored 0.998).
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, not {crop!r}")
    if planes.ndim != 3:
        raise ValueError(f"expected [H, W, C] planes, got shape {planes.shape}")
    if crop == "none":
        return planes
    grey = planes[..., 0]
    if crop == BRAIN_AND_HEAD:
        planes = np.concatenate([planes, planes[..., :1]], axis=2)
    head = head_mask(grey)
    if head is None:
        side = _pad_box(planes.shape)[2]
        return np.zeros((side, side, planes.shape[2]), dtype=planes.dtype)
    keep = np.repeat(head[..., np.newaxis], planes.shape[2], axis=2)
    if crop != "head":
        keep[..., : planes.shape[2] - extra_planes(crop)] &= brain_mask(grey, head)[..., None]
    top, left, side = _square_box(head)
    return _cut(planes * keep, top, left, side)


def brain_region(grey: np.ndarray) -> np.ndarray:
    """The brain of a ``brain``-cropped slice (its non-zero parts, holes filled): where the
    density features look. At the skull base that is every lobe's compartment the crop kept,
    not crumbs. Empty for a blank slice."""
    labels, parts = _sizeable_parts(grey > 0)
    return ndi.binary_fill_holes(np.isin(labels, parts))


def centre_zoom(
    grey: np.ndarray, share: float = CENTRE_SHARE, brain: np.ndarray | None = None
) -> np.ndarray:
    """The middle of a ``brain``-cropped slice magnified: a square of ``share`` times the
    brain's larger extent around the centre of its bounding box (basal ganglia, thalami,
    ventricles on a mid-level slice), resized bilinearly back to the slice's size. A small
    deep bleed covers a few cells of a network's 16×16 map in the brain crop, where the brain
    fills about half the square; here it covers (1/share)² times more. Blank stays blank.

    Mirror-equivariant (the box is centred on the bounding box's continuous centre), so the
    mirror view of the zoom is the zoom of the mirror view, as flip TTA assumes. ``brain``:
    the slice's :func:`brain_region` when the caller has it already."""
    brain = brain_region(grey) if brain is None else brain
    if not brain.any():
        return np.zeros_like(grey)
    rows, cols = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    extent = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    half = max(share * extent / 2, _CENTRE_MIN_HALF)
    zoom = Image.fromarray(np.ascontiguousarray(grey)).transform(
        grey.shape[::-1],
        Image.Transform.EXTENT,
        (cx - half, cy - half, cx + half, cy + half),
        Image.Resampling.BILINEAR,
    )
    return np.asarray(zoom)
