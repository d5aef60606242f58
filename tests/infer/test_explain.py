"""Grad-CAM: the heat lands on the bleed (a real Grad-CAM run over a model whose evidence is
known), the target layer of every backbone family, and the files `explain` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_fixtures import BleedDetector
from PIL import Image

from ichscan.data.phantom import label_mask, make_phantom
from ichscan.infer.explain import ExplainError, GradCamExplainer, explain, target_layer
from ichscan.infer.inputs import scan_to_model_input
from ichscan.io.dicom_write import write_ct_series
from ichscan.io.load import load
from ichscan.models.slice_model import SliceModel

# Shared fixtures (a trained tiny bundle and its variants): see infer_fixtures.py.
pytest_plugins = ["infer_fixtures"]
pytestmark = pytest.mark.usefixtures("single_threaded_torch")

HU_INPUT = {
    "kind": "windows",
    "windows": [
        {"name": "brain", "center": 40.0, "width": 80.0},
        {"name": "subdural", "center": 80.0, "width": 200.0},
        {"name": "bone", "center": 600.0, "width": 2800.0},
    ],
    "size": 64,
}


def test_gradcam_peak_falls_in_the_bleed(tmp_path: Path) -> None:
    phantom = make_phantom(
        (10, 128, 128), (5.0, 1.8, 1.8), seed=7, findings=["intraparenchymal", "subdural"]
    )
    write_ct_series(phantom.hu, tmp_path / "s", pixel_spacing=(1.8, 1.8))
    scan = load(tmp_path / "s")
    np.testing.assert_array_equal(scan.hu, phantom.hu)  # same orientation as the masks
    model = BleedDetector().eval()
    explainer = GradCamExplainer([model], [model.act], ["any"])
    heat = explainer.heatmaps(scan_to_model_input(scan, HU_INPUT), 0, (128, 128))
    assert heat.shape == (10, 128, 128) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1

    mask = label_mask(phantom, "any")
    bleeding = [k for k in range(10) if mask[k].sum() >= 20]
    assert len(bleeding) >= 3
    hits = [bool(mask[k].flat[int(np.argmax(heat[k]))]) for k in bleeding]
    hit_rate = float(np.mean(hits))
    chance = float(np.mean([mask[k].mean() for k in bleeding]))
    assert hit_rate >= 0.6, (hit_rate, chance)
    assert hit_rate > 5 * chance, (hit_rate, chance)


@pytest.mark.parametrize(
    ("architecture", "layer_type", "named"),
    [
        ("resnet18", "BasicBlock", "resnet18 backbone.layer4.1 (the last residual block)"),
        ("alexnet", "Conv2d", "alexnet backbone.features.10 (the last convolution)"),
        ("densenet121", "Sequential", "densenet121 backbone.features (the dense blocks"),
        ("efficientnet_b0", "Conv2dNormActivation", "efficientnet_b0 backbone.features.8 ("),
        ("efficientnet_lite0", "MBConvBlock", "efficientnet_lite0 backbone._blocks."),
    ],
)
def test_target_layer_of_each_family_gives_a_map(
    architecture: str, layer_type: str, named: str
) -> None:
    """Each family's layer gives a map, and `method` (explain.json) names that layer: for
    EfficientNet-Lite a stride-16 block, not the last convolution."""
    torch.manual_seed(0)
    model = SliceModel(architecture, 2, pretrained="none", dropout=0.0).eval()
    layer = target_layer(model)
    assert type(layer).__name__ == layer_type
    explainer = GradCamExplainer([model], [layer], ["a", "b"])
    assert explainer.method.startswith(f"Grad-CAM (pytorch_grad_cam) of {named}")
    if architecture == "efficientnet_lite0":
        index = list(model.backbone._blocks).index(layer)
        assert f"_blocks.{index} (the last block at stride 16" in explainer.method
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)
    maps = explainer.maps(x, 1)
    assert maps.shape == (2, 96, 96) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_explain_writes_overlays_montage_and_heatmaps(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path
) -> None:
    series = sorted(p.parent for p in synth_dicom.glob("*/*/*.dcm"))[0]
    out = tmp_path / "explain"
    result = explain(series, trained_bundle, out, top_k=3, device="cpu")
    assert result.label == "any"
    heat = np.load(out / "heatmaps.npy")
    assert heat.shape == (8, 64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    assert len(result.overlays) == 8 and all(p.is_file() for p in result.overlays)
    assert Image.open(result.overlays[0]).size == (64, 64)
    assert len(result.top_slices) == 3
    probs = result.slice_probs
    assert [probs[k] for k in result.top_slices] == sorted(probs, reverse=True)[:3]
    montage = Image.open(out / "montage.png")
    # Three tiles, and under them a footer band saying what the model rests on.
    assert montage.size[0] == 3 * 256 and 256 < montage.size[1] <= 256 + 80
    summary = json.loads((out / "explain.json").read_text())
    assert summary["label"] == "any" and len(summary["slice_ids"]) == 8
    assert summary["method"].startswith("Grad-CAM") and summary["warnings"] == result.warnings


def test_explain_says_what_the_model_was_trained_on(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path
) -> None:
    """explain.json, the result (for the console) and the montage say what the maps rest
    on, in predict's words; the tiny bundle was trained on synthetic phantoms."""
    from ichscan.models.bundle import load_bundle, trained_on

    words = trained_on(load_bundle(trained_bundle).config)
    assert words.startswith("SYNTHETIC phantoms at ")
    series = sorted(p.parent for p in synth_dicom.glob("*/*/*.dcm"))[0]
    out = tmp_path / "explain"
    result = explain(series, trained_bundle, out, top_k=1, device="cpu")
    summary = json.loads((out / "explain.json").read_text())
    assert summary["trained_on"] == words and summary["trained_on_synthetic"] is True
    assert result.trained_on == words
    assert result.trained_on_line == f"model trained on {words}"
    montage = np.asarray(Image.open(out / "montage.png").convert("RGB"))
    footer = montage[256:]
    assert footer.size and (footer[..., 0] > 200).any()  # the yellow footer text is there
    assert (footer[..., 2] < 50)[footer[..., 0] > 200].all()  # yellow, not white


