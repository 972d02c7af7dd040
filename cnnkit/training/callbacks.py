"""Training stage: cnnkit's own Keras callbacks (history with phases, resumable last checkpoint, progress).

``HistoryRecorder`` keeps per-epoch logs with the learning rate and the training phase (1: frozen
backbone or from-scratch model, 2: fine-tuning) across several ``fit`` calls and resumes.
``LastCheckpoint`` writes ``last.keras`` (model + optimizer state, and the history so far inside
it, so the two can never disagree) and then ``history.csv`` after every epoch, each atomically, so
``cnnkit train --resume RUN`` continues with the same optimizer step after any interruption, a
``kill -9`` included. ``BestCheckpoint`` keeps the best epoch's weights, also written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zipfile
from pathlib import Path

import keras

from cnnkit._progress import progress_task
from cnnkit.rundir import atomic_path, write_history
from cnnkit.training.optim import current_learning_rate

# The history member inside last.keras: the epochs the checkpointed model has trained.
HISTORY_MEMBER = "cnnkit-history.json"


class HistoryRecorder(keras.callbacks.Callback):
    """Per-epoch logs (plus ``learning_rate`` and ``phase``), kept even when training is interrupted.

    Args:
        history: the history of earlier epochs to continue (a resumed run), or None.
    """

    def __init__(self, history: dict[str, list[float]] | None = None) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {k: list(v) for k, v in (history or {}).items()}
        self.phase = 1

    @property
    def epochs(self) -> int:
        return len(self.history.get("loss", []))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {k: v for k, v in dict(logs or {}).items() if k != "learning_rate"}
        logs["learning_rate"] = current_learning_rate(self.model.optimizer)
        logs["phase"] = self.phase
        logs["seconds"] = round(time.perf_counter() - getattr(self, "_started", time.perf_counter()), 3)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))


class LastCheckpoint(keras.callbacks.Callback):
    """After every epoch: ``last.keras`` (model, optimizer state and the history so far), then ``history.csv``.

    Both are written to a temporary file and renamed, so a process killed at any moment leaves the
    previous checkpoint or the new one, never half of one. Runs after ``HistoryRecorder``.
    """

    def __init__(self, path: Path, recorder: HistoryRecorder, history_csv: Path | None = None) -> None:
        super().__init__()
        self.path, self.recorder, self.history_csv = Path(path), recorder, history_csv

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with atomic_path(self.path, suffix=".keras") as tmp:
            self.model.save(tmp)
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(HISTORY_MEMBER, json.dumps(self.recorder.history))
        if self.history_csv is not None:
            write_history(self.recorder.history, self.history_csv)


def checkpoint_history(path: Path) -> dict[str, list[float]] | None:
    """The history stored inside a ``last.keras`` checkpoint (None for one written before cnnkit stored it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if HISTORY_MEMBER not in archive.namelist():
                return None
            return {k: [float(v) for v in values] for k, values in json.loads(archive.read(HISTORY_MEMBER)).items()}
    except (zipfile.BadZipFile, ValueError, OSError):
        return None


class BestCheckpoint(keras.callbacks.Callback):
    """The weights of the epoch with the lowest ``monitor`` so far, written atomically to ``path``.

    One checkpoint across phases and resumes: ``best`` starts at the best value of earlier epochs.
    """

    def __init__(self, path: Path, monitor: str, best: float | None = None) -> None:
        super().__init__()
        self.path, self.monitor = Path(path), monitor
        self.best = math.inf if best is None else best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)) or float(value) >= self.best:
            return
        self.best = float(value)
        with atomic_path(self.path, suffix=".weights.h5") as tmp:
            self.model.save_weights(tmp)


class RichEpochs(keras.callbacks.Callback):
    """One Rich progress bar per epoch: steps done, loss and accuracy so far.

    ``epochs`` None (a time budget decides): the title shows the budget's time left instead.
    """

    def __init__(self, epochs: int | None, steps: int, phase_label: str = "", budget=None) -> None:
        super().__init__()
        self.epochs, self.steps, self.phase_label, self.budget = epochs, steps, phase_label, budget
        self._stack: contextlib.ExitStack | None = None
        self._advance = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._stack = contextlib.ExitStack()
        if self.epochs is None and self.budget is not None:
            left = int(self.budget.remaining())
            title = f"{self.phase_label}Epoch {epoch + 1} (budget: {left // 60}:{left % 60:02d} left)"
        else:
            title = f"{self.phase_label}Epoch {epoch + 1}/{self.epochs}"
        self._advance = self._stack.enter_context(progress_task(title, self.steps))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._advance is not None:
            logs = logs or {}
            self._advance(1, info=f"loss {logs.get('loss', 0):.3f} acc {logs.get('accuracy', 0):.1%}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self._advance is not None and "val_loss" in logs:
            self._advance(0, info=f"loss {logs['loss']:.3f} acc {logs['accuracy']:.1%} | "
                                  f"val {logs['val_loss']:.3f} {logs['val_accuracy']:.1%}")
        self._close()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._advance = None, None
