"""The command line as a user drives it: output, files written, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ichscan.cli import main
from ichscan.io.dicom_write import write_ct_series


@pytest.fixture
def series_dir(tmp_path: Path, phantom_volume: np.ndarray) -> Path:
    out = tmp_path / "series"
    write_ct_series(
        phantom_volume,
        out,
        pixel_spacing=(3.6, 3.6),
        slice_spacing=5.0,
        tilt_deg=12.0,
        compression="rle",
    )
    return out


def test_info_json_keys(series_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(series_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (series,) = report["series"]
    for key in (
        "series_uid",
        "n_slices",
        "slice_thickness_mm",
        "slice_spacing_mm",
        "gantry_tilt_deg",
        "transfer_syntax",
        "selected",
        "problems",
    ):
        assert key in series
    assert series["n_slices"] == 12
    assert series["slice_spacing_mm"] == pytest.approx(5.0)
    assert series["gantry_tilt_deg"] == pytest.approx(12.0, abs=0.05)
    assert series["transfer_syntax"] == "RLE Lossless"
    assert series["selected"] is True
    assert report["bad_files"] == []


def test_info_table(series_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(series_dir)]) == 0
    out = capsys.readouterr().out
    assert "RLE Lossless" in out and "selected" in out


def test_info_real_rsna(rsna_dicom_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(rsna_dicom_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["series"]) == 5
    assert {s["n_slices"] for s in report["series"]} == {1}
    assert any(s["gantry_tilt_deg"] > 10 for s in report["series"])  # tilted RSNA slices


def test_info_with_bad_files_lists_them_and_exits_1(
    series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (series_dir / "broken").write_bytes(b"\x00" * 10)
    assert main(["info", str(series_dir)]) == 1
    captured = capsys.readouterr()
    assert "broken" in captured.err and "not a DICOM file" in captured.err
    assert "12" in captured.out  # the good series is still described


def test_convert_reslices_to_nifti(series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "scan.nii.gz"
    assert main(["convert", str(series_dir), str(out), "--thickness", "10"]) == 0
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16
    assert img.header.get_zooms()[2] == pytest.approx(10.0, abs=1e-3)
    assert img.shape[2] in (6, 7)


def test_convert_without_reslice(series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "scan.nii"
    assert main(["convert", str(series_dir), str(out)]) == 0
    assert nib.load(out).shape == (64, 64, 12)


def test_convert_of_a_folder_of_two_patients_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One patient's scan is written, and the mix-up is a problem the exit code carries."""
    volume = np.full((3, 16, 16), 40, dtype=np.int16)
    for patient in ("PA", "PB"):
        write_ct_series(volume, tmp_path / "in" / patient, patient_id=patient)
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "o.nii.gz")]) == 1
    assert "of 2 patients" in capsys.readouterr().err
    assert (tmp_path / "o.nii.gz").exists()


