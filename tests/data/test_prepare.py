"""`prepare` stores every manifest row exactly as the single-slice readers give it, survives
bad files, resumes, and gives the same cache on a process pool and on Ray."""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import shared
from ichscan.data.cache import PreparedCache, marker_path, shard_path, temp_path
from ichscan.data.manifest import normalise, write_manifest
from ichscan.data.phantom import make_head_phantom
from ichscan.data.prepare import prepare, read_row
from ichscan.errors import InputError
from ichscan.io.dicom_write import write_ct_series
from ichscan.io.image import read_grey
from ichscan.io.nifti import read_nifti
from ichscan.labels import RSNA
from ichscan.preprocess.resize import resize_slice
from ichscan.preprocess.slice_input import dicom_to_input
from ichscan.preprocess.window import stack_windows

SIZE = 32


def manifest(rows: Sequence[dict[str, object]]) -> pd.DataFrame:
    """A normalised RSNA manifest; ids default to the row number, `any` alternates."""
    filled = [
        {
            "image_id": f"img{i:03d}",
            "patient_id": f"p{i // 4}",
            "slice_index": i,
            "any": i % 2,
            **row,
        }
        for i, row in enumerate(rows)
    ]
    return normalise(pd.DataFrame(filled), RSNA)


def dicom_rows(paths: Sequence[Path]) -> list[dict[str, object]]:
    return [{"path": str(p), "kind": "dicom", "slice_index": k} for k, p in enumerate(paths)]


