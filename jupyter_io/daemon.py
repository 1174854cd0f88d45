"""What every jupyter-io daemon needs: a listen address, graceful signal handling, one life.

The coordinator, the provider host and the ledger parse ``HOST:PORT`` with
:func:`parse_listen`, turn SIGINT/SIGTERM into a graceful shutdown with
:func:`capture_signals` (restoring the previous handlers afterwards, as uvicorn does), and
share :class:`Daemon`'s life: :meth:`~Daemon.startup` → :meth:`~Daemon.main_loop` →
:meth:`~Daemon.shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from .errors import ConfigError

__all__ = ["Daemon", "capture_signals", "is_loopback", "parse_listen", "server_ssl_context"]

_LOOPBACK = ("127.", "::1", "localhost")


def parse_listen(text: str, *, example_port: int = 8765) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6; a bare ``PORT`` means loopback).

    Port 0 asks the OS for a free port. Raises :class:`ConfigError` on anything else, with an
    example using ``example_port``.
    """
    value = text.strip()
    if value.isdigit():
        host, port_text = "127.0.0.1", value
    elif value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ConfigError(f"listen address {text!r} must look like [::1]:{example_port}")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"listen address {text!r} must look like 127.0.0.1:{example_port}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"listen address {text!r} has no valid port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port {port} is outside 0..65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (nothing beyond this machine can connect)."""
    return host.startswith(_LOOPBACK)


@contextlib.contextmanager
def capture_signals(
    request_exit: Callable[[], Any], log: logging.Logger | logging.LoggerAdapter[Any]
) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into ``request_exit()``; restore the old handlers after.

    Off the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        request_exit()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def server_ssl_context(certfile: str, keyfile: str, *, serves: str) -> ssl.SSLContext | None:
    """A server TLS context when ``certfile`` is set, else None (plain text).

    ``serves`` names what TLS turns on (``"https"``, ``"wss://"``) for the error messages.
    """
    if not certfile:
        if keyfile:
            raise ConfigError(f"keyfile is set but certfile is not; set both to serve {serves}")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {certfile!r} / key {keyfile!r}: {exc}"
        ) from None
    return context


class Daemon:
    """A daemon's life, uvicorn's shape: :meth:`run` (blocking) or :meth:`serve` runs
    :meth:`startup`, :meth:`main_loop` until :meth:`request_exit` or SIGINT/SIGTERM, then
    :meth:`shutdown`. Subclasses set :attr:`log`, :attr:`should_exit` and ``_loop`` (the
    running loop, in their ``startup``) and implement ``startup`` and ``shutdown``; tests
    call those two directly."""

    log: logging.Logger
    should_exit: asyncio.Event
    _loop: asyncio.AbstractEventLoop | None

    async def startup(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (blocking)."""
        asyncio.run(self.serve())

    async def serve(self) -> None:
        """startup → main_loop → shutdown, with SIGINT/SIGTERM captured meanwhile."""
        with self.capture_signals():
            await self.startup()
            try:
                await self.main_loop()
            finally:
                await self.shutdown()

    async def main_loop(self) -> None:
        """Wait until asked to exit."""
        await self.should_exit.wait()

    def request_exit(self) -> None:
        """Ask :meth:`main_loop` to return (safe from signal handlers and other threads)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.should_exit.set)

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        """Turn SIGINT/SIGTERM into :meth:`request_exit`; restore the old handlers after."""
        return capture_signals(self.request_exit, self.log)
