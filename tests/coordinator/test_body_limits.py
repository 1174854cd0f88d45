"""Request bodies over an endpoint's limit are answered 413 with the API's JSON error, on a
real coordinator over loopback TCP (issue 11, "REST limits answered properly").

The attack that worked: a 50 MB body got a bare ``400`` with an empty body and a reset
connection. The client here is a raw socket, so that what the server does on the wire (when
it answers, whether it reads the body, how it closes) is what the test sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator import server as server_module
from jupyter_io.coordinator.body_limits import LINGER_SECONDS
from jupyter_io.coordinator.handlers import MAX_BODY_SIZE
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.signing import sign_request

from .conftest import WAIT, Starter

pytestmark = pytest.mark.timeout(60)

LEASES = "/api/v1/leases"
MB = 1 << 20


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Everything after the response: b"" when the server closed cleanly (EOF).
    rest: bytes

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]


def _parse(raw: bytes) -> Response:
    head, _, after = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    return Response(int(status_line.split()[1]), headers, after[:length], after[length:])


async def _exchange(
    server: CoordinatorServer,
    head: str,
    body: Any = (),
    *,
    wait_for_answer_first: bool = False,
) -> tuple[Response, int, BaseException | None]:
    """Send ``head`` then each piece of ``body`` while reading the answer to EOF. Returns the
    answer, how many body bytes were written, and the error writing hit (None: all went)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    sent = 0
    write_error: BaseException | None = None

    async def send() -> None:
        nonlocal sent, write_error
        try:
            writer.write(head.encode("latin1"))
            await writer.drain()
            if wait_for_answer_first:
                return
            for piece in body:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
        except (ConnectionError, OSError) as exc:
            write_error = exc

    sending = asyncio.create_task(send())
    try:
        raw = await asyncio.wait_for(reader.read(), WAIT)  # to EOF
        await asyncio.wait_for(sending, WAIT)
    finally:
        sending.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return _parse(raw), sent, write_error


def _post_head(path: str, length: int | None, headers: dict[str, str] | None = None) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: coordinator", "Content-Type: application/json"]
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines.append(framing)
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def _chunked(data: bytes, size: int = 4096) -> list[bytes]:
    pieces = [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
              for i in range(0, len(data), size)]  # fmt: skip
    return [*pieces, b"0\r\n\r\n"]


def _padded_lease_request(size: int) -> bytes:
    """A valid lease request padded with JSON whitespace to exactly ``size`` bytes."""
    body = json.dumps({"gpu": "H100"}).encode()
    return body + b" " * (size - len(body))


async def test_a_50_mb_body_is_answered_413_json_and_the_upload_is_not_reset(
    coordinator: CoordinatorServer,
) -> None:
    size = 50 * MB
    piece = b"x" * (256 * 1024)
    tracemalloc.start()
    try:
        answer, sent, write_error = await _exchange(
            coordinator, _post_head(LEASES, size), [piece] * (size // len(piece))
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Client and server share this process: together they held a few read buffers at most.
    assert peak < 4 * MB, f"{peak / MB:.1f} MB allocated at the peak"
    assert answer.status == 413, answer
    assert answer.headers["content-type"] == "application/json"
    error = answer.error()
    assert error["code"] == "too_large"
    assert f"at most {MAX_BODY_SIZE} bytes" in error["message"]
    assert f"this one is {size} bytes" in error["message"]
    # The server read what the client still sent instead of resetting it, then closed.
    assert write_error is None and sent == size
    assert answer.rest == b""


async def test_the_answer_comes_before_the_body_is_read(
    coordinator: CoordinatorServer,
) -> None:
    # Announce 1 GB and send none of it: the 413 arrives anyway, so nothing was buffered.
    answer, sent, _ = await _exchange(
        coordinator, _post_head(LEASES, 1 << 30), wait_for_answer_first=True
    )
    assert answer.status == 413 and answer.error()["code"] == "too_large"
    assert sent == 0
    assert coordinator.body_limits is not None and coordinator.body_limits.refused == 1


async def test_a_chunked_body_over_the_limit_is_413_and_one_under_it_is_served(
    coordinator: CoordinatorServer,
) -> None:
    over = b"[" + b" " * (MAX_BODY_SIZE + 10) + b"]"
    answer, _, _ = await _exchange(coordinator, _post_head(LEASES, None), _chunked(over))
    assert answer.status == 413 and answer.error()["code"] == "too_large"
    assert f"at most {MAX_BODY_SIZE} bytes" in answer.error()["message"]

    # One chunk announcing 1 GB, of which 1 MB comes and then nothing, the connection left
    # open: the 413 and the server's end of the stream come at once, not after the linger.
    started = time.monotonic()
    answer, _, _ = await _exchange(
        coordinator, _post_head(LEASES, None), [b"%x\r\n" % (1 << 30), b"y" * MB]
    )
    assert answer.status == 413 and answer.rest == b""
    assert time.monotonic() - started < LINGER_SECONDS

    # A whole chunked body within the limit reaches the handler (unsigned: 401, not 413).
    answer, _, _ = await _exchange(
        coordinator,
        _post_head(LEASES, None, {"Connection": "close"}),
        _chunked(_padded_lease_request(MAX_BODY_SIZE)),
    )
    assert answer.status == 401 and answer.error()["code"] == "unauthorized"


async def test_a_body_at_the_limit_works_and_one_byte_more_is_413(
    coordinator: CoordinatorServer,
) -> None:
    user = Keypair()
    for size, status in ((MAX_BODY_SIZE, 409), (MAX_BODY_SIZE + 1, 413)):
        body = _padded_lease_request(size)
        signed = sign_request(user, "POST", LEASES, body)
        answer, _, _ = await _exchange(
            coordinator, _post_head(LEASES, size, {**signed, "Connection": "close"}), [body]
        )
        assert answer.status == status, answer
        # At the limit the lease service answered: no H100 on offer (the request was read).
        code = "no_offer" if status == 409 else "too_large"
        assert answer.error()["code"] == code


async def test_websocket_endpoints_take_no_body(coordinator: CoordinatorServer) -> None:
    answer, _, _ = await _exchange(
        coordinator, _post_head("/api/v1/providers/connect", 10), [b"0123456789"]
    )
    assert answer.status == 413 and "at most 0 bytes" in answer.error()["message"]


async def test_a_request_whose_headers_never_end_is_dropped_and_huge_headers_are_refused(
    start_coordinator: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tornado's default let a connection wait an hour for its headers, holding 64 KiB each.
    monkeypatch.setattr(server_module, "HEADER_TIMEOUT", 0.5)
    server = await start_coordinator()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)

    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/v1/info HTTP/1.1\r\nHost: coordinator\r\n")  # never finished
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    assert time.monotonic() - started < WAIT
    writer.close()

    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/v1/info HTTP/1.1\r\nX-Pad: " + b"a" * (32 * 1024) + b"\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), WAIT)
    assert not answer.startswith(b"HTTP/1.1 200")
    writer.close()
