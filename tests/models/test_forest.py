"""A random forest stored as tensors predicts exactly what scikit-learn predicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import RandomForestClassifier

from ichscan.models.forest import ForestModule


@pytest.mark.parametrize("leaf", [1, 2, 5])
def test_tensor_forest_equals_sklearn(leaf: int) -> None:
    rng = np.random.default_rng(leaf)
    x = rng.normal(size=(120, 9)).astype(np.float32)
    y = (x[:, 0] + x[:, 3] * 0.5 + rng.normal(scale=0.5, size=120) > 0).astype(int)
    forest = RandomForestClassifier(60, min_samples_leaf=leaf, random_state=0).fit(x, y)
    module = ForestModule.from_sklearn(forest)
    test = rng.normal(size=(40, 9)).astype(np.float32)
    got = module(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(got, forest.predict_proba(test)[:, 1], atol=1e-12)
    assert module.depth() == max(e.get_depth() for e in forest.estimators_)
    fixed = module(torch.from_numpy(test), steps=module.depth()).numpy()
    np.testing.assert_array_equal(fixed, got)


def test_forest_survives_a_state_dict_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = (x[:, 1] > 0).astype(int)
    module = ForestModule.from_sklearn(RandomForestClassifier(10, random_state=0).fit(x, y))
    torch.save(module.state_dict(), tmp_path / "f.pt")
    again = ForestModule(*module.left.shape)
    again.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    assert torch.equal(again(torch.from_numpy(x)), module(torch.from_numpy(x)))


def test_one_class_forest_predicts_that_class() -> None:
    x = np.zeros((6, 2), np.float32)
    module = ForestModule.from_sklearn(RandomForestClassifier(3).fit(x, np.ones(6, int)))
    assert torch.all(module(torch.zeros(2, 2)) == 1)
