"""An async client of the coordinator's REST API, for users, provisioners and the CLI.

::

    client = CoordinatorClient("http://127.0.0.1:8700", keypair)
    grant = await client.request_lease(gpu="RTX 4090", max_price_lamports_per_hour=2_000_000)
    # connect the tunnel to grant.tunnel_url, presenting grant.token (relay: as the
    # X-JIO-Lease-Token header too, see relay_headers())
    await client.end_lease(grant.lease)
    client.close()

With an escrow coordinator (``docs/payments-contract.md``) the grant of ``request_lease``
has no token yet (``grant.token is None``, ``grant.escrow.required``): open the escrow that
``grant.escrow`` describes (:class:`~jupyter_io.payments.hooks.SolanaEscrowHook`), then
``grant = await client.fund_lease(grant.lease, setup_signature)`` returns the grant with its
token and ``grant.billing``. When the provider failed, :meth:`CoordinatorClient.request_refund`
hands out the refund transaction the arbiter signed; the user co-signs, submits it and
:meth:`CoordinatorClient.report_refund` s the signature. :meth:`CoordinatorClient.list_leases`
is the caller's history, newest first.

Requests that act for a key are signed with
:func:`~jupyter_io.signing.sign_request`. Errors: :class:`~jupyter_io.errors.LeaseError`
when no offer fits (409, with the coordinator's message naming the GPU types or the cheapest
price), :class:`~jupyter_io.errors.AuthError` for 401/403,
:class:`~jupyter_io.errors.InsufficientFunds` for a deposit that is too small (402
``deposit_too_small``), :class:`CoordinatorPaymentError` (a
:class:`~jupyter_io.errors.PaymentError`) for the other payment refusals (402 ``escrow_missing``,
503 ``ledger_unreachable``), :class:`CoordinatorError` for everything else (unreachable, 404,
5xx), each with the coordinator's message, which says what to do. A URL that reaches no
coordinator says so within a second or two: ``https://`` to a plain-HTTP server and
``http://`` to a TLS one name the scheme to use (:mod:`jupyter_io.tls`), and a server whose
answers are not a coordinator's (Jupyter's own port, say) is named as not one.

A coordinator run as several replicas on one database is given as a list of URLs (a sequence,
or one text separating them with commas: ``"http://a:8700,http://b:8700"``) or as one name
behind a load balancer. The client sticks to the URL that answered last, and moves to the next
one only when a request cannot have reached a coordinator: the connection was refused, the
name did not resolve, the host was unreachable or the connection timed out before it was
made, or (for GET and DELETE, which may be repeated) it closed before any answer. A POST
whose connection broke after it was sent, or that timed out waiting for its answer, is never
sent again (it may have been applied): it raises :class:`CoordinatorError`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from solders.keypair import Keypair
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from .coordinator_urls import parse_coordinator_urls
from .errors import (
    AuthError,
    ConfigError,
    InsufficientFunds,
    JupyterIOError,
    LeaseError,
    PaymentError,
)
from .payments.amounts import covered_seconds
from .queue_tickets import QueuePlace, progress_message, queue_path
from .signing import HEADER_LEASE_TOKEN, sign_request
from .tls import SchemeMismatch, dial_checked, scheme_mismatch, untrusted_certificate
from .usage_acks import UsageAck, ack_path

__all__ = [
    "BUDGET_EXHAUSTED",
    "ESCROW_NOT_INTACT",
    "NOT_FUNDED_IN_TIME",
    "NOT_STARTED_IN_TIME",
    "Billing",
    "CohortFundingOffer",
    "CoordinatorClient",
    "CoordinatorError",
    "CoordinatorPaymentError",
    "EscrowOffer",
    "LeaseGrant",
    "LeaseInfo",
    "LeaseQueued",
    "PaymentsInfo",
    "RefundOffer",
    "SettlementInfo",
    "TooManyPendingLeases",
]

#: The end reason of a lease the coordinator ended because its deposit was spent.
BUDGET_EXHAUSTED = "budget exhausted"
#: The end reason of a lease the coordinator ended because its escrow changed while it ran
#: (closed, no longer exactly the verified 2-of-3 escrow, or holding less than verified).
ESCROW_NOT_INTACT = "escrow no longer intact"
#: The end reason of a lease whose escrow was not verified within the coordinator's claim
#: window (``claim_window``, 60 s by default) of its request.
NOT_FUNDED_IN_TIME = "not funded in time"
#: The end reason of a lease whose session did not start within the claim window (of its
#: funding; of its request on a free coordinator).
NOT_STARTED_IN_TIME = "not started in time"


class CoordinatorError(JupyterIOError):
    """The coordinator could not be reached or answered with an unexpected error."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TooManyPendingLeases(LeaseError):
    """The coordinator refused a lease request for now (HTTP 429): this key already holds
    as many unfunded leases as it may (``code = "unfunded_limit"``), or the coordinator does
    in all (``"unfunded_capacity"``). The message says which and when to retry;
    ``retry_after`` is the ``Retry-After`` header in seconds (None if absent)."""

    def __init__(self, message: str, code: str | None, retry_after: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class LeaseQueued(LeaseError):
    """A cohort's lease request was queued (HTTP 202): no GPU of the class's types is free
    now. ``place`` says where it waits; poll it with :meth:`CoordinatorClient.queue_ticket`
    (every :data:`~jupyter_io.queue_tickets.POLL_SECONDS`) until it is served, or cancel it
    with :meth:`CoordinatorClient.cancel_queue_ticket`. A caller that does not wait treats it
    as the refusal it also is."""

    def __init__(self, place: QueuePlace) -> None:
        super().__init__(progress_message(place))
        self.place = place


class CoordinatorPaymentError(PaymentError):
    """The coordinator refused a payment step: no valid escrow (402 ``escrow_missing``), its
    ledger cannot be reached (503 ``ledger_unreachable``), a refund it cannot offer. The
    message is the coordinator's."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _int(body: Mapping[str, Any], key: str) -> int:
    value = body.get(key)
    return 0 if value is None else int(value)


@dataclass(frozen=True, slots=True)
class EscrowOffer:
    """How a lease must be paid (the ``escrow`` block of a lease's ``201``).

    ``required`` False: a free pool, the grant has its token already. Otherwise open an
    escrow for (user, provider, ``arbiter``) on the ledger at ``solana_url`` holding at least
    ``min_deposit_lamports``, then :meth:`CoordinatorClient.fund_lease`.
    """

    required: bool
    arbiter: str | None = None
    solana_url: str | None = None
    min_deposit_lamports: int = 0
    #: Once funded: the escrow's address and the deposit the coordinator verified.
    address: str | None = None
    deposit_lamports: int | None = None
    #: ``"cohort"``: the cohort's pool pays (:meth:`CoordinatorClient.cohort_funding_offer`,
    #: not your own escrow); None: your wallet does.
    funding: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any] | None) -> EscrowOffer | None:
        if not isinstance(body, Mapping):
            return None
        deposit = body.get("deposit_lamports")
        return cls(
            required=bool(body.get("required")),
            arbiter=body.get("arbiter"),
            solana_url=body.get("solana_url"),
            min_deposit_lamports=_int(body, "min_deposit_lamports"),
            address=body.get("address"),
            deposit_lamports=None if deposit is None else int(deposit),
            funding=body.get("funding") if isinstance(body.get("funding"), str) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The block as the coordinator sends it (``{"required": false}`` for a free lease;
        ``address`` and ``deposit_lamports`` once funded)."""
        if not self.required:
            return {"required": False}
        body: dict[str, Any] = {
            "required": self.required,
            "arbiter": self.arbiter,
            "solana_url": self.solana_url,
            "min_deposit_lamports": self.min_deposit_lamports,
        }
        if self.funding is not None:
            body["funding"] = self.funding
        if self.address is not None:
            body["address"] = self.address
            body["deposit_lamports"] = self.deposit_lamports
        return body


@dataclass(frozen=True, slots=True)
class SettlementInfo:
    """A funded lease's settlement as the coordinator's durable queue records it.

    ``kind``: ``settle`` (the lease ended; arbiter + provider sign) or ``refund`` (the
    provider failed; user + arbiter sign). ``state``: ``pending`` (retried until done),
    ``done`` (the escrow is closed; ``signature`` is the transaction that closed it when the
    coordinator knows it) or ``failed``.
    """

    kind: str
    state: str
    amount_lamports: int
    signature: str | None
    attempts: int
    error: str | None
    #: What the closing transaction cost in fees (0 until done, or unknown).
    fee_lamports: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any] | None) -> SettlementInfo | None:
        if not isinstance(body, Mapping):
            return None
        return cls(
            kind=str(body.get("kind") or ""),
            state=str(body.get("state") or ""),
            amount_lamports=_int(body, "amount_lamports"),
            signature=body.get("signature"),
            attempts=_int(body, "attempts"),
            error=body.get("error"),
            fee_lamports=_int(body, "fee_lamports"),
        )

    def to_json(self) -> dict[str, Any]:
        """The block as the coordinator sends it."""
        return {
            "kind": self.kind,
            "state": self.state,
            "amount_lamports": self.amount_lamports,
            "fee_lamports": self.fee_lamports,
            "signature": self.signature,
            "attempts": self.attempts,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Billing:
    """What a lease has cost so far (the ``billing`` block; amounts in exact lamports).

    ``warning`` is 80, 95 or 100 once that share of the deposit is spent; at 100 the
    coordinator ends the lease (budget exhausted).
    """

    deposit_lamports: int
    billed_seconds: int
    spent_lamports: int
    left_lamports: int
    used_fraction: float
    warning: int | None
    escrow: str | None
    escrow_signature: str | None
    settlement: SettlementInfo | None
    #: What the provider reported delivering, and what the user acknowledged (None: a lease
    #: from before acknowledgements, or a coordinator that does not say).
    reported_seconds: int = 0
    acknowledged_seconds: int | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any] | None) -> Billing | None:
        if not isinstance(body, Mapping):
            return None
        warning = body.get("warning")
        acknowledged = body.get("acknowledged_seconds")
        return cls(
            deposit_lamports=_int(body, "deposit_lamports"),
            billed_seconds=_int(body, "billed_seconds"),
            spent_lamports=_int(body, "spent_lamports"),
            left_lamports=_int(body, "left_lamports"),
            used_fraction=float(body.get("used_fraction") or 0.0),
            warning=None if warning is None else int(warning),
            escrow=body.get("escrow"),
            escrow_signature=body.get("escrow_signature"),
            settlement=SettlementInfo.from_json(body.get("settlement")),
            reported_seconds=_int(body, "reported_seconds"),
            acknowledged_seconds=None if acknowledged is None else int(acknowledged),
        )

    def to_json(self) -> dict[str, Any]:
        """The block as the coordinator sends it."""
        return {
            "deposit_lamports": self.deposit_lamports,
            "billed_seconds": self.billed_seconds,
            "reported_seconds": self.reported_seconds,
            "acknowledged_seconds": self.acknowledged_seconds,
            "spent_lamports": self.spent_lamports,
            "left_lamports": self.left_lamports,
            "used_fraction": self.used_fraction,
            "warning": self.warning,
            "escrow": self.escrow,
            "escrow_signature": self.escrow_signature,
            "settlement": self.settlement.to_json() if self.settlement is not None else None,
        }

    @property
    def exhausted(self) -> bool:
        """True once the whole deposit is spent (the coordinator then ends the lease)."""
        return self.warning is not None and self.warning >= 100


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease (the body of ``201`` to ``POST /api/v1/leases``, or of ``200`` to its
    ``/escrow`` and ``/token``).

    ``token`` is None while an escrow lease waits for its escrow (``escrow.required``);
    ``billing`` comes with a funded grant.
    """

    lease: str
    token: str | None
    provider: str
    tunnel_url: str
    relay: bool
    gpu: str
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    expires_at: float
    state: str | None = None
    escrow: EscrowOffer | None = None
    billing: Billing | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> LeaseGrant:
        expires = body.get("expires_at")
        return cls(
            lease=body["lease"],
            token=body.get("token"),
            provider=body["provider"],
            tunnel_url=body["tunnel_url"],
            relay=bool(body["relay"]),
            gpu=body["gpu"],
            gpu_indices=tuple(body["gpu_indices"]),
            price_lamports_per_hour=int(body["price_lamports_per_hour"]),
            expires_at=0.0 if expires is None else float(expires),
            state=body.get("state"),
            escrow=EscrowOffer.from_json(body.get("escrow")),
            billing=Billing.from_json(body.get("billing")),
        )

    @property
    def needs_escrow(self) -> bool:
        """True while the lease waits for its escrow: no token until it is funded."""
        return self.token is None and self.escrow is not None and self.escrow.required

    def relay_headers(self) -> dict[str, str]:
        """Headers the relay's client side needs (empty for a direct lease)."""
        return {HEADER_LEASE_TOKEN: self.token} if self.relay and self.token else {}


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as ``GET /api/v1/leases/{id}`` shows it; times are Unix seconds."""

    lease: str
    user: str
    provider: str
    gpu: str
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    state: str
    relay: bool
    tunnel_url: str | None
    requested_at: float
    active_at: float | None
    ended_at: float | None
    end_of_service: float | None
    failure_reason: str | None
    expires_at: float | None
    #: Why the lease ended (``budget exhausted``, ...), when the coordinator says.
    end_reason: str | None = None
    escrow: EscrowOffer | None = None
    billing: Billing | None = None
    #: The cohort paying for it (None: the user's own escrow).
    cohort: str | None = None
    #: The coordinator's warnings of a coming stop (a cohort's idle timeout, max session
    #: length, weekly quota): ``{"kind", "at", "message"}`` each.
    warnings: tuple[dict[str, Any], ...] = ()
    #: When the coordinator will end it (Unix seconds), when it has said.
    ends_at: float | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> LeaseInfo:
        return cls(
            lease=body["lease"],
            user=body["user"],
            provider=body["provider"],
            gpu=body["gpu"],
            gpu_indices=tuple(body["gpu_indices"]),
            price_lamports_per_hour=int(body["price_lamports_per_hour"]),
            state=body["state"],
            relay=bool(body["relay"]),
            tunnel_url=body.get("tunnel_url"),
            requested_at=float(body["requested_at"]),
            active_at=body.get("active_at"),
            ended_at=body.get("ended_at"),
            end_of_service=body.get("end_of_service"),
            failure_reason=body.get("failure_reason"),
            expires_at=body.get("expires_at"),
            end_reason=body.get("end_reason") or body.get("reason"),
            escrow=EscrowOffer.from_json(body.get("escrow")),
            billing=Billing.from_json(body.get("billing")),
            cohort=body.get("cohort") or None,
            warnings=tuple(w for w in body.get("warnings") or () if isinstance(w, dict)),
            ends_at=body.get("ends_at"),
        )

    @property
    def live(self) -> bool:
        return self.state in ("requested", "active")

    @property
    def why_ended(self) -> str | None:
        """Why the lease ended, as the coordinator recorded it; for a lease ended before
        coordinators recorded reasons, :data:`BUDGET_EXHAUSTED` when its billing shows the
        deposit spent. None when neither says."""
        if self.end_reason:
            return self.end_reason
        return BUDGET_EXHAUSTED if self.budget_exhausted else None

    @property
    def budget_exhausted(self) -> bool:
        """True when the coordinator ended the lease because its deposit was spent: it says
        so (a reason, a 100 % warning), or the lease ran, by the coordinator's own clock,
        the whole time its deposit covers (the coordinator ends it at exactly that time)."""
        if self.live:
            return False
        reasons = (self.end_reason or "", self.failure_reason or "")
        if any("budget" in reason.lower() for reason in reasons):
            return True
        billing = self.billing
        if billing is None or not billing.deposit_lamports:
            return False
        if billing.exhausted:
            return True
        price = self.price_lamports_per_hour
        if price <= 0 or self.active_at is None or self.ended_at is None:
            return False
        covered = covered_seconds(price, billing.deposit_lamports)
        return (
            self.state == "ended"
            and covered is not None
            and self.ended_at - self.active_at >= covered
        )


@dataclass(frozen=True, slots=True)
class CohortFundingOffer:
    """The funding of a cohort lease from your allowance (``POST /api/v1/leases/{id}/
    cohort-funding`` with ``{}``): the transaction's ``message`` (fee payer: the arbiter) and
    the ``deposit`` it moves into the lease's escrow. Check it
    (:func:`~jupyter_io.payments.cohort_pool.match_cohort_funding`), sign it, then
    :meth:`CoordinatorClient.submit_cohort_funding`."""

    lease: str
    message: MessageV0
    raw: bytes
    deposit: int

    @classmethod
    def from_json(cls, lease: str, body: Mapping[str, Any]) -> CohortFundingOffer:
        try:
            raw = base64.b64decode(body["message"], validate=True)
            message = MessageV0.from_bytes(raw)
            deposit = int(body["deposit_lamports"])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise CoordinatorPaymentError(
                f"the coordinator's funding of cohort lease {lease} is malformed ({exc}); "
                f"nothing was signed"
            ) from None
        return cls(lease, message, raw, deposit)


@dataclass(frozen=True, slots=True)
class RefundOffer:
    """The refund of a failed lease's escrow (``POST /api/v1/leases/{id}/refund``): the
    transaction's ``message`` (fee payer: the user), the arbiter's signature of it, and the
    provider's share for the seconds it delivered. Check it, co-sign, submit, then
    :meth:`CoordinatorClient.report_refund`."""

    lease: str
    message: MessageV0
    arbiter_signature: Signature
    provider_share: int

    @classmethod
    def from_json(cls, lease: str, body: Mapping[str, Any]) -> RefundOffer:
        try:
            message = MessageV0.from_bytes(base64.b64decode(body["message"], validate=True))
            signature = Signature.from_string(body["arbiter_signature"])
            share = int(body["provider_share"])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise CoordinatorPaymentError(
                f"the coordinator's refund offer for lease {lease} is malformed ({exc}); "
                f"nothing was signed"
            ) from None
        return cls(lease, message, signature, share)


@dataclass(frozen=True, slots=True)
class PaymentsInfo:
    """How a coordinator is paid (from ``GET /api/v1/info``): ``payments`` is ``escrow`` or
    ``free``; ``solana_url`` is the ledger escrows live on and ``arbiter`` the coordinator's
    key (None for a free coordinator)."""

    payments: str
    solana_url: str | None
    arbiter: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> PaymentsInfo:
        # A coordinator from before payments leases for free.
        return cls(
            payments=str(body.get("payments") or "free"),
            solana_url=body.get("solana_url") or None,
            arbiter=body.get("arbiter") or None,
        )


class CoordinatorClient:
    """Talks to one coordinator, given as one URL or as its replicas' URLs (see the module
    docstring). ``keypair`` signs lease requests (not needed for :meth:`info` and
    :meth:`offers`). ``ca_certs`` trusts a private CA for https. Call :meth:`close` when
    done (or use ``async with``)."""

    def __init__(
        self,
        url: str | Sequence[str],
        keypair: Keypair | None = None,
        *,
        timeout: float = 30.0,
        ca_certs: str | None = None,
    ) -> None:
        #: The coordinator's URLs, in the order given.
        self.urls = parse_coordinator_urls(url, what="coordinator URL")
        if not self.urls:
            raise ConfigError("no coordinator URL given; e.g. http://HOST:8700")
        self._index = 0
        self.keypair = keypair
        self.timeout = timeout
        self.ca_certs = ca_certs
        self._http = AsyncHTTPClient(force_instance=True)
        #: The URLs that answered like a jupyter-io coordinator (their scheme and identity
        #: need no more checking).
        self._known: set[str] = set()

    @property
    def url(self) -> str:
        """The URL requests go to now: the one that answered last."""
        return self.urls[self._index]

    @property
    def _base_path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    @property
    def _peer_known(self) -> bool:
        return self.url in self._known

    @_peer_known.setter
    def _peer_known(self, known: bool) -> None:
        if known:
            self._known.add(self.url)
        else:
            self._known.discard(self.url)

    def close(self) -> None:
        self._http.close()

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """``{"coordinator", "version", "relay", "payments", "solana_url", "arbiter"}``: check
        you reached the right coordinator (:meth:`payments` types the payment fields)."""
        return await self._call("GET", "/api/v1/info")

    async def payments(self) -> PaymentsInfo:
        """How this coordinator's leases are paid: ``escrow`` or ``free``, its ledger's URL
        and its arbiter key."""
        return PaymentsInfo.from_json(await self.info())

    async def offers(self) -> dict[str, Any]:
        """``{"types": [...], "providers": [...]}``: what is on offer now."""
        return await self._call("GET", "/api/v1/offers")

    async def status(self) -> dict[str, Any]:
        """The coordinator's counters (providers linked, heartbeats absorbed, ...)."""
        return await self._call("GET", "/api/v1/status")

    async def request_lease(
        self,
        gpu: str | None = None,
        *,
        gpus: int = 1,
        min_vram_bytes: int | None = None,
        max_price_lamports_per_hour: int | None = None,
        region: str | None = None,
        max_latency_ms: float | None = None,
        latency_ms: Mapping[str, float] | None = None,
        cohort: str | None = None,
        min_reliability: float | None = None,
    ) -> LeaseGrant:
        """Lease GPUs; :class:`LeaseError` with the coordinator's reason when none fits.

        ``latency_ms``: the round trips you measured to providers (``jupyter_io.latency``);
        the scheduler weighs them, and ``max_latency_ms`` only admits providers measured
        within it. ``min_reliability`` (0..1) only admits providers whose measured 30-day
        reliability is at least that (never one with no record yet)."""
        body: dict[str, Any] = {
            "gpu": gpu,
            "min_vram_bytes": min_vram_bytes,
            "gpus": gpus,
            "max_price_lamports_per_hour": max_price_lamports_per_hour,
            "region": region,
        }
        if cohort is not None:  # on that cohort's pool (docs/cohorts.md)
            body["cohort"] = cohort
        if max_latency_ms is not None:
            body["max_latency_ms"] = max_latency_ms
        if latency_ms:
            body["latency_ms"] = dict(latency_ms)
        if min_reliability is not None:
            body["min_reliability"] = min_reliability
        payload = await self._call("POST", "/api/v1/leases", body, sign=True)
        if "queued" in payload:
            raise LeaseQueued(QueuePlace.from_json(payload["queued"]))
        return LeaseGrant.from_json(payload)

    async def queue_ticket(self, place: QueuePlace) -> LeaseGrant | QueuePlace:
        """Your queued request now: its new place, or the lease grant once served. Raises
        :class:`LeaseError` with the coordinator's reason when it expired or was cancelled."""
        try:
            payload = await self._call("GET", queue_path(place.cohort, place.ticket), sign=True)
        except CoordinatorError as exc:
            if exc.status in (404, 410):
                raise LeaseError(str(exc)) from None
            raise
        if "lease" in payload:
            return LeaseGrant.from_json(payload["lease"])
        return QueuePlace.from_json(payload.get("queued"))

    async def cancel_queue_ticket(self, place: QueuePlace) -> None:
        """Withdraw your queued request (a served or expired one is left as it is)."""
        await self._call("DELETE", queue_path(place.cohort, place.ticket), sign=True)

    async def candidates(
        self,
        gpu: str | None = None,
        *,
        gpus: int = 1,
        min_vram_bytes: int | None = None,
        max_price_lamports_per_hour: int | None = None,
        region: str | None = None,
        limit: int = 8,
    ) -> list[dict[str, Any]]:
        """The offers a lease request with these terms would weigh, cheapest first, each with
        what to ping (``probe_url``, ``via_relay``, ``relay_hop_ms``): measure them with
        :class:`jupyter_io.latency.LatencyProber`, then pass the figures to
        :meth:`request_lease`. Unsigned."""
        query: dict[str, Any] = {"gpus": gpus, "limit": limit}
        for name, value in (
            ("gpu", gpu),
            ("min_vram_bytes", min_vram_bytes),
            ("max_price_lamports_per_hour", max_price_lamports_per_hour),
            ("region", region),
        ):
            if value is not None:
                query[name] = value
        body = await self._call("GET", f"/api/v1/offers/candidates?{urlencode(query)}")
        found = body.get("candidates")
        return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []

    async def get_lease(self, lease_id: str) -> LeaseInfo:
        """Your lease's record (state, times, failure reason)."""
        return LeaseInfo.from_json(await self._call("GET", f"/api/v1/leases/{lease_id}", sign=True))

    async def end_lease(self, lease_id: str) -> LeaseInfo:
        """End your lease (idempotent); returns its final record."""
        return LeaseInfo.from_json(
            await self._call("DELETE", f"/api/v1/leases/{lease_id}", sign=True)
        )

    async def renew_token(self, lease_id: str) -> LeaseGrant:
        """A fresh token for your live lease (to resume a session after the old one expired).
        An escrow lease not funded yet is refused (:class:`PaymentError`, 402)."""
        return LeaseGrant.from_json(
            await self._call("POST", f"/api/v1/leases/{lease_id}/token", b"", sign=True)
        )

    async def list_leases(self, limit: int = 20) -> list[LeaseInfo]:
        """Your leases, newest first, each with its ``billing`` (at most ``limit``, ≤ 100)."""
        if not 1 <= limit <= 100:
            raise ConfigError(f"list at least 1 and at most 100 leases, not {limit}")
        body = await self._call("GET", f"/api/v1/leases?limit={limit}", sign=True)
        rows = body.get("leases")
        if not isinstance(rows, list):
            raise CoordinatorError(
                f"the coordinator at {self.url} answered GET /api/v1/leases without a 'leases' "
                f"list; is it a jupyter-io coordinator of this version?"
            )
        return [LeaseInfo.from_json(row) for row in rows]

    async def fund_lease(self, lease_id: str, signature: str | None) -> LeaseGrant:
        """Tell the coordinator your lease's escrow is open (``signature``: the setup
        transaction's, None when the escrow existed already); it verifies the escrow on-chain
        and returns the grant with its token and ``billing``. Call it again after a top-up
        to raise the recorded deposit.

        Raises :class:`InsufficientFunds` when the escrow holds less than the coordinator's
        minimum, :class:`CoordinatorPaymentError` when it finds no escrow or cannot reach its
        ledger, :class:`LeaseError` when the lease is no longer live.
        """
        body = {"signature": signature}
        return LeaseGrant.from_json(
            await self._call("POST", f"/api/v1/leases/{lease_id}/escrow", body, sign=True)
        )

    async def cohort_funding_offer(self, lease_id: str) -> CohortFundingOffer:
        """The funding of your cohort lease from your allowance, as the arbiter built it:
        check it, sign it, then :meth:`submit_cohort_funding`."""
        body = await self._call("POST", f"/api/v1/leases/{lease_id}/cohort-funding", {}, sign=True)
        return CohortFundingOffer.from_json(lease_id, body)

    async def cohort_instructor(self, cohort_id: str) -> Pubkey:
        """The instructor who created cohort ``cohort_id`` and owns its students'
        allowances (from ``GET /api/v1/cohorts/{id}``: you must be in the cohort)."""
        body = await self._call("GET", f"/api/v1/cohorts/{cohort_id}", sign=True)
        try:
            return Pubkey.from_string(body["instructor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CoordinatorPaymentError(
                f"the coordinator's cohort {cohort_id} names no instructor ({exc})"
            ) from None

    async def submit_cohort_funding(
        self, offer: CohortFundingOffer, signature: Signature
    ) -> LeaseGrant:
        """Your ``signature`` of ``offer``'s message: the arbiter co-signs and submits it,
        verifies the escrow and answers the grant with its token."""
        body = {"signature": str(signature), "message": base64.b64encode(offer.raw).decode()}
        return LeaseGrant.from_json(
            await self._call(
                "POST", f"/api/v1/leases/{offer.lease}/cohort-funding", body, sign=True
            )
        )

    async def request_refund(self, lease_id: str) -> RefundOffer:
        """The refund transaction of your failed lease's escrow, signed by the arbiter (the
        provider was lost): check it, co-sign it, submit it, then :meth:`report_refund`."""
        body = await self._call("POST", f"/api/v1/leases/{lease_id}/refund", {}, sign=True)
        return RefundOffer.from_json(lease_id, body)

    async def report_refund(self, lease_id: str, signature: str) -> LeaseInfo:
        """Tell the coordinator the refund landed (``signature``: the transaction's); it
        checks the escrow is closed and marks the settlement done. Returns the lease record
        with its billing."""
        return LeaseInfo.from_json(
            await self._call(
                "POST", f"/api/v1/leases/{lease_id}/refund", {"signature": signature}, sign=True
            )
        )

    async def acknowledge_usage(self, ack: UsageAck) -> int:
        """Acknowledge that your lease ``ack.lease``'s kernel served you ``ack.seconds``
        seconds so far (:mod:`jupyter_io.usage_acks`); returns the count the coordinator
        holds now. Raises :class:`LeaseError` for the coordinator's 409s (``stale_ack``: an
        older count; ``ack_ahead``: more than it observed; ``not_live``: the lease is over),
        which change nothing, and :class:`AuthError` for a lease that is not yours."""
        body = await self._call("POST", ack_path(ack.lease), ack.encode(), sign=True)
        return _int(body, "acknowledged_seconds")

    # -- plumbing --------------------------------------------------------------------------

    async def _unreachable(self, exc: BaseException | None) -> str:
        if isinstance(exc, SchemeMismatch):
            return str(exc)  # names the URL and its fix
        untrusted = untrusted_certificate(exc)
        if untrusted is not None:
            return f"cannot reach the coordinator at {self.url}: {untrusted}"
        # http:// to a TLS server: it drops the connection at once.
        mismatch = await scheme_mismatch(self.url)
        if mismatch is not None:
            return mismatch
        return (
            f"cannot reach the coordinator at {self.url}: {exc}; is `jupyter io coordinator` "
            f"running there?"
        )

    async def _not_a_coordinator(
        self, method: str, path: str, response: HTTPResponse
    ) -> str | None:
        """When ``response`` (to ``method path``) has no jupyter-io shape: the message that
        says this URL is some other server, or None when ``GET /api/v1/info`` shows it is a
        coordinator after all (one of another version, say)."""
        if (method, path) != ("GET", "/api/v1/info"):
            try:
                response = await self._http.fetch(
                    HTTPRequest(
                        self.url + "/api/v1/info",
                        headers={"Accept": "application/json"},
                        request_timeout=self.timeout,
                        connect_timeout=min(10.0, self.timeout),
                        ca_certs=self.ca_certs,
                    ),
                    raise_error=False,
                )
            except OSError:
                return None
        if response.code == 599 or response.code >= 500:
            return None  # a proxy in front of a coordinator that is down, say
        info = _json(response)
        if 200 <= response.code < 300 and isinstance(info, dict) and "coordinator" in info:
            return None
        what = f"HTTP {response.code}" if response.code >= 300 else "no coordinator's answer"
        return (
            f"{self.url} answered, but it is not a jupyter-io coordinator (GET /api/v1/info: "
            f"{what}); check the URL/port"
        )

    async def _call(
        self, method: str, path: str, body: Any = None, *, sign: bool = False
    ) -> dict[str, Any]:
        """``method path`` at the current URL, or at the next ones while it cannot have
        reached a coordinator there (see the module docstring)."""
        start = self._index
        failures: list[str] = []
        last = _NotDelivered("no URL")
        for step in range(len(self.urls)):
            self._index = (start + step) % len(self.urls)
            try:
                return await self._call_once(method, path, body, sign=sign)
            except _NotDelivered as exc:
                named = self.url in exc.reason
                failures.append(exc.reason if named else f"{self.url}: {exc.reason}")
                last = exc
        self._index = start
        if len(self.urls) == 1:
            raise CoordinatorError(last.reason, last.status) from None
        raise CoordinatorError(
            f"none of the coordinator's {len(self.urls)} URLs could be reached: "
            + "; ".join(failures)
        ) from None

    async def _call_once(
        self, method: str, path: str, body: Any = None, *, sign: bool = False
    ) -> dict[str, Any]:
        data: bytes | None
        if body is None:
            data = None if method in ("GET", "DELETE") else b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if sign:
            if self.keypair is None:
                raise ConfigError("this request must be signed: give CoordinatorClient a keypair")
            signed_path = self._base_path + path  # what the server sees as the request path
            headers.update(sign_request(self.keypair, method, signed_path, data or b""))
        request = HTTPRequest(
            self.url + path,
            method=method,
            headers=headers,
            body=data,
            request_timeout=self.timeout,
            connect_timeout=min(10.0, self.timeout),
            ca_certs=self.ca_certs,
            allow_nonstandard_methods=True,
        )
        try:
            fetch = self._http.fetch(request, raise_error=False)
            # https:// to a plain server would wait out the handshake's timeout in silence.
            response: HTTPResponse = await (
                fetch if self._peer_known else dial_checked(self.url, fetch)
            )
        except (OSError, HTTPClientError, SchemeMismatch) as exc:
            status = exc.code if isinstance(exc, HTTPClientError) else None
            if _not_sent(exc) or (method in _REPEATABLE and _no_answer(exc)):
                reason = await self._unreachable(exc) if status is None else str(exc)
                raise _NotDelivered(reason, status) from None
            if _no_answer(exc):
                raise CoordinatorError(
                    f"the coordinator at {self.url} closed the connection before answering "
                    f"{method} {path}; it may have acted on it, so it was not sent again: "
                    f"check (your leases, say) before you repeat it",
                    status,
                ) from None
            if status is not None:  # a timeout after the request went out
                raise CoordinatorError(str(exc), status) from None
            raise CoordinatorError(await self._unreachable(exc)) from None
        if response.code == 599:
            raise CoordinatorError(await self._unreachable(response.error))
        payload = _json(response)
        if 200 <= response.code < 300 and isinstance(payload, dict):
            self._peer_known = True
            return payload
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict):
            self._peer_known = True  # a jupyter-io error
        elif not self._peer_known:
            stranger = await self._not_a_coordinator(method, path, response)
            if stranger is not None:
                raise CoordinatorError(stranger, response.code)
            self._peer_known = True
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = f"{method} {path} answered HTTP {response.code}"
        if response.code == 409:
            raise LeaseError(message)
        if response.code == 429:
            raise TooManyPendingLeases(message, code, _retry_after(response))
        if response.code in (401, 403):
            raise AuthError(message)
        if response.code == 402 and code == "deposit_too_small":
            raise InsufficientFunds(message)
        if response.code == 402 or code == "ledger_unreachable":
            raise CoordinatorPaymentError(message, response.code, code)
        raise CoordinatorError(message, response.code, code)


