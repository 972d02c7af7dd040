"""Training options: augmentation presets, optimizers, schedules, label smoothing, class weights,
mixed precision, the learning-rate range test, config files, and the diagnostics in words."""

import json
import os
import platform
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.config import TrainConfig
from cnnkit.training.range_test import _suggest
from cnnkit.models import build_model
from cnnkit.models.augment import AUGMENT_PRESETS, augment_config
from cnnkit.models.saving import load_model
from cnnkit.predict import Predictor
from cnnkit._backends.devices import cpu_flags, cpu_has_bfloat16, cpu_model
from cnnkit.training.precision import choose_precision, precision_policy
from cnnkit.training.optim import (
    SmoothedSparseCrossentropy,
    balanced_class_weight,
    layer_lr_multipliers,
    make_optimizer,
    make_schedule,
)
from tests.conftest import write_class_folder


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_class_folder(tmp_path_factory.mktemp("colours") / "data", per_class=16)


@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_augment_presets_build_and_are_identity_at_inference(preset):
    model = build_model("simple", 3, (16, 16), augment=preset, seed=1)
    names = [layer.name for layer in model.layers if layer.name.startswith("aug_")]
    assert names == [entry["name"] for entry in augment_config(preset)]
    assert (names == []) == (preset == "none")
    # Inference: the same function as the model built without augmentation (same weights copied over).
    plain = build_model("simple", 3, (16, 16), augment="none")
    rest = [layer for layer in model.layers[1:] if not layer.name.startswith("aug_")]
    assert [type(layer) for layer in rest] == [type(layer) for layer in plain.layers[1:]]
    for source, target in zip(rest, plain.layers[1:]):
        target.set_weights(source.get_weights())
    x = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)),
                               keras.ops.convert_to_numpy(plain(x, training=False)), rtol=1e-5, atol=1e-7)
    if names:
        # Training: every augmentation layer changes the pixels, and only then.
        augment = keras.Model(model.input, model.get_layer(names[-1]).output)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(augment(x, training=False)), x)
        for name in names:
            changed = keras.ops.convert_to_numpy(model.get_layer(name)(x, training=True))
            assert np.abs(changed - x).max() > 1.0, name
    if preset == "screens":  # screenshots and documents: text has a direction
        assert not any(n in names for n in ("aug_flip", "aug_rotation"))


def test_label_smoothing_matches_the_formula():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype="float32")
    labels = np.array([0, 2])
    smooth = 0.1 * np.ones((2, 3)) / 3 + 0.9 * np.eye(3)[labels]
    expected = np.mean(-np.sum(smooth * np.log(probs), axis=1))
    got = float(SmoothedSparseCrossentropy(0.1)(labels, probs))
    assert got == pytest.approx(expected, rel=1e-5)


