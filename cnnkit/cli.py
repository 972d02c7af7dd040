"""The ``cnnkit`` command: a thin Typer layer over the Python API.

Each command parses options, calls one API function and prints its result. Errors that cnnkit
raises on purpose print ``error: <message>`` and exit with code 2 (``--debug`` shows the
traceback); Ctrl-C exits with 130 after the run directory has been written.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before any import of it

import csv
import functools
import io
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from cnnkit import _progress
from cnnkit._version import __version__
from cnnkit.errors import CnnkitError, ConfigError

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


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)


_BACKEND_NOISE = ("absl::InitializeLog", "port.cc", "cpu_feature_guard", "To enable the following instructions",
                  "rebuild TensorFlow", "Unable to register cu", "computation placer already registered")


def _import_keras_quietly() -> None:
    """Import Keras (and its backend) with TensorFlow's C++ start-up lines filtered out of stderr.

    TensorFlow writes them from C++ before Python's logging exists, so TF_CPP_MIN_LOG_LEVEL cannot
    hide them all; anything else written during the import is passed through.
    """
    if "keras" in sys.modules:
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not any(noise in line for noise in _BACKEND_NOISE):
                    sys.stderr.write(line + "\n")


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if fn.__name__ in ("train", "evaluate", "predict", "demo", "lr_find"):
                _import_keras_quietly()
            return fn(*args, **kwargs)
        except CnnkitError as exc:
            if _state["debug"]:
                raise
            _error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _error("interrupted.")
            raise typer.Exit(130) from None

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


def _model_help() -> str:
    # Listing names needs the registry (and so Keras); keep --help fast with a static list.
    return ("Architecture: simple (the tutorials' small CNN, default), vgg (the BatchNorm CNN), or a pre-trained "
            "backbone: mobilenetv2, efficientnetb0, resnet50 (224x224 by default).")


def _parse_rate(text: str | None, option: str = "--learning-rate") -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} takes a number (e.g. 1e-3) or 'auto'. Received: learning_rate={text!r}") from None


@app.command()
@_handle_errors
def train(
    data_dir: Annotated[Optional[Path], typer.Argument(help="root/<class>/*.jpg, or root/train/<class>/ (+ validation/, test/). Optional with --resume.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=_model_help())] = None,
    weights: Annotated[Optional[str], typer.Option(help="Backbones: imagenet (download, default), none (random init) or PATH (.weights.h5, .keras backbone or a run directory).")] = None,
    head_width: Annotated[Optional[int], typer.Option(help="Backbones: units of a hidden Dense layer in the head (0 = none).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Backbones: dropout before the classifier (default 0.2).")] = None,
    upscale_size: Annotated[Optional[int], typer.Option(help="Backbones: upscale smaller inputs to this size inside the model (min 32).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs (phase 1: backbone frozen). With --resume: how many more.")] = None,
    fine_tune_epochs: Annotated[Optional[int], typer.Option(help="Phase 2 epochs: unfreeze the backbone's top layers and train on.")] = None,
    fine_tune_layers: Annotated[Optional[str], typer.Option(help="How many backbone layers to unfreeze in phase 2, or 'all'.")] = None,
    fine_tune_lr: Annotated[Optional[float], typer.Option(help="Phase 2 learning rate (default: a tenth of --learning-rate).")] = None,
    layer_lr_decay: Annotated[Optional[float], typer.Option(help="Discriminative rates in phase 2: factor per earlier backbone block (1 = off).")] = None,
    force: Annotated[Optional[bool], typer.Option("--force/--no-force", help="Allow fine-tuning an untrained head or with a high --fine-tune-lr.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step.")] = None,
    learning_rate: Annotated[Optional[str], typer.Option("--learning-rate", "--lr", help="Initial rate, or 'auto' (range test first).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adam (default), sgd (Nesterov momentum) or adamw.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="adamw's weight decay (default 1e-4).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="plateau (default), cosine or onecycle.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing, e.g. 0.1 (default 0).")] = None,
    class_weight: Annotated[Optional[str], typer.Option(help="auto (balanced, for imbalanced classes) or none.")] = None,
    mixed_precision: Annotated[Optional[bool], typer.Option("--mixed-precision/--no-mixed-precision", help="float16 on GPU, bfloat16 on CPU.")] = None,
    image_size: Annotated[Optional[str], typer.Option(help="N or HxW; default per model (32 for simple/vgg, 224 for backbones).")] = None,
    color_mode: Annotated[Optional[str], typer.Option(help="rgb or grayscale.")] = None,
    resize_mode: Annotated[Optional[str], typer.Option(help="stretch, pad (keep aspect, letterbox) or crop (centre).")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Validation fraction per class, when there is no validation/ folder.")] = None,
    test_split: Annotated[Optional[float], typer.Option(help="Test fraction per class, when there is no test/ folder.")] = None,
    augment: Annotated[Optional[str], typer.Option(help="none, light, standard, strong or screens (screenshots/documents: no flips).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Epochs without val_loss improvement before stopping a phase.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split, shuffle and initialisation.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Decode processes (default: every core).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<model>-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON config (or a run's run.json); options override it.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run from its last checkpoint (optimizer state included).")] = None,
) -> None:
    """Train a classifier on DATA_DIR and write a run directory."""
    from cnnkit.config import load_config
    from cnnkit.train import train as run_training

    if resume is not None:
        result = run_training(data_dir, out, resume=resume, **({"epochs": epochs} if epochs else {}))
    else:
        if data_dir is None:
            raise ConfigError("cnnkit train needs DATA_DIR (or --resume RUN).")
        cfg = load_config(config, {
            "model.name": model, "model.weights": weights, "model.head_width": head_width, "model.dropout": dropout,
            "model.upscale_size": upscale_size,
            "train.epochs": epochs, "train.batch_size": batch_size, "train.learning_rate": _parse_rate(learning_rate),
            "train.fine_tune_epochs": fine_tune_epochs, "train.fine_tune_layers": fine_tune_layers,
            "train.fine_tune_lr": fine_tune_lr, "train.layer_lr_decay": layer_lr_decay, "train.force": force,
            "train.optimizer": optimizer, "train.weight_decay": weight_decay, "train.schedule": schedule,
            "train.label_smoothing": label_smoothing, "train.class_weight": class_weight,
            "train.mixed_precision": mixed_precision,
            "train.augment": augment, "train.patience": patience, "data.image_size": _parse_image_size(image_size),
            "data.color_mode": color_mode, "data.resize_mode": resize_mode, "data.val_split": val_split,
            "data.test_split": test_split, "data.seed": seed, "data.workers": workers,
        })
        result = run_training(data_dir, out, cfg, overwrite=overwrite)
    _progress.say(f"run {'interrupted' if result.status != 'completed' else 'written'}: [bold]{result.run_dir}[/]")
    if result.status != "completed":
        raise typer.Exit(130)


@app.command("lr-find")
@_handle_errors
def lr_find(
    data_dir: Annotated[Path, typer.Argument(help="The image folder to train on.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=_model_help())] = None,
    weights: Annotated[Optional[str], typer.Option(help="Backbones: imagenet, none or PATH.")] = None,
    image_size: Annotated[Optional[str], typer.Option(help="N or HxW; default per model.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adam, sgd or adamw.")] = None,
    steps: Annotated[int, typer.Option(help="Most steps of the range test.")] = 200,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for lr_find.png and lr_find.json.")] = Path("lr-find"),
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON config (or a run's run.json).")] = None,
) -> None:
    """Learning-rate range test: loss vs exponentially growing rate; prints a suggested rate."""
    from cnnkit.config import load_config
    from cnnkit.lr_find import lr_find as run_lr_find

    cfg = load_config(config, {"model.name": model, "model.weights": weights, "train.batch_size": batch_size,
                               "train.optimizer": optimizer, "data.image_size": _parse_image_size(image_size)})
    result = run_lr_find(data_dir, out, cfg, steps=steps)
    typer.echo(f"suggested learning rate: {result.suggested:.2g} (steepest fall {result.steepest:.2g}, "
               f"minimum loss at {result.minimum:.2g}); plot: {out / 'lr_find.png'}")


@app.command()
@_handle_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    data_dir: Annotated[Optional[Path], typer.Argument(help="Labelled folder (default: the run's test split).")] = None,
    top_k: Annotated[int, typer.Option(help="k of the top-k accuracy.")] = 5,
    name: Annotated[Optional[str], typer.Option(help="Report folder name under RUN/eval/.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 256,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json on stdout.")] = OutputFormat.table,
) -> None:
    """Evaluate a trained model on a labelled folder; write RUN/eval/<name>/."""
    from cnnkit.evaluate import evaluate as run_evaluation

    report = run_evaluation(run, data_dir, top_k=top_k, name=name, batch_size=batch_size)
    if output is OutputFormat.json:
        typer.echo(json.dumps({**report.to_dict(), "out_dir": str(report.out_dir)}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{report.num_images} images - accuracy {report.accuracy:.2%}, top-{report.k} "
                        f"{report.top_k_accuracy:.2%}, loss {report.loss:.4f}")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for cls, row in report.per_class.items():
        table.add_row(cls, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1-score']:.3f}",
                      str(int(row["support"])))
    _stdout_console().print(table)
    typer.echo(f"report: {report.out_dir}")


@app.command()
@_handle_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    paths: Annotated[list[str], typer.Argument(help="Images, folders (recursive) or glob patterns.")],
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 3,
    output: Annotated[OutputFormat, typer.Option("--format", help="table, json or csv on stdout.")] = OutputFormat.table,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 64,
) -> None:
    """Predict the class of images; exit 1 if any input could not be read."""
    from cnnkit.predict import Predictor

    results = Predictor(run, batch_size=batch_size).predict(paths, top_k=top_k)
    if output is OutputFormat.json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif output is OutputFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "label", "confidence", "top_k", "error"])
        for r in results:
            writer.writerow([r.path, r.label, f"{r.confidence:.6f}" if not r.error else "",
                             ";".join(f"{n}:{p:.6f}" for n, p in r.top_k), r.error or ""])
        typer.echo(buffer.getvalue(), nl=False)
    else:
        from rich.table import Table

        table = Table()
        table.add_column("image", overflow="fold")
        for column in ("label", "confidence", f"top {top_k}"):
            table.add_column(column)
        for r in results:
            if r.error:
                table.add_row(r.path, "[red]error[/]", "", f"[red]{r.error}[/]")
            else:
                table.add_row(r.path, r.label, f"{r.confidence:.1%}", ", ".join(f"{n} {p:.1%}" for n, p in r.top_k))
        _stdout_console().print(table)
    failed = sum(1 for r in results if r.error)
    if failed:
        _error(f"{failed} of {len(results)} inputs could not be predicted (see the error column).")
        raise typer.Exit(1)


@app.command()
@_handle_errors
def doctor(
    data_dir: Annotated[Path, typer.Argument(help="The image folder to check.")],
    strict: Annotated[bool, typer.Option(help="Exit 1 when any problem is found.")] = False,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json on stdout.")] = OutputFormat.table,
    workers: Annotated[Optional[int], typer.Option(help="Processes reading images (default: every core).")] = None,
) -> None:
    """Report what is in DATA_DIR and what is wrong with it; never modifies a file."""
    from cnnkit.data.doctor import doctor as run_doctor
    from cnnkit.data.doctor import print_report

    report = run_doctor(data_dir, workers=workers)
    if output is OutputFormat.json:
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
    model: Annotated[str, typer.Option("--model", "-m", help=_model_help())] = "simple",
) -> None:
    """Train, evaluate and predict on the digits the package ships (no network)."""
    from cnnkit.demo import run_demo

    summary = run_demo(out, epochs=epochs, model=model)
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    """Entry point of the ``cnnkit`` script."""
    app(prog_name="cnnkit")


if __name__ == "__main__":
    sys.exit(main())
