"""The coordinator's end of the provider links.

* :class:`ProviderLinkSession`, the state machine of one connection on the coordinator:
  :meth:`~ProviderLinkSession.open` sends the challenge, :meth:`~ProviderLinkSession.receive`
  takes each text message (checks the hello's signature, then hands inventory, heartbeats,
  session events and usage reports to the :class:`~jupyter_io.coordinator.registry.Registry`)
  and :meth:`~ProviderLinkSession.closed` reports the end. The websocket handler only moves
  text between the socket and this object.
* :class:`LinkConnection`, one link on a socket taken over from tornado. Once the hello
  checks out it pings the provider every ``heartbeat_interval`` (websocket ping frames,
  which the provider's websocket answers by itself) and keeps the round trip on the session
  (:attr:`ProviderLinkSession.round_trip_ms`): the relay's hop to that provider, which users
  add to their own ping of the relay (``docs/coordinator-contract.md`` section 6).

The messages themselves are the contract in :mod:`jupyter_io.provider_link`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from solders.pubkey import Pubkey
from tornado.iostream import IOStream
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol as WebSocketProtocol
from websockets.protocol import Side, State

from ..admission import HandshakeSlot
from ..errors import AuthError, ProtocolError
from ..identity import new_nonce
from ..provider_link import (
    CLOSE_BAD_SIGNATURE,
    CLOSE_PROTOCOL,
    MAX_HELLO_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_REQUIREMENTS_SIZE,
    Challenge,
    Environment,
    EnvironmentRefused,
    ErrorMessage,
    GetEnvironment,
    GpuCommitment,
    GpuOpening,
    GpuRefused,
    Heartbeat,
    Hello,
    LinkMessage,
    SessionEvent,
    SettlementRefused,
    SettlementSignature,
    Usage,
    environment_sha256,
    parse_message,
)
from ..signing import verify_provider_hello
from .sockets import Channel, adopt

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["CLOSE_TIMEOUT", "LinkConnection", "LinkPort", "ProviderLinkSession"]

#: Seconds a provider has to answer our close frame before its TCP is cut.
CLOSE_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------
# One connection, coordinator side


class LinkPort(Protocol):
    """What :class:`ProviderLinkSession` needs of the websocket it runs on."""

    def send(self, text: str) -> None:
        """Queue one text message (never blocks; a closed socket drops it)."""

    def close(self, code: int, reason: str) -> None:
        """Close the websocket with ``code``."""


class ProviderLinkSession:
    """The coordinator's side of one provider link (see the module docstring).

    Made per websocket by the handler; :meth:`open`, then :meth:`receive` for every text
    message (awaiting what it returns before reading the next one), then :meth:`closed`.
    Once the hello is verified the :class:`~jupyter_io.coordinator.registry.Registry` owns
    the provider's state; this object only routes the link's messages to it.
    """

    def __init__(
        self,
        registry: Registry,
        port: LinkPort,
        *,
        coordinator: Pubkey,
        log: logging.Logger | None = None,
    ) -> None:
        self.registry = registry
        self.port = port
        self.coordinator = coordinator
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        #: The provider's key once its hello is verified.
        self.provider: str | None = None
        #: A hello arrived (it may still be being checked and stored).
        self.hello_received = False
        self._nonce = new_nonce()
        self._closing = False
        #: The latest round trip to the provider over this link, ms (websocket ping to
        #: pong; None until measured, or when the last ping went unanswered): the relay's
        #: hop to the provider, which users add to their ping of the relay.
        self.round_trip_ms: float | None = None
        #: Messages sent before the welcome (the registry may address this link while the
        #: hello is still being stored: a GPU challenge, a dial): sent right after it.
        self._before_welcome: list[str] | None = []

    def open(self) -> None:
        """Send the challenge."""
        self.port.send(Challenge(self._nonce, str(self.coordinator)).to_json())

    def send(self, message: LinkMessage) -> None:
        """Send a coordinator → provider message (``dial``, ``end``, ``sign_settlement``)."""
        if self._closing:
            return
        if self._before_welcome is not None:
            self._before_welcome.append(message.to_json())
        else:
            self.port.send(message.to_json())

    def close(self, code: int, reason: str) -> None:
        """Close the link (the registry calls this when it replaces or drops the link)."""
        self._closing = True
        self.port.close(code, reason)

    def receive(self, text: str | bytes) -> Awaitable[None] | None:
        """Handle one message; returns an awaitable when it has I/O to do (the caller awaits
        it before the next message, so a provider's messages are handled in order).

        Heartbeats, the bulk of the traffic, are handled synchronously.
        """
        if self._closing:
            return None
        try:
            message = parse_message(text)
        except ProtocolError as exc:
            self._refuse("protocol", str(exc), CLOSE_PROTOCOL)
            return None
        if self.provider is None:
            if not isinstance(message, Hello) or self.hello_received:
                self._refuse("protocol", "the first message must be a hello", CLOSE_PROTOCOL)
                return None
            self.hello_received = True
            return self._hello(message)
        provider = self.provider
        if isinstance(message, Heartbeat):
            self.registry.heartbeat(provider, self, message)
            return None
        if isinstance(message, SessionEvent):
            return self.registry.session_event(provider, message)
        if isinstance(message, Usage):
            return self._usage(provider, message)
        if isinstance(message, (SettlementSignature, SettlementRefused)):
            self.registry.settlement_reply(provider, message)
            return None
        if isinstance(message, GetEnvironment):
            return self._environment(provider, message.sha256)
        if isinstance(message, (GpuCommitment, GpuRefused, GpuOpening)):
            if self.registry.gpu_replies is not None:
                self.registry.gpu_replies(provider, message)
            return None
        self._refuse(
            "protocol", f"a provider may not send {message.type!r} messages", CLOSE_PROTOCOL
        )
        return None

    async def _hello(self, hello: Hello) -> None:
        try:
            key = verify_provider_hello(
                hello.pubkey, hello.signature, self.coordinator, self._nonce
            )
        except AuthError as exc:
            self.log.warning("provider link refused: %s", exc)
            self._refuse("auth", str(exc), CLOSE_BAD_SIGNATURE)
            return
        try:
            welcome, follow_up = await self.registry.connect(str(key), self, hello)
        except ProtocolError as exc:
            self._refuse("protocol", str(exc), CLOSE_PROTOCOL)
            return
        self.provider = str(key)
        self.port.send(welcome.to_json())
        early, self._before_welcome = self._before_welcome or [], None
        for message in follow_up:
            self.send(message)
        for text in early:
            self.port.send(text)

    async def _usage(self, provider: str, usage: Usage) -> None:
        try:
            await self.registry.usage_report(provider, usage)
        except AuthError as exc:
            self.log.warning("usage report refused from %s: %s", provider, exc)

    async def _environment(self, provider: str, sha256: str) -> None:
        """Answer ``get_environment``: the requirements text, only to a provider that hosts a
        live lease of a cohort whose environment it is, and only text that hashes to
        ``sha256`` and fits :data:`MAX_REQUIREMENTS_SIZE`."""
        store = self.registry.store
        text: str | None = None
        for cohort_id in {
            lease.cohort_id
            for lease in await store.live_leases(provider_pubkey=provider)
            if lease.cohort_id is not None
        }:
            cohort = await store.get_cohort(cohort_id)
            if cohort is not None and cohort.environment_sha256 == sha256:
                text = cohort.requirements
                break
        if text is None:
            reason = "no live lease of this provider runs a cohort with that environment"
        elif environment_sha256(text) != sha256:
            reason = "the stored requirements no longer match their hash"
            text = None
        elif len(text.encode()) > MAX_REQUIREMENTS_SIZE:
            reason = f"the requirements are larger than {MAX_REQUIREMENTS_SIZE} bytes"
            text = None
        if text is None:
            self.log.warning("environment %s refused to %s: %s", sha256[:12], provider, reason)
            self.send(EnvironmentRefused(sha256, reason))
        else:
            self.send(Environment(sha256, text))

    def closed(self, code: int | None) -> None:
        """The websocket closed (``code`` as the provider sent it, if any)."""
        self._closing = True
        if self.provider is not None:
            self.registry.disconnected(self.provider, self, code)

    def _refuse(self, code: str, message: str, close_code: int) -> None:
        self.port.send(ErrorMessage(code, message).to_json())
        self.close(close_code, message.encode()[:120].decode(errors="ignore"))


class LinkConnection:
    """One provider link on a socket taken over from tornado: the ``websockets`` library's
    sans-I/O protocol turns bytes into messages for a :class:`ProviderLinkSession`, and the
    session's messages into bytes (see :mod:`~jupyter_io.coordinator.sockets`).

    Messages are handed to the session one at a time: while one is being handled (a hello,
    a session event, a usage report), reading pauses, so a provider's messages keep their
    order. Make one per upgraded request and :meth:`start` it; :attr:`closed` is set once its
    TCP connection is gone.

    Until the hello is verified messages are limited to :data:`MAX_HELLO_SIZE` (checked from
    a frame's header, before its payload is buffered) and ``slot``, the connection's place
    among those in their handshake, is held; then :data:`MAX_MESSAGE_SIZE` applies and the
    slot is released.
    """

    channel: Channel

    def __init__(
        self,
        registry: Registry,
        *,
        coordinator: Pubkey,
        hello_timeout: float = 10.0,
        log: logging.Logger | None = None,
        on_closed: Callable[[LinkConnection], None] | None = None,
        slot: HandshakeSlot | None = None,
    ) -> None:
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.on_closed = on_closed
        self.slot = slot
        self.ws = WebSocketProtocol(Side.SERVER, state=State.OPEN, max_size=MAX_HELLO_SIZE)
        self.session = ProviderLinkSession(registry, self, coordinator=coordinator, log=self.log)
        self.hello_timeout = hello_timeout
        #: Set when the TCP connection has ended.
        self.closed = asyncio.Event()
        self._queue: deque[str | bytes] = deque()
        self._busy = False
        self._fragments: list[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: True once the TCP connection is gone; ``_close_code`` is the peer's (None: no
        #: close frame).
        self._lost = False
        self._close_code: int | None = None
        #: Seconds between the pings that measure the link's round trip.
        self.ping_interval = max(0.1, float(getattr(registry, "heartbeat_interval", 5.0)))
        self._ping: tuple[bytes, float] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None

    async def start(self, stream: IOStream) -> None:
        """Take over ``stream`` (upgrade answered), send the challenge, start the hello timer."""
        await adopt(stream, self)
        self.session.open()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.hello_timeout, self._no_hello)

    def _no_hello(self) -> None:
        if not self.session.hello_received:
            self.close(CLOSE_BAD_SIGNATURE, "no hello in time")

    # -- LinkPort --------------------------------------------------------------------------

    def send(self, text: str) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_text(text.encode())
            self._flush()

    def close(self, code: int, reason: str) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._flush()
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(CLOSE_TIMEOUT, self.channel.abort)

    # -- ChannelListener -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        self._flush()  # pongs, the answer to a close frame
        for event in events:
            if not isinstance(event, Frame):
                continue
            opcode, payload = event.opcode, bytes(event.data)
            if opcode is Opcode.PONG:
                self._pong(payload)
                continue
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if event.fin:
                    self._queue.append(_text(payload) if opcode is Opcode.TEXT else payload)
                else:
                    self._fragments = [payload]
            elif opcode is Opcode.CONT and self._fragments is not None:
                self._fragments.append(payload)
                if event.fin:
                    self._queue.append(_text(b"".join(self._fragments)))
                    self._fragments = None
        if self._queue:
            self._next()

    def drained(self) -> None:
        pass  # the link's messages are small; nothing waits for the buffer to drain

    def connection_lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        if self.slot is not None:
            self.slot.release()
        self.ws.receive_eof()
        received = self.ws.close_rcvd
        self._lost = True
        self._close_code = received.code if received is not None else None
        if not self.session.hello_received:
            self._queue.clear()  # nothing from an unauthenticated peer is worth finishing
        # What an authenticated provider sent before closing is handled first (a host that
        # shuts down sends its last usage reports and session ends, then says goodbye);
        # the session hears of the close after them.
        self._next()
        self._finish()

    def _finish(self) -> None:
        if not self._lost or self._busy or self._queue or self.closed.is_set():
            return
        self.session.closed(self._close_code)
        self.closed.set()
        if self.on_closed is not None:
            self.on_closed(self)

    def abort(self) -> None:
        """Cut the TCP connection now (coordinator shutdown, after the close timeout)."""
        if hasattr(self, "channel"):
            self.channel.abort()

    # -- the link's round trip (the relay's hop to the provider) -------------------------

    def _send_ping(self) -> None:
        """Ping the provider (its websocket answers with a pong) and schedule the next one; a
        ping still unanswered by then makes the hop unknown."""
        if self.ws.state is not State.OPEN:
            return
        if self._ping is not None:
            self.session.round_trip_ms = None
        loop = asyncio.get_running_loop()
        payload = new_nonce()[:8]
        self._ping = (payload, loop.time())
        self.ws.send_ping(payload)
        self._flush()
        self._ping_timer = loop.call_later(self.ping_interval, self._send_ping)

    def _pong(self, payload: bytes) -> None:
        sent = self._ping
        if sent is None or payload != sent[0]:
            return  # unsolicited, or the answer to a ping given up on
        self._ping = None
        self.session.round_trip_ms = (asyncio.get_running_loop().time() - sent[1]) * 1000.0

    # -- internals -------------------------------------------------------------------------

    def _flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.channel.write(data)
            else:  # the closing handshake is over: the server closes the TCP connection
                self.channel.close()

    def _next(self) -> None:
        while self._queue and not self._busy:
            pending = self.session.receive(self._queue.popleft())
            if pending is not None:
                self._busy = True
                if not self._lost:
                    self.channel.pause_reading()
                asyncio.ensure_future(pending).add_done_callback(self._handled)

    def _handled(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("provider link message failed", exc_info=task.exception())
        self._busy = False
        if self.ws.max_message_size == MAX_HELLO_SIZE and self.session.provider is not None:
            # The hello checked out: the link's own limit from the next frame on (the
            # reader sizes a frame when its first byte arrives; reading was paused).
            self.ws.max_message_size = MAX_MESSAGE_SIZE
            if self.slot is not None:
                self.slot.release()
            if not self._lost:
                self._send_ping()
        if not self._lost:
            self.channel.resume_reading()
        self._next()
        self._finish()


def _text(data: bytes) -> str | bytes:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data  # the session refuses non-text
