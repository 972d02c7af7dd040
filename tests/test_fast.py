"""The fast recipe: model, batch augmentation, BatchNorm re-estimation, time budget, defaults."""

import importlib.util
import json
import time

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import _parse_duration, app
from cnnkit.config import PRETRAINED_MODULE, RECIPES, load_config
from cnnkit.data.batches import ArrayBatches, BatchAugment
from cnnkit.data.scan import AUTO_VAL_MAX_IMAGES, auto_val_split
from cnnkit.errors import ConfigError
from cnnkit.training.fitting import reestimate_batchnorm
from cnnkit.models import build_model
from cnnkit.training.budget import RESERVE_MARGIN, SAVE_SECONDS, BudgetPlan, Throughput, choose_width
from cnnkit.models.fast import MIN_EPOCHS
from cnnkit.training.optim import onecycle_rate
from tests.conftest import write_class_folder


def _crops(image: np.ndarray, pad: int, flip: bool) -> list[np.ndarray]:
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    crops = [padded[y : y + h, x : x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return [c[:, ::-1] for c in crops] if flip else crops


def test_batch_augment_output_is_a_shifted_and_flipped_crop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    flips = rng.random(64) < 0.5
    out = BatchAugment()(images, flips, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    for i in range(64):
        assert any(np.array_equal(out[i], c) for c in _crops(images[i], 2, bool(flips[i]))), i
    assert not np.array_equal(out, images)  # something moved


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    batches = ArrayBatches(images, np.arange(40), np.zeros(40), 40, augment=BatchAugment(translate=0))
    batches.on_epoch_begin()
    first = batches[0][0]
    batches.on_epoch_begin()
    second = batches[0][0]
    flipped = np.array([np.array_equal(a, b[:, ::-1]) for a, b in zip(first, second)])
    assert flipped.all()  # every image is seen the other way round in the next epoch
    mirrored = np.array([np.array_equal(a, i[:, ::-1]) for a, i in zip(first, images)])
    assert 5 < mirrored.sum() < 35  # and the first epoch flips about half


def test_an_epochs_batches_depend_on_its_number_alone():
    # A resumed run sets the epoch it resumes at, and sees the batches an uninterrupted run would:
    # the order, flips and translations of epoch k, whatever was asked for before.
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    rows = np.arange(50)

    def make():
        return ArrayBatches(images, rows, rows, 16, shuffle=True, seed=7, augment=BatchAugment(flip="random"))

    def epoch_of(batches):
        return [batches[i] for i in range(len(batches))]

    run = make()
    epochs = []
    for _ in range(3):
        run.on_epoch_begin()
        epochs.append(epoch_of(run))
    resumed = make()
    resumed.start_at(2)
    resumed.on_epoch_begin()
    for (x, y), (rx, ry) in zip(epochs[2], epoch_of(resumed)):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    for batches in epochs:  # each epoch holds every row once
        assert sorted(np.concatenate([y for _, y in batches]).tolist()) == rows.tolist()
    assert [b[1].tolist() for b in epochs[0]] != [b[1].tolist() for b in epochs[1]]  # reshuffled


def test_a_fit_from_initial_epoch_draws_that_epochs_batches():
    # Keras calls on_epoch_end before the first epoch too (resetting its iterator); the epoch a fit
    # draws from is the one it says it runs, counted by on_epoch_begin.
    class Recording(ArrayBatches):
        def batch(self, epoch, index):
            seen.append(epoch)
            return super().batch(epoch, index)

    seen = []
    images = np.zeros((16, 8, 8, 3), np.uint8)
    batches = Recording(images, np.arange(16), np.zeros(16), 8, shuffle=True)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches.start_at(3)
    model.fit(batches, initial_epoch=3, epochs=5, verbose=0, shuffle=False)
    # (TensorFlow's adapter also reads two batches before the fit to learn their shapes: epoch 0's.)
    assert {3, 4} <= set(seen) <= {0, 3, 4}, seen


def test_fast_model_takes_raw_pixels_and_any_size():
    model = build_model("fast", 4, (48, 40))
    probs = keras.ops.convert_to_numpy(model(np.full((2, 48, 40, 3), 200, np.uint8)))
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The layer right after the input scales the raw 0-255 pixels to [0, 1].
    first = model.layers[1]
    assert first.input is model.input
    pixels = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3)).astype("float32")
    scaled = keras.ops.convert_to_numpy(keras.Model(model.input, first.output)(pixels))
    np.testing.assert_allclose(scaled, pixels / 255, rtol=1e-6, atol=1e-7)


def test_batchnorm_statistics_are_reestimated_from_the_data():
    inputs = keras.Input((4,))
    norm = keras.layers.BatchNormalization(momentum=0.99)
    model = keras.Model(inputs, norm(inputs))
    rng = np.random.default_rng(0)
    data = (rng.normal(5.0, 3.0, (2000, 4))).astype("float32")
    # Moving statistics far from the data (what a short run at a high rate leaves behind).
    norm.moving_mean.assign(np.full(4, -10.0, "float32"))
    norm.moving_variance.assign(np.full(4, 100.0, "float32"))
    batches = ArrayBatches(data, np.arange(2000), np.zeros(2000), 250, shuffle=True)
    seen = reestimate_batchnorm(model, batches)
    assert seen == 2000
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_mean), data.mean(axis=0), atol=0.05)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_variance), data.var(axis=0), rtol=0.05)
    assert norm.momentum == 0.99  # restored


