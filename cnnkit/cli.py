"""The ``cnnkit`` command: a thin Typer layer over the Python API.

Each command parses options, calls one API function and prints its result. Errors that cnnkit
raises on purpose print ``error: <message>`` and exit with code 2 (``--debug`` shows the
traceback); Ctrl-C exits with 130 after the run directory has been written.
"""

from __future__ import annotations

import os
import time

_PROCESS_STARTED = time.monotonic()  # the cnnkit script's start, near enough: its --time-budget counts from here

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before any import of it

import functools
import inspect
import json
import re
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand

from cnnkit import _progress
from cnnkit._version import __version__
from cnnkit.errors import CnnkitError, ConfigError, RegistryError, RegistryNotFoundError, describe_os_error

app = typer.Typer(
    help="cnnkit: a folder of images in; a trained, evaluated CNN classifier out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class EngineName(str, Enum):
    keras = "keras"
    onnxruntime = "onnxruntime"


class RunEngine(str, Enum):
    """What predict and serve run a model on: an engine, or auto."""

    keras = "keras"
    onnxruntime = "onnxruntime"
    auto = "auto"


_ENGINE_HELP = ("Inference engine: keras; onnxruntime (the model's ONNX export on ONNX Runtime, exported once and "
                "cached; the same answers: probabilities within 1e-4 of Keras's, 1e-3 for --time-budget's "
                "whitening stem); or auto: onnxruntime once the model's export is cached and matched Keras within "
                "1e-4 on the run's test images (no TensorFlow start-up), else keras. An ONNX export folder runs on "
                "onnxruntime.")


def _engine_value(engine: EngineName | RunEngine | None) -> str | None:
    return engine.value if engine is not None else None


class ReportFormat(str, Enum):
    table = "table"
    json = "json"


def _error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


_BACKEND_NOISE = ("absl::InitializeLog", "port.cc", "cpu_feature_guard", "To enable the following instructions",
                  "rebuild TensorFlow", "Unable to register cu", "computation placer already registered")


def _import_keras_quietly(seeds_tensorflow: bool = False) -> None:
    """Import Keras (and its backend) with TensorFlow's C++ start-up lines filtered out of stderr.

    TensorFlow writes them from C++ before Python's logging exists, so TF_CPP_MIN_LOG_LEVEL cannot
    hide them all; anything else written during the import is passed through. ``seeds_tensorflow``:
    the command trains, and ``keras.utils.set_random_seed`` imports TensorFlow (when installed) on
    every backend to seed it too, so on JAX and PyTorch it is imported here, quietly, instead.
    """
    import importlib.util

    if "keras" not in sys.modules:
        if importlib.util.find_spec("keras") is None:  # a slim install (ONNX Runtime only): nothing to import
            return
        _quiet_import("keras")
        _progress.quiet_retracing()
    if seeds_tensorflow and "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is not None:
        try:
            _quiet_import("tensorflow")
        except Exception:  # a broken TensorFlow is Keras's business when (and if) it imports it, not ours here
            pass


def _quiet_import(module: str) -> None:
    import importlib
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not any(noise in line for noise in _BACKEND_NOISE):
                    sys.stderr.write(line + "\n")


def _failure_message(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of a failure the user can act on; None for a bug."""
    if isinstance(exc, CnnkitError):
        return str(exc), 2
    if isinstance(exc, OSError):
        return describe_os_error(exc), 2
    if type(exc).__module__.startswith("sqlalchemy"):  # an error from a registry operation not wrapped below it
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        return (f"The model registry database failed: {reason}. Check --registry-url / CNNKIT_REGISTRY_URL and that "
                "the database server is running, then run the command again."), 2
    if isinstance(exc, MemoryError):
        return ("Out of memory. Use a smaller --batch-size or --image-size; an interrupted training run continues "
                "with --resume."), 2
    return None


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure becomes one line on stderr and a non-zero exit; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if fn.__name__ in ("train", "evaluate", "demo", "lr_find", "review"):  # predict: _import_keras_unless_ready
                _import_keras_quietly(seeds_tensorflow=fn.__name__ in ("train", "demo", "lr_find", "review"))
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            _error("interrupted.")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            known = _failure_message(exc)
            if known is None:
                _error(f"internal error ({type(exc).__name__}: {exc}). Run the command again with --debug for the "
                       "traceback, and please report it.")
                raise typer.Exit(3) from None
            _error(known[0])
            raise typer.Exit(known[1]) from None

    return wrapper


def _stdout_console():
    """Rich console for results on stdout; wide when piped, so rows are not folded for grep."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cnnkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug
    from cnnkit._backends import backend_problem

    problem = backend_problem()
    if problem:  # before any command imports Keras, which would fail with its own error
        _error(problem)
        raise typer.Exit(2)
    # What a --time-budget counts from: the process's start for the cnnkit script (main), else this
    # invocation's (a CliRunner in a long-lived process).
    _state["started"] = _state.pop("process_started", None) or time.monotonic()
    _progress.set_progress(not quiet)


def _parse_image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise ConfigError(f"--image-size takes N or HxW, e.g. 32 or 224x224. Received: image_size={text!r}") from None
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2:
        raise ConfigError(f"--image-size takes N or HxW, e.g. 32 or 224x224. Received: image_size={text!r}")
    return size  # type: ignore[return-value]


_REGISTRY_URL_HELP = "SQLAlchemy URL of the model registry (default: SQLite at $CNNKIT_HOME/registry.db)."
# Listing names needs the zoo (and so Keras); keep --help fast with a static list.
_MODEL_HELP = ("Architecture: fast (cnnkit's fast BatchNorm CNN with its one-cycle recipe; the default up to 64 px), "
               "simple (the tutorials' small CNN), vgg (the tutorials' BatchNorm CNN), or a pre-trained backbone: "
               "efficientnetlite0/1/2 (ImageNet weights from cnnkit[pretrained], no download; efficientnetlite0 is "
               "the default above 64 px when installed, else simple), mobilenetv2, efficientnetb0, resnet50 "
               "(224x224 by default).")


def _parse_duration(text: str | None) -> float | None:
    """'10m', '600s', '1h', '1h30m' or a bare number of minutes -> seconds."""
    if text is None:
        return None
    import re

    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned) * 60
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s)", cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise ConfigError(f"--time-budget takes a duration such as 10m, 600s, 1h or 1h30m (a bare number is minutes). "
                          f"Received: time_budget={text!r}")
    unit = {"h": 3600, "min": 60, "m": 60, "s": 1}
    return sum(float(n) * unit[u] for n, u in parts)


