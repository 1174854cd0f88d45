"""Tornado handlers of the coordinator: thin, the work is done by the services.

Routes (``docs/coordinator-contract.md``; every REST error is
``{"error": {"code", "message"}}``):

====================================  ========================================================
``GET  /api/v1/info``                 coordinator key, version, relay base URL
``GET  /api/v1/status``               counters (providers linked, heartbeats, leases, relay,
                                      settlements)
``GET  /api/v1/offers``               offers by GPU type and per provider (cached briefly)
``GET  /api/v1/offers/candidates``    the offers a lease request would weigh, what to ping
``POST /api/v1/leases``               signed: lease GPUs → 201 grant, 409 ``no_offer``,
                                      429 ``unfunded_limit`` / ``unfunded_capacity``
``GET  /api/v1/leases``               signed: the caller's leases, newest first (``?limit=``)
``GET  /api/v1/leases/{id}``          signed, owner only: the lease record with ``billing``
``DELETE /api/v1/leases/{id}``        signed, owner only: end it (idempotent)
``POST /api/v1/leases/{id}/token``    signed, owner only: a fresh token for a live lease
``POST /api/v1/leases/{id}/escrow``   signed, owner only: verify the escrow → the token
``POST /api/v1/leases/{id}/refund``   signed, owner only: the arbiter's half of a refund
``POST /api/v1/leases/{id}/ack``      signed, owner only: the user acknowledges usage
``GET  /api/v1/providers/connect``    websocket: the provider link
``GET  /relay/{lease}``               websocket: the relay (``?side=client|provider``)
``/api/v1/cohorts...``                classroom cohorts (:mod:`.cohort_handlers`)
``GET  .../{id}/queue/{ticket}``      signed, the ticket's student (a cohort's route, as
                                      the four below): its place and wait, the grant once
                                      served, or 410 ``gone`` (:mod:`.cohort_queue_handlers`)
``DELETE .../{id}/queue/{ticket}``    signed once, the ticket's student: leave the queue
``GET  .../{id}/reservations``        signed, instructors: the cohort's reservations
``POST .../{id}/reservations``        signed once, instructors: hold GPUs for a window
                                      → 201 the reservation
``DELETE .../{id}/reservations/{r}``  signed once, instructors: delete a reservation
``POST .../{id}/cohort-funding``      signed, the student: fund a cohort lease from
                                      the allowance (:mod:`.cohort_funding`, its route
                                      passed in by the server: it builds on this module)
``GET  /relay/ping``                  the relay's latency ping (``jupyter_io.ping``)
====================================  ========================================================

:func:`make_app` builds the application from a :class:`Services` bundle. Handlers parse,
authenticate and serialise; :class:`~jupyter_io.coordinator.leasing.LeaseService`,
:class:`~jupyter_io.coordinator.registry.Registry`,
:class:`~jupyter_io.coordinator.links.ProviderLinkSession` and
:class:`~jupyter_io.coordinator.relay.Relay` decide. The two websocket endpoints answer the
upgrade themselves and hand the socket over (:mod:`~jupyter_io.coordinator.sockets`): tornado
serves their HTTP request, not their messages.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from solders.pubkey import Pubkey
from tornado import web

from ..admission import HandshakeSlot, HandshakeSlots
from ..cohorts import is_cohort_id
from ..errors import AuthError, JupyterIOError, LeaseError, PaymentError
from ..ping import PingLimiter, parse_ping_path
from ..protocol import SUBPROTOCOL
from ..provider_link import MAX_INT
from ..signing import HEADER_LEASE_TOKEN, ReplayGuard, SignedRequest, verify_request
from ..usage_acks import AckAhead, AckRefused, StaleAck, UsageAck
from .billing import (
    DepositTooSmall,
    EscrowMissing,
    LedgerUnreachable,
    NotFunded,
    RefundNotAllowed,
    acknowledge,
)
from .cohort_queue import QueueFull, TooManyTickets
from .cohort_scheduling import CohortScheduling, TicketGone
from .cohorts import CohortError, CohortNotFound, CohortService, TooManyKernels
from .jobs import LeaderJobs, Leadership
from .latency import (
    DEFAULT_CANDIDATE_LIMIT,
    MAX_CANDIDATE_LIMIT,
    ProbeDirectory,
    candidates_json,
    parse_latencies,
    parse_max_latency,
)
from .leasing import (
    LeaseGone,
    LeaseGrant,
    LeaseNotFound,
    LeaseNotLive,
    LeaseService,
    NotLeaseOwner,
    TooManyUnfunded,
)
from .links import LinkConnection
from .offers import OffersCache
from .registry import Registry
from .relay import Relay
from .reliability import parse_min_reliability
from .replicas import ReplicaService
from .scheduler import LeaseRequest, NoCapacity
from .settlement import SettlementWorker
from .sockets import accept_upgrade, check_upgrade

__all__ = [
    "API_PREFIX",
    "BODY_LIMITS",
    "LINK_PATH",
    "MAX_BODY_SIZE",
    "RELAY_PREFIX",
    "Services",
    "make_app",
]

API_PREFIX = "/api/v1"
LINK_PATH = f"{API_PREFIX}/providers/connect"
RELAY_PREFIX = "/relay"
#: Largest body of a JSON endpoint, bytes: larger ones are answered 413 ``too_large`` before
#: they are read (:mod:`~jupyter_io.coordinator.body_limits`; the biggest legitimate body, a
#: lease request, is a few hundred bytes).
MAX_BODY_SIZE = 16 * 1024
#: Endpoints whose limit is not :data:`MAX_BODY_SIZE` (path regex, bytes): the websocket
#: upgrades take no body.
BODY_LIMITS: tuple[tuple[str, int], ...] = (
    (LINK_PATH, 0),
    (rf"{RELAY_PREFIX}/.*", 0),
)
#: Longest ``gpu`` and ``region`` a lease request may name (as a provider's inventory).
MAX_GPU_NAME = 128
MAX_REGION = 64

_LOG = logging.getLogger("jupyter_io.coordinator")


@dataclass
class Services:
    """What the handlers need; :class:`~.server.CoordinatorServer` builds it."""

    coordinator: Pubkey
    registry: Registry
    leases: LeaseService
    relay: Relay
    offers: OffersCache
    replay_guard: ReplayGuard
    links: set[LinkConnection] = field(default_factory=set)
    hello_timeout: float = 10.0
    #: Websocket connections in their handshake (provider link and relay clients).
    handshakes: HandshakeSlots = field(
        default_factory=lambda: HandshakeSlots(total=64, per_address=8, what="websocket")
    )
    request_max_skew: float = 60.0
    log: logging.Logger = _LOG
    #: ``"escrow"`` or ``"free"``, and the ledger's URL (empty when free).
    payments: str = "free"
    solana_url: str = ""
    #: The settlement worker (None when payments are free), for its counters.
    settlements: SettlementWorker | None = None
    #: Classroom cohorts (None: the cohort routes answer 404, leases take no ``cohort``).
    cohorts: CohortService | None = None
    #: The cohorts' queue, reservations and time rules (None: a full cohort is a 409).
    cohort_scheduling: CohortScheduling | None = None
    #: What users ping to measure each offer (None: offers carry no probe fields).
    probes: ProbeDirectory | None = None
    #: The relay ping's rate limit (None: pings are not answered).
    pings: PingLimiter | None = field(default_factory=PingLimiter)
    #: This process as a replica on a shared PostgreSQL (None: it follows no change feed).
    replica: ReplicaService | None = None
    #: The leader jobs' lock and passes (None: not started), for the status.
    leadership: Leadership | None = None
    jobs: LeaderJobs | None = None


# --------------------------------------------------------------------------------------------
# REST


class _ApiHandler(web.RequestHandler):
    """JSON in, JSON out, errors as ``{"error": {"code", "message"}}``."""

    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def send_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body, separators=(",", ":")))

    def fail(self, status: int, code: str, message: str) -> None:
        self.send_json({"error": {"code": code, "message": message}}, status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = (
            HTTPStatus(status_code).phrase if status_code in HTTPStatus._value2member_map_ else ""
        )
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else reason
        code = "internal" if status_code >= 500 else reason.lower().replace(" ", "_")
        self.finish(json.dumps({"error": {"code": code, "message": message}}))

    def signed(self, *, once: bool = False) -> Pubkey | None:
        """The key that signed this request, or None after answering 401 (``once``: refuse
        a replay too)."""
        services = self.services
        request = self.request
        now = time.time()
        try:
            signed: SignedRequest = verify_request(
                request.headers,
                request.method or "",
                request.uri or "",
                request.body or b"",
                now=now,
                max_skew=services.request_max_skew,
            )
            if once:
                services.replay_guard.check(signed, now=now)
        except AuthError as exc:
            self.fail(401, "unauthorized", str(exc))
            return None
        return signed.pubkey

    def lease_failure(self, exc: JupyterIOError) -> None:
        """Answer a lease service error with its status."""
        if isinstance(exc, PaymentError):
            self.payment_failure(exc)
        elif isinstance(exc, LeaseNotFound):
            self.fail(404, "not_found", str(exc))
        elif isinstance(exc, NotLeaseOwner):
            self.fail(403, "forbidden", str(exc))
        elif isinstance(exc, LeaseGone):
            self.fail(410, "gone", str(exc))
        elif isinstance(exc, LeaseNotLive):
            self.fail(409, "not_live", str(exc))
        elif isinstance(exc, AuthError):
            self.fail(401, "unauthorized", str(exc))
        else:
            self.fail(409, "no_offer", str(exc))

    def payment_failure(self, exc: PaymentError) -> None:
        """Answer a billing error (``docs/payments-contract.md``) with its status."""
        if isinstance(exc, LedgerUnreachable):
            self.fail(503, "ledger_unreachable", str(exc))
        elif isinstance(exc, DepositTooSmall):
            self.fail(402, "deposit_too_small", str(exc))
        elif isinstance(exc, (EscrowMissing, NotFunded)):
            self.fail(402, "escrow_missing", str(exc))
        elif isinstance(exc, RefundNotAllowed):
            self.fail(409, "conflict", str(exc))
        else:
            self.fail(502, "payment_failed", str(exc))

    def signed_with_signature(self) -> tuple[Pubkey, str | None] | None:
        """For ``/escrow`` and ``/refund``: the signer (once) and the body's optional
        transaction ``signature``; None after answering 401 or 400."""
        user = self.signed(once=True)
        if user is None:
            return None
        try:
            body = _json_body(self.request.body)
        except ValueError:
            body = None
        signature = body.get("signature") if isinstance(body, dict) else 0
        if signature is not None and not isinstance(signature, str):
            self.fail(400, "bad_request", 'the body must be {"signature": <base58 or null>}')
            return None
        return user, signature


class InfoHandler(_ApiHandler):
    def get(self) -> None:
        services = self.services
        escrow = services.payments == "escrow"
        self.send_json(
            {
                "coordinator": str(services.coordinator),
                "version": 1,
                "relay": services.relay.base_url,
                "payments": services.payments,
                "solana_url": services.solana_url if escrow else None,
                "arbiter": str(services.coordinator) if escrow else None,
            }
        )


class StatusHandler(_ApiHandler):
    def get(self) -> None:
        registry = self.services.registry
        stats = registry.stats
        relay = self.services.relay
        worker = self.services.settlements
        replica = self.services.replica
        self.send_json(
            {
                "providers_linked": registry.linked_count(),
                "providers_watched": len(registry.providers()),
                "offers": len(registry.index),
                "heartbeats": stats.heartbeats,
                "heartbeats_flushed": stats.heartbeats_flushed,
                # Heartbeats whose row a lease transaction held: written by the next flush.
                "heartbeats_deferred": stats.heartbeats_deferred,
                "flushes": stats.flushes,
                "flush_seconds": round(stats.flush_seconds, 6),
                "providers_lost": stats.providers_lost,
                "links_made": stats.links,
                "live_leases": sum(len(p.leases) for p in registry.providers()),
                "relay_connections": relay.active(),
                "relay_pairs": relay.stats.pairs,
                "uptime_s": round(time.monotonic() - stats.started, 3),
                "settlements": None if worker is None else worker.stats.to_json(),
                "replica": None if replica is None else replica.status_json(),
                "leader_jobs": (
                    None
                    if self.services.leadership is None
                    else self.services.leadership.to_json(
                        None if self.services.jobs is None else self.services.jobs.stats
                    )
                ),
            }
        )


class OffersHandler(_ApiHandler):
    def get(self) -> None:
        self.set_status(200)
        self.finish(self.services.offers.body())


class CandidatesHandler(_ApiHandler):
    """``GET /api/v1/offers/candidates?gpu=..&min_vram_bytes=..&gpus=..&max_price_lamports_per
    _hour=..&region=..&min_reliability=..&limit=..``: the lease request's fields as query
    arguments."""

    def get(self) -> None:
        query: dict[str, Any] = {}
        try:
            for name in ("gpu", "region"):
                value = self.get_query_argument(name, None)
                if value:
                    query[name] = value
            for name in ("min_vram_bytes", "gpus", "max_price_lamports_per_hour"):
                value = self.get_query_argument(name, None)
                if value:
                    query[name] = int(value)
            if reliable := self.get_query_argument("min_reliability", None):
                query["min_reliability"] = float(reliable)
            limit = int(self.get_query_argument("limit", str(DEFAULT_CANDIDATE_LIMIT)))
            if not 1 <= limit <= MAX_CANDIDATE_LIMIT:
                raise ValueError(f"'limit' must be between 1 and {MAX_CANDIDATE_LIMIT}")
            request = _lease_request(query)
        except ValueError as exc:
            self.fail(400, "bad_request", f"candidates: {exc}")
            return
        services = self.services
        directory = services.probes or ProbeDirectory(services.relay.base_url, lambda _: None)
        self.send_json(candidates_json(services.leases.index, request, directory, limit))


def _json_body(raw: bytes | None) -> Any:
    """A request body's JSON value (``{}`` when empty); :class:`ValueError` if it is not JSON,
    nests too deeply, or holds an integer of over 4300 digits."""
    try:
        return json.loads(raw or b"{}")
    except RecursionError:
        raise ValueError("the body nests too deeply") from None


def _lease_request(body: Any) -> LeaseRequest:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    known = {
        "cohort",
        "gpu",
        "min_vram_bytes",
        "gpus",
        "max_price_lamports_per_hour",
        "region",
        "max_latency_ms",
        "latency_ms",
        "min_reliability",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"unknown fields {unknown}; expected some of {sorted(known)}")
    gpu, region = body.get("gpu"), body.get("region")
    # Bounded like a provider's inventory names: the scheduler's name matching is not
    # linear in the length of what it is given.
    if gpu is not None and (not isinstance(gpu, str) or len(gpu) > MAX_GPU_NAME):
        raise ValueError(f"'gpu' must be a GPU model name of at most {MAX_GPU_NAME} characters")
    if region is not None and (not isinstance(region, str) or len(region) > MAX_REGION):
        raise ValueError(f"'region' must be a string of at most {MAX_REGION} characters")
    numbers: dict[str, int | None] = {}
    for name in ("min_vram_bytes", "max_price_lamports_per_hour", "gpus"):
        value = body.get(name)
        if value is not None and (type(value) is not int or not 0 <= value <= MAX_INT):
            raise ValueError(f"{name!r} must be an integer in 0..2**63-1 or null")
        numbers[name] = value
    gpus = numbers["gpus"] if numbers["gpus"] is not None else 1
    if not 1 <= gpus <= 64:
        raise ValueError("'gpus' must be between 1 and 64")
    return LeaseRequest(
        gpu=gpu or None,
        min_vram_bytes=numbers["min_vram_bytes"],
        gpus=gpus,
        max_price_lamports_per_hour=numbers["max_price_lamports_per_hour"],
        region=region or None,
        max_latency_ms=parse_max_latency(body.get("max_latency_ms")),
        min_reliability=parse_min_reliability(body.get("min_reliability")),
    )


class LeasesHandler(_ApiHandler):
    async def post(self) -> None:
        user = self.signed(once=True)
        if user is None:
            return
        try:
            body = _json_body(self.request.body)
            request = _lease_request(body)
            # What the user measured; a provider's own word on its latency is never asked.
            latencies = parse_latencies(body.get("latency_ms"))
        except ValueError as exc:
            self.fail(400, "bad_request", f"lease request: {exc}")
            return
        cohort = body.get("cohort")
        scheduling = self.services.cohort_scheduling
        try:
            if cohort is not None and scheduling is not None and scheduling.busy(cohort):
                # Others of the class wait: this request takes its turn in the queue.
                status, answer = await scheduling.take_turn(user, cohort, request)
                self.send_json(answer, status)
                return
            if cohort is not None:
                grant = await self._for_cohort(user, cohort, request, latencies=latencies)
            else:
                grant = await self.services.leases.request(user, request, latencies=latencies)
        except CohortError as exc:
            if isinstance(exc, TooManyKernels):
                self.set_header("Retry-After", "60")
            self.fail(exc.status, exc.code, str(exc))
            return
        except PaymentError as exc:
            self.payment_failure(exc)
            return
        except TooManyUnfunded as exc:
            self.set_header("Retry-After", str(exc.retry_after_seconds))
            self.fail(429, exc.code, str(exc))
            return
        except (TooManyTickets, QueueFull) as exc:
            self.set_header("Retry-After", "60")
            self.fail(429, exc.code, str(exc))
            return
        except TicketGone as exc:
            self.fail(409, "no_offer", str(exc))
            return
        except NoCapacity as exc:
            if cohort is not None and self.services.cohort_scheduling is not None:
                await self._queue(user, cohort, request)  # 202: a place in the class's queue
            else:
                self.fail(409, "no_offer", str(exc))
            return
        except LeaseError as exc:
            self.fail(409, "no_offer", str(exc))
            return
        self.send_json(grant.to_json(), 201)

    async def _queue(self, user: Pubkey, cohort: str, request: LeaseRequest) -> None:
        """Queue a cohort request that found no capacity (``docs/cohorts.md``, the queue)."""
        scheduling = self.services.cohort_scheduling
        assert scheduling is not None
        try:
            body = await scheduling.queue_request(str(user), cohort, request)
        except (TooManyTickets, QueueFull) as exc:
            self.set_header("Retry-After", "60")
            self.fail(429, exc.code, str(exc))
            return
        except JupyterIOError as exc:
            self.fail(409, "no_offer", str(exc))
            return
        self.send_json(body, 202)

    async def _for_cohort(
        self, user: Pubkey, cohort: Any, request: LeaseRequest, **options: Any
    ) -> LeaseGrant:
        """A lease on a cohort's pool (:meth:`CohortService.request_lease`)."""
        cohorts = self.services.cohorts
        if not is_cohort_id(cohort) or cohorts is None:
            raise CohortNotFound("'cohort' must be the id of a cohort on this coordinator")
        return await cohorts.request_lease(user, cohort, request, **options)

    async def get(self) -> None:
        user = self.signed()
        if user is None:
            return
        try:
            limit = int(self.get_query_argument("limit", "100"))
        except ValueError:
            self.fail(400, "bad_request", "limit must be an integer from 1 to 100")
            return
        leases = self.services.leases
        records = await leases.of_user(user, limit)
        self.send_json({"leases": await leases.describe(records)})


