"""Grad-CAM: the layer is found for every model in the zoo (on every installed backend), and the heatmap
looks where the class is decided."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cnnkit.errors import ModelError
from cnnkit.gradcam import compute_gradcam, find_gradcam_layer, split_model
from cnnkit.plots import overlay
from cnnkit.models import available_models, build_model

REPO = Path(__file__).resolve().parents[1]


def write_corner_folder(root: Path, per_class: int = 40, size: int = 32, seed: int = 0) -> Path:
    """Classes told apart only by where a bright square is: top-left corner, bottom-right corner, or none.

    The square-less class makes each square the positive evidence of its class: with two classes
    alone, a model may learn one detector and read the other class as its absence, which Grad-CAM
    (positive evidence only) cannot show.
    """
    rng = np.random.default_rng(seed)
    for name in ("top_left", "bottom_right", "no_square"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            dy, dx = rng.integers(0, 3, 2)
            side = size // 4
            if name == "top_left":
                img[dy : dy + side, dx : dx + side] = 255
            elif name == "bottom_right":
                img[size - side - dy : size - dy, size - side - dx : size - dx] = 255
            Image.fromarray(img).save(root / name / f"{name}_{i:03d}.png")
    return root


@pytest.mark.filterwarnings("ignore:The structure of `inputs`")
@pytest.mark.parametrize("name", available_models())
def test_every_zoo_model_splits_at_a_feature_map(name):
    # 64x64: backbones reduce 32x32 to a 1x1 map, where there is nothing to localise
    model = build_model(name, 3, (64, 64), weights="none")  # never download in tests
    layer = find_gradcam_layer(model)
    body, head, used = split_model(model)
    assert used == layer
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype("float32")
    features = keras.ops.convert_to_numpy(body(x, training=False))
    assert features.ndim == 4 and features.shape[1] > 1
    # the head ends in the class scores (logits): their softmax is the model's output
    logits = keras.ops.convert_to_numpy(head(features, training=False))
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(logits)), expected, atol=1e-5)
    heatmaps, probs, _ = compute_gradcam(model, x.astype(np.uint8))
    assert heatmaps.shape == (2, 64, 64) and heatmaps.min() >= 0 and heatmaps.max() <= 1
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_nested_backbone_counts_as_one_layer():
    backbone = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.Conv2D(8, 3, activation="relu")], name="backbone")
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    assert find_gradcam_layer(model) == "backbone"
    heatmaps, _, _ = compute_gradcam(model, np.full((1, 16, 16, 3), 128, np.uint8))
    assert heatmaps.shape == (1, 16, 16)


def test_model_without_feature_maps_and_unknown_layer_say_how_to_fix():
    inputs = keras.Input((8, 8, 3))
    dense = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    with pytest.raises(ModelError, match="Pass --layer"):
        find_gradcam_layer(dense)
    model = build_model("simple", 3, (16, 16))
    conv = find_gradcam_layer(model)
    with pytest.raises(ModelError, match=f"Did you mean '{conv}'"):
        split_model(model, conv + "x")
    with pytest.raises(ModelError, match="does not output a 2-D feature map"):
        split_model(model, "predictions")


def test_overlay_is_uint8_rgb_even_for_grayscale():
    heat = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = overlay(np.zeros((8, 8, 1), np.uint8), heat)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert out[-1, -1].tolist() != out[0, 0].tolist()  # hot and cold ends differ


LOCALISE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras, cnnkit
    from cnnkit import _progress
    from cnnkit.gradcam import explain
    _progress.set_progress(False)
    data, out = sys.argv[1], sys.argv[2]
    cnnkit.train(data, out, model="simple", epochs=8, image_size=32, batch_size=16, learning_rate=2e-3,
                 val_split=0.2)
    from cnnkit.gradcam import compute_gradcam
    hits, margins = [], []
    for name in ("top_left", "bottom_right"):
        files = sorted(__import__("glob").glob(f"{data}/{name}/*.png"))[:10]
        for h in explain(out, files, class_name=name, out=out + "/explain"):
            q = h.heatmap
            tl, br = q[:12, :12].mean(), q[20:, 20:].mean()  # the square's corner vs the opposite one
            peak = np.unravel_index(q.argmax(), q.shape)
            inside = (peak[0] < 16 and peak[1] < 16) if name == "top_left" else (peak[0] >= 16 and peak[1] >= 16)
            hits.append(bool(inside) and q.max() > 0)  # an empty map has its "peak" at (0, 0): not a hit
            margins.append(float(tl - br) if name == "top_left" else float(br - tl))
    hotter = float(np.mean(np.array(margins) > 0))
    # Control: an untrained copy of the network. A bright square excites random filters too, so its map already
    # leans toward the square (margin ~0.1-0.18 on TensorFlow); training must make the map clearly sharper.
    from PIL import Image
    from cnnkit.models import build_model as _build
    untrained = _build("simple", 3, (32, 32))
    control = []
    for index, name in ((2, "top_left"), (0, "bottom_right")):  # natural class order: bottom_right, no_square, top_left
        files = sorted(__import__("glob").glob(f"{data}/{name}/*.png"))[:10]
        maps = compute_gradcam(untrained, np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]),
                               np.full(len(files), index))[0]
        control += [float(q[:12, :12].mean() - q[20:, 20:].mean()) * (1 if name == "top_left" else -1) for q in maps]
    from cnnkit.gradcam import compute_gradcam
    from cnnkit.models import available_models, build_model
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    zoo = {name: list(compute_gradcam(build_model(name, 2, (64, 64), weights="none"), pixels)[0].shape)
           for name in available_models()}
    print(json.dumps({"backend": keras.backend.backend(), "hits": float(np.mean(hits)),
                      "margin": float(np.mean(margins)), "hotter": hotter, "zoo": zoo,
                      "untrained_margin": float(np.mean(control))}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend, module", [("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch")])
def test_gradcam_peaks_where_the_class_is_decided(backend, module, tmp_path):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'cnnkit[{backend}]')")
    write_corner_folder(tmp_path / "corners")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    # TensorFlow's kernels differ by CPU (Eigen's; oneDNN's AVX2, AVX-512, AMX paths), and so did the trained model:
    # a 2-core AVX2 EPYC measured a margin of 0.184 where this AVX512-BF16 machine gets 0.47. Eigen's kernels are
    # compiled for plain AVX, the same instructions on every x86-64 CPU that runs TensorFlow, so the test means one
    # thing anywhere.
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    proc = subprocess.run([sys.executable, "-c", LOCALISE, str(tmp_path / "corners"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    assert result["hits"] >= 0.8, result  # the hottest pixel lies in the square's quadrant
    # ...and that quadrant is hotter than the opposite one in (nearly) every image, by a clear margin.
    assert result["hotter"] >= 0.9 and result["margin"] > 0.2, result
    if backend == "tensorflow":  # measured on TensorFlow: 0.47 trained vs 0.09-0.18 for untrained nets (3 seeds)
        assert result["margin"] > result["untrained_margin"] + 0.1, result  # learnt, not what any random net shows
    assert result["zoo"] and all(shape == [2, 64, 64] for shape in result["zoo"].values()), result["zoo"]
    pngs = list((tmp_path / "run" / "explain").glob("*.png"))
    assert len(pngs) == 20
    with Image.open(pngs[0]) as img:
        assert img.size[0] > 2.2 * img.size[1]  # three panels side by side
