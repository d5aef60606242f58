"""Export a bundle to ONNX and run it with onnxruntime on the CPU.

Files (``export_onnx(MODEL_DIR, OUT)``, by default ``MODEL_DIR/model.onnx``):

``OUT`` — the slice model, every ensemble member in one graph.
    input  ``image``     uint8 ``[batch, 3, size, size]``, display values 0-255 exactly as
                         :func:`ichscan.infer.inputs.scan_to_model_input` makes them (the
                         ``/255`` and ImageNet normalisation are inside the graph, as they are
                         inside SliceModel, so nothing can feed it differently);
    output ``probs``     float32 ``[batch, labels]``: sigmoid of each member's logits,
                         averaged over members (the ensemble averages in probability);
           ``embedding`` float32 ``[batch, D]``: the first member's embedding, which the study
                         model reads.
    A small-set bundle's graph has a second input, ``density`` float32 ``[batch, 29]``:
    the density features of each image's grey (channel 0), which are NumPy/SciPy code,
    and, when it has a centre reader (the default since session 11), a third, ``centre``
    uint8 ``[batch, 1, size, size]``: the centre zoom of channel 0 (PIL), and, when it has
    a blob forest (the default since session 12), a fourth, ``blobs`` float32
    ``[batch, 16, 22]``: the blob tables of channel 0. `OnnxPredictor` computes all of
    them with :func:`ichscan.models.small_set.side_arrays`, as the model itself does. Inside
    the graph the backbones' antialiased resize is a pair of fixed matrices and the forests
    walk a fixed number of levels, so the graph has no data-dependent control flow.
``OUT`` with ``.study.onnx`` for ``.onnx`` (when the bundle has a study model).
    input  ``embeddings`` float32 ``[batch, slices, D]``, ``mask`` bool ``[batch, slices]``;
    output ``slice_probs`` ``[batch, slices, labels]``, ``scan_probs`` ``[batch, labels]``.

The batch axis (and the slice axis of the study model) is dynamic; opset 18. Each file
carries in its metadata the SHA-256 of the bundle weights it came from, the labels and the
input spec, and `OnnxPredictor` refuses a file whose weights no longer match the bundle.

The TorchScript exporter is used when this torch still has it: it writes a ResNet18 in about
a second where the torch.export-based one takes ten, and handles the study model's GRU with a
dynamic slice axis. Where it is gone, the torch.export-based exporter takes over.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ichscan.errors import IchscanError
from ichscan.models.blobs import MAX_BLOBS, N_BLOB_FEATURES
from ichscan.models.bundle import Bundle, BundleError, load_bundle, read_config
from ichscan.models.small_set import ResizeMatrix, SideInputs, SmallSetModel, side_arrays
from ichscan.preprocess.head_crop import CENTRE_SHARE

__all__ = ["OnnxPredictor", "export_onnx", "study_onnx_path", "weights_sha256"]

OPSET = 18
DEFAULT_NAME = "model.onnx"
META_WEIGHTS = "ichscan_weights_sha256"
META_CENTRE_SHARE = "ichscan_centre_share"
# Largest |torch - onnxruntime| tolerated on the export check before the file is refused,
# relative to the value where it exceeds 1: an embedding may hold logits in the hundreds
# (a small-set regression on a near-constant feature), where float32 rounding alone
# differs by 1e-3; a probability is held to it absolutely.
VERIFY_TOLERANCE = 1e-3


class ExportError(IchscanError):
    """An ONNX export that failed or does not reproduce the PyTorch model."""


class _SliceEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.members[0]
        embedding = first.embed(image)
        probs = torch.sigmoid(first.head(embedding))
        for member in self.members[1:]:
            probs = probs + torch.sigmoid(member(image))
        return probs / len(self.members), embedding


class _SmallSetSlices(nn.Module):
    """The small-set ensemble with its density features, its centre zoom when it reads one
    and its blob tables when it has a blob forest, as inputs (see module notes)."""

    def __init__(self, model: SmallSetModel, size: int) -> None:
        super().__init__()
        self.model = model
        self.resize = ResizeMatrix(size)
        self.steps = model.forest_depths()

    def forward(
        self,
        image: torch.Tensor,
        density: torch.Tensor,
        centre: torch.Tensor | None = None,
        blobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        side = SideInputs(density, centre, blobs)
        embedding = self.model.embed_with(image, side, self.resize, self.steps)
        return torch.sigmoid(self.model.head(embedding)), embedding


def _graph_inputs(image: torch.Tensor, small_set: SmallSetModel | None) -> tuple[torch.Tensor, ...]:
    """The graph's inputs for ``image``: the image alone, or for a small-set model the image
    and what it computes in NumPy (``side_inputs``: density, then the centre zoom and the
    blob tables where the model has them)."""
    if small_set is None:
        return (image,)
    return (image, *(t for t in small_set.side_inputs(image) if t is not None))


class _StudyProbs(nn.Module):
    def __init__(self, study: nn.Module) -> None:
        super().__init__()
        self.study = study

    def forward(
        self, embeddings: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slice_logits, scan_logits = self.study(embeddings, mask)
        return torch.sigmoid(slice_logits), torch.sigmoid(scan_logits)


def study_onnx_path(out: str | Path) -> Path:
    """model.onnx → model.study.onnx"""
    out = Path(out)
    stem = out.stem if out.suffix.lower() == ".onnx" else out.name
    return out.with_name(f"{stem}.study.onnx")


def weights_sha256(root: str | Path, config: dict[str, Any] | None = None) -> str:
    """SHA-256 over the bundle's weight files, in bundle.json order."""
    root = Path(root)
    config = config or read_config(root)
    names = list(config["members"])
    if config.get("study_model"):
        names.append(config["study_model"]["weights"])
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with open(root / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _torch_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    out: Path,
    names: tuple[list[str], list[str]],
    dynamic: dict[str, dict[int, str]],
) -> None:
    inputs, outputs = names
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated (see the module notes), and warns that a GRU
        # exported at one batch size may fail at another, which our dynamic axes take care of.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        except (TypeError, NotImplementedError, RuntimeError):
            shapes = {
                name: {axis: torch.export.Dim(label, min=1) for axis, label in axes.items()}
                for name, axes in dynamic.items()
            }
            arg_names = list(module.forward.__code__.co_varnames[1 : 1 + len(args)])
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes={a: shapes[i] for a, i in zip(arg_names, inputs, strict=True)},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
            )
    tmp.replace(out)


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "ichscan"
    onnx.save(model, str(path))


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleError(path, f"not a usable ONNX model ({exc})") from None


