"""The FastAPI application behind ``ichscan serve``: REST API, browser viewer, worklist.

``create_app`` builds it (tests build apps directly; the command wraps it in uvicorn). Every
``/api`` route but ``/api/health`` needs the bearer token when one is set; the page and its
static files do not (the page asks for the token and sends it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ichscan import __version__
from ichscan.serve.auth import token_dependency
from ichscan.serve.intake import Job, check_series_dir, check_upload
from ichscan.serve.processing import VOLUME, Processor
from ichscan.serve.scans import DONE, FAILED, PROCESSING, QUEUED, ScanStore, now_iso
from ichscan.serve.uploads import FIELD, Limits, UploadError, receive

log = logging.getLogger("ichscan.serve")

STATIC = Path(__file__).parent / "static"
DISCLAIMER = "ichscan is research software, not a medical device: not for diagnosis or patient care"
Window = Literal["brain", "subdural", "bone", "soft"]
_POLL_S = 0.05
MAX_WAIT_S = 60.0

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "DICOM files of one series, or one zip, one "
                            "NIfTI volume, or one PNG/JPEG/TIFF/BMP slice",
                        }
                    },
                }
            }
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "no such scan"},
}


def _new_record(scan_id: str, name: str, upload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": scan_id,
        "status": QUEUED,
        "name": name,
        "created_at": now_iso(),
        "started_at": None,
        "finished_at": None,
        "processing_s": None,
        "upload": upload,
        "origin": None,
        "error": None,
        "series": None,
        "labels": [],
        "findings": [],
        "suspected_ich": None,
        "slice_probabilities": [],
        "key_slice": None,
        "warnings": [],
        "research_use_only": DISCLAIMER,
        **extra,
    }


def _offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI from the swagger-ui-bundle wheel, so it works without a network
    (FastAPI's default page loads its script and style from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ichscan API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def create_app(
    model_dir: str | Path | None,
    data_dir: str | Path,
    *,
    token: str | None = None,
    store: str | Path | None = None,
    limits: Limits | None = None,
    workers: int = 1,
    inline_wait_s: float = 1.0,
    device: str = "auto",
    predictor: Any | None = None,
) -> FastAPI:
    """The web app. ``model_dir`` (or a ready ``predictor``) gives predictions and heatmaps;
    ``store`` (a receiver's store folder) gives the worklist; at least one of them is
    needed. ``inline_wait_s``: how long an upload may wait for its result before answering
    "queued" (the client then polls)."""
    from ichscan.errors import IchscanError

    if model_dir is None and predictor is None and store is None:
        raise IchscanError(None, "give a model (--model) or a receiver store (--store), or both")
    if not (STATIC / "index.html").is_file():
        raise IchscanError(
            STATIC, "the viewer's files are missing from this installation (package data)"
        )
    limits = limits or Limits()
    if predictor is None and model_dir is not None:
        from ichscan.serve.model import load_predictor

        predictor = load_predictor(model_dir, device)
    store_root = Path(store).resolve() if store is not None else None
    if store_root is not None and not store_root.is_dir():
        raise IchscanError(store_root, "the store folder does not exist")
    scans = ScanStore(data_dir)
    processor = Processor(scans, predictor, limits, workers=workers)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        processor.start()
        try:
            yield
        finally:
            await run_in_threadpool(processor.stop)

    app = FastAPI(
        title="ichscan",
        version=__version__,
        description="Intracranial hemorrhage on head CT: upload a scan, read its per-slice and "
        f"per-scan probabilities, view its slices and Grad-CAM heatmaps. {DISCLAIMER}.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files: FastAPI's default page uses a CDN
    )
    app.state.processor = processor
    app.state.scans = scans
    api = APIRouter(
        prefix="/api", dependencies=[Depends(token_dependency(token))], responses=_ERRORS
    )

    # -- page ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _offline_docs(app)

    @app.get("/api/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Answers without a token, and while scans are being processed."""
        return {
            "status": "ok",
            "version": __version__,
            "model": predictor is not None,
            "worklist": store_root is not None,
            "token_required": token is not None,
            "queued": processor.queued(),
        }

    # -- model ---------------------------------------------------------------------------

    @api.get("/model", tags=["model"])
    def model() -> dict[str, Any]:
        """Architecture, labels, thresholds and the training summary of the served model."""
        if predictor is None:
            raise HTTPException(404, "no model loaded (start the server with --model)")
        from ichscan.serve.model import model_info

        return model_info(predictor)

    # -- scans ---------------------------------------------------------------------------

    def _scan_or_404(scan_id: str) -> dict[str, Any]:
        try:
            return scans.read(scan_id)
        except (KeyError, FileNotFoundError):
            raise HTTPException(404, "no such scan") from None

    async def _settle(scan_id: str, response: Response) -> dict[str, Any]:
        """Wait a little for a fast scan to finish, then answer with where it stands."""
        deadline = time.monotonic() + inline_wait_s
        while scans.status(scan_id) in (QUEUED, PROCESSING) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        record = _scan_or_404(scan_id)
        if record["status"] == FAILED:
            # Unreadable after all (found while decoding): the same answer as a bad upload.
            await run_in_threadpool(scans.remove, scan_id)
            raise HTTPException(422, record["error"])
        response.headers["Location"] = f"/api/scans/{scan_id}"
        return record

    @api.post(
        "/scans",
        status_code=201,
        tags=["scans"],
        openapi_extra=_UPLOAD_BODY,
        responses={
            413: {"description": "upload, zip member count or uncompressed zip size too large"},
            415: {"description": "not multipart/form-data"},
            422: {"description": "not CT, unreadable, or a zip entry pointing outside it"},
        },
    )
    async def upload_scan(request: Request, response: Response) -> dict[str, Any]:
        """Upload one scan (multipart field `files`, repeated for many: the DICOM files of a
        series, one zip, one NIfTI or one PNG/JPEG/TIFF/BMP). Answers 201 with the scan record:
        `status` is `done` when it finished within a moment, else `queued`/`processing`
        (then `GET /api/scans/{id}?wait=30`)."""
        scan_id, folder = scans.new_folder()
        (folder / "upload").mkdir()
        try:
            upload = await receive(request, folder / "upload", limits)
            job = await run_in_threadpool(check_upload, upload, limits, folder)
        except UploadError as exc:
            await run_in_threadpool(shutil.rmtree, folder, True)
            raise HTTPException(exc.status, exc.detail) from None
        except Exception as exc:
            # Not the input (check_upload answers for that): the server's own failure, said
            # as one line and not as an empty 500.
            await run_in_threadpool(shutil.rmtree, folder, True)
            log.exception("upload %s: server error while receiving it", scan_id)
            raise HTTPException(
                500,
                f"server error while receiving the upload ({type(exc).__name__}); "
                "the server log has the details",
            ) from None
        except BaseException:  # cancelled: the client went away
            await run_in_threadpool(shutil.rmtree, folder, True)
            raise
        originals = [f.original for f in upload.files]
        name = upload.title
        meta = {
            "kind": job.kind,
            "n_files": len(originals),
            "bytes": upload.total_bytes,
            "names": originals[:5],
        }
        _queue(scan_id, folder, job, _new_record(scan_id, name, meta))
        return await _settle(scan_id, response)

    def _queue(scan_id: str, folder: Path, job: Job, record: dict[str, Any]) -> None:
        job.save(folder)
        scans.write(record)
        processor.submit(scan_id, job)

    @api.get("/scans", tags=["scans"])
    def list_scans() -> dict[str, Any]:
        """Earlier scans, newest first (summaries)."""
        return {"scans": scans.list()}

    @api.get(
        "/scans/{scan_id}",
        tags=["scans"],
        response_class=Response,
        responses={200: {"content": {"application/json": {}}, "description": "the record"}},
    )
    async def get_scan(
        scan_id: str,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
    ) -> Response:
        """Status, series info, scan-level probabilities and decisions per label
        (`findings`), per-slice probabilities (`slice_probabilities[slice][label]`, labels in
        `labels` order). `wait=S`: while the scan is queued or processing, answer when it is
        done or failed, or after S seconds (at most 60), whichever comes first — one request
        instead of a poll every fraction of a second."""
        deadline = time.monotonic() + wait
        while scans.status(scan_id) in (QUEUED, PROCESSING) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        # The stored JSON goes out as it is (a small file in the page cache): no decode and
        # re-encode, no thread hop.
        try:
            body = scans.read_bytes(scan_id)
        except (KeyError, FileNotFoundError):
            raise HTTPException(404, "no such scan") from None
        return Response(body, media_type="application/json")

    @api.delete("/scans/{scan_id}", status_code=204, tags=["scans"])
    def delete_scan(scan_id: str) -> Response:
        record = _scan_or_404(scan_id)
        if record["status"] == PROCESSING:
            raise HTTPException(409, "the scan is being processed; delete it when it is done")
        scans.remove(scan_id)
        return Response(status_code=204)

    @api.get(
        "/scans/{scan_id}/slices/{index}.png",
        tags=["scans"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the slice as PNG"},
            409: {"description": "the scan is not done, or no model for a heatmap"},
        },
    )
    def slice_png(
        scan_id: str,
        index: int,
        window: Window = "brain",
        overlay: bool = False,
        label: str | None = None,
    ) -> Response:
        """Slice `index` (0 = first slice the model read, as in `slice_probabilities`) in a
        window preset, optionally with the Grad-CAM heatmap of `label` (default: the
        headline label) blended in. A PNG/JPEG upload cannot be re-windowed: it comes back
        as uploaded and the `X-Ichscan-Window` header says so."""
        record = _scan_or_404(scan_id)
        if record["status"] != DONE:
            raise HTTPException(409, f"the scan is {record['status']}, not done")
        folder = scans.folder(scan_id)
        volume = np.load(folder / VOLUME, mmap_mode="r")
        if not 0 <= index < volume.shape[0]:
            raise HTTPException(404, f"no slice {index}: the scan has {volume.shape[0]} slices")
        label_index = 0
        if overlay:
            if predictor is None or not record["labels"]:
                raise HTTPException(409, "no model loaded: no heatmap to overlay")
            if label is not None:
                if label not in record["labels"]:
                    raise HTTPException(
                        422,
                        f"unknown label {label!r}; this model has {', '.join(record['labels'])}",
                    )
                label_index = record["labels"].index(label)
        from ichscan.serve.render import grey_slice, png_bytes, shown_window

        windowed = record.get("windowed")
        key = "as-uploaded" if windowed else window
        layer = f"cam{label_index}" if overlay else "plain"
        cache = folder / "cache" / f"{index:04d}-{key}-{layer}.png"
        headers = {
            "Cache-Control": "private, max-age=86400",
            "X-Ichscan-Window": shown_window(window, windowed),
        }
        if cache.exists():
            return Response(cache.read_bytes(), media_type="image/png", headers=headers)
        heat = processor.heatmap(folder, index, label_index, windowed) if overlay else None
        data = png_bytes(grey_slice(volume[index], window, windowed), heat)
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{time.monotonic_ns()}")
        tmp.write_bytes(data)
        tmp.replace(cache)
        return Response(data, media_type="image/png", headers=headers)

    # -- worklist ------------------------------------------------------------------------

    def _store() -> Path:
        if store_root is None:
            raise HTTPException(404, "no worklist: start the server with --store DIR")
        return store_root

    @api.get("/worklist", tags=["worklist"])
    def worklist() -> dict[str, Any]:
        """Studies from the receiver's store, most urgent first: suspected ICH, then the
        rest, each group by arrival (oldest first); files that cannot be read are listed in
        `problems`."""
        from ichscan.serve.worklist import read_worklist

        return read_worklist(_store())

    @api.post("/worklist/{study_uid}/{series_uid}/open", status_code=201, tags=["worklist"])
    async def open_series(study_uid: str, series_uid: str, response: Response) -> dict[str, Any]:
        """Open a store series in the viewer: a scan made from its instances (the same scan
        again, answered 200, while the series has not grown)."""
        from ichscan.serve.worklist import StoreError, series_folder

        root = _store()
        try:
            instances, result = series_folder(root, study_uid, series_uid)
        except StoreError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        origin = {
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "instances": result.get("instances"),
        }
        existing = scans.find_origin(origin)
        if existing is not None:
            response.status_code = 200
            return scans.read(existing)
        names = {str(root): "store"}
        try:
            job = await run_in_threadpool(check_series_dir, instances, limits, names)
        except UploadError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        scan_id, folder = scans.new_folder()
        patient = result.get("patient_name") or result.get("patient_id") or "patient"
        name = " / ".join(
            p
            for p in (patient, result.get("study_description"), result.get("series_description"))
            if p
        )
        meta = {"kind": "store", "n_files": result.get("instances"), "bytes": None, "names": []}
        store_summary = {
            key: result.get(key)
            for key in (
                "status",
                "patient_id",
                "patient_name",
                "accession_number",
                "study_description",
                "series_description",
                "study_date",
                "arrived_at",
                "time_to_result_s",
                "suspected_ich",
                "findings",
                "key_slice",
                "completion",
                "warnings",
            )
        }
        # What the receiver's model rested on (it may be another model than this server's).
        store_summary["trained_on"] = (result.get("model") or {}).get("trained_on")
        record = _new_record(scan_id, name, meta, origin=origin, store_result=store_summary)
        _queue(scan_id, folder, job, record)
        return await _settle(scan_id, response)

    app.include_router(api)
    return app
