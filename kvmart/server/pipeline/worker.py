"""The model worker: one thread that owns the model, fed by a bounded queue.

Each job is a generator of events (see engine.py); every call to `next` is one unit of work (a prompt chunk's
forward pass, or delivering an event). A job that needs a decode step (or, where the engine batches prompts, a
prompt chunk) yields `Batched` instead: the worker parks it, and once every active job has had its turn it runs one
`batch_step` over all the parked jobs' payloads (the engine's: decode steps of all sequences in one forward pass,
prompt chunks packed into shared ones: continuous batching), then resumes each so its token goes out at once. So in
every round each job moves on by one prompt chunk or one token: a new request's prompt chunks are interleaved with
the others' decode steps, never queued behind whole answers, and a slow client blocks no one (its events wait in
its own queue).

Admission: up to `max_active` jobs are active at once, and only as many as `memory_bytes` allows (each job says
how much KV it will hold when submitted; the first job is always admitted), first come first served. Jobs beyond
`max_active + max_queue` in the system are refused at once with QueueFullError (HTTP 429), never left to hang.
With `batching` off, parked jobs take their decode steps one by one (one forward pass each): the same arithmetic,
for comparison. An engine that computes elsewhere (vLLM: server/pipeline/vllm.py) parks a job while it has no new
token, and its `batch_step` waits for the engine instead of computing; `wake` (called on every submit) ends that
wait so a new job is admitted at once.

`Ticket` is a job's asyncio side: an async iterator over its events that raises the job's error, if any."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvmart.errors import InternalError, KvmartError, QueueFullError, ShuttingDownError

log = logging.getLogger("kvmart.server")


@dataclass(frozen=True)
class Failed:
    error: KvmartError


@dataclass(frozen=True)
class Batched:
    """Yielded by a job whose next unit of work is done together with the other jobs' (a decode step): `payload`
    goes to the worker's `batch_step`, and the job is resumed once it ran. Never delivered to the ticket."""

    payload: object


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
    memory_bytes: int = 0
    parked: Batched | None = field(default=None)


def _unbatchable(payloads: list[object]) -> None:
    raise AssertionError("a job yielded Batched, but this worker has no batch_step")


