"""What a training run reads: any dataset layout (adapted, split and prepared once into
MODEL_DIR/cache, resumable) or an existing prepared cache, and the fold to hold out."""

from __future__ import annotations

import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ichscan.data.cache import PreparedCache
from ichscan.data.synth import is_synthetic
from ichscan.errors import IchscanError
from ichscan.labels import BINARY, LabelSet, get_label_set
from ichscan.preprocess.head_crop import BRAIN_AND_HEAD

if TYPE_CHECKING:
    from ichscan.train.loop import TrainConfig


class DataError(IchscanError):
    pass


@dataclass
class TrainingData:
    cache_root: Path
    label_set: LabelSet
    fold: int
    folds: int
    seed: int
    source_window: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    recipe: str = "finetune"  # what train() runs: "finetune" or "small-set"
    train_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def open(self) -> tuple[PreparedCache, LabelSet, np.ndarray, np.ndarray]:
        cache = PreparedCache(self.cache_root)
        folds = cache.index["fold"].to_numpy()
        if (folds < 0).all():
            folds = _assign(cache.index, self.label_set, self.folds, self.seed)["fold"].to_numpy()
        split = int(folds.max()) + 1
        if split != self.folds:
            # The split is the cache's: training on it under another --folds would record
            # a split that never was (and leave --fold pointing at an empty fold).
            raise DataError(
                self.cache_root,
                f"this cache was split into {split} folds when it was prepared, not --folds "
                f"{self.folds}: pass --folds {split} (--fold 0..{split - 1}), or prepare it "
                f"again with --folds {self.folds}",
            )
        train, val = split_rows(cache, folds, self.fold)
        self.train_rows, self.val_rows = np.flatnonzero(train), np.flatnonzero(val)
        self.summary.update(
            {
                "slices": len(cache),
                "unreadable_slices": int((~cache.ok).sum()),
                "train_slices": len(self.train_rows),
                "validation_slices": len(self.val_rows),
                "patients": int(cache.index["patient_id"].nunique()),
                "positives": {
                    name: int((cache.labels()[:, j] == 1).sum())
                    for j, name in enumerate(self.label_set.labels)
                },
            }
        )
        return cache, self.label_set, self.train_rows, self.val_rows


EXTRA_FOLD = -2  # rows from --extra-train datasets: used for training only, never validated


