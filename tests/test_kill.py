"""No lost work: processes killed with SIGKILL mid-epoch, mid-save and mid-cache-build; two trainings at once;
a run replaced while it is being read. After each, a run is the previous state or the new one, and
``--resume`` continues."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cnnkit.rundir import lock_is_held, replace_directory, unfinished_runs
from tests.conftest import write_class_folder

REPO = Path(__file__).resolve().parents[1]

# Runs cnnkit.train in a child process that kills itself with SIGKILL at a chosen moment: a harness
# around the real training, so the test sees what a kill -9 (OOM killer, power cut) leaves behind.
TRAIN_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    import keras
    import cnnkit
    from cnnkit import _progress
    _progress.set_progress(False)
    data, out, moment, epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class MidEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.e = e

        def on_train_batch_end(self, batch, logs=None):
            if moment == "mid-epoch" and self.e == epoch and batch == 1:
                die()

    if moment == "mid-save":  # after last.keras of this epoch is fully written, before it replaces the old one
        real_replace, saves = os.replace, []

        def replace(src, dst):
            if str(dst).endswith("last.keras"):
                saves.append(dst)
                if len(saves) == epoch + 1:
                    die()
            return real_replace(src, dst)

        os.replace = replace
    cnnkit.train(data, out, model="simple", image_size=16, epochs=6, batch_size=8, learning_rate=2e-3,
                 callbacks=[MidEpoch()])
""")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "CNNKIT_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _cli(*args: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnkit.cli", *args], capture_output=True, text=True,
                          env=_env(home), timeout=timeout)