def test_balanced_class_weight():
    assert balanced_class_weight(np.array([0] * 30 + [1] * 10), 2) == pytest.approx({0: 40 / 60, 1: 40 / 20})


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("adamw", "onecycle")])
def test_optimizers_and_schedules_train_and_are_recorded(tmp_path, optimizer, schedule):
    from cnnkit.training.optim import current_learning_rate

    class StepRates(keras.callbacks.Callback):  # the rate the optimizer applies after every step
        def __init__(self):
            super().__init__()
            self.rates: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.rates.append(current_learning_rate(self.model.optimizer))

    # 30 images a class: 18 validation images (with 16 a class, 9 would make the accuracy bound weak).
    colours = write_class_folder(tmp_path / "colours", per_class=30)
    steps = StepRates()
    result = cnnkit.train(colours, tmp_path / "run", model="simple", image_size=16, epochs=2, batch_size=8, optimizer=optimizer,
                          schedule=schedule, label_smoothing=0.1, class_weight="auto", learning_rate=0.01,
                          callbacks=[steps])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["train"]["optimizer"] == optimizer and record["config"]["train"]["schedule"] == schedule
    assert set(record["class_weight"]) == {"blue", "green", "red"}
    trained_with = getattr(result.model.optimizer, "inner_optimizer", result.model.optimizer)  # a loss-scale wrapper
    assert type(trained_with).__name__ in {"sgd": ("SGD", "LayerwiseSGD"), "adamw": ("AdamW", "LayerwiseAdamW")}[optimizer]
    rates = np.array(steps.rates)
    total = len(rates)
    assert total >= 10 and total % 2 == 0
    # history.csv's per-epoch rate is the rate at the end of each epoch.
    np.testing.assert_allclose(result.history["learning_rate"], rates[[total // 2 - 1, -1]], rtol=1e-5, atol=1e-9)
    assert rates.max() <= 0.01 * (1 + 1e-6) and rates[-1] < 0.01 * 1e-3  # never above the rate; ends at 0
    step = np.arange(1, total + 1)
    if schedule == "cosine":  # cosine decay from the rate to 0 over the run's steps
        assert rates[0] > 0.009 and np.all(np.diff(rates) < 0)
        expected = 0.01 * 0.5 * (1 + np.cos(np.pi * step / total))
    else:  # onecycle: linear warm-up from rate / 25 to the rate over 30% of the steps, then cosine decay to 0
        peak = int(np.argmax(rates))
        assert rates[peak] == pytest.approx(0.01, rel=1e-5) and 0 < peak < total - 1
        assert np.all(np.diff(rates[: peak + 1]) > 0) and np.all(np.diff(rates[peak:]) < 0)
        assert 0.01 / 25 < rates[0] < 0.01 / 2
        warmup = int(total * 0.3)
        assert peak + 1 == warmup
        decay = np.clip((step - warmup) / (total - warmup), 0, 1)
        expected = np.where(step < warmup, 0.01 / 25 + (0.01 - 0.01 / 25) * step / warmup,
                            0.01 * 0.5 * (1 + np.cos(np.pi * decay)))
    np.testing.assert_allclose(rates, expected, rtol=1e-4, atol=1e-9)
    # Measured: 18/18 right for data seeds 0-4 with either optimizer; 0.8 leaves room for 3 mistakes.
    assert result.metrics["val_accuracy"] > 0.8


def test_onecycle_warms_up_then_decays():
    schedule = make_schedule("onecycle", 0.01, 100)
    rates = [float(schedule(step)) for step in (0, 15, 30, 65, 100)]
    assert rates[0] == pytest.approx(0.01 / 25) and rates[2] == pytest.approx(0.01, rel=1e-3)
    assert rates[0] < rates[1] < rates[2] > rates[3] > rates[4]


@pytest.mark.backends  # also run on JAX and PyTorch (.ci/backends)
def test_precision_follows_the_hardware_and_says_why(monkeypatch):
    # Any x86-64 CPU: the decision is made from the flags given, so both kinds of CPU are checked on either.
    avx2 = choose_precision(True, flags=frozenset({"sse4_2", "avx", "avx2", "fma"}), gpus=[])
    assert avx2.policy == "float32" and avx2.fell_back and "no bfloat16" in avx2.reason
    for flag in ("avx512_bf16", "amx_bf16"):
        assert choose_precision(True, flags=frozenset({"avx2", flag}), gpus=[]).policy == "mixed_bfloat16"
    assert choose_precision(True, flags=frozenset(), gpus=["cuda:0"]).policy == "mixed_float16"
    off = choose_precision(False, flags=frozenset({"avx512_bf16"}), gpus=["cuda:0"])
    assert off.policy == "float32" and not off.fell_back
    # This machine: bfloat16 exactly when /proc/cpuinfo lists it (and no GPU), not the CPU a run plays.
    monkeypatch.delenv("CNNKIT_CPU_FLAGS", raising=False)
    expected = "mixed_bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"} else "float32"
    assert choose_precision(True, gpus=[]).policy == expected


def test_a_played_cpu_is_the_cpu_for_precision_and_info(monkeypatch):
    """CNNKIT_CPU_FLAGS plays another CPU for every decision and report alike: `cnnkit info` never lists
    bfloat16 instructions beside a precision that says the CPU has none."""
    from cnnkit._backends.devices import accelerators

    if accelerators():
        pytest.skip("a GPU decides the precision here (float16), whatever the CPU")
    runner = CliRunner()
    for played, policy, extensions in (("sse4_2 avx avx2 fma", "float32", ["sse4_2", "avx", "avx2", "fma"]),
                                       ("avx2,avx512f,avx512_bf16", "mixed_bfloat16", ["avx2", "avx512f", "avx512_bf16"])):
        monkeypatch.setenv("CNNKIT_CPU_FLAGS", played)
        assert choose_precision(True).policy == policy
        result = runner.invoke(app, ["info", "--format", "json"])
        assert result.exit_code == 0, result.output
        facts = json.loads(result.stdout)
        assert facts["cpu"]["vector_extensions"] == extensions and facts["cpu"]["played_by"] == "CNNKIT_CPU_FLAGS"
        assert facts["mixed_precision"]["policy"] == policy
        assert facts["mixed_precision"]["cpu_bfloat16"] is (policy == "mixed_bfloat16")
        assert "(played by CNNKIT_CPU_FLAGS)" in runner.invoke(app, ["info"]).stdout


def test_precision_reads_the_cpu_flags_from_cpuinfo(tmp_path):
    (tmp_path / "avx2").write_text("processor : 0\nmodel name : AMD EPYC\nflags : fpu sse4_2 avx avx2 fma\n")
    (tmp_path / "bf16").write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert cpu_flags(str(tmp_path / "avx2")) == {"fpu", "sse4_2", "avx", "avx2", "fma"}
    assert cpu_model(str(tmp_path / "avx2")) == "AMD EPYC"
    assert not cpu_has_bfloat16(cpu_flags(str(tmp_path / "avx2")))
    assert cpu_has_bfloat16(cpu_flags(str(tmp_path / "bf16")))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()  # not Linux: unknown, treated as absent


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is a Linux notion")
def test_info_counts_the_cpus_this_process_may_use(monkeypatch):
    """A container's cpuset or taskset limits the CPUs: `cnnkit info` says how many of the host's are usable."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    facts = json.loads(CliRunner().invoke(app, ["info", "--format", "json"]).stdout)
    assert facts["cpu"]["usable_cpus"] == 1 and facts["cpu"]["cores"] == os.cpu_count()
    table = CliRunner().invoke(app, ["info"]).stdout
    assert f"1 of {os.cpu_count()} CPUs usable (CPU affinity)" in table if os.cpu_count() > 1 else "1 CPU" in table


ONEDNN_PROBE = """
import json, os, sys
import cnnkit
switch = os.environ.get("TF_ENABLE_ONEDNN_OPTS")  # set by import cnnkit, before TensorFlow is imported
early = "tensorflow" in sys.modules
import keras
from cnnkit._backends.devices import onednn
print(json.dumps({"switch": switch, "tensorflow_imported_first": early, "onednn": onednn()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="TensorFlow's x86-64 Linux builds carry oneDNN")
@pytest.mark.parametrize("setting, expected", [(None, True), ("0", False)])
def test_tensorflow_runs_on_onednn_on_any_x86_cpu_unless_the_user_said_no(setting, expected):
    """TensorFlow turns oneDNN on by itself only on CPUs with AVX512-VNNI/BF16 or AMX; on an AVX2-only CPU its
    convolutions ran as Eigen contractions, 1.6-1.9x slower to train. ``import cnnkit`` asks for oneDNN on every
    x86-64 CPU before TensorFlow is imported, and a user's TF_ENABLE_ONEDNN_OPTS=0 still wins; `cnnkit info`
    tells which it is (TensorFlow's own answer)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env.update({"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"})
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    probe = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {
        "switch": setting or "1", "tensorflow_imported_first": False, "onednn": expected}
    info = subprocess.run([sys.executable, "-m", "cnnkit.cli", "info", "--format", "json"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    assert json.loads(info.stdout)["onednn"] is expected
    table = subprocess.run([sys.executable, "-m", "cnnkit.cli", "info"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert re.search(r"oneDNN\s+on\b" if expected else r"oneDNN\s+off \(TF_ENABLE_ONEDNN_OPTS=1 turns it on\)",
                     table.stdout), table.stdout


@pytest.mark.backends
@pytest.mark.parametrize("cpu", ["avx2", "this machine"])
def test_mixed_precision_keeps_a_float32_output(cpu, colours, tmp_path, monkeypatch):
    if cpu == "avx2":  # play a CPU without bfloat16: training falls back to float32 and says so
        monkeypatch.setenv("CNNKIT_CPU_FLAGS", "sse4_2 avx avx2 fma")
    policy = precision_policy(True)  # mixed where this machine has the hardware for it, float32 elsewhere
    if cpu == "avx2":
        assert policy == "float32" or policy == "mixed_float16"  # (a GPU machine)
    seen = {}

    class ComputeDtype(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen["conv"] = next(layer for layer in self.model.layers if "conv" in layer.name).compute_dtype

    result = cnnkit.train(colours, tmp_path / "run", model="simple", image_size=16, epochs=1, batch_size=8,
                          mixed_precision=True, callbacks=[ComputeDtype()])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["dtype_policy"] == policy
    assert record["precision"]["policy"] == policy and record["precision"]["requested"] is True
    if policy == "float32":
        assert "no bfloat16" in record["precision"]["reason"]
        said = CliRunner().invoke(app, ["train", str(colours), "--out", str(tmp_path / "cli"), "--model", "simple",
                                        "--image-size", "16", "--epochs", "1", "--mixed-precision"])
        assert said.exit_code == 0, said.output
        assert "precision: float32, not mixed" in said.output and "no bfloat16" in said.output  # on screen
    assert seen["conv"] == {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(policy, "float32")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    # Mixed precision is for training: the saved model computes in float32 on any CPU (and exports).
    model, _ = load_model(tmp_path / "run")
    assert model.outputs[0].dtype == "float32"
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(np.full((1, 16, 16, 3), 90, np.uint8))),
                               keras.ops.convert_to_numpy(result.model(np.full((1, 16, 16, 3), 90, np.uint8))), atol=1e-5)


def test_discriminative_rates_lower_for_earlier_blocks():
    model = build_model("mobilenetv2", 3, (32, 32), weights="none")
    multipliers = layer_lr_multipliers(model, 0.5)
    backbone = model.get_layer("backbone")
    first = backbone.get_layer("Conv1").trainable_weights[0].path
    last = backbone.get_layer("Conv_1").trainable_weights[0].path
    assert multipliers[last] == 1.0 and multipliers[first] == pytest.approx(0.5**9)
    assert layer_lr_multipliers(model, 1.0) == {}


@pytest.mark.backends  # also run on JAX and PyTorch (.ci/backends)
def test_discriminative_rates_scale_each_variable_step():
    a, b = keras.Variable(np.zeros(3, "float32"), name="a"), keras.Variable(np.zeros(3, "float32"), name="b")
    optimizer = make_optimizer(TrainConfig(optimizer="sgd"), 0.1, 10, {b.path: 0.25})
    optimizer.apply([np.ones(3, "float32"), np.ones(3, "float32")], [a, b])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(b) / keras.ops.convert_to_numpy(a), 0.25, rtol=1e-5)


def test_lr_find_suggests_a_rate_and_plots(colours, tmp_path):
    result = CliRunner().invoke(app, ["-q", "lr-find", str(colours), "--image-size", "16", "--batch-size", "8",
                                      "--steps", "40", "--out", str(tmp_path / "lr")])
    assert result.exit_code == 0, result.output
    assert "suggested learning rate" in result.output
    saved = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert 1e-7 <= saved["suggested"] <= saved["minimum"] / 10 * (1 + 1e-9)
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 0
    for steps in ("3", "0", "-5"):  # too few to suggest from: the option is named, before any work
        result = CliRunner().invoke(app, ["lr-find", str(colours), "--steps", steps, "--out", str(tmp_path / "few")])
        assert result.exit_code == 2 and f"at least 5 steps (--steps; default 200). Received: steps={steps}" in \
            result.output, result.output
    assert not (tmp_path / "few").exists()


def test_lr_find_suggestion_on_a_synthetic_curve():
    rates = list(np.logspace(-6, 0, 60))
    losses = [2.0 if r < 1e-4 else (2.0 - 1.5 * (np.log10(r) + 4) / 2 if r < 1e-2 else 0.5 + (np.log10(r) + 2) * 3)
              for r in rates]
    found = _suggest(rates, losses)
    assert 1e-4 <= found.steepest <= 1e-2 and found.suggested <= found.minimum / 10 * (1 + 1e-9)


def test_lr_auto_runs_the_range_test_first(colours, tmp_path):
    result = cnnkit.train(colours, tmp_path / "run", model="simple", image_size=16, epochs=1, batch_size=8, learning_rate="auto")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["train"]["learning_rate"] == "auto"
    assert result.history["learning_rate"][0] == pytest.approx(record["learning_rate_found"], rel=1e-5)


def test_toml_with_every_flag_and_run_json_reproduces_the_run(colours, tmp_path):
    (tmp_path / "train.toml").write_text(
        '[data]\nimage_size = [16, 16]\nval_split = 0.25\nseed = 7\n'
        '[model]\nname = "simple"\n'
        '[train]\nepochs = 1\nbatch_size = 8\nlearning_rate = 0.002\naugment = "light"\npatience = 2\n'
        'optimizer = "adamw"\nweight_decay = 0.001\nschedule = "cosine"\nlabel_smoothing = 0.05\n'
        'class_weight = "auto"\nmixed_precision = false\n')
    runner = CliRunner()
    first = runner.invoke(app, ["-q", "train", str(colours), "--config", str(tmp_path / "train.toml"),
                                "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["-q", "train", str(colours), "--config", str(tmp_path / "a" / "run.json"),
                                "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / r / "run.json").read_text()) for r in "ab")
    assert a["config"] == b["config"] and a["config"]["train"]["optimizer"] == "adamw"
    assert a["augmentation"]["preset"] == "light" and a["augmentation"]["layers"][0]["layer"] == "RandomFlip"
    assert a["metrics"]["val_loss"] == pytest.approx(b["metrics"]["val_loss"], rel=1e-4)


def test_cli_errors_for_bad_options_name_the_fix(colours, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(colours), "--schedule", "linear", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "schedule must be one of" in result.output
    result = runner.invoke(app, ["train", str(colours), "--model", "mobilenetv2", "--fine-tune-epochs", "2",
                                 "--epochs", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, ["train", str(colours), "--lr", "fast", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'auto'" in result.output


# ---- diagnostics: each fires on a run built to trigger it and stays silent on a healthy one ----

def _lr_hints(result):
    return [w for w in result.warnings if "learning rate" in w and "loss" in w]


def test_learning_rate_too_low_is_named(colours, tmp_path):
    result = cnnkit.train(colours, tmp_path / "run", model="simple", image_size=16, epochs=3, batch_size=8, learning_rate=1e-7)
    assert any("too low" in w for w in _lr_hints(result)), result.warnings


def test_learning_rate_too_high_is_named(colours, tmp_path):
    result = cnnkit.train(colours, tmp_path / "run", model="simple", image_size=16, epochs=3, batch_size=8, learning_rate=9.0,
                          optimizer="sgd", patience=5)
    assert any("too high" in w for w in _lr_hints(result)), result.warnings


def test_learning_rate_hints_silent_on_a_healthy_run(colours, tmp_path):
    result = cnnkit.train(colours, tmp_path / "run", model="simple", image_size=16, epochs=3, batch_size=8, learning_rate=3e-3)
    assert _lr_hints(result) == [] and result.metrics["val_accuracy"] > 0.8


def test_plain_keras_model_without_scaling_or_softmax_is_flagged(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Flatten()(inputs)
    bad = keras.Model(inputs, keras.layers.Dense(3)(x))
    bad.save(tmp_path / "bad.keras")
    loaded, meta = load_model(tmp_path / "bad.keras")
    messages = " ".join(meta.extra["warnings"])
    assert "no Rescaling" in messages and "not softmax" in messages and "applies a softmax" in messages
    # its outputs are logits: cnnkit reads probabilities, never a confidence over 100%
    pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    probs = Predictor(tmp_path / "bad.keras").predict_arrays(pixels.astype(np.uint8))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, keras.ops.convert_to_numpy(keras.ops.softmax(bad(pixels))), rtol=1e-4,
                               atol=1e-6)
    scaled = keras.layers.Rescaling(1 / 255)(inputs)
    good = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(scaled)))
    good.save(tmp_path / "good.keras")
    assert load_model(tmp_path / "good.keras")[1].extra["warnings"] == []


def test_grad_cam_of_a_plain_logits_model_differentiates_its_logits(tmp_path):
    """cnnkit puts a Softmax after a plain model's linear output; Grad-CAM still works on the logits."""
    from cnnkit.gradcam import split_model

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(keras.layers.Rescaling(1 / 255)(inputs))
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, logits).save(tmp_path / "logits.keras")
    loaded, _ = load_model(tmp_path / "logits.keras")
    assert loaded.layers[-1].name == "cnnkit_softmax"
    body, head, name = split_model(loaded)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype("float32")
    scores = keras.ops.convert_to_numpy(head(body(pixels)))
    raw = keras.ops.convert_to_numpy(keras.Model(loaded.inputs, loaded.get_layer("logits").output)(pixels))
    assert name == "conv"
    np.testing.assert_allclose(scores, raw, rtol=1e-4, atol=1e-5)
