"""Inference: the predictor (per slice and per scan), output writers, Grad-CAM explanations
and ONNX export. Heavy dependencies (grad-cam, onnxruntime) are imported only by the modules
that need them."""

from __future__ import annotations

from ichscan.infer.inputs import InputSpec, scan_to_model_input
from ichscan.infer.predictor import Predictor, ScanPrediction, predict_paths, run_predict

__all__ = [
    "InputSpec",
    "Predictor",
    "ScanPrediction",
    "predict_paths",
    "run_predict",
    "scan_to_model_input",
]
