"""One provisioner's lease from the marketplace coordinator: request, escrow, token, end.

:class:`KernelLease` wraps :class:`~jupyter_io.coordinator_client.CoordinatorClient` and the
lease's :class:`~jupyter_io.payments.hooks.PaymentHook` for the provisioner
(``docs/coordinator-contract.md`` section 2, ``docs/payments-contract.md``)::

    lease = KernelLease(coordinator_url, keypair, hook=SolanaEscrowHook(...))
    grant = await lease.request(LeaseTerms(gpu="RTX 4090", max_price_lamports_per_hour=...))
    escrow = await lease.fund()  # opens the escrow, POST /leases/{id}/escrow → token
    client = TunnelClient(grant.tunnel_url, keypair, credentials=lease.credentials, ...)
    ...
    await lease.end()        # DELETE /api/v1/leases/{id}; idempotent; the coordinator settles
    # or, when the provider was lost: await lease.wind_up_lost(...)  (co-signed refund)
    await lease.close()

With an escrow coordinator the grant has no token until :meth:`KernelLease.fund` opened the
escrow (deposit = price * the hook's ``max_session_hours``) and the coordinator verified it
on-chain (a cohort lease, ``LeaseTerms.cohort``: the coordinator funds it from the student's
allowance and the student only co-signs, ``POST /leases/{id}/cohort-funding``); a free
coordinator's grant has its token at once and no hook is called. One lease, one escrow:
a restart keeps both; a new lease (after a lost provider) gets a new hook and a
new escrow.

:meth:`KernelLease.credentials` is the tunnel's
:data:`~kernel_provisioner.connection.CredentialSource`: the token for HELLO and, when the
lease is relayed, the ``X-JIO-Lease-Token`` header; it renews the token (``POST
/api/v1/leases/{id}/token``) when it is about to expire, so a session may resume after its
first token's life.

While the kernel's tunnel is connected the lease acknowledges the seconds the user has had
(:meth:`KernelLease.keep_acknowledging`, every ``interval``; :meth:`KernelLease.acknowledge`
once more at a normal shutdown): the coordinator bills at most what was acknowledged plus
its grace period (:mod:`jupyter_io.usage_acks`), so a provider cannot bill on after the user
has gone. Refusals raise :class:`LeaseRefused` (a :class:`KernelLaunchError` and a
:class:`LeaseError`) carrying the coordinator's message, which names the GPU types on offer or
the cheapest price; a lease that cannot be paid raises :class:`LeaseNotFunded` (a
:class:`KernelLaunchError` and a :class:`PaymentError`; :class:`LeaseUnaffordable`, also an
:class:`InsufficientFunds`, when the wallet is short, saying what is needed and what it
holds); a lease whose budget ran out raises :class:`BudgetExhausted`; an unreachable
coordinator raises :class:`KernelLaunchError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from solders.keypair import Keypair
from solders.message import to_bytes_versioned
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature

from jupyter_io.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    EscrowOffer,
    LeaseGrant,
    LeaseInfo,
    LeaseQueued,
    RefundOffer,
)
from jupyter_io.errors import (
    ConfigError,
    InsufficientFunds,
    JupyterIOError,
    KernelLaunchError,
    LeaseError,
    PaymentError,
)
from jupyter_io.payments.amounts import amount_for, format_sol
from jupyter_io.payments.cohort_pool import (
    AllowanceTerms,
    match_cohort_funding,
    match_cohort_refund,
)
from jupyter_io.payments.escrow import EscrowClient, TransactionFailed
from jupyter_io.payments.hooks import EscrowInfo, PaymentHook, SessionTerms
from jupyter_io.queue_tickets import POLL_SECONDS, QueuePlace
from jupyter_io.usage_acks import UsageAck

from .connection import Credentials

__all__ = [
    "BudgetExhausted",
    "KernelLease",
    "LeaseNotFunded",
    "LeaseRefused",
    "LeaseTerms",
    "LeaseUnaffordable",
]

#: Renew the token when it has less than this many seconds left, or less than a tenth of
#: its life when that is shorter (a coordinator may hand out short-lived tokens).
RENEW_MARGIN_S = 120.0

#: Seconds the user's own count of delivered time may fall short of the coordinator's
#: (clocks, reporting lag) before a refund's provider share is refused as too high.
REFUND_TOLERANCE_S = 10.0

#: How often a refund transaction is asked for again when its blockhash expired.
REFUND_ATTEMPTS = 3


class LeaseRefused(KernelLaunchError, LeaseError):
    """The coordinator leased nothing: no offer fits the kernelspec's request (the message is
    the coordinator's: GPU types on offer, the cheapest price against the cap, capacity)."""


