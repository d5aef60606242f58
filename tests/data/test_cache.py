"""The shard cache reads back what prepare wrote, as memory-mapped views, and refuses what
is not a complete cache with one clear line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichscan.data.cache import (
    FACTS_FILE,
    PreparedCache,
    ShardWriter,
    read_facts,
    shard_path,
    temp_path,
)
from ichscan.data.manifest import normalise
from ichscan.data.prepare import prepare
from ichscan.errors import InputError
from ichscan.labels import RSNA

SIZE = 16
N = 5


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A cache of five PNG rows in shards of two; pixel value = 40 * row + 10 everywhere."""
    rows = []
    for i in range(N):
        path = tmp_path / f"s{i}.png"
        Image.fromarray(np.full((SIZE, SIZE), 40 * i + 10, dtype=np.uint8)).save(path)
        rows.append(
            {
                "path": str(path),
                "kind": "image",
                "image_id": f"s{i}",
                "patient_id": "p",
                "any": i % 2,
                "subdural": -1 if i == 4 else 0,
            }
        )
    out = tmp_path / "cache"
    prepare(
        normalise(pd.DataFrame(rows), RSNA),
        out,
        size=SIZE,
        shard_size=2,
        workers=1,
        progress=False,
    )
    return out


def test_reads_every_slice_as_a_read_only_view(cache_dir: Path) -> None:
    cache = PreparedCache(cache_dir)
    assert len(cache) == N
    for i in range(N):
        arr = cache[i]
        assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8
        assert (arr == 40 * i + 10).all()
        assert not arr.flags.writeable
        assert isinstance(arr.base, np.ndarray)  # a view of the shard map, not a copy
    np.testing.assert_array_equal(cache[-1], cache[N - 1])
    with pytest.raises(IndexError):
        cache[N]
    assert [int(a[0, 0, 0]) for a in cache] == [10, 50, 90, 130, 170]  # iteration stops


def test_labels_facts_and_index(cache_dir: Path) -> None:
    cache = PreparedCache(cache_dir)
    labels = cache.labels()
    assert labels.shape == (N, len(RSNA.labels)) and labels.dtype == np.int8
    assert labels[:, RSNA.labels.index("any")].tolist() == [0, 1, 0, 1, 0]
    assert labels[4, RSNA.labels.index("subdural")] == -1
    assert cache.label_names == RSNA.labels
    assert cache.ok.all()
    facts = cache.facts
    assert [w["name"] for w in facts["windows"]] == ["brain", "subdural", "bone"]
    assert (facts["size"], facts["channels"], facts["mode"]) == (SIZE, 3, "linear")
    assert facts["layout"]["shard_size"] == 2
    assert facts["counts"]["rows"] == N and facts["counts"]["shards"] == 3
    assert facts["ichscan_version"] and facts["created"]
    assert cache.index["image_id"].tolist() == [f"s{i}" for i in range(N)]


def test_pickling_drops_the_maps(cache_dir: Path) -> None:
    cache = PreparedCache(cache_dir)
    cache[0]
    blob = pickle.dumps(cache)
    assert len(blob) < 20_000  # the index, not the pixels
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[3], cache[3])


def test_is_cache_and_clear_errors(cache_dir: Path, tmp_path: Path) -> None:
    assert PreparedCache.is_cache(cache_dir)
    assert not PreparedCache.is_cache(tmp_path / "nowhere")
    assert not PreparedCache.is_cache(tmp_path / "s0.png")
    with pytest.raises(InputError, match="not a prepared cache"):
        PreparedCache(tmp_path)
    with pytest.raises(InputError, match="not found"):
        PreparedCache(tmp_path / "nowhere")

    facts_path = cache_dir / FACTS_FILE
    facts = json.loads(facts_path.read_text())
    facts_path.write_text(json.dumps({**facts, "format_version": 99}))
    with pytest.raises(InputError, match="format version 99"):
        read_facts(cache_dir)
    facts_path.write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        PreparedCache(cache_dir)