def run(df: pd.DataFrame, out: Path, **kw: object):
    kw = {"size": SIZE, "workers": 1, "progress": False, **kw}
    return prepare(df, out, **kw)


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Seven 64x64 phantom CT slices (the shard-boundary case needs 7 rows)."""
    hu, _ = make_head_phantom((7, 64, 64), (5.0, 3.6, 3.6), seed=3)
    return write_ct_series(hu, tmp_path_factory.mktemp("dicom"), pixel_spacing=(3.6, 3.6))


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 10)
    return path


# --- per kind ---------------------------------------------------------------------------


def test_dicom_rows_equal_dicom_to_input_across_shard_boundaries(
    dicoms: list[Path], tmp_path: Path
) -> None:
    result = run(manifest(dicom_rows(dicoms)), tmp_path / "c", shard_size=3)
    assert (result.n_ok, result.n_bad, result.n_shards, result.n_skipped_shards) == (7, 0, 3, 0)
    shards = [np.load(shard_path(tmp_path / "c", s)) for s in range(3)]
    assert [s.shape[0] for s in shards] == [3, 3, 1]
    cache = PreparedCache(tmp_path / "c")
    assert len(cache) == 7
    assert cache.index["shard"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert cache.index["offset"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    for i, path in enumerate(dicoms):
        expected = dicom_to_input(path, size=SIZE)
        assert cache[i].shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(cache[i], expected)
    # Manifest order and columns are kept; labels come through.
    assert cache.index["image_id"].tolist() == [f"img{i:03d}" for i in range(7)]
    assert cache.labels()[:, 0].tolist() == [0, 1, 0, 1, 0, 1, 0]


def test_zip_member_rows_equal_the_file_rows(dicoms: list[Path], tmp_path: Path) -> None:
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in dicoms[:2]:
            zf.write(p, f"series/{p.name}")
    rows = [
        {"path": str(archive), "member": f"series/{p.name}", "kind": "dicom"} for p in dicoms[:2]
    ]
    rows.append({"path": str(archive), "member": "series/missing.dcm", "kind": "dicom"})
    result = run(manifest(rows), tmp_path / "c", windows="brain,bone", mode="sigmoid")
    cache = PreparedCache(tmp_path / "c")
    for i in range(2):
        expected = dicom_to_input(dicoms[i], "brain,bone", SIZE, "sigmoid")
        np.testing.assert_array_equal(cache[i], expected)
    assert result.n_bad == 1
    assert "no member" in json.loads(result.report.read_text())["bad"][0]["reason"]


def test_png_rows_are_resized_and_repeated_in_every_channel(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(40, 40), (50, 30)]):
        paths.append(tmp_path / f"slice{i}.png")
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(paths[-1])
    df = manifest([{"path": str(p), "kind": "image", "window": "brain"} for p in paths])
    run(df, tmp_path / "c")
    cache = PreparedCache(tmp_path / "c")
    for i, path in enumerate(paths):
        grey = resize_slice(read_grey(path), SIZE)
        for c in range(3):
            np.testing.assert_array_equal(cache[i][..., c], grey)
    assert "cannot give a bone window" in cache.facts["input_note"]


def test_a_brain_and_head_cache_holds_both_crops(dicoms: list[Path], tmp_path: Path) -> None:
    """``--crop brain+head`` stores each slice's brain crop and, as one more plane, its head
    crop: the very pixels a brain cache and a head cache hold, for DICOM and PNG rows; and
    the predictor gives a bundle of that crop the same planes."""
    from ichscan.infer.inputs import scan_to_model_input
    from ichscan.io.load import load
    from ichscan.models.bundle import input_spec

    png = tmp_path / "slice.png"
    Image.fromarray(dicom_to_input(dicoms[2], ("brain",), None)[..., 0]).save(png)
    rows = [*dicom_rows(dicoms[:2]), {"path": str(png), "kind": "image", "window": "brain"}]
    caches = {}
    for crop in ("brain", "head", "brain+head"):
        run(manifest(rows), tmp_path / crop, windows=("brain",), crop=crop)
        caches[crop] = PreparedCache(tmp_path / crop)
    both = caches["brain+head"]
    assert (both.crop, both.channels) == ("brain+head", 2)
    for i in range(len(rows)):
        np.testing.assert_array_equal(both[i][..., 0], caches["brain"][i][..., 0])
        np.testing.assert_array_equal(both[i][..., 1], caches["head"][i][..., 0])
    spec = input_spec(
        ("brain",), SIZE, mean=[0.0] * 3, std=[1.0] * 3, source_window="brain", crop="brain+head"
    )
    x = scan_to_model_input(load(png, image_window="brain"), spec)[0]
    np.testing.assert_array_equal(x, both[2][..., [0, 1, 0]].transpose(2, 0, 1))


def test_nifti_rows_are_slice_k_of_read_nifti(tmp_path: Path) -> None:
    hu, _ = make_head_phantom((5, 48, 40), (5.0, 4.0, 4.0), seed=2)
    # Stored [y, z, x] with z and x running backwards: not RAS, not even slices-last, so the
    # per-slice index plan has to undo a permutation and flips.
    data = hu.transpose(1, 0, 2)[:, ::-1, ::-1].copy()
    affine = np.array([[0, 0, -4.0, 80], [4.0, 0, 0, -90], [0, -5.0, 0, 30], [0, 0, 0, 1]])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    reference = read_nifti(path).hu
    order = [3, 0, 4, 1]
    df = manifest([{"path": str(path), "kind": "nifti", "slice_index": k} for k in order])
    run(df, tmp_path / "c", mode="sigmoid")
    cache = PreparedCache(tmp_path / "c")
    for i, k in enumerate(order):
        expected = resize_slice(stack_windows(reference[k], mode="sigmoid"), SIZE)
        np.testing.assert_array_equal(cache[i], expected)
    # An index past the end is a bad row, not a crash.
    bad = manifest([{"path": str(path), "kind": "nifti", "slice_index": 9}])
    assert "outside" in read_row_error(bad.iloc[0])


def _sform_only(path: Path, value: float) -> Path:
    """A small volume whose only affine (the sform) is filled with `value`."""
    import struct

    nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.int16), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<hh", raw, 252, 0, 1)  # qform_code 0, sform_code 1
    struct.pack_into("<12f", raw, 280, *(value,) * 12)
    path.write_bytes(bytes(raw))
    return path


def test_nifti_rows_get_read_niftis_header_checks(tmp_path: Path) -> None:
    # A manifest made elsewhere can name any volume: prepare refuses what read_nifti does,
    # in one line naming the file, and goes on with the next rows.
    import struct

    grid = np.diag([0.5, 0.5, 5.0, 1.0])
    bad: dict[Path, str] = {
        _sform_only(tmp_path / "nan_affine.nii", np.nan): "affine is not finite",
        _sform_only(tmp_path / "zero_affine.nii", 0.0): "affine is singular",
    }
    for name, data, problem in [
        ("all_nan.nii.gz", np.full((6, 6, 3), np.nan, np.float32), "no voxel holds a number"),
        ("complex.nii.gz", np.zeros((6, 6, 3), np.complex64), "holds complex numbers"),
        (
            "rgb24.nii.gz",
            np.zeros((6, 6, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]),
            "voxel type RGB24 is not a greyscale intensity",
        ),
    ]:
        nib.save(nib.Nifti1Image(data, grid), str(tmp_path / name))
        bad[tmp_path / name] = problem
    huge = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.int16), grid), str(huge))
    raw = bytearray(huge.read_bytes())
    struct.pack_into("<8h", raw, 40, 3, 1500, 1500, 1500, 1, 1, 1, 1)
    huge.write_bytes(bytes(raw[:352]) + bytes(1000))
    bad[huge] = "header declares 1500x1500x1500 voxels"
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 3), -1000, np.int16), grid), str(good))
    rows = [{"path": str(p), "kind": "nifti", "slice_index": k} for p in bad for k in (0, 1)]
    rows.append({"path": str(good), "kind": "nifti", "slice_index": 2})
    result = run(manifest(rows), tmp_path / "c", shard_size=3)
    assert (result.n_ok, result.n_bad) == (1, 2 * len(bad))
    report = json.loads(result.report.read_text())
    for entry in report["bad"]:
        problem = bad[Path(entry["path"])]
        assert problem in entry["reason"], entry
        assert "\n" not in entry["reason"]


def test_nifti_nan_voxels_are_read_as_air_like_read_nifti(tmp_path: Path) -> None:
    hu, _ = make_head_phantom((3, 24, 20), (5.0, 4.0, 4.0), seed=4)
    data = hu.transpose(2, 1, 0).astype(np.float32)  # [x, y, z], RAS
    data[:5, :, 1] = np.nan
    data[0, 0, 2] = np.inf
    data[:, :, 0] = np.nan  # a whole slice: still air, the volume has numbers elsewhere
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 5.0, 1.0])), str(path))
    reference = read_nifti(path).hu
    assert any("NaN or infinite" in w for w in read_nifti(path).warnings)
    df = manifest([{"path": str(path), "kind": "nifti", "slice_index": k} for k in range(3)])
    result = run(df, tmp_path / "c")
    assert result.n_bad == 0
    cache = PreparedCache(tmp_path / "c")
    for k in range(3):
        np.testing.assert_array_equal(cache[k], resize_slice(stack_windows(reference[k]), SIZE))


def read_row_error(row: pd.Series) -> str:
    with pytest.raises(InputError) as info:
        read_row(row, size=SIZE)
    return info.value.problem


# --- bad input --------------------------------------------------------------------------


def test_corrupt_file_is_listed_zero_filled_and_the_run_goes_on(
    dicoms: list[Path], corrupt: Path, tmp_path: Path
) -> None:
    rows = dicom_rows(dicoms[:2])
    rows.insert(1, {"path": str(corrupt), "kind": "dicom"})
    rows.append({"path": str(tmp_path / "gone.png"), "kind": "image"})
    result = run(manifest(rows), tmp_path / "c", shard_size=2)
    assert (result.n_ok, result.n_bad) == (2, 2)
    cache = PreparedCache(tmp_path / "c")
    assert cache.ok.tolist() == [True, False, True, False]
    assert not cache[1].any() and not cache[3].any()
    np.testing.assert_array_equal(cache[2], dicom_to_input(dicoms[1], size=SIZE))
    report = json.loads(result.report.read_text())
    assert report["counts"]["bad"] == 2
    assert [b["path"] for b in report["bad"]] == [str(corrupt), str(tmp_path / "gone.png")]
    assert all(b["reason"] for b in report["bad"])
    assert "not found" in report["bad"][1]["reason"]


def test_all_bad_raises_input_error(corrupt: Path, tmp_path: Path) -> None:
    df = manifest([{"path": str(corrupt), "kind": "dicom"}] * 2)
    with pytest.raises(InputError, match="no usable slice"):
        run(df, tmp_path / "c")
    assert (tmp_path / "c" / "report.json").is_file()
    assert not PreparedCache.is_cache(tmp_path / "c")


def test_bad_arguments_fail_before_any_work(dicoms: list[Path], tmp_path: Path) -> None:
    df = manifest(dicom_rows(dicoms[:1]))
    with pytest.raises(ValueError, match="unknown window"):
        run(df, tmp_path / "c", windows="brain,lung")
    with pytest.raises(ValueError, match="at most 3"):
        run(df, tmp_path / "c", windows="brain,subdural,bone,soft")
    with pytest.raises(ValueError, match="adds a plane: at most 2 windows"):
        run(df, tmp_path / "c", windows="brain,subdural,bone", crop="brain+head")
    with pytest.raises(InputError, match="no rows"):
        run(df.iloc[:0], tmp_path / "c")


def test_manifest_file_input(dicoms: list[Path], tmp_path: Path) -> None:
    path = write_manifest(manifest(dicom_rows(dicoms[:2])), tmp_path / "m.parquet", RSNA)
    prepare(path, tmp_path / "c", size=SIZE, workers=1, progress=False)
    cache = PreparedCache(tmp_path / "c")
    assert cache.facts["label_set"] == "rsna"
    assert cache.facts["manifest"]["source"] == str(path)


# --- resume -----------------------------------------------------------------------------


def test_resume_skips_finished_shards_and_redoes_an_interrupted_one(
    dicoms: list[Path], tmp_path: Path
) -> None:
    df, out = manifest(dicom_rows(dicoms)), tmp_path / "c"
    first = run(df, out, shard_size=3)
    mtimes = [shard_path(out, s).stat().st_mtime_ns for s in range(3)]
    reference = np.stack([np.asarray(PreparedCache(out)[i]) for i in range(7)])

    # Simulate a run killed while writing shard 1: the shard and its marker are gone, a
    # half-written temp file is left behind.
    shard_path(out, 1).unlink()
    marker_path(out, 1).unlink()
    temp_path(shard_path(out, 1)).write_bytes(b"half a shard")
    time.sleep(0.01)
    second = run(df, out, shard_size=3)
    assert (second.n_shards, second.n_skipped_shards) == (3, 2)
    assert shard_path(out, 0).stat().st_mtime_ns == mtimes[0]
    assert shard_path(out, 2).stat().st_mtime_ns == mtimes[2]
    assert shard_path(out, 1).stat().st_mtime_ns != mtimes[1]
    assert not temp_path(shard_path(out, 1)).exists()
    again = np.stack([np.asarray(PreparedCache(out)[i]) for i in range(7)])
    np.testing.assert_array_equal(again, reference)
    assert second.n_ok == first.n_ok == 7

    # Everything done: nothing is redone. Other rows or settings: the shard is redone.
    assert run(df, out, shard_size=3).n_skipped_shards == 3
    changed = df.copy()
    changed.loc[6, "path"] = str(dicoms[0])
    assert run(changed, out, shard_size=3).n_skipped_shards == 2
    assert run(changed, out, shard_size=3, size=16).n_skipped_shards == 0
    assert run(changed, out, shard_size=3, size=16, overwrite=True).n_skipped_shards == 0


def test_a_new_crop_version_redoes_cropped_shards(
    dicoms: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ichscan.data.prepare as prepare_module

    df, out = manifest(dicom_rows(dicoms)), tmp_path / "c"
    run(df, out, shard_size=3, crop="brain")
    assert PreparedCache(out).crop_version == prepare_module.CROP_VERSION
    assert run(df, out, shard_size=3, crop="brain").n_skipped_shards == 3
    # Slices cut by older masks are not reused under newer ones.
    monkeypatch.setattr(prepare_module, "CROP_VERSION", prepare_module.CROP_VERSION + 1)
    assert run(df, out, shard_size=3, crop="brain").n_skipped_shards == 0
    assert PreparedCache(out).crop_version == prepare_module.CROP_VERSION
    assert PreparedCache(out).facts["crop_version"] == prepare_module.CROP_VERSION


def test_a_new_hu_decode_redoes_shards(
    dicoms: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slices decoded by code that gave other HU for some files are not reused by a prepare
    without --force."""
    import ichscan.data.prepare as prepare_module

    df, out = manifest(dicom_rows(dicoms)), tmp_path / "c"
    run(df, out, shard_size=3)
    assert run(df, out, shard_size=3).n_skipped_shards == 3
    monkeypatch.setattr(prepare_module, "HU_DECODE_VERSION", prepare_module.HU_DECODE_VERSION + 1)
    assert run(df, out, shard_size=3).n_skipped_shards == 0
    assert PreparedCache(out).facts["hu_decode_version"] == prepare_module.HU_DECODE_VERSION


