import numpy as np
import pytest

from cnnkit.errors import ModelError
from cnnkit.models import available_models, build_model, get_spec
from cnnkit.models.saving import ModelMeta, load_model, save_model

FROM_SCRATCH = [name for name in available_models() if not get_spec(name).is_backbone]


@pytest.mark.parametrize("name", FROM_SCRATCH)  # backbones: tests/test_transfer.py
def test_every_model_takes_raw_pixels_and_outputs_probabilities(name, tmp_path):
    import keras

    model = build_model(name, num_classes=3, image_size=(16, 16))
    assert model.layers[1].name == "rescale_0_255"
    assert model.layers[-1].get_config()["activation"] == "softmax"
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype("float32")
    scaled = keras.Model(model.input, model.layers[1].output)  # the first thing done to the raw pixels
    assert model.layers[1].input is model.inputs[0]
    np.testing.assert_allclose(np.asarray(scaled(x)), x / 255, rtol=1e-6, atol=1e-7)
    probs = np.asarray(model.predict(x, verbose=0))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    save_model(model, tmp_path / "m.keras", ModelMeta(["a", "b", "c"], (16, 16), architecture=name))
    loaded, meta = load_model(tmp_path / "m.keras")
    assert meta.class_names == ["a", "b", "c"] and meta.architecture == name
    np.testing.assert_allclose(np.asarray(loaded.predict(x, verbose=0)), probs, rtol=1e-5, atol=1e-6)


def test_two_classes_use_a_two_unit_softmax():
    model = build_model("simple", num_classes=2, image_size=(16, 16))
    assert model.outputs[0].shape[-1] == 2


def test_grayscale_input():
    model = build_model("vgg", num_classes=4, image_size=(32, 32), channels=1)
    assert model.inputs[0].shape == (None, 32, 32, 1)


def test_unknown_model_lists_names_and_suggests():
    with pytest.raises(ModelError) as info:
        build_model("vgg16", num_classes=3)
    message = str(info.value)
    assert "simple" in message and "vgg" in message and "Did you mean 'vgg'" in message


def test_augmentation_layers_act_only_in_training():
    import keras

    model = build_model("simple", num_classes=3, image_size=(16, 16), augment="standard", seed=1)
    plain = build_model("simple", num_classes=3, image_size=(16, 16), augment="none")
    augmenters = [layer for layer in model.layers if layer.name.startswith("aug_")]
    assert [layer.name for layer in augmenters] == ["aug_flip", "aug_rotation", "aug_zoom", "aug_translation"]
    rest = [layer for layer in model.layers[1:] if not layer.name.startswith("aug_")]
    assert [type(layer) for layer in rest] == [type(layer) for layer in plain.layers[1:]]
    for source, target in zip(rest, plain.layers[1:]):
        target.set_weights(source.get_weights())
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype("float32")
    # Inference: the augmented model is the same function as the one built without augmentation.
    np.testing.assert_allclose(np.asarray(model(x, training=False)), np.asarray(plain(x, training=False)),
                               rtol=1e-5, atol=1e-7)
    # Training: the augmentation layers, in the model's own path, change the pixels.
    augment = keras.Model(model.input, augmenters[-1].output)
    np.testing.assert_array_equal(np.asarray(augment(x, training=False)), x)
    assert np.abs(np.asarray(augment(x, training=True)) - x).max() > 1.0
