"""The provider's side of the provider link: join a marketplace coordinator and stay joined.

``docs/coordinator-contract.md`` section 1. :class:`CoordinatorLink` opens the outbound
websocket ``/api/v1/providers/connect`` (outbound, so NAT is no obstacle), answers the
challenge with the host's keypair, checks and pins the coordinator's key, sends the hello
(inventory and the leases it still hosts), then, while linked:

* heartbeats every ``heartbeat_interval`` the welcome names, with the host's load and the
  leases it hosts;
* sends what the host queued with :meth:`CoordinatorLink.send` (session events, signed usage
  reports) in order; what is queued while the link is down waits for the next link, and the
  leases of queued ``ended`` events are still listed in that hello so the coordinator ends
  them rather than failing them;
* hands ``dial``, ``end`` and ``sign_settlement`` to the host (:class:`LinkHost`), and
  ``gpu_challenge`` / ``gpu_reveal`` to its ``gpu_challenge`` method when it has one
  (:mod:`provider_host.challenge`);
* fetches a course environment's requirements text for the host
  (:meth:`CoordinatorLink.environment`: ``get_environment``, answered by ``environment``
  or ``environment_refused``), checking the text against its hash.

When the link drops it links again, listing the hosted leases so the coordinator keeps them
live; sessions and kernels are not touched meanwhile. Given several coordinator URLs
(replicas on one database, ``docs/coordinator-contract.md`` section 5), it starts at a random
one (providers spread over the replicas) and moves to the next one after every failed
attempt or dropped link, waiting 0.1 s between attempts for a whole round of the list, then
doubling the wait per round up to ``backoff_max`` (and to no more than 1 s for the first
10 s after a link drops); so when a replica dies its providers are linked to another within
a fraction of a second (well inside the 10 s the contract allows).
Every replica must present the same coordinator key (the one pinned). A ``dial`` is followed
only to a relay on one of the configured coordinators or on the linked one's host
(:func:`jupyter_io.coordinator_urls.dial_refusal`). Messages are the coordinator's own typed
classes (:mod:`jupyter_io.provider_link`).

Call :meth:`CoordinatorLink.start` once the host listens, and :meth:`CoordinatorLink.stop`
when it shuts down (after ending its sessions, so their last reports go out first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from jupyter_io.coordinator_urls import dial_refusal
from jupyter_io.errors import AuthError, KernelLaunchError, ProtocolError
from jupyter_io.identity import new_nonce
from jupyter_io.provider_link import (
    Challenge,
    Dial,
    End,
    Environment,
    EnvironmentRefused,
    ErrorMessage,
    GetEnvironment,
    GpuChallenge,
    GpuReveal,
    Heartbeat,
    Hello,
    Inventory,
    LinkMessage,
    SignSettlement,
    Welcome,
    parse_message,
)
from jupyter_io.signing import sign_provider_hello, verify_welcome
from jupyter_io.tls import SchemeMismatch, dial_checked, scheme_mismatch, untrusted_certificate

__all__ = ["MAX_OUTBOX", "RELINK_BUDGET", "CoordinatorLink", "LinkHost"]

#: Messages kept for the coordinator while the link is down (oldest dropped beyond).
MAX_OUTBOX = 10_000
#: Largest message accepted from the coordinator.
_MAX_MESSAGE = 1 << 20
_FIRST_BACKOFF = 0.1
#: Seconds after a link drops within which the provider must be linked again (issue 17's
#: budget for a replica's death); meanwhile no wait between attempts exceeds RELINK_WAIT.
RELINK_BUDGET = 10.0
RELINK_WAIT = 1.0


class LinkHost(Protocol):
    """What the link needs of the provider host."""

    def link_inventory(self) -> Inventory:
        """The inventory to publish in the hello."""

    def hosted_leases(self) -> frozenset[str]:
        """Lease ids whose sessions this host still serves."""

    def load(self) -> float:
        """How busy the host is, 0..1."""

    def coordinator_pinned(self, coordinator: Pubkey) -> None:
        """The link has authenticated to ``coordinator``: trust its lease tokens."""

    def dial(self, message: Dial) -> None:
        """Serve a tunnel on a websocket to the relay URL of ``message``."""

    def end_lease(self, message: End) -> None:
        """Stop the session of the lease ``message`` names."""

    def settle(self, message: SignSettlement) -> None:
        """Answer a settlement request (``settlement_signature`` or ``settlement_refused``,
        queued with :meth:`CoordinatorLink.send`)."""


class _Refused(Exception):
    """The coordinator answered the hello with an error, or is not the pinned one."""


class CoordinatorLink:
    """One provider's link to its coordinator (see the module docstring).

    ``url`` is the ``ws(s)://`` URL of the provider link, or the provider-link URLs of the
    coordinator's replicas (a sequence, or one text separating them with commas);
    ``coordinator`` the key to insist on (None: pin the first one that welcomes this host).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        keypair: Keypair,
        host: LinkHost,
        *,
        coordinator: Pubkey | None = None,
        backoff_max: float = 5.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        log: logging.Logger | None = None,
    ) -> None:
        urls = url.split(",") if isinstance(url, str) else list(url)
        #: The provider-link URLs, in the configured order.
        self.urls: tuple[str, ...] = tuple(u.strip() for u in urls if u.strip())
        if not self.urls:
            raise ValueError("CoordinatorLink needs at least one URL")
        # Where to start: a random replica, so providers spread over them.
        self._index = random.randrange(len(self.urls))
        self.keypair = keypair
        self.host = host
        #: The coordinator's key, once pinned (or as configured).
        self.coordinator = coordinator
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.log = log or logging.getLogger("provider_host")
        #: Set while the coordinator has welcomed this host on the current connection.
        self.linked = asyncio.Event()
        #: How many times this host has been welcomed (a relink counts again).
        self.links = 0
        #: Seconds between heartbeats, from the last welcome.
        self.heartbeat_interval: float | None = None
        #: Why the last attempt to link failed, or the link dropped (None after a welcome).
        self.last_error: str | None = None
        self._connection: ClientConnection | None = None
        # (JSON text, lease of a "session ended" event, lease of a usage report)
        self._outbox: deque[tuple[str, str | None, str | None]] = deque(maxlen=MAX_OUTBOX)
        self._queued = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        #: Requirements asked for and not answered yet, by hash (one request per hash).
        self._environments: dict[str, asyncio.Future[str]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start linking (and relinking) in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="coordinator-link")

    async def stop(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``flush_timeout`` s), close the link with 1001 and
        stop relinking."""
        self._stopping.set()
        if self.linked.is_set() and self._outbox:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained(), flush_timeout)
        ws = self._connection
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1001, "provider shutting down"), flush_timeout)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def url(self) -> str:
        """The provider-link URL this link uses now (the next attempt's, while it is down)."""
        return self.urls[self._index]

    @property
    def connection(self) -> ClientConnection | None:
        """The websocket of the current link while welcomed, else None."""
        return self._connection if self.linked.is_set() else None

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checking after every change of the link (linked,
        dropped, refused, outbox drained). Bound it with ``asyncio.wait_for``."""
        while not predicate():
            await self._changed.wait()

    async def wait_linked(self, links: int = 1) -> None:
        """Wait until this host has been welcomed ``links`` times in all, and is linked."""
        await self.wait_for(lambda: self.links >= links and self.linked.is_set())

    # -- sending ---------------------------------------------------------------------------

    def send(self, message: LinkMessage | dict[str, Any]) -> None:
        """Queue a message for the coordinator (sent in order, now or after a relink).

        A usage report replaces the reports of the same lease still queued: each carries the
        total so far, so only the newest matters (and the queue stays bounded by the leases
        while the link is down).
        """
        body = message if isinstance(message, dict) else message.to_dict()
        kind = body.get("type")
        ended = body["lease"] if kind == "session" and body.get("state") == "ended" else None
        usage = body["lease"] if kind == "usage" else None
        if usage is not None:
            for stale in [entry for entry in self._outbox if entry[2] == usage]:
                self._outbox.remove(stale)
        self._outbox.append((json.dumps(body, separators=(",", ":")), ended, usage))
        self._queued.set()

    async def environment(self, sha256: str, timeout: float) -> str:
        """The requirements text of course environment ``sha256``, from the coordinator.

        Asks once per hash however many callers wait (the request waits for a relink if
        the link is down). Raises :class:`KernelLaunchError` when the coordinator refuses,
        when its text does not hash to ``sha256`` (it is not used), or after ``timeout``
        seconds without an answer.
        """
        future = self._environments.get(sha256)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._environments[sha256] = future
            self.send(GetEnvironment(sha256))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            if self._environments.get(sha256) is future and not future.done():
                del self._environments[sha256]
                future.cancel()
            raise KernelLaunchError(
                f"the coordinator did not send course environment {sha256[:12]} within "
                f"{timeout:g} s; try again"
            ) from None

    def _answer_environment(self, message: Environment | EnvironmentRefused) -> None:
        future = self._environments.pop(message.sha256, None)
        if future is None or future.done():
            self.log.warning("ignoring an unrequested environment %s", message.sha256[:12])
            return
        if isinstance(message, EnvironmentRefused):
            future.set_exception(
                KernelLaunchError(
                    f"the coordinator has no course environment {message.sha256[:12]} for "
                    f"this provider: {message.reason}"
                )
            )
        elif not message.matches():
            self.log.warning("the coordinator's environment %s fails its hash", message.sha256)
            future.set_exception(
                KernelLaunchError(
                    f"the requirements the coordinator sent for course environment "
                    f"{message.sha256[:12]} do not match their sha256; refusing to build them"
                )
            )
        else:
            future.set_result(message.requirements)

    def _pending_ended(self) -> frozenset[str]:
        return frozenset(entry[1] for entry in self._outbox if entry[1] is not None)

    async def _drained(self) -> None:
        await self.wait_for(lambda: not self._outbox or not self.linked.is_set())

    # -- the link --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _FIRST_BACKOFF
        attempts = 0  # in this round of the URLs
        dropped_at: float | None = None  # when the last link ended
        while not self._stopping.is_set():
            links = self.links
            try:
                await self._link_once()
            except _Refused as exc:
                self.last_error = str(exc)
                self.log.error("coordinator link refused: %s", exc)
            except SchemeMismatch as exc:
                self.last_error = f"{exc} (--coordinator)"
                self.log.error("coordinator link to %s: %s", self.url, self.last_error)
            except (OSError, InvalidHandshake, ConnectionClosed, ProtocolError) as exc:
                self.last_error = await self._describe_failure(exc)
                self.log.warning("coordinator link to %s lost: %s", self.url, self.last_error)
            except asyncio.TimeoutError:
                self.last_error = "the coordinator did not answer in time"
                self.log.warning("coordinator link to %s: %s", self.url, self.last_error)
            except Exception as exc:  # never stop relinking: the kernels depend on it
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.log.exception("coordinator link to %s failed", self.url)
            if self.links > links:
                delay, attempts = _FIRST_BACKOFF, 0  # it was up: come back fast
                dropped_at = loop.time()
            # The next attempt goes to the next replica: this one failed or dropped the link.
            self._index = (self._index + 1) % len(self.urls)
            self._notify()
            wait = delay
            if dropped_at is not None and loop.time() - dropped_at < RELINK_BUDGET:
                wait = min(delay, RELINK_WAIT)  # keep trying often within the budget
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            attempts += 1
            if attempts >= len(self.urls):  # a whole round failed: wait longer
                delay, attempts = min(delay * 2, self.backoff_max), 0

    @property
    def _given_url(self) -> str:
        """The coordinator's URL as the operator gave it (``--coordinator http(s)://...``)."""
        parts = urlsplit(self.url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        path = parts.path.removesuffix("/api/v1/providers/connect")
        return urlunsplit((scheme, parts.netloc, path, "", ""))

    async def _describe_failure(self, exc: BaseException) -> str:
        """Why a link attempt failed, naming a URL that is no coordinator's, a TLS/plain
        mismatch or an untrusted certificate when it is one of those."""
        untrusted = untrusted_certificate(exc)
        if untrusted is not None:
            return untrusted
        if isinstance(exc, InvalidStatus) and self.links == 0 and exc.response.status_code < 500:
            response = exc.response
            try:
                json.loads(bytes(response.body or b""))["error"]  # the coordinator's errors
            except (ValueError, TypeError, KeyError, RecursionError):
                return (
                    f"{self._given_url} answered, but it is not a jupyter-io coordinator (HTTP "
                    f"{response.status_code}); check the --coordinator URL/port"
                )
        if self.links == 0 and not isinstance(exc, (ConnectionClosed, ProtocolError)):
            # http:// to a TLS coordinator: it drops the connection at once.
            mismatch = await scheme_mismatch(self._given_url)
            if mismatch is not None:
                return f"{mismatch} (--coordinator)"
        return f"{type(exc).__name__}: {exc}"

    async def _link_once(self) -> None:
        dial = connect(
            self.url,
            compression=None,
            open_timeout=self.open_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_size=_MAX_MESSAGE,
        )
        # Until a first link, a wss:// URL of a plain server is named, not waited out.
        ws = await (dial if self.links else dial_checked(self._given_url, dial))
        try:
            welcome = await self._handshake(ws)
            self._connection = ws
            self.heartbeat_interval = welcome.heartbeat_interval
            self.last_error = None
            self.links += 1
            self.linked.set()
            self._notify()
            self.log.info(
                "linked to coordinator %s at %s (heartbeat every %g s)",
                self.coordinator,
                self.url,
                welcome.heartbeat_interval,
            )
            await self._serve(ws, welcome.heartbeat_interval)
        finally:
            self.linked.clear()
            self._connection = None
            self._notify()
            if ws.close_code is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(1001), self.open_timeout)

    async def _receive(self, ws: ClientConnection) -> LinkMessage:
        return parse_message(await asyncio.wait_for(ws.recv(), self.open_timeout))

    async def _handshake(self, ws: ClientConnection) -> Welcome:
        challenge = await self._receive(ws)
        if not isinstance(challenge, Challenge):
            raise ProtocolError(f"expected a challenge, got {challenge.type!r}")
        try:
            key = Pubkey.from_string(challenge.coordinator)
        except ValueError:
            raise ProtocolError("the challenge names no valid coordinator key") from None
        if self.coordinator is not None and key != self.coordinator:
            await ws.close(1008, "not the coordinator this provider trusts")
            raise _Refused(
                f"{self.url} presents coordinator key {key}, but this provider trusts "
                f"{self.coordinator}; check coordinator_url / coordinator_pubkey"
            )
        nonce = new_nonce()
        hello = Hello(
            nonce=nonce,
            pubkey=str(self.keypair.pubkey()),
            signature=sign_provider_hello(self.keypair, key, challenge.nonce),
            inventory=self.host.link_inventory(),
            sessions=self.host.hosted_leases() | self._pending_ended(),
        )
        await ws.send(hello.to_json())
        answer = await self._receive(ws)
        if isinstance(answer, ErrorMessage):
            raise _Refused(f"{answer.code}: {answer.message}")
        if not isinstance(answer, Welcome):
            raise ProtocolError(f"expected a welcome, got {answer.type!r}")
        if answer.coordinator != str(key):
            raise ProtocolError("the welcome names another coordinator than the challenge")
        try:
            # The challenge only *named* a key; this proves the peer holds it.
            verify_welcome(key, answer.signature, self.keypair.pubkey(), nonce)
        except AuthError as exc:
            await ws.close(1008, "the coordinator did not prove its key")
            raise _Refused(f"{self.url}: {exc}") from None
        if self.coordinator is None:
            self.log.info("pinned coordinator key %s", key)
        self.coordinator = key
        self.host.coordinator_pinned(key)
        return answer

    async def _serve(self, ws: ClientConnection, interval: float) -> None:
        tasks = [
            asyncio.create_task(self._heartbeats(ws, interval)),
            asyncio.create_task(self._sender(ws)),
        ]
        try:
            async for text in ws:
                self._dispatch(text)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
            self.log.info("coordinator link closed (%s %s)", ws.close_code, ws.close_reason or "")

    def _dispatch(self, text: str | bytes) -> None:
        try:
            message = parse_message(text)
        except ProtocolError as exc:
            self.log.warning("ignoring a malformed message from the coordinator: %s", exc)
            return
        if isinstance(message, Dial):
            refusal = dial_refusal(
                message.url, message.lease, coordinators=self.urls, linked=self.url
            )
            if refusal is not None:
                self.log.warning("ignoring the coordinator's %s", refusal)
                return
            self.host.dial(message)
        elif isinstance(message, End):
            self.host.end_lease(message)
        elif isinstance(message, SignSettlement):
            self.host.settle(message)
        elif isinstance(message, (Environment, EnvironmentRefused)):
            self._answer_environment(message)
        elif isinstance(message, (GpuChallenge, GpuReveal)):
            answer = getattr(self.host, "gpu_challenge", None)  # hosts that answer challenges
            if answer is not None:
                answer(message)
        elif isinstance(message, ErrorMessage):
            self.log.warning("coordinator: %s: %s", message.code, message.message)
        else:
            self.log.warning("ignoring a %r message from the coordinator", message.type)

    async def _heartbeats(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            load = min(1.0, max(0.0, self.host.load()))
            await ws.send(Heartbeat(load, self.host.hosted_leases()).to_json())

    async def _sender(self, ws: ClientConnection) -> None:
        outbox = self._outbox
        while True:
            while outbox:
                head = outbox[0]
                await ws.send(head[0])
                if outbox and outbox[0] is head:  # unless replaced while it was being sent
                    outbox.popleft()
            self._notify()
            self._queued.clear()
            await self._queued.wait()

    def _notify(self) -> None:
        # A fresh event per change: every waiter wakes, none can miss one.
        self._changed.set()
        self._changed = asyncio.Event()
