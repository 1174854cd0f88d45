"""Payment hooks: how a kernel's session is paid for, as a traitlets-configurable plug-in.

One :class:`PaymentHook` instance serves one kernel session. The io-remote provisioner
(:mod:`kernel_provisioner.provisioner`, trait ``payment_hook_class``) drives it through the
lease's lifecycle (``docs/payments-contract.md``)::

    lease granted (no token yet) → open() → coordinator verifies (POST /leases/{id}/escrow)
    → token → kernel → metering → lease ended → the coordinator settles (arbiter + provider)

1. :meth:`PaymentHook.open` — after the lease is granted, before the kernel starts
   (``launch_kernel``): fund the session's escrow; no kernel starts without it. The
   coordinator then verifies it on-chain and issues the lease's token.
2. :meth:`PaymentHook.top_up` — while the session runs: add to the escrow, then the
   coordinator is told again (it raises the recorded deposit).
3. At shutdown the coordinator settles; the user's wallet signs nothing.
4. :meth:`PaymentHook.complete_refund` — when the provider failed (``cleanup`` after a lost
   provider): the coordinator hands out the refund transaction its arbiter signed; the hook
   checks it is exactly the refund of this session's escrow, co-signs it with the user's key
   and submits it.

:meth:`PaymentHook.verify`, :meth:`PaymentHook.settle` and :meth:`PaymentHook.refund` act on
the chain directly with every signer at hand (tests, a single operator holding the keys).

A restart of the kernel keeps the same hook and the same escrow (``open`` is idempotent for
a session id). :class:`SolanaEscrowHook` (the default) does this with a 2-of-3 multisig
escrow (:mod:`jupyter_io.payments.escrow`) on the ledger the coordinator names, unless
``c.SolanaEscrowHook.solana_url`` says otherwise; :class:`FreeHook` is for explicitly free
private pools and refuses to run unless ``allow_free`` is configured — it is never a fallback.
A coordinator that leases for free (``payments = "free"``) asks for no escrow: the provisioner
then calls no hook at all.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal
from typing import Any

from solders.keypair import Keypair
from solders.message import MessageV0
from solders.presigner import Presigner
from solders.pubkey import Pubkey
from solders.signature import Signature
from traitlets import Bool, Float, Unicode
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError, PaymentError
from ..identity import DEFAULT_KEYPAIR_PATH, load_keypair
from .amounts import DEFAULT_SESSION_HOURS, amount_for, format_sol
from .escrow import (
    EscrowClient,
    EscrowState,
    EscrowTerms,
    Settlement,
    Signer,
    TopUpReceipt,
    TransactionFailed,
    refund_message,
)

__all__ = [
    "DEFAULT_SOLANA_URL",
    "EscrowInfo",
    "FreeHook",
    "PaymentHook",
    "SessionTerms",
    "SolanaEscrowHook",
    "close_ledger_clients",
]

#: The embedded ledger a coordinator on this machine serves (its default port, ``/solana``).
DEFAULT_SOLANA_URL = "http://127.0.0.1:8700/solana"


@dataclass(frozen=True)
class SessionTerms:
    """What a lease fixes about a session's payment: parties, and the price in lamports."""

    session_id: str
    user: Pubkey
    provider: Pubkey
    arbiter: Pubkey
    #: Lamports per GPU-hour, fixed in the lease.
    price_per_hour: int
    #: The ledger the coordinator verifies escrows on (its ``solana_url``); None: the hook's.
    solana_url: str | None = None

    def __post_init__(self) -> None:
        if self.price_per_hour < 0:
            raise ConfigError(f"a price per hour cannot be negative ({self.price_per_hour})")

    @property
    def escrow_terms(self) -> EscrowTerms:
        """The escrow's parties (raises :class:`EscrowError` unless they are 3 distinct keys)."""
        return EscrowTerms(self.user, self.provider, self.arbiter, self.session_id)

    def amount_for(self, seconds: int) -> int:
        """Lamports owed for ``seconds`` delivered: price * seconds / 3600, rounded down (a
        fraction of a lamport is never charged)."""
        if seconds < 0:
            raise PaymentError(f"seconds delivered cannot be negative ({seconds})")
        return amount_for(self.price_per_hour, seconds)