def test_frozen_batchnorm_is_left_alone():
    inputs = keras.Input((4,))
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, norm(inputs))
    norm.trainable = False
    data = np.ones((100, 4), "float32")
    assert reestimate_batchnorm(model, ArrayBatches(data, np.arange(100), np.zeros(100), 50)) == 0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(norm.moving_mean), np.zeros(4))


def test_onecycle_rate_warms_up_then_anneals_to_zero():
    rates = [onecycle_rate(p, 0.4) for p in np.linspace(0, 1, 101)]
    assert rates[0] == pytest.approx(0.4 / 25)
    assert max(rates) == pytest.approx(0.4) and int(np.argmax(rates)) == 30
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a <= b for a, b in zip(rates[:30], rates[1:31])) and all(a >= b for a, b in zip(rates[30:], rates[31:]))


def test_fast_is_the_default_for_small_images_with_its_recipe():
    cfg = load_config(None, {})
    assert cfg.model.name == "fast"
    for key, value in RECIPES["fast"]["train"].items():
        assert getattr(cfg.train, key) == value
    # What the user sets wins over the recipe; other models keep the general defaults.
    assert load_config(None, {"train.batch_size": 32}).train.batch_size == 32
    assert load_config(None, {"model.name": "simple"}).train.optimizer == "adam"
    # photos (over 64 px): EfficientNet-Lite0 with ImageNet weights where cnnkit[pretrained] is installed
    photos = load_config(None, {"data.image_size": (128, 128)})
    assert photos.model.name == ("efficientnetlite0" if importlib.util.find_spec(PRETRAINED_MODULE) else "simple")
    assert "128 px (over 64)" in photos.model_choice


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600), ("600s", 600), ("1h30m", 5400), ("2", 120),
                                               ("1.5h", 5400)])
def test_durations(text, seconds):
    assert _parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "m", "-5m"])
def test_bad_durations_say_what_is_expected(text):
    with pytest.raises(ConfigError, match="10m, 600s"):
        _parse_duration(text)


def test_time_budget_is_validated():
    with pytest.raises(ConfigError, match="time_budget"):
        load_config(None, {"train.time_budget": 5})
    with pytest.raises(ConfigError, match="onecycle"):
        load_config(None, {"train.time_budget": 60, "train.schedule": "plateau"})


def test_automatic_validation_split_is_capped():
    assert auto_val_split(1000) == 0.2
    assert auto_val_split(50_000) * 50_000 == pytest.approx(AUTO_VAL_MAX_IMAGES)


