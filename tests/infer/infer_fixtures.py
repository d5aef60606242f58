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

from ichscan.data.synth import write_synthetic
from ichscan.models.bundle import load_bundle, save_bundle
from ichscan.models.study import build_study_model

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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
