"""`run_evaluate`: metrics.json keys and values on a tiny synthetic set, slice and scan level,
the report and its plots, prepared caches, and the data a model cannot be evaluated on."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ichscan.data.synth import write_synthetic
from ichscan.errors import IchscanError
from ichscan.evaluate import plots
from ichscan.evaluate.metrics import roc_auc
from ichscan.evaluate.report import (
    EvaluateError,
    bootstrap_auc_ci,
    level_metrics,
    operating_point_note,
    run_evaluate,
    scan_truth,
)
from ichscan.infer.predictor import Predictor
from ichscan.io.load import load
from ichscan.labels import BINARY, RSNA, LabelSet
from ichscan.models.bundle import new_config, save_bundle
from ichscan.models.slice_model import SliceModel
from ichscan.models.study import build_study_model
from ichscan.preprocess.head_crop import CROP_VERSION
from ichscan.threads import torch_threads

LABELS = list(RSNA.labels)
HU_INPUT = {
    "kind": "windows",
    "windows": [
        {"name": "brain", "center": 40.0, "width": 80.0},
        {"name": "subdural", "center": 80.0, "width": 200.0},
        {"name": "bone", "center": 600.0, "width": 2800.0},
    ],
    "mode": "linear",
    "size": 32,
    "channels": 3,
    "source_window": None,
    "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "tta": ["identity"],
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors on a loaded 2-core machine: a second OpenMP thread only adds waiting.
    with torch_threads(1):
        yield


def _bundle(
    root: Path, label_set: LabelSet = RSNA, *, study: bool = False, crop: str = "none"
) -> Path:
    """An untrained ResNet18 bundle (evaluation needs a model, not a good one)."""
    torch.manual_seed(0)
    model = SliceModel("resnet18", len(label_set.labels), pretrained="none", dropout=0.0)
    spec = HU_INPUT if crop == "none" else {**HU_INPUT, "crop": crop, "crop_version": CROP_VERSION}
    config = new_config(
        architecture="resnet18",
        weights_provenance=model.provenance,
        label_set=label_set,
        input_spec=spec,
        dropout=0.0,
    )
    config["thresholds"] = {name: 0.45 for name in label_set.labels}
    config["threshold_method"] = "youden on the validation fold"  # as `ichscan train` says
    head = None
    study_config = {"kind": "gru", "hidden": 8}
    if study:
        head = build_study_model(study_config, model.embed_dim, len(label_set.labels))
    return save_bundle(root, config, [model.eval()], head, study_config)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "dicom"
    findings = [["subdural"], [], ["intraparenchymal", "epidural"]]
    for i, found in enumerate(findings):
        write_synthetic(root / f"p{i}", n_scans=1, seed=10 + i, shape=(6, 64, 64), findings=found)
    # One folder with one slice_truth.csv, as write_synthetic makes for a set.
    truth = pd.concat(pd.read_csv(root / f"p{i}" / "slice_truth.csv") for i in range(3))
    truth.to_csv(root / "slice_truth.csv", index=False)
    shutil.copy(root / "p0" / "README.txt", root / "README.txt")
    for i in range(3):
        (root / f"p{i}" / "slice_truth.csv").unlink()
        (root / f"p{i}" / "truth.csv").unlink()
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("evaluated")
    model = _bundle(base / "model")
    with torch.no_grad():
        metrics = run_evaluate(model, data, base / "out", device="cpu", n_bootstrap=200)
    return model, base / "out", metrics


def test_metrics_json_has_every_figure_at_both_levels(
    evaluated: tuple[Path, Path, dict], data: Path
) -> None:
    _, out, metrics = evaluated
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["labels"] == LABELS and set(metrics["thresholds"]) == set(LABELS)
    assert "clipped to [1e-15" in metrics["weighted_log_loss_definition"]
    assert metrics["data"]["source"] == str(data) and metrics["data"]["slices"] == 18
    assert metrics["slice"]["n"] == 18 and metrics["slice"]["n_scans"] == 3
    assert metrics["scan"]["n"] == 3 and metrics["scan"]["n_slices"] == 18
    truth = pd.read_csv(data / "slice_truth.csv")
    for level in ("slice", "scan"):
        m = metrics[level]
        assert 0 < m["weighted_log_loss"] < 5
        assert set(m["labels"]) == set(LABELS)
        for name, v in m["labels"].items():
            assert {
                "n",
                "positives",
                "negatives",
                "auc",
                "auc_ci95",
                "threshold",
                "sensitivity",
                "specificity",
                "ppv",
                "npv",
                "accuracy",
                "confusion_matrix",
                "auc_ci_note",
                "sensitivity_ci95",
                "specificity_ci95",
                "ppv_ci95",
                "npv_ci95",
            } <= set(v)
            (tn, fp), (fn, tp) = v["confusion_matrix"]["matrix"]
            assert tn + fp + fn + tp == v["n"] == m["n"]
            assert tp + fn == v["positives"] and tn + fp == v["negatives"]
            if level == "slice":
                assert v["positives"] == int(truth[name].sum())
            else:
                by_scan = truth.groupby("series_uid")[name].max()
                assert v["positives"] == int(by_scan.sum())
            if v["auc"] is None:
                assert v["positives"] == 0 or v["negatives"] == 0
            else:
                lo, hi = v["auc_ci95"]
                assert 0 <= lo <= hi <= 1
            assert v["threshold"] == 0.45
            for key in ("sensitivity", "specificity", "ppv", "npv"):
                if v[key] is not None:
                    lo, hi = v[f"{key}_ci95"]
                    assert 0 <= lo <= v[key] <= hi <= 1
    # 3 scans: no AUC interval here can be read as a 95% one, and the file says so
    assert all(
        "fewer than 10" in v["auc_ci_note"]
        for v in metrics["scan"]["labels"].values()
        if v["auc"] is not None
    )
    # intraventricular and subarachnoid have no positive scan: left out of the mean, by name
    assert metrics["scan"]["mean_auc_labels"] == ["any", "epidural", "intraparenchymal", "subdural"]
    assert "whole scans" in metrics["slice"]["ci_method"]


def test_scan_level_is_decided_at_the_thresholds_chosen_for_the_scan_score(
    data: Path, tmp_path: Path
) -> None:
    """A bundle that chose thresholds for the scan score (the max over slices) is judged at
    them on scans, and that level is then the tuned operating point; slices keep theirs."""
    model = _bundle(tmp_path / "model")
    config = json.loads((model / "bundle.json").read_text())
    config["scan_thresholds"] = {name: 0.9 for name in LABELS}
    (model / "bundle.json").write_text(json.dumps(config))
    metrics = run_evaluate(model, data, tmp_path / "out", device="cpu", n_bootstrap=50, plots=False)
    assert metrics["scan_thresholds"] == {name: 0.9 for name in LABELS}
    assert {v["threshold"] for v in metrics["scan"]["labels"].values()} == {0.9}
    assert {v["threshold"] for v in metrics["slice"]["labels"].values()} == {0.45}
    assert metrics["model"]["scan_thresholds_chosen_on"] == "scans"
    assert metrics["scan"]["operating_point_tuned"] and metrics["slice"]["operating_point_tuned"]


def test_report_html_shows_the_plots_and_what_it_rests_on(
    evaluated: tuple[Path, Path, dict], data: Path
) -> None:
    _, out, metrics = evaluated
    page = (out / "report.html").read_text()
    assert "research software, not a medical device" in page
    assert str(data) in page and "18 slices in 3 scans" in page
    assert "model trained on: training data not recorded" in page  # a hand-made bundle
    assert metrics["model"]["trained_on"] == "training data not recorded in this bundle"
    # ichscan's phantoms are named so, as the training data's are
    assert metrics["data"]["synthetic"] is True
    assert metrics["data"]["evaluated_on"] == f"SYNTHETIC phantoms at {data}"
    assert "The evaluation data are SYNTHETIC phantoms" in page
    assert "mean AUC" in page and "over 4 of 6 label(s) (intraventricular, subarachnoid" in page
    # the slice-tuned thresholds are not a scan-level operating point, and the page says so
    assert metrics["model"]["thresholds_chosen_on"] == "slices"
    assert metrics["slice"]["operating_point_tuned"] is True
    assert metrics["scan"]["operating_point_tuned"] is False
    assert "maximum over the scan&#x27;s slices" in page
    assert "not a tuned scan-level operating point" in page
    assert "2 positive and 1 negative cases: with fewer than 10 of a class" in page
    # The page is whole on its own: each plot is embedded, byte for byte the file in plots/.
    images = re.findall(
        r'<img src="data:image/png;base64,([^"]+)" alt="[^"]+" title="([^"]+)"', page
    )
    assert len(images) == 8
    for data_b64, name in images:
        assert base64.b64decode(data_b64) == (out / name).read_bytes()
        assert (out / name).stat().st_size > 2000
    assert {
        f"plots/{k}_{lvl}.png"
        for k in ("roc", "pr", "calibration", "hist")
        for lvl in ("slice", "scan")
    } == {name for _, name in images}
    assert metrics["plots"]["slice"]["roc"] == "plots/roc_slice.png"


def test_evaluate_predicts_what_predict_predicts(
    evaluated: tuple[Path, Path, dict], data: Path
) -> None:
    model, out, _ = evaluated
    with open(out / "slice_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    series = sorted(p.parent for p in (data / "p0").glob("*/*/*.dcm"))[0]
    pred = Predictor(model, device="cpu").predict_scan(load(series))
    mine = [r for r in rows if r["scan"] == pred.scan]
    assert [r["id"] for r in mine] == pred.slice_ids
    got = np.array([[float(r[name]) for name in LABELS] for r in mine])
    np.testing.assert_allclose(got, pred.slice_probs, atol=2e-6)
    with open(out / "scan_predictions.csv", newline="") as f:
        scan_row = next(r for r in csv.DictReader(f) if r["scan"] == pred.scan)
    assert float(scan_row["any"]) == pytest.approx(float(pred.scan_probs[0]), abs=2e-6)


def test_a_cropped_model_is_evaluated_on_slices_cut_its_way(data: Path, tmp_path: Path) -> None:
    """A bundle trained on brain-cropped slices is scored on brain-cropped slices, as predict
    scores it; a cache cut otherwise is refused."""
    model = _bundle(tmp_path / "model", crop="brain")
    metrics = run_evaluate(model, data, tmp_path / "out", device="cpu", n_bootstrap=50, plots=False)
    assert metrics["slice"]["n"] == 18
    with open(tmp_path / "out" / "slice_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    series = sorted(p.parent for p in (data / "p2").glob("*/*/*.dcm"))[0]
    pred = Predictor(model, device="cpu").predict_scan(load(series))
    got = np.array([[float(r[name]) for name in LABELS] for r in rows if r["scan"] == pred.scan])
    np.testing.assert_allclose(got, pred.slice_probs, atol=2e-6)
    uncropped = _bundle(tmp_path / "plain")
    run_evaluate(uncropped, data, tmp_path / "plain_out", device="cpu", n_bootstrap=50, plots=False)
    with pytest.raises(IchscanError, match="cache was prepared with --crop none; the model reads"):
        run_evaluate(model, tmp_path / "plain_out" / "cache", tmp_path / "again", device="cpu")


def test_a_prepared_cache_is_evaluated_directly(
    evaluated: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    model, out, metrics = evaluated
    again = run_evaluate(model, out / "cache", tmp_path, device="cpu", n_bootstrap=200, plots=False)
    assert not (tmp_path / "cache").exists()
    assert again["data"]["layout"] == "prepared cache"
    assert again["data"]["synthetic"] is True  # remembered in the cache, not in its path
    for level in ("slice", "scan"):
        assert again[level]["weighted_log_loss"] == pytest.approx(
            metrics[level]["weighted_log_loss"]
        )


def test_a_cache_prepared_otherwise_is_refused(
    evaluated: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    _, out, _ = evaluated
    other = _bundle(tmp_path / "model")
    config = json.loads((other / "bundle.json").read_text())
    config["input"]["size"] = 64
    (other / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(IchscanError, match="cache was prepared with windows"):
        run_evaluate(other, out / "cache", tmp_path / "out", device="cpu")


def test_study_model_gives_the_scan_level(data: Path, tmp_path: Path) -> None:
    model = _bundle(tmp_path / "model", study=True)
    metrics = run_evaluate(model, data, tmp_path / "out", device="cpu", n_bootstrap=50, plots=False)
    assert metrics["model"]["scan_level"] == "study model"
    with open(tmp_path / "out" / "scan_predictions.csv", newline="") as f:
        scans = list(csv.DictReader(f))
    with open(tmp_path / "out" / "slice_predictions.csv", newline="") as f:
        slices = list(csv.DictReader(f))
    # A study model's scan probability is its own output, not the slices' maximum.
    top = max(float(r["any"]) for r in slices if r["scan"] == scans[0]["scan"])
    assert float(scans[0]["any"]) != pytest.approx(top, abs=1e-6)


def test_binary_model_reads_any_as_hemorrhage(data: Path, tmp_path: Path) -> None:
    model = _bundle(tmp_path / "model", BINARY)
    metrics = run_evaluate(model, data, tmp_path / "out", device="cpu", n_bootstrap=50, plots=False)
    truth = pd.read_csv(data / "slice_truth.csv")
    assert metrics["labels"] == ["hemorrhage"]
    assert metrics["slice"]["labels"]["hemorrhage"]["positives"] == int(truth["any"].sum())


def test_hu_model_on_windowed_images_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "png"
    write_synthetic(images, n_scans=4, seed=1, layout="png", shape=(4, 64, 64))
    model = _bundle(tmp_path / "model")
    with pytest.raises(IchscanError, match="already-windowed images; the model needs HU"):
        run_evaluate(model, images, tmp_path / "out", device="cpu")


def test_bootstrap_auc_matches_sklearn_and_brackets_it() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.random(400) + 0.4 * y, 2)  # rounded: many ties
    y[:10] = -1  # unknown labels are left out
    lo, hi = bootstrap_auc_ci(y, p, n=300)
    auc = roc_auc(y, p)
    assert lo < auc < hi and hi - lo < 0.2
    assert np.isnan(bootstrap_auc_ci(np.ones(5), np.arange(5.0))).all()  # one class
    # unit weights give sklearn's AUC exactly
    from ichscan.evaluate.report import _weighted_auc

    keep = y >= 0
    yk, pk = y[keep].astype(bool), p[keep]
    order = np.argsort(pk, kind="stable")
    starts = np.flatnonzero(np.r_[True, pk[order][1:] != pk[order][:-1]])
    weights = np.ones(keep.sum(), dtype=np.int64)
    assert _weighted_auc(weights, yk[order], starts) == pytest.approx(auc, abs=1e-12)


def test_scan_truth_is_any_slice() -> None:
    y = np.array([[0, -1, -1], [1, 0, -1], [0, 0, -1]])
    assert scan_truth(y).tolist() == [1, 0, -1]


def test_skipped_inputs_lists_bad_missing_and_unreadable_once(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ichscan.evaluate.report import NO_FILE, skipped_inputs

    adapter = SimpleNamespace(
        bad_files=[{"path": "/d/ID_mr.dcm", "reason": "modality is MR, not CT"}],
        labels_without_files=["ID_gone", "ID_mr"],  # ID_mr is the unreadable file's label
    )
    prepared = tmp_path / "report.json"
    prepared.write_text(
        json.dumps(
            {
                "bad": [
                    {"path": "/d/ID_cut.dcm", "member": "", "reason": "truncated pixel data"},
                    {"path": "/d/s.zip", "member": "a/1.dcm", "reason": "empty pixel data"},
                ]
            }
        )
    )
    assert skipped_inputs(adapter, prepared) == [
        {"path": "/d/ID_mr.dcm", "reason": "modality is MR, not CT"},
        {"path": "ID_gone", "reason": NO_FILE},
        {"path": "/d/ID_cut.dcm", "reason": "truncated pixel data"},
        {"path": "/d/s.zip!a/1.dcm", "reason": "empty pixel data"},
    ]
    assert skipped_inputs(None, tmp_path / "absent.json") == []


def test_real_data_is_not_called_synthetic(data: Path, tmp_path: Path) -> None:
    plain = tmp_path / "scans"
    shutil.copytree(data, plain)
    (plain / "README.txt").unlink()
    model = _bundle(tmp_path / "model", BINARY)
    metrics = run_evaluate(
        model, plain, tmp_path / "out", device="cpu", n_bootstrap=20, plots=False
    )
    assert metrics["data"]["synthetic"] is False
    assert metrics["data"]["evaluated_on"] == f"data at {plain}"
    assert "SYNTHETIC" not in (tmp_path / "out" / "report.html").read_text()


def test_nan_probabilities_stop_evaluate_with_one_line(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diverged model's NaNs: one line naming the model and how many slices, before any
    figure, instead of a scikit-learn traceback after all inference is done."""
    model = _bundle(tmp_path / "model", BINARY)
    predict = Predictor.predict_inputs

    def first_slice_nan(self: Predictor, x: np.ndarray):  # type: ignore[no-untyped-def]
        probs, scan_probs, rest = predict(self, x)
        probs = probs.copy()
        probs[0] = np.nan
        return probs, scan_probs, rest

    monkeypatch.setattr(Predictor, "predict_inputs", first_slice_nan)
    with pytest.raises(EvaluateError) as caught:
        run_evaluate(model, data, tmp_path / "out", device="cpu", n_bootstrap=20, plots=False)
    assert str(model) in str(caught.value)
    assert "NaN or infinite probabilities for 3 of 18 slices (3 of 3 scans)" in str(caught.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_slice_level_auc_ci_resamples_whole_scans() -> None:
    """Sixteen identical slices per scan hold one scan's information: the slice-level
    interval must be the scan-level one, not sixteen times as sure."""
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 15)
    p = np.round(rng.random(30) + 0.5 * y, 2)
    scans = np.arange(30)
    per_scan = bootstrap_auc_ci(y, p, n=300, seed=1)
    slices = bootstrap_auc_ci(
        np.repeat(y, 16), np.repeat(p, 16), n=300, seed=1, clusters=np.repeat(scans, 16)
    )
    assert slices == pytest.approx(per_scan, abs=1e-12)
    naive = bootstrap_auc_ci(np.repeat(y, 16), np.repeat(p, 16), n=300, seed=1)
    assert naive[1] - naive[0] < 0.5 * (slices[1] - slices[0])


