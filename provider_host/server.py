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

With ``coordinator_url`` set the host also joins that marketplace coordinator
(``docs/coordinator-contract.md``): after listening it measures its benchmark, then keeps a
:class:`~provider_host.coordinator_link.CoordinatorLink` up. Clients then need a lease token
(:mod:`provider_host.lease_gate`) instead of a place on the allow-list; each session serves one
lease, its kernel is pinned to the lease's GPUs, and the host reports the session's start and
end and signed usage (:mod:`provider_host.usage`) per lease. What it needs to co-sign each
lease's settlement (:mod:`provider_host.settlement`) is kept in ``data_dir`` and read back at
startup, before linking, so a restarted host is still paid. Every tunnel connection, accepted
on ``/tunnel`` or dialled to the coordinator's relay on a ``dial``, goes through the same
handler (:meth:`ProviderServer.serve_connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import zmq.asyncio
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from websockets.asyncio.client import connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response

from jupyter_io.admission import HandshakeSlots
from jupyter_io.daemon import Daemon, is_loopback
from jupyter_io.errors import ConfigError, KernelLaunchError, ProtocolError
from jupyter_io.gpu_challenge import challenge_size
from jupyter_io.identity import new_nonce
from jupyter_io.leases import LeaseClaims
from jupyter_io.ping import PING_SUFFIX, PingLimiter, parse_ping_path
from jupyter_io.protocol import (
    HANDSHAKE_MAX_FRAME_SIZE,
    SUBPROTOCOL,
    TUNNEL_PATH,
    CloseCode,
    FrameKind,
    decode_frame,
    encode_control,
)
from jupyter_io.provider_link import (
    Dial,
    End,
    GpuChallenge,
    GpuReveal,
    LinkMessage,
    OfferGroup,
    SessionEvent,
    SettlementRefused,
    SignSettlement,
)
from jupyter_io.provider_link import Inventory as LinkInventory
from jupyter_io.signing import sign_request
from jupyter_io.tls import untrusted_certificate

from .allocation import GpuPool
from .benchmark import measure_inventory
from .cgroups import CgroupTree, prepare_cgroups
from .challenge import CPU_MAX_N, ChallengeDevice, ChallengeResponder
from .config import ProviderConfig
from .coordinator_link import CoordinatorLink
from .environments import EnvironmentCache
from .handshake import TRY_AGAIN_LATER, Hello, Refusal, challenge_body, check_hello
from .inventory import CPU_LABEL, Inventory, offer_groups, probe_inventory, render_inventory
from .lease_gate import LeaseGate
from .preauth import (
    HANDSHAKE_QUEUE,
    TunnelConnection,
    authenticated,
    handshake_deadline,
    tunnel_connection_class,
)
from .sandbox import Sandbox, prepare_isolation
from .session import ENVIRONMENT_FETCH_TIMEOUT, KernelSession
from .settlement import SettlementBook
from .usage import GpuUtilisation, UsageMeter
from .warm_pool import WarmPool
from .workspaces import wipe_orphaned_workspaces

__all__ = ["JOINING_PREFIX", "LISTENING_PREFIX", "ProviderServer"]

#: Start of the one line printed once the host accepts connections.
LISTENING_PREFIX = "jupyter-io provider listening on "
#: Start of the line that says which coordinator the host joins (printed before listening).
JOINING_PREFIX = "jupyter-io provider joining coordinator "
#: Where the latency ping is answered (``jupyter_io.ping``).
PING_PATH = TUNNEL_PATH + PING_SUFFIX
#: Seconds the link waits for the GPU challenge's imports (torch: seconds on a cold disk).
_WARM_UP_TIMEOUT = 120.0


def _make_private_dir(path: str) -> None:
    Path(path).expanduser().mkdir(mode=0o700, parents=True, exist_ok=True)


def _reason(text: str) -> str:
    """A websocket close reason must fit in 123 bytes of UTF-8."""
    return text.encode()[:120].decode(errors="ignore")


class ProviderServer(Daemon):
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
        #: The link to the marketplace coordinator (None without ``coordinator_url``).
        self.coordinator_link: CoordinatorLink | None = None
        #: Lease tokens' gate (None without a coordinator: the allow-list decides).
        self.lease_gate: LeaseGate | None = None
        #: What settlements are checked against (None without a coordinator).
        self.settlements: SettlementBook | None = None
        #: Benchmarks by model (TFLOP/s), once measured.
        self.benchmarks: dict[str, float] = {}
        self._offers: list[OfferGroup] = []
        self._by_lease: dict[str, KernelSession] = {}
        self._meters: dict[str, UsageMeter] = {}
        self._utilisation = GpuUtilisation()
        self._dialled: set[Connection] = set()
        self._background: set[asyncio.Task[Any]] = set()
        #: How kernels are sandboxed (None: ``isolation = "none"``), after startup.
        self.sandbox: Sandbox | None = None
        #: Where sessions get their memory cgroups (None: no memory limit), after startup.
        self.cgroups: CgroupTree | None = None
        #: Course environments (with a coordinator, after startup; None otherwise).
        self.environments: EnvironmentCache | None = None
        #: Answers the coordinator's GPU challenges (with a coordinator, after startup).
        self.challenges: ChallengeResponder | None = None
        #: Latency pings answered per address (None: ``ping_rate`` 0, none answered).
        self.pings = PingLimiter(rate=config.ping_rate) if config.ping_rate > 0 else None
        #: Warm kernels, one per free slot (None: ``warm_kernels`` off), after startup.
        self.warm: WarmPool | None = None

    # -- the whole life --------------------------------------------------------------------

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
        if config.coordinator_url:
            self._prepare_marketplace()
            self._load_settlements()
        _make_private_dir(config.workspace_root)
        # Before listening or linking: a host that cannot sandbox never joins a marketplace.
        self.sandbox = await asyncio.to_thread(prepare_isolation, config)  # runs bwrap once
        self.cgroups, no_cgroups = await asyncio.to_thread(
            prepare_cgroups,
            root=config.cgroup_root,
            memory=config.session_memory_bytes(),
            pids=config.max_processes,
        )
        wipe_orphaned_workspaces(config.workspace_root, self.log)
        if config.coordinator_url:
            self.environments = EnvironmentCache(
                config.environments_path(),
                sandbox=self.sandbox,
                pip_args=config.environment_pip_args,
                network=config.environment_network,
                keep=config.environment_cache_count,
                build_timeout=config.environment_build_timeout,
                max_bytes=config.environment_max_bytes,
                limits=config.resource_limits(),
                env_keep=config.env_keep,
                log=self.log,
            )
        self._context = zmq.asyncio.Context()
        if config.warm_kernels:
            self.warm = WarmPool(
                config=config,
                context=self._context,
                gpu_indices=self.inventory.gpu_indices,
                sandbox=self.sandbox,
                cgroups=self.cgroups,
                environments=self.environments,
                log=self.log,
            )
            self.warm.start()
        #: Connections in their handshake (see :mod:`provider_host.preauth`).
        self.handshakes = HandshakeSlots(
            total=config.max_unauthenticated,
            per_address=config.max_unauthenticated_per_address,
            what="tunnel",
        )
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                compression=None,
                # Until HELLO is verified; authenticated() lifts both to the session's.
                max_size=min(HANDSHAKE_MAX_FRAME_SIZE, config.max_frame_size),
                max_queue=HANDSHAKE_QUEUE,
                open_timeout=config.handshake_timeout or None,
                ping_interval=config.ping_interval or None,
                ping_timeout=config.ping_timeout or None,
                ssl=ssl_context,
                process_request=self._check_path,
                create_connection=tunnel_connection_class(self.handshakes),
            )
        except OSError as exc:
            self._context.destroy(linger=0)
            raise ConfigError(f"cannot listen on {config.listen}: {exc}") from None
        bound = self._server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        scheme = "wss" if ssl_context else "ws"
        self.url = f"{scheme}://{shown}:{bound[1]}{TUNNEL_PATH}"
        if self.lease_gate is not None:
            if self._allowed:
                self.log.warning(
                    "with a coordinator, lease tokens decide who may connect; the allow-list "
                    "is not used"
                )
        elif not self._allowed:
            self.log.warning("the allow-list is empty: every client will be refused (--allow)")
        if ssl_context is None and not is_loopback(host):
            self.log.warning("listening beyond loopback without TLS; set certfile and keyfile")
        self._print(f"jupyter-io provider host key {self.host_keypair.pubkey()}")
        self._print("jupyter-io provider inventory:")
        for line in render_inventory(self.inventory):
            self._print(line)
        if self.sandbox is None:
            shared = (
                "isolation is none: every tenant's kernel runs as this host's own user and can "
                "read what it can (its keypair, environment and other tenants' workspaces)"
            )
            self.log.warning("%s", shared)
            self._print(f"jupyter-io provider WARNING: {shared}")
        else:
            who = "a uid of its own" if self.sandbox.users is not None else "a user namespace"
            self._print(f"jupyter-io provider sandbox: bubblewrap, each session as {who}")
        if self.cgroups is not None:
            self._print(f"jupyter-io provider memory: {self.cgroups.describe()}")
        elif config.session_memory_bytes() > 0:
            if config.mem_limit > 0:
                fallback = f"only the address-space limit mem_limit={config.mem_limit} applies"
            else:
                fallback = "a tenant's kernel can use all of this machine's memory"
            unlimited = f"no memory limit per session ({no_cgroups}): {fallback}"
            self.log.warning("%s", unlimited)
            self._print(f"jupyter-io provider WARNING: {unlimited}")
        if self.coordinator_link is not None:
            route = f"direct at {config.public_url}" if config.public_url else "via its relay"
            self._print(f"{JOINING_PREFIX}{config.coordinator_url} (clients connect {route})")
            self._spawn(self._join())
            self._spawn(self._report_usage())
        self._print(f"{LISTENING_PREFIX}{self.url}")
        self.started.set()

    def _prepare_marketplace(self) -> None:
        """Check the marketplace settings and build the link and the token gate (no I/O)."""
        config = self.config
        assert self.inventory is not None and self.host_keypair is not None
        price_of = config.price_of()
        self._offers = offer_groups(
            self.inventory, price_of=price_of, cpu_slots=config.max_sessions
        )
        devices = {i for offer in self._offers for i in offer.gpu_indices}
        pinned = config.pinned_coordinator()
        self.lease_gate = LeaseGate(self.host_keypair.pubkey(), coordinator=pinned, devices=devices)
        self.settlements = SettlementBook(
            self.host_keypair,
            path=config.settlements_path(self.host_keypair.pubkey()),
            tolerance_seconds=config.settle_tolerance_seconds,
            log=self.log,
        )
        self.challenges = ChallengeResponder(
            self._send_to_coordinator,
            device_of=self._challenge_device,
            busy=self._device_busy,
            log=self.log,
        )
        self.coordinator_link = CoordinatorLink(
            config.link_urls(),
            self.host_keypair,
            self,
            coordinator=pinned,
            backoff_max=config.link_backoff_max,
            open_timeout=max(config.handshake_timeout, 1.0),
            ping_interval=config.ping_interval or None,
            ping_timeout=config.ping_timeout or None,
            log=self.log,
        )

    def _load_settlements(self) -> None:
        """Read back the leases this host must still co-sign for (before it links)."""
        assert self.settlements is not None
        try:
            _make_private_dir(self.config.data_dir)
        except OSError as exc:
            raise ConfigError(
                f"cannot create data_dir {self.config.data_dir}: {exc}; set "
                f"ProviderConfig.data_dir to a directory this user may write"
            ) from None
        self.settlements.load()

    async def _join(self) -> None:
        """Benchmark (when asked), then link to the coordinator: once what the GPU challenge
        needs is imported (in its worker thread: torch's import would otherwise hold up the
        link's heartbeats at the first challenge)."""
        assert self.inventory is not None and self.coordinator_link is not None
        warm: asyncio.Future[None] | None = None
        if self.challenges is not None:
            devices = {
                device.torch_device
                for offer in self._offers
                for index in offer.gpu_indices
                if (device := self._challenge_device(index)) is not None
            }
            warm = self.challenges.warm_up(devices)
        if self.config.benchmark:
            offers_cpu = any(offer.gpu == CPU_LABEL for offer in self._offers)
            self.benchmarks = await measure_inventory(self.inventory, offers_cpu=offers_cpu)
            if self.benchmarks:
                self._offers = offer_groups(
                    self.inventory,
                    price_of=self.config.price_of(),
                    cpu_slots=self.config.max_sessions,
                    benchmarks=self.benchmarks,
                )
        if warm is not None:
            with contextlib.suppress(Exception):  # a failure is each challenge's to report
                await asyncio.wait_for(asyncio.shield(warm), _WARM_UP_TIMEOUT)
        if not self._closing:
            self.coordinator_link.start()

    async def shutdown(self) -> None:
        """Stop accepting, end every session (kernels killed, 1001, workspaces removed); with a
        coordinator, send the sessions' last usage reports and ``ended`` events, then close
        the link with 1001."""
        self._closing = True
        if self._server is not None:
            self._server.server.close()  # no new TCP connections from here on
        if self.warm is not None:
            await self.warm.close()  # first: sessions that end re-arm no slot
        sessions = list(self.sessions.values())
        if sessions:
            await asyncio.gather(
                *(s.end(CloseCode.GOING_AWAY, "provider shutting down") for s in sessions),
                return_exceptions=True,
            )
        for ws in list(self._dialled):
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.GOING_AWAY, "provider shutting down")
        if self.challenges is not None:
            await self.challenges.close()
        if self.coordinator_link is not None:
            await self.coordinator_link.stop()
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self.environments is not None:
            await self.environments.close()  # builds no session waits for any more
        self._utilisation.close()
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        self.log.info("provider host stopped")

    # -- connections -----------------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        slot = connection.slot if isinstance(connection, TunnelConnection) else None
        if path == PING_PATH:
            return self._ping(connection, request, refused=slot is not None and bool(slot.refusal))
        if path != TUNNEL_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"the tunnel is at {TUNNEL_PATH}\n")
        if slot is not None and slot.refusal is not None:
            self.log.warning("refusing a tunnel connection: %s", slot.refusal)
            response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{slot.refusal}\n")
            response.headers["Retry-After"] = "5"
            return response
        return None

    def _ping(self, connection: ServerConnection, request: Request, *, refused: bool) -> Response:
        """Answer a latency ping (:mod:`jupyter_io.ping`) with its nonce, or cut the
        connection without a word: a short or malformed ping, one over the rate limit, or one
        past the caps on connections in their handshake (``refused``)."""
        size = connection.request_bytes if isinstance(connection, TunnelConnection) else 0
        nonce = parse_ping_path(request.path, size)
        peer = connection.remote_address
        address = str(peer[0]) if peer else "unknown"
        pings = self.pings
        if refused or nonce is None or pings is None or not pings.allow(address, time.monotonic()):
            connection.transport.abort()
            # A response keeps websockets from going on with the upgrade; nothing of it is
            # sent on the aborted connection.
            return Response(HTTPStatus.FORBIDDEN, "Forbidden", Headers(), b"")
        body = nonce.encode()
        headers = Headers([("Content-Length", str(len(body))), ("Connection", "close")])
        return Response(HTTPStatus.OK, "OK", headers, body)

    async def _handle(self, ws: ServerConnection) -> None:
        await self.serve_connection(ws)

    async def serve_connection(self, ws: Connection) -> None:
        """Run the tunnel on one websocket until it closes: CHALLENGE first, HELLO checks,
        then the session. The same for a connection accepted on ``/tunnel`` and one dialled
        to the coordinator's relay."""
        try:
            await self._handshake_and_serve(ws)
        except ConnectionClosed:
            pass
        except Exception:
            self.log.exception("tunnel connection failed")
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL_ERROR, "internal error in the provider host")

    async def _handshake_and_serve(self, ws: Connection) -> None:
        assert self.host_keypair is not None and self._context is not None
        if self._closing:
            await ws.close(CloseCode.GOING_AWAY, "provider shutting down")
            return
        host = self.host_keypair.pubkey()
        nonce = new_nonce()
        await ws.send(encode_control(FrameKind.CHALLENGE, challenge_body(nonce, host)))
        try:
            message = await asyncio.wait_for(
                ws.recv(), handshake_deadline(ws, self.config.handshake_timeout)
            )
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
                allowed=None if self.lease_gate is not None else self._allowed,
                session_owner=self._session_owner,
                has_capacity=self._has_capacity,
            )
            claims = self._check_lease(hello)
            authenticated(ws, self.config.max_frame_size)
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
            session = self._create_session(hello.pubkey, claims)
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

    def _check_lease(self, hello: Hello) -> LeaseClaims | None:
        """With a coordinator, the lease token's claims (or :class:`Refusal`); else None."""
        gate = self.lease_gate
        if gate is None:
            return None
        if hello.session is not None:
            session = self.sessions[hello.session]
            return gate.check_resume(
                hello.token, user=hello.pubkey, session=session.id, session_lease=session.lease_id
            )
        claims = gate.check_new(hello.token, user=hello.pubkey, live_session_of=self._live_session)
        busy = self._gpus.held_by_others(self._real_gpus(claims))
        if busy:
            raise Refusal(
                "capacity",
                TRY_AGAIN_LATER,
                f"GPU(s) {busy} of lease {claims.lease_id} are in use by another session here; "
                f"request a new lease",
            )
        return claims

    def _real_gpus(self, claims: LeaseClaims) -> tuple[int, ...]:
        """The lease's devices that are real GPUs (simulated GPUs and CPU slots are not)."""
        assert self.inventory is not None
        real = set(self.inventory.gpu_indices)
        return tuple(i for i in claims.gpu_indices if i in real)

    def _live_session(self, lease_id: str) -> str | None:
        session = self._by_lease.get(lease_id)
        return None if session is None else session.id

    def _create_session(self, owner: Pubkey, claims: LeaseClaims | None = None) -> KernelSession:
        assert self._context is not None
        env = None if claims is None else claims.env
        warm = None
        if self.warm is not None:
            slot = self._gpus.next_free() if claims is None else self._real_gpus(claims)
            if slot is not None:
                warm = self.warm.take(slot, env)
        session = KernelSession(
            owner=owner,
            config=self.config,
            context=self._context,
            gpus=(),
            on_end=self._session_ended,
            log=self.log,
            lease_id=None if claims is None else claims.lease_id,
            on_started=self._kernel_started,
            sandbox=self.sandbox,
            cgroups=self.cgroups,
            environment=None if claims is None else claims.env,
            environments=self.environments,
            fetch_requirements=self._fetch_requirements,
            warm=warm,
        )
        if claims is None:
            gpus = self._gpus.acquire(session.id)
            assert gpus is not None, "capacity was checked in the handshake"
        else:
            gpus = self._real_gpus(claims)
            self._gpus.hold(session.id, gpus)
        session.gpus = gpus
        self.sessions[session.id] = session
        try:
            session.open()
        except Exception:
            self.sessions.pop(session.id, None)
            self._gpus.release(session.id)
            if self.warm is not None:
                self.warm.release(gpus, env)
            if claims is not None and self.lease_gate is not None:
                self.lease_gate.end(claims.lease_id)
                self._report_session(claims.lease_id, "ended")
            raise
        if claims is not None:
            assert self.lease_gate is not None
            self.lease_gate.bind(claims, session.id)  # no await since the gate's check
            self._by_lease[claims.lease_id] = session
            meter = self._meters[claims.lease_id] = UsageMeter(claims.lease_id, gpus)
            # A class's idle timeout counts the kernel's word. Every lease reports it: a
            # token names its class only where the class pays by escrow, and the
            # coordinator ignores it for other leases.
            meter.idle = session.activity.idle_seconds
            if self.settlements is not None:
                self.settlements.admit(claims, meter)
            self.log.info(
                "session %s opened for %s, lease %s (gpus %s)",
                session.id,
                owner,
                claims.lease_id,
                list(gpus) or "none",
            )
        else:
            self.log.info(
                "session %s opened for %s (gpus %s)", session.id, owner, list(gpus) or "none"
            )
        return session

    async def _fetch_requirements(self, sha256: str) -> str:
        """A course environment's requirements text, from the coordinator (hash checked)."""
        link = self.coordinator_link
        if link is None:
            raise KernelLaunchError("course environments need a coordinator to fetch them from")
        return await link.environment(sha256, ENVIRONMENT_FETCH_TIMEOUT)

    def _session_ended(self, session: KernelSession) -> None:
        self.sessions.pop(session.id, None)
        self._gpus.release(session.id)
        if self.warm is not None:
            self.warm.release(session.gpus, session.environment)
        lease_id = session.lease_id
        if lease_id is None or self._by_lease.get(lease_id) is not session:
            return
        del self._by_lease[lease_id]
        if self.lease_gate is not None:
            self.lease_gate.end(lease_id)
        meter = self._meters.pop(lease_id, None)
        if meter is not None and meter.started and self.coordinator_link is not None:
            meter.stop()
            self.coordinator_link.send(meter.report(self._keypair(), self._utilisation(meter.gpus)))
        if self.settlements is not None:
            self.settlements.checkpoint()  # the final total, before any restart
        self._report_session(lease_id, "ended")

    def _kernel_started(self, session: KernelSession) -> None:
        lease_id = session.lease_id
        meter = self._meters.get(lease_id) if lease_id is not None else None
        if lease_id is None or meter is None or meter.started:
            return
        meter.start()
        self._report_session(lease_id, "active")

    def _report_session(self, lease_id: str, state: str) -> None:
        if self.coordinator_link is not None:
            self.coordinator_link.send(SessionEvent(lease_id, state, time.time()))

    async def _report_usage(self) -> None:
        """Every ``usage_interval``, a signed usage report per lease whose kernel started."""
        while True:
            await asyncio.sleep(self.config.usage_interval)
            link = self.coordinator_link
            if link is None:
                return
            for meter in list(self._meters.values()):
                if meter.started and not meter.stopped:
                    link.send(meter.report(self._keypair(), self._utilisation(meter.gpus)))
            if self.settlements is not None:
                self.settlements.checkpoint()

    def _keypair(self) -> Keypair:
        assert self.host_keypair is not None
        return self.host_keypair

    # -- the coordinator link's host side (provider_host.coordinator_link.LinkHost) ----------

    def link_inventory(self) -> LinkInventory:
        """What the hello publishes."""
        config = self.config
        return LinkInventory(
            name=config.name,
            region=config.region,
            reachable_url=config.public_url or None,
            max_kernels=config.max_sessions,
            offers=tuple(self._offers),
        )

    def hosted_leases(self) -> frozenset[str]:
        """Leases whose sessions live here."""
        return frozenset(self._by_lease)

    def load(self) -> float:
        """Sessions over ``max_sessions``."""
        return min(1.0, len(self.sessions) / self.config.max_sessions)

    def coordinator_pinned(self, coordinator: Pubkey) -> None:
        """Trust lease tokens signed by ``coordinator`` (the link authenticated it)."""
        if self.lease_gate is not None:
            self.lease_gate.pin(coordinator)

    def dial(self, message: Dial) -> None:
        """Serve a tunnel on a websocket to the relay (the coordinator's ``dial``)."""
        if not self._closing:
            self._spawn(self._serve_dialled(message))

    def end_lease(self, message: End) -> None:
        """The coordinator ended the lease: end its session, refuse its token from now on."""
        if self.lease_gate is not None:
            self.lease_gate.end(message.lease)
        session = self._by_lease.get(message.lease)
        if session is not None:
            self.log.info("lease %s ended by the coordinator: %s", message.lease, message.reason)
            self._spawn(
                session.end(CloseCode.SESSION_ENDED, _reason(f"lease ended: {message.reason}"))
            )

    def settle(self, message: SignSettlement) -> None:
        """The coordinator asks this host to co-sign a lease's settlement: answer it (after
        a fresh usage report when refusing, so the next request can pay what is owed)."""
        link, book = self.coordinator_link, self.settlements
        if link is None or book is None:
            return
        reply = book.answer(message, link.coordinator)
        meter = book.meter(message.lease)
        if isinstance(reply, SettlementRefused) and meter is not None and meter.started:
            link.send(meter.report(self._keypair(), None))
            book.checkpoint()  # its seq moved on
        link.send(reply)

    def gpu_challenge(self, message: GpuChallenge | GpuReveal) -> None:
        """The coordinator challenges a device, or asks for rows of the product
        (:mod:`provider_host.challenge`)."""
        if self.challenges is not None and not self._closing:
            self.challenges.handle(message)

    def _send_to_coordinator(self, message: LinkMessage) -> None:
        if self.coordinator_link is not None:
            self.coordinator_link.send(message)

    def _challenge_device(self, index: int) -> ChallengeDevice | None:
        """Device ``index`` of an offer as the GPU challenge runs on it: real GPUs on CUDA,
        simulated GPUs and CPU slots on the CPU (numpy)."""
        for group in self._offers:
            if index in group.gpu_indices:
                if group.simulated or group.gpu == CPU_LABEL:
                    return ChallengeDevice(index, "cpu", True, CPU_MAX_N)
                max_n = challenge_size(group.vram_bytes, fraction=0.95)
                return ChallengeDevice(index, f"cuda:{index}", False, max_n)
        return None

    def _device_busy(self, index: int) -> bool:
        """A session holds device ``index`` (or, for a CPU-run challenge, any session runs:
        the challenge would take the CPU from its kernel)."""
        device = self._challenge_device(index)
        if device is not None and device.simulated:
            return bool(self.sessions)
        return bool(self._gpus.held_by_others([index]))

    async def _serve_dialled(self, message: Dial) -> None:
        url = message.url
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            self.log.warning("ignoring a dial to %r: not a ws(s):// URL", url)
            return
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        config = self.config
        try:
            ws = await connect(
                url,
                additional_headers=sign_request(self._keypair(), "GET", path),
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                compression=None,
                # The relay passes on a stranger's frames until HELLO is verified.
                max_size=min(HANDSHAKE_MAX_FRAME_SIZE, config.max_frame_size),
                max_queue=HANDSHAKE_QUEUE,
                ping_interval=config.ping_interval or None,
                ping_timeout=config.ping_timeout or None,
                open_timeout=max(config.handshake_timeout, 1.0),
            )
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            reason = untrusted_certificate(exc) or exc
            self.log.warning("could not dial the relay for lease %s: %s", message.lease, reason)
            return
        self._dialled.add(ws)
        try:
            await self.serve_connection(ws)
        finally:
            self._dialled.discard(ws)
            with contextlib.suppress(Exception):
                await ws.close()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("provider host task failed", exc_info=task.exception())

    def _session_owner(self, session_id: str) -> Pubkey | None:
        session = self.sessions.get(session_id)
        return None if session is None else session.owner

    def _has_capacity(self) -> bool:
        if len(self.sessions) >= self.config.max_sessions:
            return False
        # With a coordinator the lease names the GPUs, checked against the held ones later.
        return self.lease_gate is not None or self._gpus.available()

    def _print(self, line: str) -> None:
        print(line, file=self.stdout, flush=True)
