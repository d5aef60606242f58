"""One stored series through the model: findings, the key slice (also when the bundle
reslices a thin series into slabs), the SR and its codes; a series the model cannot read."""

from __future__ import annotations

import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ichscan.errors import IchscanError
from ichscan.io.load import load
from ichscan.preprocess.reslice import reslice_scan
from ichscan.receive.analyse import analyse_series, source_slice
from ichscan.receive.enhanced import load_multiframe
from ichscan.receive.sr import finding_code, sr_summary
from ichscan.receive.store import open_store
from ichscan.scan import Scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from receive_helpers import legacy_enhanced, uids, write_series

pytest_plugins = ["infer_fixtures"]
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("single_threaded_torch")]


def _thin_scan(n: int = 24, spacing: float = 1.25) -> Scan:
    # Slices step along z (feet to head), rows along y, columns along x: DICOM's axial grid.
    affine = np.array(
        [[0, 0, 0.5, -2], [0, 0.5, 0, -2], [spacing, 0, 0, 10.0], [0, 0, 0, 1]], dtype=float
    )
    return Scan(
        hu=np.zeros((n, 8, 8), np.int16),
        affine=affine,
        slice_ids=[f"sop{k}" for k in range(n)],
        spacing=(spacing, 0.5, 0.5),
        metadata={"slice_positions_mm": [k * spacing for k in range(n)]},
    )


def test_key_slab_maps_to_the_source_instance_at_its_centre() -> None:
    scan = _thin_scan()
    slabs = reslice_scan(scan, 5.0)
    mapped = [source_slice(scan, slabs, j) for j in range(slabs.n_slices)]
    assert mapped == sorted(mapped) and len(set(mapped)) == slabs.n_slices
    normal = scan.slice_normal
    for j, k in enumerate(mapped):
        centre = (slabs.affine[:3, 3] + j * slabs.affine[:3, 0]) @ normal
        source = (scan.affine[:3, 3] + k * scan.affine[:3, 0]) @ normal
        assert abs(centre - source) <= 1.25 / 2 + 1e-6


def test_not_resliced_means_the_same_index() -> None:
    scan = _thin_scan(6, 5.0)
    assert [source_slice(scan, scan, j) for j in range(6)] == list(range(6))


def test_finding_codes() -> None:
    assert (finding_code("any").value, finding_code("any").scheme_designator) == (
        "1386000",
        "SCT",
    )
    assert finding_code("ich") == finding_code("hemorrhage") == finding_code("any")
    assert finding_code("sah").value == "21454007"
    edh = finding_code("edh")
    assert (edh.scheme_designator, edh.value, edh.meaning) == (
        "99ICHSCAN",
        "EDH",
        "Epidural hemorrhage",
    )
    assert finding_code("midline_shift").meaning == "Midline shift"
    assert finding_code("ivh") == finding_code("intraventricular")
    from ichscan.labels import LABEL_SETS

    for label_set in LABEL_SETS.values():  # every label has a code that fits SH (16)
        values = [finding_code(label).value for label in label_set.labels]
        assert all(len(v) <= 16 for v in values) and len(set(values)) == len(values)


def test_thin_series_resliced_key_slice_and_sr(trained_bundle: Path, tmp_path: Path) -> None:
    from ichscan.infer.predictor import Predictor

    store = open_store(tmp_path / "store")
    source = write_series(tmp_path / "src", n_slices=16, slice_spacing=1.25)
    study, series, _ = uids(source[0])
    folder = store.series_dir(study, series)
    folder.mkdir(parents=True)
    for p in source:
        (folder / f"{uids(p)[2]}.dcm").write_bytes(p.read_bytes())

    predictor = Predictor(trained_bundle, "cpu", reslice_mm=5.0)
    fields = analyse_series(store, study, series, predictor, algorithm="test")
    assert fields["instances"] == 16 and fields["slices"] == 4  # 20 mm of 1.25 mm -> 5 mm
    sops = [uids(p)[2] for p in source]  # written in spatial order
    key = fields["key_slice"]
    assert sops[key["index"]] == key["sop_instance_uid"]

    sr_path = store.root / fields["sr"]
    sr = hd.sr.srread(sr_path)  # highdicom reads back what it wrote
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    summary = sr_summary(pydicom.dcmread(sr_path))
    assert summary["SCT:1386000"]["key_sop_instance_uid"] == key["sop_instance_uid"]
    assert all(entry["key_sop_instance_uid"] in sops for entry in summary.values())
    assert not list(store.results.rglob(".*")), "no temporary file is left"


