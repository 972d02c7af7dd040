"""Progressive resizing (--progressive): fast trains its first epochs at a lower resolution, then at
the full size; evaluation, the saved model and its exports see the full size."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.config import RunConfig, TrainConfig, resolve_config
from cnnkit.errors import ConfigError
from cnnkit.models import build_model
from cnnkit.models.fast import without_progressive
from cnnkit.training.progressive import GROWN_BY, progressive_side, resize_layer
from tests.conftest import write_class_folder


@pytest.mark.parametrize("start, full, expected", [
    (0.75, 32, [24, 24, 28, 28, 32, 32]),
    (0.5, 32, [16, 16, 24, 28, 32, 32]),
    (0.75, 16, [12, 12, 12, 12, 16, 16]),
    (0.75, 30, [24, 24, 28, 28, 30, 30]),  # 22.5 px rounds to the nearest step
    (0.25, 28, [8, 12, 16, 24, 28, 28]),  # never below 8 px: fast pools three times
    (0.75, 10, [8, 8, 8, 8, 10, 10]),
    (0.75, 8, [8] * 6),  # too small to go lower: full size throughout
    (1.0, 32, [32] * 6),
])
def test_the_side_grows_in_steps_to_full_by_half_way(start, full, expected):
    progress = [0.0, 0.1, 0.26, 0.49, GROWN_BY, 0.99]
    assert [progressive_side(p, start, full) for p in progress] == expected


def test_the_layer_downscales_in_training_only():
    model = build_model("fast", 3, (32, 32), width="small", resizable=True)
    layer = resize_layer(model)
    assert layer is not None and resize_layer(build_model("fast", 3, (32, 32), width="small")) is None
    upto = keras.Model(model.inputs[0], layer.output)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    layer.side = (24, 24)
    assert tuple(upto(images, training=True).shape) == (2, 24, 24, 3)
    # at inference the model sees its full input: the same answers as with no side set
    inference = keras.ops.convert_to_numpy(model(images, training=False))
    layer.side = None
    np.testing.assert_array_equal(inference, keras.ops.convert_to_numpy(model(images, training=False)))
    plain = without_progressive(model)  # what a run saves: the same answers without the layer
    assert resize_layer(plain) is None and len(plain.layers) == len(model.layers) - 1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(images)), inference, rtol=0, atol=1e-6)
    assert tuple(upto(images, training=True).shape) == (2, 32, 32, 3)


@pytest.mark.backends
def test_the_shorter_side_follows_the_schedule_and_the_other_keeps_the_aspect():
    from cnnkit.training.progressive import ProgressiveResizing

    for size, expected in (((32, 48), (24, 36)), ((48, 32), (36, 24)), ((8, 8), None)):
        model = build_model("fast", 3, size, width="small", resizable=True)
        callback = ProgressiveResizing(0.75, size, lambda epoch: 0.0)
        callback.set_model(model)
        callback.on_epoch_begin(0)
        assert resize_layer(model).side == expected, size
        callback.on_train_end()
        assert resize_layer(model).side is None


def test_training_steps_run_at_each_side_and_the_run_ends_at_full_size(tmp_path, monkeypatch):
    """The training step is traced again at every new side: the resize sees 24 px, then 28 px. The run
    records each epoch's side, and the saved model loads in a new process and predicts at 32 px."""
    seen: list[tuple[int, int]] = []
    resize = keras.ops.image.resize

    def recording(images, size, *args, **kwargs):
        seen.append(tuple(int(s) for s in size))
        return resize(images, size, *args, **kwargs)

    monkeypatch.setattr(keras.ops.image, "resize", recording)
    data = write_class_folder(tmp_path / "data", per_class=12, size=32)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--model", "fast", "--width", "small",
                                      "--epochs", "4", "--batch-size", "8", "--progressive", "0.75"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "progressive resizing: training at 24, then 28 px over the first half of the run, then at the full 32 px" \
        in said and "costs about 56%" in said
    assert {(24, 24), (28, 28)} <= set(seen) and (32, 32) not in seen
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["train"]["progressive"] == 0.75
    assert record["phases"][0]["progressive_sides"] == [24, 28, 32, 32]
    # the saved model is plain Keras: no training-only layer, and it loads without cnnkit
    load = ("import sys, keras, numpy as np; m = keras.saving.load_model(sys.argv[1]); "
            "assert not any(n.startswith('cnnkit') for n in sys.modules), 'cnnkit imported'; "
            "assert 'progressive_resize' not in [l.name for l in m.layers]; "
            "print(m.predict(np.zeros((1, 32, 32, 3), 'uint8'), verbose=0).shape)")
    loaded = subprocess.run([sys.executable, "-c", load, str(out / "model.keras")], capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0 and "(1, 3)" in loaded.stdout, loaded.stderr[-2000:]
    # a resumed run trains on at full size: its first epochs had the lower sides
    seen.clear()
    resumed = CliRunner().invoke(app, ["-q", "train", "--resume", str(out), "--epochs", "1", "--out",
                                       str(tmp_path / "resumed")])
    assert resumed.exit_code == 0, resumed.output
    phases = json.loads((tmp_path / "resumed" / "run.json").read_text())["phases"]
    assert "progressive_sides" not in phases[-1] and not seen


def test_progressive_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="progressive must be a fraction"):
        TrainConfig(progressive=0.1)
    data = write_class_folder(tmp_path / "data", per_class=4)
    bad = CliRunner().invoke(app, ["-q", "train", str(data), "--out", str(tmp_path / "run"), "--progressive", "half"])
    assert bad.exit_code != 0 and "--progressive takes a fraction" in bad.output and "Traceback" not in bad.output
    with pytest.raises(ConfigError, match="fast model only"):
        resolve_config(None, model="simple", progressive=0.75)
    assert RunConfig().train.progressive == 1.0  # off unless asked for


