"""The small-set recipe: the default of `ichscan train` for a small binary set of slices.

Why not fine-tuning: with a few hundred images, fine-tuning an ImageNet network overfits and,
on a CPU, costs about 70 CPU-minutes per EfficientNet-Lite0 model at 224 px
(research/recipe_lab/RECIPE.md). A frozen network's feature maps, computed once per image and
augmented view and cached on disk, plus three small learners trained on them, take minutes and
did better on the real head_ct and RSNA slices than every frozen-feature alternative tried.

Steps (ichscan.models.small_set describes the model):

1. Every slice is windowed (brain), cropped to the head with the skull zeroed and, beside
   it, with the skull kept (not with ``--no-head-reader``), at full resolution, and resized
   to 320 px once, by `prepare` (the crop is recorded in the bundle: predict does the same).
2. Eight views per slice and crop (identity, mirror, six random flips/rotations/scalings/
   shifts and gamma/contrast/brightness changes) go through the frozen readers: Lite0, Lite1
   and Lite2 on the brain crop, Lite0 on the head crop, and Lite0 on the centre zoom (the
   middle of the brain crop magnified, derived from it here and at predict time alike). The
   maps are cached under
   ``--feature-cache`` (default ~/.cache/ichscan/features), keyed by the network, the crop and
   the slice's pixels: the backbones never see labels, so cross-validation folds and later
   runs reuse them.
3. Per reader, a MIL head trains on all training slices, including ``--extra-train`` sets,
   each source with its own bias: one random view per slice per epoch, label smoothing,
   AdamW, one-cycle. The pooled logistic regressions (one per reader, all eight views)
   and the density forest (brain crop) train on the main set's slices only: their features
   differ in scale between sources. The blob forest (brain crop) trains on all training
   slices, like the MIL heads: a blob's numbers are relative to its own slice's brain, and
   the other set's blobs raised both real sets (research/recipe_lab/SESSION12.md). It
   scores every bright blob of a slice (and of its mirror image) on its own and learns by
   multiple-instance learning: first every blob of a positive slice counts as blood, then
   only the two that the forest's out-of-bag votes find most blood-like. The pixel reader
   (ichscan.train.pixel_reader) trains from scratch on all training slices' brain crops:
   patches of synthetic bleeds, its own hard negatives and the real positives' most
   blood-like cells (about a minute per fit on one core).
4. The members' logits, each bounded to ±6, are summed with fixed weights
   (ichscan.models.small_set.BoundedVotes); training's ``combine`` does the same.
5. The decision threshold comes from inner cross-validation on the training slices (the
   ensemble refitted without each inner fold and scored on it): by default where a logistic
   calibration of those scores crosses 0.5 (``--threshold calibrated``), which did as well
   as Youden's J or better on 17 of the 18 real split × set × ensemble cells measured
   (README). The validation fold stays untouched for the
   metrics in bundle.json.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ichscan.data.cache import PreparedCache
from ichscan.errors import IchscanError
from ichscan.models.blobs import batch_blobs, blob_present
from ichscan.models.bundle import input_spec, new_config, save_bundle
from ichscan.models.forest import ForestModule
from ichscan.models.pixel_reader import PixelNet
from ichscan.models.small_set import (
    BACKBONES,
    CENTRE_READER,
    CROP_PLANES,
    CROP_SIZE,
    MAP_SOURCES,
    RECIPE,
    VOTE_BOUND,
    BoundedVotes,
    LiteMaps,
    MapSource,
    MILEnsemble,
    MILHead,
    PooledLogistic,
    Reader,
    SmallSetModel,
    chunked_maps,
    member_logits,
    member_weights,
    pooled_features,
    readers_for,
    reads_centre,
    side_arrays,
    small_set_config,
)
from ichscan.preprocess.head_crop import CENTRE_SHARE
from ichscan.progress import progress_bar
from ichscan.threads import torch_threads
from ichscan.train.data import HEAD_READER_CROP
from ichscan.train.pixel_reader import fit_pixel_reader, fits_beside

if TYPE_CHECKING:
    from ichscan.train.data import TrainingData
    from ichscan.train.loop import TrainConfig

log = logging.getLogger(__name__)

N_VIEWS = 8
# Part of each cached map's key: a change to how a backbone's maps are made gets a new one.
FEATURE_VERSIONS = {
    "efficientnet_lite0": "lite0-b10-b14-head-256-v1",
    "efficientnet_lite1": "lite1-b14-b19-head-256-v1",
    "efficientnet_lite2": "lite2-b14-b19-head-256-v1",
}
# The lab keyed its head-crop maps so (research/recipe_lab/cv_members.py --crop head): the same
# key keeps them reusable.
CROP_KEYS = {"brain": "", "head": "-headcrop", "centre": "-centrecrop"}
INNER_FOLDS = 4
HARD_MAX_SLICES = 1300  # ~10 GB of maps with four readers, 13 with five (small-set forced)
MIL_HEADS = 1  # 3 seeds were tried: no better (see README), 2.7x the fit time


class SmallSetError(IchscanError):
    pass


def map_bytes_per_slice(readers: Sequence[Reader]) -> int:
    """Bytes of the float16 maps of one slice's eight views that the fits hold in memory
    (about 2 MB per reader)."""
    return sum(N_VIEWS * 2 * MAP_SOURCES[r.backbone].map_values for r in readers)


@dataclass(frozen=True)
class MILSettings:
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    smoothing: float = 0.1
    heads: int = MIL_HEADS  # seeds averaged


def default_feature_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ichscan" / "features"


# ---------------------------------------------------------------------------------------
# Views and their cached feature maps


def augmented_view(grey: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One random view of float [1, 1, H, W] in [0, 1]: mirror, rotation ±15°, scale ±10%,
    shift ±6%, gamma, contrast and brightness (the flips and density jitter a CT slice can
    take without changing its diagnosis)."""
    x = grey.flip(-1) if rng.random() < 0.5 else grey
    size = x.shape[-1]
    tx, ty = rng.uniform(-0.06, 0.06, 2) * size
    x = TF.affine(
        x,
        angle=float(rng.uniform(-15, 15)),
        translate=[float(tx), float(ty)],
        scale=float(rng.uniform(0.9, 1.1)),
        shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR,
    )
    x = x.clamp(0, 1) ** float(rng.uniform(0.85, 1.15))
    x = (x - 0.5) * float(rng.uniform(0.9, 1.1)) + 0.5 + float(rng.uniform(-0.05, 0.05))
    return x.clamp(0, 1)


