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
    (series,) = write_synthetic(
        data,
        n_scans=1,
        seed=7,
        layout="dicom",
        thickness=2.5,
        tilt_deg=10.0,
        compression="jpeg-lossless",
    )
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
    console.rule("outputs")
    console.print(f"series      {series}")
    console.print(f"preview     {out / 'preview.png'}")
    console.print(f"NIfTI       {out / 'scan_5mm.nii.gz'} (open in ITK-SNAP or nibabel)")
    return 0
