"""Request bodies bounded per endpoint, and refused with a 413 the client can read.

Left to itself, tornado reads a request body into memory before the handler runs and, past
the server's ``max_body_size``, writes a bare ``400`` and closes the connection while the
client is still uploading (the client usually sees a reset, not the answer).
:class:`BodyLimits` sits between the HTTP server and the application (it wraps the
application's ``HTTPServerConnectionDelegate``) and decides from the request line and
headers, before the application sees the request:

* a ``Content-Length`` above the endpoint's limit is answered ``413`` with the API's JSON
  error (``{"error": {"code": "too_large", "message"}}``) before any byte of the body is
  read; then a *lingering close*: the answer is sent, the write side shut, and what the
  client still sends is read and dropped, for at most ``linger`` seconds, so that the
  client's TCP stack delivers the answer instead of a reset. One read buffer at a time is
  all the body costs;
* a chunked body (no length announced) is counted as it arrives and handed on while
  within the limit; the chunk that passes it is answered ``413`` at once, and the close
  lingers the same way (write side shut, the rest dropped, closed at the latest ``linger``
  seconds later);
* anything else goes to the application as usual (the body is at most the limit).

Limits are ``(path regex, bytes)`` pairs, the first full match wins, else the default.
Pass the largest as the ``HTTPServer``'s ``max_body_size`` (:attr:`BodyLimits.largest`):
nothing larger ever reaches tornado's own check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Sequence
from typing import cast

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import SSLIOStream, StreamClosedError

__all__ = ["LINGER_SECONDS", "BodyLimits", "too_large_message"]

#: Longest a refused upload is read and dropped before the connection closes, seconds.
LINGER_SECONDS = 5.0
#: Most bytes one read takes while a refused upload drains.
_DRAIN_CHUNK = 64 * 1024
#: tornado's own chunked-body check, disarmed: the gate counts and answers instead.
_UNBOUNDED = 1 << 62


def too_large_message(method: str, path: str, size: int | None, limit: int) -> str:
    """What the 413 says: the endpoint, its limit and, when announced, the body's size."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    what = f"{size} bytes" if size is not None else "larger"
    return (
        f"the body of {method} {shown} may be at most {limit} bytes; this one is {what}. "
        f"Send a smaller body (docs/coordinator-contract.md lists each endpoint's limit)"
    )


def _body_json(message: str) -> bytes:
    return json.dumps({"error": {"code": "too_large", "message": message}}).encode()


def _content_length(headers: httputil.HTTPHeaders) -> int | None:
    """The announced length, or None (absent, or malformed: tornado answers that 400)."""
    value = headers.get("Content-Length")
    if value is None:
        return None
    first = value.split(",")[0].strip()
    return int(first) if first.isdigit() else None