def test_convert_into_an_existing_folder_writes_inside_it(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    assert main(["convert", str(series_dir), str(folder)]) == 0
    written = folder / "series.nii.gz"
    assert nib.load(written).shape == (64, 64, 12)
    assert not (tmp_path / "out.nii").exists()
    assert capsys.readouterr().out.startswith(f"wrote {written} ")


@pytest.mark.parametrize("name", ["scan", "scan.img", "scan.png"])
def test_convert_refuses_an_output_that_is_not_nifti(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main(["convert", str(series_dir), str(tmp_path / name)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert name in line and ".nii or .nii.gz" in line
    assert not list(tmp_path.glob("scan*"))


@pytest.mark.parametrize("slices", ["0", "-3", "many"])
def test_preview_slices_must_be_a_positive_count(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], slices: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["preview", str(series_dir), "--out", str(tmp_path / "p.png"), "--slices", slices])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--slices" in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["info", ""],
        ["convert", "", "o.nii"],
        ["convert", "x.dcm", ""],
        ["preview", "", "--out", "p.png"],
        ["predict", "", "--model", "m", "--out", "o.csv"],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.dcm").write_bytes(b"not dicom")  # what a scan of "." would find
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "empty path" in err and "bad.dcm" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "OUT", "--scans", "0"],
        ["synth", "OUT", "--thickness", "0"],
        ["convert", "SERIES", "OUT/o.nii.gz", "--thickness", "0"],
        ["convert", "SERIES", "OUT/o.nii.gz", "--thickness", "-1"],
    ],
)
def test_nonsense_numbers_are_refused_by_the_parser(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    argv = [a.replace("SERIES", str(series_dir)).replace("OUT", str(tmp_path / "o")) for a in argv]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and "Traceback" not in err


def test_file_system_refusals_are_one_line(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """synth into a folder that holds data, an output under a file: no traceback."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "README.txt").write_text("someone's data")
    assert main(["synth", str(tmp_path / "taken")]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["preview", str(series_dir), "--out", str(tmp_path / "file" / "p.png")]) == 2
    assert main(["preview", str(series_dir), "--out", str(tmp_path / "noext")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if not line.startswith("warning: ")]  # the series' own
    assert len(err) == 3 and all(line.startswith("ichscan ") for line in err), "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    assert str(tmp_path / "taken") in err[0] and "name it .png" in err[2]


def test_preview_montage(series_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    assert (
        main(
            [
                "preview",
                str(series_dir),
                "--out",
                str(out),
                "--windows",
                "brain,bone",
                "--slices",
                "4",
            ]
        )
        == 0
    )
    img = Image.open(out)
    assert img.size == (4 * 192, 2 * 192)
    assert np.asarray(img).std() > 10  # not blank


def test_preview_png_slice(head_ct_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    assert main(["preview", str(head_ct_dir / "images" / "000.png"), "--out", str(out)]) == 0
    assert Image.open(out).size == (192, 192)


def test_preview_unknown_window(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["preview", str(series_dir), "--out", str(tmp_path / "x.png"), "--windows", "lung"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lung" in err[0]


@pytest.mark.parametrize("verb", ["info", "convert", "preview"])
def test_errors_are_one_line_with_exit_2(tmp_path: Path, verb: str) -> None:
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(b"\x00" * 50)
    args = {
        "info": [str(bad)],
        "convert": [str(bad), str(tmp_path / "o.nii")],
        "preview": [str(bad), "--out", str(tmp_path / "o.png")],
    }[verb]
    proc = subprocess.run(
        [sys.executable, "-m", "ichscan.cli", verb, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "truncated.dcm" in lines[0] and "Traceback" not in proc.stderr


def test_empty_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "no DICOM files found" in capsys.readouterr().err


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "ichscan"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for verb in ("info", "convert", "preview", "synth", "demo"):
        assert verb in proc.stdout
    assert "not a medical device" in " ".join(proc.stdout.split())


def test_prepare_real_png_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import shared
    from ichscan.data.cache import PreparedCache

    out = tmp_path / "cache"
    assert (
        main(
            [
                "prepare",
                str(shared("rsna_png")),
                "--out",
                str(out),
                "--size",
                "64",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    cache = PreparedCache(out)
    assert len(cache) == 100 and cache.channels == 1
    assert (cache.labels()[:, 0] == 1).sum() == 50
    assert set(cache.index["fold"]) == {0, 1, 2, 3, 4}
    assert (out / "manifest.parquet").exists()
    assert "prepared 100 slice(s)" in capsys.readouterr().out


def test_prepare_crop_brain_on_real_pngs(tmp_path: Path) -> None:
    from conftest import shared
    from ichscan.data.cache import PreparedCache

    out = tmp_path / "cache"
    args = ["prepare", str(shared("head_ct")), "--out", str(out), "--size", "64"]
    assert main([*args, "--crop", "brain", "--workers", "1"]) == 0
    cache = PreparedCache(out)
    assert cache.crop == "brain" and cache.size == 64
    # Cropped to the head: the corners of every slice are empty.
    corners = np.stack([np.asarray(cache[i])[[0, 0, -1, -1], [0, -1, 0, -1], 0] for i in range(20)])
    assert corners.max() == 0


def test_prepare_crop_needs_the_brain_window_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ichscan.data.synth import write_synthetic

    data = tmp_path / "dicom"
    write_synthetic(data, n_scans=1, shape=(4, 64, 64))
    args = ["prepare", str(data), "--out", str(tmp_path / "c"), "--windows", "bone,brain"]
    assert main([*args, "--crop", "head"]) == 2
    assert "list brain first" in capsys.readouterr().err


def test_prepare_lists_unreadable_files_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(root / "images" / f"{i}.png")
    (root / "images" / "5.png").write_bytes(b"not a png")
    (root / "labels.csv").write_text(
        "id,hemorrhage\n" + "".join(f"{i},{i % 2}\n" for i in range(6))
    )
    assert (
        main(
            [
                "prepare",
                str(root),
                "--out",
                str(tmp_path / "c"),
                "--size",
                "16",
                "--folds",
                "2",
                "--workers",
                "1",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "could not be read" in err
    assert f"bad file {root / 'images' / '5.png'}: " in err  # named on the console too


def test_prepare_lists_the_first_bad_files_and_counts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ichscan.cli import MAX_LISTED

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    n_bad = MAX_LISTED + 5
    for i in range(20 + n_bad):
        path = root / "images" / f"{i:03d}.png"
        if i < n_bad:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((16, 16), 5 * i, np.uint8)).save(path)
    (root / "labels.csv").write_text(
        "id,hemorrhage\n" + "".join(f"{i:03d},{i % 2}\n" for i in range(20 + n_bad))
    )
    argv = ["prepare", str(root), "--out", str(tmp_path / "c"), "--size", "16", "--folds", "2"]
    assert main([*argv, "--workers", "1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if line.startswith("bad file ")]) == MAX_LISTED
    assert any("and 5 more" in line for line in lines), lines


def test_slices_of_one_file_failing_alike_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated volume fails on every slice; the console names it once, with the count,
    and the count of what is not shown stays right."""
    from ichscan.cli import MAX_LISTED, _list_bad

    vol = [{"path": "a.nii.gz", "reason": "cannot read NIfTI voxel data (EOF)"}] * 40
    others = [{"path": f"{i}.png", "reason": "not an image"} for i in range(MAX_LISTED + 2)]
    _list_bad([*vol, *others], 40 + MAX_LISTED + 2 + 7, "report.json")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "bad file a.nii.gz: cannot read NIfTI voxel data (EOF) (40 slices)"
    assert len([line for line in lines if line.startswith("bad file ")]) == MAX_LISTED
    # 3 listed files and 7 never recorded are not shown
    assert lines[-1] == "... and 10 more (all in report.json)"


def test_train_unknown_architecture_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ichscan.cli",
            "train",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
            "--arch",
            "resnet17",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "unknown architecture 'resnet17'" in proc.stderr


@pytest.mark.parametrize(
    ("flag", "head_reader"), [([], None), (["--head-reader"], True), (["--no-head-reader"], False)]
)
def test_train_head_reader_flags(flag: list[str], head_reader: bool | None) -> None:
    """No flag leaves the choice to the data (the head reader when it can be cut); each flag
    reaches the training configuration as asked."""
    from ichscan.cli import build_parser

    args = build_parser().parse_args(["train", "DATA", "--out", "MODEL", *flag])
    assert args.head_reader is head_reader


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "DATA", "--out", "M", "--accumulate", "0"],
        ["train", "DATA", "--out", "M", "--batch-size", "0"],
        ["train", "DATA", "--out", "M", "--epochs", "0"],
        ["train", "DATA", "--out", "M", "--epochs", "-2"],
        ["train", "DATA", "--out", "M", "--size", "0"],
        ["train-study", "MODEL", "--epochs", "0"],
        ["train-study", "MODEL", "--hidden", "0"],
    ],
)
def test_train_counts_must_be_positive(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--accumulate 0 and --batch-size 0 crashed with a traceback, --epochs 0 wrote an
    untrained bundle: the parser refuses each, naming the option."""
    from ichscan.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {argv[-2]}" in error and "not a positive count" in error


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained through the CLI on a synthetic DICOM cohort (seconds)."""
    from ichscan.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("cli_model")
    data = root / "cohort"
    write_synthetic(data, n_scans=9, seed=4, layout="dicom", shape=(8, 48, 48))
    model = root / "model"
    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(model),
                "--arch",
                "resnet18",
                "--pretrained",
                "none",
                "--size",
                "64",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--folds",
                "3",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    return data, model


def test_cli_predict_csv_and_scans_csv(cli_model: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = cli_model
    series = sorted(p for p in data.iterdir() if p.is_dir())[0]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(series), "--model", str(model), "--out", str(out)]) == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["scan", "id", "slice_index"] and "any_positive" in header
    assert (tmp_path / "preds.scans.csv").exists()


