"""The predictor: inputs made exactly as training made them, ensemble/TTA/study maths, every
input kind, the output formats and how bad inputs are reported."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ichscan.data.cache import PreparedCache
from ichscan.data.phantom import make_phantom
from ichscan.data.prepare import read_row
from ichscan.data.synth import write_synthetic
from ichscan.errors import InputError
from ichscan.infer.inputs import InputSpec, scan_to_model_input
from ichscan.infer.predictor import (
    PredictError,
    Predictor,
    ScanPrediction,
    iter_scans,
    predict_paths,
    run_predict,
    scan_name,
)
from ichscan.infer.writers import scans_csv_path
from ichscan.io.dicom_write import write_ct_series
from ichscan.io.image import read_image
from ichscan.io.load import load
from ichscan.io.nifti import write_nifti
from ichscan.models.bundle import load_bundle
from ichscan.preprocess.window import apply_window
from ichscan.scan import Scan

# Shared fixtures (a trained tiny bundle and its variants): see infer_fixtures.py.
pytest_plugins = ["infer_fixtures"]
pytestmark = pytest.mark.usefixtures("single_threaded_torch")

RSNA = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
SLICE_COLUMNS = ["scan", "id", "slice_index", *RSNA, *(f"{n}_positive" for n in RSNA)]
SCAN_COLUMNS = ["scan", "n_slices", *RSNA, *(f"{n}_positive" for n in RSNA), "source"]


def _series(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/*/*.dcm") if p.parent.is_dir())


def _first_series(root: Path) -> Path:
    return sorted({p for p in _series(root)})[0]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def predictor(trained_bundle: Path) -> Predictor:
    return Predictor(trained_bundle, device="cpu")


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "slice.png"
    grey = np.zeros((48, 40), dtype=np.uint8)
    grey[10:30, 8:32] = 120
    Image.fromarray(grey).save(path)
    return path


@pytest.mark.parametrize(
    ("architecture", "passes"), [("efficientnet_lite0", [4, 4, 2]), ("resnet18", [10])]
)
def test_cpu_runs_efficientnets_a_few_images_per_pass(
    architecture: str, passes: list[int], tmp_path: Path
) -> None:
    """On a CPU, EfficientNet and DenseNet read 4 images per pass (1.9x and 1.4x faster,
    benchmarks/predict_scan.py); ResNet takes the batch whole. The probabilities are the
    one-pass ones to float32 rounding."""
    from ichscan.infer.predictor import TorchBackend
    from ichscan.labels import BINARY
    from ichscan.models.bundle import input_spec, new_config, save_bundle
    from ichscan.models.slice_model import SliceModel

    torch.manual_seed(0)
    model = SliceModel(architecture, 1, pretrained="none", dropout=0.0).eval()
    spec = input_spec(("brain",), 32, mean=[0.5] * 3, std=[0.25] * 3)
    config = new_config(
        architecture=architecture,
        weights_provenance="random initialisation (test)",
        label_set=BINARY,
        input_spec=spec,
        dropout=0.0,
    )
    save_bundle(tmp_path, config, [model])
    backend = TorchBackend(load_bundle(tmp_path), torch.device("cpu"), batch_size=5, tta=True)
    seen: list[int] = []
    hook = backend.members[0].backbone.register_forward_pre_hook
    hook(lambda _, args: seen.append(len(args[0])))
    x = np.random.default_rng(0).integers(0, 255, (5, 3, 32, 32), dtype=np.uint8)
    probs, _ = backend.slices(x)
    assert seen == passes  # 5 slices and their mirrors: 10 images
    backend.cpu_pass = None
    whole, _ = backend.slices(x)
    np.testing.assert_allclose(probs, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_a_gpu_predicts_what_the_cpu_predicts(trained_bundle: Path, synth_dicom: Path) -> None:
    """The same bundle on CUDA and on the CPU: the same scans, slices and probabilities
    (to cuDNN's TF32 rounding)."""
    cpu = list(predict_paths([synth_dicom], Predictor(trained_bundle, device="cpu")))
    gpu = list(predict_paths([synth_dicom], Predictor(trained_bundle, device="cuda")))
    assert [p.scan for p in gpu] == [p.scan for p in cpu] and len(cpu) > 1
    for a, b in zip(gpu, cpu, strict=True):
        assert a.slice_ids == b.slice_ids
        np.testing.assert_allclose(a.slice_probs, b.slice_probs, atol=2e-3)
        np.testing.assert_allclose(a.scan_probs, b.scan_probs, atol=2e-3)


# -- inputs ---------------------------------------------------------------------------


def test_dicom_input_is_exactly_what_training_cached(
    trained_bundle: Path, synth_dicom: Path, predictor: Predictor
) -> None:
    cache = PreparedCache(trained_bundle / "cache")
    scan = load(_first_series(synth_dicom))
    rows = cache.index[cache.index["series_id"] == scan.series_uid].sort_values("slice_index")
    cached = np.stack([cache[i] for i in rows.index]).transpose(0, 3, 1, 2)
    _, x = predictor.prepare(scan)
    assert x.dtype == np.uint8 and x.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(x, cached)


def test_nifti_input_is_exactly_what_training_would_cache(
    tmp_path: Path, predictor: Predictor, synth_dicom: Path
) -> None:
    # 80 x 72 in-plane: not an integer factor of 32, and not square.
    phantom = make_phantom((4, 80, 72), (5.0, 2.8, 3.1), seed=4, findings=["subdural"])
    series = write_ct_series(phantom.hu, tmp_path / "s", pixel_spacing=(2.8, 3.1))
    nifti = write_nifti(load(series[0].parent), tmp_path / "vol.nii.gz")
    x = scan_to_model_input(load(nifti), predictor.bundle.input)
    spec = predictor.bundle.input
    windows = [f"{w['center']}/{w['width']}" for w in spec["windows"]]
    for k in range(4):
        row = {"kind": "nifti", "path": str(nifti), "slice_index": k}
        np.testing.assert_array_equal(x[k], read_row(row, windows, 32).transpose(2, 0, 1))


def test_png_trained_bundle_renders_its_window_from_a_dicom_series(
    png_bundle: Path, synth_dicom: Path
) -> None:
    predictor = Predictor(png_bundle, device="cpu")
    scan = load(_first_series(synth_dicom))
    _, x = predictor.prepare(scan)
    assert x.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(x[:, 0], x[:, 1])
    np.testing.assert_array_equal(x[:, 0], x[:, 2])
    brain = apply_window(scan.hu, "brain")
    expected = brain.reshape(8, 32, 2, 32, 2).mean(axis=(2, 4))  # 64 -> 32 box average
    assert np.abs(x[:, 0].astype(float) - expected).max() <= 1.0
    pred = predictor.predict_scan(scan)
    assert pred.slice_probs.shape == (8, 6) and np.isfinite(pred.slice_probs).all()


def test_png_trained_bundle_reads_a_png(png_bundle: Path, png_file: Path) -> None:
    predictor = Predictor(png_bundle, device="cpu")
    [pred] = list(predict_paths([png_file], predictor, on_error="raise"))
    assert pred.kind == "image" and pred.slice_ids == ["slice"] and pred.n_slices == 1


def test_hu_bundle_refuses_an_already_windowed_image(predictor: Predictor, png_file: Path) -> None:
    with pytest.raises(InputError, match="already windowed; the model needs HU") as info:
        predictor.predict_scan(read_image(png_file))
    assert str(png_file) in str(info.value) and "subdural/bone" in str(info.value)


def test_two_point_five_d_stacks_neighbours() -> None:
    spec = InputSpec.from_bundle(
        {"kind": "2.5d", "windows": [{"name": "brain", "center": 40, "width": 80}], "size": 8}
    )
    hu = (np.arange(4)[:, None, None] * 20 + np.zeros((1, 8, 8))).astype(np.int16)
    scan = load_like(hu)
    x = scan_to_model_input(scan, spec)
    levels = x[:, :, 0, 0]
    np.testing.assert_array_equal(levels[:, 1], apply_window(hu[:, 0, 0], "brain"))
    np.testing.assert_array_equal(levels[:, 0], levels[[0, 0, 1, 2], 1])  # previous
    np.testing.assert_array_equal(levels[:, 2], levels[[1, 2, 3, 3], 1])  # next


def test_bundle_cut_by_another_crop_version_warns(caplog: pytest.LogCaptureFixture) -> None:
    from ichscan.models.bundle import input_spec
    from ichscan.preprocess.head_crop import CROP_VERSION

    current = input_spec(("brain",), 64, mean=[0.0] * 3, std=[1.0] * 3, crop="brain")
    assert current["crop_version"] == CROP_VERSION
    with caplog.at_level("WARNING", logger="ichscan.infer.inputs"):
        InputSpec.from_bundle(current)
        assert not caplog.records
        old = {**current, "crop_version": None}  # bundles from before versions were kept
        assert InputSpec.from_bundle(old).crop == "brain"
    assert "head crop version 1" in caplog.text and "retrain" in caplog.text


def load_like(hu: np.ndarray):
    from ichscan.scan import Scan

    return Scan(hu, np.eye(4), [f"s{k}" for k in range(len(hu))], (5.0, 1.0, 1.0))


# -- the maths ------------------------------------------------------------------------


def test_probabilities_average_members_and_the_mirror(trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    model = bundle.members[0]
    with torch.no_grad():
        t = torch.from_numpy(x)
        plain = torch.sigmoid(model(t)).numpy()
        mirrored = torch.sigmoid(model(t.flip(3))).numpy()
    no_tta = Predictor(bundle, device="cpu", tta=False, batch_size=2)
    probs, scan_probs, emb = no_tta.predict_inputs(x)
    np.testing.assert_allclose(probs, plain, atol=1e-5)
    np.testing.assert_allclose(scan_probs, plain.max(0), atol=1e-5)
    assert emb.shape == (5, 512)
    # A two-member ensemble of the same model must give the same numbers.
    bundle.members.append(bundle.members[0])
    tta = Predictor(bundle, device="cpu", tta=True, batch_size=3)
    np.testing.assert_allclose(tta.predict_inputs(x)[0], (plain + mirrored) / 2, atol=1e-5)


def test_study_model_gives_slice_and_scan_probabilities(
    study_bundle: Path, synth_dicom: Path
) -> None:
    predictor = Predictor(study_bundle, device="cpu")
    assert predictor.backend.has_study
    scan = load(_first_series(synth_dicom))
    pred = predictor.predict_scan(scan)
    _, x = predictor.prepare(scan)
    bundle = load_bundle(study_bundle)
    with torch.no_grad():
        emb = bundle.members[0].embed(torch.from_numpy(x))
        slice_logits, scan_logits = bundle.study(emb[None])
    np.testing.assert_allclose(pred.slice_probs, torch.sigmoid(slice_logits[0]), atol=1e-5)
    np.testing.assert_allclose(pred.scan_probs, torch.sigmoid(scan_logits[0]), atol=1e-5)
    assert pred.study_model and pred.to_dict()["scan_level"] == "study model"


def test_thin_series_is_resliced_to_what_the_model_was_trained_on(
    trained_bundle: Path, tmp_path: Path
) -> None:
    """The bundle records its training scans' 5 mm slice spacing; a 1.25 mm series is read
    as 5 mm slabs unless told otherwise."""
    assert load_bundle(trained_bundle).input["slice_thickness_mm"] == 5.0
    phantom = make_phantom((16, 64, 64), (1.25, 3.6, 3.6), seed=2, findings=[])
    folder = tmp_path / "thin"
    write_ct_series(phantom.hu, folder, pixel_spacing=(3.6, 3.6), slice_spacing=1.25)
    native = Predictor(trained_bundle, device="cpu", reslice_mm=None).predict_scan(load(folder))
    assert native.n_slices == 16 and native.resliced_mm is None
    thick = Predictor(trained_bundle, device="cpu").predict_scan(load(folder))
    assert thick.n_slices == 4 and thick.resliced_mm == 5.0
    assert thick.slice_ids == ["slab-000", "slab-001", "slab-002", "slab-003"]
    two = Predictor(trained_bundle, device="cpu", reslice_mm=2.5).predict_scan(load(folder))
    assert two.n_slices == 8 and two.resliced_mm == 2.5


def test_predict_reslices_thin_series_when_told(
    trained_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`predict --reslice MM` reads a thin series as MM slabs whatever the bundle records
    (5 mm here), `none` slice by slice; nonsense thicknesses and Kaggle rows (which must
    name the challenge's own slices) are refused in one line."""
    from ichscan.cli import main

    phantom = make_phantom((16, 64, 64), (1.25, 3.6, 3.6), seed=2, findings=[])
    folder = tmp_path / "thin"
    write_ct_series(phantom.hu, folder, pixel_spacing=(3.6, 3.6), slice_spacing=1.25)
    common = ["predict", str(folder), "--model", str(trained_bundle), "--device", "cpu"]
    for reslice, slices, mm in (("2.5", 8, 2.5), ("bundle", 4, 5.0), ("none", 16, None)):
        out = tmp_path / f"{reslice}.json"
        assert main([*common, "--out", str(out), "--reslice", reslice]) == 0
        [scan] = json.loads(out.read_text())["scans"]
        assert (scan["n_slices"], scan["resliced_mm"]) == (slices, mm)
    assert main([*common, "--out", str(tmp_path / "z.json"), "--reslice", "0"]) != 0
    assert "--reslice must be above 0 mm" in capsys.readouterr().err
    kaggle = [*common, "--out", str(tmp_path / "k.csv"), "--format", "kaggle", "--reslice", "5"]
    assert main(kaggle) != 0
    assert "--reslice with --format kaggle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x.json"), "--reslice", "thin"])


# -- inputs of every kind -------------------------------------------------------------


def test_each_series_in_a_folder_becomes_a_scan(predictor: Predictor, tmp_path: Path) -> None:
    phantom = make_phantom((6, 64, 64), (5.0, 3.6, 3.6), seed=5, findings=["epidural"])
    study = "1.2.826.0.1.3680043.8.498.1"
    write_ct_series(phantom.hu, tmp_path / "p" / "a", study_uid=study, series_uid=study + ".1")
    write_ct_series(phantom.hu[1:5], tmp_path / "p" / "b", study_uid=study, series_uid=study + ".2")
    preds = list(predict_paths([tmp_path / "p"], predictor, on_error="raise"))
    assert sorted((p.scan, p.n_slices) for p in preds) == [(study + ".1", 6), (study + ".2", 4)]
    assert {Path(p.source).name for p in preds} == {"a", "b"}


def test_zip_nifti_png_and_single_file_inputs(
    png_bundle: Path, synth_dicom: Path, tmp_path: Path, png_file: Path
) -> None:
    predictor = Predictor(png_bundle, device="cpu")
    series = _first_series(synth_dicom)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"x/{f.name}")
    nifti = write_nifti(load(series), tmp_path / "vol.nii.gz")
    one_file = sorted(series.iterdir())[0]
    preds = list(predict_paths([archive, nifti, png_file, one_file], predictor, on_error="raise"))
    assert [(p.kind, p.n_slices) for p in preds] == [
        ("dicom", 8),
        ("nifti", 8),
        ("image", 1),
        ("dicom", 1),
    ]
    # The same pixels by three routes give the same probabilities.
    np.testing.assert_allclose(preds[0].slice_probs, preds[1].slice_probs, atol=1e-5)
    k = preds[0].slice_ids.index(one_file.stem)
    np.testing.assert_allclose(preds[3].slice_probs[0], preds[0].slice_probs[k], atol=1e-5)


