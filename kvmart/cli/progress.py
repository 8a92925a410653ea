"""Progress of the long steps (building or converting a model, prefilling a document, verifying), on stderr: rich
bars on a terminal; on anything else (a log file, a pipe, CI) plain lines, so that a run that takes minutes on a
busy machine says what it is doing: a line when a step starts, then one at most every `interval_seconds` while it
runs (with its fraction when known, or how long it has run), even when the step reports nothing, and one when it
ends.

    with reporter() as progress:           # Bars on a terminal, Lines otherwise
        progress.stage("prefilling notes.txt", 0.25)
    with working("3. verifying"): ...      # a step that reports no fraction"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

from kvmart.cli.output import console

INTERVAL_SECONDS = 10.0


class Bars:
    """Rich progress bars (a terminal): one per stage; a new stage completes the ones before it."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "Bars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def stage(self, message: str, fraction: float | None) -> None:
        """Advance the bar of `message`; None: no known end."""
        if message not in self.tasks:
            for task in self.tasks.values():
                self.progress.update(task, total=1.0, completed=1.0)
            self.tasks[message] = self.progress.add_task(message, total=None if fraction is None else 1.0)
        if fraction is not None:
            self.progress.update(self.tasks[message], total=1.0, completed=fraction)

    def fraction(self, message: str) -> Callable[[float], None]:
        return lambda f: self.stage(message, f)


class Lines:
    """Progress as plain lines (not a terminal). Thread-safe: a ticker thread writes the lines of a step that has
    gone quiet. `write` and `clock` are injectable for tests."""

    def __init__(self, interval_seconds: float = INTERVAL_SECONDS, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval_seconds, clock
        self.write = write or (lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        self.current: str | None = None
        self.started = self.last_line = 0.0
        self.fraction_done: float | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="kvmart-progress", daemon=True)

    def __enter__(self) -> "Lines":
        self.ticker.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stopped.set()
        self.ticker.join()
        with self.lock:
            self._finish("done" if exc_type is None else "stopped")

    def stage(self, message: str, fraction: float | None) -> None:
        with self.lock:
            now = self.clock()
            if message != self.current:
                self._finish("done")
                self.current, self.started, self.last_line, self.fraction_done = message, now, now, fraction
                self.write(f"{message} ...")
                return
            self.fraction_done = fraction
            if now - self.last_line >= self.interval:
                self._report(now)

    def fraction(self, message: str) -> Callable[[float], None]:
        return lambda f: self.stage(message, f)

    def tick(self) -> None:
        """Report the current step if nothing was written for an interval (the ticker calls this)."""
        with self.lock:
            now = self.clock()
            if self.current is not None and now - self.last_line >= self.interval:
                self._report(now)

    def _tick(self) -> None:
        while not self.stopped.wait(self.interval):
            self.tick()

    def _report(self, now: float) -> None:
        done = "" if self.fraction_done is None else f"{100 * self.fraction_done:.0f}% · "
        self.write(f"{self.current}: {done}{now - self.started:.0f} s so far")
        self.last_line = now

    def _finish(self, how: str) -> None:
        if self.current is not None:
            self.write(f"{self.current}: {how} in {self.clock() - self.started:.1f} s")
            self.current = None


def reporter() -> Bars | Lines:
    """Bars on a terminal, Lines on anything else (decided by where stderr goes)."""
    return Bars() if console.is_terminal else Lines()


@contextmanager
def working(message: str) -> Iterator[None]:
    """A step with no known fraction: a spinner-like bar, or a line now, every interval and at the end."""
    with reporter() as progress:
        progress.stage(message, None)
        yield
