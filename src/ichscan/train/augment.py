"""Augmentation for windowed CT slices (uint8 tensors [C, H, W]), torchvision v2 on tensors:
no PIL round trip, no float copy until the model normalises.

Window-level jitter: the cache holds windowed uint8, so a small per-channel contrast and
brightness change stands in for moving the window centre and width by a few HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentSpec:
    hflip: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.15
    crop: float = 0.9  # random-resized-crop area lower bound (1.0 = off)

    @classmethod
    def off(cls) -> AugmentSpec:
        return cls(0.0, 0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 1.0)


class WindowJitter(torch.nn.Module):
    """Independent contrast/brightness per channel (= per window), in uint8."""

    def __init__(self, brightness: float, contrast: float) -> None:
        super().__init__()
        self.brightness, self.contrast = brightness, contrast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.brightness == 0 and self.contrast == 0:
            return x
        c = x.shape[0]
        gain = 1 + (torch.rand(c, 1, 1) * 2 - 1) * self.contrast
        shift = (torch.rand(c, 1, 1) * 2 - 1) * self.brightness * 255
        mean = x.float().mean(dim=(1, 2), keepdim=True)
        y = (x.float() - mean) * gain + mean + shift
        return y.round_().clamp_(0, 255).to(torch.uint8)


def build_augment(spec: AugmentSpec, size: int) -> v2.Compose:
    steps: list[torch.nn.Module] = []
    if spec.crop < 1.0:
        steps.append(
            v2.RandomResizedCrop(size, scale=(spec.crop, 1.0), ratio=(0.9, 1.1), antialias=True)
        )
    if spec.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(spec.hflip))
    if spec.rotate_deg or spec.translate or spec.scale != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=spec.rotate_deg,
                translate=(spec.translate, spec.translate),
                scale=spec.scale,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    steps.append(WindowJitter(spec.brightness, spec.contrast))
    return v2.Compose(steps)