def _history(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


@pytest.mark.slow
@pytest.mark.parametrize("moment, epoch", [("mid-epoch", 2), ("mid-save", 3)])
def test_a_run_killed_hard_resumes_from_its_last_epoch(tmp_path, moment, epoch):
    data = write_class_folder(tmp_path / "data", per_class=16)
    run = tmp_path / "runs" / "first"
    killed = subprocess.run([sys.executable, "-c", TRAIN_AND_DIE, str(data), str(run), moment, str(epoch)],
                            capture_output=True, text=True, env=_env(tmp_path / "home"), timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not run.exists()  # the run never appeared half-written
    (partial,) = unfinished_runs(run)
    assert partial.checkpoint and not partial.running and partial.epochs == epoch  # epochs 1..epoch survived
    # the same command again says that an unfinished run exists, and how to go on; nothing is lost
    again = _cli("train", str(data), "--model", "simple", "--image-size", "16", "--epochs", "6", "--out", str(run),
                 home=tmp_path / "home")
    assert again.returncode == 2 and "unfinished run" in again.stderr and "--resume" in again.stderr, again.stderr
    assert partial.path.is_dir()
    # doctor reports it too
    doctor = _cli("doctor", str(data), "--runs", str(run.parent), "--format", "json", home=tmp_path / "home")
    assert any(str(partial.path) in p for p in json.loads(doctor.stdout)["unfinished_runs"]), doctor.stdout
    resumed = _cli("-q", "train", "--resume", str(run), home=tmp_path / "home")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["epochs_run"] == 6
    assert record["resumed_from"]["epochs_before"] == epoch and record["resumed_from"]["from"] == str(partial.path)
    assert _history(run / "history.csv") == [1, 2, 3, 4, 5, 6]  # no epoch lost, none counted twice
    assert unfinished_runs(run) == []  # the partial folder is gone once resumed


@pytest.mark.slow
def test_overwrite_starts_over_and_removes_the_unfinished_run(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=16)
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", TRAIN_AND_DIE, str(data), str(run), "mid-epoch", "1"],
                            capture_output=True, text=True, env=_env(tmp_path / "home"), timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert len(unfinished_runs(run)) == 1
    fresh = _cli("-q", "train", str(data), "--model", "simple", "--image-size", "16", "--epochs", "2", "--out",
                 str(run), "--overwrite", home=tmp_path / "home")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert unfinished_runs(run) == [] and _history(run / "history.csv") == [1, 2]


BUILD_CACHE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cnnkit import _progress
    from cnnkit.data.dataset import load_image_folder
    from cnnkit.config import DataConfig
    _progress.set_progress(False)
    data = load_image_folder(sys.argv[1], DataConfig(image_size=(24, 24), workers=2))
    print(data.cache.decoded, data.data_hash)
""")


@pytest.mark.slow
def test_a_cache_build_killed_mid_write_is_never_trusted_and_is_rebuilt(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=1500, size=32, ext="jpg")
    cache = tmp_path / "home" / "cache"
    for _ in range(5):  # kill while the build is under way (retry if the machine finished first)
        proc = subprocess.Popen([sys.executable, "-c", BUILD_CACHE, str(data)], env=_env(tmp_path / "home"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while proc.poll() is None and not list(cache.glob(".building-*/images.npy")):
            time.sleep(0.005)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not [p for p in cache.iterdir() if not p.name.startswith((".", "hashes"))]:
            break
    else:
        pytest.skip("the cache build always finished before it could be killed on this machine")
    (abandoned,) = cache.glob(".building-*")  # the half-written build is left behind, unrenamed
    deadline = time.monotonic() + 10
    while lock_is_held(abandoned / ".lock") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lock_is_held(abandoned / ".lock")  # its decode workers died with it: nothing holds it
    rebuilt = subprocess.run([sys.executable, "-c", BUILD_CACHE, str(data)], capture_output=True, text=True,
                             env=_env(tmp_path / "home"), timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    decoded, data_hash = rebuilt.stdout.split()
    assert int(decoded) == 4500  # decoded again, not reused from the half-written one
    assert not list(cache.glob(".building-*"))  # and the abandoned build is cleaned up
    again = subprocess.run([sys.executable, "-c", BUILD_CACHE, str(data)], capture_output=True, text=True,
                           env=_env(tmp_path / "home"), timeout=600)
    assert again.stdout.split() == ["0", data_hash]  # the rebuilt cache is whole: the next run reuses it


@pytest.mark.slow
def test_two_trainings_at_once_share_the_cache_without_corrupting_it(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=400, size=24, ext="jpg")
    args = ["-q", "train", str(data), "--model", "simple", "--image-size", "24", "--epochs", "1"]
    procs = [subprocess.Popen([sys.executable, "-m", "cnnkit.cli", *args, "--out", str(tmp_path / f"run{i}")],
                              env=_env(tmp_path / "home"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    records = [json.loads((tmp_path / f"run{i}" / "run.json").read_text()) for i in range(2)]
    assert records[0]["data_hash"] == records[1]["data_hash"]
    assert records[0]["split_sizes"] == records[1]["split_sizes"]
    cache = tmp_path / "home" / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.startswith((".", "hashes"))] == [records[0]["data_hash"]]
    assert not list(cache.glob(".building-*"))
    third = _cli("-q", "train", str(data), "--model", "simple", "--image-size", "24", "--epochs", "1", "--out",
                 str(tmp_path / "run2"), home=tmp_path / "home")
    assert third.returncode == 0 and json.loads((tmp_path / "run2" / "run.json").read_text())["data_hash"] == \
        records[0]["data_hash"]


def test_a_replaced_run_is_never_missing_for_a_reader(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"generation": 0}')
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads((run / "run.json").read_text())["generation"])
            except FileNotFoundError:
                seen.append(None)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for generation in range(1, 201):
            staged = tmp_path / f".run.partial-{generation}"
            staged.mkdir()
            (staged / "run.json").write_text(json.dumps({"generation": generation}))
            replace_directory(staged, run)
    finally:
        stop.set()
        reader.join()
    assert None not in seen  # the old run or the new one, never neither
    assert json.loads((run / "run.json").read_text())["generation"] == 200
    assert seen == sorted(seen) and len(set(seen)) > 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the swapped-out runs are removed