def test_caches_prepared_by_prepare_and_train_remember_their_phantoms(
    cli_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """`ichscan evaluate CACHE` is told the data were ichscan's phantoms, wherever the cache
    was written (its own path says nothing)."""
    from ichscan.data.cache import PreparedCache

    data, model = cli_model
    assert main(["prepare", str(data), "--out", str(tmp_path / "c"), "--size", "32"]) == 0
    assert PreparedCache(tmp_path / "c").facts["manifest"]["synthetic"] is True
    assert PreparedCache(model / "cache").facts["manifest"]["synthetic"] is True


def test_cli_evaluate_writes_report(cli_model: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = cli_model
    assert main(["evaluate", str(model), str(data), "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "slice" in json.dumps(metrics) and (tmp_path / "r" / "report.html").exists()


def test_cli_evaluate_names_bad_and_missing_files_and_exits_1(
    cli_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data, model = cli_model
    copy = tmp_path / "cohort"
    shutil.copytree(data, copy)
    files = sorted(copy.rglob("*.dcm"))
    cut, gone = files[3], files[10]
    cut.write_bytes(cut.read_bytes()[:-2000])  # header intact, pixel data truncated
    gone.unlink()
    capsys.readouterr()
    assert main(["evaluate", str(model), str(copy), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"{cut}: truncated pixel data" in err
    assert "no file" in err and "Traceback" not in err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["data"]["n_skipped_inputs"] == 2
    assert {e["path"] for e in metrics["data"]["skipped_inputs"]} >= {str(cut)}
    assert metrics["slice"]["labels"]  # the good slices are still evaluated


def test_cli_export_and_onnx_predict(cli_model: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = cli_model
    assert main(["export", str(model), "--onnx", str(tmp_path / "elsewhere.onnx")]) == 0
    assert (tmp_path / "elsewhere.onnx").exists()
    assert main(["export", str(model)]) == 0  # MODEL_DIR/model.onnx, where predict looks
    series = sorted(p for p in data.iterdir() if p.is_dir())[0]
    out = tmp_path / "p.json"
    assert (
        main(
            ["predict", str(series), "--model", str(model), "--out", str(out), "--backend", "onnx"]
        )
        == 0
    )
    assert json.loads(out.read_text())
    # The file `export --onnx` wrote elsewhere is used when named (and implies onnx).
    (model / "model.onnx").unlink()
    named = tmp_path / "named.json"
    argv = ["predict", str(series), "--model", str(model), "--out", str(named)]
    assert main([*argv, "--onnx", str(tmp_path / "elsewhere.onnx")]) == 0
    assert json.loads(named.read_text())["scans"] == json.loads(out.read_text())["scans"]


def test_cli_explain(
    cli_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = cli_model
    series = sorted(p for p in data.iterdir() if p.is_dir())[0]
    assert main(["explain", str(series), "--model", str(model), "--out", str(tmp_path / "x")]) == 0
    assert "model trained on SYNTHETIC phantoms" in capsys.readouterr().err  # as predict says
    assert (tmp_path / "x" / "montage.png").exists()
    assert (tmp_path / "x" / "heatmaps.npy").exists()


def test_cli_predict_missing_model_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ichscan.cli",
            "predict",
            str(tmp_path),
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "p.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope" in proc.stderr


# --- prepare and info: QA audit s18 -------------------------------------------------------


def _synth(root: Path, layout: str, scans: int = 2) -> Path:
    from ichscan.data.synth import write_synthetic

    write_synthetic(root, n_scans=scans, layout=layout, shape=(6, 32, 32), seed=3)
    return root


def _prepare(data: Path, out: Path, *more: str) -> int:
    argv = ["prepare", str(data), "--out", str(out), "--size", "16", "--folds", "2"]
    return main([*argv, "--workers", "1", *more])


def test_prepare_records_layout_label_level_and_slabs_in_cache_json(tmp_path: Path) -> None:
    from ichscan.data.cache import PreparedCache

    data = _synth(tmp_path / "cq", "cq500")
    assert _prepare(data, tmp_path / "c", "--middle", "4") == 0
    cache = PreparedCache(tmp_path / "c")
    facts = cache.facts["manifest"]
    assert (facts["layout"], facts["label_level"]) == ("cq500", "scan")
    assert cache.label_level == "scan"  # what train-study and evaluate decide by
    assert (facts["slab_mm"], facts["middle_slices"]) == (5.0, 4)
    assert len(cache) == 8 and cache.slice_spacing_mm == 5.0

    assert _prepare(data, tmp_path / "n", "--thickness", "native") == 0
    native = PreparedCache(tmp_path / "n")
    assert len(native) == 2 * 41 and native.facts["manifest"].get("slab_mm") is None


def test_prepare_thickness_must_be_millimetres_or_native(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["prepare", str(tmp_path), "--out", str(tmp_path / "c"), "--thickness", "thin"])
    assert "'thin' is not a thickness in mm or 'native'" in capsys.readouterr().err


def test_prepare_never_imports_torch(tmp_path: Path) -> None:
    """Preparing is NumPy work: torch (0.5 GB resident, 2 s) has no business in it."""
    data = _synth(tmp_path / "rsna", "rsna")
    code = (
        "import sys; from ichscan.cli import main; "
        f"rc = main(['prepare', {str(data)!r}, '--out', {str(tmp_path / 'c')!r}, "
        "'--size', '16', '--folds', '2', '--workers', '1']); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no torch")


def test_the_old_skipped_inputs_import_still_works() -> None:
    from ichscan.data.skipped import NO_FILE, skipped_inputs
    from ichscan.evaluate.report import NO_FILE as OLD_NO_FILE
    from ichscan.evaluate.report import skipped_inputs as old

    assert old is skipped_inputs and OLD_NO_FILE == NO_FILE


def _subcommand(name: str) -> argparse.ArgumentParser:
    from ichscan.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["prepare", "train", "train-study"])
def test_help_gives_every_option_a_help_with_its_default(command: str) -> None:
    for action in _subcommand(command)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        if action.default not in (None, False):
            assert "default" in action.help, f"{action.option_strings[0]} hides its default"


def test_train_help_groups_exactly_the_options_the_small_set_recipe_refuses() -> None:
    """The help's fine-tuning group and the options the small-set recipe refuses are one
    list (--arch aside: naming a backbone chooses fine-tuning, so it stays on top)."""
    from ichscan.train.data import FINETUNE_ONLY

    group = next(
        g for g in _subcommand("train")._action_groups if g.title.startswith("fine-tuning")
    )
    grouped = {a.option_strings[0] for a in group._group_actions}
    assert grouped == set(FINETUNE_ONLY.values()) - {"--arch"}


def test_prepare_reads_nifti_masks_unless_told_not_to(tmp_path: Path) -> None:
    from ichscan.data.cache import PreparedCache

    data = _synth(tmp_path / "nii", "nifti")
    assert _prepare(data, tmp_path / "m") == 0
    assert PreparedCache(tmp_path / "m").label_level == "slice"
    assert _prepare(data, tmp_path / "s", "--no-masks") == 0
    assert PreparedCache(tmp_path / "s").label_level == "scan"


def test_prepare_images_says_the_other_windows_cannot_be_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ichscan.data.cache import PreparedCache

    data = _synth(tmp_path / "png", "png")
    assert _prepare(data, tmp_path / "c", "--windows", "brain,subdural,bone") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "window" in line]
    assert len(lines) == 1
    assert "one window (brain)" in lines[0] and str(data) in lines[0]
    assert "subdural, bone cannot be made" in lines[0]
    assert PreparedCache(tmp_path / "c").facts["windows"][0]["name"] == "brain"


def test_info_on_a_folder_of_nifti_says_what_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _synth(tmp_path / "nii", "nifti")
    assert main(["info", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "4 NIfTI" in err and "ichscan prepare" in err


@pytest.mark.parametrize(
    ("windows", "source_window", "noted"),
    [
        ([], "brain", "subdural, bone"),  # the default windows, asked of PNG slices
        (["--windows", "brain,bone"], "brain", "bone"),
        (["--windows", "brain"], "brain", None),
        ([], None, None),  # DICOM: every window is made from the HU
    ],
)
def test_train_says_which_windows_display_images_cannot_give(
    windows: list[str],
    source_window: str | None,
    noted: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A PNG/JPEG set holds one display window: a model trained on it reads that one, and
    the user who asked for others (the default asks for three) hears it in one line."""
    import ichscan.train.loop as loop

    summary = {"data_summary": {"source_window": source_window} if source_window else {}}
    monkeypatch.setattr(loop, "train", lambda config: {"training": summary, "metrics": {}})
    assert main(["train", "DATA", "--out", "M", *windows]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    if noted is None:
        assert err == []
    else:
        assert len(err) == 1
        assert err[0].startswith("note: DATA: the PNG/JPEG slices hold one window (brain); ")
        assert f"{noted} cannot be made from them, so the model reads brain only" in err[0]