class BodyLimits(httputil.HTTPServerConnectionDelegate):
    """Wraps ``app`` (what ``HTTPServer`` would get) with per-endpoint body limits (see the
    module docstring)."""

    def __init__(
        self,
        app: httputil.HTTPServerConnectionDelegate,
        limits: Sequence[tuple[str, int]],
        default: int,
        *,
        linger: float = LINGER_SECONDS,
    ) -> None:
        if default < 0 or any(limit < 0 for _, limit in limits) or linger < 0:
            raise ValueError("limits and linger must not be negative")
        self.app = app
        self.default = default
        self.linger = linger
        self._limits = [(re.compile(pattern), limit) for pattern, limit in limits]
        #: Requests answered 413 so far.
        self.refused = 0

    @property
    def largest(self) -> int:
        """The largest body any endpoint accepts."""
        return max([self.default, *(limit for _, limit in self._limits)])

    def limit_for(self, path: str) -> int:
        """The body limit of the endpoint at ``path`` (no query string)."""
        for pattern, limit in self._limits:
            if pattern.fullmatch(path):
                return limit
        return self.default

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        inner = self.app.start_request(server_conn, request_conn)
        return _Gate(self, inner, cast(HTTP1Connection, request_conn))

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class _Gate(httputil.HTTPMessageDelegate):
    """One request's way through :class:`BodyLimits`."""

    def __init__(
        self, limits: BodyLimits, inner: httputil.HTTPMessageDelegate, conn: HTTP1Connection
    ) -> None:
        self.limits = limits
        self.inner = inner
        self.conn = conn
        self.limit = 0
        self.seen = 0
        self.counting = False
        self.passed = False  # the application got the headers
        self.refused_at: float | None = None
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.request = ("", "")

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        line = cast(httputil.RequestStartLine, start_line)
        path = line.path.split("?", 1)[0]
        self.request = (line.method, path)
        self.limit = limit = self.limits.limit_for(path)
        length = _content_length(headers)
        if length is not None and length > limit:
            return self._refuse_unread(length)
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        if chunked and "Content-Length" not in headers:
            self.counting = True
            self.conn.set_max_body_size(_UNBOUNDED)
        self.passed = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.counting:
            self.seen += len(chunk)
            if self.refused_at is not None:
                return None  # dropped: the 413 is out, the timer closes the connection
            if self.seen > self.limit:
                self._refuse_reading()
                return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if self.refused_at is not None:
            self._close()  # the whole refused body arrived: the answer is out already
            return
        self.inner.finish()

    def on_connection_close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.passed:
            self.inner.on_connection_close()

    # -- refusals --------------------------------------------------------------------------

    def _message(self, size: int | None) -> bytes:
        self.limits.refused += 1
        method, path = self.request
        return _body_json(too_large_message(method, path, size, self.limit))

    async def _refuse_unread(self, length: int) -> None:
        """413 before the body is read, then the lingering close (see the module)."""
        body = self._message(length)
        stream = self.conn.detach()
        head = (
            "HTTP/1.1 413 Payload Too Large\r\n"
            "Content-Type: application/json\r\n"
            "Cache-Control: no-store\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin1")
        loop = asyncio.get_running_loop()
        try:
            await stream.write(head + body)
            if not isinstance(stream, SSLIOStream) and stream.socket is not None:
                with contextlib.suppress(OSError):
                    stream.socket.shutdown(socket.SHUT_WR)  # the client reads the answer, EOF
            deadline = loop.time() + self.limits.linger
            left = length
            while left > 0 and loop.time() < deadline:
                read = stream.read_bytes(min(left, _DRAIN_CHUNK), partial=True)
                left -= len(await asyncio.wait_for(read, deadline - loop.time()))
        except (StreamClosedError, asyncio.TimeoutError, OSError):
            pass
        finally:
            stream.close()

    def _refuse_reading(self) -> None:
        """413 while a chunked body is still arriving; the rest is dropped (see ``finish``
        and ``data_received``)."""
        self.refused_at = asyncio.get_running_loop().time()
        body = self._message(None)
        headers = httputil.HTTPHeaders(
            {
                "Content-Type": "application/json",
                "Cache-Control": "no-store",
                "Content-Length": str(len(body)),
                "Connection": "close",
            }
        )
        start = httputil.ResponseStartLine("HTTP/1.1", 413, "Payload Too Large")
        written = self.conn.write_headers(start, headers, body)
        written.add_done_callback(self._shut_write)
        # Closed then even if the client stops sending and keeps the connection open.
        self.timer = asyncio.get_running_loop().call_later(self.limits.linger, self._close)

    def _shut_write(self, written: asyncio.Future[None]) -> None:
        """The 413 is out: the client reads it and EOF while the rest of its body drains."""
        if written.cancelled() or written.exception() is not None:
            return
        stream = self.conn.stream
        if stream is not None and not isinstance(stream, SSLIOStream) and stream.socket:
            with contextlib.suppress(OSError):
                stream.socket.shutdown(socket.SHUT_WR)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        conn = self.conn
        stream = conn.stream
        with contextlib.suppress(Exception):
            conn.finish()
        if stream is not None and not stream.closed():
            with contextlib.suppress(StreamClosedError):
                stream.write(b"").add_done_callback(lambda _: stream.close())
