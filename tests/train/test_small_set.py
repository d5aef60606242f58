"""The small-set recipe end to end on synthetic brain-window PNGs: it is what `ichscan train`
picks for a small binary set, its feature maps are cached and reused, the bundle predicts
through the ordinary predictor exactly what training scored, and its heatmaps land on the
slice's own pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ichscan.data.synth import write_synthetic
from ichscan.labels import BINARY, RSNA
from ichscan.threads import torch_threads
from ichscan.train.data import DataError, _auto_small_set, _small_set_applies
from ichscan.train.loop import TrainConfig, train

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def png_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "png"
    write_synthetic(out, n_scans=16, layout="png", seed=5)
    return out


def train_small(data: Path, out: Path, features: Path, **options: object) -> dict:
    with torch_threads(1):
        return train(
            TrainConfig(
                data=str(data),
                out=str(out),
                labels="binary",
                folds=4,
                feature_cache=str(features),
                progress=False,
                tensorboard=False,
                **options,  # type: ignore[arg-type]
            )
        )


@pytest.fixture(scope="module")
def trained(png_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The brain readers alone (--no-head-reader): three networks on the brain crop, Lite0 on
    its centre zoom."""
    root = tmp_path_factory.mktemp("small-model")
    summary = train_small(png_set, root / "model", root / "features", head_reader=False)
    return root / "model", root / "features", summary


