"""The REST API with FastAPI's test client: token, model info, every input kind, the slice
images and heatmaps, the scan list, restarts, and answering while a scan is processed."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_helpers import RSNA, bleed_explainer, dicom_files, series_zip, wait_done

from ichscan.io.dicom_write import write_ct_series
from ichscan.io.load import load
from ichscan.io.nifti import write_nifti
from ichscan.serve.processing import Processor

pytest_plugins = ["serve_fixtures"]
pytestmark = [pytest.mark.usefixtures("single_threaded_torch"), pytest.mark.timeout(120)]


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


# -- token ------------------------------------------------------------------------------


def test_health_needs_no_token_and_every_api_call_does(make_client, series_dir: Path) -> None:
    client = make_client(token="s3cret")
    health = client.get("/api/health")
    assert health.status_code == 200
    assert health.json()["token_required"] is True
    for method, url in [
        ("get", "/api/model"),
        ("get", "/api/scans"),
        ("get", "/api/scans/" + "0" * 32),
        ("get", "/api/scans/" + "0" * 32 + "/slices/0.png"),
        ("delete", "/api/scans/" + "0" * 32),
        ("get", "/api/worklist"),
    ]:
        response = client.request(method, url)
        assert response.status_code == 401, url
        assert response.headers["www-authenticate"] == "Bearer"
    refused = client.post("/api/scans", files=dicom_files(series_dir))
    assert refused.status_code == 401
    wrong = client.get("/api/scans", headers={"Authorization": "Bearer s3cre"})
    assert wrong.status_code == 401
    basic = client.get("/api/scans", headers={"Authorization": "Basic czNjcmV0"})
    assert basic.status_code == 401
    ok = client.get("/api/scans", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    # The page and its files load without a token: the page asks for it.
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200


def test_without_token_the_api_is_open(make_client) -> None:
    client = make_client()
    assert client.get("/api/scans").json() == {"scans": []}
    assert client.get("/api/health").json()["token_required"] is False


# -- model and OpenAPI ----------------------------------------------------------------------


def test_model_info(make_client, trained_bundle: Path) -> None:
    info = make_client().get("/api/model").json()
    config = json.loads((trained_bundle / "bundle.json").read_text())
    assert info["architecture"] == "resnet18"
    assert info["labels"] == config["labels"] == RSNA
    assert info["headline_label"] == "any"
    assert set(info["thresholds"]) == set(RSNA)
    assert info["thresholds"]["any"] == pytest.approx(config["thresholds"]["any"])
    assert info["input"]["size"] == 32
    assert info["training"]["epochs_run"] == 1
    # Paths of the training machine are not served.
    assert "data" not in info["training"] and "out" not in info["training"].get("config", {})
    assert "not a medical device" in info["research_use_only"]


def test_openapi_documents_the_routes(make_client) -> None:
    client = make_client()
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in [
        "/api/scans",
        "/api/scans/{scan_id}",
        "/api/scans/{scan_id}/slices/{index}.png",
        "/api/model",
        "/api/health",
        "/api/worklist",
    ]:
        assert path in paths
    body = paths["/api/scans"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["type"] == "array"
    page = client.get("/docs")
    assert page.status_code == 200
    # Offline: the page's script and style come from this server, not a CDN.
    assert "cdn" not in page.text.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


# -- uploads of every kind ------------------------------------------------------------------


def test_dicom_series_upload_gives_probabilities_per_slice_and_scan(
    make_client, series_dir: Path, served_predictor
) -> None:
    client = make_client()
    response = client.post("/api/scans", files=dicom_files(series_dir))
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["status"] == "done"
    assert response.headers["location"] == f"/api/scans/{record['id']}"
    assert len(record["id"]) == 32
    series = record["series"]
    assert series["n_slices"] == 8 and (series["rows"], series["cols"]) == (64, 64)
    assert series["kind"] == "dicom" and series["modality"] == "CT"
    assert record["labels"] == RSNA
    assert len(record["slice_probabilities"]) == 8
    assert all(len(row) == len(RSNA) for row in record["slice_probabilities"])
    # Scan level without a study model: the maximum over slices, decided at the thresholds.
    probs = np.array(record["slice_probabilities"])
    for j, finding in enumerate(record["findings"]):
        assert finding["label"] == RSNA[j]
        assert finding["probability"] == pytest.approx(probs[:, j].max(), abs=1e-5)
        assert finding["positive"] == (finding["probability"] >= finding["threshold"])
    assert record["suspected_ich"] == record["findings"][0]["positive"]
    assert record["key_slice"] == int(np.argmax(probs[:, 0]))
    # The same numbers as the Predictor on the same series.
    expected = served_predictor.predict_scan(load(series_dir))
    np.testing.assert_allclose(probs, expected.slice_probs, atol=1e-5)
    assert record["windows_available"] == ["brain", "subdural", "bone", "soft"]
    assert record["name"].startswith("SYNTH")  # patient · series, not a UID file name


def test_zip_upload(make_client, series_dir: Path) -> None:
    client = make_client()
    files = [("files", ("series.zip", series_zip(series_dir), "application/zip"))]
    record = client.post("/api/scans", files=files).json()
    assert record["status"] == "done" and record["upload"]["kind"] == "zip"
    assert record["series"]["n_slices"] == 8
    assert record["name"] == "series.zip"


def test_nifti_upload(make_client, series_dir: Path, tmp_path: Path) -> None:
    path = write_nifti(load(series_dir), tmp_path / "head.nii.gz")
    client = make_client()
    files = [("files", ("head.nii.gz", path.read_bytes(), "application/gzip"))]
    record = client.post("/api/scans", files=files).json()
    assert record["status"] == "done", record
    assert record["series"]["kind"] == "nifti" and record["series"]["n_slices"] == 8


def test_nifti_and_png_uploads_are_named_after_their_file(
    make_client, series_dir: Path, png_bundle: Path, tmp_path: Path
) -> None:
    """S-2: the ids of a NIfTI or image upload come from the client's file name, as
    `ichscan predict` names the same file, never from the server's storage name (0000)."""
    from ichscan.infer.predictor import Predictor
    from ichscan.io.nifti import read_nifti

    path = write_nifti(load(series_dir), tmp_path / "realA.nii.gz")
    client = make_client()
    files = [("files", ("realA.nii.gz", path.read_bytes(), "application/gzip"))]
    record = client.post("/api/scans", files=files).json()
    assert record["status"] == "done", record
    series = record["series"]
    assert series["patient_id"] == series["study_uid"] == series["series_uid"] == "realA"
    assert record["slice_ids"] == read_nifti(path).slice_ids  # predict's names
    assert record["slice_ids"][0] == "realA-0000"

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(buffer, format="PNG")
    png_client = make_client(predictor=Predictor(png_bundle, device="cpu"))
    files = [("files", ("case 17.png", buffer.getvalue(), "image/png"))]
    record = png_client.post("/api/scans", files=files).json()
    assert record["status"] == "done", record
    assert record["series"]["patient_id"] == record["series"]["series_uid"] == "case 17"
    assert record["slice_ids"] == ["case 17"]