def test_a_shorter_manifest_drops_stale_shards(dicoms: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "c"
    run(manifest(dicom_rows(dicoms)), out, shard_size=3)
    result = run(manifest(dicom_rows(dicoms[:4])), out, shard_size=3)
    assert (result.n_shards, result.n_skipped_shards) == (2, 1)
    assert not shard_path(out, 2).exists() and not marker_path(out, 2).exists()
    assert len(PreparedCache(out)) == 4


# --- executors --------------------------------------------------------------------------


def shard_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / "shards").glob("shard-*.npy"))]


def test_process_pool_gives_the_same_cache(dicoms: list[Path], tmp_path: Path) -> None:
    df = manifest(dicom_rows(dicoms))
    run(df, tmp_path / "one", shard_size=2, workers=1)
    pooled = run(df, tmp_path / "pool", shard_size=2, workers=2)
    assert pooled.n_shards == 4
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "pool")
    index_one = pd.read_parquet(tmp_path / "one" / "index.parquet")
    pd.testing.assert_frame_equal(index_one, pd.read_parquet(tmp_path / "pool" / "index.parquet"))


def test_ray_local_gives_the_same_cache(dicoms: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is optional and not installed (pip install ray)")
    df = manifest(dicom_rows(dicoms))
    run(df, tmp_path / "pool", shard_size=3, workers=2)
    result = run(df, tmp_path / "ray", shard_size=3, workers=2, ray="local")
    assert (result.n_ok, result.n_shards) == (7, 3)
    assert shard_bytes(tmp_path / "pool") == shard_bytes(tmp_path / "ray")
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "pool" / "index.parquet"),
        pd.read_parquet(tmp_path / "ray" / "index.parquet"),
    )


