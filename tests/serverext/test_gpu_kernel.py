"""A kernel started by GPU type through Jupyter Server's own REST API, end to end: the GPU
kernelspec → the io-remote provisioner → a lease from a real coordinator → the relay → a real
provider host → a real ipykernel; then the extension's sessions and progress endpoints."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.identity import load_keypair

RTX_PRICE = 120_000_000


async def test_a_kernel_on_a_gpu_type_runs_a_cell_and_shows_its_cost_and_progress(
    fetch_json: Any, jp_serverapp: Any, market: Any, user_keypair_path: Path
) -> None:
    await fetch_json("jupyter-io", "offers")
    began = time.time()
    status, kernel = await fetch_json(
        "api", "kernels", method="POST", body={"name": "jupyter-io-rtx-4090"},
        request_timeout=90,
    )  # fmt: skip
    assert status == 201, kernel
    # Pending kernels: the kernel is there at once, starting; clients may connect (and
    # queue their requests) while it starts remotely.
    assert kernel["execution_state"] == "starting"
    kernel_id = kernel["id"]
    try:
        km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
        await asyncio.wait_for(km.ready, 90)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            outputs: list[str] = []
            reply = await kc.execute_interactive(
                "import os; print(6 * 7, os.environ.get('CUDA_VISIBLE_DEVICES'))",
                timeout=60,
                output_hook=lambda msg: outputs.append(msg["content"].get("text", "")),
            )
            assert reply["content"]["status"] == "ok"
            assert "42" in "".join(outputs)
        finally:
            kc.stop_channels()

        # Sessions: the GPU, its price, and a cost that grows with time.
        await asyncio.sleep(1.0)
        status, body = await fetch_json("jupyter-io", "sessions")
        assert status == 200
        (session,) = body["sessions"]
        assert session["kernel_id"] == kernel_id
        assert session["kernel_name"] == "jupyter-io-rtx-4090"
        assert (session["gpu"], session["price_lamports_per_hour"]) == ("RTX 4090", RTX_PRICE)
        assert session["relay"] is True and session["lease"]
        assert session["started_at"] >= began - 1
        assert session["elapsed_seconds"] >= 1.0
        first_cost = session["cost_lamports"]
        assert first_cost == int(RTX_PRICE * session["elapsed_seconds"] // 3600) > 0
        assert session["escrow_lamports"] is None and session["escrow_left_lamports"] is None
        await asyncio.sleep(0.5)
        _, later = await fetch_json("jupyter-io", "sessions")
        assert later["sessions"][0]["cost_lamports"] > first_cost

        # Progress: each step of the start, in order, published from the provisioner's log.
        status, launch = await fetch_json("jupyter-io", "progress", kernel_id)
        assert status == 200
        assert launch["state"] == "ready"
        assert [e["step"] for e in launch["events"]] == ["queued", "leased", "launching", "ready"]
        assert launch["gpu"] == "RTX 4090" and launch["price_lamports_per_hour"] == RTX_PRICE
        lease_id = session["lease"]
    finally:
        status, _ = await fetch_json("api", "kernels", kernel_id, method="DELETE")
    assert status == 204
    # Pending kernels shut down after the answer; the kernel is listed until it is gone.
    deadline = time.monotonic() + 30
    while kernel_id in jp_serverapp.kernel_manager and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    _, body = await fetch_json("jupyter-io", "sessions")
    assert body["sessions"] == [], body
    # The kernel's end ended its lease at the coordinator.
    async with CoordinatorClient(market.url, load_keypair(user_keypair_path)) as client:
        assert (await client.get_lease(lease_id)).state == "ended"


async def test_a_gpu_type_above_the_price_cap_fails_with_the_coordinators_reason(
    fetch_json: Any, jp_serverapp: Any
) -> None:
    await fetch_json("jupyter-io", "preferences", method="PUT", body={"max_price_per_hour": "0.5"})
    await fetch_json("jupyter-io", "offers")
    status, kernel = await fetch_json(
        "api", "kernels", method="POST", body={"name": "jupyter-io-a100"}, request_timeout=60
    )
    assert status == 201  # pending: the start fails after the answer
    km = jp_serverapp.kernel_manager.get_kernel(kernel["id"])
    with pytest.raises(Exception, match="above your cap"):
        await asyncio.wait_for(km.ready, 60)
    # The reason reaches the browser through the progress endpoint (the Lab extension's
    # notification, with what to do); Lab's own "Error Starting Kernel" dialog shows it too
    # once its websocket is refused.
    _, sessions = await fetch_json("jupyter-io", "sessions")
    assert sessions["sessions"] == []  # a kernel that never started costs nothing
    _, progress = await fetch_json("jupyter-io", "progress")
    (launch,) = progress["launches"]
    assert launch["state"] == "failed"
    assert [e["step"] for e in launch["events"]] == ["queued", "failed"]
    assert "cheapest available A100 is 0.9 SOL/h" in launch["message"]
    assert "raise max_price_per_hour" in launch["message"]
