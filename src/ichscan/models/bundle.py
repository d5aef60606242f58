"""The model bundle: weights plus `bundle.json`, everything `predict` needs and nothing else.

Preprocessing (windows, input construction, size, normalisation), label names and decision
thresholds travel inside the bundle, so a model can never be fed differently from how it was
trained. A bundle may hold several slice models (a fold or seed ensemble, averaged in
probability) and an optional study-level sequence model.

Layout of MODEL_DIR:
  bundle.json      configuration, thresholds, training summary, metrics, versions
  slice-0.pt ...   state dicts of the slice models (one per ensemble member)
  study.pt         state dict of the study model (when trained)
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ichscan import __version__
from ichscan.errors import IchscanError, InputError
from ichscan.labels import LabelSet, get_label_set
from ichscan.models.slice_model import SliceModel
from ichscan.preprocess.head_crop import CROP_VERSION

FORMAT = "ichscan-bundle"
FORMAT_VERSION = 1


class BundleError(IchscanError):
    """A model folder that is missing, incomplete or from an incompatible version."""


def versions() -> dict[str, str]:
    import torchvision

    return {
        "ichscan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


@dataclass
class Bundle:
    config: dict[str, Any]
    root: Path
    members: list[SliceModel] = field(default_factory=list)
    study: torch.nn.Module | None = None

    @property
    def label_set(self) -> LabelSet:
        return get_label_set(self.config["label_set"])

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.config.get("thresholds", {}).items()}

    @property
    def input(self) -> dict[str, Any]:
        return dict(self.config["input"])

    def to(self, device: torch.device | str) -> Bundle:
        for m in self.members:
            m.to(device)
        if self.study is not None:
            self.study.to(device)
        return self


SYNTHETIC_WORDS = "SYNTHETIC phantoms"


def is_synthetic_line(line: object) -> bool:
    """Whether a :func:`trained_on` line (as a result JSON or SR carries it) says the model
    rests on ichscan's synthetic phantoms."""
    return isinstance(line, str) and line.startswith(SYNTHETIC_WORDS)


def data_words(source: object, synthetic: bool) -> str:
    """How every output names the data a figure rests on: ichscan's phantoms are called so."""
    return f"{SYNTHETIC_WORDS if synthetic else 'data'} at {source}"


def trained_on(config: dict[str, Any]) -> str:
    """One line on the data a bundle was trained on, for every output that prints its
    figures: synthetic phantoms are called so."""
    training = config.get("training") or {}
    summary = training.get("data_summary") or {}
    source = summary.get("source") or training.get("data")
    if not source:
        return "training data not recorded in this bundle"
    synthetic = summary.get("synthetic")
    if synthetic is None:  # bundles from before the flag: look, where the data still is
        from ichscan.data.synth import is_synthetic

        synthetic = is_synthetic(source)
    counts = [
        f"{summary[key]} {noun}"
        for key, noun in (("slices", "slices"), ("patients", "patients"))
        if summary.get(key) is not None
    ]
    extra = (training.get("config") or {}).get("extra_train") or []
    line = data_words(source, bool(synthetic)) + (f" ({', '.join(counts)})" if counts else "")
    if extra:
        line += f" + extra training data {', '.join(map(str, extra))}"
    if "fold" in training and "folds" in training:
        line += f"; validated on fold {training['fold']} of {training['folds']}"
    return line


def _window_dict(window: Any) -> dict[str, Any]:
    if isinstance(window, dict):
        return dict(window)
    from ichscan.preprocess.window import parse_windows

    (w,) = parse_windows([window])
    return {"name": w.name, "center": w.center, "width": w.width}


def input_spec(
    windows: list[dict[str, Any]] | tuple[Any, ...],
    size: int,
    *,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    kind: str = "windows",
    mode: str = "linear",
    source_window: str | None = None,
    tta: tuple[str, ...] = ("identity",),
    crop: str = "none",
    crop_version: int | None = None,
    slice_thickness_mm: float | None = None,
) -> dict[str, Any]:
    """The `input` section of bundle.json: how a slice becomes the model's input. `windows`
    are Window tuples, names, or {name, center, width} dicts; `crop` a preprocess.head_crop
    mode applied at full resolution before the resize, `crop_version` the head_crop version
    the training slices were cut with (the current one when omitted). `slice_thickness_mm`:
    the slice spacing of the training scans, when they had one (prediction reslices thinner
    series to it)."""
    if crop_version is None:
        crop_version = CROP_VERSION
    return_windows = [_window_dict(w) for w in windows]
    spec = {
        "kind": kind,
        "windows": return_windows,
        "mode": mode,
        "size": int(size),
        "crop": crop,
        "crop_version": crop_version if crop != "none" else None,
        "channels": 3,
        "source_window": source_window,
        "normalisation": {"mean": list(map(float, mean)), "std": list(map(float, std))},
        "tta": list(tta),
    }
    if slice_thickness_mm is not None:
        spec["slice_thickness_mm"] = float(slice_thickness_mm)
    return spec


