"""Round trips in the server extension: the picker's offers carry what this server measured
(best per GPU type, through the relay here: the market's provider has no public URL), the
offers are never held up by a measurement, and the latency cap is a preference that reaches
the GPU kernelspecs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from jupyter_io.latency import shared_prober

from .conftest import WAIT, Market

pytestmark = pytest.mark.timeout(60)


async def test_offers_carry_the_round_trip_measured_from_this_server(
    fetch_json: Any, market: Market
) -> None:
    assert market.provider.host_keypair is not None
    key = str(market.provider.host_keypair.pubkey())
    shared_prober().forget()
    _, sessions = await fetch_json("jupyter-io", "sessions")
    version = sessions["version"]
    began = time.monotonic()
    status, body = await fetch_json("jupyter-io", "offers")
    assert status == 200
    assert time.monotonic() - began < 2.0  # the offers never wait for a probe
    rtx = next(t for t in body["types"] if t["gpu"] == "rtx4090")
    assert rtx["latency_state"] in ("pending", "measured")
    deadline = time.monotonic() + WAIT
    while rtx["latency_state"] != "measured":
        assert time.monotonic() < deadline, rtx
        await asyncio.sleep(0.05)
        _, body = await fetch_json("jupyter-io", "offers")
        rtx = next(t for t in body["types"] if t["gpu"] == "rtx4090")
    # Measured through the coordinator's relay: its ping plus its own hop to the provider.
    assert rtx["latency_via_relay"] is True
    assert 0 < rtx["latency_ms"] < 1000
    row = next(p for p in body["providers"] if p["provider"] == key and p["gpu"] == "RTX 4090")
    assert row["latency_ms"] == rtx["latency_ms"] and row["latency_unreachable"] is False
    found = shared_prober().cached(key)
    assert found is not None and found.hop_ms is not None and found.relay_ms is not None
    # The browser learns of the new figures from the sessions' version.
    _, sessions = await fetch_json("jupyter-io", "sessions")
    assert sessions["version"] > version


async def test_the_latency_cap_is_a_preference_the_gpu_kernelspecs_carry(
    fetch_json: Any, market: Market
) -> None:
    status, body = await fetch_json(
        "jupyter-io", "preferences", method="PUT", body={"max_latency_ms": 50}
    )
    assert status == 200 and body["max_latency_ms"] == 50.0
    await fetch_json("jupyter-io", "offers")  # what the background refresh does on a server
    status, specs = await fetch_json("api", "kernelspecs")
    assert status == 200
    configs = [
        spec["spec"]["metadata"]["kernel_provisioner"]["config"]
        for name, spec in specs["kernelspecs"].items()
        if name.startswith("jupyter-io-")
    ]
    assert configs and all(c.get("max_latency_ms") == 50.0 for c in configs)
    for bad in (0, -5, "fast", True, 1e9):
        status, reply = await fetch_json(
            "jupyter-io", "preferences", method="PUT", body={"max_latency_ms": bad}
        )
        assert status == 400 and "max_latency_ms" in reply["message"], bad
    status, body = await fetch_json(
        "jupyter-io", "preferences", method="PUT", body={"max_latency_ms": None}
    )
    assert status == 200 and body["max_latency_ms"] is None
