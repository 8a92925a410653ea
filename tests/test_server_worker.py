"""The model worker (kvmart/server/pipeline/worker.py): bounded queue, turn-taking, cancellation, draining, failures."""

from __future__ import annotations

import asyncio

import pytest

from kvmart.errors import InputError, InternalError, QueueFullError, ShuttingDownError
from kvmart.server.pipeline.worker import Worker


def job(name: str, steps: int, log: list[str], closed: list[str] | None = None):
    try:
        for i in range(steps):
            log.append(f"{name}{i}")
            yield f"{name}{i}"
    finally:
        if closed is not None:
            closed.append(name)


async def drain(ticket) -> list:
    return [event async for event in ticket]


@pytest.fixture
def worker():
    w = Worker(max_active=2, max_queue=1)
    w.start()
    yield w
    w.stop(timeout_seconds=10)


def test_beyond_active_plus_queue_requests_are_refused_at_once(worker):
    async def scenario():
        loop, log = asyncio.get_running_loop(), []
        with worker.hold():
            tickets = [worker.submit(job(n, 2, log), loop) for n in "abc"]
            with pytest.raises(QueueFullError) as refused:
                worker.submit(job("d", 2, log), loop)
        assert refused.value.retry_after_seconds >= 1
        return [await drain(t) for t in tickets]

    assert asyncio.run(scenario()) == [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]


def test_active_jobs_take_turns(worker):
    async def scenario():
        loop, log = asyncio.get_running_loop(), []
        with worker.hold():
            long, short = worker.submit(job("a", 6, log), loop), worker.submit(job("b", 2, log), loop)
        await drain(long), await drain(short)
        return log

    log = asyncio.run(scenario())
    assert log.index("b1") < log.index("a5")  # the short job ended while the long one was still running


def test_a_cancelled_job_is_closed_and_does_no_more_work(worker):
    async def scenario():
        loop, log, closed = asyncio.get_running_loop(), [], []
        with worker.hold():
            ticket = worker.submit(job("a", 1000, log, closed), loop)
        first = await anext(ticket)
        with worker.hold():
            ticket.cancel()
        await drain(ticket)
        return first, log, closed

    first, log, closed = asyncio.run(scenario())
    assert first == "a0" and closed == ["a"] and len(log) < 1000 and worker.cancelled_jobs == 1


def test_errors_reach_their_client_and_the_worker_goes_on(worker):
    def failing(error: Exception):
        yield "started"
        raise error

    async def scenario():
        loop = asyncio.get_running_loop()
        typed = worker.submit(failing(InputError("bad input")), loop)
        bug = worker.submit(failing(ZeroDivisionError("oops")), loop)
        fine = worker.submit(job("c", 1, []), loop)
        results = []
        for ticket in (typed, bug):
            assert await anext(ticket) == "started"
            with pytest.raises(Exception) as caught:
                await anext(ticket)
            results.append(caught.value)
        return results, await drain(fine)

    (typed, bug), fine = asyncio.run(scenario())
    assert isinstance(typed, InputError) and str(typed) == "bad input"
    assert isinstance(bug, InternalError) and "ZeroDivisionError: oops" in str(bug)
    assert fine == ["c0"] and worker.failed_jobs == 1


def test_stop_finishes_accepted_jobs_then_refuses_new_ones():
    worker = Worker(max_active=1, max_queue=4)
    worker.start()

    async def scenario():
        loop = asyncio.get_running_loop()
        with worker.hold():
            tickets = [worker.submit(job(n, 3, []), loop) for n in "ab"]
            worker.stop(timeout_seconds=0)  # stopping begins while both jobs are still queued
            with pytest.raises(ShuttingDownError):
                worker.submit(job("c", 1, []), loop)
        return [await drain(t) for t in tickets]

    assert asyncio.run(scenario()) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    worker.stop(timeout_seconds=10)
    assert not worker.is_alive()
