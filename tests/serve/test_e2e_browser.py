"""The viewer end to end in real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser is downloaded): upload a synthetic series, wait for the result,
scroll, switch windows, toggle the heatmap, open a study from the worklist; assertions on
the page's own state and on screenshots.

The heatmaps come from a hand-built bleed detector put in place of the app's Grad-CAM
explainer: the session's one-epoch 32-pixel model gives all-zero maps, which would leave
nothing on screen to check. The probabilities are the tiny model's own.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import RSNA, bleed_explainer

CHROMIUM = Path("/usr/bin/chromium")
PARTIAL_WARNING = "association from SCANNER aborted after 8 instances; result may be incomplete"
TOKEN = "e2e-token"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytest_plugins = ["serve_fixtures"]
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is not installed (Debian packages chromium and "
        "chromium-driver; `make test` installs them where apt can)",
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _result(study: str, series: str, suspected: bool, arrived: str, name: str) -> dict[str, Any]:
    p = 0.91 if suspected else 0.08
    return {
        "schema": "ichscan.result/1",
        "status": "done",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "patient_id": name.upper(),
        "patient_name": f"{name}^Test",
        "accession_number": "ACC1",
        "study_description": "CT head",
        "series_description": "axial 5mm",
        "study_date": "20260301",
        "calling_ae": "SCANNER",
        "instances": 8,
        "arrived_at": arrived,
        "last_instance_at": arrived,
        "finished_at": arrived,
        "time_to_result_s": 3.2,
        "labels": RSNA,
        "findings": {k: {"probability": p, "threshold": 0.5, "positive": suspected} for k in RSNA},
        "suspected_ich": suspected,
        "slices": 8,
        "key_slice": None,
        "instances_dir": f"incoming/{study}/{series}",
        "sr": None,
        "error": None,
        "model": {"architecture": "resnet18", "labels": "rsna"},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, series_dir: Path) -> Path:
    """A receiver store by the contract: a normal study that arrived first, then a suspected
    one whose real instances lie under incoming/."""
    from ichscan.io.load import load

    root = tmp_path_factory.mktemp("store")
    real = load(series_dir)
    records = [
        _result("1.2.826.9.1", "1.2.826.9.1.1", False, "2026-03-01T08:00:00.000Z", "Early"),
        _result(real.study_uid, real.series_uid, True, "2026-03-01T09:00:00.000Z", "Urgent"),
    ]
    # The urgent series was analysed from an aborted association, by a phantom-trained model.
    records[1]["completion"] = "PARTIAL"
    records[1]["warnings"] = [PARTIAL_WARNING]
    records[1]["model"] = {**records[1]["model"], "trained_on": "SYNTHETIC phantoms at synth"}
    for record in records:
        path = root / "results" / record["study_instance_uid"]
        path.mkdir(parents=True)
        (path / f"{record['series_instance_uid']}.json").write_text(json.dumps(record))
    incoming = root / "incoming" / real.study_uid / real.series_uid
    incoming.mkdir(parents=True)
    for path in series_dir.glob("*.dcm"):
        shutil.copy(path, incoming / path.name)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, served_predictor, store: Path) -> Iterator[str]:
    """The app under uvicorn in a thread, on a free loopback port."""
    import uvicorn
    from infer_fixtures import one_thread

    from ichscan.serve import create_app

    data = tmp_path_factory.mktemp("web")
    # No inline wait: every scan is queued, and the page waits for it (the long poll).
    app = create_app(
        None, data, predictor=served_predictor, token=TOKEN, store=store, inline_wait_s=0.0
    )
    app.state.processor.explainer = bleed_explainer(RSNA)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    with one_thread():
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
        server.should_exit = True
        thread.join(15)
    sock.close()


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(60_000)
    page.goto(server + "/")
    # The page asks for the token; it is kept in sessionStorage from then on.
    sync_api.expect(page.locator("#token-note")).to_contain_text("needs a token")
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    yield page
    context.close()
    assert errors == [], errors


def _api(server: str, path: str) -> dict[str, Any]:
    return httpx.get(server + path, headers={"Authorization": f"Bearer {TOKEN}"}).json()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _slice_shot(page) -> np.ndarray:
    return _pixels(page.locator("#slice-image").screenshot())


def _wait_for_image(page, index: int, window: str, overlay: str) -> None:
    selector = (
        f'#slice-image[data-index="{index}"][data-window="{window}"][data-overlay="{overlay}"]'
    )
    page.wait_for_selector(selector)


def test_upload_scroll_window_overlay(page, server: str, bleed_series_dir: Path, tmp_path) -> None:
    expect = sync_api.expect
    expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
    page.set_input_files("#file-input", sorted(str(p) for p in bleed_series_dir.glob("*.dcm")))
    page.wait_for_selector("#slice-image[data-key]")

    scans = _api(server, "/api/scans")["scans"]
    record = _api(server, f"/api/scans/{scans[0]['id']}")
    assert record["status"] == "done"
    key = record["key_slice"]
    # The viewer opens on the most suspicious slice, and says where it is.
    expect(page.locator("#slice-index")).to_have_text(f"Slice {key + 1} / 8")
    expect(page.locator("#scan-title")).to_contain_text("BLEED01")
    expect(page.locator("#upload-status")).to_have_text("Done.")
    expect(page.locator("#token-note")).to_have_text("")  # the token was taken

    # Findings: one row per label, decisions highlighted as the API decided them.
    rows = page.locator("#findings tbody tr")
    expect(rows).to_have_count(len(RSNA))
    assert rows.locator("td:first-child").all_text_contents() == RSNA
    positive = [f["label"] for f in record["findings"] if f["positive"]]
    shown = page.locator("#findings tbody tr.positive td:first-child").all_text_contents()
    assert shown == positive
    verdict = "Suspected ICH" if record["suspected_ich"] else "No ICH suspected"
    expect(page.locator("#verdict")).to_contain_text(verdict)
    # Beside the result: what the model was trained on, loudly for synthetic phantoms.
    trained = page.locator("#trained-on")
    expect(trained).to_be_visible()
    expect(trained).to_contain_text(f"Model trained on {record['trained_on']}")
    expect(trained).to_contain_text("never seen real CT")
    expect(trained).to_have_class("synthetic")
    expect(page.locator("#partial-note")).to_be_hidden()

    # The probability strip: one cell per slice; a click jumps there.
    cells = page.locator("#prob-strip button")
    expect(cells).to_have_count(8)
    cells.nth(1).click()
    expect(page.locator("#slice-index")).to_have_text("Slice 2 / 8")
    _wait_for_image(page, 1, "brain", "0")
    expect(cells.nth(1)).to_have_class(re.compile(r"\bcurrent\b"))

    # The mouse wheel and the arrow keys scroll.
    page.locator("#slice-image").hover()
    page.mouse.wheel(0, 120)
    expect(page.locator("#slice-index")).to_have_text("Slice 3 / 8")
    page.locator("#slice-image").click()
    page.keyboard.press("ArrowDown")
    expect(page.locator("#slice-index")).to_have_text("Slice 4 / 8")
    page.keyboard.press("ArrowUp")
    expect(page.locator("#slice-index")).to_have_text("Slice 3 / 8")
    page.keyboard.press("End")
    expect(page.locator("#slice-index")).to_have_text("Slice 8 / 8")
    expect(page.locator("#slice-slider")).to_have_value("7")
    page.keyboard.press("Home")
    expect(page.locator("#slice-index")).to_have_text("Slice 1 / 8")

    # The bleed's slice, in the brain window, then in the bone window.
    from ichscan.data.phantom import label_mask, make_phantom

    phantom = make_phantom(
        (8, 64, 64), (5.0, 3.6, 3.6), seed=7, findings=["intraparenchymal", "subdural"]
    )
    k = int(np.argmax(label_mask(phantom, "any").sum(axis=(1, 2))))
    cells.nth(k).click()
    _wait_for_image(page, k, "brain", "0")
    brain = _slice_shot(page)
    page.click("#window-bone")
    expect(page.locator("#window-bone")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#window-brain")).to_have_attribute("aria-pressed", "false")
    _wait_for_image(page, k, "bone", "0")
    bone = _slice_shot(page)
    assert np.abs(brain - bone).mean() > 5  # another window, another picture

    # The heatmap overlay: grey without it, colour with it.
    page.click("#window-brain")
    _wait_for_image(page, k, "brain", "0")
    page.check("#overlay-toggle")
    _wait_for_image(page, k, "brain", "1")
    expect(page.locator("#overlay-toggle")).to_be_checked()
    layered = _slice_shot(page)
    grey_spread = np.abs(brain - brain.mean(axis=2, keepdims=True)).max()
    colour_spread = np.abs(layered - layered.mean(axis=2, keepdims=True)).max()
    # (Scaling blends a few grey levels across channels: "grey" allows a small spread.)
    assert grey_spread <= 8 < 60 < colour_spread

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = _pixels(shot.read_bytes())
    assert pixels.std() > 20  # not a blank page
    page.uncheck("#overlay-toggle")
    _wait_for_image(page, k, "brain", "0")

    # The earlier-scans list holds the scan.
    items = page.locator("#scan-list button")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("BLEED01")

    # A reload comes back to the same scan (its id in the address, the token in the tab).
    page.reload()
    page.wait_for_selector("#slice-image[data-key]")
    expect(page.locator("#scan-title")).to_contain_text("BLEED01")
    expect(page.locator("#token-note")).to_have_text("")


def test_worklist_urgent_first_and_open(page, server: str) -> None:
    expect = sync_api.expect
    expect(page.locator("#worklist-section")).to_be_visible()
    rows = page.locator("#worklist tbody tr")
    expect(rows).to_have_count(2)
    # The suspected study arrived later but comes first.
    triage = rows.locator("td.triage").all_text_contents()
    # The urgent study's series is PARTIAL (its association was aborted): not final.
    assert triage == [
        "Suspected ICH (PARTIAL: transfer aborted, not final) synthetic-trained model",
        "No ICH suspected",
    ]
    expect(rows.first).to_have_class("study suspected partial")
    expect(rows.first.locator("td.patient")).to_contain_text("Urgent^Test")
    rows.first.locator("button.open-series").click()
    page.wait_for_selector("#slice-image[data-key]")
    expect(page.locator("#scan-title")).to_contain_text("Urgent^Test")
    expect(page.locator("#partial-note")).to_be_visible()
    expect(page.locator("#partial-note")).to_contain_text("Not final")
    expect(page.locator("#partial-note")).to_contain_text(PARTIAL_WARNING)
    expect(page.locator("#slice-index")).to_have_text(re.compile(r"^Slice \d / 8$"))


def test_a_bad_upload_says_why(page, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a scan")
    page.set_input_files("#file-input", str(junk))
    status = page.locator("#upload-status")
    sync_api.expect(status).to_contain_text("Not accepted (422)")
    sync_api.expect(status).to_contain_text("notes.txt")
    sync_api.expect(status).to_have_class("error")