class LeaseNotFunded(KernelLaunchError, PaymentError):
    """The lease's escrow could not be opened or verified (ledger unreachable, escrow refused):
    the kernel did not start and the lease was ended. The message says why and what to do."""


class LeaseUnaffordable(LeaseNotFunded, InsufficientFunds):
    """The wallet cannot cover the escrow: the message says what is needed and what it holds."""


class BudgetExhausted(KernelLaunchError, PaymentError):
    """The coordinator ended the lease because its deposit was spent; the kernel is not
    restarted on a new lease behind the user's back. The message says how to raise it."""


@dataclass(frozen=True)
class LeaseTerms:
    """What a kernelspec asks the coordinator for (``POST /api/v1/leases``)."""

    gpu: str | None = None
    min_vram_bytes: int | None = None
    max_price_lamports_per_hour: int | None = None
    region: str | None = None
    gpus: int = 1
    #: Only providers measured within this round trip, ms (None: no cap).
    max_latency_ms: float | None = None
    #: The cohort (class) whose pool pays (its allowance for this student), or None.
    cohort: str | None = None
    #: Only providers measured at least this reliable over 30 days, 0..1 (None: any).
    min_reliability: float | None = None

    def describe(self) -> str:
        """``RTX 4090, ≤ 0.5 SOL/h, region eu-west, ≤ 50 ms`` (for progress messages)."""
        parts = [self.gpu or "any GPU"]
        if self.min_vram_bytes:
            parts.append(f"≥ {self.min_vram_bytes / (1 << 30):g} GiB VRAM")
        if self.max_price_lamports_per_hour is not None:
            parts.append(f"≤ {format_sol(self.max_price_lamports_per_hour)}/h")
        if self.region:
            parts.append(f"region {self.region}")
        if self.max_latency_ms is not None:
            parts.append(f"≤ {self.max_latency_ms:g} ms")
        if self.min_reliability is not None:
            parts.append(f"reliability ≥ {self.min_reliability:.0%}")
        if self.cohort:
            parts.append(f"paid by class {self.cohort}")
        return ", ".join(parts)


