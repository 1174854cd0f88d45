"""Payment hooks: how a kernel's session is paid for, as a traitlets-configurable plug-in.

One :class:`PaymentHook` instance serves one kernel session, through the provisioner's
lifecycle (lease → escrow funded → lease active → metering → settlement at shutdown):

1. :meth:`PaymentHook.open` — after the lease is granted, before the kernel starts
   (``pre_launch``): fund the session's escrow; no kernel starts without it.
2. :meth:`PaymentHook.verify` — before the lease is activated (``launch_kernel``): check
   on-chain that the escrow holds the agreed deposit.
3. :meth:`PaymentHook.settle` — at shutdown (``cleanup``): pay the provider for the seconds
   it delivered and refund the rest to the user.
4. :meth:`PaymentHook.refund` — instead of settling, when the provider failed: the user and
   the arbiter close the escrow, paying the provider only for what it delivered.

A restart of the kernel keeps the same hook and the same escrow (``open`` is idempotent for
a session id). :class:`SolanaEscrowHook` (the default) does this with a 2-of-3 multisig
escrow (:mod:`jupyter_io.payments.escrow`); :class:`FreeHook` is for explicitly free private
pools and refuses to run unless ``allow_free`` is configured — it is never a fallback.

The wiring into the provisioner is a later change: this module only defines the hooks, so
they can be configured (``c.SolanaEscrowHook.max_session_hours = 2``) and tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from traitlets import Bool, Float, Unicode
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError, PaymentError
from ..identity import DEFAULT_KEYPAIR_PATH, load_keypair
from .escrow import EscrowClient, EscrowState, EscrowTerms, Settlement, Signer

__all__ = [
    "DEFAULT_SOLANA_URL",
    "SECONDS_PER_HOUR",
    "EscrowInfo",
    "FreeHook",
    "PaymentHook",
    "SessionTerms",
    "SolanaEscrowHook",
]

#: The embedded ledger a coordinator on this machine serves (its default port, ``/solana``).
DEFAULT_SOLANA_URL = "http://127.0.0.1:8700/solana"

SECONDS_PER_HOUR = 3600


@dataclass(frozen=True)
class SessionTerms:
    """What a lease fixes about a session's payment: parties, and the price in lamports."""

    session_id: str
    user: Pubkey
    provider: Pubkey
    arbiter: Pubkey
    #: Lamports per GPU-hour, fixed in the lease.
    price_per_hour: int

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
        return self.price_per_hour * seconds // SECONDS_PER_HOUR


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


class PaymentHook(LoggingConfigurable):
    """How one kernel session is paid for. Subclasses implement the four lifecycle steps.

    One instance per session: :meth:`open` remembers the escrow that :meth:`verify`,
    :meth:`settle` and :meth:`refund` act on. Call :meth:`close` when the session is over.
    """

    escrow: EscrowInfo | None = None

    async def open(self, session: SessionTerms) -> EscrowInfo:
        """Fund the session before the kernel starts (provisioner ``pre_launch``, after the
        lease is granted). Raises :class:`~jupyter_io.errors.InsufficientFunds` when the
        wallet cannot cover the deposit: the kernel must then not start."""
        raise NotImplementedError

    async def verify(self) -> EscrowInfo:
        """Check the funds are in place before the lease is activated (provisioner
        ``launch_kernel``). Raises :class:`~jupyter_io.errors.PaymentError` if not."""
        raise NotImplementedError

    async def settle(
        self, seconds_delivered: int, *, arbiter: Signer, provider: Signer
    ) -> Settlement:
        """Pay the provider for ``seconds_delivered`` and refund the rest (provisioner
        ``cleanup`` at shutdown). The arbiter and provider sign; across machines pass
        ``Presigner`` s. Settling twice is a no-op."""
        raise NotImplementedError

    async def refund(self, seconds_delivered: int = 0, *, arbiter: Signer) -> Settlement:
        """Close the session when the provider failed (provisioner ``cleanup`` after a lost
        provider): the provider gets only ``seconds_delivered``, the user the rest."""
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
        DEFAULT_SOLANA_URL,
        help="Solana JSON-RPC URL: the coordinator's embedded ledger, devnet, mainnet, ...",
    ).tag(config=True)
    keypair_path = Unicode(
        DEFAULT_KEYPAIR_PATH, help="The user's Solana keypair file (pays the escrow)."
    ).tag(config=True)
    max_session_hours = Float(
        1.0, help="Hours of GPU time the deposit covers; the session stops when it runs out."
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
    def client(self) -> EscrowClient:
        """The escrow client for ``solana_url`` (created on first use)."""
        if self._client is None:
            self._client = EscrowClient.connect(self.solana_url)
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
        if self._client is not None:
            await self._client.close()
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