def new_config(
    *,
    architecture: str,
    weights_provenance: str,
    label_set: LabelSet,
    input_spec: dict[str, Any],
    dropout: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "weights_provenance": weights_provenance,
        "dropout": dropout,
        "label_set": label_set.name,
        "labels": list(label_set.labels),
        "label_weights": list(label_set.weights),
        "input": input_spec,
        "thresholds": {label: 0.5 for label in label_set.labels},
        "threshold_method": "default 0.5 (not tuned)",
        "members": [],
        "study_model": None,
        "versions": versions(),
        "research_use_only": "ichscan is research software, not a medical device",
        **extra,
    }


def save_bundle(
    root: str | Path,
    config: dict[str, Any],
    members: list[SliceModel],
    study: torch.nn.Module | None = None,
    study_config: dict[str, Any] | None = None,
) -> Path:
    """Write weights first and bundle.json last (atomically), so a half-written folder is
    never mistaken for a model."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, model in enumerate(members):
        name = f"slice-{i}.pt"
        atomic_torch_save(_cpu_state(model), root / name)
        names.append(name)
    config = {**config, "members": names, "versions": versions()}
    if study is not None:
        atomic_torch_save(_cpu_state(study), root / "study.pt")
        config["study_model"] = {**(study_config or {}), "weights": "study.pt"}
    tmp = root / "bundle.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, default=_json_default))
    tmp.replace(root / "bundle.json")
    return root


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:
        # A full disk reaches torch's zip writer as a RuntimeError ("unexpected pos ...").
        tmp.unlink(missing_ok=True)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise BundleError(path, f"cannot write weights ({lines[0]}); free some disk") from None
    tmp.replace(path)


def read_config(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    path = root / "bundle.json"
    if not root.exists():
        raise BundleError(root, "model folder not found")
    if not path.exists():
        raise BundleError(root, "not an ichscan model folder (no bundle.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(path, f"corrupt bundle.json ({exc})") from None
    if config.get("format") != FORMAT:
        raise BundleError(path, "not an ichscan bundle")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(
            path,
            f"bundle format {config['format_version']} is newer than this "
            f"ichscan understands ({FORMAT_VERSION}); upgrade ichscan",
        )
    if not config.get("members"):
        raise BundleError(path, "bundle has no trained slice model")
    return config


def build_member(config: dict[str, Any]) -> SliceModel:
    if config.get("recipe") == "small-set":
        from ichscan.models.small_set import build_small_set

        return build_small_set(config)  # type: ignore[return-value]
    norm = config["input"]["normalisation"]
    return SliceModel(
        config["architecture"],
        len(config["labels"]),
        pretrained="none",  # the bundle's own weights are loaded next
        dropout=float(config.get("dropout", 0.0)),
        mean=tuple(norm["mean"]),
        std=tuple(norm["std"]),
    )


def load_bundle(root: str | Path, device: str | torch.device = "cpu") -> Bundle:
    root = Path(root)
    config = read_config(root)
    members = []
    for name in config["members"]:
        try:
            model = build_member(config)
        except ValueError as exc:  # a bundle this version cannot rebuild
            raise BundleError(root / "bundle.json", str(exc)) from None
        model.load_state_dict(_load_state(root / name))
        members.append(model.eval())
    study = None
    if config.get("study_model"):
        from ichscan.models.study import build_study_model

        study = build_study_model(
            config["study_model"], members[0].embed_dim, len(config["labels"])
        )
        study.load_state_dict(_load_state(root / config["study_model"]["weights"]))
        study.eval()
    return Bundle(config, root, members, study).to(device)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise BundleError(path, "weights file listed in bundle.json is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"corrupt weights file ({exc})") from None