def test_every_result_says_what_the_model_was_trained_on(
    make_client, series_dir: Path, trained_bundle: Path
) -> None:
    """S-1: the scan record, the scan list, the model record and the page say what the
    model rests on (predict's words; the tiny model was trained on synthetic phantoms),
    without the training machine's paths."""
    from ichscan.models.bundle import trained_on

    config = json.loads((trained_bundle / "bundle.json").read_text())
    words = trained_on(config)
    source = config["training"]["data_summary"]["source"]
    assert words.startswith("SYNTHETIC phantoms at ") and source in words
    client = make_client()
    record = client.post("/api/scans", files=dicom_files(series_dir)).json()
    assert record["status"] == "done"
    assert record["trained_on"] == words.replace(source, Path(source).name)
    assert record["trained_on_synthetic"] is True
    assert source not in record["trained_on"]
    [item] = client.get("/api/scans").json()["scans"]
    assert item["trained_on_synthetic"] is True
    info = client.get("/api/model").json()
    assert info["trained_on"] == record["trained_on"] and info["trained_on_synthetic"] is True
    page = client.get("/").text
    assert 'id="trained-on"' in page
    script = client.get("/static/app.js").text
    assert "renderTraining(record)" in script and "record.trained_on" in script


def test_png_upload_keeps_its_window(make_client, png_bundle: Path, tmp_path: Path) -> None:
    from ichscan.infer.predictor import Predictor

    grey = np.zeros((48, 40), dtype=np.uint8)
    grey[10:30, 8:32] = 120
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    client = make_client(predictor=Predictor(png_bundle, device="cpu"))
    files = [("files", ("slice.png", buffer.getvalue(), "image/png"))]
    record = client.post("/api/scans", files=files).json()
    assert record["status"] == "done"
    assert record["windowed"] == "brain"
    assert record["windows_available"] == ["brain"]
    assert record["series"]["n_slices"] == 1
    for window in ("brain", "bone"):
        image = client.get(f"/api/scans/{record['id']}/slices/0.png?window={window}")
        assert image.status_code == 200
        # Other windows cannot be recovered from display values: the image comes back as is.
        assert image.headers["x-ichscan-window"] == "brain (as uploaded)"
        np.testing.assert_array_equal(_png(image.content), grey)