def test_a_shard_of_the_wrong_shape_is_named(cache_dir: Path) -> None:
    np.save(shard_path(cache_dir, 1), np.zeros((2, SIZE, SIZE, 1), dtype=np.uint8))
    cache = PreparedCache(cache_dir)
    cache[0]
    with pytest.raises(InputError, match=r"shard-00001\.npy"):
        cache[2]


def test_shard_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.npy"
    writer = ShardWriter(path, 2, 4, 3)
    writer.write(np.full((4, 4, 3), 7, dtype=np.uint8))
    assert temp_path(path).exists() and not path.exists()
    with pytest.raises(ValueError, match="does not fit"):
        writer.write(np.zeros((4, 4, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="wrote 1 of 2"):
        writer.close()
    assert not temp_path(path).exists() and not path.exists()

    writer = ShardWriter(path, 2, 4, 3)
    for value in (1, 2):
        writer.write(np.full((4, 4, 3), value, dtype=np.uint8))
    writer.close()
    loaded = np.load(path)
    assert loaded.shape == (2, 4, 4, 3) and loaded[1].max() == 2
    assert not temp_path(path).exists()


def _index(scans: dict[str, list[float]]) -> pd.DataFrame:
    rows = [(scan, z) for scan, positions in scans.items() for z in positions]
    return pd.DataFrame(rows, columns=["scan_id", "position_mm"])


def test_slice_spacing_is_what_the_training_scans_had() -> None:
    """Prediction reslices a thinner series to it, so it must be the real spacing: an even
    run of slices counts, a few slices sampled from a series (their gaps are no spacing),
    single slices and images (no position) do not."""
    from ichscan.data.cache import slice_spacing_mm

    five = [0.0, 5.0, 10.0, 15.0]
    assert slice_spacing_mm(_index({"a": five, "b": [2.5, 7.5, 12.5]})) == 5.0
    assert slice_spacing_mm(_index({"a": five[::-1]})) == 5.0  # any order, either direction
    assert slice_spacing_mm(_index({"thin": [0, 1.25, 2.5, 3.75], "a": five, "b": five})) == 5.0
    assert slice_spacing_mm(_index({"sampled": [0.0, 5.0, 25.0, 60.0]})) is None
    assert slice_spacing_mm(_index({"one": [3.0], "two": [0.0, 5.0]})) is None
    assert slice_spacing_mm(_index({"png": [np.nan, np.nan, np.nan]})) is None


def test_an_unsupported_format_names_the_flag_that_remakes_it(cache_dir: Path) -> None:
    path = cache_dir / FACTS_FILE
    facts = json.loads(path.read_text())
    path.write_text(json.dumps({**facts, "format_version": 99}))
    with pytest.raises(InputError, match="--overwrite") as error:
        read_facts(cache_dir)
    assert "--force" not in str(error.value)


def test_label_level_is_read_from_cache_json(cache_dir: Path) -> None:
    """Scan-level reads (CQ500, NIfTI without masks) copied onto every slice must not be
    taken for slice labels: train-study and evaluate ask the cache which they are."""
    assert PreparedCache(cache_dir).label_level == "slice"  # nothing recorded: per slice
    path = cache_dir / FACTS_FILE
    facts = json.loads(path.read_text())
    facts["manifest"] = {**facts["manifest"], "layout": "cq500", "label_level": "scan"}
    path.write_text(json.dumps(facts))
    assert PreparedCache(cache_dir).label_level == "scan"


def test_an_older_cache_takes_its_label_level_from_the_manifest_beside_it(
    cache_dir: Path,
) -> None:
    """Caches made by `ichscan prepare` before cache.json carried the level have the
    manifest.parquet that the same command wrote beside them, which does."""
    from ichscan.data.manifest import write_manifest

    index = pd.read_parquet(cache_dir / "index.parquet")
    write_manifest(index, cache_dir / "manifest.parquet", RSNA, layout="nifti", label_level="scan")
    assert PreparedCache(cache_dir).label_level == "scan"
