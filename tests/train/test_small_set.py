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


@pytest.fixture(scope="module")
def trained(png_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("small-model")
    with torch_threads(1):
        summary = train(
            TrainConfig(
                data=str(png_set),
                out=str(root / "model"),
                labels="binary",
                folds=4,
                feature_cache=str(root / "features"),
                progress=False,
                tensorboard=False,
            )
        )
    return root / "model", root / "features", summary


def test_auto_picks_small_set_for_small_binary_sets_only() -> None:
    assert _small_set_applies(150, BINARY)
    assert not _small_set_applies(150, RSNA)
    assert not _small_set_applies(50_000, BINARY)
    # A backbone asked for by name is fine-tuned, whatever the set.
    assert _auto_small_set(TrainConfig(data="d", out="o"), 150, BINARY)
    assert not _auto_small_set(TrainConfig(data="d", out="o", architecture="resnet18"), 150, BINARY)


def test_bundle_records_the_recipe_and_its_preprocessing(trained) -> None:
    model, features, summary = trained
    config = json.loads((model / "bundle.json").read_text())
    assert config["recipe"] == "small-set"
    assert config["input"]["crop"] == "brain"
    assert config["input"]["size"] == 320
    assert config["input"]["tta"] == ["identity", "hflip"]
    assert 0 < config["thresholds"]["hemorrhage"] < 1
    assert config["threshold_method"] == "calibrated on 4-fold inner CV of the training slices"
    # 16 slices through each of the three backbones, each cached under its own key
    lites = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert config["small_set"]["backbones"] == lites
    assert config["architecture"] == "+".join(lites)
    assert len(config["small_set"]["member_weights"]) == 7
    assert config["training"]["feature_maps_computed"] == 48
    assert len(list(features.rglob("*.npz"))) == 48
    assert summary["metrics"]["validation_slices"] == 4


def test_a_second_fold_reuses_the_cached_feature_maps(trained, tmp_path: Path) -> None:
    model, features, _ = trained
    summary = train(
        TrainConfig(
            data=str(model / "cache"),
            out=str(tmp_path / "fold1"),
            fold=1,
            folds=4,
            feature_cache=str(features),
            progress=False,
            tensorboard=False,
        )
    )
    assert summary["recipe"] == "small-set"
    assert summary["training"]["feature_maps_computed"] == 0


def test_predict_gives_what_cross_validation_scored(trained, png_set: Path) -> None:
    from ichscan.data.cache import PreparedCache
    from ichscan.infer.predictor import Predictor
    from ichscan.io.load import load
    from ichscan.train.cv import bundle_probabilities

    model, _, _ = trained
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


def test_a_bundle_from_before_the_second_backbone_still_predicts(trained, tmp_path: Path) -> None:
    """Lite0-only bundles (no "backbones" in bundle.json, one module where there is now a
    list) load as a one-backbone ensemble and predict what they did."""
    from ichscan.models.bundle import load_bundle
    from ichscan.models.small_set import SmallSetModel

    model, _, _ = trained
    config = json.loads((model / "bundle.json").read_text())
    new = load_bundle(model).members[0]
    lite0 = SmallSetModel(
        new.mil[0].sources, 0, tuple(new.forest.left.shape), backbones=["efficientnet_lite0"]
    )
    lite0.maps[0] = new.maps[0]
    lite0.mil[0], lite0.logistic[0], lite0.forest = new.mil[0], new.logistic[0], new.forest
    old_layout = {
        k.replace("maps.0.", "maps.")
        .replace("mil.0.", "mil.")
        .replace("logistic.0.", "logistic."): v
        for k, v in lite0.state_dict().items()
    }
    old = tmp_path / "old"
    old.mkdir()
    torch.save(old_layout, old / config["members"][0])
    del config["small_set"]["backbones"]
    config["small_set"]["member_weights"] = [0.5, 0.25, 0.25]
    (old / "bundle.json").write_text(json.dumps(config))
    loaded = load_bundle(old).members[0]
    assert loaded.backbones == ("efficientnet_lite0",)
    x = torch.randint(0, 255, (2, 3, 320, 320), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), lite0.eval()(x), atol=1e-5)


def test_a_two_backbone_bundle_still_predicts(trained, tmp_path: Path) -> None:
    """Lite0 + Lite1 bundles (session 4, before Lite2) load with their own two networks and
    member weights, and predict what that two-network ensemble does."""
    from ichscan.models.bundle import load_bundle
    from ichscan.models.small_set import SmallSetModel, member_weights

    model, _, _ = trained
    config = json.loads((model / "bundle.json").read_text())
    three = load_bundle(model).members[0]
    pair = ["efficientnet_lite0", "efficientnet_lite1"]
    two = SmallSetModel(
        three.mil[0].sources,
        0,
        tuple(three.forest.left.shape),
        backbones=pair,
        maps=list(three.maps[:2]),
    )
    for i in range(2):
        two.mil[i], two.logistic[i] = three.mil[i], three.logistic[i]
    two.forest = three.forest
    old = tmp_path / "two"
    old.mkdir()
    torch.save(two.state_dict(), old / config["members"][0])
    config["small_set"]["backbones"] = pair
    config["small_set"]["member_weights"] = member_weights(2)
    (old / "bundle.json").write_text(json.dumps(config))
    loaded = load_bundle(old).members[0]
    assert loaded.backbones == tuple(pair)
    x = torch.randint(0, 255, (2, 3, 320, 320), dtype=torch.uint8)
    with torch.no_grad():
        assert loaded(x).shape == three(x).shape
        assert torch.allclose(loaded(x), two.eval()(x), atol=1e-5)
        assert not torch.allclose(loaded(x), three(x), atol=1e-3)


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


def test_onnx_export_of_a_small_set_bundle_predicts_what_torch_does(
    trained, tmp_path: Path
) -> None:
    """The default recipe's bundle exports: onnxruntime, fed the density features by
    OnnxPredictor, gives the PyTorch probabilities on real-shaped slices, at a batch size
    the export never saw, and through the ordinary predictor."""
    import shutil

    import onnx

    from ichscan.data.cache import PreparedCache
    from ichscan.infer.onnx_export import OnnxPredictor, export_onnx
    from ichscan.infer.predictor import Predictor
    from ichscan.io.load import load
    from ichscan.models.bundle import load_bundle

    model, _, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("cache", "*.onnx"))
    path = export_onnx(copy)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image", "density"]
    assert not any(n.op_type in ("Loop", "If") for n in graph.node)

    cache = PreparedCache(model / "cache")
    # The predictor's input: the cached brain-window grey in all three channels.
    x = np.stack([np.asarray(cache[i]) for i in range(3)]).transpose(0, 3, 1, 2).repeat(3, 1)
    with torch.no_grad():
        want = torch.sigmoid(load_bundle(copy).members[0](torch.from_numpy(x))).numpy()
    got, embedding = OnnxPredictor(path, tta=False, batch_size=3).slices(x)
    assert embedding.shape == (3, 7)
    np.testing.assert_allclose(got, want, atol=1e-4)

    image = Path(cache.index["path"].iloc[3])
    scan = load(image, image_window="brain")
    via_torch = Predictor(copy, "cpu").predict_scan(scan).scan_probs
    via_onnx = Predictor(copy, backend="onnx").predict_scan(scan).scan_probs
    np.testing.assert_allclose(via_onnx, via_torch, atol=1e-4)