def test_two_series_in_one_upload_read_the_selected_one_and_list_the_other(
    make_client, series_dir: Path, tmp_path: Path
) -> None:
    scan = load(series_dir)
    scout = tmp_path / "scout"
    write_ct_series(
        scan.hu[:3], scout, series_description="scout", series_number=9, study_uid=scan.study_uid
    )
    client = make_client()
    record = client.post("/api/scans", files=dicom_files(series_dir) + dicom_files(scout)).json()
    assert record["status"] == "done"
    assert record["series"]["series_uid"] == scan.series_uid
    assert [s["n_slices"] for s in record["other_series"]] == [3]
    assert record["other_series"][0]["selection_reason"].startswith("not selected")


def test_large_scans_are_queued_and_polled(make_client, series_dir: Path) -> None:
    client = make_client(inline_wait_s=0.0)
    response = client.post("/api/scans", files=dicom_files(series_dir))
    assert response.status_code == 201
    assert response.json()["status"] in ("queued", "processing", "done")
    record = wait_done(client, response.json()["id"])
    assert record["status"] == "done"
    assert record["started_at"] and record["finished_at"] and record["processing_s"] >= 0


# -- slice images ---------------------------------------------------------------------------


@pytest.fixture
def done_scan(make_client, series_dir: Path) -> tuple[Any, dict[str, Any]]:
    client = make_client()
    record = client.post("/api/scans", files=dicom_files(series_dir)).json()
    assert record["status"] == "done"
    return client, record


def test_slice_png_in_each_window(done_scan, series_dir: Path) -> None:
    from ichscan.preprocess.window import apply_window

    client, record = done_scan
    hu = load(series_dir).hu
    url = f"/api/scans/{record['id']}/slices/3.png"
    seen = set()
    for window, preset in [
        ("brain", "brain"),
        ("subdural", "subdural"),
        ("bone", "bone"),
        ("soft", "soft_tissue"),
    ]:
        response = client.get(url, params={"window": window})
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-ichscan-window"] == window
        pixels = _png(response.content)
        np.testing.assert_array_equal(pixels, apply_window(hu[3], preset))
        seen.add(pixels.tobytes())
    assert len(seen) == 4
    # Rendered once, then served from the scan's cache.
    cached = sorted(
        p.name for p in (client.app.state.scans.folder(record["id"]) / "cache").iterdir()
    )
    assert "0003-bone-plain.png" in cached


def test_heatmap_overlay_of_the_model(done_scan) -> None:
    from ichscan.infer.explain import overlay

    client, record = done_scan
    k = record["key_slice"]
    url = f"/api/scans/{record['id']}/slices/{k}.png"
    plain = _png(client.get(url, params={"window": "brain", "overlay": 0}).content)
    response = client.get(url, params={"window": "brain", "overlay": 1})
    assert response.status_code == 200
    layered = _png(response.content)
    assert plain.shape == (64, 64) and layered.shape == (64, 64, 3)
    # Grad-CAM of the headline label on that slice, cached beside the scan, blended in.
    folder = client.app.state.scans.folder(record["id"])
    heat = np.load(folder / "cache" / f"heat-0-{k:04d}.npy").astype(np.float32)
    assert heat.shape == (64, 64) and heat.min() >= 0.0 and heat.max() <= 1.0
    np.testing.assert_array_equal(layered, np.asarray(overlay(plain, heat)))
    # Another label is another map; an unknown label is refused.
    assert client.get(url, params={"overlay": 1, "label": "subdural"}).status_code == 200
    assert (folder / "cache" / f"heat-5-{k:04d}.npy").exists()
    bad = client.get(url, params={"overlay": 1, "label": "fracture"})
    assert bad.status_code == 422 and "fracture" in bad.json()["detail"]


