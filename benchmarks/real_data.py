"""Benchmark: the default training recipe on the real data in ../shared/data, by 5-fold
patient-grouped cross-validation.

These sets carry no patient ids, and head_ct holds the same slice twice (re-cropped or
rescaled: 011/061, 198/199) and neighbouring slices of one head under nearby ids. So images
whose 32×32 thumbnails correlate at r >= 0.9 (--same-patient-r) are taken as one patient
(`ichscan.data.similar`), and the benchmark trains on a view of the set whose labels.csv
carries that patient_id; the groups are printed and saved. Until session 18 each image was
its own patient, so a copy of a test slice could sit in the training folds.

For each dataset and fold, `ichscan train` runs with its defaults on the other four folds
(plus, with --with-other, every image of the other dataset: both sets are brain-window axial
slices, labelled hemorrhage / any), and the fold's images are predicted with the resulting
bundle. Out-of-fold predictions of all five folds are pooled and scored:
- ROC AUC with a 95% bootstrap CI,
- accuracy at each fold model's own threshold (what `predict` decides; the small-set recipe
  picks it by inner CV on its training slices), at a threshold chosen without the fold's
  labels (Youden on the other folds' out-of-fold predictions) and at 0.5, with Wilson 95% CIs,
- training wall time per model;
and writes every out-of-fold prediction to OUT/<dataset>_predictions.csv.
The sets are small (150 and 100 images): the figures carry wide intervals and say so.

rsna_png is trained with --labels binary (hemorrhage = `any`); head_ct is binary already.

Run:  .venv/bin/python benchmarks/real_data.py [--datasets head_ct rsna_png] [--folds 5]
      [--with-other] [--seed S] [--[no-]head-reader] [--data-root DIR]
Other recipes (a GPU fine-tune, say): --recipe finetune --device cuda --crop brain
      --epochs 30 --select last. Fine-tuning chooses its threshold on its validation fold,
      which cross-validation also scores: its "own threshold" accuracy is optimistic, and
      only --select last keeps the epoch choice off that fold too (both said in the output).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ichscan.data.similar import SAME_PATIENT_R

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABEL = {"head_ct": "hemorrhage", "rsna_png": "any"}
# rsna_png carries the RSNA columns (any + subtypes); the target is hemorrhage yes/no (`any`).
LABELS_ARG = {"head_ct": None, "rsna_png": "binary"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def grouped_view(data: Path, out: Path, min_r: float) -> tuple[Path, dict]:
    """A view of an image set (its images linked, not copied) whose labels.csv gives every
    image the patient id of its near-duplicate group; and what was grouped. The images and
    their labels are what the images adapter reads (lost zero padding and all)."""
    from ichscan.data.adapters import build_manifest
    from ichscan.data.similar import similar_groups

    rows, _, label_set = build_manifest(data, layout="images")
    ids = rows["image_id"].astype(str).tolist()
    groups, pairs = similar_groups(rows["path"].tolist(), min_r)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for path in rows["path"]:
        link = out / "images" / Path(path).name
        if not link.is_symlink():
            link.symlink_to(Path(path).resolve())
    table = rows[list(label_set.labels)].astype(int)
    table.insert(0, "id", ids)
    table["patient_id"] = [f"group-{g:03d}" for g in groups]
    table.to_csv(out / "labels.csv", index=False)
    n_groups = len(set(groups.tolist()))
    shared = sorted({i for a, b, _ in pairs for i in (ids[a], ids[b])})
    note = (
        f"{len(ids)} images as {n_groups} patients: {len(shared)} images in groups of "
        f"near-duplicates (32x32 thumbnails at r >= {min_r:g}), kept in one fold"
    )
    return out, {
        "patients": n_groups,
        "same_patient_r": min_r,
        "grouped_images": shared,
        "pairs": [(ids[a], ids[b], round(r, 3)) for a, b, r in pairs],
        "note": note,
    }


def write_predictions(path: Path, cv: dict) -> None:
    """One row per image: its fold, label, out-of-fold probability and the decision of its
    fold's model at that model's own threshold."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "fold", "label", "probability", "decision"])
        columns = (cv["image_id"], cv["fold"], cv["y"], cv["p"], cv["bundle_decision"])
        for i, fold, y, p, d in zip(*columns, strict=True):
            w.writerow([i, int(fold), int(y), f"{float(p):.6f}", int(d)])