def test_a_folder_mixes_images_and_volumes_and_skips_label_maps(
    png_bundle: Path, synth_dicom: Path, tmp_path: Path, png_file: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    nifti = write_nifti(load(_first_series(synth_dicom)), folder / "vol.nii.gz")
    (folder / "vol_mask.nii.gz").write_bytes(nifti.read_bytes())
    (folder / "slice.png").write_bytes(png_file.read_bytes())
    (folder / "notes.txt").write_text("not a scan")
    predictor = Predictor(png_bundle, device="cpu")
    preds = list(predict_paths([folder], predictor, on_error="raise"))
    assert sorted((p.kind, p.scan) for p in preds) == [("image", "slice"), ("nifti", "vol")]


# -- outputs --------------------------------------------------------------------------


def test_csv_outputs_have_exact_columns(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds.csv"
    code = run_predict([synth_dicom], trained_bundle, out, device="cpu", progress=False)
    assert code == 0
    columns, rows = _read_csv(out)
    assert columns == SLICE_COLUMNS
    assert len(rows) == 6 * 8
    assert scans_csv_path(out) == tmp_path / "preds.scans.csv"
    scan_columns, scans = _read_csv(tmp_path / "preds.scans.csv")
    assert scan_columns == SCAN_COLUMNS
    assert len(scans) == 6 and {s["n_slices"] for s in scans} == {"8"}
    # Each scan names where it was read from: its series folder under the input.
    assert all(Path(s["source"]).is_relative_to(synth_dicom) for s in scans)
    assert len({s["source"] for s in scans}) == 6
    bundle = load_bundle(trained_bundle)
    for row in rows:
        for label in RSNA:
            p = float(row[label])
            assert 0 <= p <= 1
            threshold = bundle.thresholds[label]
            if abs(p - threshold) > 1e-5:  # the CSV rounds; a tie at the threshold may flip
                assert row[f"{label}_positive"] == str(int(p >= threshold))
    # A scan's probability is its slices' maximum (no study model here).
    first = scans[0]
    slices = [r for r in rows if r["scan"] == first["scan"]]
    assert [r["slice_index"] for r in slices] == [str(k) for k in range(8)]
    assert float(first["any"]) == max(float(r["any"]) for r in slices)


def test_images_only_write_no_scan_table(png_bundle: Path, png_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    assert run_predict([png_file], png_bundle, out, device="cpu", progress=False) == 0
    columns, rows = _read_csv(out)
    assert columns == SLICE_COLUMNS and [r["id"] for r in rows] == ["slice"]
    assert not (tmp_path / "preds.scans.csv").exists()


def test_scan_decisions_use_the_thresholds_training_chose_for_the_scan_score(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path
) -> None:
    """A slice threshold applied to the max over a scan's slices calls far more scans
    positive than it was tuned for: training chooses thresholds for the scan score on its
    validation scans, and the scan's "positive" is decided at those; slices keep theirs."""
    config = json.loads((trained_bundle / "bundle.json").read_text())
    assert set(config["scan_thresholds"]) == set(RSNA)  # the validation scans are series
    assert "validation fold's scans" in config["scan_threshold_method"]
    copy = tmp_path / "bundle"
    copy.mkdir()
    for path in trained_bundle.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    scan = load(_first_series(synth_dicom))
    for value, expected in ((1.01, False), (0.0, True)):
        config["scan_thresholds"] = {name: value for name in RSNA}
        (copy / "bundle.json").write_text(json.dumps(config))
        predictor = Predictor(copy, "cpu")
        pred = predictor.predict_scan(scan)
        assert (pred.scan_positive == expected).all()
        np.testing.assert_array_equal(pred.slice_positive, pred.slice_probs >= pred.thresholds)
    out = tmp_path / "preds.json"
    assert run_predict([_first_series(synth_dicom)], copy, out, device="cpu", progress=False) == 0
    doc = json.loads(out.read_text())
    assert doc["scan_thresholds"] == {name: 0.0 for name in RSNA}
    assert doc["thresholds"] == {name: config["thresholds"][name] for name in RSNA}


def _study_copy(study_bundle: Path, dst: Path, **study: object) -> Path:
    """The study bundle with these keys in its study_model, and slice-model scan thresholds
    (of the max over slices) that a study model's scans must never be decided at."""
    dst.mkdir()
    for path in study_bundle.iterdir():
        if path.is_file():
            (dst / path.name).write_bytes(path.read_bytes())
    config = json.loads((dst / "bundle.json").read_text())
    config["scan_thresholds"] = {name: 0.0 for name in RSNA}
    config["study_model"].update(study)
    (dst / "bundle.json").write_text(json.dumps(config))
    return dst


def test_a_study_model_decides_scans_at_its_own_scan_thresholds(
    study_bundle: Path, synth_dicom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The scan head is an output of its own: its scans are decided at the thresholds
    train-study chose on it, in every output (and the server and receiver, which read
    Predictor.scan_thresholds); its slices at its slice thresholds."""
    slice_t = {name: 0.0 for name in RSNA}
    scan_t = {name: 1.01 for name in RSNA}
    copy = _study_copy(study_bundle, tmp_path / "m", thresholds=slice_t, scan_thresholds=scan_t)
    predictor = Predictor(copy, "cpu")
    assert predictor.scan_thresholds_tuned and predictor.scan_thresholds_note is None
    np.testing.assert_array_equal(predictor.scan_thresholds, [1.01] * len(RSNA))
    pred = predictor.predict_scan(load(_first_series(synth_dicom)))
    assert pred.slice_positive.all() and not pred.scan_positive.any()
    series = [_first_series(synth_dicom)]
    assert run_predict(series, copy, tmp_path / "p.json", device="cpu", progress=False) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["scan_thresholds"] == scan_t and doc["thresholds"] == slice_t
    assert not any(doc["scans"][0]["positive"].values())
    assert "scan_thresholds_note" not in doc
    assert run_predict(series, copy, tmp_path / "p.csv", device="cpu", progress=True) == 0
    _, rows = _read_csv(scans_csv_path(tmp_path / "p.csv"))
    assert [rows[0][f"{n}_positive"] for n in RSNA] == ["0"] * len(RSNA)
    assert "note:" not in capsys.readouterr().err


def test_the_thresholds_in_use_say_how_they_were_chosen(
    study_bundle: Path, trained_bundle: Path, tmp_path: Path
) -> None:
    """A study model decides at thresholds it chose its own way: the report and /api/model
    name that method, not the slice model's (which served only without the study model)."""
    from ichscan.serve.model import model_info

    method = "youden on the study model's validation scans"
    copy = _study_copy(study_bundle, tmp_path / "m", thresholds={n: 0.3 for n in RSNA})
    config = json.loads((copy / "bundle.json").read_text())
    config["threshold_method"] = "youden on the validation fold"
    config["study_model"]["threshold_method"] = method
    (copy / "bundle.json").write_text(json.dumps(config))
    predictor = Predictor(copy, "cpu")
    assert predictor.threshold_method == model_info(predictor)["threshold_method"] == method
    assert predictor.thresholds_chosen_on == "scans"  # what the evaluate report says
    slice_model = Predictor(trained_bundle, "cpu")
    recorded = json.loads((trained_bundle / "bundle.json").read_text())["threshold_method"]
    assert slice_model.threshold_method == model_info(slice_model)["threshold_method"] == recorded
    assert slice_model.thresholds_chosen_on == "slices"


def test_an_older_study_bundle_decides_scans_at_its_slice_thresholds_and_says_so(
    study_bundle: Path, synth_dicom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study model trained before train-study chose scan thresholds: its scans are decided
    as they were (at its slice thresholds, never at the slice model's max-over-slices
    ones), and predict says so in one line and in the JSON."""
    slice_t = {name: 0.25 for name in RSNA}
    copy = _study_copy(study_bundle, tmp_path / "m", thresholds=slice_t)
    predictor = Predictor(copy, "cpu")
    assert not predictor.scan_thresholds_tuned
    np.testing.assert_array_equal(predictor.scan_thresholds, [0.25] * len(RSNA))
    assert "predates its own scan thresholds" in (predictor.scan_thresholds_note or "")
    series = [_first_series(synth_dicom)]
    assert run_predict(series, copy, tmp_path / "p.json", device="cpu", progress=True) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["scan_thresholds"] == slice_t
    assert "predates its own scan thresholds" in doc["scan_thresholds_note"]
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "run `ichscan train-study` again" in notes[0]


def test_json_output_holds_scans_slices_and_errors(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds.json"
    missing = tmp_path / "missing"
    errors = io.StringIO()
    code = run_predict(
        [_first_series(synth_dicom), missing],
        trained_bundle,
        out,
        device="cpu",
        progress=False,
        errors=errors,
    )
    assert code == 1
    doc = json.loads(out.read_text())
    assert doc["labels"] == RSNA and set(doc["thresholds"]) == set(RSNA)
    assert "not a medical device" in doc["research_use_only"]
    assert doc["trained_on"].startswith("SYNTHETIC phantoms at ")
    [scan] = doc["scans"]
    assert scan["n_slices"] == 8 and len(scan["slices"]) == 8
    assert set(scan["probabilities"]) == set(RSNA) and set(scan["positive"]) == set(RSNA)
    assert scan["scan_level"] == "max over slices"
    assert doc["errors"] == [
        {
            "path": str(missing),
            "problem": "no such file or folder",
            "message": f"{missing}: no such file or folder",
        }
    ]


def test_kaggle_submission_names_every_image_and_label(
    trained_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "rsna"
    write_synthetic(root, n_scans=1, seed=1, layout="rsna", shape=(6, 64, 64))
    out = tmp_path / "submission.csv"
    code = run_predict(
        [root / "stage_2_train"], trained_bundle, out, device="cpu", fmt="kaggle", progress=False
    )
    assert code == 0
    columns, rows = _read_csv(out)
    assert columns == ["ID", "Label"]
    _, truth = _read_csv(root / "stage_2_train.csv")
    assert sorted(r["ID"] for r in rows) == sorted(r["ID"] for r in truth)
    assert all(0 <= float(r["Label"]) <= 1 for r in rows)


def test_kaggle_format_needs_an_rsna_model(trained_bundle: Path, tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.mkdir()
    config = json.loads((trained_bundle / "bundle.json").read_text())
    config.update(label_set="binary", labels=["hemorrhage"])
    (binary / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(PredictError, match=r"RSNA 2019 submission.*binary"):
        run_predict([tmp_path], binary, tmp_path / "s.csv", fmt="kaggle", progress=False)


def test_bad_inputs_are_listed_and_the_rest_predicted(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path, png_file: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = _first_series(synth_dicom)
    for f in sorted(good.iterdir()):
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "broken.dcm").write_bytes(b"\x00" * 200)
    errors = io.StringIO()
    out = tmp_path / "preds.csv"
    code = run_predict(
        [junk, tmp_path / "nowhere", png_file, mixed],
        trained_bundle,
        out,
        device="cpu",
        progress=False,
        errors=errors,
    )
    assert code == 1
    lines = errors.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"{junk}: ")
    assert lines[1] == f"{tmp_path / 'nowhere'}: no such file or folder"
    assert lines[2].startswith(f"{png_file}: this image is already windowed")
    assert lines[3].startswith(f"{mixed / 'broken.dcm'}: ")
    _, rows = _read_csv(out)
    assert len(rows) == 8  # the good series in `mixed`, all of it


def test_nothing_predicted_is_exit_code_2(trained_bundle: Path, tmp_path: Path) -> None:
    errors = io.StringIO()
    code = run_predict(
        [tmp_path / "nope"], trained_bundle, tmp_path / "p.csv", progress=False, errors=errors
    )
    assert code == 2 and "no such file or folder" in errors.getvalue()


def test_predict_paths_yields_errors_in_place(predictor: Predictor, tmp_path: Path) -> None:
    items = list(predict_paths([tmp_path / "a", tmp_path / "b"], predictor))
    assert [i[0] for i in items] == [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(InputError):
        list(predict_paths([tmp_path / "a"], predictor, on_error="raise"))
    assert not any(isinstance(i, ScanPrediction) for i in items)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("name", ["pipe.png", "pipe.nii", "pipe.dcm"])
def test_a_named_pipe_input_is_refused_not_read(tmp_path: Path, name: str) -> None:
    """Opening a FIFO blocks until someone writes to it: the input is refused unread."""
    pipe = tmp_path / name
    os.mkfifo(pipe)
    [(path, error)] = list(iter_scans(pipe))
    assert path == str(pipe) and "not a regular file" in error.problem
    with pytest.raises(InputError, match="not a regular file"):
        load(pipe)


def test_out_of_memory_on_one_input_is_that_input_s_error(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume within every cap can still be too large for the machine: it is named, and
    the rest of the batch is predicted."""
    from ichscan.infer import predictor as module

    volume = tmp_path / "big.nii.gz"
    write_nifti(load(_first_series(synth_dicom)), volume)

    def no_memory(path: Path) -> None:
        raise MemoryError

    monkeypatch.setattr(module, "read_nifti", no_memory)
    predictor = Predictor(trained_bundle, device="cpu")
    items = list(predict_paths([volume, _first_series(synth_dicom)], predictor))
    assert items[0] == (str(volume), items[0][1]) and "not enough memory" in items[0][1].problem
    assert isinstance(items[1], ScanPrediction)


def test_two_patients_sharing_a_series_uid_are_two_scans_told_apart(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    """Each is predicted under a key that names its patient, and the mix-up is reported
    (predict exits 1 on it) rather than passed over."""
    for patient, z in (("PA", 0.0), ("PB", 500.0)):
        write_ct_series(
            phantom_volume, tmp_path, patient_id=patient, series_uid="1.2.3.4", origin=(0, 0, z)
        )
    items = list(iter_scans(tmp_path, workers=1))
    scans = [i for i in items if isinstance(i, Scan)]
    problems = [i[1].problem for i in items if not isinstance(i, Scan)]
    assert sorted(s.patient_id for s in scans) == ["PA", "PB"]
    assert sorted(scan_name(s) for s in scans) == sorted(
        f"1.2.3.4 [patient {s.patient_id}; study {s.study_uid}]" for s in scans
    )
    assert len(problems) == 2 and all("also names another patient" in p for p in problems)