def test_time_budget_run_stops_on_time_and_anneals(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=40, size=32)
    budget = 25.0
    started = time.monotonic()
    result = cnnkit.train(data, tmp_path / "run", time_budget=budget, batch_size=16)
    elapsed = time.monotonic() - started
    assert result.status == "completed"
    assert elapsed <= budget * 1.03 + 2  # a budget is a promise: measured reserve, not a guess
    assert elapsed > 0.8 * budget  # ... and the time was used
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["time_budget"]["steps"] > 0
    # run.json says when training stopped and when the run finished, on the budget's clock
    ended, finished = record["time_budget"]["training_ended_at_s"], record["time_budget"]["finished_at_s"]
    assert 0 < ended < finished <= elapsed + 0.1 and finished <= budget * 1.03 + 2
    marks = record["time_budget"]["after_training_at_s"]  # fit returned, final model, evaluated
    assert ended <= marks["fit_returned"] <= marks["final_model"] <= marks["evaluated"] <= finished
    probes = record["time_budget"]["probes"]
    assert probes["small"]["train_images_per_s"] > 0 and probes["small"]["predict_images_per_s"] > 0
    assert record["time_budget"]["width"] in probes and "measured here" in record["time_budget"]["reason"]
    assert record["config"]["model"]["width"] == record["time_budget"]["width"]
    assert record["batchnorm_reestimated_on"] > 0
    # the schedule was fitted to the budget: it annealed by the last step, however many epochs that was
    assert record["time_budget"]["last_learning_rate"] < 0.3 * record["time_budget"]["peak_learning_rate"]
    assert result.metrics["val_accuracy"] > 0.8


def test_fast_default_reports_flip_tta_and_short_runs_are_right(tmp_path):
    """The trap: a BatchNorm CNN trained 2 epochs at a high rate scores near chance without re-estimation."""
    data = write_class_folder(tmp_path / "data", per_class=60, size=32)
    result = cnnkit.train(data, tmp_path / "run", epochs=2, batch_size=16, val_split=0.25, test_split=0.25)
    assert "test_accuracy_tta" in result.metrics and "val_accuracy_tta" in result.metrics
    assert result.metrics["test_accuracy"] > 0.55  # chance is 1/3; 14 steps at a high rate
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["config"]["model"]["name"] == "fast" and record["batchnorm_reestimated_on"] > 0


def test_cli_time_budget_error_exits_2(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=5)
    outcome = CliRunner().invoke(app, ["train", str(data), "--time-budget", "soon"])
    assert outcome.exit_code == 2
    assert "--time-budget" in outcome.output


def _rates(train_small: float) -> dict[str, Throughput]:
    """Throughputs in the ratios measured on CPUs (medium ~0.6x small, large ~0.4x), predict 3x train."""
    return {w: Throughput(train_small * f, 3 * train_small * f, 1.0) for w, f in
            (("small", 1.0), ("medium", 0.6), ("large", 0.4))}


@pytest.mark.parametrize("train_small, seconds, width, probed", [
    (1350, 600, "medium", ["small", "medium"]),  # the bf16 CPU, 10 minutes: medium pays off, large cannot
    (1350, 1800, "large", ["small", "medium", "large"]),  # 30 minutes buy large its epochs
    (280, 600, "small", ["small"]),  # a CPU 5x slower, 10 minutes: ~3 epochs; medium is not even probed
    (1350, 120, "small", ["small"]),  # a short budget
])
def test_the_width_follows_the_speed_measured_here(train_small, seconds, width, probed):
    plan = BudgetPlan(seconds, train_images=45_000, validation_images=5_000, after_training_images=45_000)
    rates, asked = _rates(train_small), []

    def probe(name):
        asked.append(name)
        return rates[name]

    assert choose_width(plan, probe, time.monotonic() + seconds) == width
    assert asked == probed
    epochs = plan.epochs_affordable(rates[width], seconds)
    assert epochs >= MIN_EPOCHS[width]  # the rule the docs state
    wider = {"small": "medium", "medium": "large"}.get(width)
    if wider:
        assert plan.epochs_affordable(rates[wider], seconds) < MIN_EPOCHS[wider]
        # the run says why not wider: measured and short, or not worth measuring
        assert plan.why_not_wider.startswith(f"{wider} needs {MIN_EPOCHS[wider]:g} epochs to pay off")
        assert ("measured here it affords" in plan.why_not_wider) == (wider in probed)
    else:
        assert plan.why_not_wider == ""


