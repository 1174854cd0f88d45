"""Holding GPUs is not free (issue 11, "no free capacity"): a real coordinator on loopback,
its embedded ledger, a provider over a real link, users through the REST API.

The attack that worked: a new key with 0 SOL requested a lease for every GPU on offer, never
funded them, and paying users got ``409 no_offer`` for an hour (the token lifetime). Now a
lease must be funded within the claim window, a key holds at most two unfunded leases and
the coordinator a bounded number; the refusal is ``429`` with the reason and ``Retry-After``;
an unfunded lease ends ("not funded in time") and its GPU is offered again at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import OfferSpec, ProviderProfile, Store
from jupyter_io.coordinator_client import (
    NOT_FUNDED_IN_TIME,
    NOT_STARTED_IN_TIME,
    CoordinatorClient,
    TooManyPendingLeases,
)
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL, min_deposit
from jupyter_io.payments.escrow import EscrowClient, EscrowTerms
from jupyter_io.signing import sign_request

from ..escrow_books import Books
from .conftest import GIB, WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)

PRICE = 3_600_000  # lamports per hour
#: A short claim window, so that the tests see leases expire.
WINDOW = 3.0


@dataclass
class Answer:
    code: int
    body: Any
    headers: dict[str, str]


class Api:
    """Signed REST calls of one key: ``(status, body, headers)``."""

    def __init__(self, url: str, keypair: Keypair | None = None) -> None:
        self.url = url
        self.keypair = keypair or Keypair()
        self.http = AsyncHTTPClient(force_instance=True)

    async def __call__(self, method: str, path: str, body: object = None) -> Answer:
        data = b"" if body is None and method == "POST" else None
        if body is not None:
            data = json.dumps(body).encode()
        headers = sign_request(self.keypair, method, path, data or b"")
        request = HTTPRequest(
            self.url + path, method, headers=headers, body=data, request_timeout=WAIT,
            allow_nonstandard_methods=True,
        )  # fmt: skip
        response = await self.http.fetch(request, raise_error=False)
        return Answer(response.code, json.loads(response.body), dict(response.headers))

    async def lease(self) -> Answer:
        return await self("POST", "/api/v1/leases", {"gpu": "RTX 4090"})

    def close(self) -> None:
        self.http.close()


@pytest.fixture
async def apis() -> AsyncIterator[list[Api]]:
    made: list[Api] = []
    try:
        yield made
    finally:
        for api in made:
            api.close()


async def _escrow_market(
    start_coordinator: Starter, providers: list[FakeProvider], gpus: int, **traits: Any
) -> tuple[CoordinatorServer, FakeProvider]:
    server = await start_coordinator(payments="escrow", claim_window=WINDOW, **traits)
    provider = FakeProvider(server.url, [gpu_offer(count=gpus, price=PRICE)])
    providers.append(provider)
    await provider.connect()
    return server, provider


async def _ended(provider: FakeProvider, count: int) -> dict[str, str]:
    """The next ``count`` ``end`` messages the provider gets: lease id -> reason."""
    ends = {}
    for _ in range(count):
        end = await provider.next_message("end", timeout=WINDOW + WAIT)
        ends[end["lease"]] = end["reason"]
    return ends


async def test_a_key_with_no_funds_cannot_hold_the_gpus_and_its_leases_expire(
    start_coordinator: Starter, providers: list[FakeProvider], apis: list[Api]
) -> None:
    server, provider = await _escrow_market(start_coordinator, providers, gpus=4)
    payer, attacker, newcomer, latecomer = (Api(server.url) for _ in range(4))
    apis.extend([payer, attacker, newcomer, latecomer])

    # A paying user leases a GPU, funds it within the window, and the session starts.
    ledger = EscrowClient.connect(server.solana_url)
    try:
        await ledger.airdrop(payer.keypair.pubkey(), LAMPORTS_PER_SOL)
        grant = await payer.lease()
        assert grant.code == 201, grant.body
        lease = grant.body["lease"]
        terms = EscrowTerms(
            payer.keypair.pubkey(),
            Pubkey.from_string(provider.pubkey),
            Pubkey.from_string(grant.body["escrow"]["arbiter"]),
            lease,
        )
        books = Books(lambda: ledger.client)
        before = await books.snapshot(terms)
        receipt = await ledger.open_escrow(
            payer.keypair, terms.provider, terms.arbiter, lease, min_deposit(PRICE, 60)
        )
        funded = await payer(
            "POST", f"/api/v1/leases/{lease}/escrow", {"signature": str(receipt.signature)}
        )
        assert funded.code == 200 and funded.body["token"], funded.body
        await provider.session(lease, "active")

        # The attack: a 0-SOL key asks for every GPU left, at once. Two get through.
        answers = await asyncio.gather(*(attacker.lease() for _ in range(3)))
        assert sorted(a.code for a in answers) == [201, 201, 429], [a.body for a in answers]
        held = [a.body["lease"] for a in answers if a.code == 201]
        (refused,) = (a for a in answers if a.code == 429)
        assert refused.body["error"]["code"] == "unfunded_limit"
        message = refused.body["error"]["message"]
        assert "escrow is not verified" in message and "at most 2 per key" in message
        assert "retry in" in message
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= WINDOW + 1
        assert (await attacker.lease()).code == 429  # and again, one at a time

        # So another user still gets the last GPU; after that every GPU is held (409).
        assert (await newcomer.lease()).code == 201
        assert (await latecomer.lease()).code == 409

        # The window passes: the attacker's leases end, the provider is told to stop them.
        ends = await _ended(provider, 2)
        assert ends == {lease_id: NOT_FUNDED_IN_TIME for lease_id in held}
        for lease_id in held:
            record = await attacker("GET", f"/api/v1/leases/{lease_id}")
            assert record.body["state"] == "ended"
            assert record.body["end_reason"] == NOT_FUNDED_IN_TIME
        # Their GPUs are offered again at once; the paying user's lease runs on.
        assert (await latecomer.lease()).code == 201
        running = await payer("GET", f"/api/v1/leases/{lease}")
        assert running.body["state"] == "active"

        # Funds: the payer's deposit is still in escrow, nothing else moved but the fee.
        after = await books.snapshot(terms)
        await books.assert_conserved(
            terms, before, after, paid_to_provider=0, signatures=[receipt.signature]
        )
        assert after.escrow - before.escrow >= min_deposit(PRICE, 60)
    finally:
        await ledger.close()


async def test_the_coordinator_caps_unfunded_leases_across_keys(
    start_coordinator: Starter, providers: list[FakeProvider], apis: list[Api]
) -> None:
    server, _ = await _escrow_market(start_coordinator, providers, gpus=6, max_unfunded_leases=3)
    keys = [Api(server.url) for _ in range(4)]
    apis.extend(keys)
    first = [await api.lease() for api in keys[:3]]
    assert [a.code for a in first] == [201, 201, 201]
    refused = await keys[3].lease()
    assert refused.code == 429 and refused.body["error"]["code"] == "unfunded_capacity"
    assert "retry in" in refused.body["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW + 1
    assert server.leases is not None and server.leases.pending.unfunded() == 3

    # A slot frees as soon as one of them ends: the fourth key gets its lease then.
    ended = await keys[0]("DELETE", f"/api/v1/leases/{first[0].body['lease']}")
    assert ended.body["state"] == "ended"
    assert (await keys[3].lease()).code == 201


async def test_the_typed_client_raises_the_refusal_with_its_retry_after(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server, _ = await _escrow_market(start_coordinator, providers, gpus=2, max_unfunded_per_key=1)
    client = CoordinatorClient(server.url, Keypair(), timeout=WAIT)
    try:
        await client.request_lease("RTX 4090")
        with pytest.raises(TooManyPendingLeases) as refused:
            await client.request_lease("RTX 4090")
    finally:
        client.close()
    assert refused.value.code == "unfunded_limit"
    assert refused.value.retry_after is not None and 1 <= refused.value.retry_after <= 3
    assert "at most 1 per key" in str(refused.value)


async def test_on_a_free_coordinator_a_lease_must_start_within_the_window(
    start_coordinator: Starter, providers: list[FakeProvider], apis: list[Api]
) -> None:
    server = await start_coordinator(claim_window=WINDOW)  # payments = "free"
    provider = FakeProvider(server.url, [gpu_offer(count=3)])
    providers.append(provider)
    await provider.connect()
    user = Api(server.url)
    apis.append(user)
    # No escrow to wait for, so no cap on unfunded leases: three at once are fine.
    leases = [(await user.lease()).body["lease"] for _ in range(3)]
    started, *idle = leases
    await provider.session(started, "active")
    assert await _ended(provider, 2) == {lease_id: NOT_STARTED_IN_TIME for lease_id in idle}
    record = await user("GET", f"/api/v1/leases/{started}")
    assert record.body["state"] == "active"
    assert (await user.lease()).code == 201  # the idle GPUs are offered again


async def test_the_store_ends_a_waiting_lease_only_while_it_still_waits(store_url: str) -> None:
    # The window's end is one conditional statement: a lease funded or started meanwhile
    # (through this coordinator or another on the same database) is left alone.
    store = await Store.open(store_url)
    try:
        provider = str(Keypair().pubkey())
        await store.upsert_provider(ProviderProfile(provider, "rig", "eu-west"))
        await store.replace_offers(provider, [OfferSpec("RTX 4090", GIB, 3, PRICE)])
        funded, started, idle = [
            await store.create_lease(
                user_pubkey=str(Keypair().pubkey()),
                provider_pubkey=provider,
                gpu_model="RTX 4090",
            )
            for _ in range(3)
        ]
        escrow = str(Keypair().pubkey())
        await store.record_escrow(funded.id, address=escrow, deposit_lamports=1, signature=None)
        await store.activate_lease(started.id)
        reason = NOT_FUNDED_IN_TIME
        assert not await store.end_lease(funded.id, reason, only_requested=True, only_unfunded=True)
        assert not await store.end_lease(started.id, reason, only_requested=True)
        assert await store.end_lease(idle.id, reason, only_requested=True, only_unfunded=True)
        states = {lease.id: lease.state for lease in await store.live_leases()}
        assert states == {funded.id: LeaseState.REQUESTED, started.id: LeaseState.ACTIVE}
        ended = await store.get_lease(idle.id)
        assert ended is not None and ended.end_reason == NOT_FUNDED_IN_TIME
    finally:
        await store.close()
