"""Label sets as data: names, metric weights, and where each public dataset keeps them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelSet:
    name: str
    labels: tuple[str, ...]
    weights: tuple[float, ...]  # per-label weight in the loss and the weighted log loss
    description: str

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.weights):
            raise ValueError(
                f"label set {self.name}: {len(self.labels)} labels, {len(self.weights)} weights"
            )

    def weight(self, label: str) -> float:
        return self.weights[self.labels.index(label)]


RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")

RSNA = LabelSet(
    "rsna",
    ("any", *RSNA_SUBTYPES),
    (2.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "RSNA Intracranial Hemorrhage Detection 2019: any hemorrhage and five subtypes "
    "(the challenge weighted `any` 2, the subtypes 1)",
)

# Column stems as they appear in CQ500's reads.csv (R1:ICH ... R3:MidlineShift), in order.
CQ500_COLUMNS = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
CQ500 = LabelSet(
    "cq500",
    (
        "ich",
        "iph",
        "ivh",
        "sdh",
        "edh",
        "sah",
        "bleed_left",
        "bleed_right",
        "chronic_bleed",
        "fracture",
        "calvarial_fracture",
        "other_fracture",
        "mass_effect",
        "midline_shift",
    ),
    (1.0,) * 14,
    "CQ500 (qure.ai): 14 findings per scan; gold standard = majority of three radiologists",
)

BINARY = LabelSet(
    "binary",
    ("hemorrhage",),
    (1.0,),
    "hemorrhage yes/no (e.g. the Kaggle head_ct set: labels.csv with id, hemorrhage)",
)

LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (RSNA, CQ500, BINARY)}


def get_label_set(name: str) -> LabelSet:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(
            f"unknown label set {name!r}; choose one of {', '.join(LABEL_SETS)}"
        ) from None


def detect_label_set(columns: list[str] | tuple[str, ...]) -> LabelSet:
    """The label set whose labels are all among `columns` (most labels wins)."""
    present = {c.strip().lower() for c in columns}
    for candidate in (RSNA, CQ500, BINARY):
        if set(candidate.labels) <= present:
            return candidate
    if "hemorrhage" in present or "label" in present:
        return BINARY
    raise ValueError(
        f"cannot tell the label set from columns {sorted(present)}: expected the RSNA labels "
        f"({', '.join(RSNA.labels)}), the CQ500 findings, or a binary 'hemorrhage' column"
    )


def scan_truth(y: np.ndarray) -> np.ndarray:
    """A scan's label from its slices' (int [S, L]): 1 if any is 1, else 0 if any is 0,
    else -1 (unknown)."""
    return np.where((y == 1).any(0), 1, np.where((y == 0).any(0), 0, -1)).astype(np.int8)