@dataclass(frozen=True)
class EscrowInfo:
    """A session's escrow once opened. ``state`` is None for a free session (no escrow);
    ``signature`` is None when no transaction was needed (free, or the escrow existed)."""

    session: SessionTerms
    deposit: int
    state: EscrowState | None
    signature: Signature | None = None
    fee: int = 0
    verified: bool = False

    @property
    def address(self) -> Pubkey | None:
        """The escrow account's address (None for a free session)."""
        return self.state.address if self.state is not None else None

    def to_json(self) -> dict[str, Any]:
        """What another process needs to act on this escrow (no secret in it)."""
        session = self.session
        state = self.state
        return {
            "session_id": session.session_id,
            "user": str(session.user),
            "provider": str(session.provider),
            "arbiter": str(session.arbiter),
            "price_per_hour": session.price_per_hour,
            "solana_url": session.solana_url,
            "deposit": self.deposit,
            "address": str(state.address) if state is not None else None,
            "amount": state.amount if state is not None else None,
            "lamports": state.lamports if state is not None else None,
            "rent_exempt_reserve": state.rent_exempt_reserve if state is not None else None,
            "signature": str(self.signature) if self.signature is not None else None,
            "fee": self.fee,
            "verified": self.verified,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> EscrowInfo:
        """The inverse of :meth:`to_json`."""
        session = SessionTerms(
            body["session_id"],
            Pubkey.from_string(body["user"]),
            Pubkey.from_string(body["provider"]),
            Pubkey.from_string(body["arbiter"]),
            int(body["price_per_hour"]),
            body.get("solana_url"),
        )
        state = None
        if body.get("address") is not None:
            state = EscrowState(
                Pubkey.from_string(body["address"]),
                int(body["amount"]),
                int(body["lamports"]),
                int(body["rent_exempt_reserve"]),
            )
        signature = body.get("signature")
        return cls(
            session,
            int(body["deposit"]),
            state,
            Signature.from_string(signature) if signature else None,
            int(body.get("fee") or 0),
            bool(body.get("verified")),
        )


#: The escrow clients of :class:`SolanaEscrowHook`, by event loop and ledger URL.
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, EscrowClient]] = (
    weakref.WeakKeyDictionary()
)


def _shared_client(url: str) -> EscrowClient:
    """This event loop's client of the ledger at ``url`` (an HTTP client is bound to the loop
    it first ran on)."""
    clients = _CLIENTS.setdefault(asyncio.get_running_loop(), {})
    client = clients.get(url)
    if client is None:
        client = clients[url] = EscrowClient.connect(url)
    return client


async def close_ledger_clients() -> None:
    """Close this event loop's shared escrow clients (before the loop ends, e.g. at the end
    of a command's ``asyncio.run``)."""
    clients = _CLIENTS.pop(asyncio.get_running_loop(), {})
    for client in clients.values():
        await client.close()


class PaymentHook(LoggingConfigurable):
    """How one kernel session is paid for. Subclasses implement the lifecycle steps.

    One instance per session: :meth:`open` remembers the escrow that :meth:`top_up`,
    :meth:`complete_refund`, :meth:`verify`, :meth:`settle` and :meth:`refund` act on
    (:meth:`restore` takes over one another process opened). Call :meth:`close` when the
    session is over.
    """

    escrow: EscrowInfo | None = None

    async def open(self, session: SessionTerms) -> EscrowInfo:
        """Fund the session before the kernel starts (provisioner ``launch_kernel``, after
        the lease is granted). Raises :class:`~jupyter_io.errors.InsufficientFunds` when the
        wallet cannot cover the deposit: the kernel must then not start."""
        raise NotImplementedError

    def deposit_for(self, session: SessionTerms) -> int:
        """Lamports :meth:`open` would escrow for ``session`` (0: nothing is escrowed)."""
        return 0

    async def top_up(self, lamports: int) -> TopUpReceipt:
        """Add ``lamports`` to the open escrow from the user's wallet (the provisioner's
        ``top_up``, then the coordinator is told). Raises
        :class:`~jupyter_io.errors.InsufficientFunds` when the wallet cannot cover it."""
        raise NotImplementedError

    async def complete_refund(
        self,
        message: MessageV0,
        arbiter_signature: Signature,
        provider_share: int,
        *,
        max_provider_share: int | None = None,
    ) -> Signature | None:
        """Co-sign and submit the refund the coordinator offers for a lease whose provider
        failed (provisioner ``cleanup`` after a lost provider). Refuses (``PaymentError``,
        nothing signed) a message that is not exactly the refund of this session's escrow
        paying the provider ``provider_share``, or a share above ``max_provider_share``.
        Returns the signature, or None when the escrow was already closed."""
        raise NotImplementedError

    def restore(self, escrow: EscrowInfo) -> None:
        """Take over an escrow another process opened (``load_provisioner_info``)."""
        self.escrow = escrow

    async def verify(self) -> EscrowInfo:
        """Check on-chain that the funds are in place (the coordinator does this before it
        issues the token). Raises :class:`~jupyter_io.errors.PaymentError` if not."""
        raise NotImplementedError

    async def settle(
        self, seconds_delivered: int, *, arbiter: Signer, provider: Signer
    ) -> Settlement:
        """Pay the provider for ``seconds_delivered`` and refund the rest, with the arbiter's
        and the provider's signers at hand (across machines pass ``Presigner`` s; through a
        coordinator it settles itself). Settling twice is a no-op."""
        raise NotImplementedError

    async def refund(self, seconds_delivered: int = 0, *, arbiter: Signer) -> Settlement:
        """Close the session when the provider failed, with the arbiter's signer at hand
        (through a coordinator: :meth:`complete_refund`): the provider gets only
        ``seconds_delivered``, the user the rest."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections; the escrow itself is untouched."""

    def _opened(self) -> EscrowInfo:
        if self.escrow is None:
            raise PaymentError("no escrow opened for this session yet; call open() first")
        return self.escrow


