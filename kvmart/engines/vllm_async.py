"""vLLM's async engine (`AsyncLLM`) driven from ordinary threads: the engine lives on an asyncio loop of its own
thread, and each request is a `Stream` its caller reads without asyncio.

vLLM batches every request it holds in each step (continuous batching) and hands back each request's new tokens
as it makes them; here one task per request moves those outputs into the request's `Stream`, so any thread (the
server's model worker, a CLI, a test) can submit requests at any time and take their tokens as they come.
`Runner.wait` blocks until some stream has something new: the server's model worker waits there instead of
running a forward pass itself (kvmart/server/pipeline/vllm.py). vllm is imported by the caller, never here: this
module loads without it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("kvmart.vllm")
CLOSE_SECONDS = 30.0  # the most closing waits for the loop's tasks to end once cancelled (a bound against hangs)


class Stream:
    """One request's outputs (vLLM's DELTA RequestOutputs: each holds only its new tokens), in order. Its end is
    `finished` once the final output has been taken. Thread-safe; meant for one reading thread."""

    def __init__(self, runner: "Runner", request_id: str) -> None:
        self.runner, self.request_id = runner, request_id
        self._outputs: list[Any] = []
        self._error: BaseException | None = None
        self._ended = False  # vLLM sent its final output (or failed, or the request was aborted)
        self._taken_end = False
        self._future: Future | None = None

    @property
    def finished(self) -> bool:
        """Everything vLLM will send for this request has been taken."""
        with self.runner.cond:
            return self._taken_end

    @property
    def is_live(self) -> bool:
        """vLLM still holds the request (it has not sent its final output)."""
        with self.runner.cond:
            return not self._ended

    def take(self) -> list[Any]:
        """The outputs that arrived since the last take (maybe none). Once vLLM has ended the request, the take
        that hands out its last outputs also takes the end (`finished`); if the request failed, that take raises
        its error instead (after a take that hands out what came before it). Never blocks."""
        with self.runner.cond:
            outputs, self._outputs = self._outputs, []
            error = None
            if self._ended and not (outputs and self._error is not None):
                self._taken_end = True
                error, self._error = self._error, None
            if self._taken_end or not self._ended:  # nothing left to take
                self.runner.ready.discard(self)
        if error is not None:
            raise error
        return outputs

    def wait(self, timeout_seconds: float | None = None) -> None:
        """Block until this stream has something to take (or its end), or `timeout_seconds` passed."""
        with self.runner.cond:
            self.runner.cond.wait_for(lambda: self._outputs or (self._ended and not self._taken_end),
                                      timeout_seconds)

    def abort(self) -> None:
        """Stop the request if vLLM still holds it (its blocks are freed) and drop whatever it would still send.
        Idempotent; a no-op once it has finished."""
        with self.runner.cond:
            self.runner.ready.discard(self)
            self._outputs, self._error = [], None
            live, self._ended, self._taken_end = not self._ended, True, True
        if live and self._future is not None:
            self._future.cancel()  # cancels generate(): vLLM aborts the request

    # -- called on the runner's loop ----------------------------------------------------------------------------
    def _push(self, output: Any) -> None:
        with self.runner.cond:
            if self._taken_end:  # aborted: nobody reads it
                return
            self._outputs.append(output)
            self.runner.ready.add(self)
            self.runner.cond.notify_all()

    def _end(self, error: BaseException | None) -> None:
        with self.runner.cond:
            if self._taken_end:
                return
            self._ended, self._error = True, error
            self.runner.ready.add(self)
            self.runner.cond.notify_all()


class Runner:
    """An `AsyncLLM` on an event loop of its own (a daemon thread). Thread-safe."""

    def __init__(self, make_engine: Callable[[], Any]) -> None:
        """Start the loop, then build the engine on it with `make_engine()` (vLLM starts its output handler on the
        loop it is built on). Whatever `make_engine` raises is raised here, and the loop stopped."""
        self.cond = threading.Condition()
        self.ready: set[Stream] = set()  # streams with something to take
        self._woken = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvmart-vllm-loop", daemon=True)
        self._thread.start()

        async def build() -> Any:
            return make_engine()

        try:
            self.engine = asyncio.run_coroutine_threadsafe(build(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise

    def submit(self, request_id: str, prompt: Any, params: Any) -> Stream:
        """Hand a request to vLLM now (it is scheduled with whatever else vLLM holds); its outputs go to the
        stream returned."""
        stream = Stream(self, request_id)
        stream._future = asyncio.run_coroutine_threadsafe(self._pump(stream, prompt, params), self._loop)
        return stream

    async def _pump(self, stream: Stream, prompt: Any, params: Any) -> None:
        try:
            async for output in self.engine.generate(prompt, params, stream.request_id):
                stream._push(output)
        except asyncio.CancelledError:  # aborted by its reader: generate() has told vLLM
            stream._end(None)
            raise
        except BaseException as e:  # noqa: BLE001  (handed to the reader, who raises it)
            stream._end(e)
        else:
            stream._end(None)

    def wait(self, timeout_seconds: float) -> None:
        """Block until some stream has something to take, `wake` is called, or `timeout_seconds` passed."""
        with self.cond:
            self.cond.wait_for(lambda: self.ready or self._woken, timeout_seconds)
            self._woken = False

    def wake(self) -> None:
        """End a `wait` in progress (or the next one) at once: a new request arrived."""
        with self.cond:
            self._woken = True
            self.cond.notify_all()

    def call(self, coroutine_function: Callable[[], Any], timeout_seconds: float | None = None) -> Any:
        """Run `coroutine_function()` (an engine method taking no arguments, say) on the loop; its result."""

        async def run() -> Any:
            return await coroutine_function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_seconds)

    def close(self) -> None:
        """Shut vLLM down (its processes end) and stop the loop. Idempotent."""
        engine, self.engine = getattr(self, "engine", None), None
        if self._loop.is_closed():
            return
        self._cancel_tasks()  # before vLLM stops: its output handler would report the engine dead
        if engine is not None:
            engine.shutdown()
        self._stop_loop()

    def _cancel_tasks(self) -> None:
        """Cancel what still runs on the loop (vLLM's output handler, requests of streams never read to their
        end: aborted in vLLM) and let it finish."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(CLOSE_SECONDS)
        except Exception:  # noqa: BLE001  (a task that will not end must not keep the process from closing)
            log.warning("vLLM's event loop did not wind down within %s s", CLOSE_SECONDS)

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
