"""TLS as jupyter-io's clients see it, and what to say when it goes wrong.

Every client in the product (the coordinator client behind the provisioner, the server
extension and the CLI; the provider's coordinator link and relay dials; the provisioner's
tunnel) verifies a ``https://`` / ``wss://`` peer against Python's default trust store, which
honours the ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` environment variables. A coordinator or
provider whose certificate comes from a private CA (or is self-signed) is trusted by starting
the process with ``SSL_CERT_FILE`` pointing at that CA's certificate. When it is not, the
failure names the fix: :func:`untrusted_certificate`.

A URL whose scheme disagrees with its server is named too, within a second or two rather
than after a handshake timeout: ``https://`` to a plain-HTTP server (which waits in silence
for a request line that never comes) and ``http://`` to a TLS one (which drops the
connection). Dial through :func:`dial_checked`, which checks a ``https://``/``wss://`` peer
still silent after :data:`PROBE_DELAY`; after a failed plain dial ask
:func:`scheme_mismatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

__all__ = [
    "PROBE_DELAY",
    "PROBE_TIMEOUT",
    "SchemeMismatch",
    "dial_checked",
    "scheme_mismatch",
    "untrusted_certificate",
]

_T = TypeVar("_T")

#: Seconds a TLS dial may go without an answer before its peer is checked for plain HTTP
#: (a TLS server on loopback or across a continent answers its handshake well within it).
PROBE_DELAY = 0.5
#: Seconds the check itself may take.
PROBE_TIMEOUT = 1.0

_SECURE = {"https": "http", "wss": "ws"}
_PLAIN = {plain: secure for secure, plain in _SECURE.items()}


class SchemeMismatch(ConfigError):
    """The URL asks for TLS and its server speaks plain HTTP, or the reverse; the message
    names the URL to use instead."""


def untrusted_certificate(exc: BaseException | None) -> str | None:
    """What to tell the user when ``exc`` (or an exception it was raised from) is a failed
    certificate check, or None for any other error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or str(exc)
            return (
                f"its TLS certificate is not trusted ({reason}); if a private CA signed it, "
                f"start this process with SSL_CERT_FILE set to that CA's certificate (PEM)"
            )
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


async def scheme_mismatch(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """What to tell the user when ``url``'s scheme (``http``/``ws`` or ``https``/``wss``)
    disagrees with what the server at its host and port speaks, e.g. ``https://H:P speaks
    plain HTTP, not TLS: use http://H:P``; None when it agrees, or when the server cannot
    be reached or tell within ``timeout`` seconds. Opens one or two connections (a TLS
    handshake that verifies nothing, and a plain ``GET /``) and sends nothing else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or scheme not in (*_SECURE, *_PLAIN):
        return None
    secure = scheme in _SECURE
    port = port or (443 if secure else 80)
    origin = urlunsplit((scheme, parts.netloc, "", "", ""))
    other = _SECURE.get(scheme) or _PLAIN[scheme]
    fixed = urlunsplit((other, parts.netloc, parts.path, parts.query, ""))
    if secure:
        if await _speaks_plain_http(host, port, timeout):
            return f"{origin} speaks plain HTTP, not TLS: use {fixed}"
        return None
    if await _tls_handshake(host, port, timeout) is True:
        return f"{origin} speaks TLS, not plain HTTP: use {fixed}"
    return None


async def dial_checked(url: str, dial: Awaitable[_T], delay: float = PROBE_DELAY) -> _T:
    """Await ``dial`` (the connection or request to ``url``). When ``url`` is ``https://``
    or ``wss://`` and ``dial`` is still pending after ``delay`` seconds, check whether the
    server speaks plain HTTP; if it does, abandon ``dial`` (a coroutine is cancelled, a
    future left to its own timeout) and raise :class:`SchemeMismatch` rather than wait for
    the handshake's timeout. Otherwise the result (or error) is ``dial``'s."""
    task = asyncio.ensure_future(dial)
    if urlsplit(url).scheme.lower() not in _SECURE:
        return await task
    try:
        done, _ = await asyncio.wait({task}, timeout=delay)
        if not done:
            probe = asyncio.ensure_future(scheme_mismatch(url))
            await asyncio.wait({task, probe}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                mismatch = await probe
                if mismatch is not None:
                    raise SchemeMismatch(mismatch)
            else:
                probe.cancel()
        return await task
    finally:
        if not task.done():
            if isinstance(task, asyncio.Task):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            else:
                # A bare future (tornado's fetch) logs an error when it is cancelled under
                # it; it ends by its own timeout, and its outcome is dropped.
                task.add_done_callback(_drop_outcome)


def _drop_outcome(future: asyncio.Future[_T]) -> None:
    if not future.cancelled():
        future.exception()


async def _speaks_plain_http(host: str, port: int, timeout: float) -> bool:
    """True when the server answers a plain ``GET /`` with an HTTP status line and does not
    complete a TLS handshake (an HTTPS server may answer plain requests with a 400)."""
    handshake = asyncio.ensure_future(_tls_handshake(host, port, timeout))
    try:
        status = await _plain_status(host, port, timeout)
        if status is None:
            return False
        if status != 400:
            return True  # a plain server: an HTTPS one says 400 to plain HTTP, if anything
        return await handshake is not True
    finally:
        handshake.cancel()
        with contextlib.suppress(BaseException):
            await handshake


async def _plain_status(host: str, port: int, timeout: float) -> int | None:
    """The status of a plain ``GET /`` (None: no HTTP answer within ``timeout``)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    fields = line.split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
        return None
    return int(fields[1])


async def _tls_handshake(host: str, port: int, timeout: float) -> bool | None:
    """True when a TLS handshake completes (verifying nothing: only the protocol matters
    here), False when the server answers it with something else, None when it does not
    answer within ``timeout`` or cannot be reached."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    writer = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError:
        return False
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    return True
