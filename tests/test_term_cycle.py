"""A class's whole term, end to end (issue 14's "Done when"): real processes and real
transactions on the coordinator's embedded ledger, nothing simulated but the GPU.

An instructor's key creates a class (quota, one kernel per student, a short idle timeout, a
queue wait bound), funds both students' allowances on-chain; two students with 0 SOL join by
code (one with the link, one with the bare code). A rush on the provider's one GPU: student A
gets a kernel (a real provider host, a real ipykernel through the io-remote provisioner with
``cohort`` set), student B's start queues with a place and a wait estimate, and the dashboard
shows who holds the GPU and who waits. A's kernel, left idle, is stopped by the class's idle
timeout on the provider's word; the freed GPU serves B from the queue. Both sessions are
settled by the provider host; the dashboard's GPU-seconds, cost and allowance figures equal
the ledger's. The instructor ends the term and reclaims: every lamport the instructor lost
went to the provider, to fees, or to the one-time multisig rents, read exactly on-chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from spl.token.instructions import get_associated_token_address

from jupyter_io.cohort_client import CohortClient
from jupyter_io.coordinator.cohort_limits import idle_reason
from jupyter_io.coordinator.models import SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import SettlementRecord
from jupyter_io.coordinator_client import TooManyPendingLeases
from jupyter_io.errors import LeaseError
from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient, CohortSession
from jupyter_io.payments.token_accounts import NATIVE_MINT
from kernel_provisioner.progress import PROGRESS_ATTR
from provider_host.server import ProviderServer

from .escrow_books import Books
from .provider_host.conftest import (  # the fixtures this test runs on
    CoordinatorStarter,
    HostFactory,
    client_keypair,  # noqa: F401
    host_keypair_file,  # noqa: F401
    make_host,  # noqa: F401
    market_host_of,
    start_coordinator,  # noqa: F401
    workspace_root,  # noqa: F401
)

pytestmark = pytest.mark.timeout(120)

#: 1,000 lamports a GPU-second: a cost in lamports is exactly 1,000 x the GPU-seconds billed.
PRICE = 3_600_000
CAP = 50_000_000
#: The class's idle timeout (the API's least is 60 s; set in the store, as a test may).
IDLE = 3.0
WAIT = 30.0


def wsol(owner: Pubkey) -> Pubkey:
    """``owner``'s wSOL (associated token) account."""
    return get_associated_token_address(owner, NATIVE_MINT)


async def _bounded(awaitable: Awaitable[Any], what: str, timeout: float = WAIT) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {what} within {timeout} s") from None


def _kernelspec(root: Path, name: str, coordinator: str, keypair: Path, cohort: str) -> str:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Class ({name})",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "io-remote",
                "config": {
                    "coordinator_url": coordinator,
                    "keypair_path": str(keypair),
                    "gpu": "RTX 4090",
                    "cohort": cohort,
                    "probe_candidates": 0,
                },
            }
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


class Progress(logging.Handler):
    """The provisioners' progress records (any thread), as events on the test's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.loop = loop
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, PROGRESS_ATTR, None)
        if event is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, dict(event))

    async def next(self, step: str) -> dict[str, Any]:
        while (event := await self.events.get())["step"] != step:
            pass
        return event


@pytest.fixture
async def kernels() -> AsyncIterator[Callable[[str], AsyncKernelManager]]:
    """Kernel managers; teardown shuts down what is still running."""
    made: list[AsyncKernelManager] = []

    def make(name: str) -> AsyncKernelManager:
        km = AsyncKernelManager(kernel_name=name)
        made.append(km)
        return km

    yield make
    for km in made:
        with contextlib.suppress(Exception):
            if km.has_kernel:
                await asyncio.wait_for(km.shutdown_kernel(now=True), WAIT)
            elif km.provisioner is not None:
                await asyncio.wait_for(km.provisioner.cleanup(restart=False), WAIT)


async def _run(km: AsyncKernelManager, code: str) -> dict[str, Any]:
    kc = km.client()
    kc.start_channels()
    try:
        await _bounded(kc.wait_for_ready(timeout=WAIT), "kernel ready")
        reply: dict[str, Any] = await _bounded(
            kc.execute_interactive(code, timeout=WAIT), f"reply to {code!r}"
        )
        return reply
    finally:
        kc.stop_channels()


async def _stream(kc: Any, msg_id: str) -> str:
    """The first stream output of the execution ``msg_id``."""
    while True:
        msg = await kc.get_iopub_msg(timeout=WAIT)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            return str(msg["content"]["text"])


async def _settled(server: CoordinatorServer, *leases: str) -> dict[str, SettlementRecord]:
    """The leases' settlements once the worker has none pending (the provider co-signed)."""
    assert server.settlements is not None and server.store is not None
    await _bounded(server.settlements.wait_idle(), "settlements done")
    rows = await server.store.settlements_of(leases)
    assert {lease: rows[lease].state for lease in leases} == dict.fromkeys(
        leases, SettlementState.DONE
    ), rows
    return rows


