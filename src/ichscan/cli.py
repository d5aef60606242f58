"""The `ichscan` command line: one entry point, one verb per job.

Exit codes: 0 success; 1 done, but some inputs were bad (listed); 2 nothing usable / bad usage.
Bad input is one line on stderr naming the file and the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext, redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ichscan import __version__
from ichscan.errors import IchscanError

if TYPE_CHECKING:  # the verbs import what they use, so `ichscan info` starts fast
    import pandas as pd

    from ichscan.labels import LabelSet
    from ichscan.preprocess.window import Window

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
# Bad or missing inputs listed on the console, one line each; the rest are counted (all of
# them are in the command's report file).
MAX_LISTED = 10
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def _shown(text: str) -> str:
    """A path or message as one printable line (a file name may hold a newline)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _list_bad(
    entries: Sequence[dict[str, str]], total: int, where: str | Path | None = None
) -> None:
    """One stderr line per bad or missing input: the first MAX_LISTED, then a count. Rows
    of one file failing the same way (the slices of a truncated volume) are one line."""
    from ichscan.data.skipped import NO_FILE

    groups: list[tuple[dict[str, str], int]] = []
    for e in entries:
        if groups and (groups[-1][0]["path"], groups[-1][0]["reason"]) == (e["path"], e["reason"]):
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((e, 1))
    for e, n in groups[:MAX_LISTED]:
        kind = "missing file" if e["reason"] == NO_FILE else "bad file"
        times = f" ({n} slices)" if n > 1 else ""
        print(_shown(f"{kind} {e['path']}: {e['reason']}{times}"), file=sys.stderr)
    more = total - sum(n for _, n in groups[:MAX_LISTED])
    if more > 0:
        print(f"... and {more} more" + (f" (all in {where})" if where else ""), file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from ichscan.io.describe import describe

    report = describe(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    if not report["series"]:
        return EXIT_ERROR
    return EXIT_PARTIAL if report["bad_files"] else EXIT_OK


def _print_info(report: dict[str, Any]) -> None:
    console = _console()
    err = _console(stderr=True)
    for bad in report["bad_files"]:
        err.print(f"[red]bad file[/] {bad['path']}: {bad['reason']}")
    if not report["series"]:
        err.print(f"{report['source']}: no readable CT series")
        return
    console.print(
        f"[bold]{report['source']}[/] ({report['format']}): {len(report['series'])} series, "
        f"{len(report['bad_files'])} bad file(s)"
    )
    for s in report["series"]:
        px = s["pixel_spacing_mm"]
        mark = "[green]* selected[/]" if s["selected"] else ""
        rows = [
            ("study", s["study_uid"]),
            ("location", s.get("location") or report["source"]),
            ("description", s["description"] or "-"),
            ("modality", s["modality"]),
            (
                "slices",
                f"{s['n_slices']} of {s['rows']}x{s['cols']}"
                + (f", pixels {px[0]:.3g}x{px[1]:.3g} mm" if px else ""),
            ),
            (
                "thickness",
                f"{_fmt(s['slice_thickness_mm'], ' mm')}, spacing "
                f"{_fmt(s['slice_spacing_mm'], ' mm')}, gantry tilt {s['gantry_tilt_deg']:.1f} deg",
            ),
            ("kernel", s["convolution_kernel"] or "-"),
            ("syntax", s["transfer_syntax"]),
            ("selection", s["selection_reason"] or "-"),
        ]
        rows += [("problem", p) for p in s["problems"]]
        console.print(f"\nseries {s['series_uid']} {mark}")
        for key, value in rows:
            style = "yellow" if key == "problem" else "dim"
            console.print(f"  [{style}]{key:<12}[/] {value}")
    for note in report["notes"]:
        console.print(f"note: {note}")
    if report["ignored_files"]:
        console.print(
            f"ignored {len(report['ignored_files'])} non-DICOM file(s), e.g. "
            f"{report['ignored_files'][0]}"
        )


def _load_for_cli(path: str, series: str | None = None):
    from ichscan.io.load import load

    scan = load(path, series_uid=series)
    err = _console(stderr=True)
    for warning in scan.warnings:
        err.print(f"warning: {warning}")
    return scan


def _partial(scan) -> int:
    """1 when files were skipped or the input mixes patients or studies (it is read, but
    the user must hear it as a problem), else 0."""
    mixed = scan.metadata.get("series_uid_shared") or scan.metadata.get("mixed_input")
    skipped = any(w.startswith("skipped ") for w in scan.warnings)
    return EXIT_PARTIAL if skipped or mixed else EXIT_OK


def _nifti_out(out: str, source: str) -> Path:
    """Where convert writes: ``out`` itself, or inside it when it is a folder (named after
    the input). Anything else is refused before the scan is read: nibabel would add .nii to
    a bare name, write an Analyze pair for .img, or fail late on an unknown suffix."""
    from ichscan.io.image import IMAGE_SUFFIXES

    path = Path(out)
    if path.is_dir():
        stem = Path(source).resolve().name
        for suffix in (*NIFTI_SUFFIXES, ".dcm", ".zip", *IMAGE_SUFFIXES):
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
                break
        return path / f"{stem or 'scan'}.nii.gz"
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise IchscanError(out, "the output must be a .nii or .nii.gz file, or a folder")
    return path


def cmd_convert(args: argparse.Namespace) -> int:
    from ichscan.io.nifti import write_nifti
    from ichscan.preprocess.reslice import reslice_scan

    target = _nifti_out(args.out, args.path)
    scan = _load_for_cli(args.path, args.series)
    if args.thickness:
        scan = reslice_scan(scan, args.thickness)
    out = write_nifti(scan, target)
    print(
        f"wrote {out} ({scan.n_slices} slices, {scan.shape[1]}x{scan.shape[2]}, "
        f"spacing {scan.spacing[0]:.3g}x{scan.spacing[1]:.3g}x{scan.spacing[2]:.3g} mm)"
    )
    return _partial(scan)


def cmd_preview(args: argparse.Namespace) -> int:
    from ichscan.io.montage import write_preview
    from ichscan.preprocess.window import parse_windows

    try:
        windows = [w.name for w in parse_windows(args.windows)]
    except ValueError as exc:
        raise IchscanError(None, f"--windows: {exc}") from None
    if Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise IchscanError(args.out, "the preview is an image: name it .png or .jpg")
    scan = _load_for_cli(args.path, args.series)
    out = write_preview(scan, args.out, windows, args.slices)
    print(f"wrote {out}")
    return _partial(scan)


def cmd_synth(args: argparse.Namespace) -> int:
    from ichscan.data.synth import write_synthetic

    written = write_synthetic(
        args.out,
        n_scans=args.scans,
        seed=args.seed,
        layout=args.layout,
        thickness=args.thickness,
        tilt_deg=args.tilt,
        compression=args.compression,
    )
    print(
        f"wrote {len(written)} synthetic scan(s) under {args.out} (layout {args.layout}); "
        "synthetic data for tests and demos, not a stand-in for real scans"
    )
    return EXIT_OK


def cmd_prepare(args: argparse.Namespace) -> int:
    from ichscan.data.adapters import build_manifest
    from ichscan.data.manifest import write_manifest
    from ichscan.data.prepare import prepare
    from ichscan.data.skipped import skipped_inputs
    from ichscan.data.synth import is_synthetic

    windows = _prepare_windows(args)
    df, report, label_set = build_manifest(
        args.data,
        labels=args.labels,
        workers=args.workers,
        masks=args.masks,
        thickness="auto" if args.thickness is None else args.thickness,
        middle=args.middle,
    )
    print(report.summary())
    err = _console(stderr=True)
    for problem in report.problems[:20]:
        err.print(f"problem: {problem}")
    if len(df) == 0:
        raise IchscanError(args.data, "no slices to prepare")
    df = _split(df, label_set, args)
    out = Path(args.out)
    if report.layout == "images":
        windows = _image_windows(args.data, df, windows)
    facts = {**report.facts(), "source": str(args.data)}
    result = prepare(
        df,
        out,
        windows=windows,
        size=args.size,
        workers=args.workers,
        ray=args.ray,
        label_set=label_set,
        overwrite=args.overwrite,
        crop=args.crop,
        facts={**facts, "synthetic": is_synthetic(args.data)},
    )
    write_manifest(df, out / "manifest.parquet", label_set, **facts, report=report.to_dict())
    print(
        f"prepared {result.n_ok} slice(s) into {result.n_shards} shard(s) under {out} "
        f"({result.n_skipped_shards} shard(s) already done) in {result.seconds:.1f} s"
    )
    skipped = skipped_inputs(report, result.report)
    if result.n_bad:
        err.print(f"{result.n_bad} slice(s) could not be read (listed in {result.report})")
    _list_bad(skipped, len(skipped), result.report if result.n_bad else None)
    return EXIT_PARTIAL if skipped else EXIT_OK


def _prepare_windows(args: argparse.Namespace) -> list[Window]:
    from ichscan.preprocess.window import parse_windows

    try:
        windows = parse_windows(args.windows)
    except ValueError as exc:
        raise IchscanError(None, f"--windows: {exc}") from None
    if args.crop != "none" and windows[0].name != "brain":
        raise IchscanError(
            None, f"--crop {args.crop} finds the head in a brain window: list brain first"
        )
    return windows


def _split(df: pd.DataFrame, label_set: LabelSet, args: argparse.Namespace) -> pd.DataFrame:
    """Patient-grouped folds; what the splitter warns about is a note on stderr."""
    from ichscan.data.splits import assign_folds

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = assign_folds(df, label_set, k=args.folds, seed=args.seed, holdout=args.holdout)
    for w in caught:
        print(_shown(f"note: {w.message}"), file=sys.stderr)
    return df


def _image_windows(data: str, df: pd.DataFrame, asked: list[Window]) -> list[Window]:
    """PNG/JPEG slices hold display values in one window: the cache holds that one, and a
    user who asked for others hears once why they are not there."""
    from ichscan.preprocess.window import parse_windows

    held = str(df["window"].iloc[0] or "brain")
    _note_one_window(data, held, [w.name for w in asked], f"the cache holds {held} only")
    return parse_windows([held])


def _note_one_window(data: str, held: str, asked: list[str], so: str) -> None:
    """One line, when windows were asked for that a set of display images cannot give."""
    others = [name for name in asked if name != held]
    if others:
        print(
            _shown(
                f"note: {data}: the PNG/JPEG slices hold one window ({held}); "
                f"{', '.join(others)} cannot be made from them, so {so}"
            ),
            file=sys.stderr,
        )


def cmd_train(args: argparse.Namespace) -> int:
    from ichscan.train.augment import AugmentSpec
    from ichscan.train.loop import TrainConfig, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        architecture=args.arch,
        pretrained=args.pretrained,
        train_mode=args.train,
        labels=args.labels,
        input_kind=args.input,
        windows=tuple(args.windows.split(",")),
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        accumulate=args.accumulate,
        fold=args.fold,
        folds=args.folds,
        seed=args.seed,
        pos_weight=args.pos_weight,
        patience=args.patience,
        select=args.select,
        threshold=args.threshold,
        device=args.device,
        workers=args.workers,
        amp=not args.no_amp,
        resume=args.resume,
        augment=AugmentSpec() if not args.no_augment else AugmentSpec.off(),
        max_minutes=args.max_minutes,
        extra_train=tuple(args.extra_train or ()),
        recipe=args.recipe,
        feature_cache=args.feature_cache,
        head_reader=args.head_reader,
        crop=args.crop,
    )
    summary = train(config)
    held = summary["training"]["data_summary"].get("source_window")
    if held:
        _note_one_window(args.data, held, list(config.windows), f"the model reads {held} only")
    if summary.get("recipe") == "small-set" and summary["metrics"].get("validation"):
        m = summary["metrics"]
        point = m["validation_operating_point"]
        label = summary["labels"][0]
        print(
            f"model bundle: {args.out}  (small-set recipe; validation fold {args.fold}: "
            f"AUC {m['validation']['auc'][label]:.3f}, accuracy {point['accuracy']:.3f} at "
            f"threshold {summary['thresholds'][label]:.3f}, on {m['validation_slices']} slices; "
            f"{summary['training']['seconds']:.0f} s)"
        )
    elif summary.get("metrics") and summary["metrics"].get("validation"):
        val = summary["metrics"]["validation"]
        print(
            f"model bundle: {args.out}  (validation fold {args.fold}: weighted log loss "
            f"{val['weighted_log_loss']:.4f}, mean AUC {val['mean_auc']:.3f} on "
            f"{summary['metrics']['validation_slices']} slices)"
        )
    return EXIT_OK


def cmd_train_study(args: argparse.Namespace) -> int:
    from ichscan.train.study import StudyConfig, train_study

    result = train_study(
        StudyConfig(
            model=args.model,
            data=args.data,
            kind=args.kind,
            hidden=args.hidden,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
        )
    )
    val = result["validation"]
    print(
        f"study model added to {args.model}: validation scan AUC {val['scan_mean_auc']:.3f}, "
        f"slice AUC {val['slice_mean_auc']:.3f} ({result['validation_scans']} scans)"
    )
    return EXIT_OK


def _tta(args: argparse.Namespace) -> bool | None:
    return {"bundle": None, "on": True, "off": False}[args.tta]


def cmd_predict(args: argparse.Namespace) -> int:
    from ichscan.infer.predictor import run_predict

    return run_predict(
        args.inputs,
        args.model,
        args.out,
        backend="onnx" if args.onnx else args.backend,
        batch_size=args.batch_size,
        device=args.device,
        fmt=args.format,
        tta=_tta(args),
        reslice_mm=args.reslice,
        onnx_path=args.onnx,
    )


def _reslice(text: str) -> float | str | None:
    """--reslice: 'bundle', 'none' or a thickness in mm."""
    if text in ("bundle", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a thickness in mm, 'bundle' or 'none'"
        ) from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ichscan.evaluate.report import run_evaluate

    result = run_evaluate(
        args.model,
        args.data,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        tta=_tta(args),
        progress=True,
    )
    data = result["data"]
    skipped = data.get("skipped_inputs", [])
    _list_bad(skipped, int(data.get("n_skipped_inputs", len(skipped))), "metrics.json")
    print(
        f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.html'} "
        "(open the HTML file in a browser; it works offline)"
    )
    # Done, but on fewer inputs than the labels promise: the convention of predict.
    left_out = data.get("n_skipped_inputs", 0) or data.get("unreadable_slices", 0)
    return EXIT_PARTIAL if left_out else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from ichscan.infer.explain import explain

    result = explain(
        args.input,
        args.model,
        args.out,
        label=args.label,
        top_k=args.top,
        device=args.device,
        series_uid=args.series,
    )
    for warning in result.warnings:
        print(f"warning: {_shown(warning)}", file=sys.stderr)
    print(result.trained_on_line, file=sys.stderr)
    print(
        f"wrote overlays, montage and heatmaps under {args.out} (label {result.label}; "
        f"maps: {result.method})"
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from ichscan.infer.onnx_export import export_onnx

    out = export_onnx(args.model, args.onnx)
    print(f"wrote {out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ichscan.demo import run_demo

    return run_demo(Path(args.out))


def cmd_serve(args: argparse.Namespace) -> int:
    from ichscan.serve.server import run_server

    return run_server(
        model=args.model,
        store=args.store,
        data=args.data,
        host=args.host,
        port=args.port,
        token=args.token,
        workers=args.workers,
        max_upload_mb=args.max_upload_mb,
        inline_wait_s=args.inline_wait,
        device=args.device,
    )


def cmd_listen(args: argparse.Namespace) -> int:
    from ichscan.receive.service import ListenConfig, run_listen

    allow = [a.strip() for a in (args.allow_ae or "").split(",") if a.strip()]
    return run_listen(
        ListenConfig(
            model=args.model,
            store=args.store,
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            series_timeout_s=args.series_timeout,
            workers=args.workers,
            allow=allow,
            forward=args.forward,
            device=args.device,
        )
    )


def _path(text: str) -> str:
    """A path argument: an empty one would be read as the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path ('') names no file or folder")
    return text


def _slab_thickness(text: str) -> float | str:
    """--thickness: a slab thickness in mm, or 'native'."""
    if text == "native":
        return text
    try:
        return _millimetres(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thickness in mm or 'native'") from None


def _millimetres(text: str) -> float:
    """A positive length in mm (a thickness of 0 would be ignored, a negative one fail late)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length in mm") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} mm: a thickness must be above 0 mm")
    return value


def _count(text: str) -> int:
    """A positive number of things (slices...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count (1 or more)")
    return value


def _add_common_input(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", type=_path, help="DICOM file, DICOM folder, zip of DICOM, NIfTI or PNG/JPEG"
    )
    p.add_argument(
        "--series",
        metavar="UID",
        help="SeriesInstanceUID to use instead of the automatically selected series",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichscan",
        description="Find intracranial hemorrhage on head CT. Research software, not a "
        "medical device.",
    )
    parser.add_argument("--version", action="version", version=f"ichscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info", help="describe the series in a DICOM file/folder/zip, NIfTI or image"
    )
    p.add_argument(
        "path", type=_path, help="DICOM file, DICOM folder, zip of DICOM, NIfTI or PNG/JPEG"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write the selected series as int16 HU NIfTI")
    _add_common_input(p)
    p.add_argument(
        "out", type=_path, help="output .nii or .nii.gz, or a folder to write NAME.nii.gz in"
    )
    p.add_argument(
        "--thickness",
        type=_millimetres,
        metavar="MM",
        help="reslice to this slice thickness first (corrects gantry tilt)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("preview", help="PNG montage of slices in several windows")
    _add_common_input(p)
    p.add_argument("--out", type=_path, required=True, help="output PNG")
    p.add_argument(
        "--windows",
        default="brain,subdural,bone",
        help="comma-separated presets (brain, subdural, bone, soft_tissue) or C/W "
        "pairs like 50/150 (default: %(default)s)",
    )
    p.add_argument("--slices", type=_count, default=8, help="number of slices (default: 8)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("synth", help="write synthetic head CT phantoms (tests and demos only)")
    p.add_argument("out", help="output folder (must not exist yet)")
    p.add_argument(
        "--scans", type=_count, default=1, help="phantom scans to write (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--layout",
        choices=["dicom", "nifti", "rsna", "cq500", "png"],
        default="dicom",
        help="folder layout, as the adapters read it (default: %(default)s)",
    )
    p.add_argument(
        "--thickness",
        type=_millimetres,
        default=5.0,
        metavar="MM",
        help="slice spacing of the phantoms (default: %(default)s)",
    )
    p.add_argument(
        "--tilt",
        type=float,
        default=0.0,
        metavar="DEG",
        help="gantry tilt written into the geometry (default: %(default)s)",
    )
    p.add_argument(
        "--compression",
        default="none",
        choices=["none", "rle", "jpegls", "jpeg2000", "jpeg-lossless", "deflate"],
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "prepare",
        help="adapt a dataset, split it, and preprocess every slice once into a streaming cache",
    )
    p.add_argument(
        "data", type=_path, help="dataset folder (RSNA, CQ500, images + labels.csv, NIfTI, DICOM)"
    )
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument(
        "--windows",
        default="brain,subdural,bone",
        help="windows stacked as channels: presets (brain, subdural, bone, soft_tissue) or "
        "C/W pairs like 50/150; PNG/JPEG sets hold one window (default: %(default)s)",
    )
    p.add_argument(
        "--size", type=_count, default=256, help="slice size in pixels (default: %(default)s)"
    )
    p.add_argument(
        "--crop",
        choices=["none", "head", "brain", "brain+head"],  # preprocess.head_crop.CROPS
        default="none",
        help="crop each slice to a square around the head first (brain: skull zeroed too; "
        "brain+head: the brain crop, then the head crop of the brain window as one more "
        "plane); the first window must be brain. The small-set recipe reads --windows brain "
        "--crop brain+head --size 320 (brain with train --no-head-reader) (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--labels",
        choices=["rsna", "cq500", "binary"],
        help="label set the dataset must carry (default: the layout's own, or detected "
        "from labels.csv)",
    )
    p.add_argument(
        "--thickness",
        type=_slab_thickness,
        metavar="MM|native",
        help="read each chosen DICOM series that is thinner as MM-thick slabs along the slice "
        "normal, tilt corrected, as predict --reslice does (CQ500 and DICOM folders); native "
        "keeps every slice (default: 5 for CQ500, native for the other layouts)",
    )
    p.add_argument(
        "--middle",
        type=_count,
        metavar="N",
        help="keep the middle N slices (or slabs) of each scan (default: all of them)",
    )
    p.add_argument(
        "--masks",
        action=argparse.BooleanOptionalAction,
        help="NIfTI: slice labels from the *_mask label maps; --no-masks: labels.csv's per "
        "scan (default: from the masks when every volume has one)",
    )
    p.add_argument(
        "--folds",
        type=_count,
        default=5,
        help="patient-grouped stratified cross-validation folds (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the fold split (default: %(default)s)"
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of patients held out of every fold (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray: 'local' or a cluster address (default: a local process pool)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every shard (default: keep shards already made for the same rows, "
        "settings and input files)",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train", help="train a slice classifier (any dataset layout or a prepared cache)"
    )
    p.add_argument("data", help="dataset folder or prepared cache")
    # FINETUNE_ONLY in ichscan.train.data: the small-set recipe refuses these when set.
    ft = p.add_argument_group(
        "fine-tuning options (--recipe finetune; the small-set recipe refuses them)"
    )
    p.add_argument("--out", required=True, help="model folder (the bundle)")
    p.add_argument(
        "--arch",
        default="efficientnet_lite0",
        help="backbone (default: "
        "%(default)s; vgg16, alexnet, resnet18/50/101/152, densenet121/161/169/201, "
        "efficientnet_b0..b4, efficientnet_lite0..2); naming another backbone than the "
        "default means --recipe finetune",
    )
    p.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet (cached/offline-capable), none, or a weights file (default: %(default)s)",
    )
    ft.add_argument(
        "--train",
        choices=["head", "all"],
        default="all",
        help="head: frozen backbone; all: fine-tune everything (default: %(default)s)",
    )
    p.add_argument(
        "--labels",
        choices=["rsna", "cq500", "binary"],
        help="label set (default: detected from the dataset; binary also trains on an RSNA set's "
        "`any` or a CQ500 set's ICH)",
    )
    ft.add_argument(
        "--input",
        choices=["windows", "2.5d"],
        default="windows",
        help="windows: the --windows as channels; 2.5d: the slice and its two neighbours in "
        "the first window (default: %(default)s)",
    )
    ft.add_argument(
        "--windows",
        default="brain,subdural,bone",
        help="windows stacked as channels, made from the HU of DICOM or NIfTI; a PNG/JPEG set "
        "holds one display window, which the model reads in every channel (default: "
        "%(default)s)",
    )
    ft.add_argument(
        "--size", type=_count, default=256, help="input side in px (default: %(default)s)"
    )
    ft.add_argument("--epochs", type=_count, default=12, help="(default: %(default)s)")
    ft.add_argument("--batch-size", type=_count, default=32, help="(default: %(default)s)")
    ft.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate of the head (default: %(default)s)",
    )
    ft.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=0.1,
        help="--train all: the backbone's learning rate as a share of --lr (default: %(default)s)",
    )
    ft.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    ft.add_argument(
        "--schedule",
        choices=["cosine", "onecycle", "constant"],
        default="cosine",
        help="learning-rate schedule (default: %(default)s)",
    )
    ft.add_argument(
        "--accumulate",
        type=_count,
        default=1,
        help="gradient accumulation steps (default: %(default)s)",
    )
    p.add_argument(
        "--fold",
        type=int,
        default=0,
        help="validation fold, split by patient (default: %(default)s)",
    )
    p.add_argument("--folds", type=int, default=5, help="(default: %(default)s)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the patient split (unless a prepared cache brings its folds), the weights "
        "and the augmentation (default: %(default)s)",
    )
    ft.add_argument("--pos-weight", action="store_true", help="weight positives by neg/pos")
    ft.add_argument(
        "--patience",
        type=int,
        default=6,
        help="early-stopping patience in epochs (default: %(default)s)",
    )
    ft.add_argument(
        "--select",
        choices=["loss", "auc", "last"],
        default="loss",
        help="weights kept: the best epoch by validation loss or AUC, or the last epoch (no "
        "selection or early stopping: for cross-validation, where the validation fold is the "
        "test fold; default: %(default)s)",
    )
    p.add_argument(
        "--crop",
        choices=["none", "head", "brain"],  # train.loop.FINETUNE_CROPS
        help="finetune: cut each slice to a square around the head (brain: skull and scalp "
        "zeroed) before resizing; the bundle records it and predict cuts the same (default "
        "none; the small-set recipe always reads the brain crop)",
    )
    p.add_argument(
        "--threshold",
        default="auto",
        help="how the decision threshold is chosen: youden, calibrated (where a logistic "
        "calibration of the scores crosses 0.5) or sensitivity:0.95; auto (default): "
        "calibrated for the small-set recipe (on its inner CV), youden for finetune (on the "
        "validation fold)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--workers", type=int, help="DataLoader workers")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    ft.add_argument(
        "--no-augment",
        action="store_true",
        help="train without flips, rotations, scaling, crops and window jitter",
    )
    ft.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ft.add_argument("--max-minutes", type=float, help="stop after this much training time")
    p.add_argument(
        "--extra-train",
        action="append",
        metavar="DATA",
        help="another dataset added to every training split, never validated on "
        "(repeatable; e.g. a second brain-window PNG set)",
    )
    p.add_argument(
        "--recipe",
        choices=["auto", "small-set", "finetune"],
        default="auto",
        help="small-set: frozen EfficientNet-Lite0, Lite1 and Lite2 maps of brain-cropped "
        "brain-window slices + MIL heads, pooled logistic regressions, a density forest, "
        "a blob forest and a small pixel reader trained from scratch, their logits each "
        "bounded to ±6 and summed with fixed weights "
        "(for a binary label and at most 1,000 slices); finetune: train --arch end to end "
        "with the fine-tuning options below; "
        "auto (default): small-set when it applies, else finetune",
    )
    p.add_argument(
        "--feature-cache",
        help="folder for the small-set recipe's cached feature maps (default "
        "~/.cache/ichscan/features; 'none' to keep nothing)",
    )
    p.add_argument(
        "--head-reader",
        action=argparse.BooleanOptionalAction,
        help="small-set: Lite0 reading the head crop (skull kept) as a fifth reader, beside "
        "the three on the brain crop and Lite0 on its centre zoom. Default: with it, unless "
        "a prepared cache was cut with --crop brain (no head plane); --head-reader requires "
        "it, --no-head-reader leaves it out (README: measured on the real sets)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-study",
        help="train the study-level sequence model on a "
        "trained slice model's embeddings; adds it to the bundle",
    )
    p.add_argument("model", help="model folder from ichscan train")
    p.add_argument(
        "--data",
        help="prepared cache, cut and split as the slice model's (default: the model's own "
        "cache, else the prepared cache it was trained on)",
    )
    p.add_argument(
        "--kind",
        choices=["gru", "conv"],
        default="gru",
        help="bidirectional GRU or 1D convolution over each scan's slices in order "
        "(default: %(default)s)",
    )
    p.add_argument("--hidden", type=_count, default=128, help="(default: %(default)s)")
    p.add_argument("--epochs", type=_count, default=30, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.set_defaults(func=cmd_train_study)

    p = sub.add_parser(
        "predict",
        help="per-slice and per-scan probabilities for DICOM files/folders/zips, NIfTI or PNG/JPEG",
    )
    p.add_argument(
        "inputs", type=_path, nargs="+", help="inputs; each DICOM series found is one scan"
    )
    p.add_argument("--model", required=True, help="model folder (bundle)")
    p.add_argument("--out", required=True, help="FILE.csv (+ FILE.scans.csv) or FILE.json")
    p.add_argument(
        "--format",
        choices=["csv", "json", "kaggle"],
        help="default: from the file name; kaggle = RSNA submission ID,Label",
    )
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument(
        "--onnx",
        metavar="FILE",
        help="the ONNX file for --backend onnx (default: MODEL/model.onnx, where "
        "`ichscan export MODEL` writes it); giving it implies --backend onnx",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--tta",
        choices=["bundle", "on", "off"],
        default="bundle",
        help="horizontal-flip test-time augmentation (default: as the bundle was validated)",
    )
    p.add_argument(
        "--reslice",
        type=_reslice,
        default="bundle",
        metavar="MM|bundle|none",
        help="reslice thin series to MM-thick slabs along the slice normal first (corrects "
        "gantry tilt), e.g. 5 for a model trained on 5 mm slices; bundle (default): the "
        "bundle's input slice_thickness_mm when it has one, else none; none: read every "
        "slice as it is",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="metrics.json, plots and report.html on a labelled dataset or prepared cache",
    )
    p.add_argument("model", help="model folder (bundle)")
    p.add_argument("data", type=_path, help="dataset folder (any layout) or prepared cache")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", choices=["bundle", "on", "off"], default="bundle")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "explain", help="Grad-CAM overlays, montage of the most suspicious slices, heatmaps.npy"
    )
    p.add_argument("input", type=_path, help="DICOM file/folder/zip, NIfTI or PNG/JPEG")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label", help="label to explain (default: any / the first label)")
    p.add_argument("--top", type=int, default=8, help="slices in the montage")
    p.add_argument("--series", metavar="UID", help="series to explain (default: selected)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="ONNX export of the slice (and study) model")
    p.add_argument("model", help="model folder (bundle)")
    p.add_argument(
        "--onnx",
        help="output .onnx (default: MODEL/model.onnx, where "
        "`predict --backend onnx` looks for it)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve",
        help="web app: upload scans, view slices, probabilities and heatmaps; worklist from "
        "a receiver store (REST API at /api, docs at /docs)",
    )
    p.add_argument("--model", help="model folder (bundle) to predict with")
    p.add_argument(
        "--store", metavar="DIR", help="receiver store (ichscan listen --store): shows the worklist"
    )
    p.add_argument(
        "--data",
        default="ichscan_data",
        metavar="DIR",
        help="folder for uploads, results and rendered slices (default: %(default)s)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token",
        help="require 'Authorization: Bearer TOKEN' on the API (default: $ICHSCAN_TOKEN; "
        "none: open to anyone who reaches the port)",
    )
    p.add_argument("--workers", type=int, default=1, help="scans processed at once (default: 1)")
    p.add_argument(
        "--max-upload-mb", type=float, default=1024, help="largest upload (default: %(default)s)"
    )
    p.add_argument(
        "--inline-wait",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds an upload waits for its result before answering 'queued' (default: 1)",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "listen",
        help="DICOM receiver: store pushed CT series, analyse each complete series, write "
        "result JSONs and a Structured Report per series (the worklist of ichscan serve)",
    )
    p.add_argument("--model", required=True, help="model folder (bundle)")
    p.add_argument("--ae-title", default="ICHSCAN", help="our AE title (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=11112, help="TCP port (default: %(default)s)")
    p.add_argument(
        "--store",
        default="ichscan_store",
        metavar="DIR",
        help="where instances and results go (default: %(default)s)",
    )
    p.add_argument(
        "--series-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a series is complete after S seconds without a new instance (default: 10)",
    )
    p.add_argument("--workers", type=int, default=1, help="series analysed at once (default: 1)")
    p.add_argument(
        "--allow-ae",
        metavar="A,B",
        help="accept associations only from these calling AE titles (default: any)",
    )
    p.add_argument(
        "--forward",
        metavar="AET@HOST:PORT",
        help="also send each Structured Report there (C-STORE, 3 tries)",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser(
        "demo",
        help="the main job on synthetic data: synth, info, preview, convert, train, evaluate, "
        "predict, explain",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_rank() -> bool:
    """A torchrun process other than rank 0: every rank runs the same checks on the same
    data, so its error is rank 0's too, and it leaves with the same code without repeating
    the line."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def _error(line: str) -> None:
    if not _quiet_rank():
        print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse's usage errors too: the other ranks exit 2 with rank 0, without the lines.
    quiet = redirect_stderr(io.StringIO()) if _quiet_rank() else nullcontext()
    with quiet:
        args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except IchscanError as exc:
        _error(f"ichscan {args.command}: error: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        # The file system's refusals (an output folder that exists, a path that cannot be
        # written, a full disk) are the user's to fix: one line, not a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"ichscan {args.command}: error: {where}{exc.strerror or exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("ichscan: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
