"""A Jupyter Server stopped while a paid remote kernel is busy: a real ``jupyter server``
subprocess (as ``jupyter io demo`` runs Lab) whose kernel leases an RTX 4090 from an escrow
coordinator and runs a cell that never ends, then SIGTERM (what the demo and service managers
send) or SIGINT (Ctrl-C without a terminal).

Before the process exits, the lease is ended and its escrow settled (the demo stops the
provider and the coordinator right after Lab: a settlement left for later waited for the next
demo start), billed for the seconds the kernel served, with every lamport accounted for; and
the server's log holds no traceback.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from .test_jupyter_server import KERNEL_WS_PROTOCOL, JupyterServer, _decode, _encode, _message
from .test_payments import ESCROW_ARGS, Ledger, PaidMarket, fund_parties

#: Seconds the busy cell runs before the server is stopped.
BUSY_S = 2.0
#: How far the bill may fall short of the seconds the test saw served (whole seconds, and
#: the kernel's start and first acknowledgement are not exactly the test's clock).
BILL_TOLERANCE_S = 1
#: The most a stop may take: the graceful shutdown (5 s for a busy kernel's exit to come
#: back), the session's end, the lease's end and its settlement.
STOP_TIMEOUT = 40.0


@pytest.fixture(scope="module")
def paid(start_module_market: Any) -> PaidMarket:
    return asyncio.run(fund_parties(start_module_market(*ESCROW_ARGS)))


@pytest.fixture
async def ledger(paid: PaidMarket) -> AsyncIterator[Ledger]:
    chain = Ledger(paid.solana_url)
    try:
        yield chain
    finally:
        await chain.close()


async def _wait_exit(server: JupyterServer, timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(server.proc.wait), timeout)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_server_stopped_with_a_busy_paid_kernel_settles_its_lease_first(
    paid: PaidMarket, ledger: Ledger, kernelspecs: Any, tmp_path: Path, signum: int
) -> None:
    market = paid.market
    user = market.user.pubkey()
    name = kernelspecs.install_lease(
        "busy-rtx", paid.url, market.user_keypair_path, gpu="RTX 4090", usage_ack_interval=0.5
    )
    before = await ledger.snapshot(paid.terms(user, market.relayed.pubkey, "probe"))
    provider_lines = len(market.relayed.stderr_lines)
    root = tmp_path / "notebooks"
    root.mkdir()
    server = JupyterServer(root)
    try:
        await server.wait_listening()
        kernel = await server.request("POST", "/api/kernels", {"name": name})
        session = uuid.uuid4().hex
        url = (
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel['id']}/channels?session_id={session}"
        )
        async with connect(
            url,
            subprotocols=[KERNEL_WS_PROTOCOL],
            additional_headers={"Authorization": f"token {server.token}"},
            max_size=None,
        ) as ws:
            info = _message("kernel_info_request", {}, session)
            await ws.send(_encode(info, "shell"))
            await _until_message(ws, info, "shell", "kernel_info_reply")
            ready = time.monotonic()  # the lease's seconds began a little before
            busy = _message(
                "execute_request",
                {"code": "while True: pass", "silent": False, "store_history": True,
                 "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                session,
            )  # fmt: skip
            await ws.send(_encode(busy, "shell"))
            await _until_message(ws, busy, "iopub", "status", execution_state="busy")
            client = paid.client()
            try:
                [lease] = [row for row in await client.list_leases() if row.live]
            finally:
                client.close()
            await asyncio.sleep(BUSY_S)  # the seconds to be billed, not a synchronisation
            served = time.monotonic() - ready
            server.proc.send_signal(signum)
            code = await _wait_exit(server, STOP_TIMEOUT)
    finally:
        server.stop()
    log = "".join(server.log)
    assert "Traceback" not in log, log[-6000:]
    # The demo's terminal shows the provider's log too: the kernel's end is no traceback.
    provider_log = "".join(market.relayed.stderr_lines[provider_lines:])
    assert "Traceback" not in provider_log, provider_log[-6000:]
    assert code == 0 or signum == signal.SIGINT, log[-3000:]

    # Read the moment the server is gone: nothing may be left for later.
    client = paid.client()
    try:
        record = await client.get_lease(lease.lease)
    finally:
        client.close()
    billing = record.billing
    assert record.state == "ended", (record, log[-3000:])
    assert billing is not None and billing.settlement is not None, (record, log[-3000:])
    settlement = billing.settlement
    assert settlement.kind == "settle" and settlement.state == "done", (settlement, log[-3000:])
    assert billing.billed_seconds >= int(served) - BILL_TOLERANCE_S, (billing, served)
    assert settlement.amount_lamports == billing.spent_lamports
    terms = paid.terms(user, record.provider, record.lease)
    after = await ledger.snapshot(terms)
    assert after.escrow == 0, "the escrow is closed"
    await ledger.assert_conserved(
        terms,
        before,
        after,
        paid_to_provider=settlement.amount_lamports,
        signatures=[billing.escrow_signature, settlement.signature],
    )


async def _until_message(
    ws: Any, request: dict[str, Any], channel: str, msg_type: str, **content: Any
) -> dict[str, Any]:
    """The first message on ``channel`` of ``msg_type`` answering ``request`` (whose content
    holds ``content``)."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), 60)
        assert isinstance(raw, bytes)
        chan, msg = _decode(raw)
        if (
            chan == channel
            and msg["msg_type"] == msg_type
            and msg["parent_header"].get("msg_id") == request["header"]["msg_id"]
            and all(msg["content"].get(k) == v for k, v in content.items())
        ):
            return msg
