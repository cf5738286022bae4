"""What the CLI writes besides tables: the consoles, one-line errors and notes, and progress (a rich bar on a
terminal, plain lines when piped or logged)."""

from __future__ import annotations

import functools
import os
import sys
import time

import typer
from rich.console import Console
from rich.text import Text

from .errors import KvqError

#: Width of tables written to a pipe or file (rich's 80 columns would wrap them); $COLUMNS wins.
PIPE_WIDTH = 160


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty())
    return Console(stderr=stderr, width=PIPE_WIDTH if piped and not os.environ.get("COLUMNS") else None)


err = make_console(stderr=True)
console = make_console()


def say(where: Console, label: str, style: str, message: str) -> None:
    """``label`` styled, then ``message`` as plain text (user strings are never read as rich markup)."""
    where.print(Text.assemble((label, style), " ", str(message)), highlight=False, soft_wrap=True)


def note(message: str) -> None:
    say(err, "kvq: note:", "yellow", message)


def _import_torch_holding_ctrl_c() -> None:
    """Import torch with Ctrl-C held until the import is done (interrupted inside torch's C++ start-up, the process
    aborts with a C++ message), then act on it."""
    import signal
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    hit: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


def user_errors(fn=None, *, torch: bool = True):
    """One line on stderr and exit code 2 for user mistakes; never a traceback. ``torch``: import torch first
    (with Ctrl-C held); commands that never need it (methods, estimate-memory) pass False and start fast."""
    if fn is None:
        return functools.partial(user_errors, torch=torch)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if torch:
                _import_torch_holding_ctrl_c()
            return fn(*args, **kwargs)
        except KvqError as exc:
            say(err, "kvq: error:", "bold red", str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("kvq: interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            say(err, "kvq: error:", "bold red", "out of memory: try a smaller --seqlen, --batch, --context or model")
            raise typer.Exit(2) from None

    return wrapper


class PlainProgress:
    """Progress as plain lines on stderr for logs and pipes (where a live bar shows nothing until the end): the
    first step, then at most one line every ``every`` seconds, and the last."""

    def __init__(self, every: float = 10.0):
        self.every = every

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def task(self, description: str, total: int):
        start, last, done = time.monotonic(), [0.0], [0]

        def advance(n: int) -> None:
            done[0] += n
            now = time.monotonic()
            if done[0] < total and done[0] != n and now - last[0] < self.every:
                return
            last[0] = now
            elapsed = now - start
            left = f", about {elapsed / done[0] * (total - done[0]):.0f} s left" if 0 < done[0] < total else ""
            err.print(f"{description}: {done[0]:,}/{total:,} ({100 * done[0] / max(total, 1):.0f}%), "
                      f"{elapsed:.0f} s{left}", highlight=False, markup=False)

        return advance


def progress(stop_when_done: bool = False):
    """A context manager with ``.factory``: the API's progress callback (``factory(description, total, units)``
    returns ``advance(n)``). A rich bar on a terminal (``stop_when_done``: stopped once a task completes, e.g.
    before generated text streams), plain lines otherwise."""
    if not err.is_terminal:
        bar = PlainProgress()
        bar.factory = lambda description, total, _units=0: bar.task(description, total)
        return bar
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err, transient=False)

    def make(description: str, total: int, _units: int = 0):
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)
            if stop_when_done and bar.tasks[task].finished:
                bar.stop()

        return advance

    bar.factory = make
    return bar
