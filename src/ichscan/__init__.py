"""ichscan: find intracranial hemorrhage on head CT.

Research software, not a medical device: do not use it for diagnosis or patient care.

Reading and preprocessing (``load``, ``discover``, ``write_nifti``) import no torch. The
model verbs (``Predictor``, ``ScanPrediction``, ``predict_paths``, ``explain``) are imported
on first use, so ``import ichscan`` stays light for data work. Training from Python is
``ichscan.train.loop.train(TrainConfig(...))``: ``ichscan.train`` is the package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ichscan.errors import IchscanError, InputError
from ichscan.io import discover, load, write_nifti
from ichscan.scan import Scan

if TYPE_CHECKING:
    from ichscan.infer.explain import explain
    from ichscan.infer.predictor import Predictor, ScanPrediction, predict_paths

__version__ = "0.1.0"
_MODEL_VERBS = {
    "Predictor": "ichscan.infer.predictor",
    "ScanPrediction": "ichscan.infer.predictor",
    "predict_paths": "ichscan.infer.predictor",
    "explain": "ichscan.infer.explain",
}
__all__ = [
    "IchscanError",
    "InputError",
    "Predictor",
    "Scan",
    "ScanPrediction",
    "__version__",
    "discover",
    "explain",
    "load",
    "predict_paths",
    "write_nifti",
]


def __getattr__(name: str) -> Any:
    if name in _MODEL_VERBS:
        return getattr(import_module(_MODEL_VERBS[name]), name)
    raise AttributeError(f"module 'ichscan' has no attribute {name!r}")
