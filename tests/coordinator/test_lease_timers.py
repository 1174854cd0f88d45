"""LeaseTimers, the one-timer-per-lease shape both the budget watch and the acknowledgement
watch use: a check that raises is retried, re-arming replaces, stop cancels and waits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from jupyter_io.coordinator import lease_timers
from jupyter_io.coordinator.lease_timers import LeaseTimers

pytestmark = pytest.mark.timeout(10)


async def test_a_failing_check_is_retried_and_re_arming_replaces_the_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lease_timers, "RETRY_SECONDS", 0.01)
    calls: list[str] = []
    done = asyncio.Event()

    async def check(lease_id: str) -> None:
        calls.append(lease_id)
        if len(calls) == 1:
            raise RuntimeError("the store blinked")
        done.set()

    timers = LeaseTimers(check, what="test check", log=logging.getLogger("test"))
    timers.arm("l1", 60.0)
    timers.arm("l1", 0.0)  # replaces the 60 s timer: one check, not two
    await asyncio.wait_for(done.wait(), 5)
    assert calls == ["l1", "l1"]
    await timers.stop()


async def test_stop_cancels_timers_waits_for_checks_and_arms_nothing_after() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def check(lease_id: str) -> None:
        started.set()
        await release.wait()
        finished.append(lease_id)

    timers = LeaseTimers(check, what="test check", log=logging.getLogger("test"))
    timers.arm("running", 0.0)
    timers.arm("later", 60.0)
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(timers.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # waits for the check in progress
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert finished == ["running"]
    timers.arm("after", 0.0)
    await asyncio.sleep(0.05)
    assert finished == ["running"]