class KernelLease:
    """The lease behind one provisioner's tunnel session (see the module docstring).

    ``hook`` pays for this lease (one hook per lease: it remembers the lease's escrow);
    without one the lease can only be taken from a free coordinator. ``timeout`` bounds each
    coordinator request. All methods run on the provisioner's event loop; call :meth:`close`
    when the provisioner is done with the lease.
    """

    def __init__(
        self,
        coordinator_url: str,
        keypair: Keypair,
        *,
        hook: PaymentHook | None = None,
        timeout: float = 30.0,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.coordinator_url = coordinator_url
        self.keypair = keypair
        self.hook = hook
        self.timeout = timeout
        self.log = log or logging.getLogger(__name__)
        #: The current grant (None before :meth:`request` and after :meth:`end`).
        self.grant: LeaseGrant | None = None
        #: True once a tunnel session presented the grant's token: the provider binds a
        #: lease to one session, so a new session needs a new lease.
        self.bound = False
        #: Unix time the kernel first ran on this lease (the provisioner's READY): the start
        #: of the seconds the user saw delivered, which bound a refund's provider share.
        self.ready_at: float | None = None
        #: The seconds the coordinator holds as acknowledged by this user (never lowered),
        #: and how many acknowledgements it took.
        self.acked_seconds = 0
        self.acks_taken = 0
        self._client: CoordinatorClient | None = None
        self._margin = RENEW_MARGIN_S
        self._ready_clock: float | None = None
        self._acking: asyncio.Task[None] | None = None
        self._ack_lock = asyncio.Lock()
        self._ack_failures = 0
        #: Called with each place while a cohort request waits in the class's queue (the
        #: provisioner reports it as the start's ``queue`` step).
        self.on_queue: Callable[[QueuePlace], None] | None = None
        #: Seconds the kernel has been idle (:class:`~kernel_provisioner.activity.KernelActivity`):
        #: a class's lease acknowledges them for its idle timeout.
        self.idle_of: Callable[[], int] | None = None
        #: The cohort whose pool pays for the lease (set by :meth:`request`), or None.
        self.cohort: str | None = None
        #: A cohort lease's funding once it landed: (escrow address, deposit).
        self.cohort_funding: tuple[str, int] | None = None

    @property
    def client(self) -> CoordinatorClient:
        """The coordinator's REST client (created on first use)."""
        if self._client is None:
            self._client = CoordinatorClient(
                self.coordinator_url, self.keypair, timeout=self.timeout
            )
        return self._client

    @property
    def escrow(self) -> EscrowInfo | None:
        """The lease's escrow once :meth:`fund` opened it (None for a free lease)."""
        hook = self.hook
        return hook.escrow if hook is not None and hook.escrow is not None else None

    @property
    def funded(self) -> bool:
        """True when the lease is paid through an escrow (not a free pool's lease): the
        hook's, or a cohort's funded from the student's allowance."""
        if self.cohort_funding is not None:
            return True
        escrow = self.escrow
        return escrow is not None and escrow.state is not None

    # -- usage acknowledgements ------------------------------------------------------------

    def mark_ready(self) -> None:
        """The kernel is ready on this lease for the first time: the user's count of seconds
        served starts now (later calls change nothing)."""
        if self.ready_at is None:
            self.ready_at = time.time()
            self._ready_clock = time.monotonic()

    def seconds_served(self) -> int:
        """Whole seconds since the kernel first became ready on this lease (0 before)."""
        if self.ready_at is None:
            return 0
        if self._ready_clock is None:  # restored from another process: its wall clock
            self._ready_clock = time.monotonic() - max(0.0, time.time() - self.ready_at)
        return max(0, math.floor(time.monotonic() - self._ready_clock))

    async def acknowledge(self, timeout: float | None = None) -> int | None:
        """Tell the coordinator the user has had :meth:`seconds_served` so far (a signed
        ``POST /api/v1/leases/{id}/ack``); returns the count it holds now, or None when
        there is nothing to acknowledge or it did not take it (logged: a refusal changes
        nothing, the next acknowledgement carries the total)."""
        grant = self.grant
        if grant is None or self.ready_at is None:
            return None
        async with self._ack_lock:  # in order: a later count never goes out first
            # Only a class's lease says how long it idled (a coordinator without classes
            # would refuse the field, and nothing else asks for it).
            idle = self.idle_of() if self.cohort and self.idle_of is not None else None
            ack = UsageAck(grant.lease, max(self.seconds_served(), self.acked_seconds), idle)
            try:
                held = await asyncio.wait_for(
                    self.client.acknowledge_usage(ack), timeout or self.timeout
                )
            except (JupyterIOError, asyncio.TimeoutError) as exc:
                self._ack_failures += 1
                level = logging.WARNING if self._ack_failures == 1 else logging.DEBUG
                self.log.log(
                    level,
                    "jupyter-io: the coordinator did not take the usage acknowledgement of "
                    "lease %s (%d s): %s",
                    grant.lease,
                    ack.seconds,
                    exc or "timed out",
                )
                return None
            self.acked_seconds = max(self.acked_seconds, held)
            self.acks_taken += 1
            return held

    def keep_acknowledging(self, connected: Callable[[], bool], interval: float) -> None:
        """Acknowledge now and every ``interval`` seconds while ``connected()`` says the
        kernel's tunnel is up (no acknowledgement while it is down: those seconds are
        acknowledged only if it comes back). Until :meth:`stop_acknowledging`, :meth:`end`
        or :meth:`close`; calling it again replaces the loop."""
        self.stop_acknowledging()
        self._acking = asyncio.ensure_future(self._ack_loop(connected, interval))

    def stop_acknowledging(self) -> None:
        """Stop the acknowledgements of :meth:`keep_acknowledging` (the user's side is
        going away, or the session is gone)."""
        task, self._acking = self._acking, None
        if task is not None:
            task.cancel()

    async def _ack_loop(self, connected: Callable[[], bool], interval: float) -> None:
        while self.grant is not None:
            if connected():
                await self.acknowledge(min(self.timeout, max(interval, 1.0)))
            await asyncio.sleep(interval)

    async def _stopped_acknowledging(self) -> None:
        task, self._acking = self._acking, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def request(
        self, terms: LeaseTerms, latencies: Mapping[str, float] | None = None
    ) -> LeaseGrant:
        """Lease GPUs on ``terms``; remember and return the grant (with an escrow coordinator
        it has no token yet: :meth:`fund` next). ``latencies`` are the round trips measured
        to candidate providers (:mod:`jupyter_io.latency`), ms.

        Raises :class:`LeaseRefused` with the coordinator's reason when no offer fits, and
        :class:`KernelLaunchError` when the coordinator cannot be reached or refuses our key.
        """
        try:
            grant = await self.client.request_lease(
                terms.gpu,
                gpus=terms.gpus,
                min_vram_bytes=terms.min_vram_bytes,
                max_price_lamports_per_hour=terms.max_price_lamports_per_hour,
                region=terms.region,
                max_latency_ms=terms.max_latency_ms,
                latency_ms=latencies,
                cohort=terms.cohort,
                min_reliability=terms.min_reliability,
            )
        except LeaseQueued as queued:
            grant = await self._wait_in_queue(queued.place)
        except LeaseError as exc:
            raise LeaseRefused(f"no lease from {self.coordinator_url}: {exc}") from None
        except JupyterIOError as exc:
            raise KernelLaunchError(
                f"cannot lease from the coordinator at {self.coordinator_url}: {exc}"
            ) from None
        self.grant = grant
        self.cohort = terms.cohort
        self.bound = False
        self.ready_at = self._ready_clock = None
        self.acked_seconds = 0
        self._learn_life(grant)
        return grant

    async def _wait_in_queue(self, place: QueuePlace) -> LeaseGrant:
        """Wait in the class's queue: poll the ticket every :data:`POLL_SECONDS` (reporting
        each place to :attr:`on_queue`) until it is served; :class:`LeaseRefused` with the
        coordinator's reason when it expires. A cancelled start withdraws the ticket."""
        client = self.client
        try:
            while True:
                if self.on_queue is not None:
                    self.on_queue(place)
                # The ticket's REST is the protocol: the coordinator serves on events, so the
                # lease is waiting at the next poll; never past the ticket's expiry.
                await asyncio.sleep(min(POLL_SECONDS, max(0.05, place.expires_at - time.time())))
                try:
                    answer = await asyncio.wait_for(client.queue_ticket(place), self.timeout)
                except LeaseError as exc:
                    raise LeaseRefused(f"no lease from {self.coordinator_url}: {exc}") from None
                except (JupyterIOError, asyncio.TimeoutError) as exc:
                    if time.time() < place.expires_at:
                        self.log.info("jupyter-io: queue poll failed (%s); retrying", exc)
                        continue
                    raise KernelLaunchError(
                        f"lost the class's queue at {self.coordinator_url}: {exc}"
                    ) from None
                if isinstance(answer, LeaseGrant):
                    return answer
                place = answer
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.cancel_queue_ticket(place), 5.0)
            raise

    async def fund(self) -> EscrowInfo | None:
        """Pay for the granted lease before any kernel starts; returns its escrow (None when
        the coordinator asks for none: a free pool, or a grant that has its token already).

        Opens the escrow through the hook (deposit = price * its ``max_session_hours``, one
        transaction the user's wallet signs), then tells the coordinator, which verifies it
        on-chain and answers with the token. Idempotent (a retried start finds the escrow).

        Raises :class:`LeaseUnaffordable` when the wallet is short (nothing moved), and
        :class:`LeaseNotFunded` when the ledger or the coordinator cannot be reached or the
        coordinator refuses the escrow; the caller then ends the lease. A :class:`ConfigError`
        (a hook that may not pay, say) stays one.
        """
        grant = self.grant
        if grant is None:
            raise KernelLaunchError("no lease to pay for; request one first")
        offer = grant.escrow
        if not grant.needs_escrow or offer is None:
            if grant.token is None:
                raise LeaseNotFunded(
                    f"lease {grant.lease} came without a token and without escrow terms; is "
                    f"the coordinator at {self.coordinator_url} of this jupyter-io version?"
                )
            return None
        if offer.funding == "cohort":
            await self._fund_from_cohort(grant, offer)
            return None
        hook = self.hook
        if hook is None:
            raise ConfigError(
                f"lease {grant.lease} must be paid through an escrow, and no payment hook is "
                f"configured; set c.RemoteKernelProvisioner.payment_hook_class"
            )
        if not offer.arbiter:
            raise LeaseNotFunded(
                f"lease {grant.lease} asks for an escrow but names no arbiter; the coordinator "
                f"at {self.coordinator_url} must say who co-signs settlements"
            )
        session = SessionTerms(
            grant.lease,
            self.keypair.pubkey(),
            Pubkey.from_string(grant.provider),
            Pubkey.from_string(offer.arbiter),
            grant.price_lamports_per_hour,
            offer.solana_url,
        )
        deposit = hook.deposit_for(session)
        if 0 < deposit < offer.min_deposit_lamports:
            # Refused before any transaction: an escrow the coordinator would not accept
            # would hold the user's lamports with no lease to settle it.
            hours = deposit / grant.price_lamports_per_hour
            raise LeaseUnaffordable(
                f"a budget of {hours:g} h ({format_sol(deposit)}) is below the coordinator's "
                f"minimum deposit of {format_sol(offer.min_deposit_lamports)} for lease "
                f"{grant.lease}; raise max_session_hours (c.SolanaEscrowHook.max_session_hours "
                f"or the kernelspec's)"
            )
        try:
            escrow = await hook.open(session)
        except InsufficientFunds as exc:
            raise LeaseUnaffordable(f"cannot pay for lease {grant.lease}: {exc}") from None
        except ConfigError:
            raise
        except JupyterIOError as exc:
            raise LeaseNotFunded(f"cannot open the escrow of lease {grant.lease}: {exc}") from None
        signature = str(escrow.signature) if escrow.signature is not None else None
        try:
            funded = await self.client.fund_lease(grant.lease, signature)
        except InsufficientFunds as exc:
            raise LeaseUnaffordable(
                f"the coordinator refused the escrow {escrow.address} of lease {grant.lease}: "
                f"{exc}; raise max_session_hours (c.SolanaEscrowHook.max_session_hours)"
            ) from None
        except JupyterIOError as exc:
            raise LeaseNotFunded(
                f"the coordinator did not accept the escrow {escrow.address} of lease "
                f"{grant.lease}: {exc}"
            ) from None
        self._take(funded)
        return escrow

    async def _fund_from_cohort(self, grant: LeaseGrant, offer: EscrowOffer) -> None:
        """A cohort lease: the arbiter funds the escrow from this student's allowance in a
        transaction it pays for; the student signs only once the message is exactly the
        funding of this lease from their allowance
        (:func:`~jupyter_io.payments.cohort_pool.match_cohort_funding`)."""
        cohort = self.cohort
        if cohort is None or not offer.arbiter:
            raise LeaseNotFunded(
                f"the coordinator asks a cohort's pool to fund lease {grant.lease}, but this "
                f"kernel asked for no cohort (or the coordinator names no arbiter)"
            )
        try:
            instructor = await self.client.cohort_instructor(cohort)
            funding = await self.client.cohort_funding_offer(grant.lease)
        except InsufficientFunds as exc:
            raise LeaseUnaffordable(f"class {cohort} cannot pay for {grant.lease}: {exc}") from None
        except JupyterIOError as exc:
            raise LeaseNotFunded(
                f"cannot fund lease {grant.lease} from class {cohort}: {exc}"
            ) from None
        allowance = AllowanceTerms(
            instructor, self.keypair.pubkey(), Pubkey.from_string(offer.arbiter), cohort
        )
        session = allowance.session(Pubkey.from_string(grant.provider), grant.lease)
        if not match_cohort_funding(session, funding.deposit, funding.raw):
            raise LeaseNotFunded(
                f"refusing to sign the coordinator's funding of lease {grant.lease}: it is not "
                f"exactly the transfer of {format_sol(funding.deposit)} from your allowance in "
                f"class {cohort} into this lease's escrow; nothing was signed"
            )
        signature = self.keypair.sign_message(to_bytes_versioned(funding.message))
        try:
            funded = await self.client.submit_cohort_funding(funding, signature)
        except JupyterIOError as exc:
            raise LeaseNotFunded(
                f"the funding of lease {grant.lease} did not go through: {exc}"
            ) from None
        self.cohort_funding = (str(session.escrow.escrow), funding.deposit)
        self._take(funded)

    async def top_up(self, lamports: int) -> LeaseGrant:
        """Add ``lamports`` to the lease's escrow from the user's wallet and have the
        coordinator record the higher deposit (``POST /leases/{id}/escrow`` again). Returns
        the grant with its new ``billing``. Raises :class:`PaymentError` (an
        :class:`InsufficientFunds` when the wallet is short) when it cannot."""
        grant = self.grant
        if self.cohort_funding is not None:
            raise PaymentError(
                "this kernel's lease is paid by its class: its instructor tops up the "
                "allowances (`jupyter io cohort fund`), not your wallet"
            )
        if grant is None or self.hook is None or not self.funded:
            raise PaymentError("this kernel's lease has no escrow to top up")
        receipt = await self.hook.top_up(lamports)
        funded = await self.client.fund_lease(grant.lease, str(receipt.signature))
        self._take(funded)
        return funded

    def _take(self, funded: LeaseGrant) -> None:
        previous = self.grant
        if previous is not None and funded.escrow is None and previous.escrow is not None:
            # The funded grant may omit the escrow terms it answered: keep them for to_json.
            funded = replace(funded, escrow=previous.escrow)
        self.grant = funded
        self._learn_life(funded)

    def _learn_life(self, grant: LeaseGrant) -> None:
        life = grant.expires_at - time.time()
        if life > 0:
            self._margin = min(RENEW_MARGIN_S, life / 10)

    async def credentials(self, stale: bool = False) -> Credentials:
        """The token (and relay header) for the next tunnel connection; renews the token
        first when it is ``stale`` (refused) or about to expire. A failed renewal is logged
        and the current token used: the connection attempt then says what is wrong."""
        grant = self.grant
        if grant is None:
            raise KernelLaunchError("no lease to connect with; the lease has ended")
        if grant.token is None:
            raise KernelLaunchError(
                f"lease {grant.lease} has no token yet: its escrow is not funded"
            )
        left = grant.expires_at - time.time()
        if stale or left < self._margin:
            try:
                renewed = await self.client.renew_token(grant.lease)
            except JupyterIOError as exc:
                self.log.warning(
                    "jupyter-io: cannot renew the token of lease %s: %s", grant.lease, exc
                )
            else:
                self._take(renewed)
                grant = renewed
                self.log.info(
                    "jupyter-io: renewed the token of lease %s (valid %.0f s)",
                    grant.lease,
                    grant.expires_at - time.time(),
                )
        assert grant.token is not None
        self.bound = True
        return Credentials(grant.token, grant.relay_headers())

    async def info(self) -> LeaseInfo | None:
        """The lease's record at the coordinator now (state, billing), or None when there is
        no lease or the coordinator cannot say (logged)."""
        grant = self.grant
        if grant is None:
            return None
        try:
            return await self.client.get_lease(grant.lease)
        except JupyterIOError as exc:
            self.log.warning("jupyter-io: cannot read lease %s: %s", grant.lease, exc)
            return None

    async def end(self, timeout: float | None = None) -> LeaseInfo | None:
        """End the lease (``DELETE``; idempotent) and forget it; the coordinator settles its
        escrow (the provider is paid for the seconds it delivered, the user gets the rest).
        Returns the final record, or None when there was no lease or the coordinator could
        not be told (logged: the lease then ends when its token expires unused, or when the
        provider reports the session's end)."""
        await self._stopped_acknowledging()
        grant, self.grant = self.grant, None
        self.bound = False
        if grant is None:
            return None
        try:
            info = await asyncio.wait_for(
                self.client.end_lease(grant.lease), timeout or self.timeout
            )
        except (JupyterIOError, asyncio.TimeoutError) as exc:
            self.log.warning(
                "jupyter-io: could not end lease %s at %s: %s",
                grant.lease,
                self.coordinator_url,
                exc or "timed out",
            )
            return None
        self.log.info("jupyter-io: lease %s %s", grant.lease, info.state)
        return info

    async def release(self, timeout: float | None = None) -> LeaseInfo | None:
        """End the lease (:meth:`end`) and, when it was paid for but no kernel ever ran on it
        (a start that failed or was abandoned after the escrow), refund its escrow at once:
        nothing was delivered, so the user and the arbiter close it (the provider would not
        co-sign the settlement of a session it never served). Failures are logged."""
        grant = self.grant
        unused = grant is not None and self.funded and self.ready_at is None
        info = await self.end(timeout)
        if not unused or grant is None or info is None or info.live:
            return info
        # Also when the coordinator never verified the escrow (the start failed between the
        # setup transaction and POST /escrow): it finds it on-chain once the lease is over.
        self.log.info("jupyter-io: %s", await self._refund(grant))
        return info

    async def wait_settled(self, ended: LeaseInfo, timeout: float) -> str | None:
        """Wait (at most ``timeout`` seconds) until the coordinator has settled the escrow of
        the lease ``ended`` (what :meth:`end` or :meth:`release` returned): the provider paid
        for the seconds it served, the user refunded the rest. Returns None once settled (or
        when there is nothing to settle: a free lease, no escrow), else the line to log,
        which says how it will be settled and where to see it. Never raises.

        A process that is exiting (Jupyter Server stopping with its kernels) calls it so that
        the settlement happens while the provider, whose co-signature it needs, still runs.
        """
        billing = ended.billing
        if billing is None or not billing.deposit_lamports:
            return None  # a free lease
        settlement = billing.settlement
        lease = ended.lease
        deadline = time.monotonic() + timeout
        delay = 0.05
        # No settlement row yet: the coordinator queues it as the lease ends.
        while settlement is None or settlement.state == "pending":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # The coordinator publishes no settlement event a client could await; it settles
            # within a second or two of the lease's end (the provider co-signs).
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)
            try:
                info = await asyncio.wait_for(
                    self.client.get_lease(lease), max(0.1, deadline - time.monotonic())
                )
            except (JupyterIOError, asyncio.TimeoutError):
                break
            settlement = info.billing.settlement if info.billing is not None else None
        if settlement is not None and settlement.state == "done":
            return None
        if settlement is not None and settlement.state == "failed":
            return (
                f"the coordinator could not settle lease {lease} "
                f"({settlement.error or 'no reason given'}); `jupyter io wallet history` shows "
                f"its escrow"
            )
        return (
            f"lease {lease} ended; its escrow was not settled within {timeout:g} s and will be "
            f"settled by the coordinator (it retries until the provider co-signs); `jupyter "
            f"io wallet history` shows it once done"
        )

    async def wind_up_lost(self, timeout: float) -> str:
        """Close a lease whose provider was lost; returns what happened, for logs.

        Waits (at most ``timeout`` seconds) for the coordinator to see the loss too (it
        fails the lease when the provider's heartbeats stop). A failed funded lease is
        refunded: the coordinator hands out the refund its arbiter signed, the hook checks
        and co-signs it with the user's key (the provider's share at most what the user saw
        delivered), submits it and the coordinator is told. A lease the coordinator ended
        meanwhile is settled by the coordinator. A lease still live after ``timeout`` means
        the provider still heartbeats (only our path to it broke): it is ended and settled
        normally. Never raises for the coordinator's or the ledger's failures (logged, with
        what to do); the lease is forgotten either way.
        """
        await self._stopped_acknowledging()  # the user no longer sees the kernel
        grant = self.grant
        if grant is None:
            return "no lease"
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                info: LeaseInfo | None = await self.client.get_lease(grant.lease)
            except JupyterIOError as exc:
                if isinstance(exc, CoordinatorError) and exc.status is None:
                    # Unreachable: waiting cannot help, say what to do.
                    self.grant, self.bound = None, False
                    return (
                        f"cannot reach the coordinator to settle lease {grant.lease} ({exc}); "
                        f"once it is back, `jupyter io wallet history` shows the lease and "
                        f"`jupyter io wallet refund {grant.lease}` refunds it if it failed"
                    )
                self.log.warning("jupyter-io: cannot read lease %s: %s", grant.lease, exc)
                info = None
            if info is not None and info.state == "failed":
                self.grant, self.bound = None, False
                if not self.funded:
                    return f"lease {grant.lease} failed (nothing escrowed)"
                return await self._refund(grant)
            if info is not None and not info.live:
                self.grant, self.bound = None, False
                return f"lease {grant.lease} is {info.state}; the coordinator settles it"
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # The coordinator publishes no event a client could await; its verdict takes a
            # few heartbeat intervals.
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
        ended = await self.end()
        return (
            f"lease {grant.lease} still live at the coordinator after {timeout:g} s (the "
            f"provider is alive); ended it: {ended.state if ended is not None else 'unknown'}"
        )

    def max_provider_share(self, now: float | None = None) -> int | None:
        """The most a refund may pay the provider: the price of the seconds since the kernel
        first ran on this lease (plus :data:`REFUND_TOLERANCE_S`); 0 if it never ran."""
        escrow = self.escrow
        grant = self.grant
        if escrow is None and (self.cohort_funding is None or grant is None):
            return None
        if self.ready_at is None:
            return 0
        seconds = int(max(0.0, (time.time() if now is None else now) - self.ready_at))
        seconds += int(REFUND_TOLERANCE_S) + 1
        if escrow is None:
            assert grant is not None
            return amount_for(grant.price_lamports_per_hour, seconds)
        return escrow.session.amount_for(seconds)

    async def _refund(self, grant: LeaseGrant) -> str:
        hook = self.hook
        lease = grant.lease
        for attempt in range(1, REFUND_ATTEMPTS + 1):
            try:
                offer = await self.client.request_refund(lease)
                if self.cohort_funding is not None:
                    signature = await self._cosign_cohort_refund(grant, offer)
                else:
                    assert hook is not None
                    signature = await hook.complete_refund(
                        offer.message,
                        offer.arbiter_signature,
                        offer.provider_share,
                        max_provider_share=self.max_provider_share(),
                    )
            except TransactionFailed as exc:
                if exc.err == "BlockhashNotFound" and attempt < REFUND_ATTEMPTS:
                    continue  # the offer aged on the ledger; ask for a fresh one
                return self._refund_failed(lease, exc)
            except JupyterIOError as exc:
                return self._refund_failed(lease, exc)
            if signature is None:
                return f"lease {lease}: its escrow was closed already"
            try:
                await self.client.report_refund(lease, str(signature))
            except JupyterIOError as exc:
                # The refund landed; the coordinator finds the escrow closed on its own.
                self.log.warning(
                    "jupyter-io: refunded lease %s (%s) but could not tell the coordinator: %s",
                    lease,
                    signature,
                    exc,
                )
            return (
                f"refunded lease {lease}: the provider got {format_sol(offer.provider_share)} "
                f"for the time it delivered, the rest came back (signature {signature})"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _cosign_cohort_refund(
        self, grant: LeaseGrant, offer: RefundOffer
    ) -> Signature | None:
        """A cohort lease's refund (provider lost): co-sign only the exact cohort refund of
        this lease's escrow (:func:`~jupyter_io.payments.cohort_pool.match_cohort_refund`:
        the provider's share at most what the user saw delivered, the rest back to the
        allowance or the instructor, at most the arbiter's fee kept) and submit it; the
        arbiter pays its fee (reimbursed from the escrow), so no SOL is needed. None when the
        escrow was closed already."""
        assert self.cohort is not None and self.cohort_funding is not None
        terms = grant.escrow
        if terms is None or not terms.arbiter or not terms.solana_url:
            raise PaymentError(f"lease {grant.lease} names no arbiter or ledger to refund on")
        arbiter = Pubkey.from_string(terms.arbiter)
        instructor = await self.client.cohort_instructor(self.cohort)
        allowance = AllowanceTerms(instructor, self.keypair.pubkey(), arbiter, self.cohort)
        session = allowance.session(Pubkey.from_string(grant.provider), grant.lease)
        limit = self.max_provider_share()
        if limit is not None and offer.provider_share > limit:
            raise PaymentError(
                f"the refund of lease {grant.lease} pays the provider "
                f"{format_sol(offer.provider_share)}, more than the {format_sol(limit)} of the "
                f"time you saw delivered; nothing was signed"
            )
        deposit = self.cohort_funding[1]
        if not match_cohort_refund(
            session,
            offer.provider_share,
            bytes(offer.message),
            max_remainder=deposit - offer.provider_share,
        ):
            raise PaymentError(
                f"refusing to co-sign the refund of lease {grant.lease}: it is not exactly the "
                f"refund of its escrow to your class's allowance; nothing was signed"
            )
        async with EscrowClient.connect(terms.solana_url) as ledger:
            if await ledger.escrow_state(session.escrow) is None:
                return None
            return await ledger.submit(
                offer.message,
                [Presigner(arbiter, offer.arbiter_signature), self.keypair],
                what=f"refunding cohort lease {grant.lease}",
            )

    def _refund_failed(self, lease: str, exc: Exception) -> str:
        escrow = self.escrow
        where = f" (escrow {escrow.address})" if escrow is not None else ""
        message = (
            f"could not refund lease {lease}{where}: {exc}; run `jupyter io wallet refund "
            f"{lease}` to try again"
        )
        self.log.error("jupyter-io: %s", message)
        return message

    async def close(self) -> None:
        """Stop acknowledging usage, release the HTTP client and the hook's connections (the
        lease itself is untouched)."""
        await self._stopped_acknowledging()
        client, self._client = self._client, None
        if client is not None:
            client.close()
        if self.hook is not None:
            await self.hook.close()

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any] | None:
        """The grant and its escrow as JSON (for ``get_provisioner_info``), or None without
        a grant. No secret but the token."""
        grant = self.grant
        if grant is None:
            return None
        offer = grant.escrow
        escrow = self.escrow
        return {
            "lease": grant.lease,
            "token": grant.token,
            "provider": grant.provider,
            "tunnel_url": grant.tunnel_url,
            "relay": grant.relay,
            "gpu": grant.gpu,
            "gpu_indices": list(grant.gpu_indices),
            "price_lamports_per_hour": grant.price_lamports_per_hour,
            "expires_at": grant.expires_at,
            "state": grant.state,
            "escrow": offer.to_json() if offer is not None else None,
            "escrow_account": escrow.to_json() if escrow is not None else None,
            "ready_at": self.ready_at,
            "acked_seconds": self.acked_seconds,
            "bound": self.bound,
        }

    def restore(self, body: dict[str, Any]) -> LeaseGrant:
        """Take over a grant saved by :meth:`to_json` (another process's lease), and its
        escrow, so this process can refund or top it up."""
        self.grant = LeaseGrant.from_json(body)
        self.bound = bool(body.get("bound", True))
        self.ready_at = body.get("ready_at")
        self._ready_clock = None
        self.acked_seconds = int(body.get("acked_seconds") or 0)
        account = body.get("escrow_account")
        if account is not None and self.hook is not None:
            self.hook.restore(EscrowInfo.from_json(account))
        return self.grant
