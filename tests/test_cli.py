import csv
import io
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app
from tests.conftest import write_class_folder

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    write_class_folder(base / "data" / "train", per_class=24, seed=5)
    write_class_folder(base / "data" / "test", per_class=6, seed=6)
    result = runner.invoke(app, ["--quiet", "train", str(base / "data"), "--model", "simple", "--epochs", "4",
                                 "--image-size", "16", "--batch-size", "16", "--out", str(base / "runs" / "first")])
    assert result.exit_code == 0, result.output
    return base


def test_train_evaluate_predict_commands(cli_run):
    base = cli_run
    run = base / "runs" / "first"
    assert (run / "model.keras").exists()
    result = invoke("evaluate", run, base / "data" / "test", "--top-k", "2", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 18
    images = base / "data" / "test" / "red"
    result = invoke("predict", run, images / "red_000.png", images, "--top-k", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 7 and len(rows[0]["top_k"]) == 3 and rows[0]["path"].endswith("red_000.png")
    assert [r["label"] for r in rows] == ["red"] * 7  # every input is a red image
    result = invoke("predict", run, str(images / "*.png"), "--format", "csv")
    assert result.exit_code == 0
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(table) == 6 and set(table[0]) == {"path", "label", "confidence", "top_k", "error"}
    result = invoke("predict", run, images / "red_000.png")
    assert result.exit_code == 0 and "red_000.png" in result.stdout


def test_predict_exit_code_when_some_inputs_fail(cli_run, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"")
    Image.new("RGB", (16, 16), (30, 30, 200)).save(tmp_path / "ok.png")
    result = invoke("predict", cli_run / "runs" / "first", tmp_path, "--format", "json")
    assert result.exit_code == 1
    rows = {r["path"].split("/")[-1]: r for r in json.loads(result.stdout)}
    assert rows["bad.jpg"]["error"] == "empty file (0 bytes)" and rows["ok.png"]["error"] is None


@pytest.mark.parametrize("setup, args, fragment", [
    ("missing", ["train", "{tmp}/nope"], "does not exist"),
    ("empty_class", ["train", "{tmp}/data"], "has no images"),
    ("single", ["train", "{tmp}/data"], "single class"),
    ("good", ["train", "{tmp}/data", "--model", "resnet5"], "Available:"),
    ("good", ["train", "{tmp}/data", "--epochs", "0"], "epochs must be >= 1"),
    ("good", ["train", "{tmp}/data", "--image-size", "big"], "--image-size takes"),
    ("good", ["evaluate", "{tmp}/no-run", "{tmp}/data"], "No run directory"),
    ("good", ["predict", "{tmp}/data", "x.jpg"], "No model.keras"),
])
def test_errors_exit_2_with_a_message_not_a_traceback(tmp_path, setup, args, fragment):
    if setup in ("good", "empty_class"):
        write_class_folder(tmp_path / "data", per_class=2)
    if setup == "empty_class":
        (tmp_path / "data" / "purple").mkdir()
    if setup == "single":
        write_class_folder(tmp_path / "data", per_class=2, classes={"one": (1, 1, 1)})
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and fragment in result.output
    assert "Traceback" not in result.output


def test_existing_run_dir_needs_overwrite(cli_run):
    result = invoke("train", cli_run / "data", "--epochs", "1", "--image-size", "16", "--out", cli_run / "runs" / "first")
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_doctor_strict_exit_codes(tmp_path):
    root = write_class_folder(tmp_path / "data", per_class=12)
    assert invoke("doctor", root, "--strict").exit_code == 0
    (root / "red" / "broken.jpg").write_bytes(b"nope")
    result = invoke("doctor", root, "--strict", "--format", "json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["unreadable"][0]["path"].endswith("broken.jpg")
    assert invoke("doctor", root).exit_code == 0


def test_demo_runs_on_shipped_data(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo", "--epochs", "6")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["test_accuracy"] > 0.8  # 10 digit classes: chance is 0.1
    assert len(summary["predictions"]) == 10


def test_demo_refuses_bad_options_before_writing_anything(tmp_path):
    for options, says in ((["--epochs", "0"], "epochs must be >= 1"), (["--model", "nope"], "Unknown model 'nope'")):
        result = invoke("demo", "--out", tmp_path / "demo", *options)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not (tmp_path / "demo").exists()