async def test_a_class_runs_its_whole_term(
    start_coordinator: CoordinatorStarter,  # noqa: F811
    make_host: HostFactory,  # noqa: F811
    jupyter_env: Path,
    tmp_path: Path,
    kernels: Callable[[str], AsyncKernelManager],
) -> None:
    loop = asyncio.get_running_loop()
    server = await start_coordinator(
        payments="escrow", settle_retry_interval=0.2, min_deposit_seconds=1,
        cohort_allowance_ttl=0,
    )  # fmt: skip
    host_factory = market_host_of(make_host, server, tmp_path)
    host: ProviderServer = await host_factory(
        direct=True, simulate_gpu=["RTX 4090:24"], price=str(PRICE / LAMPORTS_PER_SOL)
    )
    assert server.keypair is not None and host.host_keypair is not None
    arbiter, provider = server.keypair.pubkey(), host.host_keypair.pubkey()
    store = server.store
    assert store is not None and server.registry is not None
    pool = CohortPoolClient.connect(server.solana_url)
    books = Books(lambda: pool.client)
    instructor, alice, bob = Keypair(), Keypair(), Keypair()
    teacher = CohortClient(server.url, instructor, timeout=WAIT)
    ended: dict[str, asyncio.Future[str]] = {}

    def gone(lease: str, reason: str) -> None:
        future = ended.setdefault(lease, loop.create_future())
        if not future.done():
            future.set_result(reason)

    server.registry.lease_listeners.append(gone)
    progress = Progress(loop)
    traitlets_log = logging.getLogger("traitlets")
    traitlets_log.addHandler(progress)
    level = traitlets_log.level
    traitlets_log.setLevel(logging.INFO)
    try:
        await pool.airdrop(instructor.pubkey(), LAMPORTS_PER_SOL)
        await pool.airdrop(arbiter, LAMPORTS_PER_SOL // 10)  # the float it fronts rents from
        await pool.airdrop(provider, LAMPORTS_PER_SOL // 10)  # its settlement fees
        await server.registry.wait_for(lambda: len(server.index) >= 1, WAIT)

        # ---- the instructor creates the class and shares a code ---------------------------
        view = await teacher.create(
            name="GPU 101", gpu_types=["RTX 4090"], max_price_lamports_per_hour=PRICE,
            quota_gpu_seconds_per_week=3600, max_concurrent_per_student=1,
            max_session_seconds=600, queue_max_wait_seconds=120, student_cap_lamports=CAP,
            term_ends_at=time.time() + 30 * 86400,
        )  # fmt: skip
        cohort = view.id
        await store.update_cohort(cohort, idle_timeout_seconds=IDLE)
        code = await teacher.create_code(cohort, max_uses=2)
        students = {"alice": alice, "bob": bob}
        for name, key in students.items():
            async with CohortClient(server.url, key, timeout=WAIT) as client:
                joined = await client.join(code.link if name == "alice" else code.code)
            assert joined.id == cohort and joined.role == "student"
        terms = {n: AllowanceTerms(instructor.pubkey(), k.pubkey(), arbiter, cohort)
                 for n, k in students.items()}  # fmt: skip

        # The fixed accounts of the term before any money moves (escrows do not exist yet:
        # their addresses derive from lease ids not drawn yet).
        fixed = [
            instructor.pubkey(), alice.pubkey(), bob.pubkey(), provider,
            wsol(provider), arbiter,
            wsol(arbiter),
            *(t.allowance for t in terms.values()), *(t.delegate for t in terms.values()),
        ]  # fmt: skip
        before = await _lamports(pool, fixed)
        assert before[alice.pubkey()] == before[bob.pubkey()] == 0  # no SOL of their own

        # ---- the instructor funds both allowances, as `jupyter io cohort fund` does -------
        receipts = await pool.fund(
            instructor, await pool.plan_grants([(t, CAP) for t in terms.values()])
        )
        signatures: list[str] = [str(r.signature) for r in receipts]

        # ---- the rush: one GPU, A gets it, B queues ----------------------------------------
        specs = jupyter_env / "share" / "jupyter"
        km_a = kernels(
            _kernelspec(
                specs, "alice", server.url, write_keypair(alice, tmp_path / "a.json"), cohort
            )
        )
        km_b = kernels(
            _kernelspec(specs, "bob", server.url, write_keypair(bob, tmp_path / "b.json"), cohort)
        )
        await _bounded(km_a.start_kernel(), "kernel for A", 60)
        grant_a = km_a.provisioner.lease.grant  # type: ignore[union-attr]
        assert grant_a is not None and grant_a.gpu == "RTX 4090"
        lease_a = grant_a.lease
        ended.setdefault(lease_a, loop.create_future())
        # A runs a cell at once and keeps the kernel busy while B's start comes in.
        kc_a = km_a.client()
        kc_a.start_channels()
        await _bounded(kc_a.wait_for_ready(timeout=WAIT), "A's kernel ready")
        running = kc_a.execute("print('running', flush=True); import time; time.sleep(600)")
        output = await _bounded(_stream(kc_a, running), "A's cell running")
        assert output == "running\n"
        start_b = asyncio.create_task(km_b.start_kernel())
        queued = await _bounded(progress.next("queue"), "B's place in the queue")
        assert queued["place"] == 1 and queued["estimated_wait_seconds"] > 0
        assert queued["message"].startswith("In the queue: place 1, ")
        assert queued["expires_at"] <= time.time() + 120  # the class's queue_max_wait
        # One kernel per student: A's second start is refused, not queued.
        async with CohortClient(server.url, alice, timeout=WAIT) as again:
            with pytest.raises(TooManyPendingLeases) as refused:
                await again.request_lease("RTX 4090", cohort=cohort)
        assert refused.value.code == "too_many_kernels"
        board = await teacher.dashboard(cohort)
        rows = {r["student"]: r for r in board["students"]}
        assert rows[str(alice.pubkey())]["live_kernels"] == 1
        bob_row = rows[str(bob.pubkey())]
        assert (bob_row["queued"], bob_row["live_kernels"]) == (1, 0)
        assert [q["student"] for q in board["queue"]] == [str(bob.pubkey())]
        assert not start_b.done()

        # ---- A's cell ends; the kernel left idle is stopped by the class's idle timeout ----
        await km_a.interrupt_kernel()
        idled_at = time.monotonic()
        reason = await _bounded(ended[lease_a], "idle stop of A's kernel", IDLE + WAIT)
        assert reason == idle_reason(IDLE)
        assert time.monotonic() - idled_at >= IDLE - 0.5  # not before the timeout
        kc_a.stop_channels()
        # The provider stopped the kernel (the coordinator's end reached the host).
        await _bounded(km_a.provisioner.wait(), "A's kernel stopped")  # type: ignore[union-attr]
        assert not km_a.has_kernel
        record_a = await store.get_lease(lease_a)
        assert record_a is not None and record_a.end_reason == idle_reason(IDLE)

        # ---- the freed GPU serves B from the queue --------------------------------------
        await _bounded(start_b, "B's kernel, served from the queue", 60)
        grant_b = km_b.provisioner.lease.grant  # type: ignore[union-attr]
        assert grant_b is not None and grant_b.provider == str(provider)
        lease_b = grant_b.lease
        reply = await _run(km_b, "import time; time.sleep(1.5)")  # B's work: billed time
        assert reply["content"]["status"] == "ok"
        await _bounded(km_b.shutdown_kernel(), "B's shutdown")

        rows_settled = await _settled(server, lease_a, lease_b)
        paid = {"alice": rows_settled[lease_a].amount_lamports,
                "bob": rows_settled[lease_b].amount_lamports}  # fmt: skip
        assert paid["alice"] > 0 and paid["bob"] > 0
        for lease in (lease_a, lease_b):
            record = await store.get_lease(lease)
            assert record is not None and record.escrow_signature is not None
            signatures += [record.escrow_signature, str(rows_settled[lease].signature)]

        # ---- the dashboard equals the ledger --------------------------------------------
        board = await teacher.dashboard(cohort)
        rows = {r["student"]: r for r in board["students"]}
        reimbursement = {}
        for name, key in students.items():
            row = rows[str(key.pubkey())]
            state = await pool.allowance_state(terms[name])
            assert state is not None
            assert row["allowance"]["amount_lamports"] == state.amount
            assert row["allowance"]["delegated_lamports"] == state.delegated_amount
            assert row["allowance"]["spendable_lamports"] == state.spendable
            # What the session cost is what the provider was paid from the escrow; the rest
            # came back to the allowance, less the arbiter's reimbursed fee and rent.
            assert row["cost_lamports_week"] == paid[name]
            # GPU-seconds count the seconds the lease was active; billing (provider's
            # reports, the student's acks) may count fewer.
            assert row["gpu_seconds_week"] * PRICE // 3600 >= paid[name]
            assert row["quota_left_gpu_seconds"] == 3600 - row["gpu_seconds_week"]
            assert (row["live_kernels"], row["queued"]) == (0, 0)
            reimbursement[name] = CAP - paid[name] - state.amount
        # Alice's session created her escrow multisig; so did Bob's (one per student): each
        # reimbursed its fee and that rent.
        multisig_rent = (await pool.client.get_minimum_balance_for_rent_exemption(355)).value
        assert reimbursement == {n: 10_000 + multisig_rent for n in students}
        pool_figures = board["pool"]
        assert pool_figures["allowance_lamports"] == sum(
            rows[str(k.pubkey())]["allowance"]["spendable_lamports"] for k in students.values()
        )
        assert pool_figures["spent_lamports_term"] == sum(paid.values())
        assert pool_figures["projected_run_out"] is not None
        assert board["queue"] == []

        # ---- the instructor ends the term and reclaims ----------------------------------
        ended_view = await teacher.end(cohort)
        assert ended_view.state == "ended"
        reclaimed = await pool.reclaim(instructor, list(terms.values()))
        signatures += [str(r.signature) for r in reclaimed]
        assert [await pool.allowance_state(t) for t in terms.values()] == [None, None]
        board = await teacher.dashboard(cohort)  # the ended term's books stay readable
        assert [r["allowance"] for r in board["students"]] == [None, None]
        assert (board["pool"]["allowance_lamports"], board["pool"]["students_funded"]) == (0, 0)
        assert board["pool"]["spent_lamports_term"] == sum(paid.values())
        async with CohortClient(server.url, bob, timeout=WAIT) as late:
            with pytest.raises(LeaseError, match="ended"):
                await late.request_lease("RTX 4090", cohort=cohort)

        # ---- conservation, exact on-chain -----------------------------------------------
        sessions: list[CohortSession] = [
            terms["alice"].session(provider, lease_a),
            terms["bob"].session(provider, lease_b),
        ]
        escrow_accounts = [a for s in sessions for a in (s.escrow.escrow, s.escrow.multisig)]
        after = await _lamports(pool, fixed + escrow_accounts)
        fees = await books.fees(signatures)
        assert set(fees) <= {instructor.pubkey(), arbiter, provider}, fees
        assert sum(after.values()) == sum(before.values()) - sum(fees.values())
        assert after[alice.pubkey()] == after[bob.pubkey()] == 0  # the students paid nothing
        assert all(after[s.escrow.escrow] == 0 for s in sessions)  # both escrows closed
        assert all(after[t.allowance] == 0 for t in terms.values())  # both reclaimed
        # The arbiter fronted rents and fees and got every lamport back.
        assert after[arbiter] + after[wsol(arbiter)] == (before[arbiter] + before[wsol(arbiter)])
        provider_gain = sum(after[k] - before[k] for k in (provider, wsol(provider)))
        assert provider_gain == sum(paid.values()) - fees.get(provider, 0)
        # Rents not returned: the delegate multisig of each student (the instructor's) and
        # the escrow multisig of each student (reimbursed to the arbiter from the pool).
        kept_rents = [after[t.delegate] for t in terms.values()] + [
            after[s.escrow.multisig] for s in sessions
        ]
        assert kept_rents == [multisig_rent] * 4
        instructor_loss = before[instructor.pubkey()] - after[instructor.pubkey()]
        assert instructor_loss == provider_gain + sum(fees.values()) + sum(kept_rents)
    finally:
        traitlets_log.removeHandler(progress)
        traitlets_log.setLevel(level)
        teacher.close()
        await pool.close()


async def _lamports(pool: CohortPoolClient, keys: list[Pubkey]) -> dict[Pubkey, int]:
    accounts = (await pool.client.get_multiple_accounts(keys)).value
    return {k: (a.lamports if a is not None else 0) for k, a in zip(keys, accounts, strict=True)}
