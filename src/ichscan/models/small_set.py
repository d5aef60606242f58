"""The small-set ensemble: what `ichscan train` builds by default for a small binary set of
brain-window slices (see ichscan.train.small_set for the training and the reasons).

Its members read one brain-cropped slice (uint8, 320 px, the brain only, skull and scalp
zeroed), beside it the same square cropped to the whole head (channel 1, ``brain+head``
in ichscan.preprocess.head_crop; left out with ``--no-head-reader``), and the middle of the
brain crop magnified, which the model derives from channel 0 itself (``centre_zoom``, in
NumPy beside the density features):

- **readers**, each a frozen ImageNet network on one of the crops: EfficientNet-Lite0, Lite1
  and Lite2 on the brain, Lite0 again on the head and on the centre zoom. Each gives
  feature maps at two scales, at 256 px (the last stride-16 block: 112 or 120 ch at 16×16;
  the last 8×8 block before the last one, with the conv head: 1472 or 1488 ch at 8×8).
  Several readers, because their errors differ: together they rank the real slices better
  than any one alone. The head crop alone is the weakest of them, but it sees what the brain
  crop cut away with the skull (a bleed against the inner table, as bright as bone in a
  brain window): on the real sets it raised the RSNA AUC on every split measured (README).
  The centre zoom shows a small deep bleed (basal ganglia, thalamus) over (1/0.6)² times
  more cells of the maps than the brain crop, where the brain fills about half the square;
- per reader, a **MIL head**: per-scale 1×1 convolutions to a 16×16 map of hemorrhage
  logits, pooled by log-sum-exp (a bleed is a small region: the pooling lets a few locations
  decide), with one learned bias per training source (each dataset has its own base rate
  and look);
- per reader, a **pooled logistic regression** on the average- and max-pooled maps;
- one **density forest** on the brain crop: a random forest on 29 hand-made density features
  (ichscan.models.density), stored as tensors (ichscan.models.forest);
- one **blob forest** (since session 12): a random forest that scores each bright blob of
  the brain crop on its own (ichscan.models.blobs: size, brightness, saturation,
  surroundings, shape, depth, symmetry), trained as multiple-instance learning; a slice's
  logit is its most blood-like blob's. It tells a small bleed from calcified choroid plexus
  or the skull's bright rim, which the density forest's whole-slice numbers cannot;
- the **pixel reader** (since session 19, ichscan.models.pixel_reader): a small network
  trained from scratch on the brain crop's grey, taught by synthetic bleeds, its own hard
  negatives and the real positives as multiple-instance bags. It is the one member that
  sees a small plain hyperdense oval as blood.

``embed`` returns the members' logits per slice (the MIL heads, then the regressions, then
the density forest, then the blob forest, then the pixel reader) and ``head`` is their fixed
weighted sum, each first bounded to ±``VOTE_BOUND`` (since session 13: one member's
confident mistake can no longer outvote the rest), so the ensemble plugs into the same
predictor as a fine-tuned network (flip TTA included).
``hemorrhage_map`` is the mean logit map of the MIL heads that see the whole square: where
the model thinks the bleed is; ``blood_map`` weighs it with the pixel reader's cells, as
they vote (what ``explain`` shows).

Bundles from before readers had crops list backbones only, all on the brain, and still load
and predict as they did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ichscan.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from ichscan.models.blobs import MAX_BLOBS, N_BLOB_FEATURES, blob_present, blob_table
from ichscan.models.density import N_FEATURES, density_features
from ichscan.models.forest import ForestModule
from ichscan.models.pixel_reader import PixelNet, brain_cells, halved, pixel_logit
from ichscan.preprocess.head_crop import BRAIN_AND_HEAD, CENTRE_SHARE, brain_region, centre_zoom

RECIPE = "small-set"
CROP_SIZE = 320  # the cached, cropped slice
NET_SIZE = 256  # what the backbones read
HEAD_CHANNELS = 1280  # every Lite variant's conv head


@dataclass(frozen=True)
class MapSource:
    """Where one frozen Lite variant's two maps are read: its last block at stride 16, and
    its last 8×8 block before the 320-channel one (concatenated with the conv head)."""

    backbone: str
    fine_block: int
    deep_block: int
    fine_channels: int
    deep_channels: int  # the deep block's channels + HEAD_CHANNELS

    @property
    def pooled_features(self) -> int:
        return 2 * (self.fine_channels + self.deep_channels)

    @property
    def map_values(self) -> int:
        """Values in one view's two maps: the fine one at stride 16, the deep one at 32."""
        return (
            self.fine_channels * (NET_SIZE // 16) ** 2 + self.deep_channels * (NET_SIZE // 32) ** 2
        )


MAP_SOURCES = {
    m.backbone: m
    for m in (
        MapSource("efficientnet_lite0", 10, 14, 112, 192 + HEAD_CHANNELS),
        MapSource("efficientnet_lite1", 14, 19, 112, 192 + HEAD_CHANNELS),
        MapSource("efficientnet_lite2", 14, 19, 120, 208 + HEAD_CHANNELS),
    )
}
# The planes each crop's readers take: the input's first two (uint8 [N, 3, H, W]: the brain in
# every channel, or from a ``brain+head`` crop brain, head, brain again, see
# ichscan.infer.inputs), then the centre zoom, which the model derives from the brain plane
# (ichscan.preprocess.head_crop.centre_zoom) when one of its readers takes it.
CROP_PLANES = {"brain": 0, "head": 1, "centre": 2}


@dataclass(frozen=True)
class Reader:
    """One frozen network reading one crop of the slice."""

    backbone: str
    crop: str = "brain"

    @property
    def name(self) -> str:
        short = self.backbone.removeprefix("efficientnet_")
        return short if self.crop == "brain" else f"{short} ({self.crop} crop)"


# What a new model uses. Bundles record theirs: older ones (Lite0 alone, Lite0 + Lite1) still
# load.
READERS = (Reader("efficientnet_lite0"), Reader("efficientnet_lite1"), Reader("efficientnet_lite2"))
# The default since session 10: with crop version 4 it raised the RSNA AUC on all six splits
# measured and kept head_ct's ranking (research/recipe_lab/SESSION10.md). --no-head-reader
# leaves it out (a cache prepared with --crop brain trains without it).
HEAD_READER = Reader("efficientnet_lite0", "head")
# The default since session 11: Lite0 on the middle of the brain magnified, where small deep
# bleeds are a few cells of the brain crop's maps (research/recipe_lab/SESSION11.md).
CENTRE_READER = Reader("efficientnet_lite0", "centre")
BACKBONES = tuple(dict.fromkeys(r.backbone for r in READERS))  # each network once


def reads_centre(readers: Sequence[Reader]) -> bool:
    """Whether one of ``readers`` takes the centre zoom (which the brain plane gives)."""
    return any(r.crop == CENTRE_READER.crop for r in readers)


def readers_for(crop: str) -> tuple[Reader, ...]:
    """The readers trained on a cache cut with ``crop``: the brain networks, the head one
    for a ``brain+head`` cache, then the centre one."""
    return (*READERS, *((HEAD_READER,) if crop == BRAIN_AND_HEAD else ()), CENTRE_READER)


# Logit weights of the MIL heads, the pooled regressions and the forest: each kind's share
# is split evenly between the backbones.
MIL_WEIGHT, POOLED_WEIGHT, FOREST_WEIGHT = 0.5, 0.25, 0.25
# The blob forest is added at the density forest's weight, not carved out of the others'
# (research/recipe_lab/SESSION12.md: it raised both real sets that way).
BLOB_WEIGHT = 0.25
# The pixel reader is added on top too (research/recipe_lab/SESSION19.md: 0.5 was chosen on
# lab splits 0 and 5-8 and scored on fresh ones before it shipped).
PIXEL_WEIGHT = 0.5
# Every member's logit is bounded to ±VOTE_BOUND before the sum: a pooled regression on a
# near-constant feature can reach logits in the tens, and the forests ±9.2, so one member's
# confident mistake could outvote the rest (research/recipe_lab/SESSION13.md: ±6 was chosen
# on five splits of each real set, then scored on fresh ones before it shipped).
VOTE_BOUND = 6.0
_CLIP = 1e-4


def member_weights(
    readers: int, blob_forest: bool = False, pixel_reader: bool = False
) -> list[float]:
    """Logit weight of each member, in ``embed``'s order (MIL heads, regressions, density
    forest, then the blob forest and the pixel reader when the model has them)."""
    return (
        [MIL_WEIGHT / readers] * readers
        + [POOLED_WEIGHT / readers] * readers
        + [FOREST_WEIGHT]
        + ([BLOB_WEIGHT] if blob_forest else [])
        + ([PIXEL_WEIGHT] if pixel_reader else [])
    )


class LiteMaps(nn.Module):
    """A frozen Lite variant → (fine [N, C, 16, 16], deep [N, C', 8, 8]) feature maps."""

    def __init__(self, backbone: str = BACKBONES[0], pretrained: str = "imagenet") -> None:
        super().__init__()
        self.source = MAP_SOURCES[backbone]
        self.net, _, self.provenance = build_backbone(backbone, pretrained)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> LiteMaps:
        super().train(mode)
        self.net.eval()  # frozen: ImageNet batch-norm statistics always
        return self

    @torch.no_grad()
    def forward(
        self, grey: torch.Tensor, resize: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """grey: float [N, 1, H, W] in [0, 1] (any H, W; resized to 256, by ``resize`` when
        given: the ONNX export's fixed-size :class:`ResizeMatrix`)."""
        if resize is None:
            x = F.interpolate(grey, size=(NET_SIZE, NET_SIZE), mode="bilinear", antialias=True)
        else:
            x = resize(grey)
        x = ((x.expand(-1, 3, -1, -1) - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last
        )
        m = self.net
        x = m._swish(m._bn0(m._conv_stem(x)))
        fine = deep = x
        for i, block in enumerate(m._blocks):
            x = block(x)
            if i == self.source.fine_block:
                fine = x
            elif i == self.source.deep_block:
                deep = x
        head = m._swish(m._bn1(m._conv_head(x)))
        return fine.float(), torch.cat([deep, head], dim=1).float()


Maps = tuple[torch.Tensor, torch.Tensor]  # (fine, deep) of one backbone

# Images per backbone pass on a CPU. The three Lite networks read 4 images at a time 2.4-2.8x
# faster than 32 (2-core CPU, 320 px in, measured session 6): a few images' activations
# stay in the CPU cache. A GPU takes the batch whole.
CPU_CHUNK = 4


def chunked_maps(extractor: LiteMaps, grey: torch.Tensor, resize: nn.Module | None = None) -> Maps:
    """``extractor(grey, resize)``, run CPU_CHUNK images at a time on a CPU (not while a
    graph is being traced for export, where the batch axis must stay symbolic)."""
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if tracing or grey.device.type != "cpu" or grey.shape[0] <= CPU_CHUNK:
        return extractor(grey, resize)
    parts = [extractor(part, resize) for part in grey.split(CPU_CHUNK)]
    return torch.cat([f for f, _ in parts]), torch.cat([d for _, d in parts])


class ResizeMatrix(nn.Module):
    """LiteMaps' antialiased bilinear resize from one fixed size, as the matrices it is
    (``R @ image @ R.T``): the same numbers, in operators every ONNX runtime has."""

    def __init__(self, size: int) -> None:
        super().__init__()
        basis = torch.eye(size).view(size, 1, size, 1).expand(size, 1, size, 2)
        rows = F.interpolate(basis, size=(NET_SIZE, 2), mode="bilinear", antialias=True)
        self.register_buffer("matrix", rows[:, 0, :, 0].T.contiguous())  # [NET_SIZE, size]

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.matrix @ grey @ self.matrix.T


class MILHead(nn.Module):
    """Two-scale 1×1 convolutions → 16×16 logit map → log-sum-exp pooling (+ source bias)."""

    def __init__(
        self,
        maps: MapSource,
        sources: int = 1,
        hidden: int = 64,
        dropout: float = 0.3,
        r: float = 5.0,
    ) -> None:
        super().__init__()
        self.fine = nn.Sequential(
            nn.BatchNorm2d(maps.fine_channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(maps.fine_channels, hidden, 1),
        )
        self.deep = nn.Sequential(
            nn.BatchNorm2d(maps.deep_channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(maps.deep_channels, hidden, 1),
        )
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(hidden, 1, 1))
        self.source_bias = nn.Parameter(torch.zeros(sources))
        self.r = r

    def logit_map(self, fine: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """[N, 16, 16] per-location logits (before pooling and the source bias)."""
        deep_up = F.interpolate(self.deep(deep), scale_factor=2, mode="nearest")
        return self.out(self.fine(fine) + deep_up)[:, 0]

    def forward(self, fine: torch.Tensor, deep: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        s = self.logit_map(fine, deep).flatten(1)
        pooled = torch.logsumexp(self.r * s, dim=1) / self.r - np.log(s.shape[1]) / self.r
        return pooled + self.source_bias[source]


class MILEnsemble(nn.Module):
    """MIL heads trained from different seeds, averaged in logit space: the head is the
    ensemble's noisiest member on a few hundred slices."""

    def __init__(self, maps: MapSource, sources: int = 1, heads: int = 1) -> None:
        super().__init__()
        self.heads = nn.ModuleList(MILHead(maps, sources) for _ in range(heads))

    @property
    def sources(self) -> int:
        return int(self.heads[0].source_bias.numel())

    def logit_map(self, fine: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        return torch.stack([h.logit_map(fine, deep) for h in self.heads]).mean(0)

    def forward(self, fine: torch.Tensor, deep: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(fine, deep, source) for h in self.heads]).mean(0)


def pooled_features(fine: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """[N, 2·(C + C')]: average and max of every channel of both maps."""
    return torch.cat(
        [fine.mean((2, 3)), fine.amax((2, 3)), deep.mean((2, 3)), deep.amax((2, 3))], dim=1
    )


class PooledLogistic(nn.Module):
    """A standardised logistic regression (fitted by sklearn), as buffers."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.register_buffer("coef", torch.zeros(features))
        self.register_buffer("intercept", torch.zeros(()))

    @classmethod
    def from_sklearn(cls, scaler: Any, logistic: Any) -> PooledLogistic:
        m = cls(len(scaler.mean_))
        m.mean.copy_(torch.as_tensor(scaler.mean_, dtype=torch.float32))
        m.scale.copy_(torch.as_tensor(scaler.scale_, dtype=torch.float32))
        m.coef.copy_(torch.as_tensor(logistic.coef_[0], dtype=torch.float32))
        m.intercept.copy_(torch.as_tensor(float(logistic.intercept_[0])))
        return m

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.scale) @ self.coef + self.intercept


def clipped_logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(_CLIP, 1 - _CLIP))


def blob_logit(forest: ForestModule, blobs: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """float [N, MAX_BLOBS, F] blob tables → [N]: the clipped logit of each slice's most
    blood-like blob (probability 0, clipped, for a slice without blobs)."""
    flat = blobs.reshape(-1, blobs.shape[-1])
    p = forest(flat, steps).reshape(-1, blobs.shape[1]).float()
    p = torch.where(blob_present(blobs), p, torch.zeros_like(p))
    return clipped_logit(p.amax(dim=1))


def member_logits(
    mil: Sequence[MILEnsemble],
    logistic: Sequence[PooledLogistic],
    forest: ForestModule,
    maps: Sequence[Maps],
    density: torch.Tensor,
    source: torch.Tensor,
    forest_steps: int | None = None,
    blob_forest: ForestModule | None = None,
    blobs: torch.Tensor | None = None,
    blob_steps: int | None = None,
    pixel_reader: PixelNet | None = None,
    brain: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, 2·R + 1 (+ 1) (+ 1)] logits of the R MIL heads, the R pooled regressions (one of
    each per reader, ``maps`` in the same order), the density forest and, when given, the
    blob forest on ``blobs`` and the pixel reader on ``brain`` (float [N, H, W] in [0, 1]):
    what training scores and what SmallSetModel.embed returns."""
    members = (
        [m(fine, deep, source) for m, (fine, deep) in zip(mil, maps, strict=True)]
        + [lr(pooled_features(*m)) for lr, m in zip(logistic, maps, strict=True)]
        + [clipped_logit(forest(density, forest_steps).float())]
    )
    if blob_forest is not None:
        if blobs is None:
            raise ValueError("this model has a blob forest: give it the blob tables")
        members.append(blob_logit(blob_forest, blobs, blob_steps))
    if pixel_reader is not None:
        if brain is None:
            raise ValueError("this model has a pixel reader: give it the brain plane")
        members.append(pixel_logit(pixel_reader, brain))
    return torch.stack(members, dim=1)


class BoundedVotes(nn.Linear):
    """The fixed weighted sum of the member logits, each first clipped to ±``bound`` (None:
    unbounded, as bundles from before session 13 were trained). A Linear underneath, so the
    state dict keeps the ``head.weight``/``head.bias`` of older bundles."""

    def __init__(self, members: int, weights: Sequence[float], bound: float | None) -> None:
        # A bound of 0 would make every slice 0.5 and a negative one every slice the same;
        # bundle.json is hand-editable, so its value is checked here, where it is used.
        if bound is not None and (
            isinstance(bound, bool)
            or not isinstance(bound, (int, float))
            or not 0 < bound < float("inf")
        ):
            raise ValueError(f"vote_bound must be a positive number of logits, not {bound!r}")
        super().__init__(members, 1)
        self.bound = None if bound is None else float(bound)
        with torch.no_grad():
            self.weight.copy_(torch.tensor([list(weights)]))
            self.bias.zero_()
        self.requires_grad_(False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bound is not None:
            logits = logits.clamp(-self.bound, self.bound)
        return super().forward(logits)


class SideInputs(NamedTuple):
    """What SmallSetModel computes in NumPy from the brain plane (outside an ONNX graph,
    which takes them as inputs): density features [N, 29]; the centre zoom, uint8
    [N, 1, H, W], when a reader takes it; the blob tables [N, MAX_BLOBS, F] when the model
    has a blob forest."""

    density: torch.Tensor
    centre: torch.Tensor | None = None
    blobs: torch.Tensor | None = None


class SmallSetModel(nn.Module):
    """The ensemble, predicting source ``source`` (the dataset the bundle was trained for)."""

    def __init__(
        self,
        sources: int = 1,
        source: int = 0,
        forest_shape: tuple[int, int] = (1, 1),
        pretrained: str = "none",
        mil_heads: int = 1,
        readers: Sequence[Reader] = READERS,
        maps: Sequence[LiteMaps] | None = None,
        centre_share: float = CENTRE_SHARE,
        blob_forest_shape: tuple[int, int] | None = None,
        vote_bound: float | None = None,
        pixel_reader: bool = False,
    ) -> None:
        """``maps``: one extractor per backbone of ``readers``, in order of first use, already
        built (training has them); else built here. ``centre_share``: the centre zoom's
        side as a share of the brain's extent (what the centre reader was trained on).
        ``blob_forest_shape``: None for a model without a blob forest (bundles from before
        session 12). ``vote_bound``: the bound on each member's logit before the sum (None
        for bundles from before session 13; training gives VOTE_BOUND). ``pixel_reader``:
        False for bundles from before session 19."""
        super().__init__()
        self.readers = tuple(readers)
        self.centre_share = float(centre_share)
        self.backbones = tuple(dict.fromkeys(r.backbone for r in self.readers))
        if maps is not None and tuple(m.source.backbone for m in maps) != self.backbones:
            raise ValueError(f"give one extractor per backbone, for {self.backbones}")
        # A network reading both crops is held once: its weights are the same frozen ones.
        self.maps = nn.ModuleList(maps or (LiteMaps(b, pretrained) for b in self.backbones))
        self._extractor = [self.backbones.index(r.backbone) for r in self.readers]
        specs = [MAP_SOURCES[r.backbone] for r in self.readers]
        self.mil = nn.ModuleList(MILEnsemble(m, sources, mil_heads) for m in specs)
        self.logistic = nn.ModuleList(PooledLogistic(m.pooled_features) for m in specs)
        self.forest = ForestModule(*forest_shape)
        self.blob_forest = None if blob_forest_shape is None else ForestModule(*blob_forest_shape)
        self.pixel_reader = PixelNet() if pixel_reader else None
        self.source = source
        weights = member_weights(len(self.readers), self.has_blob_forest, self.has_pixel_reader)
        self.embed_dim = len(weights)
        self.head = BoundedVotes(self.embed_dim, weights, vote_bound)
        self._register_load_state_dict_pre_hook(_one_backbone_layout)

    @property
    def architecture(self) -> str:
        return "+".join(
            r.backbone if r.crop == "brain" else f"{r.backbone}@{r.crop}" for r in self.readers
        )

    @property
    def provenance(self) -> str:
        return "; ".join(
            f"{b}: {m.provenance}" for b, m in zip(self.backbones, self.maps, strict=True)
        )

    @staticmethod
    def grey(x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] → float [N, 2, H, W] in [0, 1]: the input planes the readers
        take (CROP_PLANES; a bundle from before the head reader has the brain in every
        channel and reads only the first)."""
        return x[:, :2].float() / 255.0 if x.dtype == torch.uint8 else x[:, :2].float()

    @property
    def needs_centre(self) -> bool:
        return reads_centre(self.readers)

    @property
    def has_blob_forest(self) -> bool:
        return self.blob_forest is not None

    @property
    def has_pixel_reader(self) -> bool:
        return self.pixel_reader is not None

    def side_inputs(self, x: torch.Tensor) -> SideInputs:
        """What the model computes in NumPy from the brain plane of ``x`` (SideInputs)."""
        brain = x[:, 0] if x.dtype == torch.uint8 else (x[:, 0] * 255).round().byte()
        arrays = side_arrays(
            brain.cpu().numpy(),
            self.centre_share if self.needs_centre else None,
            self.has_blob_forest,
        )
        return SideInputs(*(a if a is None else torch.from_numpy(a).to(x.device) for a in arrays))

    def planes(self, x: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        """float [N, P, H, W] in [0, 1], indexed by CROP_PLANES: the input's planes, then the
        centre zoom when the model reads it."""
        grey = self.grey(x)
        if centre is None:
            if self.needs_centre:
                raise ValueError("this model reads the centre zoom: give it (side_inputs)")
            return grey
        return torch.cat([grey, centre.float() / 255.0], dim=1)

    def feature_maps(self, planes: torch.Tensor, resize: nn.Module | None = None) -> list[Maps]:
        """Per reader, its network's maps of its crop's plane of ``planes`` [N, P, H, W]."""
        return [
            chunked_maps(self.maps[i], planes[:, CROP_PLANES[r.crop]][:, None], resize)
            for r, i in zip(self.readers, self._extractor, strict=True)
        ]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_with(x, self.side_inputs(x))

    def embed_with(
        self,
        x: torch.Tensor,
        side: SideInputs,
        resize: nn.Module | None = None,
        forest_steps: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``embed`` from the input and what ``side_inputs`` computes (elsewhere, in NumPy,
        outside an ONNX graph); ``resize`` and ``forest_steps`` (the density and the blob
        forest's depths) make it exportable."""
        source = torch.full_like(side.density[:, 0], self.source, dtype=torch.long)
        planes = self.planes(x, side.centre)
        maps = self.feature_maps(planes, resize)
        steps = forest_steps or (None, None)
        return member_logits(
            self.mil,
            self.logistic,
            self.forest,
            maps,
            side.density,
            source,
            steps[0],
            self.blob_forest,
            side.blobs,
            steps[1],
            self.pixel_reader,
            planes[:, CROP_PLANES["brain"]],
        )

    def forest_depths(self) -> tuple[int, int]:
        """(density forest, blob forest) depths: the fixed walks an exported graph takes."""
        return self.forest.depth(), self.blob_forest.depth() if self.blob_forest else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    @torch.no_grad()
    def hemorrhage_map(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 16, 16] MIL logits per location of the 320 px crop: the mean over the readers
        that see the whole square (the centre reader's map covers its middle only)."""
        grey = self.grey(x)
        return torch.stack(
            [
                mil.logit_map(*chunked_maps(self.maps[i], grey[:, CROP_PLANES[r.crop]][:, None]))
                for mil, r, i in zip(self.mil, self.readers, self._extractor, strict=True)
                if r.crop != CENTRE_READER.crop
            ]
        ).mean(0)

    @torch.no_grad()
    def blood_map(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, H, W] at the input's size: the blood probability per location of the
        members that have a map, weighted as they vote: the MIL heads' (``hemorrhage_map``)
        and the pixel reader's per 8 px cell of the brain crop, 0 outside the brain cells it
        pools over. The pixel reader is there because the MIL maps miss what it was added
        for (small plain haematomas); the regressions and forests have no spatial map."""
        size = tuple(x.shape[-2:])
        mil = torch.sigmoid(self.hemorrhage_map(x))[:, None]
        mil = F.interpolate(mil, size=size, mode="bilinear")[:, 0]
        if self.pixel_reader is None:
            return mil
        brain = self.grey(x)[:, CROP_PLANES["brain"]]
        cells = torch.sigmoid(self.pixel_reader(halved(brain))) * brain_cells(brain)
        pixel = F.interpolate(cells[:, None], size=size, mode="bilinear")[:, 0]
        return (MIL_WEIGHT * mil + PIXEL_WEIGHT * pixel) / (MIL_WEIGHT + PIXEL_WEIGHT)


def side_arrays(
    brain: np.ndarray, centre_share: float | None, blobs: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """uint8 [N, H, W] brain planes → what a SmallSetModel computes in NumPy beside its
    networks (SideInputs, as arrays): the density features float32 [N, 29]; the centre
    zooms uint8 [N, 1, H, W] when ``centre_share`` is given; the blob tables float32
    [N, MAX_BLOBS, F] when ``blobs``. Each slice's brain region, which all three start
    from, is found once. The model, the ONNX predictor and training all call this."""
    density = np.zeros((len(brain), N_FEATURES), dtype=np.float32)
    centre = None if centre_share is None else np.zeros_like(brain)[:, None]
    tables = np.zeros((len(brain), MAX_BLOBS, N_BLOB_FEATURES), np.float32) if blobs else None
    for i, grey in enumerate(brain):
        region = brain_region(grey)
        density[i] = density_features(grey, region)
        if centre is not None:
            centre[i, 0] = centre_zoom(grey, centre_share, region)  # type: ignore[arg-type]
        if tables is not None:
            tables[i] = blob_table(grey, region)
    return density, centre, tables


def _one_backbone_layout(state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Bundles from before the second backbone hold one module where there is now a list
    (``maps.net.*`` for ``maps.0.net.*``): renamed on load, so they still predict."""
    for key in list(state):
        for part in ("maps.", "mil.", "logistic."):
            name = prefix + part
            if key.startswith(name) and not key[len(name)].isdigit():
                state[name + "0." + key[len(name) :]] = state.pop(key)


def small_set_config(model: SmallSetModel) -> dict[str, Any]:
    """What bundle.json must hold to rebuild the module before loading its weights."""
    return {
        "backbones": list(model.backbones),
        "readers": [{"backbone": r.backbone, "crop": r.crop} for r in model.readers],
        "sources": model.mil[0].sources,
        "mil_heads": len(model.mil[0].heads),
        "source": int(model.source),
        "forest_shape": list(model.forest.left.shape),
        "member_weights": member_weights(
            len(model.readers), model.has_blob_forest, model.has_pixel_reader
        ),
        **({"vote_bound": model.head.bound} if model.head.bound is not None else {}),
        "density_features": N_FEATURES,
        "pooled_features": [lr.coef.numel() for lr in model.logistic],
        **({"centre_share": model.centre_share} if model.needs_centre else {}),
        **(
            {
                "blob_forest_shape": list(model.blob_forest.left.shape),
                "blob_features": N_BLOB_FEATURES,
                "max_blobs": MAX_BLOBS,
            }
            if model.has_blob_forest
            else {}
        ),
        **({"pixel_reader": True} if model.has_pixel_reader else {}),
    }


def build_small_set(config: dict[str, Any]) -> SmallSetModel:
    spec = config["small_set"]
    blob_shape = spec.get("blob_forest_shape")
    if blob_shape is not None and (
        spec.get("blob_features") != N_BLOB_FEATURES or spec.get("max_blobs") != MAX_BLOBS
    ):
        raise ValueError(
            f"the bundle's blob forest reads {spec.get('max_blobs')} blobs of "
            f"{spec.get('blob_features')} features; this ichscan makes {MAX_BLOBS} of "
            f"{N_BLOB_FEATURES}: predict with the ichscan version that trained it"
        )
    return SmallSetModel(
        sources=int(spec["sources"]),
        source=int(spec["source"]),
        forest_shape=tuple(spec["forest_shape"]),  # type: ignore[arg-type]
        mil_heads=int(spec.get("mil_heads", 1)),
        readers=bundle_readers(spec),
        centre_share=float(spec.get("centre_share", CENTRE_SHARE)),
        blob_forest_shape=None if blob_shape is None else (int(blob_shape[0]), int(blob_shape[1])),
        vote_bound=spec.get("vote_bound"),
        pixel_reader=bool(spec.get("pixel_reader", False)),
    )


def bundle_readers(spec: dict[str, Any]) -> list[Reader]:
    """The readers a bundle's ``small_set`` section names. Bundles from before the head reader
    list backbones only, all reading the brain; from before the second backbone, none: they
    were Lite0 alone."""
    if "readers" in spec:
        return [Reader(str(r["backbone"]), str(r["crop"])) for r in spec["readers"]]
    return [Reader(str(b)) for b in spec.get("backbones", ["efficientnet_lite0"])]
