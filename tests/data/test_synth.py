"""write_synthetic writes real files in each public dataset's layout, with truth beside them
that matches what is in the files. Small volumes keep this quick; the data are synthetic."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

import ichscan
from conftest import shared
from ichscan.data.phantom import FINDINGS, LABELS, SUBTYPES, label_mask, make_phantom
from ichscan.data.synth import (
    CQ500_READS_HEADER,
    LABELS_HEADER,
    SLICE_TRUTH_HEADER,
    TRUTH_HEADER,
    _cq500_reads,
    representative_slice,
    write_synthetic,
)
from ichscan.io.nifti import read_nifti

SHAPE = (8, 64, 64)
SPACING = (5.0, 230.0 / 64, 230.0 / 64)
POSITIVE = ["subdural", "intraventricular", "chronic", "fracture", "midline_shift"]


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _header(path: Path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


def _dcmread(path: Path) -> pydicom.Dataset:
    # The RSNA layout's ID_ "UIDs" are invalid on purpose; pydicom says so on every read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pydicom.dcmread(path)


def _phantom(truth_row: dict[str, str], shape: tuple[int, int, int] = SHAPE):
    present = [name for name in FINDINGS if truth_row[name] == "1"]
    return make_phantom(shape, SPACING, seed=int(truth_row["seed"]), findings=present)


def test_dicom_layout(tmp_path: Path) -> None:
    out = tmp_path / "dicom"
    paths = write_synthetic(out, n_scans=2, seed=1, layout="dicom", shape=SHAPE)
    assert len(paths) == 2 and all(p.is_dir() and p.parent.parent == out for p in paths)
    assert (out / "README.txt").read_text().startswith("SYNTHETIC")
    header, truth = _rows(out / "truth.csv")
    assert tuple(header) == TRUTH_HEADER
    slice_header, slices = _rows(out / "slice_truth.csv")
    assert tuple(slice_header) == SLICE_TRUTH_HEADER
    assert len(slices) == 2 * SHAPE[0]
    for path, row in zip(paths, truth, strict=True):
        assert (out / row["path"]) == path
        scan = ichscan.load(path)
        assert scan.n_slices == SHAPE[0] and scan.shape == SHAPE
        assert scan.study_uid == row["study_uid"] and scan.series_uid == row["series_uid"]
        assert scan.spacing == pytest.approx(SPACING)
        # The files hold the phantom the truth row names, slice for slice.
        np.testing.assert_array_equal(scan.hu, _phantom(row).hu)
        mine = [r for r in slices if r["scan"] == row["scan"]]
        assert [r["sop_uid"] for r in mine] == scan.slice_ids
        assert [int(r["slice_index"]) for r in mine] == list(range(SHAPE[0]))
        ds = pydicom.dcmread(next(path.iterdir()))
        assert ds.Modality == "CT" and ds.Manufacturer == "ichscan-synthetic"


def test_dicom_tilt_and_compression_reach_the_files(tmp_path: Path) -> None:
    out = tmp_path / "dicom"
    [path] = write_synthetic(
        out, layout="dicom", shape=SHAPE, tilt_deg=12.0, compression="rle", findings=["epidural"]
    )
    ds = pydicom.dcmread(next(path.iterdir()))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert float(ds.GantryDetectorTilt) == pytest.approx(12.0)
    scan = ichscan.load(path)
    assert scan.shear_deg == pytest.approx(12.0, abs=0.01)
    _, [row] = _rows(out / "truth.csv")
    assert row["epidural"] == "1" and row["any"] == "1"


def test_slice_truth_matches_the_phantom(tmp_path: Path) -> None:
    out = tmp_path / "dicom"
    write_synthetic(out, layout="dicom", shape=SHAPE, seed=3, findings=POSITIVE)
    _, [row] = _rows(out / "truth.csv")
    _, slices = _rows(out / "slice_truth.csv")
    phantom = _phantom(row)
    for name in ("any", *SUBTYPES):
        expected = label_mask(phantom, name).reshape(SHAPE[0], -1).any(axis=1)
        got = np.array([r[name] == "1" for r in slices])
        # A labelled slice holds that bleed; the chronic collection reads as subdural.
        assert not (got & ~expected).any(), name
        assert got.any() == expected.any(), name
    assert row["chronic"] == row["subdural"] == row["mass_effect"] == "1"


def test_nifti_layout(tmp_path: Path) -> None:
    out = tmp_path / "nifti"
    paths = write_synthetic(out, n_scans=2, layout="nifti", shape=SHAPE, findings=POSITIVE)
    assert [p.name for p in paths] == ["synth-0000.nii.gz", "synth-0001.nii.gz"]
    assert _header(out / "labels.csv") == list(LABELS_HEADER)
    _, labels = _rows(out / "labels.csv")
    _, truth = _rows(out / "truth.csv")
    _, slices = _rows(out / "slice_truth.csv")
    assert len(slices) == 2 * SHAPE[0]
    for path, label_row, row in zip(paths, labels, truth, strict=True):
        phantom = _phantom(row)
        scan = read_nifti(path)
        np.testing.assert_array_equal(scan.hu, phantom.hu)
        assert scan.spacing == pytest.approx(SPACING)
        assert [r["sop_uid"] for r in slices if r["scan"] == row["scan"]] == scan.slice_ids
        volume = nib.load(str(path))
        mask_img = nib.load(str(out / f"{row['scan']}_mask.nii.gz"))
        assert mask_img.get_data_dtype() == np.uint8
        assert mask_img.shape == volume.shape
        np.testing.assert_allclose(mask_img.affine, volume.affine)
        # Back in [slice, row, col] order the label map lands on the phantom's masks.
        labels_zyx = np.asarray(mask_img.dataobj).transpose(2, 1, 0)
        for value, name in enumerate(SUBTYPES, start=1):
            np.testing.assert_array_equal(labels_zyx == value, label_mask(phantom, name))
        assert int(label_row["any"]) == 1 and int(label_row["subdural"]) == 1
        assert label_row["id"] == row["scan"]


def test_nifti_with_tilt_keeps_mask_and_volume_aligned(tmp_path: Path) -> None:
    out = tmp_path / "nifti"
    [path] = write_synthetic(out, layout="nifti", shape=SHAPE, tilt_deg=15.0, findings=POSITIVE)
    scan = read_nifti(path)
    assert scan.shear_deg == pytest.approx(15.0, abs=0.01)
    mask_img = nib.load(str(out / "synth-0000_mask.nii.gz"))
    np.testing.assert_allclose(mask_img.affine, nib.load(str(path)).affine)


def test_rsna_layout(tmp_path: Path) -> None:
    out = tmp_path / "rsna"
    paths = write_synthetic(out, n_scans=2, layout="rsna", shape=SHAPE, seed=4)
    images = sorted((out / "stage_2_train").iterdir())
    assert len(images) == 2 * SHAPE[0]
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}\.dcm", p.name) for p in images)
    assert all(p in images for p in paths)

    lines = (out / "stage_2_train.csv").read_text().splitlines()
    assert lines[0] == "ID,Label"
    body = [line.split(",") for line in lines[1:]]
    assert len(body) == len(LABELS) * len(images)
    ids = set()
    for k in range(0, len(body), len(LABELS)):
        block = body[k : k + len(LABELS)]
        image = block[0][0].rsplit("_", 1)[0]
        assert [row[0] for row in block] == [f"{image}_{name}" for name in LABELS]
        assert all(row[1] in ("0", "1") for row in block)
        labels = {name: row[1] == "1" for name, row in zip(LABELS, block, strict=True)}
        assert labels["any"] == any(labels[name] for name in SUBTYPES)
        ids.add(image)
    assert ids == {p.stem for p in images}

    studies: dict[str, list[pydicom.Dataset]] = {}
    for path in images:
        ds = _dcmread(path)
        assert ds.SOPInstanceUID == path.stem
        assert re.fullmatch(r"ID_[0-9a-f]{8}", ds.PatientID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.StudyInstanceUID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.SeriesInstanceUID)
        assert "SliceThickness" not in ds and "SOPClassUID" not in ds  # stripped, as RSNA's
        assert ds.file_meta.MediaStorageSOPInstanceUID.startswith("9999.")
        studies.setdefault(ds.StudyInstanceUID, []).append(ds)
    assert sorted(len(v) for v in studies.values()) == [SHAPE[0], SHAPE[0]]

    # Slice truth and the challenge CSV agree, and a study loads as one volume.
    _, slices = _rows(out / "slice_truth.csv")
    csv_labels = {row[0]: row[1] for row in body}
    for r in slices:
        for name in LABELS:
            assert csv_labels[f"{r['sop_uid']}_{name}"] == r[name]
    _, truth = _rows(out / "truth.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scan = ichscan.load(out / "stage_2_train", series_uid=truth[0]["series_uid"])
    np.testing.assert_array_equal(scan.hu, _phantom(truth[0]).hu)
    assert scan.slice_ids == [r["sop_uid"] for r in slices if r["scan"] == truth[0]["scan"]]


def test_rsna_layout_is_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic(a, layout="rsna", shape=SHAPE, seed=5)
    write_synthetic(b, layout="rsna", shape=SHAPE, seed=5)
    for name in ("stage_2_train.csv", "truth.csv", "slice_truth.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    assert sorted(p.name for p in (a / "stage_2_train").iterdir()) == sorted(
        p.name for p in (b / "stage_2_train").iterdir()
    )


def test_cq500_layout(tmp_path: Path) -> None:
    out = tmp_path / "cq500"
    paths = write_synthetic(out, n_scans=2, layout="cq500", shape=SHAPE, findings=POSITIVE)
    assert [p.name for p in paths] == ["CQ500CT0 CQ500CT0", "CQ500CT1 CQ500CT1"]
    study = paths[0] / "Unknown Study"
    series = sorted(p.name for p in study.iterdir())
    assert series == ["CT 5mm", "CT BONE THIN", "CT PLAIN THIN"]
    thin = sorted((study / "CT PLAIN THIN").iterdir())
    assert thin[0].name == "CT000000.dcm" and len(thin) == 57  # 35 mm at 0.625 mm
    assert len(list((study / "CT 5mm").iterdir())) == SHAPE[0]
    bone = pydicom.dcmread(study / "CT BONE THIN" / "CT000000.dcm")
    assert bone.ConvolutionKernel == "BONE" and bone.PatientID == "CQ500-CT-0"
    assert float(bone.SliceThickness) == pytest.approx(0.625)

    # ichscan picks the thin soft-tissue series, as the CQ500 work did.
    scan = ichscan.load(paths[0])
    assert scan.n_slices == 57 and scan.spacing[0] == pytest.approx(0.625)
    assert scan.shape[1:] == (SHAPE[1] // 2, SHAPE[2] // 2)

    assert _header(out / "reads.csv") == list(CQ500_READS_HEADER)
    _, reads = _rows(out / "reads.csv")
    assert [r["name"] for r in reads] == ["CQ500-CT-0", "CQ500-CT-1"]
    assert all(r["Category"] in ("B1", "B2") for r in reads)
    _, slices = _rows(out / "slice_truth.csv")
    assert len(slices) == 2 * (SHAPE[0] + 2 * 57)
    _, truth = _rows(out / "truth.csv")
    assert all(row["subdural"] == row["midline_shift"] == "1" for row in truth)


def test_cq500_reads_header_is_the_real_one(tmp_path: Path) -> None:
    real = shared("cq500") / "reads.csv"
    assert _header(real) == list(CQ500_READS_HEADER)


def test_cq500_readers_mostly_agree_with_the_truth() -> None:
    phantom = make_phantom(SHAPE, SPACING, seed=6, findings=POSITIVE)
    rng = np.random.default_rng(0)
    rows = [_cq500_reads("CQ500-CT-0", phantom, rng) for _ in range(200)]
    for reader in (1, 2, 3):
        calls = np.array([[row[f"R{reader}:{k}"] for k in ("SDH", "IVH", "ICH")] for row in rows])
        assert 0.8 < calls.mean() < 1.0  # misses happen, but rarely
        for row in rows:
            r = {k.split(":")[1]: v for k, v in row.items() if k.startswith(f"R{reader}:")}
            assert r["ICH"] == max(
                r[k] for k in ("IPH", "IVH", "SDH", "EDH", "SAH", "ChronicBleed")
            )
            assert r["Fracture"] == max(r["CalvarialFracture"], r["OtherFracture"])
            assert r["MassEffect"] >= r["MidlineShift"]
            assert r["OtherFracture"] == 0
    # Readers disagree on some scans.
    assert any(len({row[f"R{n}:SDH"] for n in (1, 2, 3)}) > 1 for row in rows)


def test_png_layout(tmp_path: Path) -> None:
    out = tmp_path / "png"
    paths = write_synthetic(out, n_scans=3, layout="png", shape=SHAPE, seed=2)
    assert _header(out / "labels.csv") == list(LABELS_HEADER)
    _, labels = _rows(out / "labels.csv")
    _, truth = _rows(out / "truth.csv")
    assert not (out / "slice_truth.csv").exists()
    for path, label_row, row in zip(paths, labels, truth, strict=True):
        assert path.parent == out / "images" and re.fullmatch(r"ID_[0-9a-f]{9}\.png", path.name)
        assert label_row["id"] == path.stem == row["scan"]
        img = Image.open(path)
        assert img.mode == "L" and img.size == (SHAPE[2], SHAPE[1])
        phantom = _phantom(row)
        k = representative_slice(phantom)
        expected = np.clip(np.rint((phantom.hu[k].astype(np.float32) - 0.0) / 80 * 255), 0, 255)
        np.testing.assert_array_equal(np.asarray(img), expected.astype(np.uint8))
        # A positive scan shows a positive slice.
        assert label_row["any"] == row["any"]


def test_refuses_a_folder_in_use_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_synthetic(tmp_path, shape=SHAPE)
    with pytest.raises(ValueError, match="layout"):
        write_synthetic(tmp_path / "a", layout="minc")
    with pytest.raises(ValueError, match="compression"):
        write_synthetic(tmp_path / "b", layout="nifti", compression="rle")
    with pytest.raises(ValueError, match="compression"):
        write_synthetic(tmp_path / "c", compression="zip")
    with pytest.raises(ValueError, match="tilt"):
        write_synthetic(tmp_path / "d", layout="png", tilt_deg=10.0)


def test_default_shape_covers_the_head_at_the_thickness(tmp_path: Path) -> None:
    [path] = write_synthetic(tmp_path / "nifti", layout="nifti", thickness=10.0)
    assert read_nifti(path).shape == (17, 256, 256)
