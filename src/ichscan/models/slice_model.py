"""The slice classifier: a backbone embedding, dropout, and a fresh multi-label head.

Input normalisation lives inside the model (as buffers), so an exported or reloaded model
cannot be fed differently from how it was trained: callers pass uint8 images or floats in
[0, 1], channels first.
"""

from __future__ import annotations

import torch
from torch import nn

from ichscan.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone


class SliceModel(nn.Module):
    def __init__(
        self,
        architecture: str,
        n_labels: int,
        *,
        pretrained: str = "imagenet",
        dropout: float = 0.3,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.backbone, self.embed_dim, self.provenance = build_backbone(architecture, pretrained)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.embed_dim, n_labels))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images → [B, D] embeddings (what the study model reads)."""
        return self.backbone(self.normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images → [B, n_labels] logits."""
        return self.head(self.embed(x))

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Head-only training (as the seed projects did) or full fine-tuning. A frozen
        backbone also keeps its BatchNorm statistics (see train())."""
        self._frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad = not frozen

    def train(self, mode: bool = True) -> SliceModel:
        super().train(mode)
        if mode and getattr(self, "_frozen", False):
            self.backbone.eval()  # ImageNet BN statistics stay put when only the head learns
        return self
