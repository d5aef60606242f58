"""The small-set ensemble: what `ichscan train` builds by default for a small binary set of
brain-window slices (see ichscan.train.small_set for the training and the reasons).

Three members read one brain-cropped slice (uint8, 320 px, the brain only):

- a frozen ImageNet EfficientNet-Lite0 at 256 px gives feature maps at two scales (block 10:
  112 ch at 16×16; block 14 + the conv head: 1472 ch at 8×8);
- **MIL head**: per-scale 1×1 convolutions to a 16×16 map of hemorrhage logits, pooled by
  log-sum-exp (a bleed is a small region: the pooling lets a few locations decide), with one
  learned bias per training source (each dataset has its own base rate and look);
- **pooled logistic regression** on the average- and max-pooled maps (3168 features);
- **density forest**: a random forest on 29 hand-made density features
  (ichscan.models.density), stored as tensors (ichscan.models.forest).

``embed`` returns the three members' logits per slice and ``head`` is their fixed weighted
sum, so the ensemble plugs into the same predictor as a fine-tuned network (flip TTA
included). ``hemorrhage_map`` is the MIL head's logit map: where the model thinks the bleed is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ichscan.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from ichscan.models.density import N_FEATURES, density_features
from ichscan.models.forest import ForestModule

RECIPE = "small-set"
BACKBONE = "efficientnet_lite0"
CROP_SIZE = 320  # the cached, cropped slice
NET_SIZE = 256  # what the backbone reads
MAP_BLOCK, DEEP_BLOCK = 10, 14
FINE_CHANNELS, DEEP_CHANNELS = 112, 192 + 1280
POOLED_FEATURES = 2 * (FINE_CHANNELS + DEEP_CHANNELS)
MEMBER_WEIGHTS = (0.5, 0.25, 0.25)  # MIL, pooled LR, density forest (logit weights)
_CLIP = 1e-4


class LiteMaps(nn.Module):
    """Frozen EfficientNet-Lite0 → (fine [N,112,16,16], deep [N,1472,8,8]) feature maps."""

    def __init__(self, pretrained: str = "imagenet") -> None:
        super().__init__()
        self.net, _, self.provenance = build_backbone(BACKBONE, pretrained)
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
    def forward(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grey: float [N, 1, H, W] in [0, 1] (any H, W; resized to 256)."""
        x = F.interpolate(grey, size=(NET_SIZE, NET_SIZE), mode="bilinear", antialias=True)
        x = ((x.expand(-1, 3, -1, -1) - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last
        )
        m = self.net
        x = m._swish(m._bn0(m._conv_stem(x)))
        fine = deep = x
        for i, block in enumerate(m._blocks):
            x = block(x)
            if i == MAP_BLOCK:
                fine = x
            elif i == DEEP_BLOCK:
                deep = x
        head = m._swish(m._bn1(m._conv_head(x)))
        return fine.float(), torch.cat([deep, head], dim=1).float()


class MILHead(nn.Module):
    """Two-scale 1×1 convolutions → 16×16 logit map → log-sum-exp pooling (+ source bias)."""

    def __init__(self, sources: int = 1, hidden: int = 64, dropout: float = 0.3, r: float = 5.0):
        super().__init__()
        self.fine = nn.Sequential(
            nn.BatchNorm2d(FINE_CHANNELS),
            nn.Dropout2d(dropout),
            nn.Conv2d(FINE_CHANNELS, hidden, 1),
        )
        self.deep = nn.Sequential(
            nn.BatchNorm2d(DEEP_CHANNELS),
            nn.Dropout2d(dropout),
            nn.Conv2d(DEEP_CHANNELS, hidden, 1),
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

    def __init__(self, sources: int = 1, heads: int = 1) -> None:
        super().__init__()
        self.heads = nn.ModuleList(MILHead(sources) for _ in range(heads))

    @property
    def sources(self) -> int:
        return int(self.heads[0].source_bias.numel())

    def logit_map(self, fine: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        return torch.stack([h.logit_map(fine, deep) for h in self.heads]).mean(0)

    def forward(self, fine: torch.Tensor, deep: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(fine, deep, source) for h in self.heads]).mean(0)


def pooled_features(fine: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """[N, 3168]: average and max of every channel of both maps."""
    return torch.cat(
        [fine.mean((2, 3)), fine.amax((2, 3)), deep.mean((2, 3)), deep.amax((2, 3))], dim=1
    )


class PooledLogistic(nn.Module):
    """A standardised logistic regression (fitted by sklearn), as buffers."""

    def __init__(self, features: int = POOLED_FEATURES) -> None:
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


def member_logits(
    mil: MILEnsemble,
    logistic: PooledLogistic,
    forest: ForestModule,
    fine: torch.Tensor,
    deep: torch.Tensor,
    density: torch.Tensor,
    source: torch.Tensor,
) -> torch.Tensor:
    """[N, 3] logits of the MIL head, the pooled LR and the density forest: what training
    scores and what SmallSetModel.embed returns."""
    return torch.stack(
        [
            mil(fine, deep, source),
            logistic(pooled_features(fine, deep)),
            clipped_logit(forest(density).float()),
        ],
        dim=1,
    )


class SmallSetModel(nn.Module):
    """The ensemble, predicting source ``source`` (the dataset the bundle was trained for)."""

    architecture = BACKBONE

    def __init__(
        self,
        sources: int = 1,
        source: int = 0,
        forest_shape: tuple[int, int] = (1, 1),
        pretrained: str = "none",
        mil_heads: int = 1,
    ) -> None:
        super().__init__()
        self.maps = LiteMaps(pretrained)
        self.mil = MILEnsemble(sources, mil_heads)
        self.logistic = PooledLogistic()
        self.forest = ForestModule(*forest_shape)
        self.source = source
        self.embed_dim = len(MEMBER_WEIGHTS)
        self.head = nn.Linear(self.embed_dim, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([MEMBER_WEIGHTS]))
            self.head.bias.zero_()
        self.head.requires_grad_(False)

    @property
    def provenance(self) -> str:
        return self.maps.provenance

    @staticmethod
    def grey(x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] (channels all the brain window) → float [N, 1, H, W] in [0, 1]."""
        return x[:, :1].float() / 255.0 if x.dtype == torch.uint8 else x[:, :1].float()

    def member_logits(
        self, fine: torch.Tensor, deep: torch.Tensor, density: torch.Tensor, source: torch.Tensor
    ) -> torch.Tensor:
        return member_logits(self.mil, self.logistic, self.forest, fine, deep, density, source)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        grey = self.grey(x)
        fine, deep = self.maps(grey)
        density = torch.from_numpy(
            np.stack([density_features(g) for g in (grey[:, 0] * 255).round().byte().cpu().numpy()])
        ).to(x.device)
        source = torch.full((len(x),), self.source, dtype=torch.long, device=x.device)
        return self.member_logits(fine, deep, density, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    @torch.no_grad()
    def hemorrhage_map(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 16, 16] MIL logits per location of the 320 px crop."""
        fine, deep = self.maps(self.grey(x))
        return self.mil.logit_map(fine, deep)


def small_set_config(model: SmallSetModel) -> dict[str, Any]:
    """What bundle.json must hold to rebuild the module before loading its weights."""
    return {
        "sources": model.mil.sources,
        "mil_heads": len(model.mil.heads),
        "source": int(model.source),
        "forest_shape": list(model.forest.left.shape),
        "member_weights": list(MEMBER_WEIGHTS),
        "density_features": N_FEATURES,
        "pooled_features": POOLED_FEATURES,
    }


def build_small_set(config: dict[str, Any]) -> SmallSetModel:
    spec = config["small_set"]
    return SmallSetModel(
        sources=int(spec["sources"]),
        source=int(spec["source"]),
        forest_shape=tuple(spec["forest_shape"]),  # type: ignore[arg-type]
        mil_heads=int(spec.get("mil_heads", 1)),
    )
