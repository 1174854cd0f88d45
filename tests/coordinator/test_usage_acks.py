"""The user's usage acknowledgements at the coordinator (``POST /api/v1/leases/{id}/ack``,
:mod:`jupyter_io.usage_acks`): only the lease's user, signed once, monotonic, never ahead of
the lease; each forged or stale acknowledgement is refused and changes nothing. And the
billing rule they feed: the lesser of what the provider reported and what the user
acknowledged plus the grace period."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from solders.keypair import Keypair
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.billing import meter
from jupyter_io.coordinator.models import LeaseState
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator.store import LeaseRecord
from jupyter_io.coordinator_client import CoordinatorClient
from jupyter_io.errors import AuthError, LeaseError
from jupyter_io.signing import sign_request
from jupyter_io.usage_acks import (
    MAX_AHEAD_S,
    AckAhead,
    AckRefused,
    StaleAck,
    UsageAck,
    ack_bound,
    ack_path,
    check_ack,
)

from .conftest import WAIT, FakeProvider, Starter, gpu_offer

pytestmark = pytest.mark.timeout(60)


class SignedPost:
    """A signed ``POST`` kept as sent, so that it can be sent again byte for byte."""

    def __init__(self, url: str, keypair: Keypair, lease: str, body: Any) -> None:
        self.path = ack_path(lease)
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.url = url
        self.headers = sign_request(keypair, "POST", self.path, self.body)

    async def send(self) -> tuple[int, Any]:
        http = AsyncHTTPClient(force_instance=True)
        try:
            response = await http.fetch(
                HTTPRequest(
                    self.url + self.path,
                    "POST",
                    headers=self.headers,
                    body=self.body,
                    request_timeout=WAIT,
                ),
                raise_error=False,
            )
        finally:
            http.close()
        return response.code, json.loads(response.body)


async def _active_lease(server: CoordinatorServer, provider: FakeProvider, user: Keypair) -> str:
    client = CoordinatorClient(server.url, user, timeout=WAIT)
    try:
        grant = await client.request_lease("RTX 4090")
    finally:
        client.close()
    await provider.session(grant.lease, "active")
    await provider.heartbeat()  # handled in order: the session event is in
    return grant.lease


async def test_only_the_leases_user_acknowledges_forward_and_never_ahead_of_the_lease(
    start_coordinator: Starter, providers: list[FakeProvider]
) -> None:
    server = await start_coordinator()
    provider = FakeProvider(server.url, [gpu_offer(count=2)])
    providers.append(provider)
    await provider.connect()
    user, other_user, stranger = Keypair(), Keypair(), Keypair()
    lease = await _active_lease(server, provider, user)
    other_lease = await _active_lease(server, provider, other_user)
    store = server.store
    assert store is not None

    async def acked(lease_id: str = lease) -> int | None:
        record = await store.get_lease(lease_id)
        assert record is not None
        return record.acked_seconds

    assert await acked() == 0, "a new lease starts with nothing acknowledged"
    client = CoordinatorClient(server.url, user, timeout=WAIT)
    try:
        assert await client.acknowledge_usage(UsageAck(lease, 3)) == 3
        first_at = (await store.get_lease(lease)).acked_at
        assert first_at is not None
        current = SignedPost(server.url, user, lease, {"lease": lease, "seconds": 4})
        assert await current.send() == (200, {"lease": lease, "acknowledged_seconds": 4})

        # Each of these is refused and leaves the count at 4.
        code, body = await current.send()  # the same request again, byte for byte
        assert code == 401 and "already used" in body["error"]["message"]
        older = SignedPost(server.url, user, lease, {"lease": lease, "seconds": 2})
        code, body = await older.send()
        assert (code, body["error"]["code"]) == (409, "stale_ack")
        with pytest.raises(LeaseError, match="acknowledged up to 4 s already"):
            await client.acknowledge_usage(UsageAck(lease, 1))
        ahead = 100
        code, body = await SignedPost(
            server.url, user, lease, {"lease": lease, "seconds": ahead}
        ).send()
        assert (code, body["error"]["code"]) == (409, "ack_ahead"), body
        assert "ahead of it" in body["error"]["message"]
        code, body = await SignedPost(
            server.url, stranger, lease, {"lease": lease, "seconds": 5}
        ).send()
        assert (code, body["error"]["code"]) == (403, "forbidden")  # a key not the user's
        code, body = await SignedPost(
            server.url, user, lease, {"lease": other_lease, "seconds": 5}
        ).send()
        assert code == 400 and "names lease" in body["error"]["message"]  # the other lease's
        code, body = await SignedPost(
            server.url, user, other_lease, {"lease": other_lease, "seconds": 5}
        ).send()
        assert code == 403, "nobody acknowledges another user's lease"
        forged = SignedPost(server.url, user, lease, {"lease": lease, "seconds": 5})
        forged.headers = {**forged.headers, "X-JIO-Pubkey": str(stranger.pubkey())}
        assert (await forged.send())[0] == 401, "a signature that is not the key's"
        for malformed in (
            b"not json", {"lease": lease}, {"lease": lease, "seconds": -1},
            {"lease": lease, "seconds": 1.5}, {"lease": lease, "seconds": True},
            {"lease": lease, "seconds": 5, "extra": 1}, [lease, 5],
        ):  # fmt: skip
            code, body = await SignedPost(server.url, user, lease, malformed).send()
            assert code == 400 and body["error"]["code"] == "bad_request", malformed
        unsigned = SignedPost(server.url, user, lease, {"lease": lease, "seconds": 5})
        unsigned.headers = {}
        assert (await unsigned.send())[0] == 401
        assert await acked() == 4 and await acked(other_lease) == 0

        # The same count again is fine (a retry, or within the same second): it changes no
        # count, and says the user is still there.
        heard = (await store.get_lease(lease)).acked_at
        assert heard is not None and heard > first_at
        assert await client.acknowledge_usage(UsageAck(lease, 4)) == 4
        again = await store.get_lease(lease)
        assert again is not None and again.acked_seconds == 4
        assert again.acked_at is not None and again.acked_at > heard

        await client.end_lease(lease)
        code, body = await SignedPost(
            server.url, user, lease, {"lease": lease, "seconds": 5}
        ).send()
        assert (code, body["error"]["code"]) == (409, "not_live")
        assert await acked() == 4
    finally:
        client.close()
    with pytest.raises(AuthError):
        other = CoordinatorClient(server.url, stranger, timeout=WAIT)
        try:
            await other.acknowledge_usage(UsageAck(other_lease, 1))
        finally:
            other.close()


def test_the_contract_refuses_what_goes_back_or_runs_ahead() -> None:
    ack = UsageAck("l1", 10)
    assert UsageAck.parse(ack.encode(), "l1") == ack
    with pytest.raises(AckRefused, match="names lease"):
        UsageAck.parse(ack.encode(), "l2")
    with pytest.raises(AckRefused):
        UsageAck.parse(b"[" * 100_000, "l1")  # nests too deeply: refused, not a crash
    check_ack(ack, recorded=None, observed=10 - MAX_AHEAD_S)
    check_ack(ack, recorded=10, observed=10)  # a retry
    with pytest.raises(StaleAck):
        check_ack(ack, recorded=11, observed=100)
    with pytest.raises(AckAhead):
        check_ack(ack, recorded=0, observed=10 - MAX_AHEAD_S - 1)
    assert ack_bound(None, 40.0) is None  # a lease from before acknowledgements
    assert ack_bound(0, 40.9) == 40 and ack_bound(7, 2.0) == 9


T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _lease(**changes: Any) -> LeaseRecord:
    t0 = T0
    values: dict[str, Any] = {
        "id": "l1",
        "user_pubkey": str(Keypair().pubkey()),
        "provider_pubkey": str(Keypair().pubkey()),
        "gpu_model": "x",
        "gpu_indices": (0,),
        "price_lamports_per_hour": 3_600_000,  # 1,000 lamports a second
        "state": LeaseState.ENDED,
        "requested_at": t0,
        "active_at": t0,
        "ended_at": t0 + timedelta(seconds=300),
        "end_of_service": t0 + timedelta(seconds=300),
        "failure_reason": None,
        "token_expires_at": None,
        "relay": False,
        "escrow_address": "E",
        "deposit_lamports": 1_000_000,  # 1,000 s
        "acked_seconds": 0,
    }
    values.update(changes)
    return LeaseRecord(**values)


def test_billed_seconds_are_the_least_of_reported_and_acknowledged_plus_grace() -> None:
    now = datetime(2026, 1, 2, tzinfo=timezone.utc).timestamp()
    # The user's side went away after 50 s; the provider reports all 300 s.
    gone = meter(_lease(acked_seconds=50), 300, now=now, grace=40.0)
    assert gone.billed_seconds == 90 and gone.spent_lamports == 90_000
    assert gone.acknowledged_seconds == 50 and gone.reported_seconds == 300
    # The acknowledgements kept up: the provider's figure.
    kept_up = meter(_lease(acked_seconds=299), 300, now=now, grace=40.0)
    assert kept_up.billed_seconds == 300
    # Never acknowledged: the grace at most.
    assert meter(_lease(), 300, now=now, grace=40.0).billed_seconds == 40
    # The provider's report stays a bound too, and so does the observation.
    assert meter(_lease(acked_seconds=299), 120, now=now, grace=40.0).billed_seconds == 120
    lost = _lease(state=LeaseState.FAILED, end_of_service=T0 + timedelta(seconds=80))
    assert meter(lost, 300, now=now, grace=40.0).billed_seconds == 40  # 0 acknowledged
    heard_from = _lease(
        state=LeaseState.FAILED, acked_seconds=70, end_of_service=lost.end_of_service
    )
    assert meter(heard_from, 300, now=now, grace=40.0).billed_seconds == 80  # last heartbeat
    # While it runs: observation, but not past the acknowledgements either.
    live = _lease(state=LeaseState.ACTIVE, ended_at=None, end_of_service=None, acked_seconds=10)
    t0 = T0.timestamp()
    assert meter(live, 0, now=t0 + 30.5, grace=40.0).billed_seconds == 30
    assert meter(live, 0, now=t0 + 200, grace=40.0).billed_seconds == 50
    # A lease recorded before acknowledgements existed is billed as it was.
    assert meter(_lease(acked_seconds=None), 300, now=now, grace=40.0).billed_seconds == 300