@pytest.fixture(scope="module")
def trained_head(trained, png_set: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same set with the default options (the head reader too), sharing the brain-only
    model's feature cache."""
    _, features, _ = trained
    root = tmp_path_factory.mktemp("small-model-head")
    summary = train_small(png_set, root / "model", features)
    return root / "model", features, summary


def test_auto_picks_small_set_for_small_binary_sets_only() -> None:
    assert _small_set_applies(150, BINARY)
    assert not _small_set_applies(150, RSNA)
    assert not _small_set_applies(50_000, BINARY)
    # A backbone asked for by name is fine-tuned, whatever the set.
    assert _auto_small_set(TrainConfig(data="d", out="o"), 150, BINARY)
    assert not _auto_small_set(TrainConfig(data="d", out="o", architecture="resnet18"), 150, BINARY)


def test_bundle_records_the_recipe_and_its_preprocessing(trained) -> None:
    model, _, summary = trained
    config = json.loads((model / "bundle.json").read_text())
    assert config["recipe"] == "small-set"
    assert config["input"]["crop"] == "brain"
    assert config["input"]["size"] == 320
    assert config["input"]["tta"] == ["identity", "hflip"]
    assert 0 < config["thresholds"]["hemorrhage"] < 1
    assert config["threshold_method"] == "calibrated on 4-fold inner CV of the training slices"
    # 16 slices through each of the three backbones and Lite0 again on the centre zoom, each
    # cached under its own key
    lites = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert config["small_set"]["backbones"] == lites
    assert config["small_set"]["readers"] == [
        *({"backbone": b, "crop": "brain"} for b in lites),
        {"backbone": "efficientnet_lite0", "crop": "centre"},
    ]
    assert config["small_set"]["centre_share"] == 0.6
    assert config["architecture"] == "+".join(lites) + "+efficientnet_lite0@centre"
    # per reader a MIL head and a regression, then the density and the blob forest, then the
    # pixel reader
    assert len(config["small_set"]["member_weights"]) == 11
    assert config["small_set"]["member_weights"][-3:] == [0.25, 0.25, 0.5]
    assert config["small_set"]["pixel_reader"] is True
    assert config["small_set"]["blob_features"] == 22
    assert config["small_set"]["vote_bound"] == 6.0
    assert config["training"]["feature_maps_computed"] == 64
    assert summary["metrics"]["validation_slices"] == 4


def test_head_reader_adds_lite0_on_the_head_crop(trained_head) -> None:
    """By default the head crop is cut beside the brain crop and a fifth reader trains on
    it; the brain and centre readers' maps come from the cache the brain-only model filled."""
    model, features, _ = trained_head
    config = json.loads((model / "bundle.json").read_text())
    assert config["input"]["crop"] == "brain+head"
    lites = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert config["small_set"]["backbones"] == lites
    assert config["small_set"]["readers"] == [
        *({"backbone": b, "crop": "brain"} for b in lites),
        {"backbone": "efficientnet_lite0", "crop": "head"},
        {"backbone": "efficientnet_lite0", "crop": "centre"},
    ]
    assert config["architecture"] == "+".join(lites) + (
        "+efficientnet_lite0@head+efficientnet_lite0@centre"
    )
    assert len(config["small_set"]["member_weights"]) == 13
    assert config["training"]["feature_maps_computed"] == 16
    assert len(list(features.rglob("*.npz"))) == 80


@pytest.mark.parametrize(("fixture", "readers"), [("trained", 4), ("trained_head", 5)])
def test_a_second_fold_reuses_the_cached_feature_maps(
    fixture: str, readers: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """From the first fold's prepared cache, with no options: a brain+head cache trains the
    head reader too (it was cut for it), and every map comes from the feature cache."""
    model, features, _ = request.getfixturevalue(fixture)
    summary = train_small(model / "cache", tmp_path / "fold1", features, fold=1)
    assert summary["recipe"] == "small-set"
    assert summary["training"]["feature_maps_computed"] == 0
    assert len(summary["small_set"]["readers"]) == readers


def test_the_same_seed_trains_the_same_bundle_bit_for_bit(trained, tmp_path: Path) -> None:
    """Trained again on the same rows with the same seed, from the first run's prepared
    cache: every member's weights and the chosen threshold are identical. The recipe fits
    the inner-CV models before the final one; they must leave nothing behind that the
    final fit reads (research/recipe_lab/SESSION25.md measured it on the real head_ct)."""
    model, features, summary = trained
    again = train_small(model / "cache", tmp_path / "again", features, head_reader=False)
    assert again["thresholds"] == summary["thresholds"]
    a = torch.load(model / "slice-0.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "again" / "slice-0.pt", map_location="cpu", weights_only=False)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


@pytest.mark.parametrize("fixture", ["trained", "trained_head"])
def test_predict_gives_what_cross_validation_scored(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    from ichscan.data.cache import PreparedCache
    from ichscan.infer.predictor import Predictor
    from ichscan.io.load import load
    from ichscan.train.cv import bundle_probabilities

    model, _, _ = request.getfixturevalue(fixture)
    cache = PreparedCache(model / "cache")
    row = 3
    image = Path(cache.index["path"].iloc[row])
    via_cache = bundle_probabilities(model, cache, np.array([row]), torch.device("cpu"))[0, 0]
    predictor = Predictor(model, "cpu")
    via_predict = predictor.predict_scan(load(image, image_window="brain")).scan_probs[0]
    assert 0.0 <= via_predict <= 1.0
    assert via_predict == pytest.approx(via_cache, abs=1e-5)


def test_heatmap_sits_inside_the_head_crop(trained, png_set: Path, tmp_path: Path) -> None:
    from ichscan.infer.explain import explain
    from ichscan.io.image import read_grey
    from ichscan.preprocess.head_crop import crop_box

    model, _, _ = trained
    image = sorted((png_set / "images").glob("*.png"))[0]
    result = explain(image, model, tmp_path / "explain", device="cpu")
    heat = np.load(result.heatmaps)
    grey = read_grey(image)
    assert heat.shape == (1, *grey.shape)
    assert heat.max() == pytest.approx(1.0)
    top, left, side = crop_box(grey)
    outside = np.ones(grey.shape, bool)
    outside[max(top, 0) : top + side, max(left, 0) : left + side] = False
    assert not heat[0][outside].any()


def test_small_set_refuses_a_multi_label_set(png_set: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="trains one label"):
        train(
            TrainConfig(
                data=str(png_set),
                out=str(tmp_path / "m"),
                recipe="small-set",
                progress=False,
                tensorboard=False,
            )
        )


def test_forced_small_set_on_a_large_set_is_refused(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ichscan.train import small_set

    monkeypatch.setattr(small_set, "HARD_MAX_SLICES", 10)
    with pytest.raises(small_set.SmallSetError, match=r"about 0\.1 GB .*use --recipe finetune"):
        train(
            TrainConfig(
                data=str(png_set),
                out=str(tmp_path / "m"),
                labels="binary",
                recipe="small-set",
                progress=False,
                tensorboard=False,
            )
        )


def older_model(full, readers, maps):
    """A SmallSetModel of ``full``'s first len(readers) readers' trained members and its
    density forest, without a blob forest: what bundles before session 12 held."""
    from ichscan.models.small_set import SmallSetModel

    model = SmallSetModel(
        full.mil[0].sources, 0, tuple(full.forest.left.shape), readers=readers, maps=maps
    )
    for i in range(len(readers)):
        model.mil[i], model.logistic[i] = full.mil[i], full.logistic[i]
    model.forest = full.forest
    return model


def test_a_bundle_from_before_the_second_backbone_still_predicts(trained, tmp_path: Path) -> None:
    """Lite0-only bundles (no "backbones" in bundle.json, one module where there is now a
    list) load as a one-backbone ensemble and predict what they did."""
    from ichscan.models.bundle import load_bundle
    from ichscan.models.small_set import Reader

    model, _, _ = trained
    config = json.loads((model / "bundle.json").read_text())
    new = load_bundle(model).members[0]
    lite0 = older_model(new, [Reader("efficientnet_lite0")], [new.maps[0]])
    old_layout = {
        k.replace("maps.0.", "maps.")
        .replace("mil.0.", "mil.")
        .replace("logistic.0.", "logistic."): v
        for k, v in lite0.state_dict().items()
    }
    old = tmp_path / "old"
    old.mkdir()
    torch.save(old_layout, old / config["members"][0])
    del config["small_set"]["backbones"], config["small_set"]["readers"]
    forget_blob_forest(config)
    config["small_set"]["member_weights"] = [0.5, 0.25, 0.25]
    (old / "bundle.json").write_text(json.dumps(config))
    loaded = load_bundle(old).members[0]
    assert loaded.backbones == ("efficientnet_lite0",)
    x = torch.randint(0, 255, (2, 3, 320, 320), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), lite0.eval()(x), atol=1e-5)


def forget_blob_forest(config: dict) -> None:
    """A bundle.json as sessions before 12 wrote it: no blob forest, no bound on the votes,
    no pixel reader."""
    for key in ("blob_forest_shape", "blob_features", "max_blobs", "vote_bound", "pixel_reader"):
        del config["small_set"][key]


def as_older_bundle(model: Path, tmp_path: Path, state: dict, edit):
    """The bundle at ``model`` rewritten as an older version saved it: weights ``state``,
    bundle.json changed by ``edit``; loaded back as this version loads it."""
    from ichscan.models.bundle import load_bundle

    config = json.loads((model / "bundle.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / config["members"][0])
    edit(config)
    (old / "bundle.json").write_text(json.dumps(config))
    return load_bundle(old).members[0]


def cached_brains(model: Path, n: int = 4) -> torch.Tensor:
    """The first ``n`` prepared slices of the model's cache, the brain in every channel."""
    from ichscan.data.cache import PreparedCache

    cache = np.stack([np.asarray(PreparedCache(model / "cache")[i]) for i in range(n)])
    return torch.from_numpy(cache.transpose(0, 3, 1, 2)[:, [0, 0, 0]].copy())


def test_a_bundle_from_before_the_blob_forest_still_predicts(trained, tmp_path: Path) -> None:
    """Session-11 bundles (readers, a centre reader, no blob forest) load without one and
    predict their own unbounded weighted sum; the new model bounds each vote, blob forest's
    included."""
    from ichscan.models.bundle import load_bundle
    from ichscan.models.small_set import member_weights

    model, _, _ = trained
    full = load_bundle(model).members[0]
    old_model = older_model(full, full.readers, list(full.maps))

    def edit(config: dict) -> None:
        forget_blob_forest(config)
        config["small_set"]["member_weights"] = member_weights(len(full.readers))

    loaded = as_older_bundle(model, tmp_path, old_model.state_dict(), edit)
    assert not loaded.has_blob_forest and loaded.embed_dim == 2 * len(full.readers) + 1
    x = cached_brains(model)
    weights = torch.tensor(member_weights(len(full.readers), True, True))
    with torch.no_grad():
        new_embedding = full.embed(x)
        assert torch.allclose(loaded.embed(x), new_embedding[:, :-2], atol=1e-5)
        assert torch.allclose(loaded(x)[:, 0], new_embedding[:, :-2] @ weights[:-2], atol=1e-4)
        bounded = new_embedding.clamp(-6.0, 6.0) @ weights
        assert torch.allclose(full(x)[:, 0], bounded, atol=1e-4)


def test_a_bundle_from_before_the_pixel_reader_still_predicts(trained, tmp_path: Path) -> None:
    """Bundles of sessions 12-18 (blob forest, bounded votes, no pixel reader) load without
    one and predict the bounded sum of their own members; the pixel reader adds a vote."""
    from ichscan.models.bundle import load_bundle
    from ichscan.models.small_set import member_weights

    model, _, _ = trained
    full = load_bundle(model).members[0]
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("pixel_reader.")}
    state["head.weight"] = state["head.weight"][:, :-1]

    def edit(config: dict) -> None:
        del config["small_set"]["pixel_reader"]
        config["small_set"]["member_weights"] = member_weights(len(full.readers), True)

    loaded = as_older_bundle(model, tmp_path, state, edit)
    assert not loaded.has_pixel_reader and loaded.embed_dim == 2 * len(full.readers) + 2
    x = cached_brains(model)
    weights = torch.tensor(member_weights(len(full.readers), True, True))
    with torch.no_grad():
        new_embedding = full.embed(x)
        assert torch.allclose(loaded.embed(x), new_embedding[:, :-1], atol=1e-5)
        bounded = new_embedding.clamp(-6.0, 6.0)
        assert torch.allclose(loaded(x)[:, 0], bounded[:, :-1] @ weights[:-1], atol=1e-4)
        assert torch.allclose(full(x)[:, 0], bounded @ weights, atol=1e-4)


def edited_copy(model: Path, tmp_path: Path, **small_set: object) -> Path:
    """A copy of the bundle at ``model`` whose bundle.json ``small_set`` section has the
    given values: a hand-edited or other-version bundle."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("cache"))
    config = json.loads((copy / "bundle.json").read_text())
    config["small_set"].update(small_set)
    (copy / "bundle.json").write_text(json.dumps(config))
    return copy


def test_a_bundle_with_other_blob_features_is_refused(trained, tmp_path: Path) -> None:
    """A blob forest trained on another version's blob tables would read the wrong columns:
    one clear error naming the bundle, not wrong probabilities."""
    from ichscan.models.bundle import BundleError, load_bundle

    copy = edited_copy(trained[0], tmp_path, blob_features=23)
    with pytest.raises(BundleError, match=r"bundle\.json.*blobs of 23 features.*16 of 22"):
        load_bundle(copy)


@pytest.mark.parametrize("bound", [0, -6, "6", True, None])
def test_a_bundle_with_a_broken_vote_bound_is_refused(trained, tmp_path: Path, bound) -> None:
    """A hand-edited bound of 0 would make every slice 0.5, a negative one every slice the
    same: one clear error naming the bundle instead. Null, like no key at all (bundles from
    before session 13), loads unbounded."""
    from ichscan.models.bundle import BundleError, load_bundle

    copy = edited_copy(trained[0], tmp_path, vote_bound=bound)
    if bound is None:
        assert load_bundle(copy).members[0].head.bound is None
        return
    with pytest.raises(BundleError, match=r"bundle\.json.*vote_bound must be a positive"):
        load_bundle(copy)


@pytest.mark.parametrize("networks", [2, 3])
def test_a_bundle_from_before_readers_still_predicts(
    trained, tmp_path: Path, networks: int
) -> None:
    """Lite0 + Lite1 bundles (session 4) and Lite0 + Lite1 + Lite2 bundles (sessions 5-6),
    which list backbones but no readers, load with their own networks and member weights and
    predict what that ensemble does."""
    from ichscan.models.bundle import load_bundle
    from ichscan.models.small_set import Reader, member_weights

    model, _, _ = trained
    config = json.loads((model / "bundle.json").read_text())
    full = load_bundle(model).members[0]
    backbones = list(full.backbones[:networks])
    old_model = older_model(full, [Reader(b) for b in backbones], list(full.maps[:networks]))
    old = tmp_path / "old"
    old.mkdir()
    torch.save(old_model.state_dict(), old / config["members"][0])
    config["small_set"]["backbones"] = backbones
    del config["small_set"]["readers"]
    forget_blob_forest(config)
    config["small_set"]["member_weights"] = member_weights(networks)
    (old / "bundle.json").write_text(json.dumps(config))
    loaded = load_bundle(old).members[0]
    assert loaded.backbones == tuple(backbones)
    assert loaded.readers == tuple(Reader(b) for b in backbones)
    brain = torch.randint(0, 255, (2, 1, 320, 320), dtype=torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert torch.allclose(loaded(brain), old_model.eval()(brain), atol=1e-5)
        if networks < len(full.readers):
            assert not torch.allclose(loaded(brain), full(brain), atol=1e-3)


def test_each_reader_takes_its_own_crop(trained_head) -> None:
    """Channel 0 (the brain crop) feeds the three brain readers, the centre reader (through
    its zoom) and the density forest, channel 1 (the head crop) the head reader alone: a
    change to one plane moves only the members that read it. The centre reader reads the
    middle of the brain only: a change at the brain's edge leaves it alone."""
    from ichscan.models.bundle import load_bundle

    model, _, _ = trained_head
    ensemble = load_bundle(model).members[0]
    assert [r.crop for r in ensemble.readers] == ["brain", "brain", "brain", "head", "centre"]
    planes = torch.randint(1, 255, (2, 2, 320, 320), dtype=torch.uint8)
    x = torch.cat([planes, planes[:, :1]], dim=1)  # what the predictor builds: brain, head, brain
    other_head, other_brain, other_edge = x.clone(), x.clone(), x.clone()
    other_head[:, 1] = torch.randint(0, 255, (2, 320, 320), dtype=torch.uint8)
    other_brain[:, [0, 2]] //= 2  # darker: the density features move too
    other_edge[:, 0, :40] = 200  # outside the centre zoom's square, inside the brain's box
    # MIL head and regression, embed's order (then the density forest, the blob forest and
    # the pixel reader, which all read the brain plane)
    head_members, centre_members = [3, 8], [4, 9]
    with torch.no_grad():
        base, moved_head, moved_brain, moved_edge = (
            ensemble.embed(v) for v in (x, other_head, other_brain, other_edge)
        )

    def changed(moved: torch.Tensor) -> list[int]:
        return torch.nonzero(~torch.isclose(base, moved, atol=1e-6).all(0)).flatten().tolist()

    assert changed(moved_head) == head_members
    assert changed(moved_brain) == sorted(set(range(13)) - set(head_members))
    edge = changed(moved_edge)
    assert not set(edge) & set(centre_members + head_members)
    assert {0, 1, 2, 5, 6, 7} <= set(edge)


def test_small_set_refuses_a_weights_file(png_set: Path, tmp_path: Path) -> None:
    from ichscan.train.small_set import SmallSetError

    with pytest.raises(SmallSetError, match="--pretrained PATH is for --recipe finetune"):
        train(
            TrainConfig(
                data=str(png_set),
                out=str(tmp_path / "m"),
                labels="binary",
                pretrained=str(tmp_path / "weights.pt"),
                feature_cache="none",
                progress=False,
                tensorboard=False,
            )
        )


@pytest.mark.parametrize(("fixture", "members"), [("trained", 11), ("trained_head", 13)])
def test_onnx_export_of_a_small_set_bundle_predicts_what_torch_does(
    fixture: str, members: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The default recipe's bundle exports: onnxruntime, fed the density features, the
    centre zoom and the blob tables by OnnxPredictor, gives the PyTorch probabilities on
    real-shaped slices, at a batch size the export never saw, and through the ordinary
    predictor."""
    import shutil

    import onnx

    from ichscan.data.cache import PreparedCache
    from ichscan.infer.onnx_export import OnnxPredictor, export_onnx
    from ichscan.infer.predictor import Predictor
    from ichscan.io.load import load
    from ichscan.models.bundle import load_bundle

    model, _, _ = request.getfixturevalue(fixture)
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("cache", "*.onnx"))
    path = export_onnx(copy)
    exported = onnx.load(str(path))
    graph = exported.graph
    assert [i.name for i in graph.input] == ["image", "density", "centre", "blobs"]
    # The zoom OnnxPredictor cuts is the one the centre reader was trained on.
    assert {p.key: p.value for p in exported.metadata_props}["ichscan_centre_share"] == "0.6"
    assert not any(n.op_type in ("Loop", "If") for n in graph.node)

    cache = PreparedCache(model / "cache")
    # The predictor's input: the cached brain in every channel, or brain, head, brain.
    planes = np.stack([np.asarray(cache[i]) for i in range(3)]).transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(np.concatenate([planes, planes[:, :1], planes[:, :1]], axis=1)[:, :3])
    with torch.no_grad():
        want = torch.sigmoid(load_bundle(copy).members[0](torch.from_numpy(x))).numpy()
    got, embedding = OnnxPredictor(path, tta=False, batch_size=3).slices(x)
    assert embedding.shape == (3, members)
    np.testing.assert_allclose(got, want, atol=1e-4)

    image = Path(cache.index["path"].iloc[3])
    scan = load(image, image_window="brain")
    via_torch = Predictor(copy, "cpu").predict_scan(scan).scan_probs
    via_onnx = Predictor(copy, backend="onnx").predict_scan(scan).scan_probs
    np.testing.assert_allclose(via_onnx, via_torch, atol=1e-4)


@pytest.mark.gpu
def test_feature_maps_on_a_gpu_equal_the_cpus_and_come_back_to_it() -> None:
    """The frozen networks run on the GPU; the maps land on the CPU for the fits, equal to
    the CPU's to float16 storage and TF32 rounding (the cache is shared between the two)."""
    from ichscan.models.small_set import LiteMaps
    from ichscan.train.small_set import FeatureMaps

    torch.manual_seed(0)
    extractor = LiteMaps("efficientnet_lite0", pretrained="none")
    greys = (np.random.default_rng(0).random((5, 320, 320)) * 255).astype(np.uint8)
    cpu, _ = FeatureMaps.compute(greys, None, extractor, progress=False)
    gpu, _ = FeatureMaps.compute(greys, None, extractor.to("cuda"), progress=False, batch=32)
    assert gpu.fine.device.type == gpu.deep.device.type == "cpu"
    torch.testing.assert_close(gpu.fine.float(), cpu.fine.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gpu.deep.float(), cpu.deep.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_is_one_clear_error(
    png_set: Path, tmp_path: Path
) -> None:
    from ichscan.train.loop import TrainingError

    with pytest.raises(TrainingError, match="no CUDA device is available"):
        train_small(png_set, tmp_path / "model", tmp_path / "features", device="cuda")


def blob_slices(
    labels: list[int], rng: np.random.Generator, calcium_share: float = 0.7
) -> np.ndarray:
    """[2, N, MAX_BLOBS, F] blob tables: each positive slice has one "blood" blob (70 grey
    levels over the median, unsaturated); positive and negative slices alike have blobs of
    "calcium" (saturated) and of noise. The mirror view is the same table."""
    from ichscan.models.blobs import MAX_BLOBS, N_BLOB_FEATURES

    tables = np.zeros((len(labels), MAX_BLOBS, N_BLOB_FEATURES), np.float32)
    for i, label in enumerate(labels):
        kinds = ["blood"] * label + ["calcium"] * int(rng.random() < calcium_share) * 2
        kinds += ["noise"] * int(rng.integers(0, 4))
        for k, kind in enumerate(kinds):
            row = np.zeros(N_BLOB_FEATURES)
            row[0] = rng.uniform(2.1, 6)  # log area: present, and says nothing
            row[2] = {"blood": 70, "calcium": 120, "noise": 45}[kind] + rng.normal(0, 5)
            row[5] = 1.0 if kind == "calcium" else 0.0  # saturated share
            tables[i, k] = row
    return np.stack([tables, tables])


def test_the_blob_forest_learns_blood_from_slice_labels_alone() -> None:
    """Multiple-instance learning: calcium sits in positive slices too, so after the first
    round it looks half like blood; the second round keeps only each positive slice's most
    blood-like blobs, and calcium ends up scored as what it is. A slice scores its most
    blood-like blob; a slice without blobs scores as clipped 0."""
    from ichscan.models.small_set import blob_logit
    from ichscan.train.small_set import fit_blob_forest

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 40)
    tables = blob_slices(list(y), rng)
    forest = fit_blob_forest(tables, np.arange(60), y, seed=0)
    held = np.arange(60, 80)
    with torch.no_grad():
        z = blob_logit(forest, torch.from_numpy(tables[0, held])).numpy()
        calcium = tables[0][tables[0, :, :, 5] == 1][None]  # every calcium blob, one "slice" each
        calcium_p = forest(torch.from_numpy(calcium[0])).numpy()
        empty = blob_logit(forest, torch.zeros(1, *tables.shape[2:])).item()
    assert z[y[held] == 1].min() > z[y[held] == 0].max()
    assert np.median(calcium_p) < 0.2
    assert empty == pytest.approx(np.log(1e-4 / (1 - 1e-4)), abs=1e-3)


def test_the_blob_forest_trains_without_blobs_or_with_one_class() -> None:
    """A set without a bright blob (or with blobs in one class only) still trains: a forest
    that finds no blood, or one that scores what it saw."""
    from ichscan.models.small_set import blob_logit
    from ichscan.train.small_set import fit_blob_forest

    y = np.array([0, 1, 0, 1])
    none = np.zeros((2, 4, 16, 22), np.float32)
    forest = fit_blob_forest(none, np.arange(4), y, seed=0)
    with torch.no_grad():
        assert (blob_logit(forest, torch.from_numpy(none[0])) < -9).all()
    one_class = blob_slices([0, 0, 0, 0], np.random.default_rng(1), calcium_share=1.0)
    forest = fit_blob_forest(one_class, np.arange(4), y, seed=0)
    with torch.no_grad():
        assert torch.isfinite(blob_logit(forest, torch.from_numpy(one_class[0]))).all()