class LeaseHandler(_ApiHandler):
    async def get(self, lease_id: str) -> None:
        user = self.signed()
        if user is None:
            return
        leases = self.services.leases
        try:
            lease = await leases.get(user, lease_id)
            (body,) = await leases.describe([lease])
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        self.send_json(body)

    async def delete(self, lease_id: str) -> None:
        user = self.signed()
        if user is None:
            return
        leases = self.services.leases
        try:
            lease = await leases.end(user, lease_id)
            (body,) = await leases.describe([lease])
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        body["tunnel_url"] = None
        self.send_json(body)


class LeaseTokenHandler(_ApiHandler):
    async def post(self, lease_id: str) -> None:
        user = self.signed(once=True)
        if user is None:
            return
        try:
            grant = await self.services.leases.renew(user, lease_id)
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        self.send_json(grant.to_json())


class LeaseEscrowHandler(_ApiHandler):
    async def post(self, lease_id: str) -> None:
        request = self.signed_with_signature()
        if request is None:
            return
        user, signature = request
        try:
            grant = await self.services.leases.fund(user, lease_id, signature)
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        self.send_json(grant.to_json())


class LeaseRefundHandler(_ApiHandler):
    async def post(self, lease_id: str) -> None:
        request = self.signed_with_signature()
        if request is None:
            return
        user, signature = request
        leases = self.services.leases
        billing = leases.billing
        if billing is None:
            self.fail(409, "conflict", "this coordinator runs free leases: nothing to refund")
            return
        try:
            lease = await leases.get(user, lease_id)
            if signature is None:
                self.send_json(await billing.refund_offer(lease))
                return
            await billing.refund_submitted(lease, signature)
            (answer,) = await leases.describe([await leases.get(user, lease_id)])
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        self.send_json(answer)


