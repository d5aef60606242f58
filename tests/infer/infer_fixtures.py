"""Fixtures shared by the inference tests: one tiny model trained once per session on a
synthetic DICOM set, and variants of it made without training again.

The test modules load this file as a plugin (``pytest_plugins = ["infer_fixtures"]``),
so each fixture has one definition and its session scope holds across modules. It is not
a conftest.py on purpose: a second module named ``conftest`` would replace
``tests/conftest.py`` in ``sys.modules`` and break ``from conftest import shared``
elsewhere. Nothing here is autouse: modules opt in to ``single_threaded_torch``.

Torch runs single-threaded in these tests: on a loaded 2-core machine, OpenMP's second
thread makes a 32-pixel ResNet18 forward ~20x slower instead of faster.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from ichscan.data.synth import write_synthetic
from ichscan.models.bundle import load_bundle, save_bundle
from ichscan.models.study import build_study_model
from ichscan.threads import torch_threads

FAST = dict(
    architecture="resnet18",
    pretrained="none",
    size=32,
    batch_size=8,
    epochs=1,
    folds=3,
    workers=0,
    progress=False,
    tensorboard=False,
)


class BleedDetector(nn.Module):
    """A hand-built 'slice model' whose logit is the mean of a blood map: relu(10 * brain -
    20 * bone), positive for 45-90 HU soft tissue (acute blood) and negative for brain (~30
    HU), CSF, air and bone. Grad-CAM on its map must find the bleed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([10.0, 0.0, -20.0]).view(1, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return self.act(self.conv(x)).mean(dim=(2, 3))


def one_thread() -> contextlib.AbstractContextManager[None]:
    return torch_threads(1)


@pytest.fixture
def single_threaded_torch() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def synth_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic 8-slice DICOM series (one patient each) with slice truth."""
    root = tmp_path_factory.mktemp("synth") / "dicom"
    write_synthetic(root, n_scans=6, seed=3, layout="dicom", shape=(8, 64, 64))
    return root


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory, synth_dicom: Path) -> Path:
    """A ResNet18 at 32 px trained one epoch on the HU windows brain/subdural/bone."""
    from ichscan.train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("models") / "hu"
    with one_thread():
        train(TrainConfig(data=str(synth_dicom), out=str(out), **FAST))
    return out


def _copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copy2(path, dst / path.name)
    return dst


@pytest.fixture(scope="session")
def png_bundle(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path) -> Path:
    """The trained weights under the input spec training writes for a brain-window PNG set
    (one window, source_window "brain"): what the predictor does depends only on the spec."""
    out = _copy_bundle(trained_bundle, tmp_path_factory.mktemp("models") / "png")
    config = json.loads((out / "bundle.json").read_text())
    config["input"]["windows"] = [{"name": "brain", "center": 40.0, "width": 80.0}]
    config["input"]["source_window"] = "brain"
    (out / "bundle.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def study_bundle(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path) -> Path:
    """The trained slice model plus a (randomly initialised) GRU study model."""
    out = tmp_path_factory.mktemp("models") / "study"
    bundle = load_bundle(trained_bundle)
    torch.manual_seed(0)
    config = {"kind": "gru", "hidden": 16}
    study = build_study_model(config, bundle.members[0].embed_dim, len(bundle.labels))
    save_bundle(out, bundle.config, bundle.members, study, config)
    return out
