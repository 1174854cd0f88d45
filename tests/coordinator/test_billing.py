"""Escrow payments at the coordinator's REST API (``docs/payments-contract.md`` sections 1-3).

A real coordinator in escrow mode serves its embedded ledger (LiteSVM) at ``/solana``; the
user opens escrows there with :class:`~jupyter_io.payments.escrow.EscrowClient` exactly as
against a cluster; the provider is a :class:`FakeProvider` on a real link (settlement with a
real provider host is ``tests/provider_host/test_settlement.py``). Also: the ``settlements``
store methods on SQLite and PostgreSQL, and the budget meter.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from traitlets import TraitError

from jupyter_io.coordinator.billing import meter
from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.models import LeaseState, SettlementKind, SettlementState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import LeaseRecord, OfferSpec, ProviderProfile, Store
from jupyter_io.errors import ProtocolError
from jupyter_io.leases import verify_token
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, min_deposit
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms
from jupyter_io.provider_link import (
    SettlementRefused,
    SettlementSignature,
    SignSettlement,
    parse_message,
)
from jupyter_io.signing import sign_request

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(90)

PRICE = 3_600_000  # lamports per hour: 1,000 lamports a second


class Api:
    """Signed REST calls that return ``(status, body)`` (the status is what these tests are
    about; ``jupyter_io.coordinator_client`` is the typed user side)."""

    def __init__(self, url: str, keypair: Keypair) -> None:
        self.url = url
        self.keypair = keypair
        self.http = AsyncHTTPClient(force_instance=True)

    async def __call__(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        if data is None and method == "POST":
            data = b""
        headers = sign_request(self.keypair, method, path, data or b"")
        request = HTTPRequest(
            self.url + path, method, headers=headers, body=data, request_timeout=WAIT,
            allow_nonstandard_methods=True,
        )  # fmt: skip
        response = await self.http.fetch(request, raise_error=False)
        return response.code, json.loads(response.body)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
async def market(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> AsyncIterator[tuple[CoordinatorServer, FakeProvider, Api, EscrowClient]]:
    """An escrow coordinator, a linked provider at :data:`PRICE`, a user with 2 SOL."""
    server = await start_coordinator(payments="escrow", settle_retry_interval=0.2)
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE)])
    providers.append(provider)
    await provider.connect()
    user = Keypair()
    escrow = EscrowClient.connect(server.solana_url)
    await escrow.airdrop(user.pubkey(), 2 * LAMPORTS_PER_SOL)
    api = Api(server.url, user)
    try:
        yield server, provider, api, escrow
    finally:
        api.close()
        await escrow.close()


async def test_info_names_the_ledger_and_the_arbiter(
    market: tuple[CoordinatorServer, FakeProvider, Api, EscrowClient],
) -> None:
    server, _, api, _ = market
    code, info = await api("GET", "/api/v1/info")
    assert code == 200 and info["payments"] == "escrow"
    assert info["solana_url"] == f"{server.url}/solana" and info["arbiter"] == info["coordinator"]


async def test_no_token_before_the_escrow_is_verified_on_chain(
    market: tuple[CoordinatorServer, FakeProvider, Api, EscrowClient],
) -> None:
    server, provider, api, escrow = market
    code, grant = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
    assert code == 201 and grant["token"] is None and grant["state"] == "requested"
    lease = grant["lease"]
    needed = min_deposit(PRICE, 60)
    assert grant["escrow"] == {
        "required": True,
        "arbiter": str(server.keypair.pubkey()),  # type: ignore[union-attr]
        "solana_url": server.solana_url,
        "min_deposit_lamports": needed,
    }
    # No escrow yet: 402, and no token by renewal either.
    code, body = await api("POST", f"/api/v1/leases/{lease}/escrow", {"signature": None})
    assert code == 402 and body["error"]["code"] == "escrow_missing"
    assert "open it" in body["error"]["message"]
    code, body = await api("POST", f"/api/v1/leases/{lease}/token")
    assert code == 402 and body["error"]["code"] == "escrow_missing"

    arbiter = Pubkey.from_string(grant["escrow"]["arbiter"])
    provider_key = Pubkey.from_string(provider.pubkey)
    small = await escrow.open_escrow(api.keypair, provider_key, arbiter, lease, needed - 1)
    code, body = await api(
        "POST", f"/api/v1/leases/{lease}/escrow", {"signature": str(small.signature)}
    )
    assert code == 402 and body["error"]["code"] == "deposit_too_small"
    assert "holds" in body["error"]["message"] and "needs at least" in body["error"]["message"]

    # Another user's escrow for this lease id is not this lease's escrow.
    other = Keypair()
    await escrow.airdrop(other.pubkey(), LAMPORTS_PER_SOL)
    await escrow.open_escrow(other, provider_key, arbiter, f"{lease}-x", needed)
    code, body = await api("POST", f"/api/v1/leases/{lease}/escrow", {"signature": None})
    assert code == 402 and body["error"]["code"] == "deposit_too_small"


async def test_a_funded_lease_gets_its_token_billing_and_a_top_up_raises_the_deposit(
    market: tuple[CoordinatorServer, FakeProvider, Api, EscrowClient],
) -> None:
    _, provider, api, escrow = market
    code, grant = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
    lease = grant["lease"]
    arbiter = Pubkey.from_string(grant["escrow"]["arbiter"])
    deposit = PRICE // 60  # one minute
    receipt = await escrow.open_escrow(
        api.keypair, Pubkey.from_string(provider.pubkey), arbiter, lease, deposit
    )
    code, funded = await api(
        "POST", f"/api/v1/leases/{lease}/escrow", {"signature": str(receipt.signature)}
    )
    assert code == 200, funded
    claims = verify_token(
        funded["token"],
        coordinator=arbiter,
        user=api.keypair.pubkey(),
        provider=Pubkey.from_string(provider.pubkey),
        now=funded["expires_at"] - 1,
    )
    assert claims.lease_id == lease
    assert funded["escrow"]["address"] == str(receipt.terms.escrow)
    billing = funded["billing"]
    assert billing["deposit_lamports"] == deposit and billing["spent_lamports"] == 0
    assert billing["escrow_signature"] == str(receipt.signature)
    assert billing["settlement"] is None and billing["warning"] is None

    # Renewal works now; the lease's record and the list carry the billing view.
    code, renewed = await api("POST", f"/api/v1/leases/{lease}/token")
    assert code == 200 and renewed["token"] and renewed["billing"]["deposit_lamports"] == deposit
    code, record = await api("GET", f"/api/v1/leases/{lease}")
    assert code == 200 and record["billing"]["escrow"] == str(receipt.terms.escrow)
    code, listed = await api("GET", "/api/v1/leases?limit=5")
    assert code == 200 and [row["lease"] for row in listed["leases"]] == [lease]
    assert listed["leases"][0]["billing"]["deposit_lamports"] == deposit

    # A top-up, then the same call again: the coordinator re-reads what the escrow holds.
    topped = await escrow.top_up(receipt.terms, deposit, api.keypair)
    code, again = await api("POST", f"/api/v1/leases/{lease}/escrow", {"signature": None})
    assert code == 200 and again["billing"]["deposit_lamports"] == 2 * deposit
    assert again["billing"]["escrow_signature"] == str(receipt.signature)  # the setup's, kept
    assert topped.state.amount == 2 * deposit
    # Over: the lease can no longer be funded.
    code, _ = await api("DELETE", f"/api/v1/leases/{lease}")
    code, body = await api("POST", f"/api/v1/leases/{lease}/escrow", {"signature": None})
    assert code == 409 and body["error"]["code"] == "not_live"


async def test_an_unfunded_lease_that_expires_leaves_nothing_to_settle(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator(payments="escrow", token_ttl=0.5)
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE)])
    providers.append(provider)
    await provider.connect()
    api = Api(server.url, Keypair())
    try:
        code, grant = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
        assert code == 201
        end = await provider.next_message("end")
        assert end["lease"] == grant["lease"] and "expired" in end["reason"]
        code, record = await api("GET", f"/api/v1/leases/{grant['lease']}")
        assert record["state"] == "ended" and record["billing"]["settlement"] is None
        store = server.store
        assert store is not None
        assert await store.enqueue_settlements() == []
    finally:
        api.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_ledger_is_a_503_and_leaves_no_lease(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    server = await start_coordinator(payments="escrow", solana_url=url, solana_timeout=2.0)
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE)])
    providers.append(provider)
    await provider.connect()
    api = Api(server.url, Keypair())
    try:
        code, body = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
        assert code == 503 and body["error"]["code"] == "ledger_unreachable"
        assert url in body["error"]["message"] and "try again" in body["error"]["message"]
        code, listed = await api("GET", "/api/v1/leases")
        assert code == 200 and listed["leases"] == []
        code, offers = await api("GET", "/api/v1/offers")
        assert offers["providers"][0]["free"] == 1  # no GPU held by a dangling lease
    finally:
        api.close()


async def test_the_embedded_ledger_keeps_balances_across_a_restart(
    start_coordinator: Starter, tmp_path: Any
) -> None:
    data_dir = str(tmp_path / "persist")
    who = Keypair().pubkey()
    first = await start_coordinator(payments="escrow", data_dir=data_dir)
    async with EscrowClient.connect(first.solana_url) as escrow:
        await escrow.airdrop(who, LAMPORTS_PER_SOL + 12_345)
    await first.shutdown()
    # Kept in the coordinator's own database, next to its leases.
    with sqlite3.connect(tmp_path / "persist" / "coordinator.db") as db:
        (count,) = db.execute(
            "SELECT count(*) FROM ledger_accounts WHERE pubkey = ?", (str(who),)
        ).fetchone()
    assert count == 1
    second = await start_coordinator(payments="escrow", data_dir=data_dir)
    async with EscrowClient.connect(second.solana_url) as escrow:
        assert await escrow.balance(who) == LAMPORTS_PER_SOL + 12_345


# ---- the meter ------------------------------------------------------------------------------


def _lease(**changes: Any) -> LeaseRecord:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    values: dict[str, Any] = {
        "id": "l1",
        "user_pubkey": str(Keypair().pubkey()),
        "provider_pubkey": str(Keypair().pubkey()),
        "gpu_model": "x",
        "gpu_indices": (0,),
        "price_lamports_per_hour": PRICE,
        "state": LeaseState.ACTIVE,
        "requested_at": t0,
        "active_at": t0,
        "ended_at": None,
        "end_of_service": None,
        "failure_reason": None,
        "token_expires_at": None,
        "relay": False,
        "escrow_address": "E",
        "deposit_lamports": 100_000,  # 100 s at 1,000 lamports/s
    }
    values.update(changes)
    return LeaseRecord(**values)


def test_billed_seconds_are_the_least_of_reported_observed_and_covered() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    live = meter(_lease(), reported_seconds=10, now=t0 + 50.9)
    assert live.billed_seconds == 50 and live.spent_lamports == 50_000  # observation
    assert live.warning is None and live.used_fraction == 0.5
    assert meter(_lease(), 0, now=t0 + 80).warning == 80
    assert meter(_lease(), 0, now=t0 + 96).warning == 95
    full = meter(_lease(), 0, now=t0 + 500)
    assert full.billed_seconds == 100 and full.spent_lamports == 100_000 and full.warning == 100
    ended = _lease(
        state=LeaseState.ENDED, end_of_service=datetime.fromtimestamp(t0 + 70, timezone.utc)
    )
    assert meter(ended, reported_seconds=65, now=t0 + 999).billed_seconds == 65  # reports
    assert meter(ended, reported_seconds=90, now=t0 + 999).billed_seconds == 70  # observed
    small = _lease(
        deposit_lamports=30_500, state=LeaseState.ENDED, end_of_service=ended.end_of_service
    )
    assert meter(small, reported_seconds=90, now=t0).billed_seconds == 30  # covered
    odd = _lease(price_lamports_per_hour=1_000, state=LeaseState.ENDED,
                 end_of_service=ended.end_of_service)  # fmt: skip
    assert meter(odd, 7, now=t0).spent_lamports == 1  # 1.94 lamports: the fraction is free
    assert min_deposit(1_000, 60) == 17  # 16.7 rounded up


# ---- the settlements table, on both backends ------------------------------------------------


async def test_settlements_are_queued_once_claimed_by_one_and_finished_once(
    store_url: str,
) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    provider = str(Keypair().pubkey())
    user = str(Keypair().pubkey())
    store = await Store.open(store_url)
    other = await Store.open(store_url, migrate=False)  # a second coordinator
    try:
        await store.upsert_provider(ProviderProfile(provider), at=t0)
        await store.replace_offers(provider, [OfferSpec("RTX 4090", 1, 2, PRICE)], at=t0)
        funded = await store.create_lease(
            user_pubkey=user, provider_pubkey=provider, gpu_model="RTX 4090", at=t0
        )
        failed = await store.create_lease(
            user_pubkey=user, provider_pubkey=provider, gpu_model="RTX 4090", at=t0
        )
        recorded = await store.record_escrow(
            funded.id, address="Esc", deposit_lamports=5, signature="sig", at=t0
        )
        assert recorded is not None and recorded.funded and recorded.deposit_lamports == 5
        again = await store.record_escrow(
            funded.id, address="Esc", deposit_lamports=9, signature=None, at=t0 + timedelta(1)
        )
        assert again is not None and again.deposit_lamports == 9
        assert again.escrow_signature == "sig" and again.funded_at == t0  # kept
        await store.record_escrow(failed.id, address="Esc2", deposit_lamports=5, signature=None)
        assert await store.enqueue_settlements(at=t0) == []  # live leases wait
        assert await store.end_lease(funded.id, "ended by the user", at=t0)
        assert await store.fail_lease(failed.id, "lost", at=t0)
        assert (
            await store.record_escrow(funded.id, address="x", deposit_lamports=1, signature=None)
            is None
        )

        queued = await asyncio.gather(
            store.enqueue_settlements(at=t0), other.enqueue_settlements(at=t0)
        )
        assert sorted(queued[0] + queued[1]) == sorted([funded.id, failed.id])  # once each
        rows = await store.settlements_of([funded.id, failed.id])
        assert rows[funded.id].kind is SettlementKind.SETTLE
        assert rows[failed.id].kind is SettlementKind.REFUND
        assert rows[funded.id].state is SettlementState.PENDING

        until = t0 + timedelta(minutes=1)
        claims = await asyncio.gather(
            store.claim_settlement(funded.id, "a", until=until, at=t0),
            other.claim_settlement(funded.id, "b", until=until, at=t0),
        )
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1 and winners[0].attempts == 1
        loser = "b" if winners[0].claimed_by == "a" else "a"
        assert [r.lease_id for r in await store.due_settlements(loser, at=t0)] == [failed.id]
        # A claim that expired (its coordinator died) can be taken over.
        late = await store.claim_settlement(funded.id, loser, until=until, at=until + timedelta(1))
        assert late is not None and late.attempts == 2

        assert await store.retry_settlement(
            failed.id, "nobody", error="away", next_attempt_at=t0 + timedelta(hours=1),
            amount_lamports=3, at=t0,
        )  # fmt: skip
        later = await store.due_settlements("a", at=t0 + timedelta(minutes=59))
        assert failed.id not in [r.lease_id for r in later]  # not before its next attempt
        done = await asyncio.gather(
            store.finish_settlement(funded.id, signature="s1", amount_lamports=4, fee_lamports=9),
            other.finish_settlement(funded.id, signature="s2", amount_lamports=4, fee_lamports=9),
        )
        assert sorted(done) == [False, True]
        row = await store.get_settlement(funded.id)
        assert row is not None and row.state is SettlementState.DONE and row.claimed_by is None
        assert row.to_json()["amount_lamports"] == 4 and row.signature in ("s1", "s2")
        assert await store.release_settlements(loser) == 0
    finally:
        await other.close()
        await store.close()


# ---- the settlement messages of the provider link ------------------------------------------


def test_settlement_messages_round_trip_and_malformed_ones_are_refused() -> None:
    request = SignSettlement("lease-1", 42, b"\x01\x02message")
    assert parse_message(request.to_json()) == request
    for reply in (
        SettlementSignature("lease-1", "sig"),
        SettlementRefused("lease-1", "short"),
        SettlementRefused("lease-1", "who?", "unknown_lease"),
    ):
        assert parse_message(reply.to_json()) == reply
    bad = [
        {"type": "sign_settlement", "lease": "l", "amount": -1, "message": "AQI="},
        {"type": "sign_settlement", "lease": "l", "amount": 1, "message": "not base64!"},
        {"type": "sign_settlement", "lease": "l", "amount": 1, "message": ""},
        {"type": "sign_settlement", "lease": "l", "amount": 1.5, "message": "AQI="},
        {"type": "sign_settlement", "lease": "", "amount": 1, "message": "AQI="},
        {"type": "settlement_signature", "lease": "l", "signature": 7},
        {"type": "settlement_refused", "lease": "l"},
        {"type": "settlement_refused", "lease": "l", "reason": "r", "code": "whatever"},
    ]
    for body in bad:
        with pytest.raises(ProtocolError):
            parse_message(json.dumps(body))


async def test_refunds_are_for_leases_the_provider_cannot_settle(
    market: tuple[CoordinatorServer, FakeProvider, Api, EscrowClient],
) -> None:
    server, provider, api, escrow = market
    provider_key = Pubkey.from_string(provider.pubkey)
    arbiter = server.keypair.pubkey()  # type: ignore[union-attr]

    async def funded_lease() -> str:
        code, grant = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
        assert code == 201
        await escrow.open_escrow(api.keypair, provider_key, arbiter, grant["lease"], PRICE // 60)
        code, _ = await api("POST", f"/api/v1/leases/{grant['lease']}/escrow", {})
        assert code == 200
        return str(grant["lease"])

    served = await funded_lease()
    code, body = await api("POST", f"/api/v1/leases/{served}/refund", {})
    assert code == 409 and "end it first" in body["error"]["message"]  # live
    await provider.session(served, "active")
    await provider.usage(served, 1, 3)
    await provider.heartbeat()  # handled in order: the session event is in
    await api("DELETE", f"/api/v1/leases/{served}")
    code, body = await api("POST", f"/api/v1/leases/{served}/refund", {})
    assert code == 409 and "settles it with the provider" in body["error"]["message"]
    request = await provider.next_message("sign_settlement")  # what the worker does instead
    assert request["lease"] == served and request["amount"] == 0  # observed < 1 s
    # A provider that lost its record of the lease (a restart) can never co-sign: the
    # settlement turns into a refund the user can make.
    await provider.send(
        {"type": "settlement_refused", "lease": served, "reason": "unknown here",
         "code": "unknown_lease"}
    )  # fmt: skip
    store = server.store
    assert store is not None
    deadline = asyncio.get_running_loop().time() + WAIT
    while (row := await store.get_settlement(served)) is None or row.kind.value != "refund":
        assert asyncio.get_running_loop().time() < deadline, row  # state in the database
        await asyncio.sleep(0.05)
    assert "refund it" in (row.error or "")
    code, offer = await api("POST", f"/api/v1/leases/{served}/refund", {})
    assert code == 200 and offer["provider_share"] == 0

    # Never served: refunded at once by user + arbiter, nothing to the provider.
    unused = await funded_lease()
    await api("DELETE", f"/api/v1/leases/{unused}")
    code, offer = await api("POST", f"/api/v1/leases/{unused}/refund", {})
    assert code == 200 and offer["provider_share"] == 0
    message = MessageV0.from_bytes(base64.b64decode(offer["message"]))
    arbiter_sig = Presigner(arbiter, Signature.from_string(offer["arbiter_signature"]))
    before = await escrow.balance(api.keypair.pubkey())
    terms = EscrowTerms(api.keypair.pubkey(), provider_key, arbiter, unused)
    held = await escrow.escrow_state(terms)
    assert held is not None
    signature = await escrow.submit(message, [api.keypair, arbiter_sig], what="refund")
    after = await escrow.balance(api.keypair.pubkey())
    assert after - before == held.lamports - 10_000  # deposit + rent back, less 2 signatures
    code, record = await api(
        "POST", f"/api/v1/leases/{unused}/refund", {"signature": str(signature)}
    )
    assert code == 200 and record["billing"]["settlement"]["state"] == "done"
    assert record["billing"]["settlement"]["signature"] == str(signature)
    code, body = await api("POST", f"/api/v1/leases/{unused}/refund", {})
    assert code == 409 and "already" in body["error"]["message"]


async def test_an_escrow_the_coordinator_never_verified_can_still_be_refunded(
    market: tuple[CoordinatorServer, FakeProvider, Api, EscrowClient],
) -> None:
    # The user opened the escrow, then never reached POST /escrow (the coordinator or its
    # ledger was down) and ended the lease: the escrow is found on-chain and refunded.
    server, provider, api, escrow = market
    provider_key = Pubkey.from_string(provider.pubkey)
    arbiter = server.keypair.pubkey()  # type: ignore[union-attr]
    code, grant = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090"})
    lease = grant["lease"]
    code, body = await api("DELETE", f"/api/v1/leases/{lease}")
    assert code == 200
    code, body = await api("POST", f"/api/v1/leases/{lease}/refund", {})
    assert code == 409 and "never funded" in body["error"]["message"]  # nothing there yet

    wallet_before = await escrow.balance(api.keypair.pubkey())
    receipt = await escrow.open_escrow(api.keypair, provider_key, arbiter, lease, PRICE // 60)
    code, offer = await api("POST", f"/api/v1/leases/{lease}/refund", {})
    assert code == 200 and offer["provider_share"] == 0
    code, record = await api("GET", f"/api/v1/leases/{lease}")
    assert record["billing"]["escrow"] == str(receipt.terms.escrow)
    assert record["billing"]["settlement"]["state"] == "pending"

    # A signature that never landed is not recorded as the refund.
    code, body = await api(
        "POST", f"/api/v1/leases/{lease}/refund", {"signature": str(Signature.new_unique())}
    )
    assert code == 409 and "unknown to the ledger" in body["error"]["message"]

    message = MessageV0.from_bytes(base64.b64decode(offer["message"]))
    arbiter_sig = Presigner(arbiter, Signature.from_string(offer["arbiter_signature"]))
    signature = await escrow.submit(message, [api.keypair, arbiter_sig], what="refund")
    code, record = await api(
        "POST", f"/api/v1/leases/{lease}/refund", {"signature": str(signature)}
    )
    assert code == 200 and record["billing"]["settlement"]["signature"] == str(signature)
    # Conservation: all back but the fees (setup 1 signature, refund 2) and the multisig's
    # rent, which stays with the reused multisig of this triple.
    assert await escrow.escrow_state(receipt.terms) is None
    spent = wallet_before - await escrow.balance(api.keypair.pubkey())
    multisig = await escrow.client.get_balance(receipt.terms.multisig)
    assert spent == receipt.fee + 10_000 + multisig.value


def test_a_bad_solana_url_names_the_setting() -> None:
    with pytest.raises(TraitError, match="solana_url 'ftp://x' must be a Solana JSON-RPC URL"):
        CoordinatorConfig(solana_url="ftp://x")
    assert CoordinatorConfig().payments == "escrow"  # the default: never free by accident


async def test_a_lease_of_two_gpus_costs_two_gpus_an_hour(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    """Offers are quoted per GPU-hour; a lease of N GPUs costs N times that: its deposit, its
    billing and the price its token gives the provider (who co-signs by it) all say so."""
    server = await start_coordinator(payments="escrow")
    provider = FakeProvider(server.url, [gpu_offer(price=PRICE, count=2)])
    providers.append(provider)
    await provider.connect()
    user = Keypair()
    escrow = EscrowClient.connect(server.solana_url)
    api = Api(server.url, user)
    try:
        await escrow.airdrop(user.pubkey(), LAMPORTS_PER_SOL)
        code, grant = await api("POST", "/api/v1/leases", {"gpu": "RTX 4090", "gpus": 2})
        assert code == 201 and grant["gpu_indices"] == [0, 1]
        assert grant["price_lamports_per_hour"] == 2 * PRICE
        assert grant["escrow"]["min_deposit_lamports"] == min_deposit(2 * PRICE, 60)
        lease = grant["lease"]
        arbiter = Pubkey.from_string(grant["escrow"]["arbiter"])
        receipt = await escrow.open_escrow(
            user, Pubkey.from_string(provider.pubkey), arbiter, lease, min_deposit(2 * PRICE, 60)
        )
        code, funded = await api(
            "POST", f"/api/v1/leases/{lease}/escrow", {"signature": str(receipt.signature)}
        )
        assert code == 200, funded
        claims = verify_token(
            funded["token"],
            coordinator=arbiter,
            user=user.pubkey(),
            provider=Pubkey.from_string(provider.pubkey),
            now=funded["expires_at"] - 1,
        )
        assert claims.price_lamports_per_hour == 2 * PRICE
        # Ten seconds of this lease are twenty GPU-seconds at PRICE per GPU-hour.
        record = await server.store.get_lease(lease)  # type: ignore[union-attr]
        assert record is not None and record.funded
        started = record.requested_at
        active = dataclasses.replace(record, state=LeaseState.ACTIVE, active_at=started)
        assert meter(active, 0, now=started.timestamp() + 10).spent_lamports == 20 * 1_000
    finally:
        api.close()
        await escrow.close()