class LeaseAckHandler(_ApiHandler):
    """The user's usage acknowledgement (:mod:`jupyter_io.usage_acks`): signed once, by the
    lease's user; 409 ``stale_ack`` / ``ack_ahead`` / ``not_live`` change nothing."""

    async def post(self, lease_id: str) -> None:
        user = self.signed(once=True)
        if user is None:
            return
        try:
            ack = UsageAck.parse(self.request.body or b"", lease_id)
        except AckRefused as exc:
            self.fail(400, "bad_request", str(exc))
            return
        leases = self.services.leases
        try:
            lease = await leases.get(user, lease_id)
            seconds = await acknowledge(leases.store, lease, ack, now=leases.clock())
        except StaleAck as exc:
            self.fail(409, "stale_ack", str(exc))
            return
        except AckAhead as exc:
            self.fail(409, "ack_ahead", str(exc))
            return
        except LookupError:
            self.fail(409, "not_live", f"lease {lease_id} is over: it takes no acknowledgement")
            return
        except JupyterIOError as exc:
            self.lease_failure(exc)
            return
        if self.services.cohort_scheduling is not None:
            self.services.cohort_scheduling.user_idle(lease_id, ack.idle_seconds)
        self.send_json({"lease": lease_id, "acknowledged_seconds": seconds})


