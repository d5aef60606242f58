"""Lab: partial fine-tuning of EfficientNet-Lite0 blocks 11+ on the cached block-10 maps.

The small-set recipe's cached `fine` maps are the output of Lite0's block 10 for eight views
of each slice, which is exactly the input of block 11: the top of the network can be
fine-tuned without running the frozen bottom again. Blocks 11-15 and the conv head start
from ImageNet, batch norm keeps its ImageNet statistics (eval mode: batches are tiny), a
fresh linear layer and one bias per source read the pooled head. One random view per slice
per epoch, label smoothing 0.1, AdamW with a lower rate for the pretrained blocks.

Scored on the same folds as cv_members.py (fold seed 0 = the benchmark's), so its logits
can be combined with the saved member logits:

    .venv/bin/python research/recipe_lab/partial_ft.py CACHE OUT.npz [--epochs 8]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from cv_members import load, split
from torch import nn

from ichscan.models.small_set import LiteMaps
from ichscan.train import small_set as ss


class Top(nn.Module):
    def __init__(self, net: nn.Module, sources: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(net._blocks[11:]))
        self.conv_head = copy.deepcopy(net._conv_head)
        self.bn1 = copy.deepcopy(net._bn1)
        self.act = copy.deepcopy(net._swish)
        self.fc = nn.Linear(self.conv_head.out_channels, 1)
        self.source_bias = nn.Parameter(torch.zeros(sources))

    def train(self, mode: bool = True) -> Top:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, fine: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        x = fine
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn1(self.conv_head(x))).mean((2, 3))
        return self.fc(F.dropout(x, 0.2, self.training))[:, 0] + self.source_bias[source]


def fit(data, net, rows, seed, epochs, batch=16) -> Top:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    top = Top(net, data.sources)
    for p in top.parameters():
        p.requires_grad = True
    head = [*top.fc.parameters(), top.source_bias]
    body = [p for n, p in top.named_parameters() if not n.startswith(("fc.", "source_bias"))]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": 1e-4}, {"params": head, "lr": 1e-3}], weight_decay=1e-2
    )
    steps = epochs * -(-len(rows) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [1e-4, 1e-3], total_steps=steps)
    target = torch.as_tensor(data.y[rows], dtype=torch.float32) * 0.9 + 0.05
    src = torch.as_tensor(data.source[rows])
    top.train()
    for _ in range(epochs):
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), batch):
            pick = order[start : start + batch]
            fine, _ = data.maps.take(rows[pick], rng.integers(0, ss.N_VIEWS, len(pick)))
            loss = F.binary_cross_entropy_with_logits(top(fine, src[pick]), target[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return top.eval()


@torch.no_grad()
def logits(top: Top, data, rows) -> np.ndarray:
    source = torch.zeros(len(rows), dtype=torch.long)
    return np.stack([top(data.maps.take(rows, v)[0], source).numpy() for v in (0, 1)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("out")
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    data, folds = load(args.cache)
    folds = split(data, folds, args.fold_seed)
    net = LiteMaps("imagenet").net
    result: dict[str, np.ndarray] = {"y": data.y, "folds": folds}
    for fold in sorted(set(folds[folds >= 0])):
        t0, c0 = time.monotonic(), time.process_time()
        tr = np.flatnonzero((folds != fold) & ((data.source != 0) | (folds >= 0)))
        va = np.flatnonzero(folds == fold)
        top = fit(data, net, tr, 1000 + int(fold), args.epochs)
        result[f"val_rows_{fold}"] = va
        result[f"val_logits_{fold}"] = logits(top, data, va)
        p = (1 / (1 + np.exp(-result[f"val_logits_{fold}"]))).mean(0)
        print(
            f"fold {fold}: {time.monotonic() - t0:.0f} s wall, "
            f"{time.process_time() - c0:.0f} CPU-s, val p {np.round(p, 2).tolist()}",
            flush=True,
        )
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
