"""The model the web app serves with, and what ``GET /api/model`` says about it."""

from __future__ import annotations

import copy
from pathlib import Path, PurePath
from typing import Any

from ichscan.models.bundle import is_synthetic_line, trained_on

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


def _name_only(value: Any) -> Any:
    if isinstance(value, list):
        return [_name_only(v) for v in value]
    return PurePath(str(value)).name or str(value) if value else value


def training_note(config: dict[str, Any]) -> dict[str, Any]:
    """What the model was trained on, for the web: ``trained_on`` (the words ``predict``
    prints, with the training machine's paths cut to their last part, as the rest of the
    web's model record does) and ``trained_on_synthetic`` (synthetic phantoms)."""
    synthetic = is_synthetic_line(trained_on(config))
    shown = copy.deepcopy(config)
    training = shown.get("training") or {}
    summary = training.get("data_summary") or {}
    if summary.get("source"):
        summary["source"] = _name_only(summary["source"])
    if summary:
        summary["synthetic"] = synthetic  # decided above, where the data may still be
    if training.get("data"):
        training["data"] = _name_only(training["data"])
        if not summary:
            # No summary: trained_on would look at the (now cut) path to decide.
            training["data_summary"] = {"source": training["data"], "synthetic": synthetic}
    extra = (training.get("config") or {}).get("extra_train")
    if extra:
        training["config"]["extra_train"] = _name_only(list(extra))
    return {"trained_on": trained_on(shown), "trained_on_synthetic": synthetic}


def model_info(predictor: Any) -> dict[str, Any]:
    config = predictor.bundle.config
    labels = list(predictor.labels)
    return {
        **training_note(config),
        "architecture": config.get("architecture"),
        "label_set": config.get("label_set"),
        "labels": labels,
        "headline_label": labels[0],
        "thresholds": {
            name: float(t) for name, t in zip(labels, predictor.thresholds, strict=True)
        },
        "scan_thresholds": {
            name: float(t) for name, t in zip(labels, predictor.scan_thresholds, strict=True)
        },
        # a study model decides at its own thresholds, chosen its own way
        "threshold_method": predictor.threshold_method or None,
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