def test_explain_says_small_set_maps_are_not_grad_cam() -> None:
    """The small-set ensemble is explained by its own maps (MIL heads, pixel reader), and
    says so."""
    from torch import nn

    from ichscan.infer.explain import GradCamExplainer
    from ichscan.models.small_set import SmallSetModel

    mil = SmallSetModel.__new__(SmallSetModel)  # isinstance is all `method` reads
    other = nn.Linear(2, 2)
    only_mil = GradCamExplainer([mil], [mil], ["hemorrhage"])
    assert only_mil.method.startswith("the small-set MIL heads' per-location")
    assert "Grad-CAM" not in only_mil.method
    both = GradCamExplainer([mil, other], [mil, other], ["hemorrhage"])
    assert "Grad-CAM" in both.method and "averaged over 2 models" in both.method


def test_explain_names_an_unknown_label(
    trained_bundle: Path, synth_dicom: Path, tmp_path: Path
) -> None:
    series = sorted(p.parent for p in synth_dicom.glob("*/*/*.dcm"))[0]
    with pytest.raises(ExplainError, match=r"unknown label 'bleed'.*any, epidural"):
        explain(series, trained_bundle, tmp_path, label="bleed", device="cpu")


def test_a_tile_caption_stays_readable_over_bright_skull() -> None:
    """The caption carries the slice's probability; on a white tile (the skull is white in
    every brain window) it is still white text on a dark band."""
    from ichscan.infer.explain import TILE, _montage

    white = Image.new("RGB", (64, 64), (255, 255, 255))
    sheet = np.asarray(_montage([(white, "slice 0  p(hemorrhage) 0.97")]))
    band = sheet[4:14, 4:160]  # where the caption is drawn
    assert (band.max(-1) < 40).mean() > 0.5  # mostly the dark band
    assert (band.min(-1) > 200).any()  # and the white letters on it
    assert (sheet[TILE // 2, TILE // 2] == 255).all()  # the tile itself untouched