def test_no_garbage_collection_lands_inside_the_timed_probe_steps():
    """A full collection takes a fifth of a second in a process that holds a backend and a big file
    list, as long as a fifth of a probe's timed steps. The probe times with the collector off (the
    step below makes cyclic garbage, which would trigger it)."""
    import gc

    from cnnkit.data.batches import ArrayBatches
    from cnnkit.training.budget import _images_per_second

    images = np.zeros((32, 8, 8, 3), np.uint8)
    batches = ArrayBatches(images, np.arange(32), np.zeros(32), 8)
    calls, collected_during, timing = [], [], [False]

    def watch(phase, info):
        if phase == "start" and timing[0]:
            collected_during.append(info["generation"])

    def step(x, y):
        calls.append(len(x))
        timing[0] = len(calls) > 1  # a timed step (the first call compiles)
        for _ in range(20_000):  # cyclic garbage: enough to trigger generation-0 collections
            a = []
            a.append(a)
        timing[0] = False

    gc.callbacks.append(watch)
    try:
        rate = _images_per_second(step, batches, steps=3)
    finally:
        gc.callbacks.remove(watch)
    assert calls == [8, 8, 8, 8]  # the compiling step and three timed ones
    assert rate > 0 and collected_during == []
    assert gc.isenabled()  # the collector is back on afterwards


def test_measuring_takes_a_small_share_of_a_short_budget():
    plan = BudgetPlan(60, train_images=500, validation_images=100, after_training_images=600)  # tiny data
    slow_to_compile = {w: Throughput(2000, 6000, 4.0) for w in MIN_EPOCHS}  # 4 s per probe: 8% of 60 s is 4.8 s
    asked = []
    assert choose_width(plan, lambda w: asked.append(w) or slow_to_compile[w], time.monotonic() + 60) == "small"
    assert asked == ["small"]  # medium would pay off on speed, but measuring it would cost too much
    assert plan.why_not_wider == "medium not measured: measuring it would take more than 8% of this budget"
    plan = BudgetPlan(600, train_images=500, validation_images=100, after_training_images=600)
    assert choose_width(plan, lambda w: slow_to_compile[w], time.monotonic() + 600) == "large"


def test_the_reserve_is_priced_from_the_inference_speed():
    plan = BudgetPlan(600, train_images=45_000, validation_images=5_000, after_training_images=45_000)
    assert plan.reserve(500) == pytest.approx(2 * plan.reserve(1000) - SAVE_SECONDS)  # linear in 1/speed, plus saving
    assert plan.reserve(1000) > (45_000 + 5_000) / 1000  # the final evaluation and the last validation pass
    assert plan.epochs_affordable(Throughput(100, 300, 1), 10) == 0  # nothing left: no epochs, not negative


def test_the_reserve_prices_the_final_evaluation_at_the_float32_models_speed():
    """Training in mixed bfloat16, the final evaluation runs on the saved float32 model: its measured
    speed relative to the probe's prices the work after training (not the last validation pass)."""
    from cnnkit.data.batches import ArrayBatches
    from cnnkit.training.budget import evaluation_speed
    from cnnkit.training.precision import dtype_policy

    plan = BudgetPlan(600, train_images=45_000, validation_images=5_000, after_training_images=45_000)
    same = plan.reserve(1000)
    plan.evaluation_speed = 0.5  # float32 at half the speed: the work after training takes twice as long
    assert plan.reserve(1000) - SAVE_SECONDS == pytest.approx((2 * 45_000 + 5_000) / 1000 * RESERVE_MARGIN)
    assert plan.reserve(1000) > same
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    batches = ArrayBatches(images, np.arange(64), np.zeros(64), 16)
    rate = Throughput(1000, 1000, 1)
    assert evaluation_speed(build_model("fast", 3, (16, 16), width="small"), batches, rate) == 1.0  # float32 already
    with dtype_policy("mixed_bfloat16"):
        mixed = build_model("fast", 3, (16, 16), width="small")
    measured = evaluation_speed(mixed, batches, rate)
    assert 0.1 < measured < 20 and measured != 1.0  # a float32 copy was timed, and only its inference


def test_width_is_for_the_fast_model_only():
    with pytest.raises(ConfigError, match="fast model only"):
        load_config(None, {"model.name": "vgg", "model.width": "large"})
    with pytest.raises(ConfigError, match="width"):
        load_config(None, {"model.width": "huge"})


def test_a_budget_brings_the_one_cycle_schedule_to_any_model():
    cfg = load_config(None, {"model.name": "simple", "train.time_budget": 120})
    assert cfg.train.schedule == "onecycle"