def _number_or_auto(flag: str, key: str, expected: str) -> Callable[[str | None], float | str | None]:
    """A parser of an option that takes a number or 'auto' (``--learning-rate``, ``--progressive``)."""
    def parse(text: str | None) -> float | str | None:
        if text is None or text == "auto":
            return text
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag} takes {expected} or 'auto'. Received: {key}={text!r}") from None
    return parse


_parse_rate = _number_or_auto("--learning-rate", "learning_rate", "a number (e.g. 1e-3)")
_parse_progressive = _number_or_auto("--progressive", "progressive", "a fraction of the image side (e.g. 0.75; 1 = off)")


@dataclass(frozen=True)
class TrainOption:
    """One training option on the command line: a field of the run config (``cnnkit.config.OPTION_KEYS``).

    Attributes:
        name: the flat option name, which is the config field's name (``model`` for ``model.name``).
        type: what the command line takes (before ``parse``).
        help: the ``--help`` text.
        flags: the flags, when not just ``--name-with-dashes``.
        parse: turns the command-line value into the config value.
    """

    name: str
    type: Any
    help: str
    flags: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None

    def parameter(self) -> inspect.Parameter:
        flags = self.flags or (f"--{self.name.replace('_', '-')}",)
        annotation = Annotated[Optional[self.type], typer.Option(*flags, help=self.help)]
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)

    def value(self, given: Any) -> Any:
        return self.parse(given) if self.parse is not None and given is not None else given


# Every training option, once: its flag, type and help. The config key it sets comes from
# cnnkit.config.OPTION_KEYS (the same table the Python API uses), so the two cannot drift apart.
TRAIN_OPTIONS: tuple[TrainOption, ...] = (
    TrainOption("model", str, _MODEL_HELP, ("--model", "-m")),
    TrainOption("weights", str, "Backbones: imagenet (default; efficientnetlite*: the installed cnnkit[pretrained] "
                                "package, others: a Keras download), none (random init) or PATH (.weights.h5, "
                                ".keras backbone, a run directory; efficientnetlite*: also a PyTorch .pth)."),
    TrainOption("head_width", int, "Backbones: units of a hidden Dense layer in the head (0 = none)."),
    TrainOption("dropout", float, "Backbones: dropout before the classifier (default 0.2)."),
    TrainOption("upscale_size", int, "Backbones: upscale smaller inputs to this size inside the model (min 32)."),
    TrainOption("width", str, "fast only: small, medium, large, or auto (medium; under --time-budget, what the "
                              "budget affords)."),
    TrainOption("stem", str, "fast only: conv (default) or whiten (a frozen patch-whitening first layer; the "
                             "default under --time-budget)."),
    TrainOption("init", str, "fast only: default or dirac (the block convolutions start as the identity)."),
    TrainOption("epochs", int, "Maximum epochs (phase 1: backbone frozen). With --resume: how many more."),
    TrainOption("fine_tune_epochs", int, "Phase 2 epochs: unfreeze the backbone's top layers and train on."),
    TrainOption("fine_tune_layers", str, "How many backbone layers to unfreeze in phase 2, or 'all'."),
    TrainOption("fine_tune_lr", float, "Phase 2 learning rate (default: a tenth of --learning-rate)."),
    TrainOption("layer_lr_decay", float, "Discriminative rates in phase 2: factor per earlier backbone block (1 = off)."),
    TrainOption("force", bool, "Allow fine-tuning an untrained head or with a high --fine-tune-lr.",
                ("--force/--no-force",)),
    TrainOption("batch_size", int, "Images per step."),
    TrainOption("learning_rate", str, "Initial rate, or 'auto' (range test first).", ("--learning-rate", "--lr"),
                _parse_rate),
    TrainOption("optimizer", str, "adam (default), sgd (Nesterov momentum) or adamw."),
    TrainOption("weight_decay", float, "Weight decay of sgd and adamw, on kernels only (default 1e-4)."),
    TrainOption("schedule", str, "plateau (default), cosine or onecycle."),
    TrainOption("label_smoothing", float, "Label smoothing, e.g. 0.1 (default 0)."),
    TrainOption("class_weight", str, "auto (balanced, for imbalanced classes) or none."),
    TrainOption("mixed_precision", bool, "float16 on GPU, bfloat16 on CPU.", ("--mixed-precision/--no-mixed-precision",)),
    TrainOption("devices", str, "Train data-parallel on N devices, or 'all' (JAX: keras.distribution.DataParallel; "
                                "TensorFlow: tf.distribute.MirroredStrategy). --batch-size is the global batch, split "
                                "over them; the learning rate is left as it is (default 1)."),
    TrainOption("time_budget", str, "Fit the schedule to a wall-clock budget for the whole run, e.g. 10m, 600s, 1h "
                                    "(replaces --epochs).", parse=_parse_duration),
    TrainOption("ema", float, "Keep an exponential moving average of the weights with this momentum (e.g. 0.99; "
                              "0 = off)."),
    TrainOption("bn_bias_lr", float, "BatchNorm shifts (beta) learn at this many times the rate (1 = off; airbench "
                                     "uses 64)."),
    TrainOption("progressive", str, "fast only: progressive resizing; start at this fraction of the image side "
                                    "(e.g. 0.75) and reach the full size half-way (1 = off), or auto (under "
                                    "--time-budget, the default: on when the budget affords 8 epochs).",
                parse=_parse_progressive),
    TrainOption("tta", str, "Views of the final *_accuracy_tta metrics: auto (flip when the augmentation flips), "
                            "none, flip or flip+crop."),
    TrainOption("augment", str, "none, light, standard, strong, screens (screenshots/documents: no flips) or "
                                "flip-translate (on whole batches in the loader; --model fast's default)."),
    TrainOption("patience", int, "Epochs without val_loss improvement before stopping a phase."),
    TrainOption("overfit_gap", float, "Train-minus-validation accuracy gap reported as overfitting (default 0.15)."),
    TrainOption("image_size", str, "N or HxW; default per model (32 for fast/simple/vgg, 224 for backbones).",
                parse=_parse_image_size),
    TrainOption("color_mode", str, "rgb or grayscale."),
    TrainOption("resize_mode", str, "stretch, pad (keep aspect, letterbox) or crop (centre)."),
    TrainOption("val_split", float, "Validation fraction per class, when there is no validation/ folder."),
    TrainOption("test_split", float, "Test fraction per class, when there is no test/ folder."),
    TrainOption("seed", int, "Seed of the split, shuffle and initialisation."),
    TrainOption("workers", int, "Decode processes (default: one per CPU this process may use)."),
    TrainOption("max_pixels", int, "Images with more pixels are skipped as decompression bombs (default 80 M)."),
    TrainOption("follow_links", bool, "Also follow symbolic links that lead out of the data folder (links inside "
                                      "it are followed; loops never).", ("--follow-links/--no-follow-links",)),
)
_TRAIN_OPTION = {option.name: option for option in TRAIN_OPTIONS}