# --------------------------------------------------------------------------------------------
# The provider link


class ProviderLinkHandler(_ApiHandler):
    """Answers the upgrade and hands the socket to a
    :class:`~jupyter_io.coordinator.links.LinkConnection`."""

    async def get(self) -> None:
        try:
            key = check_upgrade(self)
            slot = _handshake_slot(self, self.services)
        except web.HTTPError as exc:
            code = "busy" if exc.status_code == 503 else "upgrade"
            self.fail(exc.status_code, code, exc.log_message or "")
            return
        services = self.services
        link = LinkConnection(
            services.registry,
            coordinator=services.coordinator,
            hello_timeout=services.hello_timeout,
            log=services.log,
            on_closed=services.links.discard,
            slot=slot,
        )
        services.links.add(link)
        try:
            await link.start(accept_upgrade(self, key))
        except BaseException:
            slot.release()
            raise


def _handshake_slot(handler: web.RequestHandler, services: Services) -> HandshakeSlot:
    """A place among websocket connections in their handshake, or
    :class:`tornado.web.HTTPError` 503 (with ``Retry-After``) when the caller's address or
    the coordinator has none left."""
    address = handler.request.remote_ip or "unknown"
    slot = services.handshakes.admit(address)
    if slot is not None and slot.refusal is None:
        return slot
    reason = slot.refusal if slot is not None else "too many connections in their handshake"
    if slot is not None:
        slot.release()  # a refusal is answered at once: nothing to hold it for
    services.log.warning("refusing a websocket connection: %s", reason)
    handler.set_header("Retry-After", "5")
    raise web.HTTPError(503, reason)


