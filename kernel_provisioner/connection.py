"""The client end of one tunnel session: handshake, resume, and the remote kernel's state.

A :class:`TunnelClient` owns one session with a provider host for as long as the kernel
lives: one :class:`~jupyter_io.protocol.Tunnel` and one :class:`~jupyter_io.bridge.Bridge`
across any number of websocket connections. Call :meth:`TunnelClient.open` once (or
:meth:`TunnelClient.open` with ``resume=`` to reattach to a session another process
started), then :meth:`launch`, :meth:`signal`, :meth:`wait_exited`, and finally
:meth:`end` (the session is over) or :meth:`close` (leave it running for a reattach).

When the websocket drops, a background task reconnects with exponential backoff (0.1 s
doubling to 5 s) for ``grace_period`` seconds and resumes with HELLO.session and the
number of frames received, so each end replays exactly what the other missed: nothing is
lost or duplicated. While it is away the kernel's state is *unknown*, never *exited*
(:attr:`exit_code` stays None). The session is declared dead when the host answers
``unknown_session`` (it lost the kernel), refuses connections for ``refused_limit``
seconds (it is down, and its kernels died with it), refuses our key, or stays unreachable
for the whole grace period.

Through a coordinator (a lease), each connection presents :class:`Credentials`: the lease
token, carried in HELLO, and for the coordinator's relay the ``X-JIO-Lease-Token`` header. A
``credentials`` callback supplies them afresh for every connection, so a long session renews
its token before resuming. Through the relay a refused connection means the *coordinator* is
down, not the provider (``refused_limit=None`` then), and the relay's HTTP refusals say
whether resuming still makes sense: 403, 404 and 410 (the lease is gone) end the session, a
401 asks for a fresh token once. A relayed tunnel may be given ``alternates``: the same relay
path on the coordinator's other replicas (:func:`jupyter_io.coordinator_urls.relay_urls`);
when a resume cannot reach the relay it uses (refused, timed out, dropped, or answered 5xx),
the next one goes to the next of them, so a tunnel whose relay died resumes through another.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import zmq.asyncio
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from jupyter_io.bridge import Bridge
from jupyter_io.errors import (
    AuthError,
    JupyterIOError,
    KernelLaunchError,
    ProtocolError,
    TunnelError,
    VersionMismatch,
)
from jupyter_io.identity import parse_pubkey, sign_challenge
from jupyter_io.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HANDSHAKE_MAX_FRAME_SIZE,
    HEADER,
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    TUNNEL_PATH,
    Channel,
    CloseCode,
    Frame,
    FrameKind,
    Progress,
    Tunnel,
    decode_frame,
    encode_control,
)
from jupyter_io.tls import SchemeMismatch, dial_checked, scheme_mismatch, untrusted_certificate

__all__ = [
    "LOST_EXIT_CODE",
    "CredentialSource",
    "Credentials",
    "KernelState",
    "KernelStatus",
    "Started",
    "TunnelClient",
    "UnknownSession",
    "tunnel_url",
]


#: The exit code reported for a kernel whose host was lost (it died with the host, or the
#: host forgot it). Negative like a signal death, and distinct from any real signal.
LOST_EXIT_CODE = -1000

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0

#: ERROR codes after which resuming is pointless.
_FATAL_ERRORS = frozenset({"unknown_session", "auth", "version_mismatch", "lease_in_use"})
#: HTTP answers of the relay after which resuming is pointless: not this lease's user (403),
#: no such lease (404), the lease ended or failed (410).
_FATAL_HTTP = frozenset({403, 404, 410})
#: Close codes after which resuming is pointless.
_FATAL_CLOSES = frozenset(
    {
        CloseCode.UNKNOWN_SESSION,
        CloseCode.POLICY_VIOLATION,
        CloseCode.VERSION_MISMATCH,
        CloseCode.BUFFER_OVERFLOW,
    }
)


def tunnel_url(url: str) -> str:
    """A provider's tunnel URL as users may write it: ``ws://HOST:PORT`` (or ``wss://``)
    means ``ws://HOST:PORT/tunnel``; a URL with a path (the full tunnel URL, a relay's) is
    kept as it is."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() in ("ws", "wss") and parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, TUNNEL_PATH, parts.query, ""))
    return url.strip()


