"""What a training run reads: a layout prepared into MODEL_DIR/cache remembers what the
adapter knew about it (layout, label level, how its scans were cut), and so does a bundle."""

from __future__ import annotations

from pathlib import Path

from ichscan.data.cache import PreparedCache
from ichscan.data.synth import write_synthetic
from ichscan.train.data import resolve_training_data


def test_a_layout_prepared_for_training_keeps_its_label_level_and_slabs(tmp_path: Path) -> None:
    """CQ500 reads are per scan: train-study must not take them for slice labels, and the
    bundle must say the model read 5 mm slabs."""
    from ichscan.train.loop import TrainConfig

    data = tmp_path / "cq"
    write_synthetic(data, n_scans=2, layout="cq500", shape=(6, 32, 32), seed=3)
    config = TrainConfig(data=str(data), out=str(tmp_path / "m"), size=16, folds=2, progress=False)
    training = resolve_training_data(config)
    cache = PreparedCache(training.cache_root)
    assert cache.facts["manifest"]["layout"] == "cq500"
    assert cache.label_level == "scan"
    assert training.summary["label_level"] == "scan" and training.summary["slab_mm"] == 5.0

    again = resolve_training_data(TrainConfig(data=str(training.cache_root), out="x", size=16))
    assert again.summary["label_level"] == "scan" and again.summary["slab_mm"] == 5.0


def test_extra_train_dicom_is_cut_at_the_main_sets_thickness(tmp_path: Path) -> None:
    """--extra-train CQ500 beside a native set used to give series rows prepare refused
    (their slab thickness was dropped); the extra set is read at the main set's thickness."""
    from ichscan.train.loop import TrainConfig

    rsna, cq500, dicom = tmp_path / "rsna", tmp_path / "cq", tmp_path / "dicom"
    write_synthetic(rsna, n_scans=2, layout="rsna", shape=(4, 32, 32), seed=1)
    write_synthetic(cq500, n_scans=2, layout="cq500", thickness=2.5, shape=(6, 32, 32), seed=2)
    write_synthetic(dicom, n_scans=1, layout="dicom", thickness=2.5, shape=(6, 32, 32), seed=4)
    common = {"size": 16, "folds": 2, "progress": False, "recipe": "finetune"}

    native = TrainConfig(
        data=str(rsna),
        out=str(tmp_path / "a"),
        labels="binary",
        extra_train=(str(cq500),),
        **common,
    )
    index = PreparedCache(resolve_training_data(native).cache_root).index
    assert set(index.loc[index["fold"] == -2, "kind"]) == {"dicom"}

    slabs = TrainConfig(
        data=str(cq500),
        out=str(tmp_path / "b"),
        labels="binary",
        extra_train=(str(dicom),),
        **common,
    )
    index = PreparedCache(resolve_training_data(slabs).cache_root).index
    assert set(index.loc[index["fold"] == -2, "kind"]) == {"series"}
