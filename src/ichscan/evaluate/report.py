"""`ichscan evaluate`: a model bundle on a labelled dataset → metrics.json, plots, report.html.

The data is any layout the adapters know (prepared into ``OUT/cache`` with the bundle's own
windows and size, so the pixels are those training would have made) or a prepared cache
(used directly after checking it was prepared the way the bundle needs). Every readable slice
is predicted scan by scan, through the same `Predictor` that ``ichscan predict`` uses
(ensemble, TTA, study model), so the figures describe what predict does.

Two levels:

- slice: every readable slice against its label (unknown labels, -1, are left out of that
  label's figures). For a dataset labelled per scan (CQ500) the slice labels are the scan's,
  which ``label_level`` says.
- scan: a scan is positive for a label when any of its slices is (negative when a slice says
  so and none is positive); its probability is the maximum over its slices, or the study
  model's scan output when the bundle has one.

Per level, in metrics.json: counts (slices or scans, positives and negatives per label), the
RSNA weighted log loss (see `LOG_LOSS_DEFINITION`), per-label ROC AUC with a 95% percentile
bootstrap interval and a note where that interval cannot be trusted, sensitivity /
specificity / PPV / NPV with 95% Wilson intervals and accuracy at the bundle thresholds with
the confusion matrix, and which level those thresholds were chosen at. Slices of one scan are
not independent cases, so slice-level intervals resample or count whole scans. Undefined
values (AUC with one class) are null. Data that ichscan's phantom generator wrote is marked
SYNTHETIC in metrics.json, report.html and every plot.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ichscan.data.cache import REPORT_FILE, PreparedCache
from ichscan.data.input_check import input_differences
from ichscan.data.skipped import NO_FILE, skipped_inputs
from ichscan.data.synth import is_synthetic
from ichscan.errors import IchscanError, InputError
from ichscan.evaluate.metrics import (
    EPS,
    operating_point,
    operating_point_ci95,
    roc_auc,
    weighted_log_loss,
)
from ichscan.infer.inputs import InputSpec
from ichscan.infer.predictor import Predictor
from ichscan.labels import scan_truth
from ichscan.models.bundle import data_words, trained_on
from ichscan.preprocess.head_crop import CROP_VERSION

__all__ = [
    "LOG_LOSS_DEFINITION",
    "NO_FILE",
    "bootstrap_auc_ci",
    "run_evaluate",
    "skipped_inputs",
]

RESEARCH_NOTE = "ichscan is research software, not a medical device"
LOG_LOSS_DEFINITION = (
    "RSNA 2019 weighted multi-label log loss: the mean over cases i of "
    "sum_j w_j L_ij / sum_j w_j over the labels j known for that case, "
    "L_ij = -(y log p + (1 - y) log(1 - p)), p clipped to "
    f"[{EPS:g}, 1 - {EPS:g}], w_j the label set's weights (rsna: any 2, subtypes 1); cases "
    "with no known label are left out. With every label known this is the challenge's figure; "
    "at scan level the same formula on scan probabilities (not a challenge figure)."
)
# Below this many sampled units (cases, or scans at slice level) of either class a percentile
# bootstrap interval of the AUC covers well under its nominal 95%.
MIN_UNITS_FOR_AUC_CI = 10


class EvaluateError(IchscanError):
    """Data that this model cannot be evaluated on."""


# Skipped inputs listed in metrics.json; the count is exact.
LISTED_SKIPPED = 50


def _skipped_facts(skipped: list[dict[str, str]]) -> dict[str, Any]:
    return {"n_skipped_inputs": len(skipped), "skipped_inputs": skipped[:LISTED_SKIPPED]}


# ---------------------------------------------------------------------------------------
# Metrics


def bootstrap_auc_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC over resampled cases (unknown labels
    left out); NaNs when a class is missing. With ``clusters`` (each case's scan) whole
    clusters are resampled: slices of one scan are not independent draws, and resampling
    them one by one gives an interval that is too narrow.

    Each resample is a weighting of the cases, so the scores are sorted once and every
    resample costs one bincount and two cumulative sums: the weighted Mann-Whitney
    statistic, ties counting a half. Identical to sklearn's AUC for unit weights.
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    keep = (y >= 0) & np.isfinite(p)
    y, p = y[keep].astype(bool), p[keep]
    if y.size == 0 or y.all() or not y.any():
        return (float("nan"), float("nan"))
    order = np.argsort(p, kind="stable")
    ys, ps = y[order], p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    rng = np.random.default_rng(seed)
    # Each case's unit of resampling: itself, or its cluster.
    unit = (
        np.arange(y.size)
        if clusters is None
        else np.unique(np.asarray(clusters)[keep], return_inverse=True)[1].ravel()
    )[order]
    m = int(unit.max()) + 1
    values = np.empty(n)
    for b in range(n):
        w = np.bincount(rng.integers(0, m, m), minlength=m)[unit]
        values[b] = _weighted_auc(w, ys, starts)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _weighted_auc(w: np.ndarray, ys: np.ndarray, starts: np.ndarray) -> float:
    """AUC of score-sorted cases with weights w; ties grouped at ``starts``."""
    pos = np.add.reduceat(w * ys, starts).astype(np.float64)
    neg = np.add.reduceat(w * ~ys, starts).astype(np.float64)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (total_pos * total_neg))


def auc_ci_note(ci: Sequence[float], positives: int, negatives: int, unit: str) -> str | None:
    """Why an AUC interval cannot be read as a 95% interval, or None when nothing is known
    against it. ``positives``/``negatives``: the units resampled (cases, or scans)."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    notes = []
    if lo == hi:
        notes.append(
            "zero-width interval: no resample ranks the classes otherwise than the sample "
            "does, which says nothing about the AUC's precision"
        )
    if min(positives, negatives) < MIN_UNITS_FOR_AUC_CI:
        notes.append(
            f"{positives} positive and {negatives} negative {unit}: with fewer than "
            f"{MIN_UNITS_FOR_AUC_CI} of a class a percentile bootstrap interval covers well "
            "under 95% (57% in a simulation at 4 and 4); read it as too narrow"
        )
    return "; ".join(notes) or None