#: Methods the coordinator's API lets a client repeat (reads, and idempotent ends).
_REPEATABLE = frozenset({"GET", "DELETE"})
#: Connection errors that mean nothing was sent: nothing listens, no route, no such name.
_NOT_SENT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}
)


class _NotDelivered(Exception):
    """The request cannot have reached a coordinator at this URL (or, GET and DELETE, was
    not answered there): the next URL may be tried."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _not_sent(exc: BaseException) -> bool:
    """True when ``exc`` came before the request was sent: a refused connection, an unknown
    name, an unreachable host, a timeout while connecting."""
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return True
    if isinstance(exc, HTTPTimeoutError):
        return "while connecting" in str(exc)
    if isinstance(exc, OSError) and exc.errno in _NOT_SENT_ERRNOS:
        return True
    # asyncio reports every address it tried in one OSError ("Multiple exceptions: ...").
    text = str(exc)
    return (
        type(exc) is OSError
        and exc.errno is None
        and text.startswith("Multiple exceptions")
        and f"[Errno {errno.ECONNREFUSED}]" in text
    )


def _no_answer(exc: BaseException) -> bool:
    """True when the connection closed before an answer (the request may have been read)."""
    return isinstance(exc, (HTTPStreamClosedError, ConnectionResetError, BrokenPipeError))


def _json(response: HTTPResponse) -> Any:
    """The response's JSON body, or None when it has none (or one too deep to parse: a body
    of [[[[... from a stranger raises RecursionError)."""
    try:
        return json.loads(response.body or b"null")
    except (ValueError, RecursionError):
        return None


def _retry_after(response: HTTPResponse) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
