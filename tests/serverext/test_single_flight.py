"""SingleFlight: concurrent callers share one run; a failure reaches that run's callers only."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_io.serverext.single_flight import SingleFlight


async def test_callers_while_a_run_is_in_flight_share_it() -> None:
    runs = 0
    release = asyncio.Event()

    async def fetch() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return runs

    flight = SingleFlight(fetch)
    callers = [asyncio.ensure_future(flight()) for _ in range(5)]
    await asyncio.sleep(0)  # let them all start waiting
    release.set()
    assert await asyncio.gather(*callers) == [1] * 5
    assert await flight() == 2  # the next call after the run ended runs again


async def test_a_failure_reaches_its_callers_and_the_next_call_retries() -> None:
    answers: list[BaseException | str] = [RuntimeError("coordinator down"), "ok"]

    async def fetch() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    flight = SingleFlight(fetch)
    with pytest.raises(RuntimeError, match="coordinator down"):
        await flight()
    assert await flight() == "ok"


async def test_a_cancelled_caller_leaves_the_run_to_the_others() -> None:
    release = asyncio.Event()

    async def fetch() -> str:
        await release.wait()
        return "answer"

    flight = SingleFlight(fetch)
    impatient = asyncio.ensure_future(flight())
    patient = asyncio.ensure_future(flight())
    await asyncio.sleep(0)
    impatient.cancel()
    release.set()
    assert await patient == "answer"
    assert impatient.cancelled()


async def test_cancel_stops_the_run_in_flight() -> None:
    started = asyncio.Event()

    async def fetch() -> None:
        started.set()
        await asyncio.Event().wait()

    flight = SingleFlight(fetch)
    caller = asyncio.ensure_future(flight())
    await started.wait()
    flight.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