def views_of(grey: np.ndarray, key: str) -> torch.Tensor:
    """uint8 [H, W] → float [N_VIEWS, 1, H, W]: identity, mirror, six random views seeded by
    the slice's key, so a slice always gets the same views."""
    x = torch.from_numpy(grey).float().div(255.0)[None, None]
    rng = np.random.default_rng(int(key[:12], 16))
    out = [x, x.flip(-1)] + [augmented_view(x, rng) for _ in range(N_VIEWS - 2)]
    return torch.cat(out)


def slice_key(grey: np.ndarray, backbone: str = BACKBONES[0], crop: str = "brain") -> str:
    version = FEATURE_VERSIONS[backbone] + CROP_KEYS[crop]
    return hashlib.sha1(version.encode() + grey.tobytes()).hexdigest()


class FeatureMaps:
    """One reader's cached maps of every training slice, float16, in memory for the fits:
    fine [V, N, 112, 16, 16] and deep [V, N, 1472, 8, 8] (about 2 MB per slice)."""

    def __init__(self, source: MapSource, fine: torch.Tensor, deep: torch.Tensor) -> None:
        self.source, self.fine, self.deep = source, fine, deep

    @classmethod
    def compute(
        cls,
        greys: np.ndarray,
        cache_dir: Path | None,
        extractor: LiteMaps,
        progress: bool = True,
        batch: int = 4,
        crop: str = "brain",
    ) -> tuple[FeatureMaps, int]:
        """(maps, slices computed now rather than read from the cache); ``greys`` are the
        ``crop`` plane of the slices. The network runs where ``extractor`` is (a GPU, when
        training has one); the maps come back to the CPU, where the fits hold them."""
        device = extractor.mean.device
        n = len(greys)
        fine = deep = None
        computed = 0
        keys = [slice_key(g, extractor.source.backbone, crop) for g in greys]
        todo: list[int] = []
        for i, key in enumerate(keys):
            hit = _read_cached(cache_dir, key)
            if hit is None:
                todo.append(i)
                continue
            fine, deep = _place(fine, deep, i, n, *hit)
        name = Reader(extractor.source.backbone, crop).name
        bar = progress_bar(total=len(todo), unit="slice", desc=f"{name} maps", disable=not progress)
        with bar:
            for start in range(0, len(todo), batch):
                chunk = todo[start : start + batch]
                views = torch.cat([views_of(greys[i], keys[i]) for i in chunk])
                f, d = chunked_maps(extractor, views.to(device))
                f = f.half().cpu().view(len(chunk), N_VIEWS, *f.shape[1:])
                d = d.half().cpu().view(len(chunk), N_VIEWS, *d.shape[1:])
                for j, i in enumerate(chunk):
                    _write_cached(cache_dir, keys[i], f[j], d[j])
                    fine, deep = _place(fine, deep, i, n, f[j], d[j])
                computed += len(chunk)
                bar.update(len(chunk))
        assert fine is not None and deep is not None
        return cls(extractor.source, fine, deep), computed

    def take(
        self, rows: np.ndarray, views: np.ndarray | int | slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (fine, deep) of ``rows`` in ``views`` (one view per row when an array)."""
        idx = torch.as_tensor(rows)
        if isinstance(views, np.ndarray):
            v = torch.as_tensor(views)
            return self.fine[v, idx].float(), self.deep[v, idx].float()
        return self.fine[views][idx].float(), self.deep[views][idx].float()


def _place(
    fine: torch.Tensor | None,
    deep: torch.Tensor | None,
    i: int,
    n: int,
    f: torch.Tensor,
    d: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if fine is None or deep is None:
        fine = torch.empty((N_VIEWS, n, *f.shape[1:]), dtype=torch.float16)
        deep = torch.empty((N_VIEWS, n, *d.shape[1:]), dtype=torch.float16)
    fine[:, i] = f
    deep[:, i] = d
    return fine, deep


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.npz"


def _read_cached(cache_dir: Path | None, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if cache_dir is None:
        return None
    path = _cache_path(cache_dir, key)
    try:
        with np.load(path) as z:
            return torch.from_numpy(z["fine"]), torch.from_numpy(z["deep"])
    except (OSError, KeyError, ValueError):
        return None  # absent or damaged: computed again and rewritten


def _write_cached(cache_dir: Path | None, key: str, f: torch.Tensor, d: torch.Tensor) -> None:
    if cache_dir is None:
        return
    path = _cache_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, fine=f.numpy(), deep=d.numpy())
        tmp.replace(path)
    except OSError as exc:  # a full or read-only cache only costs time
        log.warning("feature cache %s not written (%s)", cache_dir, exc)


# ---------------------------------------------------------------------------------------
# The three members


def fit_mil(
    maps: FeatureMaps,
    rows: np.ndarray,
    y: np.ndarray,
    source: np.ndarray,
    sources: int,
    seed: int,
    settings: MILSettings = MILSettings(),
) -> MILEnsemble:
    ensemble = MILEnsemble(maps.source, sources, settings.heads)
    with torch_threads(1):  # a batch is a few MB: one thread is faster
        for j in range(settings.heads):
            ensemble.heads[j] = _fit_mil(maps, rows, y, source, sources, seed + 7919 * j, settings)
    return ensemble.eval()


def _fit_mil(
    maps: FeatureMaps,
    rows: np.ndarray,
    y: np.ndarray,
    source: np.ndarray,
    sources: int,
    seed: int,
    settings: MILSettings,
) -> MILHead:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = MILHead(maps.source, sources)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    bs = settings.batch_size
    steps = settings.epochs * -(-len(rows) // bs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr, total_steps=steps, pct_start=0.1
    )
    target = torch.as_tensor(y[rows], dtype=torch.float32)
    target = target * (1 - settings.smoothing) + settings.smoothing / 2
    src = torch.as_tensor(source[rows])
    head.train()
    for _ in range(settings.epochs):
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), bs):
            pick = order[start : start + bs]
            fine, deep = maps.take(rows[pick], rng.integers(0, N_VIEWS, len(pick)))
            loss = F.binary_cross_entropy_with_logits(head(fine, deep, src[pick]), target[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return head.eval()


def pooled_views(maps: FeatureMaps, batch: int = 64) -> torch.Tensor:
    """float32 [V, N, 2·(C + C')] pooled features of every view."""
    n = maps.fine.shape[1]
    out = torch.empty((N_VIEWS, n, 2 * (maps.fine.shape[2] + maps.deep.shape[2])))
    for v in range(N_VIEWS):
        for start in range(0, n, batch):
            rows = np.arange(start, min(n, start + batch))
            out[v, rows] = pooled_features(*maps.take(rows, v))
    return out


def fit_logistic(pooled: torch.Tensor, rows: np.ndarray, y: np.ndarray) -> PooledLogistic:
    """Standardised L2 logistic regression (C=0.01) on all views of ``rows``: feature-level
    augmentation, eight samples per slice."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = pooled[:, rows].reshape(-1, pooled.shape[2]).numpy()
    target = np.tile(y[rows], N_VIEWS)
    scaler = StandardScaler().fit(x)
    logistic = LogisticRegression(C=0.01, max_iter=3000).fit(scaler.transform(x), target)
    return PooledLogistic.from_sklearn(scaler, logistic)


def fit_forest(density: np.ndarray, rows: np.ndarray, y: np.ndarray, seed: int) -> ForestModule:
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(500, min_samples_leaf=2, random_state=seed, n_jobs=1)
    return ForestModule.from_sklearn(forest.fit(density[rows], y[rows]))


BLOB_TREES = 400
BLOB_KEEP = 2  # blobs per positive slice taken as blood in the second round


def _blob_trees(x: np.ndarray, label: np.ndarray, seed: int, oob: bool) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(
        BLOB_TREES,
        min_samples_leaf=3,
        class_weight="balanced_subsample",
        oob_score=oob,
        random_state=seed,
        n_jobs=1,
    ).fit(x, label)


def fit_blob_forest(blobs: np.ndarray, rows: np.ndarray, y: np.ndarray, seed: int) -> ForestModule:
    """A forest on single blobs, from slice labels (multiple-instance learning).
    ``blobs``: [2, N, MAX_BLOBS, F], each slice's blob tables and its mirror image's.

    A positive slice's blobs are not all blood (calcifications and the skull's rim sit
    beside the bleed), so a first forest learns from every blob of a positive slice as
    blood; its out-of-bag votes then pick the ``BLOB_KEEP`` most blood-like blobs of each
    positive slice, and a second forest learns from those and every negative slice's blobs.
    Both rebalance the classes (a negative slice has blobs too, more of them)."""
    tables = blobs[:, rows]  # [2, n, K, F]
    present = blob_present(tables)
    x = tables[present]
    owner = np.broadcast_to(np.arange(len(rows))[None, :, None], present.shape)[present]
    label = y[rows][owner]
    if len(x) == 0:  # not one blob in the training slices: a forest that finds no blood
        x, label, owner = np.zeros((1, blobs.shape[-1]), np.float32), np.zeros(1, int), label
    if len(np.unique(label)) < 2:  # one class: nothing to pick among
        return ForestModule.from_sklearn(_blob_trees(x, label, seed, oob=False))
    forest = _blob_trees(x, label, seed, oob=True)
    votes = np.nan_to_num(forest.oob_decision_function_[:, 1], nan=0.0)
    keep = label == 0
    for slice_ in np.unique(owner[label == 1]):
        mine = np.flatnonzero(owner == slice_)
        keep[mine[np.argsort(-votes[mine], kind="stable")[:BLOB_KEEP]]] = True
    forest = _blob_trees(x[keep], label[keep], seed, oob=False)
    return ForestModule.from_sklearn(forest)


@dataclass
class TrainingFeatures:
    """Everything the learners read, per slice of the run (train and validation)."""

    maps: list[FeatureMaps]  # one per reader
    pooled: list[torch.Tensor]  # [V, N, 2·(C + C')] per reader
    density: np.ndarray  # [N, 29]
    blobs: np.ndarray  # [2, N, MAX_BLOBS, F]: the blob tables of each slice and its mirror
    y: np.ndarray  # [N] 0/1
    source: np.ndarray  # [N] 0 main, 1.. --extra-train sets
    sources: int
    brain: np.ndarray  # uint8 [N, H, W]: the brain crops, which the pixel reader reads


@dataclass
class Members:
    mil: list[MILEnsemble]  # one per reader
    logistic: list[PooledLogistic]  # one per reader
    forest: ForestModule
    blob_forest: ForestModule
    pixel_reader: PixelNet


def fit_members(
    data: TrainingFeatures,
    rows: np.ndarray,
    seed: int,
    settings: MILSettings = MILSettings(),
    pixel_reader: Callable[[], PixelNet] | None = None,
) -> Members:
    """``pixel_reader``: a call giving the pixel reader fitted elsewhere on the same rows and
    seed (ichscan.train.pixel_reader.fits_beside); fitted here when None."""
    main = rows[data.source[rows] == 0]
    return Members(
        [fit_mil(m, rows, data.y, data.source, data.sources, seed, settings) for m in data.maps],
        [fit_logistic(pooled, main, data.y) for pooled in data.pooled],
        fit_forest(data.density, main, data.y, seed),
        fit_blob_forest(data.blobs, rows, data.y, seed),
        pixel_reader() if pixel_reader else fit_pixel_reader(data.brain, data.y, rows, seed, {}),
    )


@torch.no_grad()
def members_logits(
    members: Members, data: TrainingFeatures, rows: np.ndarray, views: Sequence[int] = (0, 1)
) -> np.ndarray:
    """float [V, N, M]: the members' logits of ``rows`` (source 0) in ``views`` of the cached
    ones; by default the identity and the mirror, as the predictor computes them (the blob
    tables exist for those two)."""
    density = torch.from_numpy(data.density[rows])
    source = torch.zeros(len(rows), dtype=torch.long)
    brain = torch.from_numpy(data.brain[rows]).float() / 255.0
    out = []
    for view in views:
        if view not in (0, 1):
            raise ValueError("blob tables and the pixel reader's input exist for views 0 and 1")
        maps = [m.take(rows, view) for m in data.maps]
        logits = member_logits(
            members.mil,
            members.logistic,
            members.forest,
            maps,
            density,
            source,
            blob_forest=members.blob_forest,
            blobs=torch.from_numpy(data.blobs[view, rows]),
            pixel_reader=members.pixel_reader,
            brain=brain if view == 0 else brain.flip(-1),
        )
        out.append(logits.numpy())
    return np.stack(out)


def combine(logits: np.ndarray) -> np.ndarray:
    """[V, N, 2·R + 3] member logits → [N] probability: the model's own head (BoundedVotes,
    the bounded weighted sum) per view, sigmoid, mean over views (the predictor's TTA)."""
    members = logits.shape[-1]
    weights = member_weights((members - 3) // 2, blob_forest=True, pixel_reader=True)
    votes = BoundedVotes(members, weights, VOTE_BOUND).double()
    with torch.no_grad():
        z = votes(torch.from_numpy(np.asarray(logits, dtype=np.float64)))[..., 0]
    return torch.sigmoid(z).mean(0).numpy()


def inner_folds(
    data: TrainingFeatures, rows: np.ndarray, seed: int, folds: int = INNER_FOLDS
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, int]]]:
    """(main rows, per inner fold (its fitting rows, the held-out positions in main, its
    seed)); no folds when a class has fewer than two training slices."""
    from sklearn.model_selection import StratifiedKFold

    main = rows[data.source[rows] == 0]
    extra = rows[data.source[rows] != 0]
    k = min(folds, int(np.bincount(data.y[main], minlength=2).min()))
    if k < 2:
        return main, []
    split = StratifiedKFold(k, shuffle=True, random_state=seed).split(main, data.y[main])
    return main, [
        (np.concatenate([main[fit_idx], extra]), held_idx, seed + 101 * (i + 1))
        for i, (fit_idx, held_idx) in enumerate(split)
    ]


def inner_oof(
    data: TrainingFeatures,
    rows: np.ndarray,
    seed: int,
    folds: int = INNER_FOLDS,
    settings: MILSettings = MILSettings(),
    pixel_readers: Sequence[Callable[[], PixelNet]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(main rows, their out-of-fold member logits [2, N, M]) by ``folds``-fold inner CV
    (NaN when a class has fewer than two training slices). ``pixel_readers``: per inner
    fold, its pixel reader fitted elsewhere (fits_beside)."""
    main, splits = inner_folds(data, rows, seed, folds)
    members = len(member_weights(len(data.maps), blob_forest=True, pixel_reader=True))
    oof = np.zeros((2, len(main), members))
    if not splits:
        return main, np.full(oof.shape, np.nan)
    for i, (fit_rows, held_idx, fold_seed) in enumerate(splits):
        pixel = pixel_readers[i] if pixel_readers else None
        fitted = fit_members(data, fit_rows, fold_seed, settings, pixel)
        oof[:, held_idx] = members_logits(fitted, data, main[held_idx])
    return main, oof


# ---------------------------------------------------------------------------------------
# The training run


def check_cache(cache: PreparedCache, origin: str | Path) -> None:
    if cache.crop not in ("brain", HEAD_READER_CROP) or cache.size != CROP_SIZE:
        raise SmallSetError(
            origin,
            f"the small-set recipe reads brain-cropped {CROP_SIZE} px slices; this cache holds "
            f"crop={cache.crop!r} at {cache.size} px (give the dataset folder instead, or "
            "--recipe finetune)",
        )


def source_ids(cache: PreparedCache) -> tuple[np.ndarray, list[str]]:
    """0 for the main dataset, 1.. for each --extra-train dataset (by patient-id prefix)."""
    patients = cache.index["patient_id"].astype(str)
    names = ["main"]
    out = np.zeros(len(patients), dtype=np.int64)
    for i, pid in enumerate(patients):
        if pid.startswith("extra:"):
            name = pid.split(":", 2)[1]
            if name not in names:
                names.append(name)
            out[i] = names.index(name)
    return out, names


def train_small_set(config: TrainConfig, data: TrainingData) -> dict[str, Any]:
    from ichscan.evaluate.metrics import operating_point, roc_auc
    from ichscan.train.loop import (
        choose_thresholds,
        evaluate_rows,
        pick_device,
        resolve_threshold,
        seed_everything,
    )

    started = time.monotonic()
    seed_everything(config.seed)
    out = Path(config.out)
    cache, label_set, train_rows, val_rows = data.open()
    check_cache(cache, config.data)
    if len(label_set.labels) != 1:
        raise SmallSetError(
            config.data,
            f"the small-set recipe trains one label; {label_set.name} has "
            f"{len(label_set.labels)} (use --recipe finetune, or --labels binary)",
        )
    labels = cache.labels()[:, 0]
    train_rows = train_rows[labels[train_rows] >= 0]
    val_rows = val_rows[labels[val_rows] >= 0]
    source, source_names = source_ids(cache)
    if (source[train_rows] == 0).sum() == 0 or len(np.unique(labels[train_rows])) < 2:
        raise SmallSetError(
            config.data, "the main set's training slices hold only one class: need both"
        )
    rows = np.concatenate([train_rows, val_rows])
    readers = readers_for(cache.crop)
    if len(rows) > HARD_MAX_SLICES:
        raise SmallSetError(
            config.data,
            f"{len(rows)} slices: the small-set fits would hold about "
            f"{len(rows) * map_bytes_per_slice(readers) / 2**30:.1f} GB of feature "
            f"maps in memory (limit {HARD_MAX_SLICES}); use --recipe finetune",
        )
    # [N, P, H, W]: each slice's brain plane, then its head plane if cut (CROP_PLANES)
    planes = np.stack([np.asarray(cache[int(r)]).transpose(2, 0, 1)[:2] for r in rows])
    greys = {
        c: np.ascontiguousarray(planes[:, i]) for c, i in CROP_PLANES.items() if i < len(planes[0])
    }
    brain = greys["brain"]
    # Derived from the brain plane, as predict does (the mirror's blob tables too: TTA).
    density, centre, blobs = side_arrays(
        brain, CENTRE_SHARE if reads_centre(readers) else None, blobs=True
    )
    if centre is not None:
        greys[CENTRE_READER.crop] = centre[:, 0]
    mirror_blobs = batch_blobs(np.ascontiguousarray(brain[..., ::-1]))
    local = {int(r): i for i, r in enumerate(rows)}
    y = labels[rows].astype(np.int64)
    src = source[rows]
    tr = np.array([local[int(r)] for r in train_rows], dtype=np.int64)
    va = np.array([local[int(r)] for r in val_rows], dtype=np.int64)

    feature_cache = (
        None
        if config.feature_cache == "none"
        else Path(config.feature_cache or default_feature_cache())
    )
    if config.pretrained not in ("imagenet", "none"):
        raise SmallSetError(
            config.pretrained,
            "the small-set recipe reads ImageNet EfficientNet-Lite0, Lite1 and Lite2 (from their "
            "pip packages): --pretrained PATH is for --recipe finetune",
        )
    # one per network, in the readers' order: a network reading two crops is built once
    extractors = {
        b: LiteMaps(b, config.pretrained) for b in dict.fromkeys(r.backbone for r in readers)
    }
    # The frozen networks are the cost (145 s of 272 for head_ct on a 2-core CPU): they run
    # on the GPU when there is one. The fits are small and stay on the CPU. A GPU's TF32
    # convolutions round differently from the CPU's, well inside the maps' float16 storage,
    # so cached maps are shared between the two.
    device = pick_device(config.device)
    t0 = time.monotonic()
    maps, computed = [], 0
    for reader in readers:
        m, n = FeatureMaps.compute(
            greys[reader.crop],
            feature_cache,
            extractors[reader.backbone].to(device),
            config.progress,
            batch=4 if device.type == "cpu" else 32,
            crop=reader.crop,
        )
        maps.append(m)
        computed += n
    for extractor in extractors.values():
        extractor.cpu()  # the bundle holds CPU tensors: it loads on any machine
    feature_seconds = time.monotonic() - t0
    features = TrainingFeatures(
        maps,
        [pooled_views(m) for m in maps],
        density,
        np.stack([blobs, mirror_blobs]),
        y,
        src,
        len(source_names),
        brain,
    )

    t1 = time.monotonic()
    # The pixel readers (one per inner fold, then the final one) fit on the second core
    # while the other members fit on the first.
    _, splits = inner_folds(features, tr, config.seed)
    jobs = [(fit_rows, fold_seed) for fit_rows, _, fold_seed in splits] + [(tr, config.seed)]
    with fits_beside(brain, y, jobs) as pixel_readers:
        main_rows, oof_logits = inner_oof(
            features, tr, config.seed, pixel_readers=pixel_readers[:-1] or None
        )
        final = fit_members(features, tr, config.seed, pixel_reader=pixel_readers[-1])
    fit_seconds = time.monotonic() - t1

    name = label_set.labels[0]
    oof = np.full(len(main_rows), np.nan)
    if np.isfinite(oof_logits).all():
        oof = combine(oof_logits)
        rule = resolve_threshold(config.threshold, RECIPE)
        thresholds = choose_thresholds(oof[:, None], y[main_rows][:, None], label_set, rule)
        method = f"{rule} on {INNER_FOLDS}-fold inner CV of the training slices"
    else:
        thresholds, method = {name: 0.5}, "default 0.5 (too few training slices for inner CV)"

    model = SmallSetModel(
        features.sources,
        0,
        tuple(final.forest.left.shape),
        mil_heads=len(final.mil[0].heads),
        readers=readers,
        maps=list(extractors.values()),
        blob_forest_shape=tuple(final.blob_forest.left.shape),
        vote_bound=VOTE_BOUND,
        pixel_reader=True,
    )
    model.mil = torch.nn.ModuleList(final.mil)
    model.logistic = torch.nn.ModuleList(final.logistic)
    model.forest = final.forest
    model.blob_forest = final.blob_forest
    model.pixel_reader = final.pixel_reader
    metrics: dict[str, Any] = {"validation_slices": len(va)}
    if len(va):
        p_val = combine(members_logits(final, features, va))
        metrics["validation"] = evaluate_rows(p_val[:, None], y[va][:, None], label_set)
        metrics["validation_operating_point"] = operating_point(y[va], p_val, thresholds[name])
        metrics["validation"]["auc"] = {name: roc_auc(y[va], p_val)}
    metrics["inner_cv_auc"] = roc_auc(y[main_rows], oof) if np.isfinite(oof).all() else None

    seconds = time.monotonic() - started
    spec = input_spec(
        cache.facts["windows"],
        cache.size,
        mode=cache.facts.get("mode", "linear"),
        source_window=data.source_window,
        mean=[0.0, 0.0, 0.0],  # the ensemble normalises inside (ImageNet statistics)
        std=[1.0, 1.0, 1.0],
        tta=("identity", "hflip"),
        crop=cache.crop,
        crop_version=cache.crop_version,
        slice_thickness_mm=cache.slice_spacing_mm,
    )
    bundle = new_config(
        architecture=model.architecture,
        weights_provenance=model.provenance + " (frozen)",
        label_set=label_set,
        input_spec=spec,
        dropout=0.0,
        recipe=RECIPE,
        small_set=small_set_config(model),
        training={
            "recipe": RECIPE,
            "data": str(config.data),
            "data_summary": data.summary,
            "sources": source_names,
            "fold": config.fold,
            "folds": config.folds,
            "train_slices": len(tr),
            "train_slices_main": int((src[tr] == 0).sum()),
            "seconds": round(seconds, 1),
            "feature_seconds": round(feature_seconds, 1),
            "feature_device": str(device),
            "feature_maps_computed": computed,
            "feature_cache": str(feature_cache) if feature_cache else None,
            "fit_seconds": round(fit_seconds, 1),
            "seed": config.seed,
        },
        metrics=metrics,
    )
    bundle["thresholds"] = thresholds
    bundle["threshold_method"] = method
    save_bundle(out, bundle, [model])  # type: ignore[list-item]
    return bundle
