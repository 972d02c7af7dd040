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
            if fn.__name__ in ("train", "evaluate", "predict", "demo"):
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
    return "Architecture: simple (the tutorials' small CNN, default) or vgg (the BatchNorm CNN)."


@app.command()
@_handle_errors
def train(
    data_dir: Annotated[Path, typer.Argument(help="root/<class>/*.jpg, or root/train/<class>/ (+ validation/, test/).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=_model_help())] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs (EarlyStopping may stop sooner).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", "--lr", help="Adam's initial rate.")] = None,
    image_size: Annotated[Optional[str], typer.Option(help="N or HxW; default per model (32 for simple/vgg).")] = None,
    color_mode: Annotated[Optional[str], typer.Option(help="rgb or grayscale.")] = None,
    resize_mode: Annotated[Optional[str], typer.Option(help="stretch, pad (keep aspect, letterbox) or crop (centre).")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Validation fraction per class, when there is no validation/ folder.")] = None,
    test_split: Annotated[Optional[float], typer.Option(help="Test fraction per class, when there is no test/ folder.")] = None,
    augment: Annotated[Optional[str], typer.Option(help="none or standard (flip, rotation, zoom, translation).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Epochs without val_loss improvement before stopping.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split, shuffle and initialisation.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Decode processes (default: every core).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<model>-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML/JSON config (or a run's run.json); options override it.")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit a temperature on the validation split after training.")] = False,
) -> None:
    """Train a classifier on DATA_DIR and write a run directory."""
    from cnnkit.config import load_config
    from cnnkit.train import train as run_training

    cfg = load_config(config, {
        "model.name": model,
        "train.epochs": epochs, "train.batch_size": batch_size, "train.learning_rate": learning_rate,
        "train.augment": augment, "train.patience": patience, "data.image_size": _parse_image_size(image_size),
        "data.color_mode": color_mode, "data.resize_mode": resize_mode, "data.val_split": val_split,
        "data.test_split": test_split, "data.seed": seed, "data.workers": workers,
    })
    result = run_training(data_dir, out, cfg, overwrite=overwrite)
    _progress.say(f"run {'interrupted' if result.status != 'completed' else 'written'}: [bold]{result.run_dir}[/]")
    if calibrate and result.status == "completed":
        _print_calibration(_calibrate_run(result.run_dir))
    if result.status != "completed":
        raise typer.Exit(130)


@app.command()
@_handle_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory or .keras file.")],
    data_dir: Annotated[Optional[Path], typer.Argument(help="Labelled folder (default: the run's test split).")] = None,
    top_k: Annotated[int, typer.Option(help="k of the top-k accuracy.")] = 5,
    name: Annotated[Optional[str], typer.Option(help="Report folder name under RUN/eval/.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 256,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json on stdout.")] = OutputFormat.table,
    tta: Annotated[bool, typer.Option("--tta", help="Also report test-time augmentation (image + mirror, averaged).")] = False,
    tta_crop: Annotated[bool, typer.Option("--tta-crop", help="TTA with four shifted crops too (implies --tta).")] = False,
) -> None:
    """Evaluate a trained model on a labelled folder; write RUN/eval/<name>/ (metrics, plots, report.html)."""
    from cnnkit.evaluate import evaluate as run_evaluation

    report = run_evaluation(run, data_dir, top_k=top_k, name=name, batch_size=batch_size,
                            tta="flip+crop" if tta_crop else tta)
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
    typer.echo(f"ECE {report.ece:.4f}; balanced accuracy {report.balanced_accuracy:.2%}; "
               f"{report.num_images} images in {report.seconds:.1f}s")
    if report.tta:
        typer.echo(f"with TTA ({report.tta['mode']}, {report.tta['views']} views): accuracy {report.tta['accuracy']:.2%}, "
                   f"top-{report.k} {report.tta[f'top_{report.k}_accuracy']:.2%}, loss {report.tta['loss']:.4f}")
    typer.echo(f"report: {report.out_dir / 'report.html'}")


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
    from cnnkit.explain import explain as run_explain

    for h in run_explain(run, images, class_name=class_name, layer=layer, out=out):
        typer.echo(f"{h.source}\tpredicted {h.predicted}\t{h.class_name} {h.probability:.1%}\t-> {h.path}")


def _calibrate_run(run: Path, data: Path | None = None, min_confidence: float | None = None,
                   target_precision: float | None = None):
    from cnnkit.calibration import calibrate as run_calibration

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
    from cnnkit.review import review as run_review

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
    from cnnkit.compare import compare as run_compare

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
    app(prog_name="cnnkit")


if __name__ == "__main__":
    sys.exit(main())