def main() -> None:
    from ichscan.evaluate.metrics import bootstrap_ci, roc_auc
    from ichscan.train.cv import cross_validate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["head_ct", "rsna_png"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--with-other", action="store_true", help="also train on all images of the other dataset"
    )
    parser.add_argument(
        "--head-reader",
        action=argparse.BooleanOptionalAction,
        help="train with ichscan train --head-reader / --no-head-reader (default: neither)",
    )
    parser.add_argument(
        "--same-patient-r",
        type=float,
        default=SAME_PATIENT_R,
        help="images whose thumbnails correlate at least this much are one patient "
        f"(default {SAME_PATIENT_R}; 1.01 keeps every image its own patient, as before "
        "session 18)",
    )
    parser.add_argument("--out", default="bench_out/real_data")
    parser.add_argument("--data-root", default=str(SHARED), help="folder holding the sets")
    train_options = parser.add_argument_group(
        "training options (default: what `ichscan train` does without them)"
    )
    train_options.add_argument("--recipe", choices=["auto", "small-set", "finetune"])
    train_options.add_argument("--device", help="auto, cpu, cuda ...")
    train_options.add_argument("--crop", choices=["none", "head", "brain"])
    train_options.add_argument("--epochs", type=int)
    train_options.add_argument("--size", type=int)
    train_options.add_argument("--lr", type=float)
    train_options.add_argument("--select", choices=["loss", "auc", "last"])
    train_options.add_argument("--workers", type=int)
    args = parser.parse_args()
    overrides = {
        key: value
        for key in ("recipe", "device", "crop", "epochs", "size", "lr", "select", "workers")
        if (value := getattr(args, key)) is not None
    }
    recipe_name = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "default recipe"
    where = _where(args.device)
    root = Path(args.data_root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.datasets:
        data = root / name
        if not data.exists():
            raise SystemExit(f"{data} is absent")
        extra = [str(root / o) for o in LABEL if o != name] if args.with_other else []
        view, groups = grouped_view(data, out / "grouped" / name, args.same_patient_r)
        cv = cross_validate(
            str(view),
            str(out / name),
            folds=args.folds,
            seed=args.seed,
            extra_train=extra,
            labels=LABELS_ARG[name],
            head_reader=args.head_reader,
            **overrides,
        )
        y, p, thr_pred, own = cv["y"], cv["p"], cv["decision"], cv["bundle_decision"]
        auc = roc_auc(y, p)
        lo, hi = bootstrap_ci(y, p, n=2000, seed=args.seed)
        k_thr = int((thr_pred == y).sum())
        k_half = int(((p >= 0.5) == y).sum())
        k_own = int((own == y).sum())
        n = len(y)
        results[name] = {
            "images": n,
            "positives": int(y.sum()),
            "auc": auc,
            "auc_ci95": [lo, hi],
            "accuracy_bundle_threshold": k_own / n,
            "accuracy_bundle_threshold_ci95": wilson(k_own, n),
            "accuracy_held_out_threshold": k_thr / n,
            "accuracy_held_out_threshold_ci95": wilson(k_thr, n),
            "accuracy_at_0.5": k_half / n,
            "accuracy_at_0.5_ci95": wilson(k_half, n),
            "patients": groups,
            "train_minutes_per_model": cv["minutes"],
            "fold_aucs": cv["fold_aucs"],
            "extra_training_data": extra,
            "training_options": overrides,
            "device": where,
        }
        write_predictions(out / f"{name}_predictions.csv", cv)
        r = results[name]
        print(
            f"{name}: {n} images ({r['positives']} positive), {args.folds}-fold CV, "
            f"{recipe_name}{' + other set in training' if extra else ''}"
        )
        print(f"  {groups['note']}")
        print(
            f"  ROC AUC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f}); fold AUCs "
            + ", ".join(f"{a:.3f}" for a in cv["fold_aucs"])
        )
        print(
            f"  accuracy {r['accuracy_bundle_threshold']:.3f} at each model's own threshold "
            f"(95% CI {r['accuracy_bundle_threshold_ci95'][0]:.3f}-"
            f"{r['accuracy_bundle_threshold_ci95'][1]:.3f}; what predict decides"
            + (
                "; optimistic: fine-tuning chose it on this same fold)"
                if cv["recipes"] != {"small-set"}
                else ")"
            )
        )
        print(
            f"  accuracy {r['accuracy_held_out_threshold']:.3f} at a held-out threshold "
            f"(95% CI {r['accuracy_held_out_threshold_ci95'][0]:.3f}-"
            f"{r['accuracy_held_out_threshold_ci95'][1]:.3f}), {r['accuracy_at_0.5']:.3f} "
            "at 0.5"
        )
        print(
            "  training time per model: "
            + ", ".join(f"{m:.1f}" for m in cv["minutes"])
            + f" min ({where})"
        )
        if cv["recipes"] != {"small-set"} and overrides.get("select") != "last":
            print("  epochs chosen on the scored fold (add --select last for an unbiased AUC)")
        wrong = cv["image_id"][own != y]
        print(f"  wrong at the model's own threshold: {', '.join(wrong.tolist()) or 'none'}")
    (out / "real_data.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {out / 'real_data.json'}")


def _where(device: str | None) -> str:
    """What the run trained on, for the figures' label: the GPU (fine-tuning, or the
    small-set recipe's frozen networks) beside the CPU (data loading; the small-set fits)."""
    import os

    import torch

    cpu = f"{len(os.sched_getaffinity(0))}-core CPU"
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} + {cpu}"
    return cpu


if __name__ == "__main__":
    main()