def test_a_time_budget_turns_progressive_resizing_on_when_it_affords_enough_epochs():
    from cnnkit.config import BUDGET_PROGRESSIVE, PROGRESSIVE_MIN_EPOCHS, load_config
    from cnnkit.training.budget import BudgetPlan, choose_progressive

    budget = load_config(None, {"train.time_budget": 60})
    assert budget.train.progressive == "auto" and budget.train.progressive_start == 1.0  # decided by the budget
    plan = BudgetPlan(600, train_images=45_000, validation_images=5_000, after_training_images=25_000)
    long_enough = choose_progressive(budget, plan, PROGRESSIVE_MIN_EPOCHS + 2)
    assert long_enough.train.progressive == BUDGET_PROGRESSIVE < 1.0
    assert plan.progressive["start"] == BUDGET_PROGRESSIVE and "here 10.0" in plan.progressive["rule"]
    assert choose_progressive(budget, plan, 3.0).train.progressive == 1.0  # a short run: all epochs at full size
    assert plan.to_dict()["progressive"]["start"] == 1.0
    # just short of the rule: off, and the run says so without rounding up to the number it needed
    assert choose_progressive(budget, plan, PROGRESSIVE_MIN_EPOCHS - 0.02).train.progressive == 1.0
    assert f"here {PROGRESSIVE_MIN_EPOCHS - 0.1:.1f}" in plan.progressive["rule"]
    told = load_config(None, {"train.time_budget": 60, "train.progressive": 1.0})
    assert choose_progressive(told, plan, 50.0).train.progressive == 1.0  # what the user says stands
    assert load_config(None, {"model.name": "fast"}).train.progressive == 1.0  # without a budget: off
    simple = load_config(None, {"train.time_budget": 60, "model.name": "simple", "train.progressive": "auto"})
    assert choose_progressive(simple, plan, 50.0).train.progressive == 1.0  # only fast takes any size
    assert TrainConfig(progressive="auto").progressive_start == 1.0