def test_whitening_stem_whitens_the_patches_it_sees():
    from cnnkit.models.fast import WHITEN_LAYER, set_whitening

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)  # neighbouring pixels strongly correlated
    model = build_model("fast", 10, stem="whiten", width="small")
    stem = model.get_layer(WHITEN_LAYER)
    assert not stem.trainable and stem.kernel.shape == (2, 2, 3, 24)
    assert set_whitening(model, images) and not set_whitening(build_model("fast", 10), images)
    features = keras.Model(model.input, stem.output)(images[:100].astype("float32"))
    patches = keras.ops.convert_to_numpy(features)[:, :-1, :-1, :12].reshape(-1, 12)
    covariance = np.cov(patches.T)
    assert np.allclose(np.diag(covariance), 1.0, atol=0.05)  # unit variance along every direction
    assert np.abs(covariance - np.diag(np.diag(covariance))).max() < 0.05  # decorrelated
    with pytest.raises(ConfigError, match="fast model only"):
        load_config(None, {"model.name": "vgg", "model.stem": "whiten"})


def test_dirac_init_starts_each_block_convolution_as_the_identity(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model("fast", 10, width="small", init="dirac")
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 64)).astype("float32")
    for name, inputs, outputs in (("block1a_conv", 24, 32), ("block1b_conv", 32, 32), ("block3a_conv", 64, 128)):
        conv = model.get_layer(name)
        kernel = keras.ops.convert_to_numpy(conv.kernel)
        assert kernel.shape == (3, 3, inputs, outputs)
        y = keras.ops.convert_to_numpy(conv(x[..., :inputs]))
        np.testing.assert_allclose(y[..., :inputs], x[..., :inputs], atol=1e-6)  # the first filters pass x on
        if outputs > inputs:  # the other filters keep their random init
            assert np.abs(kernel[..., inputs:]).mean() > 0.01
    plain = keras.ops.convert_to_numpy(build_model("fast", 10, width="small").get_layer("block1b_conv").kernel)
    assert np.abs(plain[1, 1, np.arange(32), np.arange(32)] - 1).max() > 0.5  # the default init is no identity
    assert keras.ops.convert_to_numpy(model.get_layer("stem_conv").kernel).std() > 0.01  # the stem is left alone
    with pytest.raises(ConfigError, match="init applies to the fast model only"):
        load_config(None, {"model.name": "vgg", "model.init": "dirac"})
    with pytest.raises(ConfigError, match="init"):
        load_config(None, {"model.name": "fast", "model.init": "identity"})
    data = write_class_folder(tmp_path / "data", per_class=8)
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), "--model", "fast",
                                      "--init", "dirac", "--epochs", "1", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["model"]["init"] == "dirac"


def test_a_budget_whitens_the_fast_stem_fitted_to_its_own_training_images(tmp_path):
    from cnnkit.data.dataset import load_image_folder
    from cnnkit.models.fast import WHITEN_LAYER, set_whitening
    from cnnkit.models.saving import load_model

    assert load_config(None, {"model.name": "fast", "train.time_budget": 60}).model.stem == "whiten"
    assert load_config(None, {"model.name": "fast"}).model.stem == "conv"  # without a budget: the trained stem
    budget_conv = {"model.name": "fast", "model.stem": "conv", "train.time_budget": 60}
    assert load_config(None, budget_conv).model.stem == "conv"  # a user's choice wins
    data = write_class_folder(tmp_path / "data", per_class=12)
    run = cnnkit.train(data, tmp_path / "run", model="fast", stem="whiten", epochs=1, batch_size=16,
                       val_split=0.25, test_split=0.0, mixed_precision=False)
    saved = load_model(run.run_dir)[0].get_layer(WHITEN_LAYER).kernel
    # the kernel the stem must hold: the whitening of this run's own training images (frozen, so unchanged)
    loaded = load_image_folder(data, load_config(None, {"model.name": "fast", "data.val_split": 0.25,
                                                        "data.test_split": 0.0, "data.image_size": 32}).data,
                               cache_root=tmp_path / "cache")
    expected = build_model("fast", 3, stem="whiten")
    set_whitening(expected, loaded.cache.images[np.sort(loaded.split_rows("train")[0])])
    assert np.allclose(keras.ops.convert_to_numpy(saved), keras.ops.convert_to_numpy(expected.get_layer(
        WHITEN_LAYER).kernel), atol=1e-4)
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "budget"), "--model", "fast",
                                      "--time-budget", "25s", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert WHITEN_LAYER in [layer.name for layer in load_model(tmp_path / "budget")[0].layers]
    assert json.loads((tmp_path / "budget" / "run.json").read_text())["config"]["model"]["stem"] == "whiten"


