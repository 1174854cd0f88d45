"""The latency ping's contract (jupyter_io.ping), byte for byte, without sockets."""

from __future__ import annotations

import pytest

from jupyter_io.latency import RoundTripWatch
from jupyter_io.ping import (
    PING_MAX_REPLY,
    PING_REQUEST_SIZE,
    PingLimiter,
    address_key,
    build_ping_request,
    parse_ping_path,
    parse_ping_reply,
    ping_target,
)

NONCE = bytes(range(16))


def test_a_ping_request_is_exactly_its_fixed_size_and_parses_back_to_its_nonce() -> None:
    for url in (
        "ws://127.0.0.1:8765/tunnel",
        "wss://gpu.example.org/tunnel",
        "ws://[::1]:9/relay",
        "https://coordinator.example.org:8700/relay/",
    ):
        target = ping_target(url)
        request = build_ping_request(target, NONCE)
        assert len(request) == PING_REQUEST_SIZE
        line = request.split(b"\r\n", 1)[0].decode()
        method, path, version = line.split(" ")
        assert (method, version) == ("GET", "HTTP/1.1")
        assert path.startswith(target.path + "?n=") and target.path.endswith("/ping")
        assert parse_ping_path(path, len(request)) == NONCE.hex()
    assert ping_target("wss://gpu.example.org/tunnel").port == 443
    assert ping_target("ws://h/tunnel").url == "ws://h:80/tunnel"


def test_a_short_or_malformed_ping_gets_no_answer() -> None:
    good = f"/tunnel/ping?n={NONCE.hex()}"
    assert parse_ping_path(good, PING_REQUEST_SIZE - 1) is None  # a reply could outweigh it
    for bad in (
        "/tunnel/ping",
        "/tunnel/ping?n=",
        "/tunnel/ping?n=" + "0" * 31,
        "/tunnel/ping?n=" + "0" * 33,
        "/tunnel/ping?n=" + "G" * 32,
        "/tunnel/ping?n=" + "A" * 32,  # the nonce is lower-case hex
        good + "&x=1",
        "/tunnel/ping?x=" + NONCE.hex(),
    ):
        assert parse_ping_path(bad, PING_REQUEST_SIZE) is None, bad


def test_the_reply_is_smaller_than_the_request_and_must_carry_the_nonce() -> None:
    assert PING_MAX_REPLY < PING_REQUEST_SIZE
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n" + NONCE.hex().encode()
    assert parse_ping_reply(reply, NONCE) is True
    assert parse_ping_reply(reply[:20], NONCE) is None  # still arriving
    assert parse_ping_reply(reply[:-4], NONCE) is None
    assert parse_ping_reply(reply.replace(b"200", b"404"), NONCE) is False
    assert parse_ping_reply(reply, bytes(16)) is False  # another ping's nonce: not an answer
    padded = reply.replace(b"\r\n\r\n", b"\r\nX: " + b"y" * PING_MAX_REPLY + b"\r\n\r\n")
    assert parse_ping_reply(padded, NONCE) is False  # an amplifying responder is refused


def test_the_limiter_keeps_a_bucket_per_address_and_a_total_in_fixed_memory() -> None:
    limiter = PingLimiter(rate=2.0, burst=4.0, total_rate=1000.0, buckets=64)
    now = 100.0
    assert [limiter.allow("10.0.0.1", now) for _ in range(6)] == [True] * 4 + [False] * 2
    # Another address has its own bucket (one in another slot: the table's key is random,
    # so two given addresses share a slot 1 time in 64).
    other = next(
        a for a in (f"10.0.0.{i}" for i in range(2, 255))
        if limiter._slot(a) != limiter._slot("10.0.0.1")
    )  # fmt: skip
    assert limiter.allow(other, now)
    assert limiter.allow("10.0.0.1", now + 0.5)  # refilled at 2 per second
    assert not limiter.allow("10.0.0.1", now + 0.5)
    assert limiter.refused == 3
    # One machine's IPv6 addresses share its /64; an IPv4-mapped address is its IPv4 one.
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff")
    assert address_key("2001:db8::1") != address_key("2001:db8:0:1::1")
    assert address_key("::ffff:10.0.0.1") == address_key("10.0.0.1")
    # The table does not grow with the number of addresses.
    for i in range(5000):
        limiter.allow(f"10.1.{i // 256}.{i % 256}", now + 10)
    assert len(limiter._tokens) == 64
    total = PingLimiter(rate=100.0, burst=100.0, total_rate=3.0)
    assert [total.allow(f"10.2.0.{i}", 5.0) for i in range(5)] == [True] * 3 + [False] * 2
    with pytest.raises(ValueError):
        PingLimiter(buckets=100)


def test_the_round_trip_is_degraded_only_when_it_stays_worse_for_long() -> None:
    watch = RoundTripWatch(factor=2.0, margin_ms=30.0, after=30.0)
    watch.observe(20.0, 0.0)
    watch.observe(45.0, 10.0)  # above 2x but within the margin: no notice
    assert watch.worse_since is None
    watch.observe(120.0, 20.0)
    assert not watch.degraded(20.0) and watch.degraded_for(40.0) == 20.0
    watch.observe(130.0, 45.0)
    assert not watch.degraded(45.0)
    watch.observe(125.0, 50.0)
    assert watch.degraded(50.0)
    body = watch.to_json(50.0)
    assert body == {"ms": 125.0, "best_ms": 20.0, "degraded": True, "degraded_for_s": 30.0}
    watch.observe(22.0, 55.0)  # back to normal: the notice goes
    assert not watch.degraded(55.0)
    watch.observe(200.0, 60.0)
    watch.observe(None, 70.0)  # the tunnel dropped: that is another notice's business
    assert watch.worse_since is None and watch.to_json(70.0)["ms"] is None