class SolanaEscrowHook(PaymentHook):
    """The default hook: a 2-of-3 multisig wSOL escrow per session on Solana.

    The deposit is price per hour * ``max_session_hours``, in exact lamports (rounded up to
    a whole lamport). The user's wallet (``keypair_path``) signs the setup and, on refund,
    co-signs with the arbiter.
    """

    solana_url = Unicode(
        "",
        help="Solana JSON-RPC URL of the escrow's ledger (devnet, mainnet, a validator). "
        "Empty: the ledger the coordinator names for the lease (its embedded one by default).",
    ).tag(config=True)
    keypair_path = Unicode(
        DEFAULT_KEYPAIR_PATH, help="The user's Solana keypair file (pays the escrow)."
    ).tag(config=True)
    max_session_hours = Float(
        DEFAULT_SESSION_HOURS,
        help="Hours of GPU time the deposit covers; the session stops when it runs out.",
    ).tag(config=True)

    _client: EscrowClient | None = None
    _keypair: Keypair | None = None

    def deposit_for(self, session: SessionTerms) -> int:
        """Lamports to escrow: price per hour * ``max_session_hours``, rounded up."""
        if self.max_session_hours <= 0:
            raise ConfigError(f"max_session_hours must be positive, not {self.max_session_hours}")
        hours = Decimal(repr(self.max_session_hours))
        exact = (Decimal(session.price_per_hour) * hours).to_integral_value(ROUND_CEILING)
        return int(exact)

    @property
    def keypair(self) -> Keypair:
        """The user's keypair, read once from ``keypair_path``."""
        if self._keypair is None:
            self._keypair = load_keypair(self.keypair_path)
        return self._keypair

    @property
    def ledger_url(self) -> str:
        """The ledger used: ``solana_url`` if configured, else the one the session names."""
        url = self.solana_url.strip()
        if not url and self.escrow is not None:
            url = self.escrow.session.solana_url or ""
        if not url:
            raise ConfigError(
                "no Solana ledger to open the escrow on: the coordinator named none; set "
                "c.SolanaEscrowHook.solana_url (e.g. http://127.0.0.1:8700/solana)"
            )
        return url

    @property
    def client(self) -> EscrowClient:
        """The escrow client for :attr:`ledger_url`: one per ledger and event loop, shared by
        every hook (session) of this process. Building one costs ~20 ms (its HTTP client's TLS
        context), and its caches (rents, multisigs known to exist, a recent blockhash) serve
        every later session."""
        if self._client is None:
            self._client = _shared_client(self.ledger_url)
        return self._client

    async def open(self, session: SessionTerms) -> EscrowInfo:
        user = self.keypair
        if user.pubkey() != session.user:
            raise ConfigError(
                f"the session's user is {session.user}, but keypair_path {self.keypair_path} "
                f"holds {user.pubkey()}; point keypair_path at the wallet that leased the GPU"
            )
        deposit = self.deposit_for(session)
        if deposit <= 0:
            raise ConfigError(
                f"session {session.session_id} has no price; a free pool needs FreeHook with "
                f"allow_free=True, not an escrow"
            )
        if self.escrow is None or self.escrow.session != session:
            self.escrow = EscrowInfo(session, deposit, None)  # names the ledger, for client
        receipt = await self.client.open_escrow(
            user, session.provider, session.arbiter, session.session_id, deposit
        )
        self.log.info(
            "escrow %s for session %s holds %d lamports",
            receipt.state.address,
            session.session_id,
            receipt.state.amount,
        )
        self.escrow = EscrowInfo(session, deposit, receipt.state, receipt.signature, receipt.fee)
        return self.escrow

    async def top_up(self, lamports: int) -> TopUpReceipt:
        info = self._opened()
        receipt = await self.client.top_up(info.session.escrow_terms, lamports, self.keypair)
        self.log.info(
            "escrow %s topped up by %d lamports (signature %s)",
            receipt.state.address,
            lamports,
            receipt.signature,
        )
        self.escrow = replace(info, deposit=info.deposit + lamports, state=receipt.state)
        return receipt

    async def complete_refund(
        self,
        message: MessageV0,
        arbiter_signature: Signature,
        provider_share: int,
        *,
        max_provider_share: int | None = None,
    ) -> Signature | None:
        info = self._opened()
        terms = info.session.escrow_terms
        if max_provider_share is not None and provider_share > max_provider_share:
            raise PaymentError(
                f"the refund of escrow {terms.escrow} would pay the provider "
                f"{format_sol(provider_share)}, more than the {format_sol(max_provider_share)} "
                f"its delivered time is worth; not signed"
            )
        expected = [
            refund_message(
                terms,
                provider_share,
                blockhash=message.recent_blockhash,
                provider_has_wsol_account=has_wsol,
                fee_payer=terms.user,
            )
            for has_wsol in (True, False)
        ]
        if bytes(message) not in {bytes(m) for m in expected}:
            raise PaymentError(
                f"the refund transaction offered for session {info.session.session_id} is not "
                f"the refund of escrow {terms.escrow} paying the provider "
                f"{format_sol(provider_share)}; not signed"
            )
        signers: list[Signer] = [self.keypair, Presigner(terms.arbiter, arbiter_signature)]
        what = f"refunding session {info.session.session_id}"
        try:
            return await self.client.submit(message, signers, what=what)
        except TransactionFailed:
            if await self.client.escrow_state(terms) is None:
                return None  # closed already (the coordinator settled it): never twice
            raise

    async def verify(self) -> EscrowInfo:
        info = self._opened()
        state = await self.client.verify_escrow(info.session.escrow_terms, info.deposit)
        self.escrow = replace(info, state=state, verified=True)
        return self.escrow

    async def settle(
        self, seconds_delivered: int, *, arbiter: Signer, provider: Signer
    ) -> Settlement:
        info = self._opened()
        amount = info.session.amount_for(seconds_delivered)
        return await self.client.settle(
            info.session.escrow_terms,
            amount,
            arbiter=arbiter,
            provider=provider,
            verified=info.state if info.verified else None,
        )

    async def refund(self, seconds_delivered: int = 0, *, arbiter: Signer) -> Settlement:
        info = self._opened()
        amount = info.session.amount_for(seconds_delivered)
        return await self.client.refund(
            info.session.escrow_terms, amount, user=self.keypair, arbiter=arbiter
        )

    async def close(self) -> None:
        # The client is shared (see client): it lives as long as its event loop.
        self._client = None