# --------------------------------------------------------------------------------------------
# The relay


class RelayPingHandler(web.RequestHandler):
    """The relay's latency ping (:mod:`jupyter_io.ping`): the nonce back in a reply smaller
    than the request, or the connection cut without a word (a short or malformed ping, or one
    over the rate limit)."""

    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services

    def set_default_headers(self) -> None:
        for name in ("Server", "Content-Type", "Date"):
            self.clear_header(name)  # the reply stays far below the request

    def compute_etag(self) -> None:
        return None

    def get(self) -> None:
        request = self.request
        size = len(request.method or "") + len(request.uri or "") + len(request.version) + 6
        size += sum(len(name) + len(value) + 4 for name, value in request.headers.get_all())
        nonce = parse_ping_path(request.uri or "", size)
        pings = self.services.pings
        if (
            nonce is None
            or pings is None
            or not pings.allow(request.remote_ip or "unknown", time.monotonic())
        ):
            self.detach().close()
            return
        self.set_header("Connection", "close")
        self.finish(nonce)


class RelayHandler(web.RequestHandler):
    """Checks who connects to the relay, answers the websocket upgrade and hands the socket
    to the :class:`~jupyter_io.coordinator.relay.Relay`, whose frame forwarding is cheaper
    than tornado's websocket layer decoding and re-encoding every message."""

    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services

    async def get(self, lease_id: str) -> None:
        side = self.get_query_argument("side", "")
        slot: HandshakeSlot | None = None
        try:
            key = check_upgrade(self)
            if side == "client":
                slot = _handshake_slot(self, self.services)
                provider = await self._admit_client(lease_id)
            elif side == "provider":
                conn = await self._admit_provider(lease_id)
            else:
                raise web.HTTPError(400, "side must be client or provider")
        except web.HTTPError as exc:
            if slot is not None:
                slot.release()
            self.set_status(exc.status_code)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": {"code": "relay", "message": exc.log_message}}))
            return
        stream = accept_upgrade(self, key, (SUBPROTOCOL,))
        relay = self.services.relay
        if side == "client":
            try:
                await relay.open_client(lease_id, provider, stream, slot)
            except BaseException:
                if slot is not None:
                    slot.release()  # the relay never took it
                raise
        else:
            await relay.open_provider(lease_id, conn, stream)

    async def _admit_client(self, lease_id: str) -> str:
        token = self.request.headers.get(HEADER_LEASE_TOKEN)
        if not token:
            raise web.HTTPError(401, f"send the lease token in {HEADER_LEASE_TOKEN}")
        try:
            lease = await self.services.leases.admit_relay_client(lease_id, token)
        except JupyterIOError as exc:
            raise web.HTTPError(_status(exc), str(exc)) from None
        return lease.provider_pubkey

    async def _admit_provider(self, lease_id: str) -> int:
        try:
            conn = int(self.get_query_argument("conn", ""))
        except ValueError:
            raise web.HTTPError(400, "conn must be the number the dial named") from None
        services = self.services
        request = self.request
        try:
            signed = verify_request(
                request.headers,
                "GET",
                request.uri or "",
                b"",
                now=time.time(),
                max_skew=services.request_max_skew,
            )
            lease = await services.leases.admit_relay_provider(lease_id, signed.pubkey)
        except JupyterIOError as exc:
            raise web.HTTPError(_status(exc), str(exc)) from None
        if not services.relay.expects(lease_id, conn, lease.provider_pubkey):
            raise web.HTTPError(404, f"no client waits on connection {conn} of lease {lease_id}")
        return conn