def test_heatmap_overlay_colours_the_bleed(make_client, bleed_series_dir: Path) -> None:
    from ichscan.data.phantom import make_phantom

    client = make_client()
    client.app.state.processor.explainer = bleed_explainer(RSNA)
    record = client.post("/api/scans", files=dicom_files(bleed_series_dir)).json()
    phantom = make_phantom(
        (8, 64, 64), (5.0, 3.6, 3.6), seed=7, findings=["intraparenchymal", "subdural"]
    )
    from ichscan.data.phantom import label_mask

    mask = label_mask(phantom, "any")
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    url = f"/api/scans/{record['id']}/slices/{k}.png"
    plain = _png(client.get(url).content).astype(int)
    layered = _png(client.get(url, params={"overlay": 1}).content).astype(int)
    changed = np.abs(layered - plain[..., None]).sum(axis=2) > 30
    # The colour sits on the bleed: most changed pixels are blood, far above chance.
    assert changed.sum() > 20
    assert mask[k][changed].mean() > 0.5 > mask[k].mean()


def test_slice_requests_that_cannot_be_answered(done_scan) -> None:
    client, record = done_scan
    base = f"/api/scans/{record['id']}/slices"
    assert client.get(f"{base}/8.png").status_code == 404
    assert client.get(f"{base}/-1.png").status_code == 404
    assert client.get(f"{base}/one.png").status_code == 422
    assert client.get(f"{base}/0.png?window=lung").status_code == 422
    assert client.get(f"/api/scans/{'f' * 32}/slices/0.png").status_code == 404


@pytest.fixture
def held_analysis(monkeypatch: pytest.MonkeyPatch):
    """Analyses start, then wait (up to 30 s) until the test sets ``release``:
    (started, release) events."""
    started, release = threading.Event(), threading.Event()
    original = Processor.analyse

    def held(self, folder, job):
        started.set()
        release.wait(30)
        return original(self, folder, job)

    monkeypatch.setattr(Processor, "analyse", held)
    yield started, release
    release.set()


def test_slices_of_an_unfinished_scan_are_409(make_client, series_dir: Path, held_analysis) -> None:
    _, release = held_analysis
    client = make_client(inline_wait_s=0.0)
    scan_id = client.post("/api/scans", files=dicom_files(series_dir)).json()["id"]
    try:
        response = client.get(f"/api/scans/{scan_id}/slices/0.png")
        assert response.status_code == 409
        assert client.delete(f"/api/scans/{scan_id}").status_code in (204, 409)
    finally:
        release.set()


# -- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scan_id",
    ["..", "..%2F..%2Fetc", "ABCDEF" * 5 + "AB", "0" * 31, "0" * 33, "g" * 32, "%2e%2e"],
)
def test_ids_that_are_not_server_ids_are_404(make_client, scan_id: str) -> None:
    client = make_client()
    assert client.get(f"/api/scans/{scan_id}").status_code == 404


# -- the server goes on ---------------------------------------------------------------------


def test_health_and_other_users_are_answered_while_a_scan_is_processed(
    make_client, series_dir: Path, held_analysis
) -> None:
    started, release = held_analysis
    client = make_client(inline_wait_s=0.0)
    first = client.post("/api/scans", files=dicom_files(series_dir)).json()
    assert started.wait(10)
    try:
        t0 = time.perf_counter()
        assert client.get("/api/health").json()["status"] == "ok"
        assert time.perf_counter() - t0 < 2.0
        assert client.get(f"/api/scans/{first['id']}").json()["status"] == "processing"
        # A second user uploads meanwhile: accepted and queued behind the first.
        second = client.post("/api/scans", files=dicom_files(series_dir))
        assert second.status_code == 201 and second.json()["status"] == "queued"
        assert client.get("/api/health").json()["queued"] == 1
    finally:
        release.set()
    assert wait_done(client, first["id"])["status"] == "done"
    assert wait_done(client, second.json()["id"])["status"] == "done"