class Worker:
    """Thread-safe `submit`; everything else runs on the worker's own thread."""

    def __init__(self, max_active: int, max_queue: int, batch_step: Callable[[list[object]], None] = _unbatchable,
                 memory_bytes: int = 0, batching: bool = True, wake: Callable[[], None] = lambda: None) -> None:
        """`batch_step(payloads)` runs the parked jobs' shared unit of work (it may raise: every job in the batch
        then fails; it may also wait, for an engine that computes elsewhere, as the vllm one does); `wake()` is
        called whenever a job is queued or the worker is stopped, to end such a wait so the job is admitted at
        once; `memory_bytes`: what the active jobs may hold in all (0: no limit but `max_active`)."""
        self.max_active, self.max_queue = max_active, max_queue
        self.batch_step, self.memory_bytes, self.batching = batch_step, memory_bytes, batching
        self.wake = wake
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._gate = threading.Lock()  # held while stepping; `hold` takes it to pause the worker
        self._holding = 0  # holds waiting or held: the worker waits for them before its next round
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._job_seconds = 1.0  # moving average of a job's time in the system, for Retry-After
        self.cancelled_jobs = 0
        self.failed_jobs = 0
        self.batch_steps = 0  # batch_step calls, and the payloads they carried: their ratio is the mean batch size
        self.batched_payloads = 0

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
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    def submit(self, events: Iterator[object], loop: asyncio.AbstractEventLoop, memory_bytes: int = 0) -> Ticket:
        """Queue a job that will hold about `memory_bytes` while active; QueueFullError when the queue is full,
        ShuttingDownError after `stop`."""
        ticket = Ticket(loop)
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down and accepts no new requests")
            queued = len(self._active) + len(self._waiting)
            if queued >= self.capacity:
                raise QueueFullError(queued, self._retry_after(queued))
            self._waiting.append(_Job(events, ticket, time.perf_counter(), memory_bytes))
            self._cond.notify_all()
        self.wake()
        return ticket

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the worker between steps while inside (jobs are still accepted and queued): for maintenance and
        for tests that need requests to stay queued. The worker starts no round while a hold is waiting, so a hold
        waits at most for the round in progress."""
        with self._cond:
            self._holding += 1
        try:
            with self._gate:
                yield
        finally:
            with self._cond:
                self._holding -= 1
                self._cond.notify_all()

    def _retry_after(self, queued: int) -> int:
        return max(1, min(60, math.ceil(self._job_seconds * queued / self.max_active)))

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._holding or (not self._active and not self._waiting and not self._stopping):
                    self._cond.wait()
                if self._stopping and not self._active and not self._waiting:
                    return
                self._admit()
                active = list(self._active)
            with self._gate:
                self._round(active)
            time.sleep(0)  # yield the GIL: the event loop sends the tokens just delivered, a waiting hold gets in

    def _admit(self) -> None:
        """Move waiting jobs to active, in order, while `max_active` and `memory_bytes` allow (called under _cond)."""
        held = sum(job.memory_bytes for job in self._active)
        while self._waiting and len(self._active) < self.max_active:
            job = self._waiting[0]
            if self._active and self.memory_bytes and held + job.memory_bytes > self.memory_bytes:
                return
            self._active.append(self._waiting.popleft())
            held += job.memory_bytes

    def _round(self, active: list[_Job]) -> None:
        """Every active job moves on by one unit, or parks; then the parked ones take their batched step."""
        parked = []
        for job in active:
            if job.parked is None and not self._advance(job):
                continue
            if job.parked is not None:
                parked.append(job)
        if not parked:
            return
        for batch in [parked] if self.batching else [[job] for job in parked]:
            self._run_batch([job for job in batch if not self._cancelled(job)])

    def _run_batch(self, batch: list[_Job]) -> None:
        """One batch_step for `batch`, then each job resumed at once (its token goes out in this round)."""
        if not batch:
            return
        try:
            self.batch_step([job.parked.payload for job in batch if job.parked is not None])
            self.batch_steps += 1
            self.batched_payloads += len(batch)
        except Exception as e:  # noqa: BLE001  (reported to every job of the batch, as _step reports a job's own)
            for job in batch:
                job.events.close()  # type: ignore[attr-defined]  # a generator has close(); Iterator does not say so
                self._fail(job, e)
                job.ticket.deliver(_END)
                self._finish(job)
            return
        for job in batch:
            job.parked = None
            self._advance(job)

    def _advance(self, job: _Job) -> bool:
        """Step `job`; finish it when it is over. False when it is gone."""
        if self._step(job):
            return True
        self._finish(job)
        return False

    def _cancelled(self, job: _Job) -> bool:
        """Close and finish a parked job whose client went away. True if it was."""
        if not job.ticket.is_cancelled:
            return False
        self._close_cancelled(job)
        self._finish(job)
        return True

    def _close_cancelled(self, job: _Job) -> None:
        job.events.close()  # type: ignore[attr-defined]  # a generator has close(); Iterator does not say so
        self.cancelled_jobs += 1
        job.ticket.deliver(_END)

    def _step(self, job: _Job) -> bool:
        """Advance `job` by one unit of work (or park it on a Batched); False when it is over."""
        if job.ticket.is_cancelled:
            self._close_cancelled(job)
            return False
        try:
            event = next(job.events)
            if isinstance(event, Batched):
                job.parked = event
            else:
                job.ticket.deliver(event)
            return True
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001  (typed errors go to the client; a bug is logged, then reported)
            self._fail(job, e)
        job.ticket.deliver(_END)
        return False

    def _fail(self, job: _Job, error: Exception) -> None:
        """Report `error` to the job's client: a KvmartError as it is, anything else (a bug) as an InternalError,
        logged; the worker goes on serving the others."""
        if isinstance(error, KvmartError):
            job.ticket.deliver(Failed(error))
            return
        log.exception("request failed", exc_info=error)
        self.failed_jobs += 1
        job.ticket.deliver(Failed(InternalError(f"internal error: {type(error).__name__}: {error}")))

    def _finish(self, job: _Job) -> None:
        with self._cond:
            self._active.remove(job)
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.perf_counter() - job.submitted_at)
