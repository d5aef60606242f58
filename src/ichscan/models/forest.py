"""A fitted scikit-learn random forest as plain tensors, so it travels in a bundle's
``state_dict`` (loaded with ``weights_only=True``, no pickle) and predicts without sklearn.

Each tree becomes rows of padded arrays: left/right child, split feature, threshold, and
the positive-class fraction at every node. Prediction walks all trees at once, one level
per step, which for a few hundred trees and a few dozen features is a few milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_LEAF = -1


def forest_arrays(forest: object) -> dict[str, np.ndarray]:
    """The trees of a fitted binary RandomForestClassifier as padded arrays [T, M]."""
    trees = [est.tree_ for est in forest.estimators_]  # type: ignore[attr-defined]
    classes = list(forest.classes_)  # type: ignore[attr-defined]
    if len(classes) == 1:
        positive = None
    elif classes == [0, 1] or classes == [False, True]:
        positive = 1
    else:
        raise ValueError(f"expected a binary 0/1 forest, got classes {classes}")
    nodes = max(t.node_count for t in trees)
    shape = (len(trees), nodes)
    left = np.full(shape, _LEAF, dtype=np.int64)
    right = np.full(shape, _LEAF, dtype=np.int64)
    feature = np.zeros(shape, dtype=np.int64)
    threshold = np.zeros(shape, dtype=np.float64)
    value = np.zeros(shape, dtype=np.float64)
    for k, t in enumerate(trees):
        n = t.node_count
        left[k, :n] = t.children_left
        right[k, :n] = t.children_right
        feature[k, :n] = np.maximum(t.feature, 0)
        threshold[k, :n] = t.threshold
        counts = t.value[:, 0, :]
        # Fractions whatever this sklearn version stores (counts before 1.4, fractions after).
        fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
        value[k, :n] = fractions[:, positive] if positive is not None else float(classes[0])
    return {
        "left": left,
        "right": right,
        "feature": feature,
        "threshold": threshold,
        "value": value,
    }


class ForestModule(nn.Module):
    """Positive-class probability of a binary forest stored as buffers."""

    def __init__(self, trees: int = 1, nodes: int = 1) -> None:
        super().__init__()
        shape = (trees, nodes)
        self.register_buffer("left", torch.full(shape, _LEAF, dtype=torch.int64))
        self.register_buffer("right", torch.full(shape, _LEAF, dtype=torch.int64))
        self.register_buffer("feature", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("threshold", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("value", torch.zeros(shape, dtype=torch.float64))

    @classmethod
    def from_sklearn(cls, forest: object) -> ForestModule:
        arrays = forest_arrays(forest)
        module = cls(*arrays["left"].shape)
        for name, array in arrays.items():
            getattr(module, name).copy_(torch.from_numpy(array))
        return module

    def depth(self) -> int:
        """Splits on the longest root-to-leaf path: how many steps reach every leaf."""
        left, right = self.left.cpu().numpy(), self.right.cpu().numpy()
        depth = np.zeros(left.shape, dtype=np.int64)
        trees = np.arange(left.shape[0])
        # sklearn numbers a node's children after the node, so one pass in order suffices.
        for node in range(left.shape[1]):
            inner = left[:, node] != _LEAF
            child_depth = depth[inner, node] + 1
            depth[trees[inner], left[inner, node]] = child_depth
            depth[trees[inner], right[inner, node]] = child_depth
        return int(depth.max())

    def forward(self, features: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """[N, F] → [N] probability (the mean of the trees' leaf fractions, as sklearn).
        ``steps``: walk exactly that many levels (at least ``depth()``) instead of stopping
        when every row sits on a leaf: a graph without data-dependent control flow, which
        is what ONNX export needs; the result is the same."""
        x = features.to(torch.float64)
        # sklearn compares float32 features (X is cast to float32 before the trees see it).
        x = x.to(torch.float32).to(torch.float64)
        trees = self.left.shape[0]
        # Built from x's own shape so that an exported graph keeps a dynamic batch axis.
        node = torch.zeros_like(x[:, :1], dtype=torch.int64).expand(-1, trees)
        rows = torch.arange(trees, device=x.device).unsqueeze(0) + node
        level = 0
        while steps is None or level < steps:
            left = self.left[rows, node]
            inner = left != _LEAF
            if steps is None and not bool(inner.any()):
                break
            goes_left = x.gather(1, self.feature[rows, node]) <= self.threshold[rows, node]
            step = torch.where(goes_left, left, self.right[rows, node])
            node = torch.where(inner, step, node)
            level += 1
        return self.value[rows, node].mean(dim=1)
