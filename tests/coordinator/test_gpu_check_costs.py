"""What a GPU challenge may cost the coordinator (checks are on by default): a provider that
links, is challenged and drops its link leaves no work behind. Its pending challenge ends at
once without a verdict, and the O(k n**2) check already running in a worker thread stops
after its current block, rather than running to the end and then waiting out the model's
time window (a provider relinking again and again would otherwise keep a core busy)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from jupyter_io.coordinator import challenges as challenges_module
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.gpu_challenge import Verifier

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

N = 8192  # a real 24 GB card's challenge, capped here: seconds of the coordinator's check


async def test_a_provider_that_drops_its_link_mid_challenge_leaves_no_work_behind(
    start_coordinator: Starter,
    providers: list[FakeProvider],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    coordinator: CoordinatorServer = await start_coordinator(
        gpu_check_interval=0.0, gpu_check_max_n=N
    )
    checks = coordinator.gpu_checks
    assert checks is not None
    verifiers: list[Verifier] = []
    ended = asyncio.Event()
    results: list[Any] = []

    class Recorded(Verifier):
        def prepare(self) -> None:
            verifiers.append(self)
            super().prepare()

    challenge = checks.challenge

    async def recorded(*args: Any) -> Any:
        try:
            result = await challenge(*args)
            results.append(result)
            return result
        finally:
            ended.set()

    monkeypatch.setattr(challenges_module, "Verifier", Recorded)
    monkeypatch.setattr(checks, "challenge", recorded)
    provider = FakeProvider(coordinator.url, [gpu_offer("RTX 4090", simulated=False)])
    provider.answer_challenges = False  # it never answers
    providers.append(provider)
    await provider.connect()
    sent = await provider.next_message("gpu_challenge")
    assert sent["n"] == N
    dropped = time.monotonic()
    await provider.close()
    await asyncio.wait_for(ended.wait(), WAIT)
    # Ended by the drop (the model's window for this n is over 5 s: the overhead alone).
    assert time.monotonic() - dropped < 3.0
    assert results == [None]  # no verdict for a challenge whose link went away
    assert checks.judged == 0
    (verifier,) = verifiers
    assert verifier.ops.generated < N * N  # its check stopped early
