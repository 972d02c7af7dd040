"""Two-phase training with a backbone, resume, and the refusals around fine-tuning."""

import csv
import json

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.errors import ConfigError
from tests.conftest import write_class_folder


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory):
    """A MobileNetV2 backbone's weights as a test-written file (nothing is downloaded)."""
    path = tmp_path_factory.mktemp("weights") / "mnv2.weights.h5"
    keras.utils.set_random_seed(3)
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    return path


class _PhaseProbe(keras.callbacks.Callback):
    """Records, per fit call, the backbone's trainable flags and its weights at start and end."""

    def __init__(self):
        super().__init__()
        self.fits = []

    def on_train_begin(self, logs=None):
        backbone = self.model.get_layer("backbone")
        self.fits.append({
            "trainable": [(layer.name, type(layer).__name__, layer.trainable) for layer in backbone.layers[1:]],
            "before": [w.copy() for w in backbone.get_weights()],
        })

    def on_train_end(self, logs=None):
        self.fits[-1]["after"] = [w.copy() for w in self.model.get_layer("backbone").get_weights()]


def test_two_phases_freeze_then_unfreeze_the_top_layers(tmp_path, backbone_weights):
    data = write_class_folder(tmp_path / "data", per_class=10)
    probe = _PhaseProbe()
    result = cnnkit.train(data, tmp_path / "run", model="mobilenetv2", weights=str(backbone_weights), image_size=16,
                          epochs=1, fine_tune_epochs=1, fine_tune_layers=6, batch_size=8, force=True,
                          callbacks=[probe])
    phase1, phase2 = probe.fits
    assert not any(trainable for _, _, trainable in phase1["trainable"])
    for before, after in zip(phase1["before"], phase1["after"]):
        np.testing.assert_array_equal(before, after)  # frozen weights (and BN statistics) did not move
    flags = phase2["trainable"]
    top = flags[-6:]
    assert [t for _, kind, t in top] == [kind != "BatchNormalization" for _, kind, _ in top]
    assert not any(t for _, _, t in flags[:-6]), "layers below the top 6 must stay frozen"
    moved = [not np.array_equal(b, a) for b, a in zip(phase2["before"], phase2["after"])]
    assert any(moved) and not all(moved)
    with open(result.run_dir / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["phase"])) for r in rows] == [1, 2] and [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["learning_rate"]) == pytest.approx(1e-4)  # a tenth of the default 1e-3
    record = json.loads((result.run_dir / "run.json").read_text())
    assert [p["phase"] for p in record["phases"]] == [1, 2] and record["phases"][1]["fine_tune_layers"] == 6
    assert record["phases"][1]["unfrozen_layers"] == sum(kind != "BatchNormalization" for _, kind, _ in top)
    assert (result.run_dir / "curves.png").stat().st_size > 0


def test_fine_tuning_refused_before_the_head_has_trained(tmp_path):
    with pytest.raises(ConfigError, match="before the new head has trained.*--force"):
        cnnkit.train(tmp_path, tmp_path / "run", model="mobilenetv2", epochs=0, fine_tune_epochs=2)
    with pytest.raises(ConfigError, match="at most learning_rate / 10"):
        cnnkit.train(tmp_path, tmp_path / "run", model="mobilenetv2", fine_tune_epochs=2, fine_tune_lr=1e-3)
    with pytest.raises(ConfigError, match="needs a pre-trained backbone"):
        cnnkit.train(tmp_path, tmp_path / "run", model="simple", fine_tune_epochs=2)
    with pytest.raises(ConfigError, match="nothing pre-trained to fine-tune"):
        cnnkit.train(tmp_path, tmp_path / "run", model="resnet50", weights="none", fine_tune_epochs=2)


def test_phase_two_is_skipped_when_the_head_stays_at_chance(tmp_path, backbone_weights):
    rng = np.random.default_rng(0)
    from PIL import Image

    for c in ("a", "b", "c"):  # random pixels, random labels: the head cannot beat chance
        (tmp_path / "noise" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "noise" / c / f"{i}.png")
    result = cnnkit.train(tmp_path / "noise", tmp_path / "run", model="mobilenetv2", weights=str(backbone_weights),
                          image_size=16, epochs=1, fine_tune_epochs=1, batch_size=12, learning_rate=1e-6,
                          val_split=0.5)
    assert set(result.history["phase"]) == {1.0}
    assert any(w.startswith("Fine-tuning skipped") and "--force" in w for w in result.warnings), result.warnings


