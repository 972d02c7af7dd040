"""Training stage: continuing a run from its ``last.keras`` checkpoint (``cnnkit train --resume RUN``).

The checkpoint is the newest of the run directory's own and those of its unfinished partial
folders (``.RUN.partial-*``: a run killed hard, by ``kill -9``, the OOM killer or a power cut, or a
resume that was itself cut off), so a run loses at most the epoch it was in. A resumed run keeps
its own config, so what it trained and the schedule it follows stay one run.
Only the options in ``cnnkit.config.RESUMABLE_OPTIONS`` may be given again: ``epochs`` (how many
more), ``workers`` and ``devices`` (how many devices share each batch). Any other option is refused
with the names of the options that cannot change, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from cnnkit._progress import say
from cnnkit.config import RESUMABLE_OPTIONS, RunConfig, config_from_dict
from cnnkit.errors import ConfigError, ModelError, RunNotFoundError
from cnnkit.rundir import HISTORY_CSV, RUN_JSON, read_history, read_json, unfinished_runs
from cnnkit.training.callbacks import checkpoint_history
from cnnkit.training.fitting import DECAYING_SCHEDULES, Phase

CHECKPOINTS = ("best.weights.h5", "last.keras")


@dataclass
class ResumePoint:
    """Where a resumed run starts: the checkpointed model, its history, the phases left, the run it continues."""

    model: keras.Model
    history: dict[str, list[float]]
    plan: list[Phase]
    resumed_from: dict[str, Any]
    config: RunConfig
    data_dir: str
    source: Path  # the folder whose checkpoints it starts from: the run, or an unfinished partial of it


def resume_config(run_dir: Path, options: dict[str, Any]) -> RunConfig:
    """The config a resumed ``run_dir`` trains with: its own, plus the ``RESUMABLE_OPTIONS`` given.

    Raises:
        RunNotFoundError: no run.json. ConfigError: options that cannot change on resume, or a
        run trained to a time budget.
    """
    source = _checkpoint_folder(run_dir)
    given = {key: value for key, value in options.items() if value is not None}
    fixed = sorted(set(given) - set(RESUMABLE_OPTIONS))
    if fixed:
        names = ", ".join(f"{key} (--{key.replace('_', '-')})" for key in fixed)
        raise ConfigError(
            f"A resumed run keeps the settings it was trained with, so these options cannot change: {names}. Drop "
            f"them to continue '{run_dir}', or start a new run with --out to train with them. Only "
            f"{', '.join(RESUMABLE_OPTIONS)} may be given with --resume.")
    record = read_json(source / RUN_JSON)
    cfg = config_from_dict(record["config"])
    if given.get("workers"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=given["workers"]))
    if given.get("devices"):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, devices=given["devices"]))
    if cfg.train.time_budget:
        raise ConfigError(f"Run '{run_dir}' was trained to a time budget, whose schedule cannot be continued: start a "
                          "new run (--time-budget) instead. Received: resume with time_budget="
                          f"{cfg.train.time_budget:g}")
    return cfg


def prepare_resume(run_dir: Path, options: dict[str, Any]) -> ResumePoint:
    """Read ``run_dir`` and load its ``last.keras``, ready to continue.

    On several devices, call it inside ``cnnkit.training.distribute.distributed`` so the model's
    variables are created where the run trains.

    Args:
        run_dir: a run directory written by ``cnnkit train``.
        options: flat options given with the resume; only ``RESUMABLE_OPTIONS`` are allowed.

    Raises:
        RunNotFoundError: no run.json. ModelError: no usable last.keras.
        ConfigError: options that cannot change on resume, or nothing left to train.
    """
    cfg = resume_config(run_dir, options)
    source = _checkpoint_folder(run_dir)
    record = read_json(source / RUN_JSON)
    given = {key: value for key, value in options.items() if value is not None}
    history = checkpoint_history(source / "last.keras")
    if history is None:  # a checkpoint written before cnnkit stored the history inside it
        if not (source / HISTORY_CSV).is_file():
            raise ModelError(f"'{source}' has a last.keras but no history.csv, so the epochs it trained are unknown: "
                             "it cannot be resumed. Start a new run instead.")
        history = read_history(source / HISTORY_CSV)
    unfinished = record.get("status") in ("interrupted", "running")
    plan, phase, restart = _remaining_phases(cfg, history, unfinished, given.get("epochs"))
    if not plan:
        raise ConfigError(f"Run '{run_dir}' completed its {len(history.get('loss', []))} epochs; pass --epochs N to "
                          "train N more. Received: epochs=None")
    try:
        model = keras.saving.load_model(source / "last.keras", compile=True)
    except Exception as exc:  # Keras raises many types for unloadable files
        raise ModelError(f"Cannot load '{source / 'last.keras'}' to resume: {exc}") from exc
    if restart:
        plan = new_schedule(cfg, model, plan)
    where = "" if source == run_dir else f" from its unfinished run '{source.name}'"
    say(f"resuming '{run_dir}'{where} at epoch {len(history.get('loss', [])) + 1} (phase {phase}, optimizer step "
        f"{int(keras.ops.convert_to_numpy(model.optimizer.iterations))})")
    resumed = {"run": str(run_dir), "from": str(source), "epochs_before": len(history.get("loss", [])), "phase": phase}
    return ResumePoint(model, history, plan, resumed, cfg, record["data_dir"], source)


def _checkpoint_folder(run_dir: Path) -> Path:
    """The run directory or its unfinished partial folder holding the newest resumable checkpoint.

    Raises:
        RunNotFoundError: neither holds a run. ModelError: no checkpoint to resume from.
        ConfigError: the only unfinished partial folder is being written by a living process.
    """
    def resumable(folder: Path) -> bool:
        return all((folder / name).is_file() for name in (RUN_JSON, "last.keras"))

    partials = unfinished_runs(run_dir)
    busy = [u for u in partials if u.running]
    candidates = [u.path for u in partials if not u.running and not u.finished and resumable(u.path)]
    if resumable(run_dir):
        candidates.append(run_dir)
    if candidates:
        return max(candidates, key=lambda folder: (folder / "last.keras").stat().st_mtime)
    if busy:
        raise ConfigError(f"'{run_dir}' is being trained now by another process ({busy[0].describe()}); wait for it "
                          "to finish before resuming.")
    if not (run_dir / RUN_JSON).is_file() and not partials:
        raise RunNotFoundError(f"No run.json in '{run_dir}', and no unfinished run of it: --resume takes a run "
                               "directory written by 'cnnkit train'.")
    raise ModelError(f"'{run_dir}' has no last.keras checkpoint to resume from (it was cut off before its first epoch "
                     "ended, or written before cnnkit kept one). Start a new run instead"
                     + (" (--overwrite removes the unfinished one)." if partials else "."))


def _remaining_phases(cfg: RunConfig, history: dict[str, list[float]], interrupted: bool,
                      more: int | None) -> tuple[list[Phase], int, bool]:
    """The phases left: the rest of the current phase (or ``more`` epochs of it), then fine-tuning if
    planned; and whether the ``more`` epochs need a schedule of their own (``new_schedule``)."""
    phase = int(history["phase"][-1]) if history.get("phase") else 1
    done = sum(1 for p in history.get("phase", [1] * len(history.get("loss", []))) if int(p) == phase)
    planned = cfg.train.epochs if phase == 1 else cfg.train.fine_tune_epochs
    restart = bool(more) and not interrupted and cfg.train.schedule in DECAYING_SCHEDULES
    more = more or (planned - done if interrupted else 0)
    plan = [Phase(phase, more, None)] if more > 0 else []
    if phase == 1 and interrupted and cfg.train.fine_tune_epochs:
        plan.append(Phase(2, cfg.train.fine_tune_epochs, cfg.train.phase2_learning_rate))
    return plan, phase, restart


def new_schedule(cfg: RunConfig, model: keras.Model, plan: list[Phase]) -> list[Phase]:
    """``plan``'s first phase with a schedule of its own, from the peak of the one it continues.

    A completed cosine or onecycle phase ended at rate 0: continuing its schedule would train the
    ``--epochs N`` more at 0 (momentum alone moving the weights, for the worse). The peak is read from
    the checkpoint's own schedule (onecycle's warm-up target, cosine's start), so it holds however
    often the run was resumed; the weights stay those of ``last.keras`` (``Phase.continued``).
    """
    first = plan[0]
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # a loss-scale wrapper's inner one
    schedule = getattr(optimizer, "_learning_rate", None)
    config = schedule.get_config() if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) else {}
    peak = config.get("warmup_target") or config.get("initial_learning_rate")
    if not peak:
        return plan
    say(f"the run's {cfg.train.schedule} schedule ended at rate 0 with its last epoch, so the {first.epochs} more "
        f"epoch{'s get' if first.epochs != 1 else ' gets'} a new {cfg.train.schedule} schedule, peak {float(peak):g}")
    return [Phase(first.number, first.epochs, float(peak), continued=True), *plan[1:]]


def copy_checkpoints(run_dir: Path, target: Path) -> None:
    """The checkpoints a continuation starts from, copied into the run being written."""
    for name in CHECKPOINTS:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)
