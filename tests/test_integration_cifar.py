"""End to end on the real CIFAR-10 JPEG folders (skipped where ../shared is absent)."""

import json
import tarfile

import pytest

import cnnkit
from tests.conftest import SHARED_CIFAR

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"{SHARED_CIFAR} not present (CI-only data)")]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_CIFAR) as tar:
        tar.extractall(root, filter="data")
    return root


def test_simple_two_epochs_on_full_cifar10_beats_50_percent(cifar, tmp_path):
    result = cnnkit.train(cifar, tmp_path / "run", model="simple", epochs=2, cache_root=tmp_path / "cache")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    # The automatic validation split: 20%, at most 5,000 images.
    assert record["split_sizes"] == {"train": 45000, "validation": 5000, "test": 10000}
    assert result.metrics["test_accuracy"] > 0.5, result.metrics
    report = cnnkit.evaluate(tmp_path / "run", cifar / "test", cache_root=tmp_path / "cache")
    assert report.accuracy == pytest.approx(result.metrics["test_accuracy"], abs=1e-3)
    print(f"\nCIFAR-10 simple 2 epochs: test accuracy {report.accuracy:.4f}, seconds per epoch "
          f"{result.history['seconds']}, whole run (decode included) {record['train_seconds']} s")


def test_fast_default_within_a_two_minute_budget_beats_the_tutorial_two_epochs(cifar, tmp_path):
    """The default model and recipe (``fast``), fitted to --time-budget, decode included."""
    result = cnnkit.train(cifar, tmp_path / "run", time_budget=120, cache_root=tmp_path / "cache")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["model"]["name"] == "fast"
    # The budget bounds fitting (decode before it, final metrics after it, both scale with the CPU): on a 2-core
    # AVX2 CPU without bfloat16 the whole run took 163.8 s, so the bound is on the clock the budget controls.
    fitted = record["time_budget"]["training_seconds"]
    assert fitted <= 120 * 1.03 + 5, record["time_budget"]
    # The tutorials' small CNN scores ~59% after 2 epochs (2.5 minutes) here; fast must beat it in 2 minutes.
    assert result.metrics["test_accuracy"] > 0.62, result.metrics
    assert result.metrics["test_accuracy_tta"] > 0.6
    print(f"\nCIFAR-10 fast, 2-minute budget: test accuracy {result.metrics['test_accuracy']:.4f} "
          f"({result.metrics['test_accuracy_tta']:.4f} with flip TTA), {len(result.history['loss'])} epochs, "
          f"whole run {record['train_seconds']} s")
