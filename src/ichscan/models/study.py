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
        m = mask.unsqueeze(-1).to(embeddings.dtype)
        # A padded position must not reach a real one: the GRU's backward direction reads
        # the padding first, and the convolutions look across a scan's end. So a scan's
        # outputs are the same alone and in a padded batch.
        h = self.proj(embeddings) * m
        if self.kind == "gru":
            h = self._gru(h, mask)
        else:
            h = h.transpose(1, 2)
            keep = m.transpose(1, 2)
            for layer in self.seq:
                h = layer(h)
                if isinstance(layer, nn.ReLU):
                    h = h * keep
            h = h.transpose(1, 2)
        slice_logits = self.slice_head(h)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        masked = h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min)
        scan_logits = self.scan_head(torch.cat([mean, masked.max(1).values], dim=-1))
        return slice_logits, scan_logits

    def _gru(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if _exporting() or bool(mask.all()):
            return self.seq(h)[0]
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            h, lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.seq(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])[0]


def _exporting() -> bool:
    """Whether the model is being traced or exported (ONNX): a branch on the mask's values
    cannot be traced, and exported graphs run one scan at a time, without padding."""
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
    )


def build_study_model(config: dict[str, Any], embed_dim: int, n_labels: int) -> StudyModel:
    return StudyModel(
        embed_dim,
        n_labels,
        kind=config.get("kind", "gru"),
        hidden=int(config.get("hidden", 128)),
        dropout=float(config.get("dropout", 0.2)),
    )