class UnknownSession(TunnelError):
    """The provider does not know the session (it ended, expired, or the host restarted)."""


@dataclass(frozen=True)
class Credentials:
    """What one connection presents besides our key's signature.

    ``token``: the coordinator's signed lease token, sent in HELLO (None without a lease).
    ``headers``: extra HTTP headers of the websocket upgrade (the relay's lease token).
    """

    token: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


#: Called before every connection; the argument is True when the last attempt was refused
#: for its token (HTTP 401), so a fresh one is needed.
CredentialSource = Callable[[bool], Awaitable[Credentials]]


class KernelState(str, enum.Enum):
    """What the host last said about the session's kernel."""

    NONE = "none"
    RUNNING = "running"
    EXITED = "exited"


@dataclass
class KernelStatus:
    """The remote kernel as far as this end knows (updated from STARTED / EXITED)."""

    state: KernelState = KernelState.NONE
    generation: int = 0
    pid: int | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class Started:
    """The answer to a successful LAUNCH."""

    generation: int
    pid: int | None
    #: Environment variables the provider refused to set for the kernel.
    ignored_env: tuple[str, ...] = ()


class _AdoptingTunnel(Tunnel):
    """A :class:`Tunnel` that can take over a session another process started.

    A reattaching process has lost the old process's counters: it learns from WELCOME how
    many frames the host received (and continues numbering after them), and skips ahead
    to the first frame the host still holds for it (frames before it were acknowledged to
    the old process and delivered to its clients, which are gone).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resync = False

    def adopt(self, host_received: int, received: int) -> None:
        """Continue a session whose host received ``host_received`` frames from us."""
        self.sent = self.peer_acked = host_received
        self.received = received
        self._resync = True

    def receive(self, data: bytes, *, views: bool = False) -> Frame | None:
        if self._resync and len(data) >= HEADER.size:
            seq = HEADER.unpack_from(data)[3]
            if seq:
                self._resync = False
                if seq > self.received + 1:
                    self.received = seq - 1
        return super().receive(data, views=views)


class TunnelClient:
    """One tunnel session from the provisioner's facade to a provider host's kernel.

    ``outbound`` and ``inbound`` are the facade's sockets (see
    :class:`kernel_provisioner.facade.Facade`). All methods must run on the event loop
    that called :meth:`open`.
    """

    def __init__(
        self,
        url: str,
        keypair: Keypair,
        *,
        outbound: Mapping[Channel, zmq.asyncio.Socket],
        inbound: Mapping[Channel, zmq.asyncio.Socket],
        host_pubkey: Pubkey | None = None,
        credentials: CredentialSource | None = None,
        grace_period: float = 120.0,
        connect_timeout: float = 10.0,
        refused_limit: float | None = 3.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        alternates: Sequence[str] = (),
    ) -> None:
        """``on_progress`` hears each PROGRESS frame (a step of the start the provider works
        on before STARTED, e.g. building a course environment). ``alternates``: other URLs
        of the same tunnel (a relayed lease's relay on the coordinator's other replicas) a
        resume moves to when it cannot reach the current one."""
        self.url = tunnel_url(url)
        #: Where this tunnel may connect, :attr:`url` first (it moves along on resumes).
        self.urls: tuple[str, ...] = tuple(
            dict.fromkeys([self.url, *(tunnel_url(u) for u in alternates)])
        )
        self.on_progress = on_progress
        # Set by a PROGRESS frame: when the launch's own timeout starts counting again
        # (after the step's timeout while it runs, from its end once it is over).
        self._launch_grace: float | None = None
        self.keypair = keypair
        self.host_pubkey = host_pubkey
        self.credentials = credentials
        self.grace_period = grace_period
        self.connect_timeout = connect_timeout
        self.refused_limit = refused_limit
        self.max_frame_size = max_frame_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.log = log or logging.getLogger(__name__)
        self.tunnel = _AdoptingTunnel(max_frame_size=max_frame_size)
        self.bridge = Bridge(
            self.tunnel,
            outbound=outbound,
            inbound=inbound,
            on_control=self._on_control,
            log=self.log,
        )
        #: The host's id for this session (from WELCOME).
        self.session_id: str | None = None
        #: The kernel as the host last reported it.
        self.kernel = KernelStatus()
        #: Why the session is over for good (None while it may continue).
        self.dead_reason: str | None = None
        #: True once the host confirmed END (closed with 4010).
        self.ended = False
        #: True when a resume was answered 410 Gone because the lease "is ended" (its user,
        #: its budget or a class's rule ended it; a lost provider's lease "is failed"): the
        #: session ended on purpose.
        self.gone = False
        #: Number of times a dropped websocket was resumed.
        self.resumes = 0
        self._ws: ClientConnection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._launch_answer: Frame | None = None
        #: The LAUNCH body :meth:`open` sent behind HELLO, until :meth:`launch` claims it.
        self._pipelined_launch: dict[str, Any] | None = None
        self._fatal_error: str | None = None
        self._stale_token = False
        #: What the host's WELCOME says it speaks beyond the base protocol ("files").
        self.features: frozenset[str] = frozenset()
        #: Handles FILES and FILE_CHUNK frames (the file channel); None: they are refused.
        self.on_files: Callable[[Frame], Awaitable[None]] | None = None
        #: False: LAUNCH asks the host for a kernel without the state journal.
        self.journal = True

    # -- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a handshaken websocket is attached (False during a partition)."""
        return self._ws is not None

    @property
    def round_trip_ms(self) -> float | None:
        """The tunnel's round trip from its keepalive pings, ms: the last ping's, or how long
        the ping in flight has waited if that is longer (a stalled link shows at once, not
        only when its pong finally comes). None while disconnected or before the first pong.
        """
        ws = self._ws
        if ws is None:
            return None
        latency = ws.latency * 1000.0 if ws.latency > 0 else None
        pending = [sent for _, sent in ws.pending_pings.values()]
        if latency is not None and pending:
            return max(latency, (ws.loop.time() - min(pending)) * 1000.0)
        return latency

    @property
    def alive(self) -> bool:
        """True until the session is declared dead or ended."""
        return self.dead_reason is None and not self.ended

    @property
    def exit_code(self) -> int | None:
        """The kernel's exit code once it is known to have ended, else None.

        None while the kernel runs *and* while the tunnel is down: a partition is not an
        exit. :data:`LOST_EXIT_CODE` once the host is declared lost.
        """
        if self.kernel.state is KernelState.EXITED:
            return LOST_EXIT_CODE if self.kernel.exit_code is None else self.kernel.exit_code
        if not self.alive:
            return LOST_EXIT_CODE
        return None

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate()`` holds after a state change; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                return predicate()
        return True

    # -- opening ---------------------------------------------------------------------------

    async def open(
        self,
        *,
        resume: str | None = None,
        received: int = 0,
        launch: tuple[str, Mapping[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Connect, prove our key, and start serving the session; return the WELCOME body.

        ``resume`` reattaches to an existing session (``received``: the last frame the
        previous owner recorded). ``launch`` (``(key, env)``, new sessions only) sends the
        kernel's LAUNCH right behind HELLO rather than a round trip after WELCOME, which
        saves one network round trip on every kernel start; :meth:`launch` with the same
        arguments then only waits for the answer. Raises :class:`AuthError` (key refused),
        :class:`TunnelError` (unknown session, no capacity, host unreachable) or
        :class:`VersionMismatch`, each with the URL and what to check.
        """
        if resume is not None:
            self.tunnel.received = received
        elif launch is not None:
            # Kept by the tunnel like any frame sent while detached: the handshake sends it
            # behind HELLO, and the replay after WELCOME repeats it, which the host drops
            # as a duplicate (it acknowledges nothing before WELCOME).
            body = _launch_body(*launch, journal=self.journal)
            self._launch_answer = None
            self.tunnel.send_control(FrameKind.LAUNCH, body)
            self._pipelined_launch = body
        try:
            ws, welcome = await self._connect_once(resume)
        except JupyterIOError:
            raise
        except InvalidStatus as exc:
            raise self._refused_upgrade(exc, first=True) from None
        except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
            # ws:// to a TLS host: it drops the connection at once.
            reason = untrusted_certificate(exc) or await scheme_mismatch(self.url)
            if reason is None:
                reason = (
                    f"{_describe(exc)}; check that the provider host is running and "
                    f"provider_url is right"
                )
            raise TunnelError(
                f"cannot open a tunnel to the provider at {self.url}: {reason}"
            ) from None
        if resume is not None:
            if not welcome.get("resumed"):
                await ws.close()
                raise UnknownSession(f"provider at {self.url} no longer has session {resume}")
            self.tunnel.adopt(int(welcome.get("received", 0)), received)
        self.session_id = str(welcome["session"])
        features = welcome.get("features")
        if isinstance(features, list):
            self.features = frozenset(f for f in features if isinstance(f, str))
        self._apply_kernel_report(welcome.get("kernel"))
        try:
            await self._attach(ws, welcome)
        except ConnectionClosed:
            self._ws = None
            raise TunnelError(
                f"the tunnel to {self.url} closed right after the handshake; try again"
            ) from None
        self.bridge.start()
        self._supervisor = asyncio.create_task(self._supervise(ws))
        return welcome

    async def _connect_once(self, resume: str | None) -> tuple[ClientConnection, dict[str, Any]]:
        return await asyncio.wait_for(self._connect_and_greet(resume), self.connect_timeout)

    async def _connect_and_greet(
        self, resume: str | None
    ) -> tuple[ClientConnection, dict[str, Any]]:
        credentials = Credentials()
        if self.credentials is not None:
            stale, self._stale_token = self._stale_token, False
            credentials = await self.credentials(stale)
        dial = connect(
            self.url,
            additional_headers=dict(credentials.headers) or None,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            compression=None,
            max_size=self.max_frame_size,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            open_timeout=self.connect_timeout,
            close_timeout=2.0,
        )
        if self.session_id is not None:
            ws = await dial  # a resume: this URL spoke TLS (or not) before
        else:
            try:
                # wss:// to a plain host would wait out the handshake's timeout in silence.
                ws = await dial_checked(self.url, dial)
            except SchemeMismatch as exc:
                raise TunnelError(
                    f"cannot open a tunnel to the provider at {self.url}: {exc}"
                ) from None
        try:
            welcome = await self._handshake(ws, resume, credentials.token)
        except BaseException:
            # A failed handshake has nothing to say goodbye for; drop the socket now.
            ws.transport.abort()
            raise
        return ws, welcome

    async def _handshake(
        self, ws: ClientConnection, resume: str | None, token: str | None
    ) -> dict[str, Any]:
        challenge = await self._recv_handshake(ws, FrameKind.CHALLENGE)
        version = challenge.get("version")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"provider at {self.url} speaks tunnel protocol version {version}, this "
                f"client speaks {PROTOCOL_VERSION}; upgrade the older side"
            )
        try:
            nonce = bytes.fromhex(challenge["nonce"])
            host = parse_pubkey(challenge["host"])
        except (KeyError, TypeError, ValueError, JupyterIOError):
            raise ProtocolError("malformed CHALLENGE from the provider") from None
        if self.host_pubkey is not None and host != self.host_pubkey:
            raise AuthError(
                f"provider at {self.url} identifies as {host}, not the expected "
                f"{self.host_pubkey}; check provider_pubkey or the URL"
            )
        hello = {
            "version": PROTOCOL_VERSION,
            "pubkey": str(self.keypair.pubkey()),
            "signature": str(sign_challenge(self.keypair, nonce, host)),
            "session": resume,
            "received": self.tunnel.received,
            "token": token,
        }
        await ws.send(encode_control(FrameKind.HELLO, hello))
        if resume is None:
            # A new session: frames kept before it existed (a pipelined LAUNCH) need not
            # wait for WELCOME. The host reads them once it has welcomed us, but takes none
            # over HANDSHAKE_MAX_FRAME_SIZE before that: from the first that is bigger on,
            # they wait for the replay after WELCOME.
            for frame in self.tunnel.replay(self.tunnel.peer_acked):
                if len(frame) > HANDSHAKE_MAX_FRAME_SIZE:
                    break
                await ws.send(frame)
        return await self._recv_handshake(ws, FrameKind.WELCOME)

    async def _recv_handshake(self, ws: ClientConnection, kind: FrameKind) -> dict[str, Any]:
        message = await ws.recv()
        if isinstance(message, str):
            raise ProtocolError("text message during the tunnel handshake")
        frame = decode_frame(message, self.max_frame_size)
        if frame.kind is FrameKind.ERROR:
            raise self._error_from(frame.body)
        if frame.kind is not kind:
            raise ProtocolError(f"expected {kind.name} from the provider, got {frame.kind.name}")
        return frame.body

    def _error_from(self, body: dict[str, Any]) -> JupyterIOError:
        code = body.get("code")
        reason = body.get("reason") or "no reason given"
        where = f"provider at {self.url}"
        if code == "auth":
            return AuthError(
                f"{where} refused key {self.keypair.pubkey()}: {reason}; ask the provider to "
                f"allow this key or point keypair_path at an allowed one"
            )
        if code == "version_mismatch":
            return VersionMismatch(f"{where}: {reason}; upgrade the older side")
        if code == "unknown_session":
            return UnknownSession(f"{where} no longer has this session: {reason}")
        if code == "capacity":
            return TunnelError(f"{where} is full: {reason}; try again later or another one")
        if code == "lease_in_use":
            return AuthError(f"{where} refused the lease: {reason}; request a new lease")
        return TunnelError(f"{where} refused the tunnel ({code}): {reason}")

    def _refused_upgrade(self, exc: InvalidStatus, *, first: bool = False) -> JupyterIOError:
        """The error for an HTTP answer instead of a websocket (the relay checks the lease
        token before upgrading), with the message of its JSON error body, or the provider
        host's text, when there is one. ``first``: the first connection of the session, so
        an answer neither of them gives means the URL names some other server."""
        response = exc.response
        status = response.status_code
        body = bytes(response.body or b"")
        message: str | None = None
        try:
            message = str(json.loads(body)["error"]["message"])  # the relay's
        except (ValueError, TypeError, KeyError, RecursionError):
            server = str(response.headers.get("Server", ""))
            text = body.decode("utf-8", "replace").strip()
            if "websockets/" in server or text.startswith(f"the tunnel is at {TUNNEL_PATH}"):
                message = text or response.reason_phrase  # the provider host's
            elif first and status < 500 and status not in (401, 403, 429):
                return TunnelError(
                    f"{self.url} answered, but it is not a jupyter-io provider or relay "
                    f"(HTTP {status}); check the URL/port (a provider prints it: "
                    f"'jupyter-io provider listening on ws://HOST:PORT{TUNNEL_PATH}')"
                )
        if not message:
            message = response.reason_phrase or "no reason given"
        text = f"{self.url} answered HTTP {status}: {message}"
        if status in (401, 403):
            return AuthError(text)
        return TunnelError(text)

    # -- the session -----------------------------------------------------------------------

    async def _attach(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        """Adopt a handshaken websocket; the bridge replays what the host missed, then goes live."""
        self._ws = ws
        await self.bridge.attach(ws, int(welcome.get("received", 0)))
        self._notify()

    async def _supervise(self, ws: ClientConnection) -> None:
        try:
            while True:
                await self.bridge.serve(ws)
                self._ws = None
                self._notify()
                if self._session_over(ws):
                    return
                self.log.warning(
                    "tunnel to %s dropped (%s); resuming session %s",
                    self.url,
                    _close_text(ws),
                    self.session_id,
                )
                reconnected = await self._reconnect()
                if reconnected is None:
                    return
                ws, welcome = reconnected
                await self._attach(ws, welcome)
                self.resumes += 1
                self._apply_kernel_report(welcome.get("kernel"))
                self.log.info("tunnel session %s resumed", self.session_id)
        except Exception as exc:  # a bug here must not leave a zombie session behind
            self.log.exception("tunnel supervisor failed")
            self._declare_dead(f"tunnel supervisor failed: {exc!r}")
        finally:
            self._ws = None
            await self.bridge.stop()
            self._notify()

    def _session_over(self, ws: ClientConnection) -> bool:
        if self.bridge.failure is not None:
            self._declare_dead(f"tunnel failed: {self.bridge.failure}")
            return True
        code = ws.close_code
        if code == CloseCode.SESSION_ENDED:
            self.ended = True
            self._notify()
            return True
        if self._fatal_error is not None:
            self._declare_dead(self._fatal_error)
            return True
        if code in _FATAL_CLOSES:
            self._declare_dead(f"provider closed the session: {_close_text(ws)}")
            return True
        return False

    async def _reconnect(self) -> tuple[ClientConnection, dict[str, Any]] | None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        delay = _BACKOFF_FIRST
        refused_since: float | None = None
        token_renewed = False
        while True:
            try:
                ws, welcome = await self._connect_once(self.session_id)
            except (AuthError, VersionMismatch, UnknownSession) as exc:
                self._declare_dead(str(exc))
                return None
            except InvalidStatus as exc:
                refused_since = None
                status = exc.response.status_code
                if status in _FATAL_HTTP or (status == 401 and token_renewed):
                    reason = str(self._refused_upgrade(exc))
                    # "lease ... is ended" (not "is failed": a lost provider's lease)
                    self.gone = status == 410 and " is ended" in reason
                    self._declare_dead(reason)
                    return None
                if status == 401:
                    # Most likely an expired token: one more try with a fresh one.
                    self._stale_token = token_renewed = True
                self.log.info("resume refused: %s", self._refused_upgrade(exc))
                if status >= 500:  # a proxy whose coordinator behind it is gone
                    self._next_url()
            except TunnelError as exc:
                refused_since = None
                self.log.info("resume refused: %s", exc)
            except (
                OSError,
                asyncio.TimeoutError,
                WebSocketException,
                ProtocolError,
            ) as exc:
                now = loop.time()
                if _is_refusal(exc) and self.refused_limit is not None:
                    refused_since = now if refused_since is None else refused_since
                    if now - refused_since >= self.refused_limit:
                        self._declare_dead(
                            f"provider at {self.url} refuses connections (for "
                            f"{now - refused_since:.1f} s); it is down and its kernel with it"
                        )
                        return None
                else:
                    refused_since = None
                self.log.debug("resume attempt failed: %s", _describe(exc))
                self._next_url()
            else:
                if welcome.get("resumed") is False:
                    await ws.close()
                    self._declare_dead(f"provider at {self.url} lost session {self.session_id}")
                    return None
                return ws, welcome
            elapsed = loop.time() - start
            if elapsed >= self.grace_period:
                self._declare_dead(
                    f"provider at {self.url} unreachable for {elapsed:.0f} s, longer than the "
                    f"grace period of {self.grace_period:g} s"
                )
                return None
            await asyncio.sleep(min(delay, self.grace_period - elapsed))
            delay = min(delay * 2, _BACKOFF_MAX)

    def _next_url(self) -> None:
        """Move the next resume to the next of :attr:`urls` (nothing with only one)."""
        if len(self.urls) > 1:
            index = self.urls.index(self.url) if self.url in self.urls else -1
            self.url = self.urls[(index + 1) % len(self.urls)]
            self.log.info("tunnel session %s: resuming through %s", self.session_id, self.url)

    def declare_lost(self, reason: str) -> None:
        """Declare the host lost on another party's word (the coordinator failed the lease
        while this tunnel is down): :attr:`exit_code` turns LOST and waiters wake, without
        waiting for the grace period."""
        self._declare_dead(reason)

    def _declare_dead(self, reason: str) -> None:
        if self.dead_reason is None and not self.ended:
            self.dead_reason = reason
            self.log.error("remote kernel declared dead: %s", reason)
        self._notify()

    # -- control frames --------------------------------------------------------------------

    def _on_control(self, frame: Frame) -> Awaitable[None] | None:
        kind = frame.kind
        if kind is FrameKind.FILES or kind is FrameKind.FILE_CHUNK:
            if self.on_files is None:
                raise ProtocolError(f"{kind.name} frame, and no file channel was asked for")
            return self.on_files(frame)
        if kind is FrameKind.STARTED:
            body = frame.body
            self.kernel = KernelStatus(
                KernelState.RUNNING, _generation(body), _optional_int(body, "pid"), None
            )
            self._launch_answer = frame
        elif kind is FrameKind.EXITED:
            body = frame.body
            generation = _generation(body)
            exit_code = _optional_int(body, "exit_code")
            if "error" in body or (exit_code is None and generation > self.kernel.generation):
                self._launch_answer = frame
            elif generation >= self.kernel.generation:
                self.kernel = KernelStatus(
                    KernelState.EXITED, generation, self.kernel.pid, exit_code
                )
                reason = body.get("reason")
                if isinstance(reason, str) and reason:
                    # The host stopped it (out of memory, a full workspace): say why, once.
                    self.log.warning(
                        "remote kernel (generation %d) was stopped by the provider: %s",
                        generation,
                        reason[:300],
                    )
                else:
                    self.log.info("remote kernel (generation %d) exited: %s", generation, exit_code)
        elif kind is FrameKind.PROGRESS:
            self._on_progress(frame)
        elif kind is FrameKind.ERROR:
            body = frame.body
            self.log.warning("provider error: %s", body)
            if body.get("code") in _FATAL_ERRORS:
                self._fatal_error = str(self._error_from(body))
        else:
            raise ProtocolError(f"{kind.name} is not a frame the provider sends")
        self._notify()
        return None

    def _on_progress(self, frame: Frame) -> None:
        try:
            progress = Progress.parse(frame.body)
        except ProtocolError as exc:  # only news: the launch's answer still comes
            self.log.warning("ignoring a malformed PROGRESS frame: %s", exc)
            return
        now = asyncio.get_running_loop().time()
        if progress.state == "building" and progress.timeout is not None:
            self._launch_grace = now + progress.timeout
        else:
            self._launch_grace = now
        if self.on_progress is not None:
            self.on_progress(progress)

    def _launch_remaining(self, start: float, timeout: float) -> float:
        base = start if self._launch_grace is None else max(start, self._launch_grace)
        return base + timeout - asyncio.get_running_loop().time()

    def _apply_kernel_report(self, report: Any) -> None:
        # WELCOME's summary; the reliable STARTED/EXITED frames replayed after it are the
        # authority, this only fills in what a reattaching process never saw.
        if not isinstance(report, dict):
            return
        try:
            generation = _generation(report)
            _optional_int(report, "exit_code")
        except ProtocolError as exc:  # only a summary: the reliable frames still follow
            self.log.warning("ignoring the provider's kernel summary: %s", exc)
            return
        state = report.get("state")
        if generation < self.kernel.generation:
            return
        if state == KernelState.RUNNING and self.kernel.state is KernelState.NONE:
            self.kernel = KernelStatus(KernelState.RUNNING, generation, self.kernel.pid, None)
        elif state == KernelState.EXITED and generation >= self.kernel.generation:
            if self.kernel.state is not KernelState.EXITED or generation > self.kernel.generation:
                code = _optional_int(report, "exit_code")
                self.kernel = KernelStatus(KernelState.EXITED, generation, self.kernel.pid, code)

    # -- commands --------------------------------------------------------------------------

    async def launch(self, key: str, env: Mapping[str, str], timeout: float) -> Started:
        """Start (or restart) the session's kernel; return once the host says STARTED.

        Raises :class:`KernelLaunchError` with the host's reason, or when no answer comes
        within ``timeout`` seconds (the LAUNCH stays queued if the tunnel is down).
        """
        self._require_alive()
        body = _launch_body(key, env, journal=self.journal)
        pipelined, self._pipelined_launch = self._pipelined_launch, None
        if body != pipelined:  # else open() sent it already; its answer may even be here
            self._launch_answer = None
            await self.bridge.send_control(FrameKind.LAUNCH, body)
        # A step the provider reports (a course environment's build) holds the timeout off
        # for as long as it says it may take.
        start = asyncio.get_running_loop().time()
        self._launch_grace = None

        def answered() -> bool:
            return self._launch_answer is not None or not self.alive

        while not await self.wait_for(answered, max(0.0, self._launch_remaining(start, timeout))):
            if self._launch_remaining(start, timeout) <= 0:
                break
        if not answered():
            raise KernelLaunchError(
                f"provider at {self.url} did not start the kernel within {timeout:g} s; "
                f"raise launch_timeout if the provider is slow to start kernels"
            )
        answer = self._launch_answer
        if answer is None:
            raise KernelLaunchError(f"kernel launch failed: {self.dead_reason}")
        body = answer.body
        if answer.kind is FrameKind.EXITED:
            raise KernelLaunchError(
                f"provider at {self.url} could not start the kernel: "
                f"{body.get('error') or 'it exited during start-up'}"
            )
        ignored = body.get("ignored_env") or ()
        return Started(int(body.get("generation", 0)), body.get("pid"), tuple(map(str, ignored)))

    async def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel's process group (queued while disconnected)."""
        if self.alive:
            await self.bridge.send_control(FrameKind.SIGNAL, {"signum": int(signum)})

    async def wait_exited(self, timeout: float | None = None) -> int | None:
        """Wait until the kernel is known to have ended; return its exit code.

        Returns None if ``timeout`` passes first.
        """
        await self.wait_for(lambda: self.exit_code is not None, timeout)
        return self.exit_code

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until a websocket is attached (or the session is over)."""
        await self.wait_for(lambda: self.connected or not self.alive, timeout)
        return self.connected

    async def end(self, timeout: float = 5.0) -> bool:
        """End the session: the host kills the kernel and deletes its workspace.

        Waits up to ``timeout`` for the host's confirmation (a partitioned host never
        sees END and ends the session itself when its grace period runs out). Returns
        True when confirmed. Always releases the local side, as :meth:`close` does.
        """
        try:
            if self.alive:
                await self.bridge.send_control(FrameKind.END, {})
                await self.wait_for(lambda: not self.alive, timeout)
            return self.ended
        finally:
            await self.close()

    async def close(self) -> None:
        """Release the local side without ending the remote session (idempotent)."""
        ws, self._ws = self._ws, None
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if ws is not None:
            await ws.close()
        await self.bridge.stop()
        if self.alive:
            self.dead_reason = "closed by this client"
        self._notify()

    def _require_alive(self) -> None:
        if not self.alive:
            raise KernelLaunchError(f"the tunnel session is over: {self.dead_reason}")


def _is_refusal(exc: BaseException) -> bool:
    """True for 'nothing listens there' (the host is down), not for a dropped handshake."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    # asyncio reports every address it tried (localhost: ::1 and 127.0.0.1) in one OSError.
    return (
        type(exc) is OSError
        and exc.errno is None
        and str(exc).startswith("Multiple exceptions")
        and str(exc).count(f"[Errno {errno.ECONNREFUSED}]") >= 1
        and "[Errno" not in str(exc).replace(f"[Errno {errno.ECONNREFUSED}]", "")
    )


def _launch_body(key: str, env: Mapping[str, str], journal: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key, "signature_scheme": "hmac-sha256", "env": dict(env)}
    if not journal:
        body["journal"] = False  # the kernelspec's opt-out (jupyter_io.journal)
    return body


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close_text(ws: ClientConnection) -> str:
    code = ws.close_code
    reason = ws.close_reason
    return f"close {code}" + (f" {reason}" if reason else "")


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    """``body[name]`` as the integer (or null) the tunnel contract says it is; a provider that
    sends anything else (``"x"``, ``[]``, ``true``) breaks the contract (ProtocolError)."""
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise ProtocolError(f"the provider sent {name}={value!r}; the contract says an integer")
    return value


def _generation(body: Mapping[str, Any]) -> int:
    return _optional_int(body, "generation") or 0
