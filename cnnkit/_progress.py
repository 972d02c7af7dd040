"""Rich progress bars for every step longer than a second (scan, decode, epochs, evaluation, prediction).

Library code calls ``progress_task(description, total)`` and advances it; whether bars are drawn is
decided once by the caller (the CLI turns them on, ``set_progress(False)`` turns them off).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

_enabled = True
_console = None


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off for this process."""
    global _enabled
    _enabled = enabled


def console():
    """The Rich console cnnkit prints to (stderr, so stdout stays clean for JSON/CSV output)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


@contextlib.contextmanager
def progress_task(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar for ``total`` units; yields ``advance(n)``."""
    if not _enabled or not sys.stderr:
        yield lambda n=1, info=None: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console(), transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            if info is None:
                bar.advance(task, n)
            else:
                bar.update(task, advance=n, info=info)

        yield advance


def esc(text: object) -> str:
    """User text (paths, class names) made safe to embed in Rich markup: '[old]' stays '[old]'."""
    from rich.markup import escape

    return escape(str(text))


def say(message: str) -> None:
    """Print a status line (Rich markup allowed) when progress output is on."""
    if _enabled:
        console().print(message, highlight=False)


def warn(message: str) -> None:
    """Print a warning line; warnings are also returned in results and stored in run.json."""
    if _enabled:
        console().print(f"[bold yellow]warning:[/] {esc(message)}", highlight=False)


def _not_retracing(record) -> bool:
    return "triggered tf.function retracing" not in record.getMessage()


def quiet_retracing() -> None:
    """Drop TensorFlow's "triggered tf.function retracing" warnings (idempotent).

    Keras traces one predict function per batch shape (a last partial batch, the flip views, each
    Grad-CAM head), and TensorFlow's logger warns after 5: advice to TensorFlow code authors that a
    user of cnnkit, from the CLI or from Python, cannot act on.
    """
    import logging

    logger = logging.getLogger("tensorflow")
    if _not_retracing not in logger.filters:
        logger.addFilter(_not_retracing)
