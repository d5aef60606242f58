"""Bundles: what is saved is what predict loads, and a broken folder says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ichscan.labels import RSNA
from ichscan.models.bundle import BundleError, load_bundle, new_config, save_bundle, trained_on
from ichscan.models.slice_model import SliceModel
from ichscan.models.study import StudyModel


def _config() -> dict:
    return new_config(
        architecture="resnet18",
        weights_provenance="random",
        label_set=RSNA,
        dropout=0.1,
        input_spec={
            "kind": "windows",
            "windows": [],
            "size": 64,
            "channels": 3,
            "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        },
    )


def test_round_trip_with_study_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SliceModel("resnet18", 6, pretrained="none", mean=(0.5,) * 3, std=(0.25,) * 3)
    study = StudyModel(model.embed_dim, 6, hidden=16)
    save_bundle(tmp_path, _config(), [model.eval()], study, {"kind": "gru", "hidden": 16})
    bundle = load_bundle(tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bundle.members[0](x), model(x))
        emb = torch.randn(1, 5, model.embed_dim)
        torch.testing.assert_close(bundle.study(emb)[1], study.eval()(emb)[1])
    assert bundle.labels == list(RSNA.labels)
    assert bundle.config["research_use_only"]


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"no bundle\.json"):
        load_bundle(tmp_path)
    save_bundle(tmp_path, _config(), [SliceModel("resnet18", 6, pretrained="none")])
    (tmp_path / "slice-0.pt").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    save_bundle(tmp_path, _config(), [SliceModel("resnet18", 6, pretrained="none")])
    config = json.loads((tmp_path / "bundle.json").read_text())
    config["format_version"] = 99
    (tmp_path / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="upgrade ichscan"):
        load_bundle(tmp_path)


def test_trained_on_names_the_data_and_says_synthetic(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("SYNTHETIC DATA - not from any patient.\n")
    training = {
        "data_summary": {"source": "/data/head_ct", "synthetic": False, "slices": 150},
        "config": {"extra_train": ["/data/rsna_png"]},
        "fold": 2,
        "folds": 5,
    }
    line = trained_on({"training": training})
    assert line == (
        "data at /data/head_ct (150 slices) + extra training data /data/rsna_png; "
        "validated on fold 2 of 5"
    )
    # A bundle from before the flag: the data folder's own README tells.
    old = {"training": {"data_summary": {"source": str(tmp_path)}}}
    assert trained_on(old) == f"SYNTHETIC phantoms at {tmp_path}"
    assert trained_on({}) == "training data not recorded in this bundle"