def _with_train_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named ``TRAIN_OPTIONS`` (all when none named) to a command's signature, after its own parameters.

    The command receives them in ``**options`` as config values (parsed), None when not given.
    """
    chosen = [_TRAIN_OPTION[n] for n in names] if names else list(TRAIN_OPTIONS)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            options = {o.name: o.value(kwargs.pop(o.name, None)) for o in chosen}
            return fn(*args, **kwargs, **options)

        command.__signature__ = inspect.Signature(own + [o.parameter() for o in chosen])  # type: ignore[attr-defined]
        return command

    return decorate


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


@app.command()
@_handle_errors
@_with_train_options()
def train(
    data_dir: Annotated[Optional[Path], typer.Argument(help="root/<class>/*.jpg, or root/train/<class>/ (+ validation/, test/), or a built-in set's name such as cifar10. Optional with --resume.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<model>-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON config (or a run's run.json); options override it.")] = None,
    register: Annotated[Optional[str], typer.Option(help="Register the run in the model registry under this name.")] = None,
    registry_url: Annotated[Optional[str], typer.Option(envvar="CNNKIT_REGISTRY_URL", help=_REGISTRY_URL_HELP)] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit a temperature on the validation split after training.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run from its last checkpoint (optimizer state included); only --epochs, --workers and --devices may be given with it.")] = None,
    **options: Any,
) -> None:
    """Train a classifier on DATA_DIR and write a run directory."""
    from cnnkit.config import read_config
    from cnnkit.training import train as run_training

    if register:  # before training: a bad name or an unreachable registry is said now, not after the run
        from cnnkit.registry import Registry
        from cnnkit.registry.store import check_name

        check_name(register)
        Registry(registry_url).close()
    try:
        if resume is not None:
            if config is not None:
                raise ConfigError("--resume continues a run with its own config; --config cannot be combined with it. "
                                  f"Received: resume='{resume}', config='{config}'")
            result = run_training(data_dir, out, resume=resume, **_given(options))
        else:
            if data_dir is None:
                raise ConfigError("cnnkit train needs DATA_DIR (or --resume RUN).")
            # The file's settings and the options as they are, as the Python API takes them: with no
            # --model, train() still looks at the images (photos: transfer learning) and, under
            # --time-budget, weighs transfer against fast.
            result = run_training(data_dir, out, read_config(config) or None, overwrite=overwrite,
                                  budget_started=_state.get("started"), **_given(options))
    except Exception as exc:
        if isinstance(exc, OSError) and not isinstance(exc, CnnkitError) and not exc.filename and (out or resume):
            exc.filename = str(out or resume)  # a write deep in a library: at least name the run being written
        _point_to_unfinished(out or resume)
        raise
    _progress.say(f"run {'interrupted' if result.status != 'completed' else 'written'}: "
                  f"[bold]{_progress.esc(result.run_dir)}[/]")
    _report_other_unfinished(result.run_dir)
    if calibrate and result.status == "completed":
        _print_calibration(_calibrate_run(result.run_dir))
    if result.status != "completed":
        raise typer.Exit(130)
    if register:
        try:
            with Registry(registry_url) as registry:
                version = registry.add(result.run_dir, register)
        except RegistryError as exc:  # e.g. the database went away during training: the run itself is safe
            raise RegistryError(f"{exc} The run is written at {result.run_dir}; register it once that is fixed: "
                                f"cnnkit registry add {result.run_dir} --name {register}") from exc
        _progress.say(f"registered [bold]{version.ref}[/] in {registry.location}")


def _report_other_unfinished(run_dir: Path) -> None:
    """Unfinished (killed) runs beside the one just written: say so, so they do not pile up unnoticed."""
    from cnnkit.rundir import unfinished_in

    stale = [u for u in unfinished_in(run_dir.parent) if not u.running and not u.finished]
    if stale:
        _progress.warn(f"{len(stale)} unfinished run{'s' if len(stale) > 1 else ''} in '{run_dir.parent}': "
                       f"{stale[0].describe()}. Continue with 'cnnkit train --resume {stale[0].run}', or delete the "
                       "folder.")


def _point_to_unfinished(run: Path | None) -> None:
    """After a failed training run: say where the epochs trained so far are kept, and how to go on."""
    from cnnkit.rundir import unfinished_runs

    kept = [u for u in unfinished_runs(run) if u.checkpoint and not u.running] if run is not None else []
    if kept and kept[0].epochs:
        _progress.warn(f"The {kept[0].epochs} epochs trained so far are kept in '{kept[0].path}': once the problem "
                       f"is fixed, continue with 'cnnkit train --resume {run}'.")


@app.command("lr-find")
@_handle_errors
@_with_train_options("model", "weights", "image_size", "batch_size", "optimizer", "mixed_precision")
def lr_find(
    data_dir: Annotated[Path, typer.Argument(help="The image folder to train on.")],
    steps: Annotated[int, typer.Option(help="Most steps of the range test.")] = 200,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for lr_find.png and lr_find.json.")] = Path("lr-find"),
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON config (or a run's run.json).")] = None,
    **options: Any,
) -> None:
    """Learning-rate range test: loss vs exponentially growing rate; prints a suggested rate."""
    from cnnkit.config import load_config, overrides_from_options
    from cnnkit.training import lr_find as run_lr_find

    cfg = load_config(config, overrides_from_options(_given(options)))
    result = run_lr_find(data_dir, out, cfg, steps=steps)
    typer.echo(f"suggested learning rate: {result.suggested:.2g} (steepest fall {result.steepest:.2g}, "
               f"minimum loss at {result.minimum:.2g}); plot: {out / 'lr_find.png'}")


@app.command()
@_handle_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    data_dir: Annotated[Optional[Path], typer.Argument(help="Labelled folder (default: the run's test split).")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="k of the top-k accuracy.")] = 5,
    name: Annotated[Optional[str], typer.Option(help="Report folder name under RUN/eval/.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 256,
    output: Annotated[ReportFormat, typer.Option("--format", help="table or json on stdout.")] = ReportFormat.table,
    tta: Annotated[bool, typer.Option("--tta", help="Also report test-time augmentation (image + mirror, averaged).")] = False,
    tta_crop: Annotated[bool, typer.Option("--tta-crop", help="TTA with four shifted crops too (implies --tta).")] = False,
) -> None:
    """Evaluate a trained model on a labelled folder; write RUN/eval/<name>/ (metrics, plots, report.html)."""
    from cnnkit.evaluation import evaluate as run_evaluation

    report = run_evaluation(run, data_dir, top_k=top_k, name=name, batch_size=batch_size,
                            tta="flip+crop" if tta_crop else tta)
    if output is ReportFormat.json:
        typer.echo(json.dumps({**report.to_dict(), "out_dir": str(report.out_dir)}, indent=2))
        return
    from rich.table import Table

    typer.echo(f"{report.num_images} images - accuracy {report.accuracy:.2%}, top-{report.k} "
               f"{report.top_k_accuracy:.2%}, loss {report.loss:.4f}")
    table = Table()
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for cls, row in report.per_class.items():
        table.add_row(_progress.esc(cls), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1-score']:.3f}",
                      str(int(row["support"])))
    _stdout_console().print(table)
    typer.echo(f"ECE {report.ece:.4f}; balanced accuracy {report.balanced_accuracy:.2%}; "
               f"{report.num_images} images in {report.seconds:.1f}s")
    if report.tta:
        typer.echo(f"with TTA ({report.tta['mode']}, {report.tta['views']} views): accuracy {report.tta['accuracy']:.2%}, "
                   f"top-{report.k} {report.tta[f'top_{report.k}_accuracy']:.2%}, loss {report.tta['loss']:.4f}")
    typer.echo(f"report: {report.out_dir / 'report.html'}")


def _is_ray_address(text: str) -> bool:
    """``ray://head:10001``, ``head:6379``, ``auto`` or ``local``: a value of ``--ray``, not a path."""
    return "://" in text or text in ("auto", "local") or re.fullmatch(r"[\w.-]+:\d+", text) is not None


