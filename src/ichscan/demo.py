"""`make demo` / `ichscan demo`: the main job end to end on synthetic data, so a new user
sees every stage work on a fresh machine without downloading anything."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def run_demo(out: Path) -> int:
    from ichscan.cli import main
    from ichscan.data.synth import write_synthetic

    console = Console(highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    console.rule("ichscan demo (synthetic phantom; research software, not a medical device)")
    data = out / "synthetic"
    console.print(f"1. writing a synthetic head CT phantom as a DICOM series under {data}")
    if not data.exists():
        write_synthetic(
            data,
            n_scans=1,
            seed=7,
            layout="dicom",
            thickness=2.5,
            tilt_deg=10.0,
            compression="jpeg-lossless",
        )
    # The one series folder, found again on a rerun (synth refuses to overwrite).
    series = sorted({p.parent for p in data.rglob("*.dcm")})[0]
    steps = [
        ("2. ichscan info", ["info", str(series)]),
        (
            "3. ichscan preview",
            [
                "preview",
                str(series),
                "--out",
                str(out / "preview.png"),
                "--windows",
                "brain,subdural,bone",
                "--slices",
                "8",
            ],
        ),
        (
            "4. ichscan convert (resliced to 5 mm, tilt corrected)",
            ["convert", str(series), str(out / "scan_5mm.nii.gz"), "--thickness", "5"],
        ),
    ]
    for title, argv in steps:
        console.rule(title)
        code = main(argv)
        if code != 0:
            console.print(f"[red]demo step failed: ichscan {' '.join(argv)} exited {code}")
            return code
    cohort, held_out, model = out / "cohort", out / "held_out", out / "model"
    console.rule("5. a small synthetic cohort (training) and held-out scans (evaluation)")
    if not cohort.exists():
        write_synthetic(cohort, n_scans=24, seed=11, layout="dicom", shape=(16, 128, 128))
    if not held_out.exists():
        write_synthetic(held_out, n_scans=8, seed=99, layout="dicom", shape=(16, 128, 128))
    one_scan = sorted(p for p in held_out.iterdir() if p.is_dir())[0]
    steps = [
        (
            "6. ichscan train (EfficientNet-Lite0, offline ImageNet weights, a few minutes on CPU)",
            [
                "train",
                str(cohort),
                "--out",
                str(model),
                "--size",
                "128",
                "--epochs",
                "8",
                "--batch-size",
                "16",
                "--folds",
                "4",
                "--labels",
                "rsna",
            ],
        ),
        (
            "7. ichscan evaluate on the held-out scans",
            ["evaluate", str(model), str(held_out), "--out", str(out / "report")],
        ),
        (
            "8. ichscan predict one held-out scan",
            ["predict", str(one_scan), "--model", str(model), "--out", str(out / "preds.csv")],
        ),
        (
            "9. ichscan explain (Grad-CAM)",
            ["explain", str(one_scan), "--model", str(model), "--out", str(out / "explain")],
        ),
    ]
    for title, argv in steps:
        console.rule(title)
        code = main(argv)
        if code != 0:
            console.print(f"[red]demo step failed: ichscan {' '.join(argv)} exited {code}")
            return code
    console.rule("outputs (synthetic data: these figures say nothing about real scans)")
    console.print(f"series      {series}")
    console.print(f"preview     {out / 'preview.png'}")
    console.print(f"NIfTI       {out / 'scan_5mm.nii.gz'} (open in ITK-SNAP or nibabel)")
    console.print(f"model       {model}/bundle.json")
    console.print(f"report      {out / 'report' / 'report.html'} (open in a browser, offline)")
    console.print(f"predictions {out / 'preds.csv'} and {out / 'preds.scans.csv'}")
    console.print(f"Grad-CAM    {out / 'explain' / 'montage.png'}")
    console.print(
        f"next        ichscan serve --model {out / 'model'}   (viewer at http://127.0.0.1:8000)"
    )
    return 0
