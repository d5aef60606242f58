"""Every bad upload gets a clear status and one line naming the problem, never a crash, and
leaves nothing behind: too large (413), zips with too many files, too much uncompressed
data or a bomb inside (413), zip entries that point outside (422), non-CT, non-image,
corrupt or mixed inputs (422), not multipart (415). Stored names are the server's."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import dicom_files, series_zip, zip_bytes

from ichscan.io.dicom_write import write_ct_series
from ichscan.io.load import load
from ichscan.serve import Limits
from ichscan.serve.uploads import shown_name, stored_suffix

pytest_plugins = ["serve_fixtures"]
pytestmark = [pytest.mark.usefixtures("single_threaded_torch"), pytest.mark.timeout(120)]


def _refused(client, files, status: int, *needles: str) -> str:
    response = client.post("/api/scans", files=files)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for needle in needles:
        assert needle in detail, detail
    # Nothing left behind: no scan listed, no folder on disk.
    assert client.get("/api/scans").json()["scans"] == []
    assert list(client.app.state.scans.root.iterdir()) == []
    return detail


# -- size -------------------------------------------------------------------------------


def test_upload_larger_than_the_limit_is_413_while_streaming(make_client) -> None:
    client = make_client(limits=Limits(max_upload_bytes=10_000))
    # Under the declared-length check (which allows for multipart framing), over the limit.
    files = [("files", ("big.dcm", b"\0" * 50_000, "application/dicom"))]
    _refused(client, files, 413, "larger than")


def test_upload_declaring_more_than_the_limit_is_413_before_reading(make_client) -> None:
    client = make_client(limits=Limits(max_upload_bytes=10_000))
    files = [("files", ("big.dcm", b"\0" * 2_000_000, "application/dicom"))]
    _refused(client, files, 413, "larger than")


def test_too_many_files_in_one_upload(make_client, series_dir: Path) -> None:
    client = make_client(limits=Limits(max_files=3))
    _refused(client, dicom_files(series_dir), 413, "more than 3 files")


# -- zips --------------------------------------------------------------------------------


def test_zip_with_too_many_files(make_client, series_dir: Path) -> None:
    client = make_client(limits=Limits(max_zip_members=5))
    files = [("files", ("s.zip", series_zip(series_dir), "application/zip"))]
    _refused(client, files, 413, "s.zip", "8 files, more than 5")


def test_zip_that_expands_past_the_limit(make_client, series_dir: Path) -> None:
    client = make_client(limits=Limits(max_zip_bytes=50_000))
    files = [("files", ("s.zip", series_zip(series_dir), "application/zip"))]
    _refused(client, files, 413, "s.zip", "expands to")


def test_zip_bomb(make_client) -> None:
    client = make_client()
    bomb = zip_bytes({"slice.dcm": b"\0" * 20_000_000})
    assert len(bomb) < 100_000
    files = [("files", ("bomb.zip", bomb, "application/zip"))]
    _refused(client, files, 413, "bomb.zip", "zip bomb")


@pytest.mark.parametrize(
    "entry", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:\\evil.dcm"]
)
def test_zip_entry_pointing_outside_is_422(make_client, series_dir: Path, entry: str) -> None:
    client = make_client()
    first = sorted(series_dir.glob("*.dcm"))[0].read_bytes()
    files = [("files", ("s.zip", zip_bytes({entry: first}), "application/zip"))]
    _refused(client, files, 422, "points outside the archive")


def test_unreadable_zip_is_422(make_client) -> None:
    client = make_client()
    files = [("files", ("s.zip", b"PK\x03\x04 not really a zip", "application/zip"))]
    _refused(client, files, 422, "s.zip", "not a readable zip")


# -- not CT, not readable ---------------------------------------------------------------------


def test_non_ct_dicom_is_422_with_the_reason(make_client, series_dir: Path, tmp_path: Path) -> None:
    write_ct_series(load(series_dir).hu[:2], tmp_path / "mr", modality="MR")
    client = make_client()
    files = [
        ("files", (f"brain_mr_{k}.dcm", p.read_bytes(), "application/dicom"))
        for k, p in enumerate(sorted((tmp_path / "mr").glob("*.dcm")))
    ]
    detail = _refused(client, files, 422, "brain_mr_0.dcm", "modality is MR, not CT")
    # The user's names, never the server's paths.
    assert str(client.app.state.scans.root) not in detail


def test_text_file_is_422(make_client) -> None:
    client = make_client()
    files = [("files", ("notes.txt", b"hello, not a scan", "text/plain"))]
    _refused(client, files, 422, "notes.txt")


def test_corrupt_pixel_data_is_422(make_client, series_dir: Path) -> None:
    """Headers read fine; the pixels do not decode (found by the worker, still a 422)."""
    client = make_client()
    data = sorted(series_dir.glob("*.dcm"))[0].read_bytes()
    files = [("files", ("cut.dcm", data[: len(data) - 3000], "application/dicom"))]
    _refused(client, files, 422, "cut.dcm")


def test_corrupt_nifti_is_422(make_client) -> None:
    client = make_client()
    files = [("files", ("head.nii.gz", b"\x1f\x8b not gzip at all", "application/gzip"))]
    _refused(client, files, 422, "head.nii.gz", "not a readable NIfTI")


def test_nifti_that_is_not_a_volume_is_422(make_client, tmp_path: Path) -> None:
    import nibabel as nib

    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), dtype=np.int16), np.eye(4)), path)
    client = make_client()
    files = [("files", ("series.nii.gz", path.read_bytes(), "application/gzip"))]
    _refused(client, files, 422, "series.nii.gz", "expected one 3-D volume")


def test_nifti_refused_at_intake_as_the_cli_refuses_it(make_client, tmp_path: Path) -> None:
    """A NaN affine is refused from the header at upload, with read_nifti's words."""
    import nibabel as nib

    path = tmp_path / "head.nii"
    img = nib.Nifti1Image(np.zeros((8, 8, 4), dtype=np.int16), np.eye(4))
    img.header.set_qform(None, code=0)
    nib.save(img, path)
    data = bytearray(path.read_bytes())
    data[280:284] = np.float32(np.nan).tobytes()  # srow_x[0]: nibabel will not write NaN
    client = make_client()
    files = [("files", ("head.nii", bytes(data), "application/octet-stream"))]
    _refused(client, files, 422, "head.nii", "affine")