class _RayOptionCommand(TyperCommand):
    """``--ray [ADDRESS]``: a bare ``--ray`` (followed by no address) means a local Ray.

    Click options take a value or none; Typer has no optional value, so a bare ``--ray`` is given
    the value ``local`` before parsing. Only an address-looking word is taken as its value, so
    ``--ray RUN IMAGES`` still reads RUN and IMAGES as arguments.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = list(args)
        for index, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--ray" and (index + 1 == len(args) or not _is_ray_address(args[index + 1])):
                args.insert(index + 1, "local")
        return super().parse_args(ctx, args)


class PredictFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"


@app.command(cls=_RayOptionCommand)
@_handle_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory, .keras file or ONNX export folder.")],
    paths: Annotated[list[str], typer.Argument(help="Images, folders (recursive) or glob patterns.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to list per image.")] = 3,
    output: Annotated[PredictFormat, typer.Option("--format", help="table, json or csv on stdout; json, csv or parquet with --out.")] = PredictFormat.table,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per model call (default: 256 for images up to 32x32, 64 from 64x64 up).")] = None,
    engine: Annotated[RunEngine, typer.Option(help=_ENGINE_HELP)] = RunEngine.auto,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the predictions to this file (csv, json or parquet by --format, default csv), in input order, atomically.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Predict as a Ray Data stage: --ray alone for a local Ray, --ray ADDRESS for a cluster (ray://host:10001, host:6379, auto; on a cluster --out must be on storage every node shares). Needs cnnkit[ray].", metavar="[ADDRESS]")] = None,
    ray_workers: Annotated[int, typer.Option(min=1, help="With --ray: Ray actors, each loading the model once.")] = 2,
) -> None:
    """Predict the class of images; exit 1 if any input could not be read."""
    fmt = output.value if out is None or output is not PredictFormat.table else "csv"
    if out is None and output is PredictFormat.parquet:
        raise ConfigError("Parquet is written to a file: add --out predictions.parquet. Received: format='parquet', "
                          "out=None")
    if out is not None and Path(out).is_dir():  # before any prediction: --out names the file to write
        raise ConfigError(f"--out '{out}' is a folder; it takes the file to write, e.g. --out "
                          f"{Path(out) / ('predictions.' + fmt)}. Received: out='{out}'")
    if ray is not None:  # the Ray workers load the model in this process's environment
        _import_keras_quietly()
    else:
        _import_keras_unless_ready(run, _engine_value(engine))
    if ray is not None:
        from cnnkit.predict_ray import predict_with_ray

        # Without --out the predictions come back to this process and are printed as without --ray.
        done = predict_with_ray(run, paths, out, fmt if out is not None else "csv",
                                address=None if ray == "local" else ray, workers=ray_workers, batch_size=batch_size,
                                top_k=top_k, engine=_engine_value(engine))
        where = f" -> {done.out}" if done.out is not None else ""
        _progress.say(f"{done.count} predictions from {done.workers} Ray workers on {done.engine} "
                      f"({done.shards} shards merged){where}")
        if out is not None:
            _error_or_say(done.failed, done.count, None)
            return
        results = done.predictions
    else:
        from cnnkit.predict import Predictor, write_predictions
        from cnnkit.rundir import is_onnx_export

        predictor = Predictor(run, batch_size=batch_size, engine=_engine_value(engine))
        if engine is RunEngine.auto and predictor.engine.name == "onnxruntime" and not is_onnx_export(run):
            _progress.say("engine: onnxruntime, on this model's cached ONNX export (it matched Keras within 1e-4 on "
                          "the run's test images); --engine keras runs Keras")
        results = predictor.predict(paths, top_k=top_k)
        if out is not None:
            write_predictions(results, out, fmt)
            _error_or_say(sum(1 for r in results if r.error), len(results), f"{len(results)} predictions -> {out}")
            return
    from cnnkit.predict import predictions_text

    if output in (PredictFormat.json, PredictFormat.csv):
        typer.echo(predictions_text(results, output.value), nl=False)
    else:
        from rich.table import Table

        table = Table()
        table.add_column("image", overflow="fold")
        for column in ("label", "confidence", f"top {top_k}"):
            table.add_column(column)
        for r in results:
            if r.error:
                table.add_row(_progress.esc(r.path), "[red]error[/]", "", f"[red]{_progress.esc(r.error)}[/]")
            else:
                table.add_row(_progress.esc(r.path), _progress.esc(r.label), f"{r.confidence:.1%}",
                              _progress.esc(", ".join(f"{n} {p:.1%}" for n, p in r.top_k)))
        _stdout_console().print(table)
    _error_or_say(sum(1 for r in results if r.error), len(results), None)


def _import_keras_unless_ready(source: str | Path, engine: str | None) -> None:
    """Keras, imported quietly, unless ONNX Runtime runs a ready export (an export folder, or a run whose
    export is cached): then none, seconds of start-up saved (``predict``, ``serve``)."""
    from cnnkit.engines import AUTO, cached_onnx_export, engine_for
    from cnnkit.rundir import is_onnx_export

    try:  # auto picks onnxruntime only for a ready export
        ready = engine_for(source, engine) == "onnxruntime" and (
            engine == AUTO or is_onnx_export(source) or cached_onnx_export(source) is not None)
    except (CnnkitError, OSError):  # NAME@stage, a missing model: what loads it resolves it or says what is wrong
        ready = engine == "onnxruntime"
    if not ready:
        _import_keras_quietly()


def _error_or_say(failed: int, total: int, done: str | None) -> None:
    """Report where the predictions went (stderr); exit 1 when some inputs could not be predicted."""
    if done:
        _progress.say(done)
    if failed:
        _error(f"{failed} of {total} inputs could not be predicted (see the error column).")
        raise typer.Exit(1)


@app.command()
@_handle_errors
def doctor(
    data_dir: Annotated[Path, typer.Argument(help="The image folder to check.")],
    strict: Annotated[bool, typer.Option(help="Exit 1 when any problem is found.")] = False,
    output: Annotated[ReportFormat, typer.Option("--format", help="table or json on stdout.")] = ReportFormat.table,
    workers: Annotated[Optional[int], typer.Option(
        help="Processes reading images (default: one per CPU this process may use).")] = None,
    follow_links: Annotated[bool, typer.Option("--follow-links", help="Also follow links that lead out of DATA_DIR, as 'train --follow-links' would.")] = False,
    runs: Annotated[Path, typer.Option(help="Folder of run directories whose unfinished (killed) runs to report.")] = Path("runs"),
) -> None:
    """Report what is in DATA_DIR and what is wrong with it; never modifies a file."""
    from cnnkit.data.checks import doctor as run_doctor
    from cnnkit.data.checks import print_report

    report = run_doctor(data_dir, workers=workers, follow_links=follow_links, runs=runs)
    if output is ReportFormat.json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if strict and report.problems:
        raise typer.Exit(1)


@app.command()
@_handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's data and run.")] = Path("cnnkit-demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
    model: Annotated[str, typer.Option("--model", "-m", help=_MODEL_HELP)] = "simple",
) -> None:
    """Train, evaluate and predict on the digits the package ships (no network)."""
    from cnnkit.demo import run_demo

    summary = run_demo(out, epochs=epochs, model=model)
    typer.echo(json.dumps(summary, indent=2))


# Each optional extra of pyproject.toml and the modules that show it is installed.
EXTRAS = {"jax": ("jax",), "torch": ("torch",), "serve": ("fastapi", "uvicorn", "multipart", "prometheus_client", "httpx"),
          "export": ("tf2onnx", "onnx", "onnxruntime"), "postgres": ("psycopg",), "ray": ("ray",)}


def machine_info() -> dict[str, Any]:
    """What ``cnnkit info`` reports: backend, devices, mixed precision, CPU, cnnkit's folders, extras."""
    import importlib.util
    import re

    _import_keras_quietly()
    import keras

    from cnnkit._backends import devices
    from cnnkit.config import PRETRAINED_MODULE, cnnkit_home
    from cnnkit.data.cache import default_cache_root
    from cnnkit.registry.artifacts import default_artifact_root
    from cnnkit.registry.store import default_url

    backend = keras.backend.backend()
    flags = devices.cpu_flags()
    precision = devices.choose_precision(True)
    registry = default_url()
    usable = devices.usable_cpus()
    extras = {name: all(importlib.util.find_spec(module) is not None for module in modules)
              for name, modules in {**EXTRAS, "pretrained": (PRETRAINED_MODULE,)}.items()}
    return {
        "cnnkit": __version__, "python": sys.version.split()[0], "keras": keras.__version__,
        "backend": backend, "backend_version": devices.backend_version(backend),
        "devices": devices.devices(backend),
        "onednn": devices.onednn(backend),
        "mixed_precision": {**precision.as_dict(), "cpu_bfloat16": devices.cpu_has_bfloat16(flags)},
        "cpu": {"model": devices.cpu_model(), "cores": os.cpu_count() or usable, "usable_cpus": usable,
                "vector_extensions": [flag for flag in devices.VECTOR_FLAGS if flag in flags],
                "played_by": devices.PLAYED_FLAGS_ENV if os.environ.get(devices.PLAYED_FLAGS_ENV) is not None else None},
        "home": str(cnnkit_home()), "cache": str(default_cache_root()),
        "registry": re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", registry),  # never print a password
        "artifacts": default_artifact_root(registry),
        "extras": extras,
    }


