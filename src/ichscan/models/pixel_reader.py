"""The pixel reader: a small network trained from scratch on the brain crop's grey.

Every other member of the small-set ensemble reads frozen ImageNet features or hand-made
numbers, and none of them sees a small plain hyperdense oval (a basal ganglia or lobar
haematoma) as unusual: on head_ct's stubborn slices (070, 053, 041) they all scored under
0.45. This network reads the grey itself, the 320 px brain crop halved to 160 px, and gives
a logit per 8 px cell of the crop (two 2x poolings); a slice's logit is the log-sum-exp
(r = 5) over its brain cells, normalised by their number, as the MIL heads pool.

How it learns (ichscan.train.pixel_reader): patches of synthetic bleeds inserted into real
negative slices, the points of real negative slices it scores highest (hard negatives), and
the point of each real positive slice it scores highest (multiple-instance learning).
Screened in research/recipe_lab/SESSION19.md before it joined the ensemble.

Everything here is torch, so the member exports to ONNX with the rest of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELL = 8  # crop px per map cell: halved, then two 2x poolings
POOL_R = 5.0
# The grey's rough mean and spread in [0, 1] on brain crops: the network is trained from
# scratch, so any fixed centring does; kept as the lab trained it.
GREY_CENTRE, GREY_SCALE = 0.35, 0.3


def _block(cin: int, cout: int, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class PixelNet(nn.Module):
    """float [N, 1, h, w] grey in [0, 1] at half the crop's resolution → [N, h/4, w/4]
    logits of blood per cell."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_block(1, w),
            *_block(w, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            *_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            *_block(4 * w, 4 * w),
            *_block(4 * w, 4 * w, 2),
            nn.Dropout2d(0.1),
            nn.Conv2d(4 * w, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - GREY_CENTRE) / GREY_SCALE)[:, 0]


def halved(grey: torch.Tensor) -> torch.Tensor:
    """float [N, H, W] crop grey in [0, 1] → [N, 1, H/2, W/2]: what the network reads."""
    return F.avg_pool2d(grey[:, None], 2)


def brain_cells(grey: torch.Tensor) -> torch.Tensor:
    """bool [N, H/8, W/8]: the cells at least half inside the brain (the crop is zero
    outside it)."""
    return F.avg_pool2d((grey[:, None] > 0).float(), CELL)[:, 0] >= 0.5


def pooled(cells: torch.Tensor, brain: torch.Tensor, r: float = POOL_R) -> torch.Tensor:
    """[N, h, w] cell logits → [N]: log-sum-exp over each slice's brain cells, normalised
    by their number; a slice without brain cells gets its map's mean."""
    masked = torch.where(brain, r * cells, torch.full_like(cells, -1e4))
    n = brain.flatten(1).sum(1).clamp(min=1)
    z = (torch.logsumexp(masked.flatten(1), 1) - torch.log(n.float())) / r
    return torch.where(brain.flatten(1).any(1), z, cells.flatten(1).mean(1))


def pixel_logit(net: PixelNet, grey: torch.Tensor) -> torch.Tensor:
    """float [N, H, W] brain crop grey in [0, 1] (H, W multiples of 8) → [N] slice logits."""
    return pooled(net(halved(grey)), brain_cells(grey))
