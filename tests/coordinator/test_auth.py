"""Signed requests, the provider link's hello signature and usage-report signatures: pure
checks byte for byte, then the same refusals over HTTP from a real coordinator."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from solders.keypair import Keypair
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.errors import AuthError
from jupyter_io.signing import (
    API_DOMAIN,
    HEADER_PUBKEY,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    ReplayGuard,
    provider_hello_message,
    request_message,
    sign_provider_hello,
    sign_request,
    sign_usage,
    usage_message,
    verify_provider_hello,
    verify_request,
    verify_usage,
)

NOW = 1_760_000_000.0
BODY = b'{"gpu":"RTX 4090"}'


def test_request_message_is_the_documented_bytes() -> None:
    assert request_message("post", "/api/v1/leases?x=1", "123.5", BODY) == (
        API_DOMAIN
        + b"POST\n/api/v1/leases?x=1\n123.5\n"
        + hashlib.sha256(BODY).hexdigest().encode()
    )
    assert request_message("GET", "/p", "1", b"").endswith(hashlib.sha256(b"").hexdigest().encode())


def test_a_signed_request_verifies_as_its_signer() -> None:
    user = Keypair()
    headers = sign_request(user, "POST", "/api/v1/leases", BODY, now=NOW)
    assert set(headers) == {HEADER_PUBKEY, HEADER_TIMESTAMP, HEADER_SIGNATURE}
    signed = verify_request(headers, "POST", "/api/v1/leases", BODY, now=NOW + 59)
    assert signed.pubkey == user.pubkey() and signed.timestamp == NOW


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "DELETE"}, "not valid"),
        ({"path": "/api/v1/leases/other"}, "not valid"),
        ({"body": b'{"gpu":"A100"}'}, "not valid"),
        ({"now": NOW + 61}, "off the coordinator's clock"),
        ({"now": NOW - 61}, "off the coordinator's clock"),
        ({"headers": {HEADER_SIGNATURE: str(Keypair().sign_message(b"x"))}}, "not valid"),
        ({"headers": {HEADER_PUBKEY: str(Keypair().pubkey())}}, "not valid"),
        ({"headers": {HEADER_TIMESTAMP: "nan"}}, "not Unix seconds"),
        ({"headers": {HEADER_TIMESTAMP: f"{NOW + 1:.6f}"}}, "not valid"),
        ({"headers": {HEADER_PUBKEY: "0OIl"}}, "not valid base58"),
        ({"headers": {HEADER_SIGNATURE: ""}}, "must be signed"),
    ],
)
def test_tampered_stale_or_unsigned_requests_are_refused(
    change: dict[str, object], message: str
) -> None:
    headers = sign_request(Keypair(), "POST", "/api/v1/leases", BODY, now=NOW)
    headers.update(change.get("headers", {}))  # type: ignore[arg-type]
    with pytest.raises(AuthError, match=message):
        verify_request(
            headers,
            str(change.get("method", "POST")),
            str(change.get("path", "/api/v1/leases")),
            change.get("body", BODY),  # type: ignore[arg-type]
            now=float(change.get("now", NOW)),  # type: ignore[arg-type]
        )


def test_the_replay_guard_refuses_a_signature_twice_and_forgets_it_later() -> None:
    guard = ReplayGuard(max_skew=60)
    signed = verify_request(
        sign_request(Keypair(), "POST", "/p", b"", now=NOW), "POST", "/p", b"", now=NOW
    )
    guard.check(signed, now=NOW)
    with pytest.raises(AuthError, match="already used"):
        guard.check(signed, now=NOW + 1)
    guard.check(signed, now=NOW + 121)  # long stale: verify_request refuses it anyway
    assert len(guard) == 1


def test_the_provider_hello_signature_binds_nonce_and_coordinator() -> None:
    provider, coordinator, nonce = Keypair(), Keypair().pubkey(), bytes(range(32))
    signature = sign_provider_hello(provider, coordinator, nonce)
    assert provider_hello_message(coordinator, nonce) == (
        b"jupyter-io/coordinator/v1/provider\n" + bytes(coordinator) + nonce
    )
    assert verify_provider_hello(str(provider.pubkey()), signature, coordinator, nonce) == (
        provider.pubkey()
    )
    with pytest.raises(AuthError):
        verify_provider_hello(str(provider.pubkey()), signature, coordinator, bytes(32))
    with pytest.raises(AuthError):
        verify_provider_hello(str(provider.pubkey()), signature, Keypair().pubkey(), nonce)
    with pytest.raises(AuthError, match="malformed"):
        verify_provider_hello("nope", signature, coordinator, nonce)


def test_usage_signatures_cover_every_field_but_the_signature() -> None:
    provider = Keypair()
    fields = {"type": "usage", "lease": "l1", "seq": 2, "seconds": 30, "gpu_utilisation": None,
              "at": NOW}  # fmt: skip
    report = sign_usage(provider, fields)
    assert usage_message(report) == (
        b"jupyter-io/usage/v1\n"
        + b'{"at":1760000000.0,"gpu_utilisation":null,"lease":"l1","seconds":30,"seq":2,'
        + b'"type":"usage"}'
    )
    # Through JSON and back, as the link carries it.
    verify_usage(provider.pubkey(), json.loads(json.dumps(report)))
    with pytest.raises(AuthError, match="not signed by"):
        verify_usage(provider.pubkey(), {**report, "seconds": 3000})
    with pytest.raises(AuthError, match="not signed by"):
        verify_usage(Keypair().pubkey(), report)
    with pytest.raises(AuthError, match="base58"):
        verify_usage(provider.pubkey(), {**report, "signature": "!"})


# ---- over HTTP -----------------------------------------------------------------------------


async def test_the_coordinator_answers_401_to_stale_forged_and_replayed_requests(
    coordinator: CoordinatorServer,
) -> None:
    http = AsyncHTTPClient(force_instance=True)
    user = Keypair()
    path = "/api/v1/leases"
    body = json.dumps({"gpu": "RTX 4090"}).encode()

    async def post(headers: dict[str, str]) -> tuple[int, dict[str, object]]:
        request = HTTPRequest(coordinator.url + path, "POST", headers=headers, body=body)
        response = await http.fetch(request, raise_error=False)
        return response.code, json.loads(response.body)

    try:
        stale = sign_request(user, "POST", path, body, now=time.time() - 120)
        code, answer = await post(stale)
        assert code == 401 and answer["error"]["code"] == "unauthorized"  # type: ignore[index]
        assert "clock" in answer["error"]["message"]  # type: ignore[index]

        forged = sign_request(user, "POST", path, b'{"gpu":"A100"}')
        code, answer = await post(forged)
        assert code == 401 and "not valid" in answer["error"]["message"]  # type: ignore[index]

        code, answer = await post({})
        assert code == 401 and "must be signed" in answer["error"]["message"]  # type: ignore[index]

        good = sign_request(user, "POST", path, body)
        code, answer = await post(good)
        assert code == 409  # signed fine; nothing on offer
        code, answer = await post(good)
        assert code == 401 and "already used" in answer["error"]["message"]  # type: ignore[index]
    finally:
        http.close()
