"""What several benchmarks build the same way: a random-weight model bundle (only time is
measured with it) and a thin synthetic CT series written once and reused."""

from __future__ import annotations

from pathlib import Path


def random_bundle(
    root: Path,
    size: int,
    slice_thickness_mm: float | None = None,
    architecture: str = "resnet18",
) -> Path:
    """An RSNA slice model (ResNet18 unless told) at ``size`` px with random weights, saved
    once at ``root`` (reused when already there). ``slice_thickness_mm``: the bundle
    reslices thin series to it, as a thin-series model does."""
    from ichscan.labels import RSNA
    from ichscan.models.bundle import input_spec, new_config, save_bundle
    from ichscan.models.slice_model import SliceModel

    if (root / "bundle.json").exists():
        return root
    model = SliceModel(architecture, len(RSNA.labels), pretrained="none", dropout=0.0).eval()
    spec = input_spec(
        ("brain", "subdural", "bone"),
        size,
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        slice_thickness_mm=slice_thickness_mm,
    )
    config = new_config(
        architecture=architecture,
        weights_provenance="random initialisation (benchmark: time only)",
        label_set=RSNA,
        input_spec=spec,
        dropout=0.0,
    )
    return save_bundle(root, config, [model])


def thin_series(root: Path, n_slices: int, thin_mm: float, compression: str) -> Path:
    """The folder of one synthetic 512² head CT series (subdural + parenchymal bleeds),
    written at ``root`` the first time."""
    from ichscan.data.synth import write_synthetic

    if not (root / "README.txt").exists():
        if root.exists():
            raise SystemExit(f"{root} is incomplete; delete it and run again")
        print(f"writing the {n_slices}-slice {compression} series (once)...", flush=True)
        write_synthetic(
            root,
            n_scans=1,
            seed=5,
            layout="dicom",
            thickness=thin_mm,
            compression=compression,
            shape=(n_slices, 512, 512),
            findings=["subdural", "intraparenchymal"],
        )
    [folder] = sorted({p.parent for p in root.glob("*/*/*.dcm")})
    return folder