def test_auc_ci_note_flags_few_cases_and_zero_width() -> None:
    # 4 separable scans of each class: the bootstrap gives [1, 1], which is no 95% interval
    y = np.repeat([[0], [1]], 4, axis=0)
    p = np.linspace(0.1, 0.9, 8)[:, None]
    m = level_metrics(y, p, ["hemorrhage"], [1.0], [0.5], n_bootstrap=200)
    label = m["labels"]["hemorrhage"]
    assert label["auc"] == 1.0 and label["auc_ci95"] == [1.0, 1.0]
    assert "zero-width interval" in label["auc_ci_note"]
    assert "4 positive and 4 negative cases" in label["auc_ci_note"]
    # at slice level the units are scans: 40 slices in 8 scans are still 4 and 4
    m = level_metrics(
        np.repeat(y, 5, axis=0),
        np.repeat(p, 5, axis=0),
        ["hemorrhage"],
        [1.0],
        [0.5],
        n_bootstrap=200,
        clusters=np.repeat(np.arange(8), 5),
    )
    assert "4 positive and 4 negative scans" in m["labels"]["hemorrhage"]["auc_ci_note"]
    # enough of both classes and an interval of some width: nothing to say
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)[:, None]
    p = rng.random((60, 1)) + 0.5 * y
    assert (
        level_metrics(y, p, ["h"], [1.0], [0.5], n_bootstrap=200)["labels"]["h"]["auc_ci_note"]
        is None
    )


