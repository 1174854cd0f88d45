"""Failover (issue 16.2) end to end: an escrow coordinator with its embedded ledger, two
provider hosts, real ipykernels. The provider of a running kernel is killed (SIGKILL); with
``failover`` on the kernel continues on the other provider under the same kernel id and
ports, its journal restored, the user told what did not come back, both leases paid exactly.
Without another provider within the price cap the kernel is lost and refunded as before."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from jupyter_io.payments.amounts import LAMPORTS_PER_SOL

from .test_payments import ESCROW_ARGS, Ledger, fund_parties, settled

log = logging.getLogger(__name__)

ACK_INTERVAL = 0.5
CELLS = [
    "import numpy as np\nx = np.arange(1000)\nn = 41",
    "gen = (i for i in range(3))",
]


async def _alive_until(km: Any, event: asyncio.Event, timeout: float) -> int:
    """Ask the kernel manager whether the kernel is alive, every 50 ms, until ``event``;
    assert it always was. Returns how many times it asked."""
    asked = 0
    deadline = time.monotonic() + timeout
    while not event.is_set():
        assert await km.is_alive(), "the kernel manager saw a dead kernel"
        asked += 1
        assert time.monotonic() < deadline, f"no failover in {timeout} s"
        await asyncio.sleep(0.05)  # the kernel manager's restarter polls on a timer too
    return asked


async def _notice(kc: Any, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no failover notice on iopub"
        try:
            msg = await kc.get_iopub_msg(timeout=remaining)
        except Empty:
            continue
        if msg["msg_type"] == "stream" and "continues on provider" in msg["content"]["text"]:
            return str(msg["content"]["text"])


async def test_a_killed_provider_fails_over_with_the_same_kernel_and_both_leases_paid(
    start_market: Any, kernelspecs: Any, cells: Any, tmp_path: Path
) -> None:
    own = await fund_parties(start_market(*ESCROW_ARGS))
    chain = Ledger(own.solana_url)
    market = own.market
    spec = kernelspecs.install_lease(
        "failover", own.url, market.user_keypair_path, gpu="RTX 4090", failover=True,
        usage_ack_interval=ACK_INTERVAL,
    )  # fmt: skip
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    (notebook / "data.txt").write_text("from the notebook's directory")
    km = AsyncKernelManager(kernel_name=spec)
    await asyncio.wait_for(km.start_kernel(cwd=str(notebook)), 60)
    try:
        await _fail_over_and_pay(own, chain, km, cells)
    finally:
        if km.has_kernel:
            await asyncio.wait_for(km.shutdown_kernel(now=True), 60)
        await chain.close()


async def _fail_over_and_pay(own: Any, chain: Ledger, km: Any, cells: Any) -> None:
    market = own.market
    prov: Any = km.provisioner
    kernel_id, info_before = km.kernel_id, dict(km.get_connection_info())
    first = prov.lease.grant
    assert first.provider == market.relayed.pubkey
    first_terms = own.terms(market.user.pubkey(), first.provider, first.lease)
    first_during = await chain.snapshot(first_terms)
    kc = await cells.connect(km)
    try:
        for code in CELLS:
            assert (await cells.run(kc, code)).status == "ok"
        assert (await prov.state_journal.sync(60)) is not None

        killed, killed_at = time.monotonic(), time.time()
        market.relayed.proc.kill()  # SIGKILL: no goodbye to anyone
        asked = await _alive_until(km, prov._failover.finished, 90)
        took = time.monotonic() - killed
        lost_at = next(e.at for e in prov.progress if e.details.get("phase") == "lost")
        log.warning(
            "failover: provider killed -> loss detected %.2f s -> new kernel ready, state "
            "restored: %.2f s",
            lost_at - killed_at,
            took,
        )
        assert asked > 0
        assert prov._failover.done, [e.message for e in prov.progress[-4:]]
        facts = prov._failover.done[-1]
        assert (facts["old_provider"], facts["new_provider"]) == (
            market.relayed.pubkey,
            market.direct.pubkey,
        )
        assert facts["restored"] == ["n", "x"]
        assert [(m["name"], m["source"]) for m in facts["missing"]] == [("gen", CELLS[1])]
        # Same kernel id, same ports and key: the client connected before the kill goes on.
        assert km.kernel_id == kernel_id and km.get_connection_info() == info_before
        text = await _notice(kc, 30)
        assert market.relayed.pubkey in text and market.direct.pubkey in text
        assert "gen" in text and CELLS[1] in text
        phases = [e.details.get("phase") for e in prov.progress if e.step.value == "failover"]
        assert phases == ["lost", "done"]
        got = await cells.run(kc, "print(n + 1, int(x.sum()))", timeout=60)
        assert got.stream() == "42 499500\n"
        # The notebook's directory was pushed to the new provider, as at a start.
        assert facts["files"] and "files were pushed" in text
        got = await cells.run(kc, "print(open('data.txt').read())", timeout=60)
        assert got.stream() == "from the notebook's directory\n"
    finally:
        kc.stop_channels()

    second = prov.lease.grant
    assert second.lease != first.lease and second.provider == market.direct.pubkey
    second_terms = own.terms(market.user.pubkey(), second.provider, second.lease)
    # The old lease: refunded past its last acknowledged second, in the background.
    first_info = await settled(own, first.lease)
    first_settlement = first_info.billing.settlement  # type: ignore[union-attr]
    assert first_info.state == "failed"
    assert first_settlement is not None and first_settlement.kind == "refund"
    first_after = await chain.snapshot(first_terms)
    assert first_after.escrow == 0
    assert (
        first_after.provider
        + first_after.provider_wsol
        - (first_during.provider + first_during.provider_wsol)
        == first_settlement.amount_lamports
    )
    assert first_settlement.amount_lamports <= 120_000_000 * 60 // 3600
    # The new lease: settled at shutdown, every lamport accounted for.
    second_during = await chain.snapshot(second_terms)
    await asyncio.wait_for(km.shutdown_kernel(), 30)
    second_info = await settled(own, second.lease)
    second_settlement = second_info.billing.settlement  # type: ignore[union-attr]
    assert second_settlement is not None and second_settlement.kind == "settle"
    second_after = await chain.snapshot(second_terms)
    assert second_after.escrow == 0
    await chain.assert_conserved(
        second_terms, second_during, second_after,
        paid_to_provider=second_settlement.amount_lamports,
        signatures=[second_settlement.signature],
    )  # fmt: skip
    assert second_settlement.amount_lamports < LAMPORTS_PER_SOL


async def test_without_another_provider_in_the_price_cap_the_kernel_is_lost_and_refunded(
    start_market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    # The direct provider's RTX 4090 costs 0.2 SOL/h, over this cap: nobody can take over.
    own = await fund_parties(start_market(*ESCROW_ARGS))
    chain = Ledger(own.solana_url)
    market = own.market
    spec = kernelspecs.install_lease(
        "failover-none", own.url, market.user_keypair_path, gpu="RTX 4090",
        max_price_per_hour="0.15", failover=True, failover_timeout=5,
        usage_ack_interval=ACK_INTERVAL,
    )  # fmt: skip
    km = await start_kernel(spec)
    prov: Any = km.provisioner
    grant = prov.lease.grant
    terms = own.terms(market.user.pubkey(), grant.provider, grant.lease)
    try:
        during = await chain.snapshot(terms)
        market.relayed.proc.kill()
        assert await prov.tunnel.wait_exited(timeout=20) is not None
        await asyncio.wait_for(prov._failover.finished.wait(), 30)
        assert not prov._failover.done
        assert not await km.is_alive()
        assert prov.progress[-1].details.get("phase") == "failed"
        assert prov.lease.grant.lease == grant.lease  # nothing else was leased or paid
        await asyncio.wait_for(km.shutdown_kernel(now=True), 60)
        info = await settled(own, grant.lease, timeout=10)
        assert info.state == "failed"
        settlement = info.billing.settlement  # type: ignore[union-attr]
        assert settlement is not None and settlement.kind == "refund"
        after = await chain.snapshot(terms)
        assert after.escrow == 0
        await chain.assert_conserved(
            terms, during, after, paid_to_provider=settlement.amount_lamports,
            signatures=[settlement.signature],
        )  # fmt: skip
    finally:
        await chain.close()


async def test_a_silent_host_is_lost_on_the_coordinators_word_and_a_fallback_gpu_takes_over(
    start_market: Any, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    # The direct provider (the only A100) freezes: its connections neither answer nor are
    # refused, so the tunnel alone would keep resuming for its 120 s grace period. The
    # coordinator misses its heartbeats and fails the lease; asked while the tunnel is down,
    # it is the word the failover acts on, and the fallback class (RTX 4090) takes over.
    own = await fund_parties(start_market(*ESCROW_ARGS))
    market = own.market
    spec = kernelspecs.install_lease(
        "failover-silent", own.url, market.user_keypair_path, gpu="A100",
        fallback_gpus=["RTX 4090"], failover=True, failover_check_interval=0.5,
        ping_interval=0.5, ping_timeout=1.0, connect_timeout=1.0, max_session_hours=0.1,
        usage_ack_interval=ACK_INTERVAL,
    )  # fmt: skip
    km = await start_kernel(spec)
    prov: Any = km.provisioner
    assert prov.lease.grant.provider == market.direct.pubkey
    assert prov.grace_period == 120
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "z = 'kept'")).status == "ok"
        assert (await prov.state_journal.sync(60)) is not None
        frozen = time.monotonic()
        market.direct.proc.send_signal(signal.SIGSTOP)
        try:
            await _alive_until(km, prov._failover.finished, 60)
        finally:
            market.direct.proc.send_signal(signal.SIGCONT)
        log.warning("failover of a silent host: frozen -> ready %.2f s", time.monotonic() - frozen)
        lost = next(e for e in prov.progress if e.details.get("phase") == "lost")
        assert "the coordinator failed lease" in lost.details["reason"]
        facts = prov._failover.done[-1]
        assert facts["new_provider"] == market.relayed.pubkey and facts["gpu"] == "RTX 4090"
        assert facts["restored"] == ["z"]
        assert (await cells.run(kc, "print(z)", timeout=60)).stream() == "kept\n"
    finally:
        kc.stop_channels()