def test_missing_ray_is_a_clear_error(
    dicoms: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(InputError, match="pip install ray"):
        run(manifest(dicom_rows(dicoms[:1])), tmp_path / "c", ray="local")


# --- real data --------------------------------------------------------------------------


def test_real_rsna_dicom_and_png(tmp_path: Path) -> None:
    dcms = sorted((shared("rsna_dicom") / "stage_2_train").glob("*.dcm"))
    pngs = sorted((shared("rsna_png") / "images").glob("*.png"))[:5]
    rows = [{"path": str(p), "kind": "dicom"} for p in dcms]
    rows += [{"path": str(p), "kind": "image", "window": "brain"} for p in pngs]
    result = prepare(manifest(rows), tmp_path / "c", size=64, workers=2, progress=False)
    assert (result.n_ok, result.n_bad) == (len(rows), 0)
    cache = PreparedCache(tmp_path / "c")
    for i, path in enumerate(dcms):
        np.testing.assert_array_equal(cache[i], dicom_to_input(path, size=64))
    for i, path in enumerate(pngs, start=len(dcms)):
        grey = resize_slice(read_grey(path), 64)
        np.testing.assert_array_equal(cache[i], np.repeat(grey[..., None], 3, axis=2))
    # A 128-byte .npy header, then the pixels and nothing else.
    assert os.path.getsize(shard_path(tmp_path / "c", 0)) == 128 + len(rows) * 64 * 64 * 3


def test_relative_paths_resolve_against_the_working_directory(
    dicoms: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(dicoms[0].parent)
    result = run(manifest([{"path": dicoms[0].name, "kind": "dicom"}]), tmp_path / "c")
    assert result.n_ok == 1
    monkeypatch.chdir(tmp_path)
    # Same row (now by its absolute path) into the same cache, named relatively: resumed.
    assert run(manifest(dicom_rows(dicoms[:1])), "c").n_skipped_shards == 1
    assert PreparedCache("c")[0].shape == (SIZE, SIZE, 3)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        run(manifest(dicom_rows(dicoms[:1])), "file")


def test_a_refused_volume_is_opened_once_for_all_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ichscan.data.prepare as prepare_module

    path = tmp_path / "all_nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 4), np.nan, np.float32), np.eye(4)), str(path))
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 1), -1000, np.int16), np.eye(4)), str(good))
    calls: list[str] = []
    real = prepare_module.has_a_number

    def counted(img: object, p: str) -> None:
        calls.append(Path(p).name)
        real(img, p)

    monkeypatch.setattr(prepare_module, "has_a_number", counted)
    rows = [{"path": str(path), "kind": "nifti", "slice_index": k} for k in range(4)]
    rows.append({"path": str(good), "kind": "nifti", "slice_index": 0})
    result = run(manifest(rows), tmp_path / "c")
    assert (result.n_ok, result.n_bad) == (1, 4)
    assert calls == ["all_nan.nii.gz", "good.nii.gz"]
    reasons = {b["reason"] for b in json.loads(result.report.read_text())["bad"]}
    assert reasons == {"no voxel holds a number (all are NaN or infinite)"}