def test_resume_continues_epochs_history_and_optimizer_step(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=12)
    first = cnnkit.train(data, tmp_path / "run", model="simple", image_size=16, epochs=2, batch_size=8)
    steps = int(first.model.optimizer.iterations.numpy()) // 2
    resumed = cnnkit.train(resume=tmp_path / "run", epochs=3)
    assert resumed.run_dir == first.run_dir
    assert int(keras.ops.convert_to_numpy(resumed.model.optimizer.iterations)) == 5 * steps
    with open(tmp_path / "run" / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [float(r["loss"]) for r in rows[:2]] == pytest.approx(first.history["loss"])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["resumed_from"]["epochs_before"] == 2 and record["epochs_run"] == 5
    with pytest.raises(ConfigError, match="--epochs N"):
        cnnkit.train(resume=tmp_path / "run")


def test_more_epochs_after_a_finished_decaying_schedule_get_a_schedule_of_their_own(tmp_path):
    """The onecycle rate is 0 at a run's last step: --epochs N more must not go on at 0 (they learned
    nothing, and momentum alone moved the weights), but follow a new cycle from the run's peak."""
    data = write_class_folder(tmp_path / "data", per_class=12)
    cnnkit.train(data, tmp_path / "run", model="simple", image_size=16, epochs=2, batch_size=8, schedule="onecycle",
                 learning_rate=0.01)
    resumed = cnnkit.train(resume=tmp_path / "run", epochs=3)
    rates = resumed.history["learning_rate"]
    assert rates[1] == pytest.approx(0.0, abs=1e-9)  # where the run's own cycle ended
    assert max(rates[2:]) == pytest.approx(0.01, rel=0.35) and rates[-1] == pytest.approx(0.0, abs=1e-9)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["phases"][-1]["learning_rate"] == pytest.approx(0.01)
    again = cnnkit.train(resume=tmp_path / "run", epochs=2)  # the peak comes from the checkpoint, every time
    assert max(again.history["learning_rate"][5:]) == pytest.approx(0.01, rel=0.35)


def test_resume_an_interrupted_run_finishes_its_epochs(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=12)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise KeyboardInterrupt

    first = cnnkit.train(data, tmp_path / "run", model="simple", image_size=16, epochs=3, batch_size=8,
                         callbacks=[Interrupt()])
    assert first.status == "interrupted"
    resumed = cnnkit.train(resume=tmp_path / "run")
    assert resumed.status == "completed" and len(resumed.history["loss"]) == 3


def test_cli_resume_needs_no_data_dir(tmp_path):
    from typer.testing import CliRunner

    from cnnkit.cli import app

    data = write_class_folder(tmp_path / "data", per_class=12)
    runner = CliRunner()
    first = runner.invoke(app, ["-q", "train", str(data), "--image-size", "16", "--epochs", "1", "--out",
                                str(tmp_path / "run")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["-q", "train", "--resume", str(tmp_path / "run"), "--epochs", "1"])
    assert again.exit_code == 0, again.output
    with open(tmp_path / "run" / "history.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--resume takes a run directory" in missing.output


def test_cli_resume_refuses_options_it_cannot_change_and_applies_the_safe_ones(tmp_path):
    from typer.testing import CliRunner

    from cnnkit.cli import app

    data = write_class_folder(tmp_path / "data", per_class=12)
    runner = CliRunner()
    first = runner.invoke(app, ["-q", "train", str(data), "--model", "simple", "--image-size", "16", "--epochs", "1",
                                "--out", str(tmp_path / "run")])
    assert first.exit_code == 0, first.output
    before = (tmp_path / "run" / "history.csv").read_text()
    refused = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--epochs", "1", "--lr", "0.1",
                                  "--batch-size", "4", "--model", "vgg"])
    assert refused.exit_code == 2
    message = " ".join(refused.output.split())
    for option in ("--learning-rate", "--batch-size", "--model"):
        assert option in message, message
    assert "cannot change" in message and "--epochs" not in message.split("cannot change")[1].split(".")[0]
    assert (tmp_path / "run" / "history.csv").read_text() == before  # nothing was trained or rewritten
    config = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--config", str(tmp_path / "x.toml")])
    assert config.exit_code == 2 and "--config" in config.output
    safe = runner.invoke(app, ["-q", "train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--workers", "1"])
    assert safe.exit_code == 0, safe.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["epochs_run"] == 3 and record["config"]["data"]["workers"] == 1
    assert record["config"]["model"]["name"] == "simple"