def test_corrupt_image_is_422(make_client) -> None:
    client = make_client()
    files = [("files", ("slice.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]
    _refused(client, files, 422, "slice.png", "not a readable image")


def test_mixed_inputs_are_422(make_client) -> None:
    client = make_client()
    files = [
        ("files", ("a.png", b"x", "image/png")),
        ("files", ("b.nii.gz", b"y", "application/gzip")),
    ]
    _refused(client, files, 422, "one scan per upload")


# -- not a multipart upload of files -------------------------------------------------------------


def test_not_multipart_is_415(make_client) -> None:
    client = make_client()
    response = client.post("/api/scans", json={"files": ["a.dcm"]})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_no_files_is_422(make_client) -> None:
    client = make_client()
    response = client.post(
        "/api/scans",
        content=b"--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 422
    assert "no files" in response.json()["detail"]


def test_wrong_field_name_is_422(make_client, series_dir: Path) -> None:
    client = make_client()
    files = [("file", ("a.dcm", b"x", "application/dicom"))]
    _refused(client, files, 422, "unexpected form field 'file'")


def test_text_field_instead_of_files_is_422(make_client) -> None:
    client = make_client()
    response = client.post("/api/scans", data={"files": "a.dcm"}, files=[("other", ("x", b"", ""))])
    assert response.status_code == 422


def test_malformed_multipart_is_422(make_client) -> None:
    client = make_client()
    response = client.post(
        "/api/scans",
        content=b'--b\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n'
        b"garbage without an end",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code in (400, 422)
    assert list(client.app.state.scans.root.iterdir()) == []


# -- names ---------------------------------------------------------------------------------------


def test_stored_names_are_the_servers(make_client, series_dir: Path) -> None:
    client = make_client()
    files = [
        ("files", (f"../../../../tmp/evil{k}", data, "application/dicom"))
        for k, (_, (_, data, _)) in enumerate(dicom_files(series_dir))
    ]
    record = client.post("/api/scans", files=files).json()
    assert record["status"] == "done"
    upload = client.app.state.scans.folder(record["id"]) / "upload"
    assert sorted(p.name for p in upload.iterdir()) == [f"{k:04d}" for k in range(8)]
    assert record["upload"]["names"][0] == "evil0"
    assert not Path("/tmp/evil0").exists()


@pytest.mark.parametrize(
    ("raw", "shown", "suffix"),
    [
        ("C:\\fakepath\\head.nii.gz", "head.nii.gz", ".nii.gz"),
        ("../../etc/passwd", "passwd", ""),
        ("scan\x00\n.zip", "scan.zip", ".zip"),
        ("IM0001", "IM0001", ""),
        ("SLICE.PNG", "SLICE.PNG", ".png"),
        ("", "unnamed", ""),
    ],
)
def test_shown_names_and_kept_suffixes(raw: str, shown: str, suffix: str) -> None:
    assert shown_name(raw) == shown
    assert stored_suffix(shown_name(raw)) == suffix


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_jpeg_is_read_as_an_image(make_client, png_bundle: Path) -> None:
    from ichscan.infer.predictor import Predictor

    client = make_client(predictor=Predictor(png_bundle, device="cpu"))
    files = [("files", ("slice.JPG", _jpeg(), "image/jpeg"))]
    response = client.post("/api/scans", files=files)
    assert response.status_code == 201, response.text
    assert response.json()["upload"]["kind"] == "image"


def test_image_for_a_model_that_needs_hu_is_422(make_client) -> None:
    client = make_client()
    files = [("files", ("slice.jpg", _jpeg(), "image/jpeg"))]
    _refused(client, files, 422, "slice.jpg", "already windowed")


def test_many_small_files_do_not_hold_a_descriptor_each(make_client) -> None:
    """Each part's file is closed when the part ends: 1,500 files pass under a descriptor
    limit of (what is open now + 200), as they would under a common 1,024."""
    resource = pytest.importorskip("resource")
    client = make_client()
    files = [("files", (f"f{k}.dcm", b"x" * 10, "application/dicom")) for k in range(1500)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(list(Path("/proc/self/fd").iterdir())) if Path("/proc/self/fd").exists() else 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, in_use + 200), hard))
    try:
        response = client.post("/api/scans", files=files)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Read, found not to be DICOM, refused: no "too many open files" on the way.
    assert response.status_code == 422, response.text
    assert "no readable CT series" in response.json()["detail"]


def test_large_file_that_is_not_dicom_is_refused_at_once(make_client) -> None:
    """2 MB of zeros: the forced DICOM parse would crawl through it; the upload is refused
    from its first bytes instead."""
    client = make_client()
    files = [("files", ("zeros.dcm", b"\0" * 2_000_000, "application/dicom"))]
    t0 = time.perf_counter()
    _refused(client, files, 422, "zeros.dcm: not a DICOM file (no DICM marker)")
    assert time.perf_counter() - t0 < 10


def test_large_zip_member_that_is_not_dicom_is_refused(make_client, series_dir: Path) -> None:
    import zipfile

    rng = np.random.default_rng(0)
    members = {p.name: p.read_bytes() for p in sorted(series_dir.glob("*.dcm"))}
    members["junk.bin"] = rng.integers(0, 256, 2_000_000, dtype=np.uint8).tobytes()
    files = [("files", ("s.zip", zip_bytes(members, zipfile.ZIP_STORED), "application/zip"))]
    _refused(make_client(), files, 422, "s.zip!junk.bin: not a DICOM file")


# A member over the sniff threshold (1 MB) that zipfile cannot open or decompress: its
# problem, in the CLI's words, and the offsets that break it in both of its headers.
_BROKEN_BIG_MEMBER = {
    "encrypted": "zip entry is encrypted (password-protected)",
    "bad_deflate": "zip entry is damaged: its compressed data cannot be decompressed",
    "deflate64": "zip entry uses compression Deflate64, which cannot be read",
}


def _zip_with_broken_big_member(how: str, good: dict[str, bytes]) -> bytes:
    """``big.dcm`` (1.2 MB that starts like DICOM) first, encrypted-flagged, with a deflate
    stream that cannot be decoded, or with Deflate64 (method 9) set; then ``good``."""
    import struct
    import zipfile

    big = bytes(128) + b"DICM" + np.random.default_rng(0).bytes(1_200_000)
    raw = bytearray(zip_bytes({"big.dcm": big, **good}, zipfile.ZIP_DEFLATED))
    central = raw.index(b"PK\x01\x02")  # big.dcm's entry is the first of both kinds
    assert raw[:4] == b"PK\x03\x04" and raw[central + 46 : central + 53] == b"big.dcm"
    if how == "encrypted":
        raw[6] |= 0x1
        raw[central + 8] |= 0x1
    elif how == "deflate64":
        struct.pack_into("<H", raw, 8, 9)
        struct.pack_into("<H", raw, central + 10, 9)
    else:  # the first block's type set to 3, which no deflate stream has
        name_len, extra_len = struct.unpack_from("<HH", raw, 26)
        raw[30 + name_len + extra_len] |= 0x06
    return bytes(raw)


@pytest.mark.parametrize("how", sorted(_BROKEN_BIG_MEMBER))
def test_large_zip_member_that_cannot_be_read_is_skipped_and_the_rest_read(
    make_client, series_dir: Path, caplog, how: str
) -> None:
    """The CLI skips such a member and reads the rest; so does the server, naming it in a
    warning, without calling it an unexpected error."""
    good = {p.name: p.read_bytes() for p in sorted(series_dir.glob("*.dcm"))}
    files = [("files", ("s.zip", _zip_with_broken_big_member(how, good), "application/zip"))]
    client = make_client()
    with caplog.at_level(logging.INFO, logger="ichscan.serve"):
        response = client.post("/api/scans", files=files)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["status"] == "done", record
    warning = f"skipped s.zip!big.dcm: {_BROKEN_BIG_MEMBER[how]}"
    assert any(w.startswith(warning) for w in record["warnings"]), record["warnings"]
    assert all("\n" not in w and "ZipInfo" not in w for w in record["warnings"])
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "unexpected" not in caplog.text


@pytest.mark.parametrize("how", sorted(_BROKEN_BIG_MEMBER))
def test_zip_whose_only_member_cannot_be_read_is_422_naming_it(
    make_client, caplog, how: str
) -> None:
    files = [("files", ("s.zip", _zip_with_broken_big_member(how, {}), "application/zip"))]
    with caplog.at_level(logging.INFO, logger="ichscan.serve"):
        detail = _refused(make_client(), files, 422, "s.zip!big.dcm", _BROKEN_BIG_MEMBER[how])
    assert "ZipInfo" not in detail and "cannot be read (" not in detail
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_sidecar_files_are_kept_aside_as_discovery_would(make_client, series_dir: Path) -> None:
    client = make_client()
    extras = [
        ("files", ("README.txt", b"exported by a PACS", "text/plain")),
        ("files", ("report.pdf", b"%PDF-1.4", "application/pdf")),
        ("files", (".DS_Store", b"\0\0\0\1Bud1", "application/octet-stream")),
    ]
    record = client.post("/api/scans", files=dicom_files(series_dir) + extras).json()
    assert record["status"] == "done" and record["warnings"] == []
    upload = client.app.state.scans.folder(record["id"]) / "upload"
    assert {"0008.txt", "0009.pdf", ".0010"} <= {p.name for p in upload.iterdir()}


def test_only_sidecar_files_is_422(make_client) -> None:
    files = [("files", ("README.txt", b"x", "text/plain")), ("files", ("a.csv", b"y", "text/csv"))]
    _refused(make_client(), files, 422, "no DICOM, NIfTI or image file", "README.txt")


# -- whatever a reader raises: 422 naming the file, traceback in the server log -----------


class _Boom(Exception):
    """Stands for an exception no reader expects (RecursionError, DecompressionBombError,
    zlib.error, LinAlgError...): the layers above must still answer one clear line."""


def _one_png(name: str = "slice.png") -> list:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return [("files", (name, buffer.getvalue(), "image/png"))]


def _unexpected_logged(caplog: pytest.LogCaptureFixture, *needles: str) -> None:
    """The server log keeps the traceback and says it was unexpected (a reader hole or a
    bug), which a plain refusal of bad input never does."""
    records = [r for r in caplog.records if r.exc_info and "unexpected" in r.getMessage()]
    assert records, caplog.text
    for needle in needles:
        assert needle in records[0].getMessage(), records[0].getMessage()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("dicom", RecursionError("maximum recursion depth exceeded while calling a Python object")),
        ("zip", NotImplementedError("That compression method is not supported")),
        ("image", _Boom("Image size (10000000000 pixels) exceeds limit\nof 178956970 pixels")),
    ],
)
def test_unexpected_error_while_checking_the_upload_is_422_naming_the_file(
    make_client, series_dir: Path, monkeypatch, caplog, kind: str, error: Exception
) -> None:
    def raise_it(*args, **kwargs):
        raise error

    if kind == "image":
        monkeypatch.setattr("ichscan.io.image.read_grey", raise_it)
        files, name = _one_png("bomb.png"), "bomb.png"
    else:
        monkeypatch.setattr("ichscan.serve.intake.discover", raise_it)
        if kind == "zip":
            files, name = [("files", ("s.zip", series_zip(series_dir), "application/zip"))], "s.zip"
        else:
            files, name = dicom_files(series_dir), "(+7 files)"
    client = make_client()
    with caplog.at_level(logging.ERROR, logger="ichscan.serve"):
        detail = _refused(client, files, 422, name, type(error).__name__)
    assert str(error).split("\n")[0] in detail
    assert str(client.app.state.scans.root) not in detail
    _unexpected_logged(caplog, name)
    assert client.get("/api/health").status_code == 200


@pytest.mark.parametrize(
    ("stage", "error", "needle"),
    [
        ("read", TypeError("object of type 'NoneType' has no len()"), "has no len()"),
        ("read", MemoryError(), "MemoryError: out of memory"),
        ("predict", np.linalg.LinAlgError("Singular matrix"), "Singular matrix"),
    ],
)
def test_unexpected_error_while_processing_is_422_naming_the_file(
    make_client, series_dir: Path, served_predictor, monkeypatch, caplog, stage, error, needle
) -> None:
    from ichscan.serve.processing import Processor

    def raise_it(*args, **kwargs):
        raise error

    if stage == "read":
        monkeypatch.setattr(Processor, "read_scan", raise_it)
    else:
        monkeypatch.setattr(served_predictor, "prepare", raise_it)
    client = make_client()
    data = sorted(series_dir.glob("*.dcm"))[0].read_bytes()
    files = [("files", ("empty_pixels.dcm", data, "application/dicom"))]
    with caplog.at_level(logging.ERROR, logger="ichscan.serve"):
        detail = _refused(client, files, 422, "empty_pixels.dcm", type(error).__name__, needle)
    assert "internal error" not in detail
    _unexpected_logged(caplog, "empty_pixels.dcm", stage)
    # The server goes on: the next upload is read and predicted.
    monkeypatch.undo()
    record = client.post("/api/scans", files=dicom_files(series_dir)).json()
    assert record["status"] == "done", record


def test_bad_input_refused_by_a_reader_is_logged_without_a_traceback(make_client, caplog) -> None:
    client = make_client()
    files = [("files", ("slice.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]
    with caplog.at_level(logging.INFO, logger="ichscan.serve"):
        _refused(client, files, 422, "slice.png")
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_multi_line_reader_messages_become_one_line(make_client, monkeypatch) -> None:
    from ichscan.errors import InputError

    def decoders_fail(path, *args, **kwargs):
        raise InputError(path, "cannot decode pixel data:\n - pylibjpeg: bad\n - gdcm: worse")

    monkeypatch.setattr("ichscan.io.image.read_grey", decoders_fail)
    _refused(make_client(), _one_png("x.png"), 422, "x.png", "pylibjpeg: bad", "gdcm: worse")


@pytest.mark.parametrize(
    ("name", "fmt"), [("slice.tif", "TIFF"), ("S.TIFF", "TIFF"), ("s.bmp", "BMP")]
)
def test_tiff_and_bmp_are_read_as_images_as_the_cli_reads_them(
    make_client, png_bundle: Path, name: str, fmt: str
) -> None:
    from ichscan.infer.predictor import Predictor

    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8)).save(buffer, format=fmt)
    client = make_client(predictor=Predictor(png_bundle, device="cpu"))
    response = client.post("/api/scans", files=[("files", (name, buffer.getvalue(), "image/x"))])
    assert response.status_code == 201, response.text
    assert response.json()["upload"]["kind"] == "image"
    assert stored_suffix(name) == Path(name.lower()).suffix