def _verify(
    path: Path, module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str]
) -> float:
    session = _session(path)
    got = session.run(None, {n: a.numpy() for n, a in zip(inputs, args, strict=True)})
    with torch.inference_mode():
        want = module(*args)
    diff = max(
        float((np.abs(g - w.numpy()) / np.maximum(1.0, np.abs(w.numpy()))).max())
        for g, w in zip(got, want, strict=True)
    )
    if not diff <= VERIFY_TOLERANCE:
        path.unlink(missing_ok=True)
        raise ExportError(
            path, f"onnxruntime differs from PyTorch by {diff:.2g} (> {VERIFY_TOLERANCE:g})"
        )
    return diff


def export_onnx(model_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the bundle's slice model (and study model) as ONNX (see the module notes);
    return the slice model's path (``MODEL_DIR/model.onnx`` when ``out_path`` is None).
    Each file is checked against PyTorch with onnxruntime before it is kept."""
    model_dir = Path(model_dir)
    bundle: Bundle = load_bundle(model_dir, "cpu")
    small_set = bundle.config.get("recipe") == "small-set"
    small_set_model = bundle.members[0] if small_set else None
    assert small_set_model is None or isinstance(small_set_model, SmallSetModel)
    centre = small_set_model is not None and small_set_model.needs_centre
    blobs = small_set_model is not None and small_set_model.has_blob_forest
    if blobs and not centre:  # the graph's inputs are positional: blobs come after centre
        raise ExportError(model_dir, "a blob forest without a centre reader cannot be exported")
    out = Path(out_path) if out_path is not None else model_dir / DEFAULT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    size = int(bundle.input["size"])
    meta = {
        META_WEIGHTS: weights_sha256(model_dir, bundle.config),
        "ichscan_labels": json.dumps(bundle.labels),
        "ichscan_input": json.dumps(bundle.input),
        "ichscan_note": "uint8 image [batch, 3, size, size] in"
        + (", with its float32 density features [batch, 29]" if small_set else "")
        + (" and uint8 centre zoom [batch, 1, size, size]" if centre else "")
        + (f" and float32 blob tables [batch, {MAX_BLOBS}, {N_BLOB_FEATURES}]" if blobs else "")
        + ", probabilities out; research software, not a medical device",
    }
    if centre:  # what OnnxPredictor zooms by: the share the centre reader was trained on
        meta[META_CENTRE_SHARE] = str(small_set_model.centre_share)
    # Batch 2 in the example: a size-1 axis would be specialised away by torch.export.
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator)
    if small_set_model is not None:
        slice_model: nn.Module = _SmallSetSlices(small_set_model, size).eval()
        inputs = ["image", "density"] + ["centre"] * centre + ["blobs"] * blobs
    else:
        slice_model = _SliceEnsemble(bundle.members).eval()
        inputs = ["image"]
    names = (inputs, ["probs", "embedding"])
    dynamic = {name: {0: "batch"} for name in [*inputs, "probs", "embedding"]}
    args = _graph_inputs(image, small_set_model)
    _torch_export(slice_model, args, out, names, dynamic)
    _verify(out, slice_model, args, names[0])
    _add_metadata(out, meta)
    if bundle.study is not None:
        study = _StudyProbs(bundle.study).eval()
        with torch.inference_mode():
            both = torch.cat([image, image.flip(3)])
            _, emb = slice_model(*_graph_inputs(both, small_set_model))
        emb = emb.reshape(2, 2, -1).clone()
        mask = torch.ones(2, 2, dtype=torch.bool)
        study_path = study_onnx_path(out)
        axes = {0: "batch", 1: "slices"}
        study_names = (["embeddings", "mask"], ["slice_probs", "scan_probs"])
        study_dynamic = {
            "embeddings": axes,
            "mask": axes,
            "slice_probs": axes,
            "scan_probs": {0: "batch"},
        }
        _torch_export(study, (emb, mask), study_path, study_names, study_dynamic)
        _verify(study_path, study, (emb, mask), study_names[0])
        _add_metadata(study_path, meta)
    return out


class OnnxPredictor:
    """The exported files run by onnxruntime; the backend behind ``Predictor(backend="onnx")``
    (same interface as its PyTorch backend: `slices` and `study`)."""

    def __init__(
        self,
        path: str | Path,
        study_path: str | Path | None = None,
        batch_size: int = 32,
        tta: bool = True,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(self.path, "ONNX model not found; run `ichscan export MODEL_DIR`")
        self.session = _session(self.path, threads)
        # A small-set graph takes the density features, and maybe the centre zoom and the
        # blob tables, beside the image (module notes).
        inputs = {i.name for i in self.session.get_inputs()}
        self.needs_density = "density" in inputs
        self.needs_blobs = "blobs" in inputs
        meta = self.session.get_modelmeta().custom_metadata_map
        self.centre_share = (
            float(meta.get(META_CENTRE_SHARE, CENTRE_SHARE)) if "centre" in inputs else None
        )
        self.study_session = _session(Path(study_path), threads) if study_path else None
        self.batch_size = batch_size
        self.tta = tta

    @classmethod
    def for_bundle(
        cls,
        root: str | Path,
        onnx_path: str | Path | None = None,
        batch_size: int = 32,
        tta: bool = True,
    ) -> OnnxPredictor:
        """The export of the bundle at ``root``, checked to come from its current weights."""
        root = Path(root)
        config = read_config(root)
        path = Path(onnx_path) if onnx_path else root / DEFAULT_NAME
        if not path.is_file():
            raise BundleError(
                path, "no ONNX export of this model; run `ichscan export MODEL_DIR` first"
            )
        study = study_onnx_path(path)
        if config.get("study_model") and not study.is_file():
            raise BundleError(study, "the bundle has a study model but its ONNX file is missing")
        predictor = cls(path, study if config.get("study_model") else None, batch_size, tta)
        meta = predictor.session.get_modelmeta().custom_metadata_map
        if meta.get(META_WEIGHTS) != weights_sha256(root, config):
            raise BundleError(
                path,
                "was exported from other weights than the model folder holds now; "
                "run `ichscan export` again",
            )
        return predictor

    @property
    def has_study(self) -> bool:
        return self.study_session is not None

    def slices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, embs = [], []
        for start in range(0, len(x), self.batch_size):
            batch = np.ascontiguousarray(x[start : start + self.batch_size], dtype=np.uint8)
            n = len(batch)
            views = np.concatenate([batch, batch[..., ::-1]]) if self.tta else batch
            feed = {"image": views}
            if self.needs_density:
                density, centre, blobs = side_arrays(
                    np.ascontiguousarray(views[:, 0]), self.centre_share, self.needs_blobs
                )
                feed["density"] = density
                if centre is not None:
                    feed["centre"] = centre
                if blobs is not None:
                    feed["blobs"] = blobs
            p, emb = self.session.run(None, feed)
            probs.append(p.reshape(-1, n, p.shape[-1]).mean(0))
            embs.append(emb[:n])
        return np.concatenate(probs), np.concatenate(embs)

    def study(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.study_session is not None
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)[np.newaxis]
        mask = np.ones(emb.shape[:2], dtype=bool)
        slice_probs, scan_probs = self.study_session.run(None, {"embeddings": emb, "mask": mask})
        return slice_probs[0], scan_probs[0]
