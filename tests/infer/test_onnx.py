"""ONNX export: onnxruntime reproduces PyTorch on real images (slice model) and on scans of
any length (study model), the predictor runs it, and a stale export is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ichscan.infer.inputs import scan_to_model_input
from ichscan.infer.onnx_export import (
    META_WEIGHTS,
    OPSET,
    OnnxPredictor,
    export_onnx,
    study_onnx_path,
)
from ichscan.infer.predictor import Predictor
from ichscan.io.image import read_image
from ichscan.io.load import load
from ichscan.models.bundle import BundleError, load_bundle

# Shared fixtures (a trained tiny bundle and its variants): see infer_fixtures.py.
pytest_plugins = ["infer_fixtures"]
pytestmark = pytest.mark.usefixtures("single_threaded_torch")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def png_onnx(png_bundle: Path) -> Path:
    return export_onnx(png_bundle)


@pytest.fixture(scope="module")
def study_onnx(study_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(study_bundle, tmp_path_factory.mktemp("onnx") / "exported.onnx")


def _real_png_inputs(bundle: Path, n: int = 12) -> np.ndarray:
    from conftest import shared

    images = sorted((shared("rsna_png") / "images").glob("*.png"))[:n]
    spec = json.loads((bundle / "bundle.json").read_text())["input"]
    return np.concatenate(
        [scan_to_model_input(read_image(p, window="brain"), spec) for p in images]
    )


def test_export_writes_a_checked_file_with_dynamic_batch(png_bundle: Path, png_onnx: Path) -> None:
    assert png_onnx == png_bundle / "model.onnx"
    model = onnx.load(str(png_onnx))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    [image] = model.graph.input
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in model.graph.output] == ["probs", "embedding"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert len(meta[META_WEIGHTS]) == 64
    assert not study_onnx_path(png_onnx).exists()


def test_onnxruntime_matches_torch_on_real_images(png_bundle: Path, png_onnx: Path) -> None:
    x = _real_png_inputs(png_bundle)
    runtime = OnnxPredictor(png_onnx, tta=False, batch_size=5)
    probs, emb = runtime.slices(x)
    model = load_bundle(png_bundle).members[0]
    with torch.no_grad():
        want_emb = model.embed(torch.from_numpy(x))
        want = torch.sigmoid(model.head(want_emb)).numpy()
    assert np.abs(probs - want).max() <= TOLERANCE
    assert np.abs(emb - want_emb.numpy()).max() <= TOLERANCE


def test_predictor_backends_agree(png_bundle: Path, png_onnx: Path, synth_dicom: Path) -> None:
    scan = load(sorted(p.parent for p in synth_dicom.glob("*/*/*.dcm"))[0])
    torch_pred = Predictor(png_bundle, device="cpu").predict_scan(scan)
    onnx_pred = Predictor(png_bundle, backend="onnx").predict_scan(scan)
    assert np.abs(torch_pred.slice_probs - onnx_pred.slice_probs).max() <= TOLERANCE
    assert np.abs(torch_pred.scan_probs - onnx_pred.scan_probs).max() <= TOLERANCE


def test_study_model_export_takes_any_number_of_slices(
    study_bundle: Path, study_onnx: Path
) -> None:
    study_path = study_onnx_path(study_onnx)
    assert study_path.name == "exported.study.onnx" and study_path.is_file()
    runtime = OnnxPredictor(study_onnx, study_path)
    bundle = load_bundle(study_bundle)
    rng = np.random.default_rng(1)
    for slices in (1, 5, 13):
        emb = rng.standard_normal((slices, 512)).astype(np.float32)
        got_slices, got_scan = runtime.study(emb)
        with torch.no_grad():
            want_slices, want_scan = bundle.study(torch.from_numpy(emb)[None])
        assert got_slices.shape == (slices, 6)
        assert np.abs(got_slices - torch.sigmoid(want_slices[0]).numpy()).max() <= TOLERANCE
        assert np.abs(got_scan - torch.sigmoid(want_scan[0]).numpy()).max() <= TOLERANCE


def test_missing_or_stale_export_is_refused(
    png_bundle: Path, png_onnx: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(png_bundle, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="no ONNX export"):
        Predictor(copy, backend="onnx")
    shutil.copy2(png_onnx, copy / "model.onnx")
    state = torch.load(copy / "slice-0.pt", weights_only=True)
    state["head.1.bias"] += 1.0
    torch.save(state, copy / "slice-0.pt")
    with pytest.raises(BundleError, match="other weights"):
        Predictor(copy, backend="onnx")
