"""train-study on tiny caches and untrained slice models: thresholds for the scan output,
the refusals made from the index before any slice is embedded, which cache it reads, and
that the cache is cut and split as the slice model's was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ichscan.cli import main
from ichscan.data.cache import PreparedCache
from ichscan.data.synth import write_synthetic
from ichscan.infer.predictor import Predictor
from ichscan.labels import get_label_set
from ichscan.models.bundle import input_spec, load_bundle, new_config, save_bundle
from ichscan.models.slice_model import SliceModel
from ichscan.threads import torch_threads
from ichscan.train import study
from ichscan.train.data import TrainingData
from ichscan.train.loop import choose_threshold
from ichscan.train.study import StudyConfig, StudyTrainingError, train_study

FOLDS = 3


class Embedded(Exception):
    """Raised in place of the embedding pass: every check before it passed."""


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors on a loaded 2-core machine: a second OpenMP thread only adds waiting.
    with torch_threads(1):
        yield


def _prepare(data: Path, out: Path, *args: str) -> Path:
    base = ["prepare", str(data), "--out", str(out), "--size", "32", "--folds", str(FOLDS)]
    assert main([*base, "--workers", "1", *args]) == 0
    return out


@pytest.fixture(scope="module")
def dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study") / "dicom"
    write_synthetic(root, n_scans=9, seed=5, layout="dicom", shape=(6, 48, 48))
    return root


@pytest.fixture(scope="module")
def cache(dicom: Path) -> Path:
    return _prepare(dicom, dicom.parent / "cache")


def _bundle(root: Path, cache: Path, **training: Any) -> Path:
    """An untrained ResNet18 bundle recorded as trained on ``cache`` (fold 0 of 3), with the
    input and the training record `ichscan train CACHE` writes."""
    torch.manual_seed(0)
    prepared = PreparedCache(cache)
    label_set = get_label_set(prepared.facts["label_set"])
    model = SliceModel("resnet18", len(label_set.labels), pretrained="none", dropout=0.0)
    split = TrainingData(cache, label_set, 0, FOLDS, 0, None)
    split.open()
    spec = input_spec(
        prepared.facts["windows"],
        prepared.size,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        mode=prepared.facts.get("mode", "linear"),
        crop=prepared.crop,
    )
    record = {
        "data": str(cache),
        "data_summary": split.summary,
        "fold": 0,
        "folds": FOLDS,
        "config": {"seed": 0},
    }
    config = new_config(
        architecture="resnet18",
        weights_provenance=model.provenance,
        label_set=label_set,
        input_spec=spec,
        dropout=0.0,
        training={**record, **training},
    )
    config["threshold_method"] = "youden on the validation fold"
    return save_bundle(root, config, [model.eval()])


def _no_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    def embed(*args: Any, **kwargs: Any) -> np.ndarray:
        raise Embedded

    monkeypatch.setattr(study, "embed_cache", embed)


def _config(model: Path, **kw: Any) -> StudyConfig:
    return StudyConfig(model=str(model), epochs=2, hidden=8, progress=False, **kw)


# -- D1: the scan output's own thresholds ------------------------------------------------


def test_scan_thresholds_are_chosen_on_the_study_models_scan_outputs(
    cache: Path, tmp_path: Path
) -> None:
    model = _bundle(tmp_path / "m", cache)
    train_study(_config(model, data=str(cache)))
    config = json.loads((model / "bundle.json").read_text())["study_model"]
    assert config["threshold_level"] == "slices"
    assert config["scan_threshold_method"].startswith("youden on the study model's validation")
    # The same rule on the validation scans' scan outputs, which the study model recomputes.
    bundle = load_bundle(model)
    prepared = PreparedCache(cache)
    _, val = study._split_scans(prepared, 0)
    emb = study.embed_cache(bundle, prepared, torch.device("cpu"))
    _, _, cp, cy = study._outputs(bundle.study, val, emb, prepared.labels(), torch.device("cpu"))
    for j, name in enumerate(bundle.labels):
        known = cy[:, j] >= 0
        if len(np.unique(cy[known, j])) == 2:
            expected = choose_threshold(cy[known, j], cp[known, j], "youden")
            assert config["scan_thresholds"][name] == pytest.approx(expected)
        else:  # one class among the validation scans: the slice threshold, as before
            assert config["scan_thresholds"][name] == config["thresholds"][name]
    predictor = Predictor(model, device="cpu")
    assert predictor.scan_thresholds_tuned and predictor.scan_thresholds_note is None
    np.testing.assert_array_equal(
        predictor.scan_thresholds, [config["scan_thresholds"][n] for n in bundle.labels]
    )


def test_scan_labels_tune_no_slice_decision_and_the_bundle_says_so(
    cache: Path, tmp_path: Path
) -> None:
    """CQ500 and NIfTI labels are per scan: both thresholds come from the scan outputs, and
    the bundle records that level rather than passing them off as tuned on slices."""
    # Asks for the cache fixture itself: under xdist this test can run on a worker where no
    # earlier test has built it.
    scan_cache = tmp_path / "cache"
    shutil.copytree(cache, scan_cache)
    facts = json.loads((scan_cache / "cache.json").read_text())
    facts.setdefault("manifest", {})["label_level"] = "scan"
    (scan_cache / "cache.json").write_text(json.dumps(facts))
    model = _bundle(tmp_path / "m", scan_cache)
    train_study(_config(model, data=str(scan_cache)))
    config = json.loads((model / "bundle.json").read_text())["study_model"]
    assert config["threshold_level"] == "scans"
    assert config["threshold_method"].endswith("validation scans")
    assert config["scan_thresholds"] == config["thresholds"]


# -- D2: refused from the index, before the embedding pass; a bar on that pass -----------


def test_single_slice_scans_are_refused_before_any_slice_is_embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "slices"
    write_synthetic(data, n_scans=9, seed=3, layout="png", shape=(1, 48, 48))
    slices = _prepare(data, tmp_path / "cache")
    model = _bundle(tmp_path / "m", slices)
    _no_embedding(monkeypatch)
    with pytest.raises(StudyTrainingError, match="9 of 9 scans are a single slice"):
        train_study(_config(model, data=str(slices)))
    assert load_bundle(model).study is None


def test_the_embedding_pass_shows_a_progress_bar(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = load_bundle(_bundle(tmp_path / "m", cache))
    study.embed_cache(bundle, PreparedCache(cache), torch.device("cpu"), progress=True)
    assert "embedding slices" in capsys.readouterr().err


# -- D3: the cache the bundle records ----------------------------------------------------


def test_a_model_trained_on_a_prepared_cache_finds_it(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _bundle(tmp_path / "m", cache)
    assert not (model / "cache").exists()
    _no_embedding(monkeypatch)
    with pytest.raises(Embedded):
        train_study(_config(model))
    raw = _bundle(tmp_path / "raw", cache, data=str(tmp_path / "gone"))
    with pytest.raises(StudyTrainingError, match=r"nor is .*gone \(what it was trained on\)"):
        train_study(_config(raw))


# -- D13: a cache cut or split otherwise -------------------------------------------------


def test_a_cache_cut_otherwise_is_refused_naming_each_difference(
    dicom: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _bundle(tmp_path / "m", cache)
    other = _prepare(dicom, tmp_path / "other", "--size", "40", "--windows", "brain,subdural")
    _no_embedding(monkeypatch)
    with pytest.raises(StudyTrainingError) as caught:
        train_study(_config(model, data=str(other)))
    message = str(caught.value)
    assert "\n" not in message
    assert "this cache's input differs from the model's" in message
    assert "size 40 px (the model: 32 px)" in message
    assert "windows brain 40/80, subdural 80/200 (the model: brain 40/80, subdural" in message
    assert "channels 2 (the model: 3)" in message
    assert "; mode " not in message and "; crop " not in message


def test_a_cache_split_otherwise_is_refused(
    dicom: Path,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its validation fold would hold scans the slice model trained on."""
    _no_embedding(monkeypatch)
    model = _bundle(tmp_path / "m", cache)
    reseeded = _prepare(dicom, tmp_path / "seed1", "--seed", "1")
    with pytest.raises(StudyTrainingError, match="are in the slice model's training folds"):
        train_study(_config(model, data=str(reseeded)))
    five = tmp_path / "folds5"
    assert main(["prepare", str(dicom), "--out", str(five), "--size", "32", "--workers", "1"]) == 0
    with pytest.raises(StudyTrainingError, match="split into 5 folds, the slice model's data"):
        train_study(_config(model, data=str(five)))
    # The slice model's cache is gone: the split's slice counts are what the bundle records,
    # and a split with the same counts is taken with a note that only they were checked.
    gone = _bundle(tmp_path / "gone", cache, data=str(tmp_path / "moved"))
    held_out = _prepare(dicom, tmp_path / "holdout", "--holdout", "0.34")
    with pytest.raises(StudyTrainingError, match=r"splits 24 training and 12 .* another split"):
        train_study(_config(gone, data=str(held_out)))
    capsys.readouterr()
    with pytest.raises(Embedded):
        train_study(_config(gone, data=str(reseeded)))
    assert "checked by its fold and slice counts only" in capsys.readouterr().err
    # A copy of the slice model's own cache is the same split.
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    with pytest.raises(Embedded):
        train_study(_config(model, data=str(copy)))


def test_a_bundle_without_a_split_record_is_trained_with_a_one_line_note(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _bundle(tmp_path / "m", cache)
    config = json.loads((model / "bundle.json").read_text())
    for key in ("fold", "folds"):
        del config["training"][key]
    (model / "bundle.json").write_text(json.dumps(config))
    _no_embedding(monkeypatch)
    with pytest.raises(Embedded):
        train_study(_config(model, data=str(cache)))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "does not record the slice model's split" in err