def _cores(cpu: dict) -> str:
    """"2 CPUs", or "2 of 64 CPUs usable (CPU affinity)" when this process may run on only some of them."""
    count = f"{cpu['cores']} CPU{'s' if cpu['cores'] != 1 else ''}"
    return count if cpu["usable_cpus"] == cpu["cores"] else f"{cpu['usable_cpus']} of {count} usable (CPU affinity)"


@app.command()
@_handle_errors
def info(
    output: Annotated[ReportFormat, typer.Option("--format", help="table or json on stdout.")] = ReportFormat.table,
) -> None:
    """The backend and its devices, mixed precision here, the CPU's vector extensions, cnnkit's folders, extras."""
    facts = machine_info()
    if output is ReportFormat.json:
        typer.echo(json.dumps(facts, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None)
    mixed = facts["mixed_precision"]
    rows = [("cnnkit", f"{facts['cnnkit']} (Python {facts['python']}, Keras {facts['keras']})"),
            ("backend", f"{facts['backend']} {facts['backend_version']}  (set KERAS_BACKEND to change)"),
            ("devices", ", ".join(facts["devices"])),
            *([("oneDNN", "on" if facts["onednn"] else "off (TF_ENABLE_ONEDNN_OPTS=1 turns it on)")]
              if facts["onednn"] is not None else []),
            ("mixed precision", f"{mixed['policy']}: {mixed['reason']}"),
            ("cpu", f"{facts['cpu']['model']}, {_cores(facts['cpu'])}"),
            ("vector extensions", (" ".join(facts["cpu"]["vector_extensions"]) or "unknown")
             + (f"  (played by {facts['cpu']['played_by']})" if facts["cpu"]["played_by"] else "")),
            ("home", facts["home"]), ("cache", facts["cache"]), ("registry", facts["registry"]),
            ("artifacts", facts["artifacts"]),
            ("extras", "  ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in facts["extras"].items()))]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", escape(str(value)))
    _stdout_console().print(table)


# -- model registry ---------------------------------------------------------------------------------

registry_app = typer.Typer(help="The model registry: numbered, staged versions of trained runs (SQL).",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
_RegistryUrl = Annotated[Optional[str], typer.Option("--registry-url", envvar="CNNKIT_REGISTRY_URL",
                                                     help=_REGISTRY_URL_HELP)]


def _open_registry(url: str | None, artifact_root: str | None = None, create: bool = False):
    """The registry at ``url``; only ``create`` (registering) makes a SQLite file that is not there yet."""
    from cnnkit.registry import Registry

    return Registry(url, artifact_root=artifact_root, create=create)


def _name_at_version(ref: str) -> tuple[str, int]:
    from cnnkit.registry import parse_ref

    name, selector = parse_ref(ref)
    if selector is None or not selector.isdigit():
        raise ConfigError(f"Give the version as NAME@VERSION, e.g. '{name}@3' (see 'cnnkit registry list {name}'). "
                          f"Received: {ref!r}")
    return name, int(selector)


def _print_versions(versions: list) -> None:
    from rich.table import Table

    table = Table()
    for column in ("model", "stage", "created", "architecture", "image size", "classes", "val acc", "test acc", "sha256"):
        table.add_column(column)
    for v in versions:
        acc = v.metrics.get("val_accuracy")
        test = v.metrics.get("test_accuracy")
        table.add_row(v.ref, v.stage, v.created.strftime("%Y-%m-%d %H:%M"), v.architecture,
                      "x".join(map(str, v.image_size)), str(len(v.class_names)),
                      f"{acc:.1%}" if acc is not None else "", f"{test:.1%}" if test is not None else "", v.sha256[:12])
    _stdout_console().print(table)


@registry_app.command("add")
@_handle_errors
def registry_add(
    run: Annotated[Path, typer.Argument(help="Run directory (or .keras file) to register.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name; each add makes its next version.")],
    notes: Annotated[str, typer.Option(help="Free text stored with the version.")] = "",
    stage: Annotated[str, typer.Option(help="none, staging, production or archived.")] = "none",
    registry_url: _RegistryUrl = None,
    artifact_root: Annotated[Optional[str], typer.Option(envvar="CNNKIT_ARTIFACT_ROOT", help=(
        "Folder or URL of the immutable model copies (default: artifacts/ beside a SQLite registry, "
        "else $CNNKIT_HOME/artifacts)."))] = None,
) -> None:
    """Register RUN as a new version of NAME (its model is copied; later changes to RUN are not served)."""
    with _open_registry(registry_url, artifact_root, create=True) as registry:
        version = registry.add(run, name, notes=notes, stage=stage)
    typer.echo(f"registered {version.ref} (stage {version.stage}, sha256 {version.sha256[:12]}) -> {version.artifact_path}")


@registry_app.command("list")
@_handle_errors
def registry_list(
    name: Annotated[Optional[str], typer.Argument(help="Only this model's versions.")] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
    registry_url: _RegistryUrl = None,
) -> None:
    """List registered versions."""
    try:
        with _open_registry(registry_url) as registry:
            versions = registry.list(name)
    except RegistryNotFoundError:
        if registry_url is not None or name is not None:  # a URL given (or a model asked for): say what is missing
            raise
        versions = []  # the default registry, before anything was registered: empty, and nothing written
    if output is OutputFormat.json:
        typer.echo(json.dumps([v.to_dict() for v in versions], indent=2))
    elif not versions:
        typer.echo("The registry is empty: register a run with 'cnnkit registry add RUN --name NAME'.")
    else:
        _print_versions(versions)


@registry_app.command("show")
@_handle_errors
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME (latest), NAME@VERSION or NAME@STAGE, e.g. flowers@production.")],
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
    registry_url: _RegistryUrl = None,
) -> None:
    """Show everything recorded about one version."""
    with _open_registry(registry_url) as registry:
        version = registry.get(ref)
    data = version.to_dict()
    if output is OutputFormat.json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value)
        typer.echo(f"{key:>16}: {text}")


@registry_app.command("promote")
@_handle_errors
def registry_promote(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION.")],
    stage: Annotated[str, typer.Option(help="none, staging, production (archives the previous one) or archived.")] = "production",
    registry_url: _RegistryUrl = None,
) -> None:
    """Move a version to a stage; one production version per name, switched atomically."""
    name, number = _name_at_version(ref)
    with _open_registry(registry_url) as registry:
        version = registry.promote(name, number, stage)
    typer.echo(f"{version.ref} is now {version.stage}")


@registry_app.command("delete")
@_handle_errors
def registry_delete(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION.")],
    registry_url: _RegistryUrl = None,
) -> None:
    """Remove a version from the registry (never the production one); its copy goes with the last version using it."""
    from cnnkit.registry.artifacts import artifact_exists

    name, number = _name_at_version(ref)
    with _open_registry(registry_url) as registry:
        version = registry.delete(name, number)
        in_use = version.artifact_stored and any(v.artifact_path == version.artifact_path for v in registry.list())
    if not version.artifact_stored:
        kept = f"its model file is the run's own, kept: {version.artifact_path}"
    elif in_use:
        kept = f"its copy is kept for the other versions using it: {version.artifact_path}"
    elif artifact_exists(version.artifact_path):
        kept = ("its copy is kept for another registry sharing the store (or one from before cnnkit listed a "
                f"copy's registries): {version.artifact_path}")
    else:
        kept = ""
    typer.echo(f"deleted {version.ref} from the registry; " + (kept or f"removed its copy {version.artifact_path}"))


@registry_app.command("verify")
@_handle_errors
def registry_verify(
    name: Annotated[Optional[str], typer.Argument(help="Only this model's versions.")] = None,
    registry_url: _RegistryUrl = None,
) -> None:
    """Re-hash every registered artifact; exit 1 if any is missing or changed."""
    with _open_registry(registry_url) as registry:
        results = registry.verify(name)
    for r in results:
        typer.echo(f"{r.status:>8}  {r.ref}  {r.artifact_path}")
    bad = [r for r in results if r.status != "ok"]
    if bad:
        _error(f"{len(bad)} of {len(results)} artifacts are missing or changed since registration.")
        raise typer.Exit(1)
    typer.echo(f"all {len(results)} artifacts match their registered sha256")


# -- serving ----------------------------------------------------------------------------------------


@app.command()
@_handle_errors
def serve(
    source: Annotated[str, typer.Argument(help="Run directory, .keras file, or NAME@production / NAME@VERSION.")],
    name: Annotated[Optional[str], typer.Option(help="Model name in the URLs (default: registry or run name).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (TF Serving's REST port is 8501).")] = 8501,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Most images per model call (default 32).")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(help="How long a request waits to share a batch (default 5).")] = None,
    batching: Annotated[Optional[bool], typer.Option("--batching/--no-batching", help="Micro-batch concurrent requests.")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help="Larger request bodies get 413 (default 20 MiB).")] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="Images waiting for the model before 429 (default 512).")] = None,
    request_timeout_s: Annotated[Optional[float], typer.Option(help="Seconds a queued request may wait before 504 (default 30).")] = None,
    registry_url: _RegistryUrl = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    engine: Annotated[Optional[RunEngine], typer.Option(help=_ENGINE_HELP + " Default: keras, which answers every "
                                                       "route, :explain included. Env: CNNKIT_ENGINE.")] = None,
) -> None:
    """Serve a model over TensorFlow Serving's REST API (plus /predict, /healthz, /readyz, /metrics, /docs)."""
    from cnnkit.engines import engine_for

    chosen = _engine_value(engine) or os.environ.get("CNNKIT_ENGINE") or None
    engine_for(source, chosen)  # an unknown engine fails before anything loads
    from cnnkit.serve import listen

    sock = listen.bind(host, port)  # before the model loads: a bad --host/--port or a port in use fails at once
    _import_keras_unless_ready(source, chosen)  # onnxruntime serves a ready export without importing Keras
    from cnnkit.serve import create_app

    api = create_app(source, name=name, registry_url=registry_url, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, batching=batching, max_body_bytes=max_body_bytes, max_queue=max_queue,
                     request_timeout_s=request_timeout_s, engine=chosen)
    served = api.state.source
    _progress.say(f"serving [bold]{served.path}[/] as {listen.url(host, sock)}v1/models/{served.name} "
                  f"(version {served.version})")
    listen.run(api, sock, log_level=log_level)


