"""Series discovery: grouping, spatial order, spacing, gaps, tilt, and choosing the series."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ichscan.errors import InputError
from ichscan.io.dicom_write import write_ct_series
from ichscan.io.series import discover, iter_files


def test_order_by_position_not_file_name_or_instance_number(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    write_ct_series(ramp_volume, tmp_path, file_names="shuffled", shuffle_instance_numbers=True)
    found = discover(tmp_path)
    (series,) = found.series
    assert series.n_slices == ramp_volume.shape[0]
    z = [h.position[2] for h in series.headers]
    assert z == sorted(z)
    assert series.slice_spacing_mm == pytest.approx(5.0)
    assert series.problems == []
    assert series.selected


def test_recursive_folder_without_suffixes(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    write_ct_series(ramp_volume, tmp_path / "a" / "b", file_names="index")
    found = discover(tmp_path)
    assert found.series[0].n_slices == ramp_volume.shape[0]


def test_missing_slices_are_reported(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    write_ct_series(ramp_volume, tmp_path, slice_spacing=2.5, skip_slices=[2, 3])
    (series,) = discover(tmp_path).series
    assert series.slice_spacing_mm == pytest.approx(2.5)
    assert any("missing slices" in p and "about 2" in p for p in series.problems)
    # The geometry still follows the regular step, not the gap.
    np.testing.assert_allclose(series.affine[:3, 0], [0, 0, 2.5], atol=1e-6)


def test_uneven_spacing_is_reported(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    import pydicom

    paths = write_ct_series(ramp_volume, tmp_path, slice_spacing=5.0)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [
        ds.ImagePositionPatient[0],
        ds.ImagePositionPatient[1],
        float(ds.ImagePositionPatient[2]) + 1.0,
    ]
    ds.save_as(paths[3])
    (series,) = discover(tmp_path).series
    assert any("uneven slice spacing" in p for p in series.problems)


@pytest.mark.parametrize("tilt", [0.0, 12.0, 25.0])
def test_gantry_tilt_measured(tmp_path: Path, ramp_volume: np.ndarray, tilt: float) -> None:
    write_ct_series(ramp_volume, tmp_path, tilt_deg=tilt, slice_spacing=2.0)
    (series,) = discover(tmp_path).series
    assert series.gantry_tilt_deg == pytest.approx(tilt, abs=0.05)
    assert series.slice_spacing_mm == pytest.approx(2.0)
    sheared = any("sheared" in p for p in series.problems)
    assert sheared == (tilt > 0)


def test_best_series_soft_kernel_thin_axial(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    thick = np.repeat(ramp_volume, 2, axis=0)  # 12 slices
    thin = np.repeat(ramp_volume, 4, axis=0)  # 24 slices
    write_ct_series(
        thick,
        tmp_path / "s1",
        study_uid=study,
        slice_spacing=5.0,
        series_description="Head 5mm",
        convolution_kernel="H30s",
        series_number=1,
    )
    write_ct_series(
        thin,
        tmp_path / "s2",
        study_uid=study,
        slice_spacing=1.25,
        series_description="Head 1.25 bone",
        convolution_kernel="H70h",
        series_number=2,
    )
    write_ct_series(
        thin,
        tmp_path / "s3",
        study_uid=study,
        slice_spacing=1.25,
        series_description="Head 1.25",
        convolution_kernel="H30s",
        series_number=3,
    )
    write_ct_series(
        ramp_volume[:2],
        tmp_path / "s4",
        study_uid=study,
        slice_spacing=5.0,
        series_description="Topogram",
        convolution_kernel="T20f",
        series_number=4,
    )
    found = discover(tmp_path)
    chosen = found.selected
    assert chosen is not None
    assert chosen.description == "Head 1.25"
    assert "soft-tissue/brain kernel" in chosen.selection_reason
    assert "sharp (bone/lung) kernel" in chosen.selection_reason  # why not the bone series
    assert sum(s.selected for s in found.series) == 1


def test_selection_reason_does_not_claim_a_kernel_that_is_not_recorded(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    write_ct_series(ramp_volume, tmp_path, convolution_kernel="")
    found = discover(tmp_path)
    assert found.selected is not None and found.selected.kernel == ""
    assert "no kernel recorded" in found.selected.selection_reason
    assert "brain kernel" not in found.selected.selection_reason


def test_mixed_matrix_sizes_in_one_folder_are_two_series(tmp_path: Path) -> None:
    a = np.zeros((12, 32, 32), np.int16)
    b = np.zeros((12, 48, 48), np.int16)
    write_ct_series(a, tmp_path / "a")
    write_ct_series(b, tmp_path / "b")
    found = discover(tmp_path)
    assert sorted(s.first.rows for s in found.series) == [32, 48]


def test_mixed_sizes_inside_one_series_drop_minority(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.2"
    study = "1.2.826.0.1.3680043.8.498.1"  # one study: another study's slices are split off
    write_ct_series(
        np.zeros((12, 32, 32), np.int16), tmp_path / "a", study_uid=study, series_uid=uid
    )
    write_ct_series(
        np.zeros((1, 48, 48), np.int16),
        tmp_path / "b",
        study_uid=study,
        series_uid=uid,
        origin=(0.0, 0.0, 100.0),
    )
    found = discover(tmp_path)
    (series,) = found.series
    assert series.n_slices == 12
    assert any("mixed sizes" in p for p in series.problems)
    assert len(found.bad_files) == 1 and "48x48" in found.bad_files[0].reason


def test_missing_position_on_some_slices(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    import pydicom

    paths = write_ct_series(ramp_volume, tmp_path)
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    found = discover(tmp_path)
    assert found.series[0].n_slices == ramp_volume.shape[0] - 1
    assert any("ImagePositionPatient" in b.reason for b in found.bad_files)


def test_missing_position_on_all_slices_falls_back_to_instance_number(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    import pydicom

    for p in write_ct_series(ramp_volume, tmp_path, file_names="shuffled"):
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    (series,) = discover(tmp_path).series
    assert [h.instance_number for h in series.headers] == list(range(1, 7))
    assert any("no usable ImagePositionPatient" in p for p in series.problems)


def test_not_finite_geometry_is_called_invalid_not_missing(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    """A position or spacing of NaN is present but unusable; saying "no ImagePositionPatient"
    would send the user looking for a tag that is there."""
    import pydicom

    paths = write_ct_series(ramp_volume, tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.ImagePositionPatient = ["nan", "0", "10"]
    ds.save_as(paths[2])
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelSpacing = ["0", "0"]
        ds.save_as(p)
    found = discover(tmp_path)
    (series,) = found.series
    assert any("not finite" in b.reason for b in found.bad_files)
    assert any("not finite" in p and "left out" in p for p in series.problems)
    assert any("no usable PixelSpacing (missing, zero or not finite)" in p for p in series.problems)


def test_each_series_says_where_its_files_are(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    """In a tree of many series, `info` names the folder (or zip and folder in it) of each."""
    import zipfile

    write_ct_series(ramp_volume, tmp_path / "tree" / "a" / "s1", series_number=1)
    write_ct_series(ramp_volume, tmp_path / "tree" / "b", series_number=2)
    found = discover(tmp_path / "tree")
    assert sorted(s.info()["location"] for s in found.series) == [
        str(tmp_path / "tree" / "a" / "s1"),
        str(tmp_path / "tree" / "b"),
    ]
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "tree" / "b").iterdir()):
            zf.write(p, f"export/series/{p.name}")
    (series,) = discover(archive).series
    assert series.info()["location"] == f"{archive}!export/series"


def test_bad_files_listed_good_ones_kept(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    write_ct_series(ramp_volume, tmp_path)
    (tmp_path / "garbage").write_bytes(b"\x00\x01not dicom" * 50)
    (tmp_path / "notes.txt").write_text("ignored")
    found = discover(tmp_path)
    assert found.series[0].n_slices == ramp_volume.shape[0]
    assert [Path(b.path).name for b in found.bad_files] == ["garbage"]
    assert any(f.endswith("notes.txt") for f in found.ignored_files)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no DICOM files found"):
        discover(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        discover(tmp_path / "nope")


# ---------------------------------------------------------------------------------------
# Bad input in a folder: one line per bad file, the rest still read


def test_one_series_uid_over_two_patients_is_split_not_merged(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    shared_uid = "1.2.826.0.1.3680043.8.498.77"
    for patient, study, z in (("PATIENT_A", "1.2.3.1", 0.0), ("PATIENT_B", "1.2.3.2", 100.0)):
        write_ct_series(
            ramp_volume[:4],
            tmp_path / patient,
            patient_id=patient,
            study_uid=study,
            series_uid=shared_uid,
            origin=(0.0, 0.0, z),
            seed=int(z),
        )
    found = discover(tmp_path)
    assert sorted((s.patient_id, s.n_slices) for s in found.series) == [
        ("PATIENT_A", 4),
        ("PATIENT_B", 4),
    ]
    for s in found.series:
        assert s.series_uid == shared_uid
        assert {h.patient_id for h in s.headers} == {s.patient_id}
        assert not any("missing slices" in p for p in s.problems)
        assert any(
            f"SeriesInstanceUID {shared_uid} is shared by 2 patients or studies" in p
            and f"patient {s.patient_id}" in p
            for p in s.problems
        )


def test_same_series_uid_and_patient_but_two_studies_is_split(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    for study in ("1.2.3.1", "1.2.3.2"):
        write_ct_series(
            ramp_volume[:3], tmp_path / study, study_uid=study, series_uid="1.2.3.9", seed=1
        )
    found = discover(tmp_path)
    assert sorted(s.study_uid for s in found.series) == ["1.2.3.1", "1.2.3.2"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_in_folder_is_skipped_and_named(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    write_ct_series(ramp_volume, tmp_path)
    os.mkfifo(tmp_path / "pipe.dcm")  # opening it to read would block forever
    found = discover(tmp_path)
    assert found.series[0].n_slices == ramp_volume.shape[0]
    assert [str(b) for b in found.bad_files] == [
        f"{tmp_path / 'pipe.dcm'}: not a regular file (a named pipe); not read"
    ]
    special: list[Path] = []
    files = list(iter_files(tmp_path, special))
    assert len(files) == ramp_volume.shape[0] and tmp_path / "pipe.dcm" not in files
    assert special == [tmp_path / "pipe.dcm"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_given_alone_is_refused_without_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.dcm")
    with pytest.raises(InputError, match=r"pipe\.dcm: not a regular file \(a named pipe\)"):
        discover(tmp_path / "pipe.dcm")


def test_file_name_with_newline_stays_on_one_line(tmp_path: Path, ramp_volume: np.ndarray) -> None:
    write_ct_series(ramp_volume, tmp_path)
    (tmp_path / "bad\nname.dcm").write_bytes(b"not dicom")
    found = discover(tmp_path)
    (bad,) = found.bad_files
    assert "\n" not in str(bad)
    assert bad.path == repr(str(tmp_path / "bad\nname.dcm"))


def test_accented_and_cjk_names_are_shown_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "slice ñ 出血.dcm").write_bytes(b"not dicom")
    (bad,) = discover(tmp_path).bad_files
    assert bad.path == str(tmp_path / "slice ñ 出血.dcm")


def test_repeated_sop_instance_uid_keeps_one_and_names_the_other(
    tmp_path: Path, ramp_volume: np.ndarray
) -> None:
    import pydicom

    paths = sorted(write_ct_series(ramp_volume, tmp_path, file_names="index"))
    first_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID
    for p in paths[1:3]:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = first_uid
        ds.file_meta.MediaStorageSOPInstanceUID = first_uid
        ds.save_as(p)
    found = discover(tmp_path)
    (series,) = found.series
    assert series.n_slices == len(paths) - 2
    assert len({h.sop_uid for h in series.headers}) == series.n_slices
    assert sorted(b.path for b in found.bad_files) == [str(p) for p in paths[1:3]]
    assert all(f"repeats the SOPInstanceUID of {paths[0]}" in b.reason for b in found.bad_files)
    assert "2 slice(s) repeating another slice's SOPInstanceUID were left out" in series.problems


def test_a_folder_of_nifti_and_images_is_named_not_called_empty(tmp_path: Path) -> None:
    """No DICOM, but files ichscan reads one by one: say how many and what to give instead."""
    from PIL import Image

    for name in ("a.png", "b.png", "c.jpg"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    with pytest.raises(InputError) as error:
        discover(tmp_path)
    message = str(error.value)
    assert "no DICOM files" in message and "3 image file(s)" in message
    assert "a.png" in message and "ichscan prepare" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no DICOM files found$"):
        discover(empty)