def test_unreadable_series_is_an_error_not_a_crash(trained_bundle: Path, tmp_path: Path) -> None:
    from ichscan.infer.predictor import Predictor

    store = open_store(tmp_path / "store")
    folder = store.series_dir("1.2.3", "1.2.3.4")
    folder.mkdir(parents=True)
    (folder / "1.2.3.4.5.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(IchscanError, match=r"1\.2\.3\.4"):
        analyse_series(store, "1.2.3", "1.2.3.4", Predictor(trained_bundle, "cpu"), algorithm="t")


def _frames_feet_to_head(path: Path) -> list[int]:
    per_frame = pydicom.dcmread(path).PerFrameFunctionalGroupsSequence
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in per_frame]
    return [int(n) + 1 for n in np.argsort(z)]


def test_multiframe_reads_as_its_single_frame_slices(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "src", n_slices=6)
    enhanced = tmp_path / "enhanced.dcm"
    legacy = legacy_enhanced(list(reversed(paths)))  # frames stored head to feet
    legacy.save_as(enhanced)
    scan = load_multiframe([enhanced])
    expected = load(tmp_path / "src")
    assert np.array_equal(scan.hu, expected.hu)
    assert np.allclose(scan.affine, expected.affine)
    assert scan.spacing == pytest.approx(expected.spacing)
    # Slice k of the scan names the frame it came from, wherever the file stored it.
    assert [frame for _, frame in scan.metadata["frames"]] == _frames_feet_to_head(enhanced)


def test_multiframe_series_is_analysed_per_frame(trained_bundle: Path, tmp_path: Path) -> None:
    from ichscan.infer.predictor import Predictor

    paths = write_series(tmp_path / "src", n_slices=6)
    legacy = legacy_enhanced(paths)
    store = open_store(tmp_path / "store")
    study, series = str(legacy.StudyInstanceUID), str(legacy.SeriesInstanceUID)
    folder = store.series_dir(study, series)
    folder.mkdir(parents=True)
    legacy.save_as(folder / f"{legacy.SOPInstanceUID}.dcm")

    fields = analyse_series(store, study, series, Predictor(trained_bundle, "cpu"), algorithm="t")
    assert fields["instances"] == 1 and fields["slices"] == 6
    key = fields["key_slice"]
    assert key["sop_instance_uid"] == legacy.SOPInstanceUID
    assert (
        key["frame"] == _frames_feet_to_head(folder / f"{legacy.SOPInstanceUID}.dcm")[key["index"]]
    )
    summary = sr_summary(pydicom.dcmread(store.root / fields["sr"]))
    assert summary["SCT:1386000"]["key_frame"] == key["frame"]


def _stored_series(store, source: list[Path]) -> tuple[str, str]:
    study, series, _ = uids(source[0])
    folder = store.series_dir(study, series)
    folder.mkdir(parents=True)
    for p in source:
        (folder / f"{uids(p)[2]}.dcm").write_bytes(p.read_bytes())
    return study, series


def test_missing_type2_attributes_are_empty_in_the_sr(trained_bundle: Path, tmp_path: Path) -> None:
    from ichscan.infer.predictor import Predictor

    source = write_series(tmp_path / "src", n_slices=4)
    for p in source:  # as RSNA's files come: no patient name, birth date, sex, study date...
        ds = pydicom.dcmread(p)
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate"):
            delattr(ds, keyword)
        ds.save_as(p)
    store = open_store(tmp_path / "store")
    study, series = _stored_series(store, source)
    fields = analyse_series(store, study, series, Predictor(trained_bundle, "cpu"), algorithm="t")
    sr = pydicom.dcmread(store.root / fields["sr"])
    assert sr.PatientName == "" and sr.PatientSex == "" and sr.PatientBirthDate == ""
    assert sr.PatientID == pydicom.dcmread(source[0]).PatientID


def test_findings_are_kept_when_the_sr_cannot_be_built(
    trained_bundle: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    import logging

    from ichscan.infer.predictor import Predictor
    from ichscan.receive import analyse

    def broken(*args, **kwargs):
        raise KeyError("an attribute highdicom wants")

    monkeypatch.setattr(analyse, "build_sr", broken)
    store = open_store(tmp_path / "store")
    study, series = _stored_series(store, write_series(tmp_path / "src", n_slices=4))
    predictor = Predictor(trained_bundle, "cpu")
    with caplog.at_level(logging.WARNING, logger="ichscan.receive"):
        fields = analyse_series(store, study, series, predictor, algorithm="t")
    assert fields["sr"] is None and fields["error"] is None
    assert set(fields["findings"]) == set(predictor.labels)
    [note] = [w for w in fields["warnings"] if "Structured Report" in w]
    assert "KeyError" in note and "an attribute highdicom wants" in note
    assert series in caplog.text and "Structured Report" in caplog.text
    assert not list(store.results.rglob("*.dcm")), "no SR file"
