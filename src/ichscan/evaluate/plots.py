"""Evaluation plots (matplotlib, Agg backend, no display needed): ROC and precision-recall
curves, calibration (reliability) curves and probability histograms, one figure each with
every label that has both classes. A PNG gets shared on its own, so each title names the data,
the model and n, and each label in a legend carries its positives and negatives."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_all"]

NOTE = "research software, not a medical device"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows with a known label and a probability; None when a class is missing."""
    keep = (y >= 0) & np.isfinite(p)
    yk, pk = y[keep].astype(int), p[keep]
    if yk.size == 0 or yk.min() == yk.max():
        return None
    return yk, pk


def _counts(name: str, y: np.ndarray, p: np.ndarray) -> str:
    keep = (y >= 0) & np.isfinite(p)
    return f"{name} ({int((y[keep] == 1).sum())} pos / {int((y[keep] == 0).sum())} neg)"


def _save(fig, path: Path, title: str) -> Path:
    width, height = fig.get_size_inches()
    # About 13 characters per inch at 10 pt, so a long data name wraps instead of being cut.
    lines = [
        part
        for line in f"{title}\n({NOTE})".split("\n")
        for part in textwrap.wrap(line, int(13 * width))
    ]
    fig.suptitle("\n".join(lines), fontsize=10)
    # Fixed margins instead of tight_layout: its extra draw pass doubled the cost.
    # Room for the title's lines and for the subplot titles under them.
    top = 1 - (0.2 * len(lines) + 0.3) / height
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=top, hspace=0.45, wspace=0.3)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def _curves(
    kind: str, labels: Sequence[str], y: np.ndarray, p: np.ndarray, path: Path, title: str
) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for j, name in enumerate(labels):
        data = _known(y[:, j], p[:, j])
        if data is None:
            continue
        yk, pk = data
        if kind == "roc":
            fpr, tpr, _ = roc_curve(yk, pk)
            from sklearn.metrics import auc

            ax.plot(fpr, tpr, label=f"{_counts(name, yk, pk)}, AUC {auc(fpr, tpr):.3f}")
        else:
            precision, recall, _ = precision_recall_curve(yk, pk)
            ap = average_precision_score(yk, pk)
            ax.plot(recall, precision, label=f"{_counts(name, yk, pk)}, AP {ap:.3f}")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    if ax.lines:
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    return _save(fig, path, title)


def _calibration(
    labels: Sequence[str], y: np.ndarray, p: np.ndarray, path: Path, title: str
) -> Path:
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for j, name in enumerate(labels):
        data = _known(y[:, j], p[:, j])
        if data is None:
            continue
        observed, predicted = calibration_curve(data[0], data[1], n_bins=10, strategy="uniform")
        ax.plot(predicted, observed, marker="o", ms=3, label=_counts(name, *data))
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path, title)


def _histograms(
    labels: Sequence[str],
    y: np.ndarray,
    p: np.ndarray,
    thresholds: Sequence[float],
    path: Path,
    title: str,
) -> Path:
    plt = _pyplot()
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for j, name in enumerate(labels):
        ax = axes[j // cols][j % cols]
        keep = np.isfinite(p[:, j])
        for value, colour, what in ((0, "tab:blue", "negative"), (1, "tab:red", "positive")):
            sel = keep & (y[:, j] == value)
            if sel.any():
                ax.hist(
                    p[sel, j], bins=bins, alpha=0.6, color=colour, label=f"{what} ({sel.sum()})"
                )
        ax.axvline(thresholds[j], color="k", ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=6)
    for k in range(len(labels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    return _save(fig, path, title)


def plot_all(
    level: str,
    labels: Sequence[str],
    y: np.ndarray,
    p: np.ndarray,
    thresholds: Sequence[float],
    out_dir: Path,
    *,
    rests_on: str,
) -> dict[str, Path]:
    """The four figures of one level ("slice" or "scan") as PNG files in ``out_dir``.
    ``rests_on`` names the data and model (e.g. "held_out (SYNTHETIC phantoms); model m"),
    and each title adds the level's n."""
    out_dir.mkdir(parents=True, exist_ok=True)
    what = f"{level} level, {len(y)} {level}s\n{rests_on}"
    return {
        "roc": _curves("roc", labels, y, p, out_dir / f"roc_{level}.png", f"ROC, {what}"),
        "pr": _curves("pr", labels, y, p, out_dir / f"pr_{level}.png", f"Precision-recall, {what}"),
        "calibration": _calibration(
            labels, y, p, out_dir / f"calibration_{level}.png", f"Calibration, {what}"
        ),
        "histogram": _histograms(
            labels, y, p, thresholds, out_dir / f"hist_{level}.png", f"Probabilities, {what}"
        ),
    }
