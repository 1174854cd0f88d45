"""The coordinator daemon: REST API, provider links and relay in one tornado process.

:class:`CoordinatorServer` follows uvicorn's shape: :meth:`~CoordinatorServer.startup` (load
or create the keypair, open and migrate the store, rebuild the registry and the scheduler's
index, listen, print the ready line), :meth:`~CoordinatorServer.main_loop` (wait for
SIGINT/SIGTERM or :meth:`~CoordinatorServer.request_exit`), :meth:`~CoordinatorServer.shutdown`
(stop accepting, close relayed connections and provider links with 1001 so everyone
reconnects to the next coordinator, flush the last heartbeats, close the store; no lease is
touched, so a restart on the same database carries on).

With ``payments = "escrow"`` (the default) it also opens the ledger: the embedded one
(LiteSVM, its accounts in the coordinator's database, tables ``ledger_*``) served at
``{url}/solana``, or an :class:`~jupyter_io.payments.escrow.EscrowClient` of ``solana_url``;
then the budget watch (:class:`~jupyter_io.coordinator.billing.Billing`) and the settlement worker
(:class:`~jupyter_io.coordinator.settlement.SettlementWorker`). Shutdown stops the worker
(releasing its claims) before the links close, and closes the ledger last.

:meth:`~CoordinatorServer.serve` runs the three with the signals captured and the previous
handlers restored afterwards; :meth:`~CoordinatorServer.run` wraps it in ``asyncio.run``.
Tests call startup/shutdown.

Once listening it prints, flushed to stdout, the coordinator's public key and, last, exactly
one line ``jupyter-io coordinator listening on http://HOST:PORT`` (``https://`` with TLS) with
the real port: launchers wait for that line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from typing import IO, Any

from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ..admission import HandshakeSlots
from ..daemon import Daemon, is_loopback
from ..errors import ConfigError
from ..payments.escrow import EscrowClient
from ..ping import PingLimiter
from ..signing import ReplayGuard
from .ack_watch import AckWatch
from .billing import Billing
from .body_limits import BodyLimits
from .challenges import ChallengeSettings, GpuChallenges
from .cohort_allowances import AllowanceReader
from .cohort_funding import cohort_funding_routes
from .cohort_handlers import cohort_routes
from .cohort_queue_handlers import queue_routes
from .cohort_scheduling import CohortScheduling
from .cohorts import CohortService
from .config import CoordinatorConfig
from .embedded_ledger import EmbeddedLedger
from .handlers import BODY_LIMITS, MAX_BODY_SIZE, RELAY_PREFIX, Services, make_app
from .jobs import LeaderJobs, Leadership
from .latency import ProbeDirectory
from .leasing import LeaseService
from .ledger_rpc import ledger_handlers
from .offers import OffersCache
from .registry import Registry
from .relay import Relay
from .replicas import ReplicaService
from .scheduler import OfferIndex
from .settlement import SettlementWorker
from .store import SqlLedgerStore, Store

__all__ = ["LISTENING_PREFIX", "SOLANA_PATH", "CoordinatorServer"]

#: Where the coordinator serves its embedded ledger's JSON-RPC.
SOLANA_PATH = "/solana"
#: Largest JSON-RPC body the embedded ledger takes, bytes (a transaction is at most 1,232
#: bytes, 1,644 in base64; 100 accounts in one call are about 5 KB).
LEDGER_MAX_BODY_SIZE = 64 * 1024
#: Seconds a request body may take to arrive.
BODY_TIMEOUT = 30.0
#: Seconds a connection may wait for (or dribble) its request line and headers, and stay idle
#: between requests; tornado's default (3,600 s) let a stranger park a connection for an hour.
HEADER_TIMEOUT = 30.0
#: Largest request line plus headers, bytes (tornado's default is 64 KiB; a signed request's
#: headers are under 1 KiB).
MAX_HEADER_SIZE = 16 * 1024

#: Start of the one line printed once the coordinator accepts connections.
LISTENING_PREFIX = "jupyter-io coordinator listening on "


class CoordinatorServer(Daemon):
    """Lifecycle of the coordinator (see the module docstring)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        log: logging.Logger | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        self.config = config
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.stdout = stdout or sys.stdout
        #: ``http://HOST:PORT`` (``https://``) others reach this coordinator at, after startup.
        self.url = ""
        self.keypair: Keypair | None = None
        self.store: Store | None = None
        self.index = OfferIndex()
        self.registry: Registry | None = None
        self.relay: Relay | None = None
        #: This process as a replica of the coordinators sharing the database.
        self.replica: ReplicaService | None = None
        self.leases: LeaseService | None = None
        #: The embedded ledger (escrow payments with no ``solana_url``), else None.
        self.ledger: EmbeddedLedger | None = None
        #: The ledger client escrows are verified and settled with (None when free).
        self.escrow: EscrowClient | None = None
        #: The ledger's JSON-RPC URL ("" when free).
        self.solana_url = ""
        self.billing: Billing | None = None
        #: The students' allowances read on-chain for the dashboards (escrow payments only).
        self.allowances: AllowanceReader | None = None
        self.settlements: SettlementWorker | None = None
        self.ack_watch: AckWatch | None = None
        #: Classroom cohorts (:mod:`~jupyter_io.coordinator.cohorts`).
        self.cohorts: CohortService | None = None
        #: The cohorts' queue, reservations and time rules.
        self.cohort_scheduling: CohortScheduling | None = None
        #: The GPU challenges (``gpu_checks`` on), else None.
        self.gpu_checks: GpuChallenges | None = None
        #: Who leads the replicas' jobs, and the leader's passes (:mod:`.jobs`).
        self.leadership: Leadership | None = None
        self.jobs: LeaderJobs | None = None
        self.should_exit = asyncio.Event()
        #: Set once :meth:`startup` is done and the ready line is out.
        self.started = asyncio.Event()
        self._http: HTTPServer | None = None
        self.body_limits: BodyLimits | None = None
        self._services: Services | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the whole life --------------------------------------------------------------------

    async def startup(self) -> None:
        """Load identity, open the store, rebuild state, listen, print the ready line.

        Raises :class:`~jupyter_io.errors.ConfigError` for a bad keypair, database URL, TLS
        files or listen address (nothing is left open then).
        """
        self._loop = asyncio.get_running_loop()
        config = self.config
        host, port = config.listen_address()
        ssl_context = config.ssl_context()
        self.keypair = keypair = config.load_keypair()
        try:
            sockets = bind_sockets(port, host)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {config.listen}: {exc}") from None
        try:
            self.store = store = await Store.open(config.database_url())
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        bound = sockets[0].getsockname()
        self.url = config.public_url.rstrip("/") or _url(
            bound[0], bound[1], ssl_context is not None
        )
        try:
            ledger_routes = await self._open_ledger()
        except BaseException:
            for sock in sockets:
                sock.close()
            await store.close()
            self.store = None
            raise
        ws_base = self.url.replace("http", "ws", 1) + RELAY_PREFIX
        self.leadership = leadership = Leadership(
            store, interval=config.jobs_interval, log=self.log
        )
        self.registry = registry = Registry(
            store,
            self.index,
            coordinator=keypair.pubkey(),
            keypair=keypair,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_misses=config.heartbeat_misses,
            flush_interval=config.flush_interval,
            reconcile_interval=config.reconcile_interval,
            log=self.log,
        )
        # On PostgreSQL a replica of the marketplace: it follows the change feed (every
        # provider schedulable here, wherever linked) and the outbox. On SQLite (one process)
        # it only prunes the feed.
        replica_url = config.replica_url or _url(bound[0], bound[1], ssl_context is not None)
        self.replica = ReplicaService(
            store,
            registry,
            url=replica_url,
            feed_interval=config.feed_interval,
            follow=store.dialect == "postgresql",
            log=self.log,
        )
        self.relay = relay = Relay(
            registry,
            base_url=ws_base,
            dial_url=replica_url.replace("http", "ws", 1) + RELAY_PREFIX,
            pair_timeout=config.relay_pair_timeout,
            handshake_timeout=config.hello_timeout,
            max_message_size=config.relay_max_message_size,
            log=self.log,
        )
        if self.escrow is not None:
            self.billing = Billing(
                store,
                registry,
                self.escrow,
                keypair,
                solana_url=self.solana_url,
                min_deposit_seconds=config.min_deposit_seconds,
                ledger_timeout=config.solana_timeout,
                escrow_check_interval=config.escrow_check_interval,
                ack_grace=config.usage_ack_grace,
                log=self.log,
            )
            self.ack_watch = AckWatch(
                store, registry, timeout=config.usage_ack_timeout, log=self.log
            )
            self.settlements = SettlementWorker(
                store,
                registry,
                self.billing,
                retry_interval=config.settle_retry_interval,
                retry_max=config.settle_retry_max,
                leadership=leadership,
                # Its claims are the replica's: freed once the replica stops beating.
                owner=self.replica.id if self.replica.follow else None,
                log=self.log,
            )
        self.leases = leases = LeaseService(
            store,
            registry,
            self.index,
            relay,
            keypair,
            token_ttl=config.token_ttl,
            billing=self.billing,
            claim_window=config.claim_window,
            max_unfunded_per_key=config.max_unfunded_per_key,
            max_unfunded=config.max_unfunded_leases,
            log=self.log,
        )
        await registry.start()
        await self.replica.start()
        await leases.start()
        await leadership.start()
        self.jobs = LeaderJobs(
            store,
            registry,
            leadership,
            pending=leases.pending,
            escrow=self.escrow is not None,
            interval=config.jobs_interval,
            log=self.log,
        )
        self.jobs.start()
        self.cohorts = cohorts = CohortService(
            store, leases, registry, self.index, public_url=lambda: self.url, log=self.log
        )
        if self.billing is not None:
            # The pool's figures on the dashboard: each student's allowance, read exactly.
            self.allowances = allowances = AllowanceReader(
                self.billing.pool,
                self.billing.arbiter.pubkey(),
                ttl=config.cohort_allowance_ttl,
                accounts_per_second=config.cohort_allowance_rate,
                log=self.log,
            )
            cohorts.allowances_of = allowances.read
        await cohorts.start()
        self.cohort_scheduling = scheduling = self._cohort_scheduling(cohorts)
        await scheduling.start()
        if self.billing is not None and self.settlements is not None:
            await self.billing.start()
            if self.ack_watch is not None:
                await self.ack_watch.start()
            self.settlements.start()
        if config.gpu_checks:
            self.gpu_checks = GpuChallenges(registry, self._gpu_check_settings(), log=self.log)
            self.gpu_checks.start()
        probes = ProbeDirectory(relay.base_url, registry.relay_hop_ms)
        self._services = services = Services(
            coordinator=keypair.pubkey(),
            registry=registry,
            leases=leases,
            relay=relay,
            offers=OffersCache(
                self.index,
                ttl=config.offers_cache_ttl,
                directory=probes,
                verification=self.gpu_checks.fields if self.gpu_checks is not None else None,
            ),
            probes=probes,
            pings=PingLimiter(rate=config.ping_rate) if config.ping_rate > 0 else None,
            replay_guard=ReplayGuard(config.request_max_skew),
            hello_timeout=config.hello_timeout,
            handshakes=HandshakeSlots(
                total=config.max_unauthenticated,
                per_address=config.max_unauthenticated_per_address,
                what="websocket",
            ),
            request_max_skew=config.request_max_skew,
            log=self.log,
            payments=config.payments,
            solana_url=self.solana_url,
            settlements=self.settlements,
            leadership=self.leadership,
            jobs=self.jobs,
            cohorts=cohorts,
            cohort_scheduling=scheduling,
            replica=self.replica if self.replica.follow else None,
        )
        #: Per-endpoint body limits, answered 413 before a body is read.
        self.body_limits = limits = BodyLimits(
            make_app(
                services,
                [
                    *ledger_routes,
                    *cohort_routes({"services": services}),
                    *cohort_funding_routes({"services": services}),
                    *queue_routes({"services": services}),
                ],
            ),
            [*BODY_LIMITS, (SOLANA_PATH, LEDGER_MAX_BODY_SIZE)],
            MAX_BODY_SIZE,
        )
        self._http = HTTPServer(
            limits,
            ssl_options=ssl_context,
            max_body_size=limits.largest,
            body_timeout=BODY_TIMEOUT,
            idle_connection_timeout=HEADER_TIMEOUT,
            max_header_size=MAX_HEADER_SIZE,
            max_buffer_size=config.relay_max_message_size + (1 << 20),
            xheaders=False,
            chunk_size=1 << 20,
        )
        self._http.add_sockets(sockets)
        if not is_loopback(host):
            if ssl_context is None:
                self.log.warning("listening beyond loopback without TLS; set certfile/keyfile")
            if not config.public_url:
                self.log.warning("listening on %s: set public_url to the address others use", host)
        self._print(f"jupyter-io coordinator key {keypair.pubkey()}")
        if self.escrow is not None:
            self._print(f"jupyter-io coordinator ledger {self.solana_url}")
        self._print(f"{LISTENING_PREFIX}{self.url}")
        self.started.set()

    def _gpu_check_settings(self) -> ChallengeSettings:
        config = self.config
        return ChallengeSettings(
            interval=config.gpu_check_interval,
            vectors=config.gpu_check_vectors,
            rows=config.gpu_check_rows,
            max_n=config.gpu_check_max_n,
            cpu_n=config.gpu_check_cpu_n,
            overhead=config.gpu_check_overhead,
            reveal_timeout=config.gpu_check_reveal_timeout,
        )

    async def _open_ledger(self) -> list[Any]:
        """With escrow payments: the embedded ledger (and its routes) or a remote client."""
        config = self.config
        if config.payments != "escrow":
            return []
        routes: list[Any] = []
        if config.solana_url:
            self.solana_url = config.solana_url
        else:
            if config.db.startswith("postgres"):
                self.log.warning(
                    "the embedded ledger runs in this coordinator process: replicas sharing "
                    "the database must share one ledger instead: --solana-url a cluster's RPC, "
                    "or one `jupyter io ledger` for a local or test deployment"
                )
            assert self.store is not None, "the store opens before the ledger"
            # In the coordinator's own database: one file (or server) to back up, and a
            # restart restores every account the ledger's transactions touched.
            self.ledger = await EmbeddedLedger.open(SqlLedgerStore(self.store.write_engine))
            routes = ledger_handlers(self.ledger, SOLANA_PATH)
            self.solana_url = self.url + SOLANA_PATH
        client = AsyncClient(self.solana_url, timeout=config.solana_timeout)
        self.escrow = EscrowClient(client, owns_client=True, confirm_timeout=30.0)
        return routes

    def _cohort_scheduling(self, cohorts: CohortService) -> CohortScheduling:
        """The cohorts' queue, reservations and time rules, wired to the cohort service: a
        queued request is served through the same checks as a direct one."""
        assert self.store is not None and self.registry is not None and self.leases is not None
        scheduling = CohortScheduling(
            self.store,
            self.registry,
            self.index,
            max_queue_per_cohort=self.config.max_queue_per_cohort,
            warning_seconds=self.config.cohort_warning_seconds,
            log=self.log,
        )

        async def lease_for(student: str, cohort: Any, request: Any) -> Any:
            return await cohorts.request_lease(Pubkey.from_string(student), cohort.id, request)

        scheduling.lease_for = lease_for
        scheduling.check = cohorts.check_request
        cohorts.queue_of = scheduling.queue_view
        cohorts.queued_of = scheduling.queue.waiting_of
        cohorts.idle_of = scheduling.idle_seconds
        cohorts.removed_listeners.append(scheduling.student_removed)
        cohorts.ended_listeners.append(scheduling.cohort_ended)
        self.leases.notices.append(scheduling.notice)
        return scheduling

    async def shutdown(self) -> None:
        """Stop accepting; close relayed connections and provider links (1001); flush the
        last heartbeats; close the store. Leases are left as they are."""
        if self._http is not None:
            self._http.stop()
        if self.gpu_checks is not None:
            await self.gpu_checks.stop()
        if self.jobs is not None:
            await self.jobs.stop()
        if self.cohort_scheduling is not None:
            await self.cohort_scheduling.stop()
        if self.cohorts is not None:
            await self.cohorts.stop()
        if self.leases is not None:
            await self.leases.stop()
        if self.settlements is not None:
            await self.settlements.stop()  # its claims go back to the queue
        if self.ack_watch is not None:
            await self.ack_watch.stop()
        if self.billing is not None:
            await self.billing.stop()
        if self.replica is not None:
            await self.replica.stop()  # before the links close: they link again elsewhere
        if self.relay is not None:
            await self.relay.close_all(1001, "coordinator restarting; reconnect")
        if self.registry is not None:
            await self.registry.stop()  # closes the provider links with 1001
        if self._services is not None and self._services.links:
            links = list(self._services.links)
            waits = [asyncio.ensure_future(link.closed.wait()) for link in links]
            _, late = await asyncio.wait(waits, timeout=2.0)
            for wait in late:
                wait.cancel()
            for link in links:
                if not link.closed.is_set():
                    link.abort()
        if self._http is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._http.close_all_connections(), 5)
            self._http = None
        if self.leadership is not None:
            await self.leadership.stop()  # another replica leads within its interval
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.escrow is not None:
            await self.escrow.close()
            self.escrow = None
        if self.ledger is not None:
            await self.ledger.close()  # after the last request it served
            self.ledger = None
        self.log.info("coordinator stopped")

    def _print(self, line: str) -> None:
        print(line, file=self.stdout, flush=True)


def _url(host: str, port: int, tls: bool) -> str:
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"
