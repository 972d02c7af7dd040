"""Pre-trained backbones: build, train a step, save/load, preprocessing equivalence, offline weights."""

import keras
import numpy as np
import pytest

from cnnkit.errors import ModelError
from cnnkit.models import LOSS, build_model
from cnnkit.models.saving import ModelMeta, load_model, save_model
from cnnkit.models.transfer import get_backbone
from cnnkit.models.zoo import backbone_names

BACKBONES = backbone_names()  # every registered backbone, EfficientNet-Lite's included
REFERENCE = {
    "mobilenetv2": keras.applications.mobilenet_v2.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    # the official EfficientNet-Lite input (efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128)
    **{name: (lambda x: (x - 127.0) / 128.0) for name in BACKBONES if name.startswith("efficientnetlite")},
}


def _pixels(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_builds_trains_one_step_and_round_trips(name, tmp_path):
    model = build_model(name, num_classes=3, image_size=(16, 16), weights="none", head_width=8, dropout=0.3)
    assert model.get_layer("upscale").output.shape[1:3] == (32, 32)  # 16x16 upscaled to Keras's minimum
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    assert model.get_layer("head_dropout").rate == 0.3 and model.get_layer("head_dense").units == 8
    model.compile(optimizer="adam", loss=LOSS, run_eagerly=True)  # one step: tracing would cost more
    x, y = _pixels(4, 16), np.array([0, 1, 2, 0])
    bn = next(layer for layer in get_backbone(model).layers if isinstance(layer, keras.layers.BatchNormalization))
    before, bn_before = [w.copy() for w in model.get_weights()], [w.copy() for w in bn.get_weights()]
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # weights="none" trains from scratch: BatchNorm learns its moving statistics as usual
    assert not np.allclose(bn.moving_mean, bn_before[2])
    probs = np.asarray(model(x, training=False))
    save_model(model, tmp_path / "m.keras", ModelMeta(["a", "b", "c"], (16, 16), architecture=name))
    loaded, meta = load_model(tmp_path / "m.keras")
    assert meta.architecture == name
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
def test_raw_pixels_match_reference_preprocess_input_then_backbone(name):
    model = build_model(name, num_classes=4, image_size=(32, 32), weights="none")
    x = _pixels(3, 32, seed=1)
    ours = np.asarray(model(x, training=False))
    features = get_backbone(model)(REFERENCE[name](x.copy()), training=False)
    pooled = model.get_layer("head_pool")(features)
    reference = np.asarray(model.get_layer("predictions")(model.get_layer("head_dropout")(pooled)))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_grayscale_input_is_copied_to_three_channels():
    model = build_model("mobilenetv2", num_classes=2, image_size=(32, 32), channels=1, weights="none")
    gray = _pixels(1, 32)[..., :1]
    to_rgb = keras.Model(model.input, model.get_layer("gray_to_rgb").output)
    np.testing.assert_array_equal(np.asarray(to_rgb(gray)), np.repeat(gray, 3, axis=-1))
    assert np.asarray(model(gray)).shape == (1, 2)


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory):
    """A MobileNetV2 backbone with non-random weights, saved as .weights.h5 and as .keras."""
    folder = tmp_path_factory.mktemp("weights")
    net = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(5)
    net.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in net.get_weights()])
    net.save_weights(folder / "mnv2.weights.h5")
    net.save(folder / "mnv2.keras")
    return folder, net


@pytest.mark.parametrize("file", ["mnv2.weights.h5", "mnv2.keras"])
def test_offline_weights_file_loads_and_changes_predictions(saved_backbone, file):
    folder, net = saved_backbone
    keras.utils.set_random_seed(0)
    random_init = build_model("mobilenetv2", 3, (32, 32), weights="none")
    keras.utils.set_random_seed(0)
    pretrained = build_model("mobilenetv2", 3, (32, 32), weights=str(folder / file))
    for a, b in zip(get_backbone(pretrained).get_weights(), net.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = _pixels(2, 32)
    assert not np.allclose(random_init(x), pretrained(x))


def test_weights_from_a_cnnkit_model_reuse_its_backbone_at_another_size(saved_backbone, tmp_path):
    folder, net = saved_backbone
    first = build_model("mobilenetv2", 5, (32, 32), weights=str(folder / "mnv2.weights.h5"))
    save_model(first, tmp_path / "model.keras", ModelMeta(list("abcde"), (32, 32), architecture="mobilenetv2"))
    second = build_model("mobilenetv2", 2, (48, 48), weights=str(tmp_path))  # a run directory
    for a, b in zip(get_backbone(second).get_weights(), net.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_weights_of_another_architecture_or_with_a_top_are_refused(saved_backbone, tmp_path):
    folder, _ = saved_backbone
    with pytest.raises(ModelError, match="does not fit the resnet50 backbone: .*another architecture"):
        build_model("resnet50", 3, (32, 32), weights=str(folder / "mnv2.keras"))
    with_top = keras.applications.MobileNetV2(include_top=True, weights=None, input_shape=(32, 32, 3), classes=7)
    with_top.save(tmp_path / "top.keras")
    with pytest.raises(ModelError, match="include_top=False"):
        build_model("mobilenetv2", 3, (32, 32), weights=str(tmp_path / "top.keras"))
    with pytest.raises(ModelError, match="include_top=False") as info:
        build_model("resnet50", 3, (32, 32), weights=str(folder / "mnv2.weights.h5"))
    assert len(str(info.value)) < 600  # Keras's list of every unmatched layer is cut
    with pytest.raises(ModelError, match="does not exist"):
        build_model("mobilenetv2", 3, (32, 32), weights=str(tmp_path / "missing.weights.h5"))


def test_weights_option_is_refused_for_from_scratch_models():
    with pytest.raises(ModelError, match="--weights applies to pre-trained backbones"):
        build_model("simple", 3, (16, 16), weights="imagenet")


def test_efficientnet_from_an_imagenet_weights_file_matches_keras_imagenet_scaling(tmp_path):
    # Keras's ImageNet EfficientNet normalises to ((x/255 - mean) / std) / sqrt(std); a file of
    # ImageNet statistics loaded into a backbone built without that extra layer must give the same.
    from cnnkit.models.transfer import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB

    net = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = next(layer for layer in net.layers if isinstance(layer, keras.layers.Normalization))
    norm.set_weights([np.array(IMAGENET_MEAN_RGB, "float32"), np.square(IMAGENET_STDDEV_RGB).astype("float32"),
                      norm.get_weights()[2]])
    net.save_weights(tmp_path / "effnet.weights.h5")
    model = build_model("efficientnetb0", 3, (32, 32), weights=str(tmp_path / "effnet.weights.h5"))
    backbone = get_backbone(model)
    x = _pixels(2, 32)
    scaled = model.get_layer("preprocess_efficientnet_imagenet")(x)
    inner_norm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
    inside = keras.Model(backbone.inputs, inner_norm.output)
    std = np.array(IMAGENET_STDDEV_RGB)
    expected = (x / 255 - np.array(IMAGENET_MEAN_RGB)) / std / np.sqrt(std)
    np.testing.assert_allclose(np.asarray(inside(scaled)), expected, rtol=1e-4, atol=1e-4)
    random_init = build_model("efficientnetb0", 3, (32, 32), weights="none")
    assert "preprocess_efficientnet_imagenet" not in [layer.name for layer in random_init.layers]
