"""Model files saved by an older cnnkit still load: custom Keras objects keep their registered names,
and the metadata member of ``model.keras`` is still read (tests/data/pre_house/README.md)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.models.saving import load_model

OLD = Path(__file__).resolve().parent / "data" / "pre_house"


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_resume_checkpoint_saved_before_the_move_loads_with_its_optimizer_and_loss(optimizer):
    import cnnkit.training  # registers cnnkit's custom objects, as `cnnkit train --resume` does

    model = keras.saving.load_model(OLD / f"last_{optimizer}.keras", compile=True)
    assert type(model.optimizer).__name__ == f"Layerwise{ {'sgd': 'SGD', 'adam': 'Adam', 'adamw': 'AdamW'}[optimizer]}"
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert model.optimizer.lr_multipliers == {v.path: 0.5 for v in conv.trainable_weights}
    assert type(model.loss).__name__ == "SmoothedSparseCrossentropy" and model.loss.label_smoothing == 0.1
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2  # the optimizer state came with it
    inputs = np.load(OLD / "inputs.npy").astype("float32")
    np.testing.assert_allclose(np.asarray(model.predict(inputs, verbose=0)), np.load(OLD / f"expected_{optimizer}.npy"),
                               rtol=1e-5, atol=1e-6)
    model.fit(inputs, np.array([0, 1, 2, 0]), epochs=1, verbose=0)  # and it trains on from there


def test_a_model_saved_before_the_move_predicts_with_its_class_names_and_calibration():
    model, meta = load_model(OLD / "model.keras")
    assert meta.class_names == ["red", "green", "blue"] and meta.image_size == (8, 8)
    predictor = cnnkit.Predictor(OLD / "model.keras")
    assert predictor.temperature == 1.5 and predictor.min_confidence == 0.4
    pixels = np.load(OLD / "inputs.npy")
    from cnnkit.metrics import apply_temperature

    np.testing.assert_allclose(predictor.predict_arrays(pixels),
                               apply_temperature(np.asarray(model.predict(pixels.astype("float32"), verbose=0)), 1.5),
                               rtol=1e-5, atol=1e-6)
