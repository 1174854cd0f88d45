"""The coordinator's configuration: every knob is a ``config=True`` trait.

:class:`CoordinatorConfig` is what ``jupyter io coordinator``
(:class:`~jupyter_io.coordinator.app.CoordinatorApp`) fills from flags and config files, and
what :class:`~jupyter_io.coordinator.server.CoordinatorServer` reads. It does no I/O until
asked: at start-up call :meth:`~CoordinatorConfig.listen_address`,
:meth:`~CoordinatorConfig.database_url`, :meth:`~CoordinatorConfig.load_keypair` (creates the
coordinator's own keypair in the data directory on first use) and
:meth:`~CoordinatorConfig.ssl_context`; each raises :class:`~jupyter_io.errors.ConfigError`
naming the setting to fix.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from jupyter_core.paths import jupyter_data_dir
from solders.keypair import Keypair
from traitlets import Bool, Enum, Float, Integer, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from ..daemon import parse_listen as _parse_listen
from ..daemon import server_ssl_context
from ..errors import ConfigError
from ..identity import load_keypair, load_or_create_keypair
from ..protocol import DEFAULT_MAX_FRAME_SIZE
from ..usage_acks import DEFAULT_ACK_GRACE_S, DEFAULT_ACK_TIMEOUT_S
from .pending import DEFAULT_MAX_UNFUNDED, DEFAULT_MAX_UNFUNDED_PER_KEY, DEFAULT_WINDOW

__all__ = ["DEFAULT_LISTEN", "DEFAULT_PORT", "CoordinatorConfig", "parse_listen"]

DEFAULT_PORT = 8700
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (see :func:`jupyter_io.daemon.parse_listen`)."""
    return _parse_listen(text, example_port=DEFAULT_PORT)


