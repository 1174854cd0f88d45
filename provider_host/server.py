"""The provider host daemon: accepts tunnel websockets and runs their kernel sessions.

:class:`ProviderServer` follows uvicorn's shape: :meth:`~ProviderServer.startup` (load the
keypair and allow-list, probe the inventory, listen), :meth:`~ProviderServer.main_loop` (wait
for SIGINT/SIGTERM or :meth:`~ProviderServer.request_exit`), :meth:`~ProviderServer.shutdown`
(stop accepting, end every session: kill its kernel, close its websocket with 1001, delete its
workspace). :meth:`~ProviderServer.serve` runs all three with the signals captured and the
previous handlers restored afterwards; :meth:`~ProviderServer.run` wraps it in
``asyncio.run``. Tests call startup/shutdown directly.

Once listening it prints, flushed to stdout, the host key, the inventory and, last, exactly one
line ``jupyter-io provider listening on ws://HOST:PORT/tunnel`` (``wss://`` with TLS) with the
real port: launchers wait for that line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit

import zmq.asyncio
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from jupyter_io.errors import ConfigError, ProtocolError
from jupyter_io.identity import new_nonce
from jupyter_io.protocol import SUBPROTOCOL, CloseCode, FrameKind, decode_frame, encode_control

from .allocation import GpuPool
from .config import ProviderConfig
from .handshake import Refusal, challenge_body, check_hello
from .inventory import Inventory, probe_inventory, render_inventory
from .session import KernelSession

__all__ = ["LISTENING_PREFIX", "TUNNEL_PATH", "ProviderServer"]

#: The websocket path of the tunnel endpoint.
TUNNEL_PATH = "/tunnel"
#: Start of the one line printed once the host accepts connections.
LISTENING_PREFIX = "jupyter-io provider listening on "

_LOOPBACK = ("127.", "::1", "localhost")


def _make_private_dir(path: str) -> None:
    Path(path).expanduser().mkdir(mode=0o700, parents=True, exist_ok=True)


def _reason(text: str) -> str:
    """A websocket close reason must fit in 123 bytes of UTF-8."""
    return text.encode()[:120].decode(errors="ignore")


class ProviderServer:
    """Lifecycle of the provider host (see the module docstring)."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        log: logging.Logger | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        self.config = config
        self.log = log or logging.getLogger("provider_host")
        self.stdout = stdout or sys.stdout
        #: Live sessions by id.
        self.sessions: dict[str, KernelSession] = {}
        #: The ``ws://`` or ``wss://`` URL of the tunnel endpoint, after startup.
        self.url = ""
        self.inventory: Inventory | None = None
        self.host_keypair: Keypair | None = None
        self.should_exit = asyncio.Event()
        #: Set once :meth:`startup` is done and the listening line is out.
        self.started = asyncio.Event()
        self._allowed: frozenset[Pubkey] = frozenset()
        self._gpus = GpuPool(())
        self._context: zmq.asyncio.Context | None = None
        self._server: Server | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the whole life --------------------------------------------------------------------

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

    async def startup(self) -> None:
        """Load identity and allow-list, probe devices, listen, print the listening line.

        Raises :class:`~jupyter_io.errors.ConfigError` for a missing keypair, a bad allow-list
        entry, TLS files that do not load, or an unusable listen address.
        """
        self._loop = asyncio.get_running_loop()
        config = self.config
        self.host_keypair = config.load_keypair()
        self._allowed = config.load_allowlist()
        ssl_context = config.ssl_context()
        host, port = config.listen_address()
        self.inventory = probe_inventory(config.simulate_gpu)
        self._gpus = GpuPool(self.inventory.gpu_indices)
        _make_private_dir(config.workspace_root)
        self._context = zmq.asyncio.Context()
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                compression=None,
                max_size=config.max_frame_size,
                ping_interval=config.ping_interval or None,
                ping_timeout=config.ping_timeout or None,
                ssl=ssl_context,
                process_request=self._check_path,
            )
        except OSError as exc:
            self._context.destroy(linger=0)
            raise ConfigError(f"cannot listen on {config.listen}: {exc}") from None
        bound = self._server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        scheme = "wss" if ssl_context else "ws"
        self.url = f"{scheme}://{shown}:{bound[1]}{TUNNEL_PATH}"
        if not self._allowed:
            self.log.warning("the allow-list is empty: every client will be refused (--allow)")
        if ssl_context is None and not host.startswith(_LOOPBACK):
            self.log.warning("listening beyond loopback without TLS; set certfile and keyfile")
        self._print(f"jupyter-io provider host key {self.host_keypair.pubkey()}")
        self._print("jupyter-io provider inventory:")
        for line in render_inventory(self.inventory):
            self._print(line)
        self._print(f"{LISTENING_PREFIX}{self.url}")
        self.started.set()

    async def main_loop(self) -> None:
        """Wait until asked to exit."""
        await self.should_exit.wait()

    def request_exit(self) -> None:
        """Ask :meth:`main_loop` to return (safe from signal handlers and other threads)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.should_exit.set)

    async def shutdown(self) -> None:
        """Stop accepting, end every session (kernels killed, 1001, workspaces removed)."""
        self._closing = True
        if self._server is not None:
            self._server.server.close()  # no new TCP connections from here on
        sessions = list(self.sessions.values())
        if sessions:
            await asyncio.gather(
                *(s.end(CloseCode.GOING_AWAY, "provider shutting down") for s in sessions),
                return_exceptions=True,
            )
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        self.log.info("provider host stopped")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into :meth:`request_exit`; restore the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle_signal(self, signum: int, frame: FrameType | None) -> None:
        self.log.info("received %s, shutting down", signal.Signals(signum).name)
        self.request_exit()

    # -- connections -----------------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != TUNNEL_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"the tunnel is at {TUNNEL_PATH}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            await self._handshake_and_serve(ws)
        except ConnectionClosed:
            pass
        except Exception:
            self.log.exception("tunnel connection failed")
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL_ERROR, "internal error in the provider host")

    async def _handshake_and_serve(self, ws: ServerConnection) -> None:
        assert self.host_keypair is not None and self._context is not None
        if self._closing:
            await ws.close(CloseCode.GOING_AWAY, "provider shutting down")
            return
        host = self.host_keypair.pubkey()
        nonce = new_nonce()
        await ws.send(encode_control(FrameKind.CHALLENGE, challenge_body(nonce, host)))
        try:
            message = await asyncio.wait_for(ws.recv(), self.config.handshake_timeout)
        except asyncio.TimeoutError:
            await ws.close(CloseCode.POLICY_VIOLATION, "no HELLO in time")
            return
        try:
            if isinstance(message, str):
                raise ProtocolError("text message on the tunnel; frames are binary")
            frame = decode_frame(message, self.config.max_frame_size)
            if frame.kind is not FrameKind.HELLO:
                raise ProtocolError(f"expected HELLO, got {frame.kind.name}")
            hello = check_hello(
                frame.body,
                nonce=nonce,
                host=host,
                allowed=self._allowed,
                session_owner=self._session_owner,
                has_capacity=self._has_capacity,
            )
        except ProtocolError as exc:
            self.log.warning("refusing connection: %s", exc)
            await ws.close(CloseCode.PROTOCOL_ERROR, _reason(str(exc)))
            return
        except Refusal as refusal:
            self.log.warning("refusing connection (%s): %s", refusal.code, refusal.reason)
            body = {"code": refusal.code, "reason": refusal.reason}
            await ws.send(encode_control(FrameKind.ERROR, body))
            await ws.close(refusal.close_code, _reason(refusal.reason))
            return
        if self._closing:
            await ws.close(CloseCode.GOING_AWAY, "provider shutting down")
            return
        if hello.session is None:
            session = self._create_session(hello.pubkey)
            await session.serve(ws, 0, resumed=False)
            return
        session = self.sessions[hello.session]
        if hello.received > session.tunnel.sent:
            await ws.close(
                CloseCode.PROTOCOL_ERROR,
                _reason(
                    f"resume from frame {hello.received}, but this host only sent "
                    f"{session.tunnel.sent}"
                ),
            )
            return
        self.log.info("session %s resumed from frame %d", session.id, hello.received)
        await session.serve(ws, hello.received, resumed=True)

    def _create_session(self, owner: Pubkey) -> KernelSession:
        assert self._context is not None
        session = KernelSession(
            owner=owner,
            config=self.config,
            context=self._context,
            gpus=(),
            on_end=self._session_ended,
            log=self.log,
        )
        gpus = self._gpus.acquire(session.id)
        assert gpus is not None, "capacity was checked in the handshake"
        session.gpus = gpus
        self.sessions[session.id] = session
        try:
            session.open()
        except Exception:
            self.sessions.pop(session.id, None)
            self._gpus.release(session.id)
            raise
        self.log.info("session %s opened for %s (gpus %s)", session.id, owner, list(gpus) or "none")
        return session

    def _session_ended(self, session: KernelSession) -> None:
        self.sessions.pop(session.id, None)
        self._gpus.release(session.id)

    def _session_owner(self, session_id: str) -> Pubkey | None:
        session = self.sessions.get(session_id)
        return None if session is None else session.owner

    def _has_capacity(self) -> bool:
        return len(self.sessions) < self.config.max_sessions and self._gpus.available()

    def _print(self, line: str) -> None:
        print(line, file=self.stdout, flush=True)
