"""The payment parts of the coordinator's REST client, as the JSON of the payments contract
reads: grants without a token, escrow and billing blocks, budget exhaustion, refund offers.
(The requests themselves are exercised against a real coordinator in
``tests/kernel_provisioner/test_payments.py``.)"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import to_bytes_versioned
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from jupyter_io.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorPaymentError,
    LeaseGrant,
    LeaseInfo,
    PaymentsInfo,
    RefundOffer,
)
from jupyter_io.errors import ConfigError, LeaseError
from jupyter_io.payments.escrow import EscrowTerms, refund_message

PRICE = 120_000_000


def grant_json(**changes: Any) -> dict[str, Any]:
    body = {
        "lease": "l1", "token": None, "provider": str(Keypair().pubkey()),
        "tunnel_url": "ws://h/relay/l1", "relay": True, "gpu": "RTX 4090", "gpu_indices": [0],
        "price_lamports_per_hour": PRICE, "expires_at": None, "state": "requested",
        "escrow": {"required": True, "arbiter": str(Keypair().pubkey()),
                   "solana_url": "http://c/solana", "min_deposit_lamports": 33_334},
    }  # fmt: skip
    body.update(changes)
    return body


def lease_json(**changes: Any) -> dict[str, Any]:
    body = {
        "lease": "l1", "user": "u", "provider": "p", "gpu": "RTX 4090", "gpu_indices": [0],
        "price_lamports_per_hour": PRICE, "state": "ended", "relay": False,
        "tunnel_url": None, "requested_at": 1000.0, "active_at": 1001.0, "ended_at": 1031.0,
        "end_of_service": None, "failure_reason": None, "expires_at": None,
        "billing": {"deposit_lamports": PRICE, "billed_seconds": 30, "spent_lamports": 1_000_000,
                    "left_lamports": PRICE - 1_000_000, "used_fraction": 0.008333,
                    "warning": None, "escrow": "E", "escrow_signature": "S",
                    "settlement": {"kind": "settle", "state": "done",
                                   "amount_lamports": 1_000_000, "fee_lamports": 5_000,
                                   "signature": "X", "attempts": 1, "error": None}},
    }  # fmt: skip
    body.update(changes)
    return body


def test_an_escrow_grant_waits_for_its_escrow() -> None:
    body = grant_json()
    grant = LeaseGrant.from_json(body)
    assert grant.token is None and grant.needs_escrow and grant.state == "requested"
    assert grant.escrow is not None and grant.escrow.min_deposit_lamports == 33_334
    assert grant.escrow.to_json() == body["escrow"]
    assert grant.relay_headers() == {}, "no token, no relay header"
    assert grant.expires_at == 0.0

    funded = LeaseGrant.from_json(grant_json(token="t", expires_at=2000.0))
    assert not funded.needs_escrow and funded.relay_headers() != {}
    free = LeaseGrant.from_json(grant_json(token="t", escrow={"required": False}))
    assert not free.needs_escrow and free.escrow is not None and not free.escrow.required
    old = LeaseGrant.from_json({k: v for k, v in grant_json(token="t").items() if k != "escrow"})
    assert old.escrow is None and old.billing is None and not old.needs_escrow


def test_billing_and_settlement_read_exact_lamports() -> None:
    info = LeaseInfo.from_json(lease_json())
    billing = info.billing
    assert billing is not None and billing.settlement is not None
    assert (billing.deposit_lamports, billing.spent_lamports) == (PRICE, 1_000_000)
    assert billing.settlement.to_json() == lease_json()["billing"]["settlement"]
    assert not info.live and not billing.exhausted


@pytest.mark.parametrize(
    ("changes", "exhausted"),
    [
        ({}, False),  # ended by the user after 30 s of a 1 h deposit
        ({"failure_reason": "budget exhausted"}, True),
        ({"end_reason": "budget exhausted"}, True),
        ({"ended_at": 1001.0 + 3600}, True),  # ran the whole time the deposit covers
        ({"ended_at": 1001.0 + 3599}, False),
        ({"state": "active", "ended_at": None, "end_reason": "budget exhausted"}, False),
        ({"billing": None}, False),  # a free lease has no budget
    ],
)
def test_budget_exhausted_reads_the_coordinators_record(
    changes: dict[str, Any], exhausted: bool
) -> None:
    assert LeaseInfo.from_json(lease_json(**changes)).budget_exhausted is exhausted
    if "billing" not in changes:
        body = lease_json(**changes)
        body["billing"] = {**body["billing"], "warning": 100}
        assert LeaseInfo.from_json(body).budget_exhausted is (body["state"] != "active")


def test_a_refund_offer_is_a_message_and_the_arbiters_signature() -> None:
    user, provider, arbiter = Keypair(), Keypair(), Keypair()
    terms = EscrowTerms(user.pubkey(), provider.pubkey(), arbiter.pubkey(), "l1")
    message = refund_message(terms, 5, blockhash=Hash.default(), provider_has_wsol_account=True)
    signature = arbiter.sign_message(to_bytes_versioned(message))
    offer = RefundOffer.from_json(
        "l1",
        {"message": base64.b64encode(bytes(message)).decode(),
         "arbiter_signature": str(signature), "provider_share": 5},
    )  # fmt: skip
    assert offer.message == message and offer.arbiter_signature == signature
    assert offer.provider_share == 5
    for broken in (
        {"message": "not base64!", "arbiter_signature": str(signature), "provider_share": 5},
        {"message": base64.b64encode(b"junk").decode(), "arbiter_signature": "x"},
        {},
    ):
        with pytest.raises(CoordinatorPaymentError, match=r"malformed.*nothing was signed"):
            RefundOffer.from_json("l1", broken)


def test_payments_info_of_an_older_coordinator_is_free() -> None:
    assert PaymentsInfo.from_json({"coordinator": "k"}) == PaymentsInfo("free", None, None)
    escrow = PaymentsInfo.from_json({"payments": "escrow", "solana_url": "u", "arbiter": "a"})
    assert escrow == PaymentsInfo("escrow", "u", "a")


async def test_list_leases_checks_its_limit_before_asking() -> None:
    client = CoordinatorClient("http://127.0.0.1:9", Keypair())
    try:
        for limit in (0, 101):
            with pytest.raises(ConfigError, match="at most 100"):
                await client.list_leases(limit)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        # No coordinator's error body: a stranger, whatever its status says.
        (409, b"[" * 100_000, CoordinatorError),
        (500, b"[" * 100_000, CoordinatorError),
        (409, b'{"error": {"message": ["not", "text"]}}', LeaseError),
    ],
)
async def test_a_hostile_answer_is_a_coordinator_error_not_a_crash(
    status: int, body: bytes, error: type[Exception]
) -> None:
    # Not a coordinator at all: a loopback server answering nested brackets or odd types.
    class Hostile(web.RequestHandler):
        def get(self) -> None:
            self.set_status(status)
            self.finish(body)

    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(web.Application([(r".*", Hostile)]))
    server.add_sockets(sockets)
    client = CoordinatorClient(f"http://127.0.0.1:{sockets[0].getsockname()[1]}", Keypair())
    try:
        with pytest.raises(error, match="answered"):
            await client.info()
    finally:
        client.close()
        server.stop()
