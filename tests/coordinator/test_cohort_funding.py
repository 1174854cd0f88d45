"""A cohort lease funded from the student's allowance, at the coordinator's REST API
(``docs/payments-contract.md`` section 6): a real escrow coordinator with its embedded ledger,
an instructor who funds allowances on it, a student with 0 SOL throughout, and a
:class:`FakeProvider` on a real link that co-signs settlements after checking them. Every
scenario ends with :class:`CohortBooks`' conservation check.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey

from jupyter_io.cohorts import CohortSettings, new_cohort_id
from jupyter_io.coordinator.models import SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CohortFundingOffer, CoordinatorClient
from jupyter_io.leases import verify_token
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.cohort_pool import (
    AllowanceTerms,
    CohortPoolClient,
    CohortSession,
    match_cohort_funding,
    match_cohort_settlement,
)
from kernel_provisioner.lease import KernelLease, LeaseNotFunded, LeaseTerms

from ..cohort_books import CohortBooks
from .conftest import WAIT, FakeProvider, Starter, gpu_offer
from .test_billing import Api

pytestmark = pytest.mark.timeout(90)

PRICE = 3_600_000  # lamports per hour: 1,000 lamports a second
CAP = 50_000_000


@dataclass
class Cohort:
    server: CoordinatorServer
    provider: FakeProvider
    pool: CohortPoolClient
    instructor: Keypair
    student: Keypair
    api: Api
    id: str

    @property
    def arbiter(self) -> Pubkey:
        assert self.server.keypair is not None
        return self.server.keypair.pubkey()

    def terms(self, student: Pubkey | None = None, cohort: str | None = None) -> AllowanceTerms:
        return AllowanceTerms(
            self.instructor.pubkey(),
            student or self.student.pubkey(),
            self.arbiter,
            cohort or self.id,
        )

    def session(self, lease: str) -> CohortSession:
        return self.terms().session(Pubkey.from_string(self.provider.pubkey), lease)

    async def lease(self, api: Api | None = None, cohort: str | None = None) -> str:
        code, grant = await (api or self.api)(
            "POST", "/api/v1/leases", {"gpu": "RTX 4090", "cohort": cohort or self.id}
        )
        assert code == 201, grant
        assert grant["escrow"]["funding"] == "cohort" and grant["token"] is None
        return str(grant["lease"])

    async def fund(self, lease: str) -> tuple[str, int]:
        """The student's half: ask, check the message, sign, post; the grant's signature."""
        code, offer = await self.api("POST", f"/api/v1/leases/{lease}/cohort-funding", {})
        assert code == 200, offer
        raw = base64.b64decode(offer["message"])
        assert match_cohort_funding(self.session(lease), offer["deposit_lamports"], raw)
        signature = self.student.sign_message(to_bytes_versioned(MessageV0.from_bytes(raw)))
        code, grant = await self.api(
            "POST",
            f"/api/v1/leases/{lease}/cohort-funding",
            {"signature": str(signature), "message": offer["message"]},
        )
        assert code == 200, grant
        # The token names the cohort and its instructor: the provider derives the allowance
        # from them to check the settlement.
        claims = verify_token(
            grant["token"], coordinator=self.arbiter, user=self.student.pubkey(),
            provider=Pubkey.from_string(self.provider.pubkey), now=time.time(),
        )  # fmt: skip
        assert (claims.cohort, claims.cohort_instructor) == (self.id, self.instructor.pubkey())
        return str(grant["escrow"]["address"]), int(offer["deposit_lamports"])

    async def settle_as_provider(self, lease: str) -> int:
        """Answer the worker's sign_settlement after checking it is the cohort shape."""
        request = await self.provider.next_message("sign_settlement")
        assert request["lease"] == lease
        raw = base64.b64decode(request["message"])
        message = MessageV0.from_bytes(raw)
        assert match_cohort_settlement(
            self.session(lease), request["amount"], raw, blockhash=message.recent_blockhash
        )
        signature = self.provider.keypair.sign_message(to_bytes_versioned(message))
        await self.provider.send(
            {"type": "settlement_signature", "lease": lease, "signature": str(signature)}
        )
        return int(request["amount"])