@app.command()
@_handle_errors
def ui(
    source: Annotated[str, typer.Argument(help="Run directory, .keras file, or NAME@production / NAME@VERSION.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 0,
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="Open the page (--no-browser: print its URL).")] = True,
    registry_url: _RegistryUrl = None,
) -> None:
    """Open the web page for a model: drop images, see predictions, Grad-CAM and the model card (Ctrl-C stops)."""
    import webbrowser

    from cnnkit.serve import listen

    sock = listen.bind("127.0.0.1", port)  # before the model loads: a port in use fails at once
    url = listen.url("127.0.0.1", sock)
    _import_keras_quietly()
    from cnnkit.serve import create_app

    def ready() -> None:
        typer.echo(url)
        if browser and not webbrowser.open(url):
            _error(f"no web browser found; open {url} yourself.")

    listen.run(create_app(source, registry_url=registry_url), sock, log_level="warning", on_ready=ready)


# -- export -----------------------------------------------------------------------------------------


@app.command("export")
@_handle_errors
def export_model(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    format: Annotated[str, typer.Option("--format", "-f", help="savedmodel (TF Serving), onnx or tflite (float + int8).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder to write (default RUN/export/<format>).")] = None,
) -> None:
    """Export a model as a SavedModel, ONNX or TFLite (raw 0-255 pixels in, probabilities out)."""
    _import_keras_quietly()
    from cnnkit.deploy import export

    result = export(run, format, out)
    for path in result.files:
        typer.echo(f"wrote {path}")


