"""Whether a prepared cache holds the input a model reads: one rule for every command that
runs a bundle on an existing cache (`evaluate`, `train-study`), so they cannot drift apart.

A cache cut otherwise holds other pixels: scores on it are not the model's, and a study
model fitted to its embeddings would be fitted to inputs predict never gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ichscan.data.cache import PreparedCache
from ichscan.preprocess.head_crop import CROP_VERSION, extra_planes

if TYPE_CHECKING:
    from ichscan.infer.inputs import InputSpec

__all__ = ["InputDifference", "input_differences"]


@dataclass(frozen=True)
class InputDifference:
    """One aspect (size, windows, mode, crop, channels) in which a cache is not the input."""

    aspect: str
    cache: str
    model: str

    def __str__(self) -> str:
        return f"{self.aspect} {self.cache} (the model: {self.model})"


def input_differences(cache: PreparedCache, spec: InputSpec) -> list[InputDifference]:
    """How ``cache`` differs from what predict gives a model of input ``spec``; empty when
    it does not."""
    facts = cache.facts
    have_windows = [_window(w["name"], w["center"], w["width"]) for w in facts.get("windows", [])]
    want_windows = [_window(w.name, w.center, w.width) for w in spec.windows]
    # predict cuts with this ichscan's head crop, whatever version the model was trained on
    want_version = CROP_VERSION if spec.crop != "none" else None
    aspects: list[tuple[str, Any, Any, str, str]] = [
        ("size", cache.size, spec.size, f"{cache.size} px", f"{spec.size} px"),
        # By value: "soft" and "soft_tissue" are one window.
        (
            "windows",
            [v for _, v in have_windows],
            [v for _, v in want_windows],
            ", ".join(t for t, _ in have_windows),
            ", ".join(t for t, _ in want_windows),
        ),
        ("mode", str(facts.get("mode", "linear")), spec.mode, "", ""),
        (
            "crop",
            (cache.crop, cache.crop_version),
            (spec.crop, want_version),
            _crop(cache.crop, cache.crop_version),
            _crop(spec.crop, want_version),
        ),
        # the planes a cache stores per slice for this input (training's cache held these)
        ("channels", cache.channels, len(spec.windows) + extra_planes(spec.crop), "", ""),
    ]
    return [
        InputDifference(aspect, shown_have or str(have), shown_want or str(want))
        for aspect, have, want, shown_have, shown_want in aspects
        if have != want
    ]


def _window(name: Any, center: Any, width: Any) -> tuple[str, tuple[float, float]]:
    value = (float(center), float(width))
    return f"{name} {value[0]:g}/{value[1]:g}", value


def _crop(crop: str, version: int | None) -> str:
    return crop if crop == "none" else f"{crop} v{version}"
