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


def test_fast_default_keeps_a_three_minute_budget_on_any_cpu(cifar, tmp_path):
    """The default model and recipe (``fast``), fitted to --time-budget, decode included.

    A budget is a promise on any machine: the run ends within 3% (+2 s) of the time asked, whether
    the CPU trains in bfloat16 or in float32 (AVX2 only, 1.5-2x slower). What it reaches depends on the
    CPU (bench/time_to_accuracy.py measures it); here it must at least have learned.
    """
    budget = 180
    result = cnnkit.train(cifar, tmp_path / "run", time_budget=budget, cache_root=tmp_path / "cache")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["model"]["name"] == "fast"
    assert record["train_seconds"] <= budget * 1.03 + 2, record["train_seconds"]
    assert record["train_seconds"] >= budget * 0.85, record["train_seconds"]  # and it used the time
    assert record["time_budget"]["probes"], record["time_budget"]  # the width came from this machine's speed
    assert result.metrics["test_accuracy"] > 0.3, result.metrics  # chance is 10%; ~73% on a bf16 CPU
    print(f"\nCIFAR-10 fast, 3-minute budget: width {record['time_budget']['width']} "
          f"({record['time_budget']['reason']}), test accuracy {result.metrics['test_accuracy']:.4f} "
          f"({result.metrics['test_accuracy_tta']:.4f} with flip TTA), {len(result.history['loss'])} epochs, "
          f"whole run {record['train_seconds']} s")