def test_list_delete_and_restart(make_client, series_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    client = make_client(data_dir=data)
    ids = [client.post("/api/scans", files=dicom_files(series_dir)).json()["id"] for _ in range(2)]
    listed = client.get("/api/scans").json()["scans"]
    assert [s["id"] for s in listed] == ids[::-1]  # newest first
    assert listed[0]["n_slices"] == 8 and listed[0]["kind"] == "dicom"
    assert listed[0]["suspected_ich"] in (True, False)

    # A scan a crash left queued, and an upload cut off before it had a record.
    folder = client.app.state.scans.folder(ids[0])
    record = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**record, "status": "queued"}))
    (folder / "volume.npy").unlink()
    (data / "scans" / ("e" * 32)).mkdir()

    restarted = make_client(data_dir=data)
    assert wait_done(restarted, ids[0])["status"] == "done"
    assert (folder / "volume.npy").exists()
    assert {s["id"] for s in restarted.get("/api/scans").json()["scans"]} == set(ids)
    assert not (data / "scans" / ("e" * 32)).exists()
    assert restarted.get(f"/api/scans/{ids[1]}/slices/0.png").status_code == 200

    assert restarted.delete(f"/api/scans/{ids[1]}").status_code == 204
    assert restarted.get(f"/api/scans/{ids[1]}").status_code == 404
    assert not (data / "scans" / ids[1]).exists()


def test_without_a_model_slices_are_shown_without_predictions(
    make_client, series_dir: Path
) -> None:
    client = make_client(predictor=None, store=series_dir.parent)
    assert client.get("/api/model").status_code == 404
    assert client.get("/api/health").json()["model"] is False
    record = client.post("/api/scans", files=dicom_files(series_dir)).json()
    assert record["status"] == "done"
    assert record["labels"] == [] and record["findings"] == [] and record["suspected_ich"] is None
    url = f"/api/scans/{record['id']}/slices/0.png"
    assert client.get(url).status_code == 200
    assert client.get(url, params={"overlay": 1}).status_code == 409


def test_create_app_needs_a_model_or_a_store(tmp_path: Path) -> None:
    from ichscan.errors import IchscanError
    from ichscan.serve import create_app

    with pytest.raises(IchscanError, match="--model"):
        create_app(None, tmp_path)
    with pytest.raises(IchscanError, match="does not exist"):
        create_app(None, tmp_path, store=tmp_path / "absent")


def test_a_thin_series_is_shown_as_the_slabs_the_model_read(
    make_client, trained_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from ichscan.data.synth import write_synthetic
    from ichscan.infer.predictor import Predictor

    bundle = tmp_path / "thick"
    shutil.copytree(trained_bundle, bundle, ignore=shutil.ignore_patterns("*cache*", "runs"))
    config = json.loads((bundle / "bundle.json").read_text())
    config["input"]["slice_thickness_mm"] = 5.0
    (bundle / "bundle.json").write_text(json.dumps(config))
    [thin] = write_synthetic(tmp_path / "thin", seed=2, thickness=1.25, shape=(16, 64, 64))
    client = make_client(predictor=Predictor(bundle, device="cpu"))
    record = client.post("/api/scans", files=dicom_files(thin)).json()
    assert record["status"] == "done"
    series = record["series"]
    assert (series["n_slices"], series["source_slices"], series["resliced_mm"]) == (4, 16, 5.0)
    assert len(record["slice_probabilities"]) == len(record["slice_ids"]) == 4
    volume = np.load(client.app.state.scans.folder(record["id"]) / "volume.npy")
    assert volume.shape == (4, 64, 64)
    assert client.get(f"/api/scans/{record['id']}/slices/3.png").status_code == 200
    assert client.get(f"/api/scans/{record['id']}/slices/4.png").status_code == 404
    assert client.get(f"/api/scans/{record['id']}/slices/3.png?overlay=1").status_code == 200


def test_waiting_for_a_result_in_one_request(make_client, series_dir: Path, held_analysis) -> None:
    _, release = held_analysis
    client = make_client(inline_wait_s=0.0)
    scan_id = client.post("/api/scans", files=dicom_files(series_dir)).json()["id"]
    t0 = time.perf_counter()
    pending = client.get(f"/api/scans/{scan_id}", params={"wait": 0.3}).json()
    assert pending["status"] in ("queued", "processing")
    assert 0.25 < time.perf_counter() - t0 < 5
    threading.Timer(0.5, release.set).start()
    done = client.get(f"/api/scans/{scan_id}", params={"wait": 30}).json()
    assert done["status"] == "done"
    assert client.get(f"/api/scans/{scan_id}", params={"wait": 61}).status_code == 422