class CoordinatorConfig(Configurable):
    """Everything the coordinator needs to know before it listens."""

    listen = Unicode(
        DEFAULT_LISTEN,
        config=True,
        help="Address to listen on, HOST:PORT ([::1]:PORT for IPv6); port 0 picks a free one. "
        "Loopback unless you say otherwise (providers and users elsewhere need 0.0.0.0:PORT "
        "and, beyond a trusted network, TLS).",
    )
    public_url = Unicode(
        "",
        config=True,
        help="The http(s)://HOST:PORT others reach this coordinator at (behind a proxy, or "
        "when listening on 0.0.0.0); default: the listening address.",
    )
    data_dir = Unicode(
        config=True, help="Directory of the coordinator's database and keypair by default."
    )
    db = Unicode(
        "",
        config=True,
        help="Database: a SQLite file path or sqlite:///path (default: DATA_DIR/coordinator.db), "
        "or postgresql://user@host/dbname for several coordinators sharing one database.",
    )
    keypair_path = Unicode(
        "",
        config=True,
        help="The coordinator's own Solana keypair file, which signs lease tokens (default: "
        "DATA_DIR/coordinator-keypair.json, created if missing).",
    )
    certfile = Unicode("", config=True, help="TLS certificate (PEM); serve https/wss when set.")
    keyfile = Unicode("", config=True, help="TLS private key (PEM) for certfile.")
    heartbeat_interval = Float(
        5.0, config=True, help="Seconds between provider heartbeats (told to each provider)."
    )
    heartbeat_misses = Integer(
        3, config=True, help="Heartbeat intervals a provider may miss before it is lost."
    )
    flush_interval = Float(
        1.0, config=True, help="Seconds between writes of the batched heartbeats to the database."
    )
    reconcile_interval = Float(
        10.0,
        config=True,
        help="Seconds between re-reads of the live leases from the database (several "
        "coordinators sharing one database see each other's leases this often).",
    )
    replica_url = Unicode(
        "",
        config=True,
        help="With several coordinators on one PostgreSQL database: the http(s)://HOST:PORT "
        "providers reach THIS replica at directly (not a load balancer's name), which the dials "
        "to its relay name so a provider linked at another replica connects back here; "
        "default: the listening address (0.0.0.0 becomes this host's name).",
    )
    feed_interval = Float(
        0.2,
        config=True,
        help="Seconds between reads of the database's change feed by a replica (PostgreSQL): "
        "how soon offers and leases changed by other replicas reach its scheduler, and how "
        "soon it sends the dials and ends other replicas left for providers linked to it.",
    )
    token_ttl = Float(
        3600.0,
        config=True,
        help="Seconds a lease token is valid; a lease never used by then ends, a running one "
        "renews its token (POST /api/v1/leases/ID/token).",
    )
    claim_window = Float(
        DEFAULT_WINDOW,
        config=True,
        help="Seconds a new lease may hold its GPUs before its escrow is verified (escrow "
        "payments), and then before its session starts (on a free coordinator: from the "
        "request); a lease that misses it ends ('not funded in time' / 'not started in "
        "time') and its GPUs are offered again at once.",
    )
    max_unfunded_per_key = Integer(
        DEFAULT_MAX_UNFUNDED_PER_KEY,
        config=True,
        help="Leases one key may hold at once whose escrow is not verified yet (escrow "
        "payments); one more is refused with 429 unfunded_limit and Retry-After.",
    )
    max_unfunded_leases = Integer(
        DEFAULT_MAX_UNFUNDED,
        config=True,
        help="Leases waiting for their escrow this coordinator holds at most, all keys "
        "together (escrow payments); one more is refused with 429 unfunded_capacity and "
        "Retry-After.",
    )
    relay_pair_timeout = Float(
        10.0, config=True, help="Seconds a relay client waits for its provider to connect."
    )
    relay_max_message_size = Integer(
        DEFAULT_MAX_FRAME_SIZE + (1 << 20),
        config=True,
        help="Largest websocket message the relay passes on, bytes (above the tunnel's frame "
        "limit).",
    )
    hello_timeout = Float(
        10.0,
        config=True,
        help="Seconds a new provider link has to answer the challenge, and a relayed tunnel, "
        "once its provider has arrived, to complete its handshake (the provider's WELCOME).",
    )
    max_unauthenticated = Integer(
        64,
        config=True,
        help="Most websocket connections in their handshake at once, on the provider link "
        "(until its hello is verified) and the relay (until the tunnel's WELCOME); more are "
        "answered 503. Each costs at most a few KB until then.",
    )
    max_unauthenticated_per_address = Integer(
        8,
        config=True,
        help="Most websocket connections in their handshake at once from one source "
        "address; more from that address are answered 503.",
    )
    offers_cache_ttl = Float(2.0, config=True, help="Seconds the offers list is cached.")
    ping_rate = Float(
        2.0,
        config=True,
        help="Latency pings of the relay (GET /relay/ping, docs/tunnel-contract.md) answered "
        "per second per source address, in bursts of up to 10; more get no answer. 0: none.",
    )
    request_max_skew = Float(
        60.0, config=True, help="Seconds a signed request's timestamp may differ from ours."
    )
    payments = Enum(
        ["escrow", "free"],
        "escrow",
        config=True,
        help="How leases are paid: 'escrow' (a SOL escrow per lease, verified on-chain before "
        "the token is issued, settled when the lease ends; docs/payments-contract.md) or "
        "'free' (only for explicitly free private pools: tokens at once, nothing escrowed). "
        "Never a fallback: an escrow coordinator whose ledger is unreachable refuses leases.",
    )
    solana_url = Unicode(
        "",
        config=True,
        help="Solana JSON-RPC URL of the ledger escrows live on (devnet, mainnet, a local "
        "validator). Empty: the embedded ledger, served by this coordinator at "
        "{public url}/solana and persisted in its database.",
    )
    min_deposit_seconds = Integer(
        60,
        config=True,
        help="Seconds of the lease's price an escrow must hold at least before the lease gets "
        "its token.",
    )
    settle_retry_interval = Float(
        5.0,
        config=True,
        help="Seconds before a pending settlement is attempted again after its first failed "
        "attempt; each further failure doubles the wait, up to settle_retry_max.",
    )
    settle_retry_max = Float(
        60.0,
        config=True,
        help="Longest wait, seconds, between two attempts of one settlement (its provider "
        "linking again makes it due at once).",
    )
    escrow_check_interval = Float(
        15.0,
        config=True,
        help="Longest time, seconds, between two on-chain checks of a live lease's escrow; "
        "an escrow no longer intact ends its lease ('escrow no longer intact').",
    )
    solana_timeout = Float(
        10.0,
        config=True,
        help="Seconds one call to the Solana ledger may take before it counts as unreachable.",
    )
    usage_ack_grace = Float(
        DEFAULT_ACK_GRACE_S,
        config=True,
        help="Seconds a lease is billed past its user's last usage acknowledgement (a lease "
        "is billed at most what its provider reported, and at most what its user "
        "acknowledged plus this). Cover one missed acknowledgement and network delay: at "
        "least twice the provisioners' usage_ack_interval (15 s by default).",
    )
    usage_ack_timeout = Float(
        DEFAULT_ACK_TIMEOUT_S,
        config=True,
        help="Seconds a paid lease may go without a usage acknowledgement from its user "
        "before it ends ('usage not acknowledged'). Keep it within usage_ack_grace plus the "
        "providers' settle_tolerance_seconds (10 s): a provider host refuses to co-sign a "
        "settlement that pays less than it metered, less that tolerance.",
    )
    max_queue_per_cohort = Integer(
        2000,
        config=True,
        help="Lease requests one class (cohort) may have waiting in its queue at once; more "
        "are answered 429 queue_full (docs/cohorts.md). Each student waits with at most as "
        "many as the kernels the class lets them run.",
    )
    jobs_interval = Float(
        2.0,
        config=True,
        help="Seconds between a replica's tries for the leadership of the replicas sharing a "
        "PostgreSQL database, and between the leader's passes over it (providers whose "
        "heartbeats stopped, leases past their claim window whose replica is gone).",
    )
    cohort_warning_seconds = Float(
        60.0,
        config=True,
        help="Seconds before a class's idle stop or max session length that the lease JSON "
        "warns of it ('warnings', 'ends_at').",
    )
    cohort_allowance_ttl = Float(
        5.0,
        config=True,
        help="Seconds a class's allowances read on-chain are reused for its dashboard (one "
        "batched read per class within them, however many instructors' tabs refresh); 0 "
        "reads the ledger on every request.",
    )
    cohort_allowance_rate = Float(
        2000.0,
        config=True,
        help="Allowances all class dashboards together may read on-chain a second (a 10 s "
        "burst): past it a dashboard shows its class's last read, with when it was made.",
    )
    gpu_checks = Bool(
        True,
        config=True,
        help="Challenge providers' GPUs (docs/gpu-verification.md): at each link and at random "
        "idle times; an offer that fails leaves the listing. Offers are listed unverified "
        "until their first challenge. --no-gpu-checks turns them off.",
    )
    gpu_check_interval = Float(
        3600.0,
        config=True,
        help="Mean seconds between challenges of idle GPUs (random gaps); 0: only at links.",
    )
    gpu_check_vectors = Integer(
        16,
        config=True,
        help="Secret random vectors per challenge: a wrong row passes with chance 2**-k.",
    )
    gpu_check_rows = Integer(8, config=True, help="Rows of the product opened per challenge.")
    gpu_check_max_n = Integer(
        32768,
        config=True,
        help="Largest matrix size for a real GPU (the coordinator's check costs O(k n**2)).",
    )
    gpu_check_cpu_n = Integer(
        1024, config=True, help="Matrix size for the CPU offer and simulated GPUs."
    )
    gpu_check_overhead = Float(
        5.0,
        config=True,
        help="Seconds a commitment may take beyond the product itself (link, scheduling).",
    )
    gpu_check_reveal_timeout = Float(
        60.0, config=True, help="Seconds a provider has to send the opened rows."
    )

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return str(Path(jupyter_data_dir()) / "io" / "coordinator")

    @validate("listen")
    def _validate_listen(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"])
        try:
            parse_listen(value)
        except ConfigError as exc:
            raise TraitError(str(exc)) from None
        return value

    @validate("solana_url")
    def _validate_solana_url(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"]).strip()
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise TraitError(
                    f"solana_url {value!r} must be a Solana JSON-RPC URL like "
                    f"https://api.devnet.solana.com, or empty for the embedded ledger"
                )
        return value

    @validate("replica_url")
    def _validate_replica_url(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"]).strip().rstrip("/")
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise TraitError(
                f"replica_url {value!r} must be this replica's own http(s)://HOST:PORT, "
                f"e.g. http://10.0.0.5:8700"
            )
        return value

    @validate(
        "heartbeat_interval",
        "flush_interval",
        "reconcile_interval",
        "feed_interval",
        "token_ttl",
        "claim_window",
        "relay_pair_timeout",
        "hello_timeout",
        "request_max_skew",
        "settle_retry_interval",
        "settle_retry_max",
        "escrow_check_interval",
        "solana_timeout",
        "usage_ack_timeout",
        "jobs_interval",
    )
    def _validate_positive_float(self, proposal: dict[str, object]) -> float:
        value = float(proposal["value"])  # type: ignore[arg-type]
        if value <= 0:
            raise TraitError(f"{proposal['trait'].name} must be positive")  # type: ignore[attr-defined]
        return value

    @validate(
        "heartbeat_misses",
        "relay_max_message_size",
        "min_deposit_seconds",
        "max_unfunded_per_key",
        "max_unfunded_leases",
    )
    def _validate_positive_int(self, proposal: dict[str, object]) -> int:
        value = int(proposal["value"])  # type: ignore[call-overload]
        if value < 1:
            raise TraitError(f"{proposal['trait'].name} must be at least 1")  # type: ignore[attr-defined]
        return value

    @validate(
        "offers_cache_ttl",
        "usage_ack_grace",
        "ping_rate",
        "cohort_allowance_ttl",
        "cohort_allowance_rate",
    )
    def _validate_non_negative(self, proposal: dict[str, object]) -> float:
        value = float(proposal["value"])  # type: ignore[arg-type]
        if value < 0:
            raise TraitError(f"{proposal['trait'].name} must not be negative")  # type: ignore[attr-defined]
        return value

    @validate("max_unauthenticated", "max_unauthenticated_per_address")
    def _validate_cap(self, proposal: dict[str, object]) -> int:
        value = int(proposal["value"])  # type: ignore[call-overload]
        if value < 1:
            raise TraitError(f"{proposal['trait'].name} must be at least 1")  # type: ignore[attr-defined]
        return value

    # -- derived values --------------------------------------------------------------------

    def listen_address(self) -> tuple[str, int]:
        """The ``(host, port)`` to bind; port 0 means any free port."""
        return parse_listen(self.listen)

    def database_url(self) -> str:
        """The database to open (a SQLite file in the data directory by default)."""
        if self.db:
            return self.db
        return str(Path(self.data_dir).expanduser() / "coordinator.db")

    def load_keypair(self) -> Keypair:
        """The coordinator's keypair: ``keypair_path`` if set (it must exist), else the one
        in the data directory, created (owner-only) on first use."""
        if self.keypair_path:
            return load_keypair(self.keypair_path)
        path = Path(self.data_dir).expanduser() / "coordinator-keypair.json"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return load_or_create_keypair(path)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context when ``certfile`` is set, else None (plain http/ws)."""
        return server_ssl_context(self.certfile, self.keyfile, serves="https")