@app.command()
@_handle_errors
def docker(
    source: Annotated[str, typer.Argument(help="Run directory, .keras file, or NAME@production / NAME@VERSION.")],
    tag: Annotated[Optional[str], typer.Option(help="Image tag (default cnnkit-<name>:<version>).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Build context folder to write.")] = Path("docker-context"),
    build: Annotated[bool, typer.Option("--build/--no-build", help="Run docker build when a daemon is available.")] = True,
    registry_url: _RegistryUrl = None,
    engine: Annotated[Optional[EngineName], typer.Option(help=(
        "keras: TensorFlow inside (every route; the default for a run or .keras file); onnxruntime: a slim image of "
        "ONNX Runtime, numpy, Pillow and FastAPI, no TensorFlow (:explain answers 501; the default for an ONNX "
        "export folder)."))] = None,
) -> None:
    """Write a Docker build context serving a model (and build it when Docker is available)."""
    _import_keras_quietly()
    from cnnkit.deploy import build_image, write_build_context

    context = write_build_context(source, out, tag=tag, registry_url=registry_url, engine=_engine_value(engine))
    typer.echo(f"build context: {context.path} (model '{context.name}', tag {context.tag})")
    if build and build_image(context):
        typer.echo(f"built {context.tag}; run: docker run -p 127.0.0.1:8501:8501 {context.tag}")
    else:
        typer.echo("build it with: " + " ".join(context.build_command))