def split_rows(cache: PreparedCache, folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """bool [N] (training rows, validation rows) of ``cache`` split by ``folds`` with
    ``fold`` held out: readable, not in the hold-out, in a fold or an extra training set."""
    usable = (
        cache.ok & ~cache.index["holdout"].to_numpy(bool) & ((folds >= 0) | (folds == EXTRA_FOLD))
    )
    return usable & (folds != fold), usable & (folds == fold)


def _assign(df: pd.DataFrame, label_set: LabelSet, k: int, seed: int) -> pd.DataFrame:
    from ichscan.data.splits import assign_folds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assign_folds(df, label_set, k=k, seed=seed)


def _as_label_set(
    df: pd.DataFrame, have: LabelSet, want: str | None
) -> tuple[pd.DataFrame, LabelSet]:
    """The dataset's own label set, or a coarser one the user asked for: a hemorrhage/any
    dataset trains a binary model (hemorrhage = `any`, or = ICH for CQ500)."""
    if want is None or want == have.name:
        return df, have
    if want == "binary" and have.name in ("rsna", "cq500"):
        df = df.copy()
        df["hemorrhage"] = df["any" if have.name == "rsna" else "ich"]
        return df, BINARY
    raise DataError(
        None,
        f"the data carries the {have.name} label set; --labels {want} does "
        "not match it (only rsna/cq500 → binary can be derived)",
    )


def _extra_rows(
    path: Path, label_set: LabelSet, layout: str, slab_mm: float | None
) -> pd.DataFrame:
    """Rows of another dataset added to every training split (fold -2), in the main
    dataset's label set; patients are prefixed so they never collide with the main set's.
    DICOM series are cut at the main set's slab thickness (``slab_mm``, None: native): one
    cache holds one thickness, and prepare knows only the main set's."""
    from ichscan.data.adapters import SLAB_LAYOUTS, build_manifest, detect_layout

    # Other layouts have no series to cut: a thickness would be refused there.
    cut = slab_mm is not None and detect_layout(path) in SLAB_LAYOUTS
    df, report, have = build_manifest(path, thickness=slab_mm if cut else "native")
    if (report.layout == "images") != (layout == "images"):
        raise DataError(
            path,
            f"--extra-train {report.layout} data cannot join {layout} data: "
            "windowed images and HU volumes make different inputs",
        )
    df, _ = _as_label_set(df, have, label_set.name)
    df = df.copy()
    for column in ("patient_id", "study_id", "series_id", "scan_id"):
        df[column] = f"extra:{path.name}:" + df[column].astype(str)
    df["fold"] = EXTRA_FOLD
    return df


def resolve_training_data(config: TrainConfig, *, main: bool = True) -> TrainingData:
    data = Path(config.data)
    if not data.exists():
        raise DataError(data, "no such file or folder")
    if PreparedCache.is_cache(data):
        cache = PreparedCache(data)
        label_set = get_label_set(cache.facts["label_set"])
        if config.labels and config.labels != label_set.name:
            raise DataError(
                data,
                f"this cache holds {label_set.name} labels, not "
                f"{config.labels}; prepare it again with the label set you want",
            )
        windows = cache.index.loc[cache.index["kind"] == "image", "window"]
        source_window = str(windows.iloc[0]) if len(windows) and windows.iloc[0] else None
        crops = small_set_cache_crops(config)
        fits = cache.crop in crops and cache.size == SMALL_SET_SIZE
        if config.recipe == "small-set" and not fits:
            raise DataError(
                data,
                f"--recipe small-set{_head_reader_flag(config)} needs a cache prepared with "
                f"--crop {' or '.join(crops)} at {SMALL_SET_SIZE} px; this one has "
                f"crop={cache.crop!r} at {cache.size} px",
            )
        recipe = (
            "small-set"
            if config.recipe == "small-set"
            or (config.recipe == "auto" and fits and _auto_small_set(config, len(cache), label_set))
            else "finetune"
        )
        if recipe == "finetune" and cache.crop == HEAD_READER_CROP:
            raise DataError(
                data,
                f"a --crop {HEAD_READER_CROP} cache holds a head plane beside the windows, for "
                "the small-set recipe; prepare another with --crop brain to fine-tune",
            )
        _check_head_reader(config, recipe, data)
        _check_crop(config, recipe, data)
        if recipe == "finetune" and cache.size != config.size:
            # The cache's slices are what the network sees; another --size would be
            # recorded in the run's settings without being true.
            raise DataError(
                data,
                f"this cache holds {cache.size} px slices, not --size {config.size}: pass "
                f"--size {cache.size}, or prepare it again with --size {config.size}",
            )
        if config.crop is not None and recipe == "finetune" and cache.crop != config.crop:
            raise DataError(
                data,
                f"--crop {config.crop}: this cache was prepared with --crop {cache.crop}; "
                "prepare it again or leave --crop out",
            )
        return TrainingData(
            data,
            label_set,
            config.fold,
            config.folds,
            config.seed,
            source_window,
            {
                "source": str(cache.facts.get("source") or data),
                "prepared_cache": str(data),
                "synthetic": is_synthetic(cache.facts.get("source") or data),
                "label_level": cache.label_level,
                **_cut_facts(cache.facts.get("manifest", {})),
            },
            recipe=recipe,
        )
    return _prepare_from_layout(config, data, main)


def _prepare_from_layout(config: TrainConfig, data: Path, main: bool) -> TrainingData:
    from ichscan.data.adapters import build_manifest
    from ichscan.data.prepare import prepare

    cache_root = Path(config.out) / "cache"
    df, report, label_set = build_manifest(data)
    df, label_set = _as_label_set(df, label_set, config.labels)
    if len(df) == 0:
        raise DataError(data, "no labelled slices found: " + "; ".join(report.problems[:3]))
    df = _assign(df, label_set, config.folds, config.seed)
    extras = [
        _extra_rows(Path(e), label_set, report.layout, report.slab_mm) for e in config.extra_train
    ]
    if extras:
        df = pd.concat([df, *extras], ignore_index=True)
    is_images = report.layout == "images"
    source_window = "brain" if is_images else None
    # An image set holds one display window: cache one channel, replicated at load time.
    windows = ("brain",) if is_images else config.windows
    recipe = config.recipe
    if recipe == "auto":
        main_rows = int((df["fold"] >= 0).sum())
        recipe = "small-set" if _auto_small_set(config, main_rows, label_set) else "finetune"
    _check_head_reader(config, recipe, data)
    _check_crop(config, recipe, data)
    _check_finetune_options(config, recipe, data)
    if recipe == "small-set":
        if len(label_set.labels) != 1:
            raise DataError(
                data,
                f"--recipe small-set trains one label; this is a {label_set.name} dataset "
                "(add --labels binary for hemorrhage yes/no)",
            )
        # The ensemble reads the brain window only, cropped at full resolution to the brain
        # and, beside it, to the head (unless --no-head-reader).
        windows, size, crop = ("brain",), SMALL_SET_SIZE, small_set_crop(config)
    else:
        size, crop = config.size, config.crop or "none"
    if main:
        prepare(
            df,
            cache_root,
            windows=windows,
            size=size,
            label_set=label_set,
            progress=config.progress,
            crop=crop,
            # Kept in cache.json, so that `ichscan evaluate` and `train-study` on this
            # cache know its data, its label level and how its scans were cut.
            facts={**report.facts(), "source": str(data), "synthetic": is_synthetic(data)},
        )
    summary = {
        "source": str(data),
        "synthetic": is_synthetic(data),
        "layout": report.layout,
        "label_level": report.label_level,
        **_cut_facts(report.facts()),
        "adapter_problems": report.problems[:20],
    }
    if source_window:
        summary["source_window"] = source_window
    summary["recipe"] = recipe
    return TrainingData(
        cache_root,
        label_set,
        config.fold,
        config.folds,
        config.seed,
        source_window,
        summary,
        recipe=recipe,
    )


def _cut_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """How the scans were cut (slab thickness, middle slices), for the bundle's summary."""
    return {k: facts[k] for k in ("layout", "slab_mm", "middle_slices") if k in facts}


SMALL_SET_SIZE = 320  # ichscan.models.small_set.CROP_SIZE, without importing torch here
# The small-set cache with the head crop beside the brain crop: what the head reader reads.
HEAD_READER_CROP = BRAIN_AND_HEAD


def small_set_cache_crops(config: TrainConfig) -> tuple[str, ...]:
    """The crops of a prepared cache the small-set recipe trains on, the one it cuts first.
    By default either: a cache cut with the head plane trains the head reader too, a
    brain-only one (prepared for the brain readers) trains without it."""
    return {None: (HEAD_READER_CROP, "brain"), True: (HEAD_READER_CROP,), False: ("brain",)}[
        config.head_reader
    ]


def small_set_crop(config: TrainConfig) -> str:
    """The crop prepare cuts for the small-set recipe (ichscan.models.small_set readers):
    the brain and the head beside it, unless --no-head-reader (or --crop brain)."""
    crops = small_set_cache_crops(config)
    return config.crop if config.crop in crops else crops[0]


def _head_reader_flag(config: TrainConfig) -> str:
    return {None: "", True: " --head-reader", False: " --no-head-reader"}[config.head_reader]


def _check_head_reader(config: TrainConfig, recipe: str, data: Path) -> None:
    if config.head_reader and recipe != "small-set":
        raise DataError(
            data,
            f"--head-reader is a small-set option; this run fine-tunes ({recipe}: "
            "--recipe finetune, another --arch, or more than 1,000 slices)",
        )


def _check_crop(config: TrainConfig, recipe: str, data: Path) -> None:
    """--crop chooses the fine-tuned network's input; the small-set readers cut their own."""
    if (
        config.crop is not None
        and recipe == "small-set"
        and config.crop not in small_set_cache_crops(config)
    ):
        raise DataError(
            data,
            f"--crop {config.crop} is for fine-tuning; the small-set recipe reads the "
            f"{small_set_crop(config)} crop (add --recipe finetune to fine-tune on the "
            f"{config.crop} crop)",
        )


# TrainConfig fields only fine-tuning reads (flag names as the CLI spells them): set under
# the small-set recipe, they would be ignored without a word.
FINETUNE_ONLY = {
    "architecture": "--arch",
    "train_mode": "--train",
    "input_kind": "--input",
    "windows": "--windows",
    "size": "--size",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "backbone_lr_mult": "--backbone-lr-mult",
    "weight_decay": "--weight-decay",
    "schedule": "--schedule",
    "accumulate": "--accumulate",
    "pos_weight": "--pos-weight",
    "patience": "--patience",
    "select": "--select",
    "resume": "--resume",
    "max_minutes": "--max-minutes",
    "augment": "--no-augment",
}


def _check_finetune_options(config: TrainConfig, recipe: str, data: Path) -> None:
    if recipe != "small-set":
        return
    specs = {f.name: f for f in fields(config)}
    changed = []
    for name, flag in FINETUNE_ONLY.items():
        spec = specs[name]
        default = (
            spec.default_factory()  # type: ignore[misc]
            if spec.default_factory is not MISSING
            else spec.default
        )
        if getattr(config, name) != default:
            changed.append(flag)
    if changed:
        raise DataError(
            data,
            f"{', '.join(changed)} {'is a' if len(changed) == 1 else 'are'} fine-tuning "
            "option(s); the small-set recipe (frozen Lite0/1/2 readers and their heads) does "
            "not read them: add --recipe finetune, or leave them out",
        )


# The small-set fits hold ~10 MB of float16 feature maps per slice in memory (10 GB at 1,000;
# 8 MB and 8 GB with --no-head-reader, ichscan.train.small_set.map_bytes_per_slice);
# above that, fine-tuning is affordable and streams from the cache instead.
SMALL_SET_MAX_SLICES = 1000


def _auto_small_set(config: TrainConfig, slices: int, label_set: LabelSet) -> bool:
    """`--recipe auto`: the small-set ensemble, unless the user chose another network (its
    backbones are Lite0, Lite1 and Lite2: a model asked for by name is fine-tuned as asked)."""
    from ichscan.train.loop import DEFAULT_ARCHITECTURE

    return config.architecture == DEFAULT_ARCHITECTURE and _small_set_applies(slices, label_set)


def _small_set_applies(slices: int, label_set: LabelSet) -> bool:
    """The default for a small binary set: the frozen-feature ensemble beats fine-tuning
    there and trains in minutes on a CPU (see ichscan.train.small_set)."""
    return len(label_set.labels) == 1 and slices <= SMALL_SET_MAX_SLICES