# --- QA audit s18 -----------------------------------------------------------------------


def test_a_file_replaced_in_place_redoes_its_shard(dicoms: list[Path], tmp_path: Path) -> None:
    """Same path, same ids, other pixels (a corrected re-export): the shard key sees the
    file's size and modification time, so a re-run does not serve the old pixels."""
    import shutil

    folder = tmp_path / "data"
    folder.mkdir()
    paths = [Path(shutil.copy(p, folder / p.name)) for p in dicoms[:3]]
    df, out = manifest(dicom_rows(paths)), tmp_path / "c"
    run(df, out)
    before = os.stat(paths[1])
    shutil.copyfile(dicoms[5], paths[1])  # another slice's pixels under this name
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))

    again = run(df, out)
    assert again.n_skipped_shards == 0
    np.testing.assert_array_equal(PreparedCache(out)[1], dicom_to_input(paths[1], size=SIZE))
    assert run(df, out).n_skipped_shards == 1  # nothing changed since: resumed


def _cq500(root: Path, scans: int = 1) -> Path:
    from ichscan.data.synth import write_synthetic

    write_synthetic(root, n_scans=scans, layout="cq500", shape=(6, 32, 32), seed=3)
    return root


def test_series_rows_are_slabs_of_the_resliced_series(tmp_path: Path) -> None:
    """A `series` row is slab k of its series resliced to the manifest's slab thickness,
    windowed and resized: what `predict --reslice 5` reads for that series."""
    from ichscan.data.adapters import build_manifest
    from ichscan.io.load import load
    from ichscan.preprocess.reslice import reslice_scan
    from ichscan.preprocess.window import DEFAULT_WINDOWS, apply_lut, parse_windows, window_lut

    df, report, label_set = build_manifest(_cq500(tmp_path / "cq"), middle=4)
    out = tmp_path / "c"
    result = run(df, out, label_set=label_set, facts=report.facts(), shard_size=3)
    assert (result.n_ok, result.n_bad) == (4, 0)
    cache = PreparedCache(out)
    assert cache.facts["slab_mm"] == 5.0 and cache.facts["manifest"]["middle_slices"] == 4
    assert cache.slice_spacing_mm == 5.0  # what a bundle trained on it tells predict

    scan = load(df.at[0, "path"], series_uid=df.at[0, "member"])
    slabs = reslice_scan(scan, 5.0).hu
    lut = window_lut(parse_windows(DEFAULT_WINDOWS))
    for i, k in enumerate(df["slice_index"]):
        expected = resize_slice(apply_lut(slabs[k], lut), SIZE)
        np.testing.assert_array_equal(cache[i], expected)