# --- issue 5: explain, calibrate, review, compare -----------------------------------------------


@app.command()
@_handle_errors
def explain(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    images: Annotated[list[str], typer.Argument(help="Images, folders or glob patterns.")],
    class_name: Annotated[Optional[str], typer.Option("--class", help="Explain this class (default: the predicted one).")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Feature-map layer (default: the last one, found automatically).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the PNGs (default RUN/explain).")] = None,
) -> None:
    """Grad-CAM: where the model looked. Writes image | heatmap | overlay PNGs."""
    _import_keras_quietly()
    from cnnkit.gradcam import explain as run_explain

    for h in run_explain(run, images, class_name=class_name, layer=layer, out=out):
        typer.echo(f"{h.source}\tpredicted {h.predicted}\t{h.class_name} {h.probability:.1%}\t-> {h.path}")


def _calibrate_run(run: Path, data: Path | None = None, min_confidence: float | None = None,
                   target_precision: float | None = None):
    from cnnkit.evaluation import calibrate as run_calibration

    return run_calibration(run, data, min_confidence=min_confidence, target_precision=target_precision)


def _print_calibration(result) -> None:
    typer.echo(f"temperature {result.temperature:.4f} (fitted on {result.num_images} held-out images): "
               f"ECE {result.ece_before:.4f} -> {result.ece_after:.4f}, log-loss {result.loss_before:.4f} -> "
               f"{result.loss_after:.4f}")
    if result.min_confidence is not None:
        precision = "n/a" if result.precision_at_threshold is None else f"{result.precision_at_threshold:.2%}"
        typer.echo(f"abstain below confidence {result.min_confidence:.4f}: answers {result.coverage:.1%} of "
                   f"those images with precision {precision}; the rest come back as 'unknown'")
    typer.echo(f"reliability diagram: {result.plot}")


@app.command()
@_handle_errors
def calibrate(
    run: Annotated[Path, typer.Argument(help="Run directory (model.keras and run.json are updated).")],
    data: Annotated[Optional[Path], typer.Option(help="Labelled folder to fit on (default: the run's validation split).")] = None,
    min_confidence: Annotated[Optional[float], typer.Option(help="Abstain threshold: lower confidences predict 'unknown'.")] = None,
    target_precision: Annotated[Optional[float], typer.Option(help="Choose the threshold reaching this precision on validation.")] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json on stdout.")] = OutputFormat.table,
) -> None:
    """Fit temperature scaling on validation images; predict (and serve) then use it."""
    _import_keras_quietly()
    result = _calibrate_run(run, data, min_confidence, target_precision)
    if output is OutputFormat.json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_calibration(result)


@app.command()
@_handle_errors
def review(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    data_dir: Annotated[Path, typer.Argument(help="Labelled folder to review (e.g. the training folder).")],
    top: Annotated[int, typer.Option(help="How many images to list.")] = 100,
    held_out_only: Annotated[bool, typer.Option("--held-out-only", help="Only images the run did not train on.")] = False,
    folds: Annotated[Optional[int], typer.Option(help="Score out-of-fold: retrain K models with the run's config.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default RUN/review/<name>).")] = None,
) -> None:
    """Likely-mislabelled images (confident disagreements) as CSV and an HTML gallery; changes no file."""
    _import_keras_quietly()
    from cnnkit.evaluation import review as run_review

    queue = run_review(run, data_dir, top=top, held_out_only=held_out_only, folds=folds, out=out)
    for n, item in enumerate(queue.items[:10]):
        typer.echo(f"{n + 1:>3} {item.path}\tfolder {item.given} ({item.p_given:.1%})\tmodel {item.predicted} "
                   f"({item.p_predicted:.1%})\t{item.split}")
    typer.echo(f"queue: {queue.out_dir / 'queue.csv'}\ngallery: {queue.out_dir / 'gallery.html'}")


@app.command()
@_handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
    eval_name: Annotated[Optional[str], typer.Option("--eval", help="Evaluation name under RUN/eval/ (default: latest).")] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json on stdout.")] = OutputFormat.table,
) -> None:
    """Runs side by side: model, data hash, epochs, accuracy, top-k, per-class F1 deltas vs the first."""
    _import_keras_quietly()  # cnnkit.evaluation imports Keras: without TensorFlow's start-up lines
    from cnnkit.evaluation import compare as run_compare

    result = run_compare(list(runs), eval_name)
    if output is OutputFormat.json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2%}"

    table = Table(title="runs")
    for column in ("run", "model", "data hash", "epochs", "val acc", "eval", "accuracy", "top-k", "macro F1", "ECE", "TTA acc"):
        table.add_column(column)
    for r in result.runs:
        table.add_row(r.run, r.model, r.data_hash[:12], str(r.epochs or "-"), pct(r.val_accuracy), r.eval_name or "-",
                      pct(r.accuracy), pct(r.top_k_accuracy) + (f" (k={r.top_k})" if r.top_k else ""),
                      "-" if r.macro_f1 is None else f"{r.macro_f1:.3f}", "-" if r.ece is None else f"{r.ece:.3f}",
                      pct(r.tta_accuracy))
    console = _stdout_console()
    console.print(table)
    if result.class_names and len(result.runs) > 1:
        deltas = Table(title="per-class F1: first run, then change")
        deltas.add_column("class")
        for r in result.runs:
            deltas.add_column(Path(r.run).name)
        for c in result.class_names:
            first = result.runs[0].per_class_f1.get(c)
            cells = ["-" if first is None else f"{first:.3f}"]
            for d in result.f1_delta[c][1:]:
                cells.append("-" if d is None else (f"[green]{d:+.3f}[/]" if d > 0 else f"[red]{d:+.3f}[/]" if d < 0 else f"{d:+.3f}"))
            deltas.add_row(c, *cells)
        console.print(deltas)
    for message in result.warnings:
        _progress.warn(message)



def main() -> None:
    """Entry point of the ``cnnkit`` script."""
    # A file name need not be valid UTF-8: print it back as the bytes it is (stdout, for pipes), or
    # escaped (stderr), instead of failing on it.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        try:
            stream.reconfigure(errors=errors)
        except (AttributeError, ValueError):  # not a text stream that can be reconfigured
            pass
    _state["process_started"] = _PROCESS_STARTED
    app(prog_name="cnnkit")


if __name__ == "__main__":
    sys.exit(main())