def _status(exc: JupyterIOError) -> int:
    if isinstance(exc, LeaseNotFound):
        return 404
    if isinstance(exc, NotLeaseOwner):
        return 403
    if isinstance(exc, LeaseGone):
        return 410
    return 401


def make_app(
    services: Services,
    extra: list[tuple[str, type[web.RequestHandler], dict[str, Any]]] | None = None,
    **settings: Any,
) -> web.Application:
    """The tornado application serving every route of the module docstring (and ``extra``
    routes: the embedded ledger's ``/solana``)."""
    init = {"services": services}
    return web.Application(
        [
            *(extra or []),
            (rf"{API_PREFIX}/info", InfoHandler, init),
            (rf"{API_PREFIX}/status", StatusHandler, init),
            (rf"{API_PREFIX}/offers", OffersHandler, init),
            (rf"{API_PREFIX}/offers/candidates", CandidatesHandler, init),
            (rf"{API_PREFIX}/leases", LeasesHandler, init),
            (rf"{API_PREFIX}/leases/([A-Za-z0-9_-]{{1,64}})", LeaseHandler, init),
            (rf"{API_PREFIX}/leases/([A-Za-z0-9_-]{{1,64}})/token", LeaseTokenHandler, init),
            (rf"{API_PREFIX}/leases/([A-Za-z0-9_-]{{1,64}})/escrow", LeaseEscrowHandler, init),
            (rf"{API_PREFIX}/leases/([A-Za-z0-9_-]{{1,64}})/refund", LeaseRefundHandler, init),
            (rf"{API_PREFIX}/leases/([A-Za-z0-9_-]{{1,64}})/ack", LeaseAckHandler, init),
            (LINK_PATH, ProviderLinkHandler, init),
            (rf"{RELAY_PREFIX}/ping", RelayPingHandler, init),
            (rf"{RELAY_PREFIX}/([A-Za-z0-9_-]{{1,64}})", RelayHandler, init),
        ],
        default_handler_class=_NotFound,
        default_handler_args=init,
        **settings,
    )


class _NotFound(_ApiHandler):
    def prepare(self) -> None:
        self.fail(
            404,
            "not_found",
            f"no such endpoint {self.request.path}; the API is under {API_PREFIX}/",
        )
