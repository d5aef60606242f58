"""Grad-CAM explanations: where in each slice the slice model found a label.

Grad-CAM (Selvaraju et al. 2017) weights the channels of a late convolutional layer by the
mean gradient of the label's logit and keeps the positive part; the maintained
``grad-cam`` package (``pytorch_grad_cam``) computes it and scales each map to [0, 1]. Here:

- The target layer per backbone family (`target_layer`): ResNet ``layer4[-1]`` (the last
  residual block), DenseNet ``features`` (up to its last norm, the map the classifier
  pools), VGG/AlexNet the last Conv2d of ``features``, EfficientNet-B ``features[-1]`` (the
  1x1 head conv block), EfficientNet-Lite the last of its ``_blocks`` at stride 16 (not the
  ``_conv_head``: on a trained Lite0 the head conv gave empty maps and lit the padded
  corners). ``explain.json``'s ``method`` names the module hooked, per model.
- The input is exactly what predict feeds the model (:class:`Predictor`'s preparation,
  reslicing included), so the heat lies over what the prediction saw.
- Maps from several ensemble members are averaged, then every slice's map is resized
  (bilinear) from the model input to the slice's own rows x columns and scaled to [0, 1]
  per slice, Grad-CAM's convention: a map shows *where* on its slice, and the slice's
  probability says *how much*. A slice with no positive evidence gets an all-zero map.
- The study model is not explained (it reads embeddings, not pixels); the slice ranking
  uses the predictor's slice probabilities, refined by the study model when there is one.

`explain` writes ``overlays/slice-NNN.png`` (brain window with the heat in colour),
``montage.png`` (the ``top_k`` most suspicious slices, with a footer saying what the model
was trained on), ``heatmaps.npy`` (float32 [S, H, W] in [0, 1], the slices of the scan as
predicted) and ``explain.json`` (with ``trained_on``, in ``predict``'s words).
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ichscan.errors import IchscanError
from ichscan.infer.predictor import Predictor
from ichscan.io.load import load
from ichscan.io.montage import text_on_band
from ichscan.models.bundle import SYNTHETIC_WORDS, is_synthetic_line, trained_on
from ichscan.models.slice_model import SliceModel
from ichscan.models.small_set import SmallSetModel
from ichscan.preprocess.head_crop import crop_box
from ichscan.preprocess.window import apply_window
from ichscan.scan import Scan

__all__ = ["Explanation", "GradCamExplainer", "explain", "layer_name", "target_layer"]

TILE = 256
MONTAGE_COLUMNS = 4
# Heat at or below this is left out of an overlay, so the anatomy stays readable.
OVERLAY_FLOOR = 0.2
OVERLAY_ALPHA = 0.5
FOOTER_LINE_PX = 14  # the montage's footer: PIL's default bitmap font, ~6 px a character
FOOTER_CHAR_PX = 6


class ExplainError(IchscanError):
    """A label or model this explanation cannot be made for."""


def _last_conv(features: nn.Module) -> nn.Module:
    return [m for m in features if isinstance(m, nn.Conv2d)][-1]


# Per architecture family: its Grad-CAM layer, and what that layer is in words (after its
# module name in explain.json's `method`). One table, so a new family gets both.
TARGET_LAYERS: tuple[tuple[str, Callable[[nn.Module], nn.Module], str], ...] = (
    ("resnet", lambda b: b.layer4[-1], "the last residual block"),
    ("densenet", lambda b: b.features, "the dense blocks up to the last batch norm"),
    ("vgg16", lambda b: _last_conv(b.features), "the last convolution"),
    ("alexnet", lambda b: _last_conv(b.features), "the last convolution"),
    ("efficientnet_b", lambda b: b.features[-1], "the 1x1 head convolution block"),
    # The last block at stride 16, not the head: on a trained Lite0 the 1x1 head conv gave
    # empty maps and its batch norm lit the padded corners of every slice, while the
    # stride-16 blocks follow the anatomy (and at 128 px they are 8x8, not 4x4).
    (
        "efficientnet_lite",
        lambda b: _last_block_at_stride(b, 16),
        "the last block at stride 16, before the head convolution",
    ),
)


def target_layer(model: SliceModel) -> nn.Module:
    """The Grad-CAM layer of a slice model's backbone (see the module notes)."""
    arch = model.architecture
    for family, pick, _ in TARGET_LAYERS:
        if arch.startswith(family):
            return pick(model.backbone)
    raise ExplainError(None, f"no Grad-CAM target layer known for architecture {arch!r}")


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The hooked layer as `explain.json` names it: the architecture, the module's path in
    the model and what it is, e.g. ``efficientnet_lite0 backbone._blocks.10 (the last
    block at stride 16, before the head convolution)``."""
    path = next((name for name, m in model.named_modules() if m is layer), "")
    arch = str(getattr(model, "architecture", type(model).__name__))
    words = next((w for family, _, w in TARGET_LAYERS if arch.startswith(family)), "")
    return " ".join(filter(None, (arch, path or type(layer).__name__))) + (
        f" ({words})" if words else ""
    )


def _last_block_at_stride(backbone: nn.Module, stride: int) -> nn.Module:
    """The last EfficientNet block whose output is 1/stride of the input, found by a probe."""
    size, widths = 64, []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out, k=k: widths.append((k, out.shape[-1])))
        for k, block in enumerate(backbone._blocks)
    ]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    index = max(k for k, width in widths if width == size // stride)
    return backbone._blocks[index]


def _without_inplace(model: nn.Module) -> nn.Module:
    """A copy whose activations do not overwrite their input: Grad-CAM hooks keep the
    target layer's output, which an in-place ReLU right after it (VGG, AlexNet) would
    change under them."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def _small_set_maps(
    model: SmallSetModel, x: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """The small-set ensemble's own localisation (SmallSetModel.blood_map: its MIL heads'
    and its pixel reader's per-location blood probability, weighted as they vote) at the
    input size. Grad-CAM through the ensemble would mix in the forests and the pooled
    regressions, which have no spatial map."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start : start + batch_size]).to(device)
            out.append(model.blood_map(batch).float().cpu().numpy())
    return np.concatenate(out)


class GradCamExplainer:
    """Grad-CAM maps of one label for a stack of model inputs, averaged over models."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        target_layers: Sequence[nn.Module],
        labels: Sequence[str],
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> None:
        if len(models) != len(target_layers) or not models:
            raise ValueError("give one target layer per model, and at least one model")
        self.models = list(models)
        self.layers = list(target_layers)
        self.labels = list(labels)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_bundle(cls, predictor: Predictor, batch_size: int = 8) -> GradCamExplainer:
        members = getattr(predictor.backend, "members", None)
        if not members:
            raise ExplainError(
                predictor.bundle.root, "Grad-CAM needs the PyTorch weights (backend torch)"
            )
        device = predictor.backend.device  # type: ignore[attr-defined]
        models = [_without_inplace(m).eval() for m in members]
        layers = [m if isinstance(m, SmallSetModel) else target_layer(m) for m in models]
        return cls(models, layers, predictor.labels, device, batch_size)

    @property
    def method(self) -> str:
        """What the maps are, in words: the small-set ensemble's maps are its own (MIL
        heads, pixel reader), not Grad-CAM."""
        small = [m for m in self.models if isinstance(m, SmallSetModel)]
        parts = []
        if small:
            words = "the small-set MIL heads' per-location hemorrhage probability"
            if any(getattr(m, "pixel_reader", None) is not None for m in small):
                words += " and its pixel reader's per 8 px cell, weighted as they vote"
            parts.append(words)
        if len(small) < len(self.models):
            hooked = dict.fromkeys(
                layer_name(m, layer)
                for m, layer in zip(self.models, self.layers, strict=True)
                if not isinstance(m, SmallSetModel)
            )
            parts.append(f"Grad-CAM (pytorch_grad_cam) of {'; '.join(hooked)}")
        averaged = f", averaged over {len(self.models)} models" if len(self.models) > 1 else ""
        return " and ".join(parts) + averaged + ", per-slice scaled to [0, 1]"

    def label_index(self, label: str | None) -> int:
        if label is None:
            return self.labels.index("any") if "any" in self.labels else 0
        if label not in self.labels:
            raise ExplainError(
                None, f"unknown label {label!r}; this model has {', '.join(self.labels)}"
            )
        return self.labels.index(label)

    def maps(self, x: np.ndarray, label_index: int) -> np.ndarray:
        """float32 [S, h, w] in [0, 1] at the model input's size, for uint8 [S, 3, h, w]."""
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        total = np.zeros((x.shape[0], x.shape[2], x.shape[3]), dtype=np.float32)
        for model, layer in zip(self.models, self.layers, strict=True):
            if isinstance(model, SmallSetModel):
                total += _small_set_maps(model, x, self.device, self.batch_size)
                continue
            with GradCAM(model=model, target_layers=[layer]) as cam:
                for start in range(0, len(x), self.batch_size):
                    batch = torch.from_numpy(x[start : start + self.batch_size]).to(self.device)
                    # Float input in [0, 1] (what the model also accepts) so that autograd
                    # can run through the normalisation.
                    batch = batch.float() / 255.0
                    targets = [ClassifierOutputTarget(label_index)] * len(batch)
                    total[start : start + len(batch)] += cam(input_tensor=batch, targets=targets)
        return total / len(self.models)

    def heatmaps(
        self,
        x: np.ndarray,
        label_index: int,
        shape: tuple[int, int],
        boxes: Sequence[tuple[int, int, int]] | None = None,
    ) -> np.ndarray:
        """float32 [S, rows, cols] in [0, 1]: `maps` put back on the slices' own pixels:
        resized to them, or, for a head-cropped input, into each slice's crop square
        (``boxes``, from :func:`crop_boxes`)."""
        small = self.maps(x, label_index)
        rows, cols = shape
        out = np.zeros((len(small), rows, cols), dtype=np.float32)
        for k, plane in enumerate(small):
            img = Image.fromarray(plane.astype(np.float32), mode="F")
            if boxes is None:
                out[k] = np.asarray(img.resize((cols, rows), Image.BILINEAR))
                continue
            top, left, side = boxes[k]
            square = np.asarray(img.resize((side, side), Image.BILINEAR))
            r0, c0 = max(top, 0), max(left, 0)
            r1, c1 = min(top + side, rows), min(left + side, cols)
            if r1 > r0 and c1 > c0:
                out[k, r0:r1, c0:c1] = square[r0 - top : r1 - top, c0 - left : c1 - left]
        return _unit_scale(out)

    def scan_heatmaps(
        self, predictor: Predictor, scan: Scan, x: np.ndarray, label_index: int
    ) -> np.ndarray:
        """Heatmaps on the pixels of ``scan`` (as ``predictor.prepare`` returned it) for its
        model input ``x``, whatever crop the bundle's input uses."""
        boxes = crop_boxes(scan) if predictor.spec.crop != "none" else None
        return self.heatmaps(x, label_index, (scan.hu.shape[1], scan.hu.shape[2]), boxes)


