"""The study-level model: a small sequence model over the per-slice embeddings of one scan.

Reading a slice in the context of its neighbours is what separated the top RSNA 2019
solutions from the rest: a bleed that is faint on one slice is obvious across three, and a
scan-level decision should see the whole stack. The slice model stays frozen; this model reads
its embeddings (ordered along the patient axis) and returns refined per-slice logits and one
scan-level logit per label.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STUDY_KINDS = ("gru", "conv")


class StudyModel(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        n_labels: int,
        *,
        kind: str = "gru",
        hidden: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if kind not in STUDY_KINDS:
            raise ValueError(f"study model kind must be one of {STUDY_KINDS}, got {kind!r}")
        self.kind = kind
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, hidden), nn.ReLU())
        if kind == "gru":
            self.seq: nn.Module = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        else:
            self.seq = nn.Sequential(
                nn.Conv1d(hidden, 2 * hidden, 5, padding=2),
                nn.ReLU(),
                nn.Conv1d(2 * hidden, 2 * hidden, 3, padding=1),
                nn.ReLU(),
            )
        self.slice_head = nn.Linear(2 * hidden, n_labels)
        self.scan_head = nn.Linear(4 * hidden, n_labels)

    def forward(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings [B, S, D], mask [B, S] (True = real slice) →
        (slice logits [B, S, L], scan logits [B, L])."""
        b, s, _ = embeddings.shape
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.bool, device=embeddings.device)
        h = self.proj(embeddings)
        if self.kind == "gru":
            h, _ = self.seq(h)
        else:
            h = self.seq(h.transpose(1, 2)).transpose(1, 2)
        slice_logits = self.slice_head(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        masked = h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min)
        scan_logits = self.scan_head(torch.cat([mean, masked.max(1).values], dim=-1))
        return slice_logits, scan_logits


def build_study_model(config: dict[str, Any], embed_dim: int, n_labels: int) -> StudyModel:
    return StudyModel(
        embed_dim,
        n_labels,
        kind=config.get("kind", "gru"),
        hidden=int(config.get("hidden", 128)),
        dropout=float(config.get("dropout", 0.2)),
    )