def test_ema_keeps_the_average_of_the_weights():
    from cnnkit.config import TrainConfig
    from cnnkit.training.optim import make_loss, make_optimizer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 64)
    moved = {}
    for ema in (0.0, 0.999):
        keras.utils.set_random_seed(0)
        model = build_model("simple", 3, image_size=(16, 16))
        start = [w.copy() for w in model.get_weights()]
        cfg = TrainConfig(optimizer="sgd", ema=ema)
        model.compile(optimizer=make_optimizer(cfg, 0.5, 10, schedule="plateau"), loss=make_loss(0.0))
        model.fit(images, labels, batch_size=16, epochs=2, verbose=0)
        moved[ema] = max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), start))
    # 8 steps at momentum 0.999 move the average less than 1% of the way the weights went
    assert moved[0.999] < 0.05 * moved[0.0], moved
    with pytest.raises(ConfigError, match="ema"):
        TrainConfig(ema=1.0)


def test_final_metrics_with_flip_and_crop_views(tmp_path):
    from cnnkit.data.batches import tta_views
    from cnnkit.data.dataset import load_image_folder
    from cnnkit.config import DataConfig

    data = write_class_folder(tmp_path / "data", per_class=30, size=32)
    result = cnnkit.train(data, tmp_path / "run", epochs=1, batch_size=16, test_split=0.3, tta="flip+crop")
    model = keras.saving.load_model(result.run_dir / "model.keras", compile=False)
    test = load_image_folder(data, DataConfig(image_size=(32, 32), val_split=0.2, test_split=0.3))
    rows, labels = test.split_rows("test")
    views = tta_views(np.asarray(test.cache.images[np.sort(rows)]), "flip+crop")
    order = np.argsort(rows)
    averaged = np.mean([keras.ops.convert_to_numpy(model.predict_on_batch(v)) for v in views], axis=0)
    assert len(views) == 6
    assert result.metrics["test_accuracy_tta"] == pytest.approx(float(np.mean(averaged.argmax(1) == labels[order])))


def test_bn_bias_lr_scales_only_the_batchnorm_shifts(tmp_path):
    """--bn-bias-lr K: one SGD step from the same weights moves every BatchNorm beta K times as far and
    every kernel exactly as far as without it; the option reaches run.json through the CLI."""
    from cnnkit.config import TrainConfig
    from cnnkit.models import LOSS
    from cnnkit.training.optim import batchnorm_shift_multipliers, make_optimizer

    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    moved = {}
    for factor in (1.0, 16.0):
        keras.utils.set_random_seed(3)
        model = build_model("fast", 3, (16, 16), width="small")
        multipliers = batchnorm_shift_multipliers(model, factor)
        bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert len(multipliers) == (len(bn) if factor != 1.0 else 0) and len(bn) >= 7
        model.compile(optimizer=make_optimizer(TrainConfig(optimizer="sgd", weight_decay=5e-4), 0.05, 10,
                                               multipliers, schedule="plateau"), loss=LOSS)
        before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.trainable_weights}
        model.train_on_batch(pixels, labels)
        moved[factor] = {v.path: keras.ops.convert_to_numpy(v) - before[v.path] for v in model.trainable_weights}
    for path, delta in moved[1.0].items():
        if path.endswith("beta"):
            assert np.abs(delta).max() > 0
            np.testing.assert_allclose(moved[16.0][path], 16.0 * delta, rtol=1e-3, atol=1e-7)
        else:
            np.testing.assert_allclose(moved[16.0][path], delta, rtol=1e-5, atol=1e-8)
    data = write_class_folder(tmp_path / "data", per_class=8)
    result = CliRunner().invoke(app, ["-q", "train", str(data), "--out", str(tmp_path / "run"), "--model", "fast",
                                      "--width", "small", "--image-size", "16", "--epochs", "1", "--batch-size", "8",
                                      "--bn-bias-lr", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["train"]["bn_bias_lr"] == 16.0
    bad = CliRunner().invoke(app, ["-q", "train", str(data), "--out", str(tmp_path / "bad"), "--bn-bias-lr", "0"])
    assert bad.exit_code != 0 and "bn_bias_lr must be > 0" in bad.output
