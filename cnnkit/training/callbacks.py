"""Training stage: cnnkit's own Keras callbacks (history with phases, resumable last checkpoint, progress).

``HistoryRecorder`` keeps per-epoch logs with the learning rate and the training phase (1: frozen
backbone or from-scratch model, 2: fine-tuning) across several ``fit`` calls and resumes.
``LastCheckpoint`` writes ``last.keras`` (model + optimizer state) after every epoch, atomically,
so ``cnnkit train --resume RUN`` can continue with the same optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import keras

from cnnkit._progress import progress_task
from cnnkit.rundir import atomic_path
from cnnkit.training.optim import current_learning_rate


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
    """Saves the model with its optimizer state to ``path`` after every epoch (temp file + rename)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with atomic_path(self.path, suffix=".keras") as tmp:
            self.model.save(tmp)


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