def test_thresholds_chosen_on_slices_are_not_a_scan_operating_point() -> None:
    from ichscan.infer.predictor import thresholds_chosen_on

    slice_model = {"threshold_method": "youden on the validation fold"}
    assert thresholds_chosen_on(slice_model, False) == "slices"
    untuned = {"threshold_method": "default 0.5 (not tuned)"}
    assert thresholds_chosen_on(untuned, False) is None
    study = {
        **slice_model,
        "study_model": {
            "thresholds": {"any": 0.3},
            "threshold_method": "youden on the study model's validation scans",
        },
    }
    assert thresholds_chosen_on(study, True) == "scans"
    # the study model's thresholds serve only when its outputs are the ones decided on
    assert thresholds_chosen_on(study, False) == "slices"
    assert "not a tuned scan-level" in operating_point_note("scan", "slices", "max over slices")
    assert "not a tuned slice-level" in operating_point_note("slice", "scans", "study model")
    assert "tuned for this level" in operating_point_note("scan", "scans", "study model")
    assert "not tuned" in operating_point_note("slice", None, "max over slices")


def test_plot_titles_name_the_data_and_n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG is shared on its own: its title names the data, the model and n, its legend
    each label's positives and negatives."""
    seen: dict[str, tuple[str, list[str]]] = {}
    save = plots._save

    def spy(fig, path: Path, title: str) -> Path:  # type: ignore[no-untyped-def]
        out = save(fig, path, title)
        legends = [
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
        ]
        seen[path.name] = (fig.get_suptitle(), legends)
        return out

    monkeypatch.setattr(plots, "_save", spy)
    y = np.array([[1, 0], [1, 0], [0, 0], [0, -1], [0, 1]])
    p = np.linspace(0.1, 0.9, 10).reshape(5, 2)
    plots.plot_all(
        "scan",
        ["any", "subdural"],
        y,
        p,
        [0.5, 0.5],
        tmp_path,
        rests_on="held_out (SYNTHETIC phantoms); model demo",
    )
    assert set(seen) == {"roc_scan.png", "pr_scan.png", "calibration_scan.png", "hist_scan.png"}
    for title, _ in seen.values():
        assert "scan level, 5 scans" in title
        assert "held_out (SYNTHETIC phantoms); model demo" in title
        assert "not a medical device" in title
    assert "any (2 pos / 3 neg), AUC" in " ".join(seen["roc_scan.png"][1])
    assert "subdural (1 pos / 3 neg), AP" in " ".join(seen["pr_scan.png"][1])
