"""Backbones: every seed architecture builds with a fresh head; weights come from where the
user said, or fail with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ichscan.models.backbones import (
    BACKBONES,
    UnknownArchitecture,
    WeightsUnavailable,
    build_backbone,
)
from ichscan.models.slice_model import SliceModel

FAST = ["resnet18", "alexnet", "efficientnet_b0", "densenet121", "efficientnet_lite0"]


def _embed(name: str) -> tuple[int, torch.Tensor]:
    model, width, provenance = build_backbone(name, "none")
    assert "random" in provenance
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    return width, out


@pytest.mark.parametrize("name", FAST)
def test_backbone_gives_embedding(name: str) -> None:
    width, out = _embed(name)
    assert out.shape == (2, width)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(BACKBONES) - set(FAST)))
def test_every_registered_backbone(name: str) -> None:
    width, out = _embed(name)
    assert out.shape == (2, width)


def test_registry_has_the_seed_architectures() -> None:
    for name in (
        "vgg16",
        "alexnet",
        "resnet18",
        "resnet50",
        "resnet101",
        "resnet152",
        "densenet121",
        "densenet161",
        "densenet169",
        "densenet201",
        "efficientnet_b0",
        "efficientnet_b4",
        "efficientnet_lite0",
        "efficientnet_lite2",
    ):
        assert name in BACKBONES


def test_slice_model_head_matches_label_count() -> None:
    model = SliceModel("resnet18", 6, pretrained="none").eval()
    with torch.no_grad():
        logits = model(torch.zeros(3, 3, 64, 64, dtype=torch.uint8))
    assert logits.shape == (3, 6)


def test_unknown_architecture() -> None:
    with pytest.raises(UnknownArchitecture, match="resnet18"):
        build_backbone("resnet17")


def test_torchvision_imagenet_offline_and_uncached_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ICHSCAN_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("resnet18", "imagenet")
    message = str(err.value)
    assert "resnet18" in message and "--pretrained none" in message
    assert str(tmp_path) in message  # says where the file would have to be


def test_torchvision_imagenet_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file already in torchvision's cache is used without any network."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ICHSCAN_OFFLINE", "1")
    reference = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model, _, provenance = build_backbone("resnet18", "imagenet")
    assert "ImageNet" in provenance
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)


def test_pretrained_from_file(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    model, _, provenance = build_backbone("resnet18", str(path))
    assert str(path) in provenance
    torch.testing.assert_close(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_pretrained_file_of_another_architecture(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "weights.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        build_backbone("resnet18", str(path))


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="not found"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_lite0_imagenet_weights_are_really_trained() -> None:
    """Offline ImageNet weights: their features separate real hemorrhage slices (the 100
    RSNA PNGs) far better than the same network with random weights (5-fold logistic
    regression AUC)."""
    import pandas as pd
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from conftest import shared
    from ichscan.io.image import read_grey

    root = shared("rsna_png")
    labels = pd.read_csv(root / "labels.csv")
    images = np.stack(
        [
            np.asarray(Image.fromarray(read_grey(root / "images" / f"{i}.png")).resize((160, 160)))
            for i in labels["id"]
        ]
    )
    y = labels["any"].to_numpy()
    x = torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1)

    def cv_auc(pretrained: str) -> float:
        torch.manual_seed(0)
        model = SliceModel("efficientnet_lite0", 1, pretrained=pretrained).eval()
        with torch.no_grad():
            feats = torch.cat([model.embed(b) for b in x.split(50)]).numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        p = cross_val_predict(
            clf,
            feats,
            y,
            cv=StratifiedKFold(5, shuffle=True, random_state=0),
            method="predict_proba",
        )[:, 1]
        return roc_auc_score(y, p)

    trained, random_init = cv_auc("imagenet"), cv_auc("none")
    print(f"RSNA PNG 5-fold AUC: ImageNet lite0 {trained:.3f}, random {random_init:.3f}")
    assert trained > 0.75
    assert trained > random_init + 0.1


@pytest.mark.parametrize("kind", ["text", "checkpoint"])
def test_a_file_that_is_not_weights_is_one_line_without_unsafe_advice(
    tmp_path: Path, kind: str
) -> None:
    """A text file, or an ichscan checkpoint (it holds numpy random state, which a safe load
    refuses): one line, never PyTorch's advice to load with weights_only=False, and the
    weights file to use instead."""
    path = tmp_path / "weights.pt"
    if kind == "text":
        path.write_text("# not weights\n")
    else:
        torch.save({"model": {}, "rng_numpy": np.random.get_state()}, path)
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("resnet18", str(path))
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message
    assert "not a PyTorch file of weights" in message and "checkpoints/best.pt" in message


def test_a_training_runs_best_weights_load_as_pretrained(tmp_path: Path) -> None:
    """What the refusal above points to: a run's checkpoints/best.pt starts another run."""
    trained = SliceModel("resnet18", 6, pretrained="none")
    path = tmp_path / "best.pt"
    torch.save(trained.state_dict(), path)
    model, _, _ = build_backbone("resnet18", str(path))
    torch.testing.assert_close(model.conv1.weight, trained.backbone.conv1.weight)


def test_imagenet_weights_offline_and_uncached_never_start_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ICHSCAN_OFFLINE, an unreachable host is found out before torch prints
    'Downloading ...': the run says only that the weights are not there and what to do."""
    import socket

    import torchvision.models._api as api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ICHSCAN_OFFLINE", raising=False)

    def unreachable(*_: object, **__: object) -> None:
        raise OSError("Temporary failure in name resolution")

    downloads: list[str] = []
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, **_: downloads.append(url))
    with pytest.raises(WeightsUnavailable, match="cannot be downloaded"):
        build_backbone("resnet18", "imagenet")
    assert downloads == []
    assert "Downloading" not in capsys.readouterr().err