def crop_boxes(scan: Scan) -> list[tuple[int, int, int]]:
    """The head-crop square of every slice (found on its brain window, as the input was)."""
    return [crop_box(grey) for grey in _brain_view(scan)]


def _unit_scale(maps: np.ndarray) -> np.ndarray:
    """Each slice to [0, 1] by its own maximum (all-zero slices stay zero)."""
    np.clip(maps, 0.0, None, out=maps)
    peak = maps.reshape(len(maps), -1).max(axis=1)
    scale = np.where(peak > 0, 1.0 / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
    return maps * scale[:, None, None]


@dataclass
class Explanation:
    label: str
    source: str
    heatmaps: Path
    montage: Path
    overlays: list[Path]
    top_slices: list[int]
    slice_probs: list[float]
    summary: Path
    warnings: list[str] = field(default_factory=list)
    method: str = ""
    trained_on: str = ""  # what the model was trained on, in predict's words

    @property
    def trained_on_line(self) -> str:
        """The console line on what the maps rest on (``predict`` prints the same)."""
        return f"model trained on {self.trained_on}"


def _brain_view(scan: Scan) -> np.ndarray:
    """uint8 [S, H, W]: the brain window of a HU scan, the stored grey of an image."""
    if scan.windowed:
        return np.asarray(scan.hu, dtype=np.uint8)
    return apply_window(scan.hu, "brain")


def overlay(grey: np.ndarray, heat: np.ndarray) -> Image.Image:
    """RGB image: ``grey`` with ``heat`` (0-1) blended in the jet colour map where it is
    above OVERLAY_FLOOR, more opaque where hotter."""
    import matplotlib

    colours = matplotlib.colormaps["jet"](heat)[..., :3].astype(np.float32) * 255
    alpha = np.where(heat > OVERLAY_FLOOR, OVERLAY_ALPHA * heat, 0.0)[..., None]
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    return Image.fromarray(np.rint(base * (1 - alpha) + colours * alpha).astype(np.uint8))


def _montage(tiles: list[tuple[Image.Image, str]], footer: str = "") -> Image.Image:
    """The tiles in a grid; ``footer``: a line under them (what the model was trained on),
    wrapped to the sheet's width, in yellow when it names synthetic phantoms."""
    cols = min(MONTAGE_COLUMNS, max(1, len(tiles)))
    rows = -(-len(tiles) // cols)
    width = cols * TILE
    lines = textwrap.wrap(footer, max(20, width // FOOTER_CHAR_PX)) if footer else []
    band = FOOTER_LINE_PX * len(lines) + (8 if lines else 0)
    sheet = Image.new("RGB", (width, rows * TILE + band), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(tiles):
        x, y = (i % cols) * TILE, (i // cols) * TILE
        sheet.paste(image.resize((TILE, TILE), Image.BILINEAR), (x, y))
        text_on_band(draw, (x + 4, y + 4), caption, fill=(255, 255, 255), band=(0, 0, 0))
    colour = (255, 210, 0) if SYNTHETIC_WORDS in footer else (255, 255, 255)
    for k, line in enumerate(lines):
        draw.text((4, rows * TILE + 4 + k * FOOTER_LINE_PX), line, fill=colour)
    return sheet


def explain(
    input_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    label: str | None = None,
    top_k: int = 8,
    *,
    device: str = "auto",
    series_uid: str | None = None,
    batch_size: int = 8,
) -> Explanation:
    """Grad-CAM of ``label`` (default ``any``, else the model's first label) on one scan
    (a DICOM file/folder/zip — its best series unless ``series_uid`` — a NIfTI volume or an
    image); writes the files listed in the module notes into ``out_dir``."""
    predictor = Predictor(model_dir, device, batch_size=batch_size)
    explainer = GradCamExplainer.from_bundle(predictor, batch_size)
    j = explainer.label_index(label)
    name = explainer.labels[j]
    scan = load(input_path, series_uid=series_uid, image_window=predictor.image_window)
    scan, x = predictor.prepare(scan)
    slice_probs, _, _ = predictor.predict_inputs(x)
    heat = explainer.scan_heatmaps(predictor, scan, x, j)

    out = Path(out_dir)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    np.save(out / "heatmaps.npy", heat)
    grey = _brain_view(scan)
    probs = slice_probs[:, j]
    overlays = []
    for k in range(scan.n_slices):
        path = out / "overlays" / f"slice-{k:03d}.png"
        overlay(grey[k], heat[k]).save(path)
        overlays.append(path)
    top = [int(k) for k in np.argsort(-probs, kind="stable")[: max(1, top_k)]]
    tiles = [(Image.open(overlays[k]), f"slice {k}  p({name}) {probs[k]:.2f}") for k in top]
    trained = trained_on(predictor.bundle.config)
    montage = out / "montage.png"
    _montage(tiles, f"model trained on {trained}").save(montage)
    summary = out / "explain.json"
    result = Explanation(
        label=name,
        source=scan.source,
        heatmaps=out / "heatmaps.npy",
        montage=montage,
        overlays=overlays,
        top_slices=top,
        slice_probs=[round(float(p), 6) for p in probs],
        summary=summary,
        warnings=list(scan.warnings),
        method=explainer.method,
        trained_on=trained,
    )
    summary.write_text(
        json.dumps(
            {
                "label": name,
                "source": scan.source,
                "method": result.method,
                "trained_on": trained,
                "trained_on_synthetic": is_synthetic_line(trained),
                "warnings": result.warnings,
                "slice_ids": list(scan.slice_ids),
                "slice_probs": result.slice_probs,
                "top_slices": top,
                "heatmaps": "heatmaps.npy: float32 [slices, rows, cols]",
                "research_use_only": "ichscan is research software, not a medical device",
            },
            indent=1,
        )
    )
    return result