def _units(yj: np.ndarray, value: int, clusters: np.ndarray | None) -> int:
    """Cases with label ``value``, or the clusters holding one."""
    hit = yj == value
    return int(hit.sum()) if clusters is None else int(np.unique(clusters[hit]).size)


def level_metrics(
    y: np.ndarray,
    p: np.ndarray,
    labels: Sequence[str],
    weights: Sequence[float],
    thresholds: Sequence[float],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of one level: y int [N, L] (1, 0, -1 unknown), p float [N, L]. ``clusters``
    (int [N], each row's scan) makes every interval resample or count whole scans."""
    unit = "cases" if clusters is None else "scans"
    per_label = {}
    for j, name in enumerate(labels):
        yj, pj = y[:, j], p[:, j]
        known = yj >= 0
        point = operating_point(yj, pj, thresholds[j])
        cis = operating_point_ci95(yj, pj, thresholds[j], clusters)
        auc_ci = bootstrap_auc_ci(yj, pj, n=n_bootstrap, seed=seed + j, clusters=clusters)
        units = (_units(yj, 1, clusters), _units(yj, 0, clusters))
        per_label[name] = {
            "n": int(known.sum()),
            "positives": int((yj == 1).sum()),
            "negatives": int((yj == 0).sum()),
            "auc": roc_auc(yj, pj),
            "auc_ci95": list(auc_ci),
            "auc_ci_note": auc_ci_note(auc_ci, *units, unit),
            "threshold": float(thresholds[j]),
            **{k: point[k] for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")},
            **{f"{k}_ci95": list(v) for k, v in cis.items()},
            "confusion_matrix": {
                "rows": "truth (negative, positive)",
                "columns": "prediction (negative, positive)",
                "matrix": [
                    [int(point["tn"]), int(point["fp"])],
                    [int(point["fn"]), int(point["tp"])],
                ],
            },
        }
    averaged = [k for k, v in per_label.items() if not math.isnan(v["auc"])]
    return {
        "n": len(y),
        "weighted_log_loss": weighted_log_loss(y, p, weights),
        "mean_auc": float(np.mean([per_label[k]["auc"] for k in averaged]))
        if averaged
        else float("nan"),
        # AUC is undefined for a label with one class here, so the mean is over the rest.
        "mean_auc_labels": averaged,
        "ci_method": _ci_method(n_bootstrap, unit),
        "labels": per_label,
    }


def _ci_method(n_bootstrap: int, unit: str) -> str:
    if unit == "scans":
        return (
            f"95% CIs with slices clustered by scan: AUC by percentile bootstrap over "
            f"{n_bootstrap} resamples of whole scans; sensitivity, specificity, PPV and NPV "
            "by Wilson score interval on the Rao-Scott effective sample size"
        )
    return (
        f"95% CIs: AUC by percentile bootstrap over {n_bootstrap} resamples of {unit}; "
        "sensitivity, specificity, PPV and NPV by Wilson score interval"
    )


# ---------------------------------------------------------------------------------------
# Data


def _check_cache(cache: PreparedCache, spec: InputSpec) -> None:
    differences = input_differences(cache, spec)
    if not differences:
        return
    facts = cache.facts
    aspects = {d.aspect for d in differences}
    again = " (give the dataset folder instead and it is prepared the model's way)"
    if aspects & {"size", "windows"}:
        names = [str(w["name"]) for w in facts["windows"]]
        raise EvaluateError(
            cache.root,
            f"cache was prepared with windows {names} at {facts['size']} px; "
            f"the model reads {[w.name for w in spec.windows]} at {spec.size} px" + again,
        )
    if "mode" in aspects:
        raise EvaluateError(
            cache.root, f"cache windows are {facts.get('mode')}, the model's {spec.mode}"
        )
    if "crop" in aspects:
        crop_version = CROP_VERSION if spec.crop != "none" else None
        cut = f"--crop {cache.crop}" + (f" (v{cache.crop_version})" if cache.crop_version else "")
        raise EvaluateError(
            cache.root,
            f"cache was prepared with {cut}; the model reads --crop {spec.crop}"
            + (f" (v{crop_version})" if crop_version else "")
            + again,
        )
    raise EvaluateError(
        cache.root,
        f"cache input differs from the model's: {'; '.join(map(str, differences))}" + again,
    )


def _open_data(
    data: Path, out_dir: Path, spec: InputSpec, *, progress: bool, workers: int | None
) -> tuple[PreparedCache, dict[str, Any]]:
    """The cache to evaluate on and what it rests on (source, layout, label level)."""
    if PreparedCache.is_cache(data):
        cache = PreparedCache(data)
        _check_cache(cache, spec)
        _refuse_images_if_hu(cache.index["kind"], spec, data)
        manifest = cache.facts.get("manifest", {})
        synthetic = manifest.get("synthetic")
        if synthetic is None:  # a cache prepared without the flag: look where its data is
            synthetic = is_synthetic(manifest.get("source") or cache.facts.get("source") or data)
        return cache, {
            "source": str(data),
            "synthetic": bool(synthetic),
            "layout": "prepared cache",
            "label_level": cache.label_level,
            **_skipped_facts(skipped_inputs(None, cache.root / REPORT_FILE)),
        }
    from ichscan.data.adapters import build_manifest
    from ichscan.data.prepare import prepare

    df, report, label_set = build_manifest(data)
    if df.empty:
        raise EvaluateError(data, "no labelled slices found: " + "; ".join(report.problems[:3]))
    _refuse_images_if_hu(df["kind"], spec, data)
    root = out_dir / "cache"
    synthetic = is_synthetic(data)
    prepared = prepare(
        df,
        root,
        windows=list(spec.windows),
        size=spec.size,
        mode=spec.mode,
        label_set=label_set,
        progress=progress,
        workers=workers,
        crop=spec.crop,
        # Kept in cache.json, so that evaluating this cache again still knows its data
        # (and a series row its slab thickness).
        facts={**report.facts(), "source": str(data), "synthetic": synthetic},
    )
    facts = {
        "source": str(data),
        "synthetic": synthetic,
        "layout": report.layout,
        "label_level": report.label_level,
        "adapter_problems": report.problems[:20],
        **_skipped_facts(skipped_inputs(report, prepared.report)),
    }
    return PreparedCache(root), facts


def operating_point_note(level: str, chosen_on: str | None, scan_score: str) -> str:
    """What the sensitivity and specificity of ``level`` are: the tuned operating point, or
    a threshold tuned on other probabilities applied to these ones."""
    if chosen_on is None:
        return (
            "the thresholds were not tuned on validation data (or the bundle does not say how "
            "they were chosen): this is not a tuned operating point"
        )
    if chosen_on == f"{level}s":
        return (
            f"thresholds chosen on {level} probabilities: the operating point tuned for this level"
        )
    if level == "scan" and scan_score == "max over slices":
        return (
            "thresholds chosen on slice probabilities, applied here to the scan score, the "
            "maximum over the scan's slices; that maximum sits above a single slice's score, so "
            "scan specificity here is lower (and sensitivity higher) than at a threshold chosen "
            "on scans. This is the rule predict applies, not a tuned scan-level operating point"
        )
    return (
        f"thresholds chosen on {chosen_on[:-1]} probabilities, applied here to {level} "
        f"probabilities: the rule predict applies, not a tuned {level}-level operating point"
    )


def _refuse_non_finite(
    slice_p: np.ndarray, scan_p: np.ndarray, scan_of: np.ndarray, model_dir: str | Path
) -> None:
    """One line, before any figure, when the model gave NaN or infinite probabilities (a
    diverged training run does): every metric would fail or quietly miscount them."""
    bad_slices = ~np.isfinite(slice_p).all(axis=1)
    bad_scans = ~np.isfinite(scan_p).all(axis=1)
    bad_scans[np.unique(scan_of[bad_slices])] = True
    if bad_scans.any():
        raise EvaluateError(
            model_dir,
            f"the model gave NaN or infinite probabilities for {int(bad_slices.sum())} of "
            f"{bad_slices.size} slices ({int(bad_scans.sum())} of {bad_scans.size} scans); "
            "no figures computed (a model whose training diverged does this)",
        )


def _refuse_images_if_hu(kinds: Any, spec: InputSpec, data: Path) -> None:
    if spec.needs_hu and (np.asarray(kinds) == "image").any():
        raise EvaluateError(
            data,
            "holds already-windowed images; the model needs HU for its "
            f"{'/'.join(w.name for w in spec.read_windows[1:])} windows",
        )


def _label_matrix(cache: PreparedCache, labels: Sequence[str], data: Path) -> np.ndarray:
    """int8 [N, L] in the model's label order; a binary model reads `any` (RSNA) or `ich`
    (CQ500) as hemorrhage, as training derives it."""
    have = list(cache.label_names)
    table = cache.labels()
    columns = []
    for name in labels:
        if name in have:
            columns.append(table[:, have.index(name)])
        elif name == "hemorrhage" and ("any" in have or "ich" in have):
            columns.append(table[:, have.index("any" if "any" in have else "ich")])
        else:
            raise EvaluateError(data, f"the data has no {name!r} label (it has {', '.join(have)})")
    return np.stack(columns, axis=1).astype(np.int8)


def _scan_rows(cache: PreparedCache) -> Iterator[tuple[str, np.ndarray]]:
    """(scan id, readable rows in slice order) for each scan, in the cache's scan order."""
    index = cache.index
    scans = index["scan_id"].astype(str).to_numpy()
    order = np.lexsort((index["slice_index"].to_numpy(), scans))
    cuts = np.flatnonzero(scans[order][1:] != scans[order][:-1]) + 1
    ok = cache.ok
    for rows in np.split(order, cuts):
        rows = rows[ok[rows]]
        if rows.size:
            yield str(scans[rows[0]]), rows


# ---------------------------------------------------------------------------------------
# Outputs


def _clean(value: Any) -> Any:
    """JSON-safe: NaN → null, numpy scalars → Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_predictions(
    path: Path,
    ids: Sequence[str],
    keys: Sequence[Sequence[Any]],
    key_names: Sequence[str],
    labels: Sequence[str],
    y: np.ndarray,
    p: np.ndarray,
) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*key_names, *labels, *(f"{n}_true" for n in labels)])
        for i in range(len(ids)):
            out.writerow([*keys[i], *(f"{v:.6f}" for v in p[i]), *(int(v) for v in y[i])])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _with_ci(m: dict[str, Any], key: str) -> str:
    lo, hi = m[f"{key}_ci95"]
    if lo is None:
        return _fmt(m[key])
    return f"{_fmt(m[key])} ({_fmt(lo)}–{_fmt(hi)})"


def _table(level: dict[str, Any]) -> str:
    head = (
        "<tr><th>label</th><th>n</th><th>positives</th><th>AUC</th><th>95% CI</th>"
        "<th>threshold</th><th>sensitivity (95% CI)</th><th>specificity (95% CI)</th>"
        "<th>PPV (95% CI)</th><th>NPV (95% CI)</th><th>accuracy</th>"
        "<th>TN / FP / FN / TP</th></tr>"
    )
    rows = []
    for name, m in level["labels"].items():
        lo, hi = m["auc_ci95"]
        mark = " †" if m["auc_ci_note"] else ""
        (tn, fp), (fn, tp) = m["confusion_matrix"]["matrix"]
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{m['n']}</td><td>{m['positives']}</td>"
            f"<td>{_fmt(m['auc'])}</td><td>{_fmt(lo)} – {_fmt(hi)}{mark}</td>"
            f"<td>{_fmt(m['threshold'])}</td>"
            + "".join(
                f"<td>{_with_ci(m, k)}</td>" for k in ("sensitivity", "specificity", "ppv", "npv")
            )
            + f"<td>{_fmt(m['accuracy'])}</td><td>{tn} / {fp} / {fn} / {tp}</td></tr>"
        )
    notes = "".join(
        f"<li>† {html.escape(name)}: {html.escape(m['auc_ci_note'])}</li>"
        for name, m in level["labels"].items()
        if m["auc_ci_note"]
    )
    return f"<table>{head}{''.join(rows)}</table>" + (f"<ul>{notes}</ul>" if notes else "")


def mean_auc_text(level: dict[str, Any]) -> str:
    """The mean AUC with the labels it averages, e.g. "mean AUC 0.712 over 5 of 6 label(s)
    (subdural: ...)": they differ from one dataset to the next, so the figure says which."""
    used, every = level["mean_auc_labels"], list(level["labels"])
    text = f"mean AUC {_fmt(level['mean_auc'])} over {len(used)} of {len(every)} label(s)"
    left = [name for name in every if name not in used]
    if left:
        text += f" ({html.escape(', '.join(left))}: a class missing, AUC undefined)"
    return text


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}"
    ".warn{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em}"
    "img{max-width:48%;margin:.5%}"
)


def _html(metrics: dict[str, Any], plots: dict[str, dict[str, Path]], out_dir: Path) -> str:
    d = metrics["data"]
    sections = []
    for level in ("slice", "scan"):
        m = metrics[level]
        # Embedded, so the page stays whole when it is mailed or moved without plots/.
        images = "".join(
            f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" '
            f'alt="{k} {level}" title="{html.escape(p.relative_to(out_dir).as_posix())}">'
            for k, p in plots[level].items()
        )
        sections.append(
            f"<h2>{level.capitalize()} level ({m['n']} {level}s)</h2>"
            f"<p>Weighted log loss {_fmt(m['weighted_log_loss'], 4)}; {mean_auc_text(m)}.</p>"
            f"<p{'' if m['operating_point_tuned'] else ' class=warn'}>Operating point: "
            f"{html.escape(m['operating_point_note'])}.</p>"
            f"<p>{html.escape(m['ci_method'])}.</p>{_table(m)}{images}"
        )
    model = metrics["model"]
    synthetic = (
        "<p class='warn'><b>The evaluation data are SYNTHETIC phantoms</b> written by "
        "ichscan for tests and demos: these figures say nothing about real scans.</p>"
        if d["synthetic"]
        else ""
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ichscan evaluation</title>"
        f"<style>{_STYLE}</style></head><body><h1>ichscan evaluation</h1>"
        f"<p class='warn'><b>{html.escape(RESEARCH_NOTE)}.</b> These figures describe this "
        "model on this data only; do not use it for diagnosis or patient care.</p>"
        f"{synthetic}<h2>What this rests on</h2><ul>"
        f"<li>data: {'<b>SYNTHETIC phantoms</b> at ' if d['synthetic'] else ''}"
        f"<code>{html.escape(d['source'])}</code> ({html.escape(d['layout'])}, "
        f"labels per {html.escape(str(d['label_level']))})</li>"
        f"<li>{metrics['slice']['n']} slices in {metrics['scan']['n']} scans"
        f" ({d['unreadable_slices']} unreadable slice(s) left out)</li>"
        f"<li>model: <code>{html.escape(model['path'])}</code> "
        f"({html.escape(model['architecture'])}, {html.escape(model['label_set'])} labels, "
        f"{model['members']} member(s), "
        f"scan level by {html.escape(model['scan_level'])}, TTA {model['tta']})</li>"
        f"<li>model trained on: {html.escape(model['trained_on'])}</li>"
        f"<li>thresholds: {html.escape(model['threshold_method'] or 'not recorded')}; chosen "
        f"on {html.escape(model['thresholds_chosen_on'] or 'nothing recorded')}"
        f"; scan score: {html.escape(model['scan_level'])}; scan decisions at thresholds "
        f"chosen on {html.escape(model['scan_thresholds_chosen_on'] or 'nothing recorded')}</li>"
        f"<li>weighted log loss: {html.escape(LOG_LOSS_DEFINITION)}</li>"
        f"<li>created {html.escape(metrics['created'])}</li></ul>"
        f"{''.join(sections)}</body></html>"
    )


# ---------------------------------------------------------------------------------------
# The verb


def run_evaluate(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 32,
    tta: bool | None = None,
    n_bootstrap: int = 1000,
    progress: bool = False,
    workers: int | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate the bundle at ``model_dir`` on ``data``; write metrics.json, the slice and
    scan predictions (CSV), plots/ and report.html into ``out_dir``; return the metrics.
    ``plots=False`` leaves out the figures (the report then has tables only). Prints
    nothing unless ``progress``."""
    from ichscan.evaluate.plots import plot_all
    from ichscan.progress import progress_bar
    from ichscan.train.dataset import SliceDataset

    data, out_dir = Path(data), Path(out_dir)
    if not data.exists():
        raise InputError(data, "no such file or folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model_dir, device, batch_size, tta)
    spec, labels = predictor.spec, list(predictor.labels)
    cache, facts = _open_data(data, out_dir, spec, progress=progress, workers=workers)
    y_all = _label_matrix(cache, labels, data)
    dataset = SliceDataset(cache, np.arange(len(cache)), input_kind=spec.kind)

    n_rows = len(cache)
    slice_p = np.full((n_rows, len(labels)), np.nan, dtype=np.float32)
    scan_ids: list[str] = []
    scan_p, scan_y, scan_n = [], [], []
    groups = list(_scan_rows(cache))
    for scan_id, rows in progress_bar(groups, unit="scan", desc="evaluate", disable=not progress):
        x = np.stack([dataset.image(int(r)) for r in rows]).transpose(0, 3, 1, 2)
        probs, scan_probs, _ = predictor.predict_inputs(np.ascontiguousarray(x))
        slice_p[rows] = probs
        scan_ids.append(scan_id)
        scan_p.append(scan_probs)
        scan_y.append(scan_truth(y_all[rows]))
        scan_n.append(len(rows))
    if not groups:
        raise EvaluateError(data, "no readable slice to evaluate")

    read = np.flatnonzero(cache.ok)
    scan_of = np.full(n_rows, -1)
    for k, (_, rows) in enumerate(groups):
        scan_of[rows] = k
    _refuse_non_finite(slice_p[read], np.stack(scan_p), scan_of[read], model_dir)
    weights = predictor.bundle.label_set.weights
    if len(weights) != len(labels):
        weights = (1.0,) * len(labels)
    thresholds = [float(t) for t in predictor.thresholds]  # float64, as predict decides
    scan_thresholds = [float(t) for t in predictor.scan_thresholds]
    s_y, s_p = y_all[read], slice_p[read]
    c_y, c_p = np.stack(scan_y), np.stack(scan_p)
    common = {"n_bootstrap": n_bootstrap}
    scan_score = "study model" if predictor.backend.has_study else "max over slices"
    chosen_on = predictor.thresholds_chosen_on
    # Thresholds the bundle chose for the scan score itself tune the scan level.
    scan_chosen_on = "scans" if predictor.scan_thresholds_tuned else chosen_on
    metrics: dict[str, Any] = {
        "research_use_only": RESEARCH_NOTE,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {
            **facts,
            "evaluated_on": data_words(data, facts["synthetic"]),
            "slices": n_rows,
            "unreadable_slices": int(n_rows - read.size),
        },
        "model": {
            "path": str(Path(model_dir)),
            "architecture": str(predictor.bundle.config.get("architecture")),
            "label_set": str(predictor.bundle.config.get("label_set")),
            "members": len(predictor.bundle.config.get("members", [])),
            "scan_level": scan_score,
            "tta": "horizontal flip" if predictor.backend.tta else "none",
            "threshold_method": predictor.threshold_method,
            "thresholds_chosen_on": chosen_on,
            "scan_thresholds_chosen_on": scan_chosen_on,
            "trained_on": trained_on(predictor.bundle.config),
        },
        "labels": labels,
        "thresholds": dict(zip(labels, thresholds, strict=True)),
        "scan_thresholds": dict(zip(labels, scan_thresholds, strict=True)),
        "weighted_log_loss_definition": LOG_LOSS_DEFINITION,
        "bootstrap": n_bootstrap,
        "slice": level_metrics(
            s_y, s_p, labels, weights, thresholds, clusters=scan_of[read], **common
        ),
        "scan": level_metrics(c_y, c_p, labels, weights, scan_thresholds, **common),
    }
    for level, on in (("slice", chosen_on), ("scan", scan_chosen_on)):
        metrics[level]["operating_point_note"] = operating_point_note(level, on, scan_score)
        metrics[level]["operating_point_tuned"] = on == f"{level}s"
    metrics["slice"]["n_scans"] = len(scan_ids)
    metrics["scan"]["n_slices"] = int(read.size)
    metrics = _clean(metrics)

    index = cache.index
    _write_predictions(
        out_dir / "slice_predictions.csv",
        [str(i) for i in read],
        [
            (index["scan_id"].iat[i], index["image_id"].iat[i], index["slice_index"].iat[i])
            for i in read
        ],
        ["scan", "id", "slice_index"],
        labels,
        s_y,
        s_p,
    )
    _write_predictions(
        out_dir / "scan_predictions.csv",
        scan_ids,
        [(s, n) for s, n in zip(scan_ids, scan_n, strict=True)],
        ["scan", "n_slices"],
        labels,
        c_y,
        c_p,
    )
    figures: dict[str, dict[str, Path]] = {"slice": {}, "scan": {}}
    if plots:
        rests_on = (
            f"{data.name}{' (SYNTHETIC phantoms)' if facts['synthetic'] else ''}; "
            f"model {Path(model_dir).name}"
        )
        figures = {
            "slice": plot_all(
                "slice", labels, s_y, s_p, thresholds, out_dir / "plots", rests_on=rests_on
            ),
            "scan": plot_all(
                "scan", labels, c_y, c_p, scan_thresholds, out_dir / "plots", rests_on=rests_on
            ),
        }
    metrics["plots"] = {
        level: {k: p.relative_to(out_dir).as_posix() for k, p in paths.items()}
        for level, paths in figures.items()
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "report.html").write_text(_html(metrics, figures, out_dir))
    return metrics
