"""The model the web app serves with, and what ``GET /api/model`` says about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Keys of the training record that hold paths on the training machine: not the web's business.
_PATH_KEYS = {"data", "out", "source", "extra_train", "resume"}


def load_predictor(model_dir: str | Path, device: str = "auto") -> Any:
    """The bundle's Predictor (PyTorch, so that Grad-CAM can run), loaded once."""
    from ichscan.infer.predictor import Predictor

    return Predictor(model_dir, device=device)


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k not in _PATH_KEYS}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def model_info(predictor: Any) -> dict[str, Any]:
    config = predictor.bundle.config
    labels = list(predictor.labels)
    return {
        "architecture": config.get("architecture"),
        "label_set": config.get("label_set"),
        "labels": labels,
        "headline_label": labels[0],
        "thresholds": {
            name: float(t) for name, t in zip(labels, predictor.thresholds, strict=True)
        },
        "threshold_method": config.get("threshold_method"),
        "input": _without_paths(config.get("input", {})),
        "reslice_mm": predictor.reslice_mm,
        "ensemble_members": len(config.get("members", [])),
        "study_model": config.get("study_model") is not None,
        "weights_provenance": config.get("weights_provenance"),
        "training": _without_paths(config.get("training", {})),
        "metrics": config.get("metrics", {}),
        "versions": config.get("versions", {}),
        "research_use_only": "ichscan is research software, not a medical device",
    }
