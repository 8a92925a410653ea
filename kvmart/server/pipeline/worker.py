"""The model worker: one thread that owns the model, fed by a bounded queue.

Each job is a generator of events (see engine.py); every call to `next` is one unit of model work (a prefill or
one decode step). The worker keeps up to `max_active` jobs and advances them in turn, so a long answer never holds
a new request's first token hostage, and a slow client never blocks anyone: its events wait in its own queue.
Jobs beyond `max_active + max_queue` are refused at once with QueueFullError (HTTP 429), never left to hang.

`Ticket` is a job's asyncio side: an async iterator over its events that raises the job's error, if any."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvmart.errors import InternalError, KvmartError, QueueFullError, ShuttingDownError

log = logging.getLogger("kvmart.server")


@dataclass(frozen=True)
class Failed:
    error: KvmartError


_END = object()


class Ticket:
    """The asyncio side of one job. Iterate it (on the event loop that created it) for the job's events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def deliver(self, item: object) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def cancel(self) -> None:
        """Stop the job at its next step (the client went away). Idempotent."""
        self._cancelled.set()

    @property
    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __aiter__(self) -> "Ticket":
        return self

    async def __anext__(self) -> object:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends again
            raise StopAsyncIteration
        if isinstance(item, Failed):
            raise item.error
        return item


@dataclass
class _Job:
    events: Iterator[object]
    ticket: Ticket
    submitted_at: float


class Worker:
    """Thread-safe `submit`; everything else runs on the worker's own thread."""

    def __init__(self, max_active: int, max_queue: int) -> None:
        self.max_active, self.max_queue = max_active, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._gate = threading.Lock()  # held while stepping; `hold` takes it to pause the worker
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._job_seconds = 1.0  # moving average of a job's time in the system, for Retry-After
        self.cancelled_jobs = 0
        self.failed_jobs = 0

    @property
    def capacity(self) -> int:
        return self.max_active + self.max_queue

    def depth(self) -> tuple[int, int]:
        """(active, waiting) jobs."""
        with self._cond:
            return len(self._active), len(self._waiting)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvmart-model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float | None = None) -> None:
        """Take no new jobs, finish every job already accepted, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    def submit(self, events: Iterator[object], loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue a job; QueueFullError when the queue is full, ShuttingDownError after `stop`."""
        ticket = Ticket(loop)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down and accepts no new requests")
            queued = len(self._active) + len(self._waiting)
            if queued >= self.capacity:
                raise QueueFullError(queued, self._retry_after(queued))
            self._waiting.append(_Job(events, ticket, time.perf_counter()))
            self._cond.notify_all()
        return ticket

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the worker between steps while inside (jobs are still accepted and queued): for maintenance and
        for tests that need requests to stay queued."""
        with self._gate:
            yield

    def _retry_after(self, queued: int) -> int:
        return max(1, min(60, math.ceil(self._job_seconds * queued / self.max_active)))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._active and not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._active and not self._waiting:
                    return
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(self._waiting.popleft())
                active = list(self._active)
            with self._gate:
                for job in active:
                    if not self._step(job):
                        self._finish(job)

    def _step(self, job: _Job) -> bool:
        """Advance `job` by one unit of work; False when it is over."""
        if job.ticket.is_cancelled:
            job.events.close()  # type: ignore[attr-defined]  # a generator has close(); Iterator does not say so
            self.cancelled_jobs += 1
            job.ticket.deliver(_END)
            return False
        try:
            job.ticket.deliver(next(job.events))
            return True
        except StopIteration:
            pass
        except KvmartError as e:
            job.ticket.deliver(Failed(e))
        except Exception as e:  # a bug: report it to this client, keep serving the others
            log.exception("request failed")
            self.failed_jobs += 1
            job.ticket.deliver(Failed(InternalError(f"internal error: {type(e).__name__}: {e}")))
        job.ticket.deliver(_END)
        return False

    def _finish(self, job: _Job) -> None:
        with self._cond:
            self._active.remove(job)
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - job.submitted_at)