def test_series_rows_without_a_slab_thickness_are_refused(tmp_path: Path) -> None:
    from ichscan.data.adapters import build_manifest

    df, _, label_set = build_manifest(_cq500(tmp_path / "cq"))
    with pytest.raises(InputError, match="slab"):
        run(df, tmp_path / "c", label_set=label_set)


def test_a_second_prepare_on_one_cache_is_refused_and_a_stale_lock_taken_over(
    dicoms: list[Path], tmp_path: Path
) -> None:
    import socket
    import subprocess
    import sys

    from ichscan.data.cache import LOCK_FILE

    df, out = manifest(dicom_rows(dicoms[:2])), tmp_path / "c"
    out.mkdir()
    lock = out / LOCK_FILE
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(InputError, match=f"pid {other.pid}") as refused:
            run(df, out)
        assert str(lock) in str(refused.value) and "\n" not in str(refused.value)
        assert not (out / "cache.json").exists()
    finally:
        other.kill()
        other.wait()
    # Its process is gone: the lock is stale and taken over, and let go at the end.
    assert run(df, out).n_ok == 2
    assert not lock.exists()


def test_the_lock_never_exists_without_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock read while its holder was still being written into it looked stale, and a
    second prepare took it over: the lock must appear with its holder already in it."""
    import ichscan.data.cache as cache_module

    lock, real, empty_lock_seen = tmp_path / cache_module.LOCK_FILE, json, []

    class Spy:  # json, noting whether the lock exists empty while the holder is written
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def _look(self) -> None:
            empty_lock_seen.append(lock.exists() and not lock.read_text())

        def dump(self, obj: object, f: object, **kw: object) -> None:
            self._look()
            real.dump(obj, f, **kw)  # type: ignore[arg-type]

        def dumps(self, obj: object, **kw: object) -> str:
            self._look()
            return real.dumps(obj, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_module, "json", Spy())
    with cache_module.prepare_lock(tmp_path) as held:
        assert real.loads(held.read_text())["pid"] == os.getpid()
        assert [p.name for p in tmp_path.iterdir()] == [cache_module.LOCK_FILE]
    assert empty_lock_seen and not any(empty_lock_seen)
    assert not any(tmp_path.iterdir())
