"""Property-based tests of the provider link's messages (hypothesis).

The contract (``jupyter_io.provider_link``): :func:`parse_message` raises only
:class:`~jupyter_io.errors.ProtocolError`, whatever text a provider (or, on the provider's
side, a coordinator) sends; a message it accepts serialises to JSON that parses back to the
same message; and no integer it accepts is too large for the store's 64-bit columns.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from solders.keypair import Keypair
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.errors import ProtocolError
from jupyter_io.provider_link import (
    MAX_INT,
    End,
    ErrorMessage,
    LinkMessage,
    parse_message,
)

from ..fuzzing import EDGE_NUMBERS, hostile_json, json_values
from .conftest import WAIT, FakeProvider, LinkRefused, gpu_offer

KEY = str(Keypair().pubkey())
HUGE_INT = 10**400

#: One valid body of every message type: the seeds the mutations start from.
SEEDS: list[dict[str, Any]] = [
    {"type": "challenge", "version": 1, "nonce": "ab" * 32, "coordinator": KEY},
    {
        "type": "hello",
        "version": 1,
        "pubkey": KEY,
        "signature": "s" * 88,
        "inventory": {
            "name": "rig",
            "region": "eu",
            "reachable_url": "wss://rig.example:8443",
            "max_kernels": 4,
            "offers": [gpu_offer(count=2, benchmark=80.5), gpu_offer("A100", first_index=2)],
        },
        "sessions": ["lease-1", "lease-2"],
        "nonce": "cd" * 32,
    },
    {"type": "welcome", "heartbeat_interval": 5, "coordinator": KEY, "signature": "s" * 88},
    {"type": "error", "code": "auth", "message": "no"},
    {"type": "heartbeat", "load": 0.5, "sessions": ["lease-1"]},
    {
        "type": "usage",
        "lease": "lease-1",
        "seq": 3,
        "seconds": 60,
        "gpu_utilisation": 0.9,
        "at": 1.5,
        "signature": "s" * 88,
    },
    {"type": "session", "lease": "lease-1", "state": "active", "at": 2.5},
    {"type": "dial", "lease": "lease-1", "url": "ws://127.0.0.1/relay/lease-1?conn=1"},
    {"type": "end", "lease": "lease-1", "reason": "over"},
    {"type": "sign_settlement", "lease": "lease-1", "amount": 7, "message": "AAEC"},
    {"type": "settlement_signature", "lease": "lease-1", "signature": "s" * 88},
    {"type": "settlement_refused", "lease": "lease-1", "reason": "no", "code": "unknown_lease"},
]

EDGES = st.sampled_from(
    [0, -1, 1, MAX_INT, MAX_INT + 1, 2**64, HUGE_INT, -HUGE_INT, 1e308, -0.0, "", [], {},
     ["x"], {"a": 1}, True, "\udcff", "ws://x", "00" * 32]
)  # fmt: skip
JSON = EDGES | EDGE_NUMBERS | json_values()


@st.composite
def mutated(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """``value`` with a few of its fields, at any depth, replaced, dropped or added."""
    if depth > 3 or not draw(st.integers(0, 3)):
        return value
    if isinstance(value, dict) and value:
        value = dict(value)
        key = draw(st.sampled_from(sorted(value)))
        how = draw(st.sampled_from(["replace", "drop", "recurse", "add"]))
        if how == "replace":
            value[key] = draw(JSON)
        elif how == "drop":
            del value[key]
        elif how == "add":
            value[draw(st.text(max_size=8))] = draw(JSON)
        else:
            value[key] = draw(mutated(value[key], depth + 1))
        return draw(mutated(value, depth + 1))
    if isinstance(value, list) and value:
        value = list(value)
        at = draw(st.integers(0, len(value) - 1))
        value[at] = draw(mutated(value[at], depth + 1) | JSON)
        return value
    return draw(JSON)


MESSAGES = st.sampled_from(SEEDS).flatmap(mutated)


def check(text: str) -> None:
    """Refused with ProtocolError, or accepted and then stable through its own JSON."""
    try:
        message: LinkMessage = parse_message(text)
    except ProtocolError:
        return
    again = parse_message(message.to_json())
    assert again == message and again.to_json() == message.to_json()
    assert all(abs(n) <= MAX_INT for n in integers(json.loads(message.to_json())))


def integers(value: Any) -> list[int]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in integers(item)]
    if isinstance(value, list):
        return [n for item in value for n in integers(item)]
    return [value] if type(value) is int else []


@given(st.text(max_size=200) | hostile_json().map(lambda raw: raw.decode(errors="replace")))
@example("[" * 100_000)  # found by fuzzing: RecursionError escaped (before any hello)
@example('{"type": []}')  # found by fuzzing: TypeError, unhashable type (before any hello)
@example('{"type": {}}')
@example("1" * 5000)
def test_any_text_is_a_message_or_a_protocol_error(text: str) -> None:
    check(text)


@given(MESSAGES)
@example({"type": "session", "lease": "x", "state": [], "at": 1})  # found: TypeError
@example({"type": "settlement_refused", "lease": "x", "reason": "r", "code": {}})  # TypeError
@example({"type": "session", "lease": "x", "state": "ended", "at": HUGE_INT})  # OverflowError
@example({**SEEDS[5], "gpu_utilisation": -HUGE_INT})  # OverflowError
@example({**SEEDS[5], "seconds": MAX_INT + 1})  # past the store's BIGINT: accepted before
@example({**SEEDS[9], "amount": 2**64})
@example({"type": "welcome", "heartbeat_interval": 1e308, "coordinator": KEY})
def test_any_message_shaped_object_parses_round_trips_or_is_a_protocol_error(
    body: Any,
) -> None:
    check(json.dumps(body))


@given(st.sampled_from(SEEDS))
def test_every_seed_is_a_valid_message(body: dict[str, Any]) -> None:
    """The seeds really exercise the parsers past their first check."""
    message = parse_message(json.dumps(body))
    assert message.type == body["type"]


def test_an_inventory_price_past_64_bits_is_refused_by_the_parser() -> None:
    """Found by fuzzing: a hello whose price (or VRAM, count, usage seconds) exceeded
    2**63-1 parsed, and then failed in the store's 64-bit columns: the link answered
    nothing at all (no welcome, no error) instead of refusing it with close 1002."""
    hello = json.loads(json.dumps(SEEDS[1]))
    hello["inventory"]["offers"][0]["price_lamports_per_hour"] = MAX_INT + 1
    try:
        parse_message(json.dumps(hello))
    except ProtocolError as exc:
        assert "2**63-1" in str(exc)
    else:
        raise AssertionError("a price past 64 bits was accepted")
    hello["inventory"]["offers"][0]["price_lamports_per_hour"] = MAX_INT
    parse_message(json.dumps(hello))


async def test_a_malformed_first_message_is_answered_with_a_protocol_error_and_1002(
    coordinator: CoordinatorServer,
) -> None:
    """Found by fuzzing: ``{"type": []}`` (and ``[[[...``) raised TypeError/RecursionError
    out of the link's parser, so the connection died without the ``error`` message and
    close 1002 the contract promises for a malformed message."""
    url = coordinator.url.replace("http", "ws", 1) + "/api/v1/providers/connect"
    for text in ('{"type": []}', "[" * 50_000):
        async with connect(url, compression=None, open_timeout=WAIT) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "challenge"
            await ws.send(text)
            error = parse_message(await asyncio.wait_for(ws.recv(), WAIT))
            assert isinstance(error, ErrorMessage) and error.code == "protocol", error
            try:
                await asyncio.wait_for(ws.recv(), WAIT)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1002
            else:
                raise AssertionError("the link stayed open after a malformed message")


async def test_a_signed_hello_priced_past_64_bits_is_refused_not_left_unanswered(
    coordinator: CoordinatorServer, providers: list[FakeProvider]
) -> None:
    """Before the bound, this hello passed the parser, failed in the store, and the
    provider waited for a welcome that never came."""
    provider = FakeProvider(coordinator.url, [gpu_offer(price=MAX_INT + 1)])
    providers.append(provider)
    with pytest.raises(LinkRefused) as refused:
        await provider.connect()
    assert refused.value.code == 1002 and refused.value.error is not None
    assert "2**63-1" in refused.value.error["message"]


def test_end_message_survives_any_reason_text() -> None:
    """Reasons travel as JSON strings: lone surrogates and quotes included."""
    for reason in ("\udcff", '"}', "\x00", "é" * 2048):
        assert parse_message(End("lease-1", reason).to_json()) == End("lease-1", reason)