class FreeHook(PaymentHook):
    """No payment at all, for a private pool whose GPUs are explicitly free.

    Refuses every step unless ``allow_free`` is set, and refuses sessions that have a price:
    a misconfigured paid session must fail loudly, never run unpaid.
    """

    allow_free = Bool(
        False, help="Confirm that this pool's kernels are free; FreeHook refuses to run without."
    ).tag(config=True)

    def _check_allowed(self) -> None:
        if not self.allow_free:
            raise ConfigError(
                "FreeHook runs only for explicitly free private pools: set "
                "c.FreeHook.allow_free = True, or use SolanaEscrowHook (the default) to pay"
            )

    async def open(self, session: SessionTerms) -> EscrowInfo:
        self._check_allowed()
        if session.price_per_hour:
            raise ConfigError(
                f"session {session.session_id} costs {session.price_per_hour} lamports per "
                f"hour; FreeHook serves only free pools, use SolanaEscrowHook to pay"
            )
        self.escrow = EscrowInfo(session, 0, None, verified=True)
        return self.escrow

    async def verify(self) -> EscrowInfo:
        self._check_allowed()
        return self._opened()

    async def top_up(self, lamports: int) -> TopUpReceipt:
        raise ConfigError("a free session has no escrow to top up")

    async def complete_refund(
        self,
        message: MessageV0,
        arbiter_signature: Signature,
        provider_share: int,
        *,
        max_provider_share: int | None = None,
    ) -> Signature | None:
        self._check_allowed()
        raise PaymentError(
            "a free session has no escrow to refund; the coordinator asked FreeHook to sign "
            "a refund, so it is not a free pool: use SolanaEscrowHook"
        )

    async def settle(
        self, seconds_delivered: int, *, arbiter: Signer, provider: Signer
    ) -> Settlement:
        self._check_allowed()
        return self._nothing()

    async def refund(self, seconds_delivered: int = 0, *, arbiter: Signer) -> Settlement:
        self._check_allowed()
        return self._nothing()

    def _nothing(self) -> Settlement:
        info = self._opened()
        return Settlement(info.session.escrow_terms, None, 0, 0, 0, None, "none")