@pytest.fixture
async def cohort(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> AsyncIterator[Cohort]:
    server = await start_coordinator(
        payments="escrow", settle_retry_interval=0.2, min_deposit_seconds=1
    )
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE, count=4)])
    providers.append(provider)
    await provider.connect()
    pool = CohortPoolClient.connect(server.solana_url)
    instructor, student = Keypair(), Keypair()
    await pool.airdrop(instructor.pubkey(), LAMPORTS_PER_SOL)
    assert server.keypair is not None  # the arbiter fronts rents and fees: it holds a float
    await pool.airdrop(server.keypair.pubkey(), LAMPORTS_PER_SOL // 10)
    await pool.airdrop(provider.keypair.pubkey(), LAMPORTS_PER_SOL // 10)  # settlement fees
    store = server.store
    assert store is not None
    settings = CohortSettings(
        name="GPU 101",
        gpu_types=("RTX 4090",),
        max_price_lamports_per_hour=PRICE,
        term_ends_at=time.time() + 30 * 86400,
        max_session_seconds=600,
        student_cap_lamports=CAP,
    )
    record = await store.create_cohort(
        instructor=str(instructor.pubkey()), settings=settings, cohort_id=new_cohort_id()
    )
    await store.add_members(record.id, [str(student.pubkey())])
    api = Api(server.url, student)
    made = Cohort(server, provider, pool, instructor, student, api, record.id)
    await pool.fund(instructor, await pool.plan_grants([(made.terms(), CAP)]))
    try:
        yield made
    finally:
        api.close()
        await pool.close()


async def _settled(server: CoordinatorServer, lease: str) -> Any:
    store = server.store
    assert store is not None
    deadline = asyncio.get_running_loop().time() + WAIT
    while (
        row := await store.get_settlement(lease)
    ) is None or row.state is not SettlementState.DONE:
        assert asyncio.get_running_loop().time() < deadline, row.error if row else None
        await asyncio.sleep(0.05)
    return row


async def test_a_cohort_lease_is_funded_by_student_and_arbiter_and_settled_back_to_the_allowance(
    cohort: Cohort,
) -> None:
    books = CohortBooks(lambda: cohort.pool.client)
    lease = await cohort.lease()
    session = cohort.session(lease)
    before = await books.snapshot([session])
    # The plain escrow path is closed to a cohort lease: the student's own SOL cannot pass
    # for the pool's (its settlement returns the rest to the allowance).
    code, body = await cohort.api("POST", f"/api/v1/leases/{lease}/escrow", {})
    assert code == 402 and "cohort-funding" in body["error"]["message"]

    address, deposit = await cohort.fund(lease)
    assert address == str(session.escrow.escrow)
    assert deposit == PRICE * 600 // 3600  # the cohort's session length, at the lease's price
    assert (await cohort.pool.verify_escrow(session.escrow, deposit)).amount == deposit
    assert await cohort.pool.balance(cohort.student.pubkey()) == 0
    code, again = await cohort.api("POST", f"/api/v1/leases/{lease}/cohort-funding", {})
    assert code == 409 and "funded already" in again["error"]["message"]

    await cohort.provider.session(lease, "active")
    await cohort.provider.usage(lease, 1, 2)
    await cohort.provider.heartbeat()
    await asyncio.sleep(1.2)  # the lease runs a second: something is billed
    await cohort.api("DELETE", f"/api/v1/leases/{lease}")
    paid = await cohort.settle_as_provider(lease)
    row = await _settled(cohort.server, lease)
    assert row.amount_lamports == paid and paid > 0
    after = await books.snapshot([session])
    assert after.escrows == 0 and after.student == 0
    await books.assert_conserved(
        [session], before, after, paid_to_provider=paid,
        signatures=[row.signature, *(await _funding_signatures(cohort, lease))],
    )  # fmt: skip
    state = await cohort.pool.allowance_state(cohort.terms())
    assert state is not None and state.amount == CAP - paid - 10_000 - 3_361_680


async def _funding_signatures(cohort: Cohort, lease: str) -> list[str]:
    store = cohort.server.store
    assert store is not None
    record = await store.get_lease(lease)
    assert record is not None and record.escrow_signature is not None
    return [record.escrow_signature]


async def test_the_arbiter_co_signs_only_the_message_it_built(cohort: Cohort) -> None:
    lease = await cohort.lease()
    path = f"/api/v1/leases/{lease}/cohort-funding"
    code, body = await cohort.api(
        "POST", path, {"signature": str(cohort.student.sign_message(b"x"))}
    )
    assert code == 409 and "POST {}" in body["error"]["message"]  # nothing handed out yet
    code, offer = await cohort.api("POST", path, {})
    assert code == 200
    raw = base64.b64decode(offer["message"])
    message = MessageV0.from_bytes(raw)
    # The student changes the message (here: the allowance moved to the student's own wSOL
    # account instead of the escrow) and signs that: refused, nothing is signed or sent.
    tampered = bytearray(raw)
    at = raw.index(bytes(cohort.session(lease).escrow.escrow))
    tampered[at : at + 32] = bytes(Keypair().pubkey())
    forged = MessageV0.from_bytes(bytes(tampered))
    signature = cohort.student.sign_message(to_bytes_versioned(forged))
    code, body = await cohort.api(
        "POST", path,
        {"signature": str(signature), "message": base64.b64encode(bytes(tampered)).decode()},
    )  # fmt: skip
    assert code == 400 and body["error"]["code"] == "tampered"
    # The same signature without the message: it does not verify over the arbiter's message.
    code, body = await cohort.api("POST", path, {"signature": str(signature)})
    assert code == 400 and body["error"]["code"] == "tampered"
    assert await cohort.pool.escrow_state(cohort.session(lease).escrow) is None
    # Another user cannot fund (or learn) someone else's cohort lease.
    stranger = Api(cohort.server.url, Keypair())
    try:
        code, body = await stranger("POST", path, {})
        assert code == 403
    finally:
        stranger.close()
    # The genuine signature still works (the message is kept until used).
    del message
    await cohort.fund(lease)


async def test_a_plain_lease_and_a_removed_student_are_refused(cohort: Cohort) -> None:
    code, grant = await cohort.api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
    assert code == 201 and "funding" not in grant["escrow"]
    code, body = await cohort.api("POST", f"/api/v1/leases/{grant['lease']}/cohort-funding", {})
    assert code == 409 and body["error"]["code"] == "not_cohort"
    lease = await cohort.lease()
    store = cohort.server.store
    assert store is not None
    await store.remove_member(cohort.id, str(cohort.student.pubkey()))
    code, body = await cohort.api("POST", f"/api/v1/leases/{lease}/cohort-funding", {})
    assert code == 403 and "no longer a student" in body["error"]["message"]


async def test_a_spent_allowance_is_a_402_that_names_the_top_up(cohort: Cohort) -> None:
    await cohort.pool.reclaim(cohort.instructor, [cohort.terms()])
    lease = await cohort.lease()
    code, body = await cohort.api("POST", f"/api/v1/leases/{lease}/cohort-funding", {})
    assert code == 402 and "cohort fund" in body["error"]["message"]


async def test_the_provisioner_funds_a_cohort_lease_and_refuses_a_tampered_funding(
    cohort: Cohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = KernelLease(cohort.server.url, cohort.student, hook=None, timeout=WAIT)
    try:
        grant = await lease.request(LeaseTerms(gpu="RTX 4090", cohort=cohort.id))
        assert grant.escrow is not None and grant.escrow.funding == "cohort"
        assert await lease.fund() is None  # no hook, no wallet: the pool paid
        assert lease.grant is not None and lease.grant.token is not None
        assert lease.cohort_funding is not None
        address, deposit = lease.cohort_funding
        assert address == str(cohort.session(grant.lease).escrow.escrow) and deposit > 0
        assert await cohort.pool.balance(cohort.student.pubkey()) == 0
    finally:
        await lease.end()
        await lease.close()

    # A coordinator that hands out anything but the exact funding (here the deposit sent to
    # another account) gets no signature from the student's key.
    lease = KernelLease(cohort.server.url, cohort.student, hook=None, timeout=WAIT)
    try:
        await lease.request(LeaseTerms(gpu="RTX 4090", cohort=cohort.id))
        genuine = CoordinatorClient.cohort_funding_offer
        signed: list[object] = []

        async def hostile(self: CoordinatorClient, lease_id: str) -> CohortFundingOffer:
            offer = await genuine(self, lease_id)
            raw = bytearray(offer.raw)
            at = raw.index(bytes(cohort.session(lease_id).escrow.escrow))
            raw[at : at + 32] = bytes(Keypair().pubkey())
            return CohortFundingOffer(
                lease_id, MessageV0.from_bytes(bytes(raw)), bytes(raw), offer.deposit
            )

        async def submit(*args: object) -> None:
            signed.append(args)

        monkeypatch.setattr(CoordinatorClient, "cohort_funding_offer", hostile)
        monkeypatch.setattr(CoordinatorClient, "submit_cohort_funding", submit)
        with pytest.raises(LeaseNotFunded, match="nothing was signed"):
            await lease.fund()
        assert signed == []
    finally:
        await lease.end()
        await lease.close()


async def test_a_lost_provider_s_cohort_lease_is_refunded_to_the_allowance_by_the_provisioner(
    cohort: Cohort,
) -> None:
    books = CohortBooks(lambda: cohort.pool.client)
    lease = KernelLease(cohort.server.url, cohort.student, hook=None, timeout=WAIT)
    try:
        grant = await lease.request(LeaseTerms(gpu="RTX 4090", cohort=cohort.id))
        session = cohort.session(grant.lease)
        before = await books.snapshot([session])
        await lease.fund()
        funding = await _funding_signatures(cohort, grant.lease)
        await cohort.provider.close(1001)  # the provider is lost: the coordinator fails it
        said = await lease.wind_up_lost(timeout=WAIT)
        assert "refunded lease" in said, said
        after = await books.snapshot([session])
        assert after.escrows == 0 and after.student == 0
        store = cohort.server.store
        assert store is not None
        row = await store.get_settlement(grant.lease)
        assert row is not None and row.state is SettlementState.DONE and row.signature
        await books.assert_conserved(
            [session], before, after, paid_to_provider=0, signatures=[*funding, row.signature]
        )
        # Never active: all of the deposit came back to the allowance; the pool paid only the
        # funding's fee and the escrow multisig's rent, the refund's fee came out of the escrow.
        state = await cohort.pool.allowance_state(cohort.terms())
        assert state is not None
        assert state.amount == CAP - 10_000 - 3_361_680 - 10_000
    finally:
        await lease.close()


async def test_a_lease_of_another_cohort_never_draws_on_this_cohort_s_allowance(
    cohort: Cohort,
) -> None:
    # The student is in a second class with no allowance funded: a lease there is refused,
    # and the first class's allowance (same instructor, student and arbiter) is untouched.
    store = cohort.server.store
    assert store is not None
    settings = CohortSettings(
        name="GPU 102", gpu_types=("RTX 4090",), max_price_lamports_per_hour=PRICE,
        term_ends_at=time.time() + 86400, max_session_seconds=600,
    )  # fmt: skip
    other = await store.create_cohort(
        instructor=str(cohort.instructor.pubkey()), settings=settings, cohort_id=new_cohort_id()
    )
    await store.add_members(other.id, [str(cohort.student.pubkey())])
    before = await cohort.pool.allowance_state(cohort.terms())
    lease = await cohort.lease(cohort=other.id)
    code, body = await cohort.api("POST", f"/api/v1/leases/{lease}/cohort-funding", {})
    assert code == 402 and f"no allowance in cohort {other.id}" in body["error"]["message"]
    assert await cohort.pool.allowance_state(cohort.terms()) == before
