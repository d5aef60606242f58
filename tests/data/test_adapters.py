"""Dataset adapters on the real sets in ../shared/data and on small layouts built here: the
right rows and labels, and every file or label that did not make it into the manifest
accounted for in the report or refused with an error that names the file."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import shared
from ichscan.data import adapters
from ichscan.data.adapters import (
    adapt_cq500,
    adapt_images,
    adapt_nifti,
    adapt_rsna,
    build_manifest,
    detect_layout,
    mask_slice_labels,
    read_cq500_reads,
    read_rsna_labels,
    write_dataset_manifest,
)
from ichscan.data.manifest import BASE_COLUMNS, read_manifest
from ichscan.errors import InputError
from ichscan.io.dicom_write import write_ct_series
from ichscan.io.nifti import read_nifti
from ichscan.labels import CQ500, CQ500_COLUMNS, RSNA

# --------------------------------------------------------------------------- helpers


def _volume(n: int = 4) -> np.ndarray:
    return (np.arange(n)[:, None, None] * 10 + np.zeros((1, 8, 8)) - 500).astype(np.int16)


def _rsna_layout(root: Path, patients: int = 2, slices: int = 4) -> dict[str, list[str]]:
    """RSNA-style: ID_<hex>.dcm in one folder, every study's slices shuffled together, and
    the long CSV. Returns the file stems of each study in spatial order."""
    images = root / "stage_2_train"
    studies: dict[str, list[str]] = {}
    rows = []
    for p in range(patients):
        paths = write_ct_series(
            _volume(slices), root / f"tmp{p}", patient_id=f"P{p}", file_names="shuffled", seed=p
        )
        stems = []
        for k, path in enumerate(paths):
            stem = f"ID_{p:02d}{k:02d}{path.name[:5]}"
            images.mkdir(exist_ok=True)
            path.rename(images / f"{stem}.dcm")
            stems.append(stem)
            # Slice k of patient p: positive for subdural when k >= 2.
            labels = {s: 0 for s in RSNA.labels}
            labels["subdural"] = labels["any"] = int(k >= 2)
            rows += [{"ID": f"{stem}_{s}", "Label": v} for s, v in labels.items()]
        (root / f"tmp{p}").rmdir()
        studies[f"P{p}"] = stems
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(
        root / "stage_2_train.csv", index=False
    )
    return studies


def _write_png(path: Path, value: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)


def _reads_row(name: str, votes: dict[str, tuple[int, int, int]]) -> dict[str, object]:
    row: dict[str, object] = {"name": name, "Category": "B1"}
    for r, reader in enumerate(("R1", "R2", "R3")):
        for stem in CQ500_COLUMNS:
            row[f"{reader}:{stem}"] = votes.get(stem, (0, 0, 0))[r]
    return row


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    ("name", "layout"),
    [("head_ct", "images"), ("rsna_png", "images"), ("rsna_dicom", "rsna"), ("cq500", "cq500")],
)
def test_detect_layout_on_real_data(name: str, layout: str) -> None:
    assert detect_layout(shared(name)) == layout


def test_head_ct_real() -> None:
    df, report, label_set = build_manifest(shared("head_ct"))
    assert label_set.name == "binary"
    assert len(df) == 150 and int(df["hemorrhage"].sum()) == 75
    assert report.n_rows == 150 and report.n_patients == 150
    # Ids keep their zero padding (000, not 0) and name their file.
    assert "000" in set(df["image_id"])
    assert all(Path(p).stem == i for p, i in zip(df["path"], df["image_id"], strict=True))
    assert (df["window"] == "brain").all() and (df["kind"] == "image").all()
    assert not report.files_without_labels and not report.labels_without_files


def test_rsna_png_real() -> None:
    df, _, label_set = build_manifest(shared("rsna_png"))
    assert label_set is RSNA
    assert len(df) == 100
    assert int(df["any"].sum()) == 50 and int(df["intraparenchymal"].sum()) == 50
    others = ["epidural", "intraventricular", "subarachnoid", "subdural"]
    assert int(df[others].to_numpy().sum()) == 0


def test_rsna_dicom_real() -> None:
    root = shared("rsna_dicom")
    df, report, _ = adapt_rsna(root, workers=1)
    assert len(df) == 5 and (df["any"] == 1).all()
    assert report.problems == [] and report.bad_files == []
    # Independently: the labels as the CSV states them.
    csv = pd.read_csv(root / "stage_2_train.csv")
    csv[["image", "subtype"]] = csv["ID"].str.rsplit("_", n=1, expand=True)
    expected = csv.pivot(index="image", columns="subtype", values="Label")
    got = df.set_index("image_id")[list(RSNA.labels)]
    pd.testing.assert_frame_equal(
        got.sort_index(),
        expected.loc[got.index, list(RSNA.labels)].sort_index().astype("int8"),
        check_names=False,
        check_index_type=False,
    )
    assert df["patient_id"].str.startswith("ID_").all() and df["patient_id"].nunique() == 5
    assert (df["scan_id"] == df["series_id"]).all() and (df["slice_index"] == 0).all()


def test_cq500_reads_real() -> None:
    csv = shared("cq500") / "reads.csv"
    reads = read_cq500_reads(csv)
    assert len(reads) == 491 and reads["name"].is_unique
    raw = pd.read_csv(csv)
    for label, stem in zip(CQ500.labels, CQ500_COLUMNS, strict=True):
        votes = raw[[f"R{r}:{stem}" for r in (1, 2, 3)]].sum(axis=1)
        np.testing.assert_array_equal(reads[label], (votes >= 2).astype(int))
    assert int(reads["ich"].sum()) == 205
    assert reads[["r1_agreement", "r2_agreement", "r3_agreement"]].min().min() >= 0.5


def test_cq500_reads_only_gives_empty_manifest_and_says_why() -> None:
    df, report, label_set = build_manifest(shared("cq500"))
    assert label_set is CQ500 and df.empty
    assert list(df.columns) == [*BASE_COLUMNS, *CQ500.labels]
    assert len(report.labels_without_files) == 491
    assert any("491 read(s) have no patient folder" in p for p in report.problems)


def test_write_dataset_manifest_round_trip(tmp_path: Path) -> None:
    out, report = write_dataset_manifest(shared("head_ct"), tmp_path / "m.parquet")
    df, facts = read_manifest(out)
    assert len(df) == report.n_rows == 150
    assert facts["layout"] == "images" and facts["label_level"] == "slice"
    assert facts["window"] == "brain" and facts["label_set"] == "binary"
    assert facts["report"]["n_rows"] == 150 and facts["report"]["n_bad_files"] == 0


# --------------------------------------------------------------------------- RSNA layout


def test_rsna_orders_slices_in_space_and_keeps_labels(tmp_path: Path) -> None:
    studies = _rsna_layout(tmp_path)
    df, report, _ = adapt_rsna(tmp_path, workers=1)
    assert report.n_rows == 8 and report.n_scans == 2 and report.n_patients == 2
    assert report.problems == []
    for patient, stems in studies.items():
        rows = df[df["patient_id"] == patient].sort_values("slice_index")
        assert [Path(p).stem for p in rows["path"]] == stems
        assert rows["position_mm"].tolist() == pytest.approx([0, 5, 10, 15])
        assert rows["subdural"].tolist() == [0, 0, 1, 1]


def test_rsna_header_pool_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rsna_layout(tmp_path, patients=3)
    serial, _, _ = adapt_rsna(tmp_path, workers=1)
    monkeypatch.setattr(adapters, "MIN_FILES_FOR_POOL", 1)
    monkeypatch.setattr(adapters, "HEADER_CHUNK", 2)
    pooled, _, _ = adapt_rsna(tmp_path, workers=2)
    pd.testing.assert_frame_equal(serial, pooled)


def test_rsna_problems_are_counted(tmp_path: Path) -> None:
    _rsna_layout(tmp_path)
    csv = tmp_path / "stage_2_train.csv"
    rows = pd.read_csv(csv)
    extra = pd.DataFrame({"ID": [f"ID_gone_{s}" for s in RSNA.labels], "Label": 0})
    conflict = rows.iloc[[0]].assign(Label=1 - rows["Label"].iloc[0])
    pd.concat([rows, rows.iloc[:7], extra, conflict]).to_csv(csv, index=False)
    write_ct_series(_volume(1), tmp_path / "x", patient_id="NOLABEL")
    (next((tmp_path / "x").iterdir())).rename(tmp_path / "stage_2_train" / "ID_nolabel.dcm")
    (tmp_path / "stage_2_train" / "ID_broken.dcm").write_bytes(b"not dicom at all")
    broken = pd.DataFrame({"ID": [f"ID_broken_{s}" for s in RSNA.labels], "Label": 0})
    pd.concat([pd.read_csv(csv), broken]).to_csv(csv, index=False)

    df, report, _ = adapt_rsna(tmp_path, workers=1)
    assert report.duplicate_label_rows == 7
    assert report.labels_without_files == ["ID_gone"]
    assert [Path(p).name for p in report.files_without_labels] == ["ID_nolabel.dcm"]
    assert [Path(b["path"]).name for b in report.bad_files] == ["ID_broken.dcm"]
    text = "\n".join(report.problems)
    for expected in ("7 duplicate row(s)", "both 0 and 1", "no file", "no row", "not be read"):
        assert expected in text
    # The conflicting label is unknown, not guessed; the rest are intact.
    image, subtype = rows["ID"].iloc[0].rsplit("_", 1)
    stems = df["path"].map(lambda p: Path(p).stem)
    assert df.loc[stems == image, subtype].item() == -1
    assert len(df) == 8


@pytest.mark.parametrize("value", ["2", "yes"])
def test_rsna_bad_label_value_names_line(tmp_path: Path, value: str) -> None:
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text(f"ID,Label\nID_a_any,1\nID_a_subdural,{value}\n")
    with pytest.raises(InputError, match=rf"stage_2_train.csv: line 3.*{value!r}"):
        adapt_rsna(tmp_path)


def test_rsna_bad_id_and_columns(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\nID_a_nosuchtype,1\n")
    with pytest.raises(InputError, match="line 2: ID 'ID_a_nosuchtype'"):
        adapt_rsna(tmp_path)
    (tmp_path / "stage_2_train.csv").write_text("image,label_value\nx,1\n")
    with pytest.raises(InputError, match="expected columns ID,Label"):
        adapt_rsna(tmp_path)


def test_rsna_without_image_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\nID_a_any,1\n")
    df, report, _ = adapt_rsna(tmp_path)
    assert df.empty and report.labels_without_files == ["ID_a"]
    assert any("no image folder" in p for p in report.problems)


def test_rsna_csv_parse_is_vectorised(tmp_path: Path) -> None:
    n = 20_000  # x6 rows; the real stage-2 CSV is 38x this (about 7 s on 2 loaded cores)
    labels = np.random.default_rng(0).integers(0, 2, (n, 6))
    ids = [f"ID_{i:09x}_{s}" for i in range(n) for s in RSNA.labels]
    csv = tmp_path / "stage_2_train.csv"
    pd.DataFrame({"ID": ids, "Label": labels.ravel()}).to_csv(csv, index=False)
    start = time.perf_counter()
    table, duplicates, problems = read_rsna_labels(csv)
    elapsed = time.perf_counter() - start
    assert table.shape == (n, 6) and duplicates == 0 and problems == []
    np.testing.assert_array_equal(
        table.loc[[f"ID_{i:09x}" for i in (0, 7, n - 1)]], labels[[0, 7, -1]]
    )
    assert elapsed < 5.0


# --------------------------------------------------------------------------- CQ500 layout


def test_cq500_chooses_series_and_takes_majority(tmp_path: Path) -> None:
    study = tmp_path / "CQ500CT7 CQ500CT7" / "Unknown Study"
    write_ct_series(
        _volume(12),
        study / "CT 5mm",
        patient_id="CQ500-CT-7",
        study_uid="1.2.3.7",
        series_description="CT 5mm",
        slice_spacing=5.0,
    )
    write_ct_series(
        _volume(12),
        study / "CT BONE",
        patient_id="CQ500-CT-7",
        study_uid="1.2.3.7",
        series_description="BONE",
        convolution_kernel="BONE",
        slice_spacing=5.0,
    )
    (tmp_path / "CQ500CT99 CQ500CT99").mkdir()  # a folder with no read, and no images
    reads = [
        _reads_row("CQ500-CT-7", {"ICH": (1, 1, 0), "SDH": (1, 0, 0), "Fracture": (0, 1, 1)}),
        _reads_row("CQ500-CT-8", {}),
    ]
    pd.DataFrame(reads).to_csv(tmp_path / "reads.csv", index=False)

    df, report, label_set = adapt_cq500(tmp_path, workers=1)
    assert label_set is CQ500 and report.label_level == "scan"
    assert len(df) == 12 and (df["patient_id"] == "CQ500-CT-7").all()
    assert df["slice_index"].tolist() == list(range(12))
    assert set(df["path"].map(lambda p: Path(p).parent.name)) == {"CT 5mm"}
    assert (df["ich"] == 1).all() and (df["sdh"] == 0).all() and (df["fracture"] == 1).all()
    assert report.labels_without_files == ["CQ500-CT-8"]
    assert [Path(f).name for f in report.files_without_labels] == ["CQ500CT99 CQ500CT99"]
    assert any("chose CT 5mm" in n for n in report.notes)


def test_cq500_reads_errors(tmp_path: Path) -> None:
    row = _reads_row("CQ500-CT-1", {})
    csv = tmp_path / "reads.csv"
    pd.DataFrame([row]).drop(columns=["R3:MidlineShift", "R2:ICH"]).to_csv(csv, index=False)
    with pytest.raises(InputError, match=r"reads.csv: missing column\(s\) R2:ICH, R3:MidlineShift"):
        read_cq500_reads(csv)
    for bad in (2, "yes"):
        pd.DataFrame([{**row, "R2:SAH": bad}]).to_csv(csv, index=False)
        with pytest.raises(InputError, match=rf"line 2 \(CQ500-CT-1\), column R2:SAH: .*{bad}"):
            read_cq500_reads(csv)


def test_cq500_duplicate_reads(tmp_path: Path) -> None:
    row = _reads_row("CQ500-CT-1", {"ICH": (1, 1, 1)})
    pd.DataFrame([row, row]).to_csv(tmp_path / "reads.csv", index=False)
    _, report, _ = adapt_cq500(tmp_path, workers=1)
    assert report.duplicate_label_rows == 1 and report.labels_without_files == ["CQ500-CT-1"]
    other = {**row, "R1:ICH": 0}
    pd.DataFrame([row, other]).to_csv(tmp_path / "reads.csv", index=False)
    with pytest.raises(InputError, match="appear twice with different reads"):
        adapt_cq500(tmp_path, workers=1)


# --------------------------------------------------------------------------- image folder


def test_images_zero_padding_and_spaced_header(tmp_path: Path) -> None:
    for stem in ("000", "001", "010", "extra"):
        _write_png(tmp_path / "images" / f"{stem}.png")
    # The Kaggle header has a space after the comma; ids lost their padding in a spreadsheet.
    (tmp_path / "labels.csv").write_text("id, hemorrhage\n0,1\n1,0\n10,1\n7,0\n1,0\n")
    df, report, label_set = build_manifest(tmp_path)
    assert report.layout == "images" and label_set.name == "binary"
    assert df.set_index("image_id")["hemorrhage"].to_dict() == {"000": 1, "001": 0, "010": 1}
    assert report.labels_without_files == ["7"]
    assert [Path(p).name for p in report.files_without_labels] == ["extra.png"]
    assert report.duplicate_label_rows == 1
    assert len(report.problems) == 3  # duplicate, id without file, file without id


def test_images_conflicts_unknowns_and_override(tmp_path: Path) -> None:
    for stem in ("a", "b", "c"):
        _write_png(tmp_path / "images" / f"{stem}.png")
    (tmp_path / "labels.csv").write_text(
        "ID,Hemorrhage,patient_id,notes\na.png,1,p1,x\na,0,p1,x\nb,,p1,y\nc,-1,p2,z\n"
    )
    df, report, _ = adapt_images(tmp_path, window="subdural")
    assert df.set_index("image_id")["hemorrhage"].to_dict() == {"a": -1, "b": -1, "c": -1}
    assert (df["window"] == "subdural").all()
    assert sorted(df["patient_id"].unique()) == ["p1", "p2"] and report.n_patients == 2
    text = "\n".join(report.problems)
    assert "different labels" in text and "unknown (-1)" in text and "notes" in text


@pytest.mark.parametrize("value", ["2", "yes"])
def test_images_bad_label_value(tmp_path: Path, value: str) -> None:
    _write_png(tmp_path / "images" / "a.png")
    (tmp_path / "labels.csv").write_text(f"id,hemorrhage\na,{value}\n")
    with pytest.raises(InputError, match=r"labels.csv: line 2 \(a\), column hemorrhage"):
        adapt_images(tmp_path)


def test_images_label_set_errors(tmp_path: Path) -> None:
    _write_png(tmp_path / "images" / "a.png")
    (tmp_path / "labels.csv").write_text("id,any,epidural\na,1,0\n")
    with pytest.raises(InputError, match=r"labels\.csv: cannot tell the label set"):
        adapt_images(tmp_path)
    with pytest.raises(InputError, match="missing rsna label column"):
        adapt_images(tmp_path, labels="rsna")
    (tmp_path / "labels.csv").write_text("filename_x,hemorrhage\na,1\n")
    with pytest.raises(InputError, match="no id column"):
        adapt_images(tmp_path)


# --------------------------------------------------------------------------- NIfTI


def _write_nifti(path: Path, shape_xyz: tuple[int, int, int], affine: np.ndarray) -> None:
    data = np.full(shape_xyz, -1000, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_nifti_slices_from_headers_and_masks(tmp_path: Path) -> None:
    # Stored with the superior axis first: the slice count must follow the affine, not the
    # last array axis.
    z_first = np.array([[0, 0, 0.5, 0], [0, 0.5, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    _write_nifti(tmp_path / "a.nii.gz", (7, 10, 12), z_first)
    _write_nifti(tmp_path / "b.nii", (10, 12, 5), np.diag([0.5, 0.5, 3.0, 1.0]))
    mask = np.zeros((10, 12, 5), dtype=np.uint8)
    mask[2:4, 2:4, 1] = 5  # subdural on slice 1
    mask[5, 5, 3] = 2  # intraparenchymal on slice 3
    nib.save(nib.Nifti1Image(mask, np.diag([0.5, 0.5, 3.0, 1.0])), str(tmp_path / "b_mask.nii.gz"))
    (tmp_path / "labels.csv").write_text(
        "id,any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural\n"
        "a,0,0,0,0,0,0\nb.nii,1,0,1,0,0,1\nc,1,1,0,0,0,0\n"
    )
    assert detect_layout(tmp_path) == "nifti"
    df, report, _ = adapt_nifti(tmp_path)
    assert report.label_level == "scan"
    assert df.groupby("scan_id").size().to_dict() == {"a": 7, "b": 5}
    assert df.groupby("scan_id").size()["a"] == read_nifti(tmp_path / "a.nii.gz").n_slices
    b = df[df["scan_id"] == "b"]
    assert b["image_id"].tolist() == [f"b-{k:04d}" for k in range(5)]
    assert b["position_mm"].tolist() == pytest.approx([0, 3, 6, 9, 12])
    assert (b["subdural"] == 1).all()  # scan-level labels on every slice
    assert report.labels_without_files == ["c"]
    assert any("masks, not scans" in n for n in report.notes)

    df, report, _ = adapt_nifti(tmp_path, masks=True)
    b = df[df["scan_id"] == "b"].set_index("slice_index")
    assert report.label_level == "slice"
    assert b["subdural"].tolist() == [0, 1, 0, 0, 0]
    assert b["intraparenchymal"].tolist() == [0, 0, 0, 1, 0]
    assert b["any"].tolist() == [0, 1, 0, 1, 0]
    assert (df.loc[df["scan_id"] == "a", "any"] == -1).all()  # no mask: unknown, and said
    assert any("a: no a_mask" in p for p in report.problems)


def test_nifti_unreadable_file_is_counted(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"nope")
    _write_nifti(tmp_path / "ok.nii.gz", (4, 4, 3), np.eye(4))
    df, report, _ = adapt_nifti(tmp_path)
    assert len(df) == 3 and (df["any"] == -1).all()
    assert [Path(b["path"]).name for b in report.bad_files] == ["broken.nii.gz"]


# --------------------------------------------------------------------------- plain DICOM


def test_dicom_folder_without_labels(tmp_path: Path) -> None:
    write_ct_series(_volume(6), tmp_path / "soft", study_uid="1.2.3", series_description="soft")
    write_ct_series(
        _volume(6),
        tmp_path / "bone",
        study_uid="1.2.3",
        convolution_kernel="BONE",
        series_description="bone",
    )
    (tmp_path / "junk.dcm").write_bytes(b"garbage")
    assert detect_layout(tmp_path) == "dicom"
    df, report, label_set = build_manifest(tmp_path, labels="binary")
    assert label_set.name == "binary" and len(df) == 6 and (df["hemorrhage"] == -1).all()
    assert set(df["path"].map(lambda p: Path(p).parent.name)) == {"soft"}
    assert [Path(b["path"]).name for b in report.bad_files] == ["junk.dcm"]
    assert any("left out" in n and "sharp" in n for n in report.notes)


# --------------------------------------------------------------------------- bad folders


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no dataset layout found: looked for stage_2_train"):
        detect_layout(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no dataset layout found"):
        build_manifest(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        detect_layout(tmp_path / "absent")
    with pytest.raises(InputError, match="expected a dataset folder"):
        detect_layout(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="carries the rsna label set, not binary"):
        (tmp_path / "stage_2_train.csv").write_text("ID,Label\n")
        build_manifest(tmp_path, labels="binary")


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("layout", ["dicom", "nifti", "rsna", "cq500", "png"])
def test_synthetic_layouts(tmp_path: Path, layout: str) -> None:
    synth = pytest.importorskip("ichscan.data.synth", reason="synthetic generator not present")
    root = tmp_path / layout
    synth.write_synthetic(root, n_scans=2, layout=layout, shape=(8, 64, 64))
    df, report, label_set = build_manifest(root)
    expected_layout = "images" if layout == "png" else layout
    assert report.layout == expected_layout and report.n_scans == 2 and report.n_patients == 2
    assert not report.bad_files and not report.labels_without_files
    labels = list(label_set.labels)
    assert df[labels].isin([0, 1]).all().all()
    truth = pd.read_csv(root / "truth.csv")
    if layout in ("dicom", "rsna"):
        # Slice-level truth by SOP Instance UID, and the spatial order the generator used.
        slices = pd.read_csv(root / "slice_truth.csv").set_index("sop_uid")
        got = df.set_index("image_id")
        assert len(got) == 16
        pd.testing.assert_frame_equal(
            got[labels],
            slices.loc[got.index, labels].astype("int8"),
            check_names=False,
            check_index_type=False,
        )
        assert (got["slice_index"] == slices.loc[got.index, "slice_index"]).all()
    elif layout == "nifti":
        per_scan = df.groupby("scan_id")[labels].max()
        expected = truth.set_index("scan")[labels].loc[per_scan.index]
        assert (per_scan.to_numpy() == expected.to_numpy()).all()
        masked, _, _ = build_manifest(root, masks=True)
        truth_slices = pd.read_csv(root / "slice_truth.csv")
        # A mask marks every voxel of blood; the slice truth needs a minimum area.
        assert (masked["any"].to_numpy() >= truth_slices["any"].to_numpy()).all()
    elif layout == "cq500":
        reads = read_cq500_reads(root / "reads.csv").set_index("name")
        per_scan = df.groupby("patient_id")[labels].first()
        assert (per_scan.to_numpy() == reads.loc[per_scan.index, labels].to_numpy()).all()
        assert report.label_level == "scan"
    else:
        assert len(df) == 2 and (df["window"] == "brain").all()


def _header_bytes(path: Path, data: np.ndarray, affine: np.ndarray) -> bytearray:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return bytearray(path.read_bytes())


def _hostile_niftis(folder: Path) -> dict[str, str]:
    """Small files whose header alone should refuse them, by name → the expected problem.
    None is bigger than a few kB: the huge ones only claim their dimensions."""
    import gzip
    import struct

    good = np.full((6, 6, 3), -1000, dtype=np.int16)
    expected: dict[str, str] = {}

    def patched(name: str, edits: list[tuple[str, int, tuple]], problem: str, tail=None) -> None:
        raw = _header_bytes(folder / "src.nii", good, np.diag([0.5, 0.5, 5.0, 1.0]))
        for fmt, offset, values in edits:
            struct.pack_into(fmt, raw, offset, *values)
        data = bytes(raw) if tail is None else bytes(raw[:352]) + tail
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        expected[name] = problem

    sform_only = ("<hh", 252, (0, 1))
    patched("nan_affine.nii.gz", [sform_only, ("<12f", 280, (np.nan,) * 12)], "not finite")
    patched("inf_affine.nii", [sform_only, ("<12f", 280, (np.inf,) * 12)], "not finite")
    patched("zero_affine.nii.gz", [sform_only, ("<12f", 280, (0.0,) * 12)], "is singular")
    huge = ("<8h", 40, (3, 30000, 30000, 30000, 1, 1, 1, 1))
    patched("huge_dims.nii", [huge], "header declares 30000x30000x30000", tail=bytes(1000))
    huge4 = ("<8h", 40, (4, 2000, 2000, 2000, 1, 1, 1, 1))
    patched("huge_4d.nii.gz", [huge4], "header declares 2000x2000x2000x1", tail=bytes(1000))
    (folder / "src.nii").unlink()
    for name, data, problem in [
        ("all_nan.nii.gz", np.full((6, 6, 3), np.nan, np.float32), "no voxel holds a number"),
        ("complex.nii.gz", good.astype(np.complex64), "holds complex numbers"),
        (
            "rgb24.nii.gz",
            np.zeros((6, 6, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]),
            "voxel type RGB24 is not a greyscale intensity",
        ),
    ]:
        nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 5.0, 1.0])), str(folder / name))
        expected[name] = problem
    return expected


def test_nifti_bad_headers_are_one_bad_file_each_and_the_rest_is_read(tmp_path: Path) -> None:
    expected = _hostile_niftis(tmp_path)
    _write_nifti(tmp_path / "ok.nii.gz", (4, 4, 3), np.eye(4))
    some_nan = np.full((4, 4, 5), -1000.0, np.float32)
    some_nan[:, :, 0] = np.nan  # a whole slice of NaN is air, not a reason to refuse
    nib.save(nib.Nifti1Image(some_nan, np.eye(4)), str(tmp_path / "some_nan.nii.gz"))
    start = time.perf_counter()
    df, report, _ = adapt_nifti(tmp_path)
    assert time.perf_counter() - start < 10  # from the headers: no bomb is inflated
    assert df.groupby("scan_id").size().to_dict() == {"ok": 3, "some_nan": 5}
    reasons = {Path(b["path"]).name: b["reason"] for b in report.bad_files}
    assert sorted(reasons) == sorted(expected)
    for name, problem in expected.items():
        assert problem in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    assert any(f"{len(expected)} NIfTI file(s) could not be read" in p for p in report.problems)


def test_any_error_on_one_nifti_is_a_bad_file_not_an_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_nifti(tmp_path / "a.nii.gz", (4, 4, 3), np.eye(4))
    _write_nifti(tmp_path / "b.nii.gz", (4, 4, 2), np.eye(4))
    real = adapters.nifti_slices

    def flaky(path: str | Path) -> tuple[int, float]:
        if Path(path).name == "a.nii.gz":
            raise RuntimeError("nibabel fell over\n on two lines")
        return real(path)

    monkeypatch.setattr(adapters, "nifti_slices", flaky)
    df, report, _ = adapt_nifti(tmp_path)
    assert df["scan_id"].unique().tolist() == ["b"]
    [bad] = report.bad_files
    assert Path(bad["path"]).name == "a.nii.gz"
    assert bad["reason"] == "cannot read the NIfTI header (nibabel fell over on two lines)"


def test_a_mask_claiming_huge_dims_is_refused_from_its_header(tmp_path: Path) -> None:
    import struct

    _write_nifti(tmp_path / "b.nii", (10, 12, 5), np.diag([0.5, 0.5, 3.0, 1.0]))
    raw = _header_bytes(tmp_path / "b_mask.nii", np.zeros((10, 12, 5), np.uint8), np.eye(4))
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    (tmp_path / "b_mask.nii").write_bytes(bytes(raw[:352]) + bytes(1000))
    with pytest.raises(InputError, match="header declares 30000x30000x30000"):
        mask_slice_labels(tmp_path / "b_mask.nii", RSNA)
    df, report, _ = adapt_nifti(tmp_path, masks=True)
    assert len(df) == 5 and (df["any"] == -1).all()
    assert [Path(b["path"]).name for b in report.bad_files] == ["b_mask.nii"]


# --------------------------------------------------------------------------- QA audit s18


def test_cq500_blank_reader_cells_are_unknown_not_votes_against(tmp_path: Path) -> None:
    """A blank cell is a reader who did not answer: the majority is taken over those who
    did (2 of 2 positive is positive), a 1-to-1 split is unknown, and both are reported."""
    csv = tmp_path / "reads.csv"
    rows = [
        _reads_row("CQ500-CT-1", {"ICH": (1, 1, 1), "SDH": (1, 0, 1)}),
        _reads_row("CQ500-CT-2", {"ICH": (1, 0, 0), "SAH": (1, 1, 0)}),
    ]
    table = pd.DataFrame(rows).astype(object)
    table.loc[0, "R1:ICH"] = ""  # 1 and 1 from R2, R3: positive
    table.loc[0, "R2:SDH"] = ""  # 1 and 1 from R1, R3: positive
    table.loc[1, "R3:ICH"] = ""  # 1 from R1, 0 from R2: no majority
    table.loc[1, "R3:SAH"] = ""  # 1 and 1 from R1, R2: positive
    table.to_csv(csv, index=False)

    problems: list[str] = []
    reads = read_cq500_reads(csv, problems=problems).set_index("name")
    assert reads.at["CQ500-CT-1", "ich"] == 1 and reads.at["CQ500-CT-1", "votes_ich"] == 2
    assert reads.at["CQ500-CT-1", "sdh"] == 1
    assert reads.at["CQ500-CT-2", "sah"] == 1
    assert reads.at["CQ500-CT-2", "ich"] == -1 and reads.at["CQ500-CT-2", "votes_ich"] == 1
    assert reads.at["CQ500-CT-2", "iph"] == 0  # answered by all three: untouched
    text = " | ".join(problems)
    assert "4 blank reader cell(s)" in text and "CQ500-CT-1" in text
    assert "no majority" in text and "CQ500-CT-2" in text and "ICH" in text


def test_cq500_reads_without_blanks_report_nothing(tmp_path: Path) -> None:
    csv = tmp_path / "reads.csv"
    pd.DataFrame([_reads_row("CQ500-CT-1", {"ICH": (1, 1, 0)})]).to_csv(csv, index=False)
    problems: list[str] = []
    reads = read_cq500_reads(csv, problems=problems)
    assert reads["ich"].tolist() == [1] and problems == []


def _synth(root: Path, layout: str, scans: int = 2, **kw: object) -> Path:
    from ichscan.data.synth import write_synthetic

    write_synthetic(root, n_scans=scans, layout=layout, shape=(6, 32, 32), seed=3, **kw)
    return root


def test_nifti_masks_are_read_when_every_volume_has_one(tmp_path: Path) -> None:
    root = _synth(tmp_path / "nii", "nifti")
    df, report, _ = build_manifest(root)
    assert report.label_level == "slice"
    truth = pd.read_csv(root / "slice_truth.csv")
    # A mask marks every voxel of blood, the slice truth needs a minimum area.
    assert (df["any"].to_numpy() >= truth["any"].to_numpy()).all()
    assert any("masks" in n for n in report.notes)

    _, unmasked, _ = build_manifest(root, masks=False)
    assert unmasked.label_level == "scan"

    next(root.glob("*_mask.nii.gz")).unlink()  # one volume without its mask: per scan
    _, partial, _ = build_manifest(root)
    assert partial.label_level == "scan"
    assert any("1 of 2" in n and "mask" in n for n in partial.notes)


def test_cq500_reads_per_patient_zips(tmp_path: Path) -> None:
    """CQ500 as qure.ai distributes it: one CQ500-CT-<n>.zip per patient beside reads.csv."""
    import shutil

    root = _synth(tmp_path / "cq", "cq500")
    folders, _, _ = build_manifest(root, thickness="native")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        number = folder.name.split()[0].removeprefix("CQ500CT")
        shutil.make_archive(str(root / f"CQ500-CT-{number}"), "zip", root, folder.name)
        shutil.rmtree(folder)
    zipped, report, _ = build_manifest(root, thickness="native")
    assert len(zipped) == len(folders) == 2 * 41
    assert (zipped["path"].str.endswith(".zip")).all() and (zipped["member"] != "").all()
    assert zipped["image_id"].tolist() == folders["image_id"].tolist()
    assert not report.labels_without_files


def test_cq500_zips_beside_their_folders_are_not_read_twice(tmp_path: Path) -> None:
    import shutil

    root = _synth(tmp_path / "cq", "cq500", scans=1)
    folder = next(p for p in root.iterdir() if p.is_dir())
    shutil.make_archive(str(root / "CQ500-CT-0"), "zip", root, folder.name)
    df, report, _ = build_manifest(root, thickness="native")
    assert len(df) == 41 and not df["path"].str.endswith(".zip").any()
    assert not report.files_without_labels


@pytest.mark.parametrize(("layout", "labels"), [("rsna", "binary"), ("cq500", "rsna")])
def test_a_fixed_label_set_is_checked_before_any_header_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, labels: str
) -> None:
    root = _synth(tmp_path / layout, layout, scans=1)

    def never(*args: object, **kw: object) -> None:
        raise AssertionError("headers were read before the label set was checked")

    monkeypatch.setattr(adapters, "read_header_table", never)
    monkeypatch.setattr(adapters, "_map_patients", never)
    with pytest.raises(InputError, match=f"label set, not {labels}"):
        build_manifest(root, labels=labels)


def test_cq500_thin_series_become_5mm_slabs(tmp_path: Path) -> None:
    """DESIGN.md: CQ500's chosen series is resampled to 5 mm along the patient axis (the
    slabs `ichscan convert --thickness 5` and `predict --reslice 5` make)."""
    root = _synth(tmp_path / "cq", "cq500")
    df, report, _ = build_manifest(root)
    assert report.facts()["slab_mm"] == 5.0
    assert (df["kind"] == "series").all()
    per_scan = df.groupby("scan_id")
    assert per_scan.size().tolist() == [6, 6]  # 41 slices of 0.625 mm -> 6 slabs of 5 mm
    assert (df["member"] == df["series_id"]).all()
    assert all(Path(p).name == "CT PLAIN THIN" for p in df["path"])
    for _, scan in per_scan:
        assert scan["slice_index"].tolist() == list(range(6))
        np.testing.assert_allclose(scan["position_mm"], np.arange(6) * 5.0)
    assert any("5 mm" in n for n in report.notes)

    native, native_report, _ = build_manifest(root, thickness="native")
    assert len(native) == 2 * 41 and (native["kind"] == "dicom").all()
    assert native_report.facts().get("slab_mm") is None


def test_middle_slabs_keep_their_place_in_the_scan(tmp_path: Path) -> None:
    root = _synth(tmp_path / "cq", "cq500", scans=1)
    df, report, _ = build_manifest(root, middle=4)
    assert df["slice_index"].tolist() == [1, 2, 3, 4]
    assert report.facts()["middle_slices"] == 4
    thick, _, _ = build_manifest(root, thickness=2.5, middle=100)
    assert len(thick) == 11  # all of them when there are fewer than asked for


def test_slab_thickness_is_refused_where_slices_are_labelled_one_by_one(tmp_path: Path) -> None:
    root = _synth(tmp_path / "rsna", "rsna", scans=1)
    with pytest.raises(InputError, match="thickness"):
        build_manifest(root, thickness=5.0)
    assert len(build_manifest(root)[0]) == 6  # native by default


def test_adapter_facts_carry_layout_and_label_level(tmp_path: Path) -> None:
    root = _synth(tmp_path / "cq", "cq500", scans=1)
    _, report, _ = build_manifest(root)
    facts = report.facts()
    assert facts["layout"] == "cq500" and facts["label_level"] == "scan"


def test_dicom_slabs_take_the_labels_of_their_slices(tmp_path: Path) -> None:
    """A slab is positive when one of its slices is, else unknown when one is, else 0."""
    from ichscan.data.synth import write_synthetic
    from ichscan.preprocess.reslice import slab_plan

    root = tmp_path / "dcm"
    write_synthetic(root, n_scans=1, layout="dicom", shape=(24, 32, 32), thickness=1.25, seed=1)
    truth = pd.read_csv(root / "slice_truth.csv", dtype=str)
    labels = list(RSNA.labels)
    truth[labels] = "0"
    truth.loc[truth["slice_index"] == "7", "any"] = "1"
    truth.loc[truth["slice_index"] == "15", "any"] = ""
    truth.to_csv(root / "slice_truth.csv", index=False)

    slices, _, _ = build_manifest(root)
    df, report, _ = build_manifest(root, thickness=5.0)
    assert (df["kind"] == "series").all() and report.facts()["slab_mm"] == 5.0
    n, slab = slab_plan(slices["position_mm"].to_numpy(), 5.0)
    assert len(df) == n == 6 and slab is not None
    expected = [0] * n
    expected[slab[7]] = 1
    expected[slab[15]] = -1
    assert df["any"].tolist() == expected
    assert (df["subdural"] == 0).all()
