"""The provider host's configuration: every knob is a ``config=True`` trait.

:class:`ProviderConfig` is what the CLI (:mod:`provider_host.app`) fills from flags and config
files, and what :class:`provider_host.server.ProviderServer` reads. It does no I/O until asked:
call :meth:`ProviderConfig.listen_address`, :meth:`ProviderConfig.load_keypair`,
:meth:`ProviderConfig.load_allowlist`, :meth:`ProviderConfig.ssl_context`,
:meth:`ProviderConfig.link_url`, :meth:`ProviderConfig.pinned_coordinator`,
:meth:`ProviderConfig.settlements_path` and :meth:`ProviderConfig.price_of` when starting
up; each raises :class:`~jupyter_io.errors.ConfigError` naming the setting to fix.

Who may open a session: without ``coordinator_url`` the keys on the allow-list (``allow``,
``allow_file``); with a coordinator, whoever presents a valid lease token signed by it (the
allow-list is then not consulted: the coordinator decides who rents this host).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from jupyter_core.paths import jupyter_data_dir
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from traitlets import Bool, Enum, Float, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from jupyter_io.coordinator_urls import parse_coordinator_urls
from jupyter_io.daemon import parse_listen as _parse_listen
from jupyter_io.daemon import server_ssl_context
from jupyter_io.errors import ConfigError
from jupyter_io.files import DEFAULT_WINDOW
from jupyter_io.identity import load_allowlist, load_keypair, load_or_create_keypair
from jupyter_io.payments.amounts import parse_sol
from jupyter_io.protocol import DEFAULT_MAX_FRAME_SIZE

from .cgroups import MIN_SESSION_MEMORY, format_size, parse_size
from .isolation import ResourceLimits

__all__ = ["HOST_KEY_FILE", "LINK_PATH", "ProviderConfig", "parse_listen"]

#: The host key's file name in ``data_dir`` when no ``--keypair`` is given.
HOST_KEY_FILE = "host-keypair.json"

#: Path of the coordinator's provider-link websocket (``docs/coordinator-contract.md`` 1).
LINK_PATH = "/api/v1/providers/connect"


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (see :func:`jupyter_io.daemon.parse_listen`)."""
    return _parse_listen(text, example_port=8765)


class ProviderConfig(Configurable):
    """Everything the provider host needs to know before it listens."""

    listen = Unicode(
        "127.0.0.1:8765",
        config=True,
        help="Address the tunnel endpoint listens on, HOST:PORT ([::1]:PORT for IPv6). "
        "Port 0 picks a free port (printed at startup). Only loopback unless you say otherwise.",
    )
    allow = List(
        Unicode(),
        config=True,
        help="Base58 public keys allowed to open kernel sessions (repeatable).",
    )
    allow_file = List(
        Unicode(),
        config=True,
        help="Files of base58 public keys, one per line, '#' comments (repeatable).",
    )
    certfile = Unicode(
        "", config=True, help="TLS certificate (PEM); serve wss:// when set (with keyfile)."
    )
    keyfile = Unicode("", config=True, help="TLS private key (PEM) for certfile.")
    keypair_path = Unicode(
        "",
        config=True,
        help="The host's identity: a Solana CLI keypair file (JSON array of 64 bytes; "
        "`jupyter io keygen PATH` makes one). Default: host-keypair.json in data_dir, created "
        "there on the first start (as sshd makes its host keys) and reused after.",
    )
    workspace_root = Unicode(
        config=True,
        help="Directory under which each session gets its own working directory.",
    )
    data_dir = Unicode(
        config=True,
        help="Directory of the host's own durable state (created 0700): the records of the "
        "leases it must still co-sign a settlement for, so a restarted host is still paid. "
        "Default: next to workspace_root, named after it with '-state'.",
    )
    grace_period = Float(
        120.0,
        config=True,
        help="Seconds a session whose websocket dropped keeps its kernel, waiting for a resume.",
    )
    handshake_timeout = Float(
        10.0,
        config=True,
        help="Seconds a new connection has from its TCP accept to a verified HELLO (the "
        "websocket upgrade included); it is closed after that.",
    )
    max_unauthenticated = Integer(
        64,
        config=True,
        help="Most connections in their handshake (not yet past a verified HELLO) at once; "
        "more are answered 503. Each costs at most a few KB until then.",
    )
    max_unauthenticated_per_address = Integer(
        8,
        config=True,
        help="Most connections in their handshake at once from one source address; more "
        "from that address are answered 503.",
    )
    ping_rate = Float(
        2.0,
        config=True,
        help="Latency pings (GET /tunnel/ping, docs/tunnel-contract.md) answered per second "
        "per source address, in bursts of up to 10; more get no answer. 0 answers none.",
    )
    max_sessions = Integer(64, config=True, help="Most kernel sessions hosted at once.")
    mem_limit = Integer(
        0,
        config=True,
        help="Address-space limit per kernel in bytes (RLIMIT_AS); 0 = none. It counts "
        "virtual memory, and CUDA reserves virtual ranges larger than RAM + VRAM, so on GPU "
        "hosts leave it at 0 or far above that sum; session_memory_limit bounds the memory "
        "really used.",
    )
    session_memory_limit = Unicode(
        "auto",
        config=True,
        help="Memory each session's kernels may use together (resident memory and page "
        "cache, counted by a memory cgroup, so it works with CUDA): bytes or a size such as "
        "8G or 512M; a kernel going over it is killed and told why. 'auto' (the default): "
        "this machine's RAM divided by max_sessions, so that every session may use its whole "
        "limit at once without the machine running out of memory; raise it on a host whose "
        "sessions are fewer than max_sessions. 0 = none. Needs a host that may create "
        "cgroups (root, or a delegated cgroup_root); one that cannot says so at startup.",
    )
    cgroup_root = Unicode(
        "",
        config=True,
        help="The cgroup directory under which each session gets its memory cgroup, e.g. "
        "/sys/fs/cgroup/jupyter-io (it must exist, be writable by the host and, on cgroup v2, "
        "hold no process). Default: the host's own cgroup (cgroup v1: its memory cgroup; "
        "v2: the host moves itself into a leaf 'jupyter-io-host' of its cgroup first).",
    )
    max_open_files = Integer(
        8192, config=True, help="Open-file limit per kernel (RLIMIT_NOFILE); 0 = inherit."
    )
    max_processes = Integer(
        2048,
        config=True,
        help="Process (and thread) limit per kernel (RLIMIT_NPROC). It is counted per uid: "
        "with the sandbox on a root host each session has a uid of its own, so it bounds the "
        "session; with --isolation none all kernels share the host's user. 0 = inherit.",
    )
    max_file_size = Integer(
        0, config=True, help="Largest file a kernel may write, bytes (RLIMIT_FSIZE); 0 = none."
    )
    max_workspace_bytes = Integer(
        0,
        config=True,
        help="Most bytes a session's workspace may hold; 0 = no limit. No single file may "
        "exceed it (RLIMIT_FSIZE), and every workspace_check_interval the host measures the "
        "workspace: a kernel whose workspace is over the limit and still growing is killed "
        "(the client sees it exit with the reason; after a new LAUNCH it may delete files).",
    )
    file_store_max_bytes = Integer(
        20 * 1024**3,
        config=True,
        help="Most bytes of file content kept per user in data_dir/files/<user> (what a "
        "notebook's directory sent: a restart or a second kernel re-sends none of it); the "
        "least recently used content is deleted beyond it. 0 = no limit.",
    )
    file_window = Integer(
        DEFAULT_WINDOW,
        config=True,
        help="Most bytes of file transfer awaiting acknowledgement while the kernel is quiet. "
        "While it talks a transfer keeps one chunk in flight (at most 32 MiB/s), so a kernel "
        "message never waits behind more than one chunk.",
    )
    workspace_check_interval = Float(
        5.0, config=True, help="Seconds between measurements of a workspace's size."
    )
    isolation = Enum(
        ["sandbox", "none"],
        "sandbox",
        config=True,
        help="How kernels are kept from the host and from each other. 'sandbox' (the "
        "default; required with a coordinator): each kernel in a bubblewrap sandbox, as a uid "
        "of its own when the host runs as root (in a user namespace otherwise), seeing only "
        "its workspace (see provider_host.sandbox). 'none': kernels run as the host's own "
        "user and can read what it can (its keypair, other tenants' workspaces); only for a "
        "standalone host whose allow-listed users are trusted.",
    )
    sandbox_first_uid = Integer(
        1_500_000_000,
        config=True,
        help="First uid of the range a root host gives sessions (one uid each, no passwd "
        "entries; systemd's DynamicUser style). No user of this machine may own one.",
    )
    sandbox_uid_count = Integer(
        65536, config=True, help="How many uids the sandbox range holds (from sandbox_first_uid)."
    )
    sandbox_tmpfs_size = Integer(
        256 * 1024 * 1024,
        config=True,
        help="Size in bytes of each sandboxed kernel's private /tmp and /dev/shm (memory "
        "backed); 0 = the kernel's default (half of RAM).",
    )
    env_keep = List(
        Unicode(),
        config=True,
        help="Extra variables of the provider's environment passed to kernels (e.g. "
        "LD_LIBRARY_PATH, CUDA_HOME). Never put secrets here.",
    )
    max_frame_size = Integer(
        DEFAULT_MAX_FRAME_SIZE, config=True, help="Largest tunnel frame accepted, bytes."
    )
    max_unacked_bytes = Integer(
        256 * 1024 * 1024,
        config=True,
        help="Bytes of kernel output kept per session for replay while the client is away.",
    )
    ping_interval = Float(10.0, config=True, help="Websocket keepalive ping interval, seconds.")
    ping_timeout = Float(10.0, config=True, help="Websocket keepalive ping timeout, seconds.")
    simulate_gpu = List(
        Unicode(),
        config=True,
        help="Simulated GPUs as MODEL:VRAM_GB (repeatable); always labelled simulated.",
    )

    # -- the marketplace ------------------------------------------------------------------

    coordinator_url = Unicode(
        "",
        config=True,
        help="The marketplace coordinator to join, http(s)://HOST:PORT, or its replicas as a "
        "comma-separated list (http://a:8700,http://b:8700), or one load-balancer name. When "
        "set, the host links to one of them (outbound: works behind NAT; the next one when a "
        "link fails or drops), publishes its inventory, and admits only clients holding a "
        "lease token the coordinator signed; the allow-list is not used.",
    )
    coordinator_pubkey = Unicode(
        "",
        config=True,
        help="The coordinator's public key (base58). When set, a coordinator presenting "
        "another key is refused; otherwise the key it presents first is pinned.",
    )
    price = Unicode(
        "0.1",
        config=True,
        help="Price in SOL per GPU-hour for every model on offer (CPU slots included); "
        "exact to the lamport.",
    )
    model_prices = List(
        Unicode(),
        config=True,
        help="Per-model prices as 'MODEL=SOL' per GPU-hour (repeatable), e.g. "
        "'RTX 4090=0.35'; models not named here cost `price`.",
    )
    region = Unicode("", config=True, help="Region published to the marketplace, e.g. eu-west.")
    name = Unicode(config=True, help="Name published to the marketplace (default: hostname).")
    public_url = Unicode(
        "",
        config=True,
        help="The ws(s)://HOST:PORT/tunnel URL clients can reach this host at. Unset (the "
        "default): clients reach it through the coordinator's relay.",
    )
    usage_interval = Float(
        10.0, config=True, help="Seconds between signed usage reports per lease."
    )
    settle_tolerance_seconds = Float(
        10.0,
        config=True,
        help="Seconds of this host's own metering it lets go when co-signing a settlement: it "
        "signs only settlements paying at least price x (delivered - this) / 3600.",
    )
    link_backoff_max = Float(
        5.0,
        config=True,
        help="Longest wait, seconds, between attempts to relink to the coordinator (the wait "
        "starts at 0.1 s and doubles).",
    )
    # -- course environments (provider_host.environments) ----------------------------------

    environment_pip_args = List(
        Unicode(),
        config=True,
        help="Extra arguments for the pip that builds a cohort's course environment "
        "(repeatable), e.g. --no-index and --find-links=/srv/wheels on an air-gapped host, or "
        "--index-url of a mirror. Arguments naming an absolute path on this host are shown "
        "to the (sandboxed) build read-only. A course's requirements may not carry pip "
        "options of their own: where packages come from is the provider's choice.",
    )
    environment_network = Bool(
        True,
        config=True,
        help="Let the sandboxed pip build of a course environment use the network (to reach "
        "the package index). False: it runs in a network namespace of its own (loopback only) "
        "and can install only from what environment_pip_args show it (--find-links).",
    )
    environment_cache_count = Integer(
        8,
        config=True,
        help="Most course environments kept in data_dir/environments; beyond it the least "
        "recently used one that no session runs is deleted (built again when next needed).",
    )
    environment_build_timeout = Float(
        1800.0,
        config=True,
        help="Seconds a course environment's build (venv + pip install) may take; it is "
        "stopped after that and the session's kernel start fails with that reason.",
    )
    environment_max_bytes = Integer(
        20 * 1024**3,
        config=True,
        help="Largest course environment on disk, bytes (measured after the build; also the "
        "largest single file it may write); a bigger one is deleted and the start fails. "
        "0 = no limit.",
    )
    warm_kernels = Bool(
        True,
        config=True,
        help="Keep a sandboxed kernel started ahead of each free slot's next lease (each real "
        "GPU, or one for a CPU host; per course environment), so a lease's kernel is already "
        "up. It holds no key and runs nothing of a tenant's until claimed; costs one idle "
        "kernel's memory per slot. False: every kernel starts cold.",
    )
    benchmark = Bool(
        True,
        config=True,
        help="Measure a short torch matmul benchmark (TFLOP/s) per real GPU model, or of the "
        "CPU when the host offers no GPU, before joining the marketplace (needs torch).",
    )

    @default("name")
    def _name_default(self) -> str:
        return socket.gethostname()

    @default("workspace_root")
    def _workspace_root_default(self) -> str:
        return str(Path(jupyter_data_dir()) / "io" / "provider")

    @default("data_dir")
    def _data_dir_default(self) -> str:
        workspace = Path(self.workspace_root).expanduser()
        return str(workspace.with_name(f"{workspace.name}-state"))

    @validate("listen")
    def _validate_listen(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"])
        try:
            parse_listen(value)
        except ConfigError as exc:
            raise TraitError(str(exc)) from None
        return value

    @validate("coordinator_url")
    def _validate_coordinator_url(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"]).strip()
        try:
            urls = parse_coordinator_urls(value, schemes=("http", "https", "ws", "wss"))
        except ConfigError as exc:
            raise TraitError(str(exc)) from None
        return ",".join(urls)

    @validate("public_url")
    def _validate_public_url(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"]).strip()
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("ws", "wss") or not parts.netloc:
                raise TraitError(
                    f"public_url {value!r} must be the ws(s)://HOST:PORT/tunnel URL clients use"
                )
        return value

    @validate("session_memory_limit")
    def _validate_session_memory_limit(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"]).strip()
        if value.lower() in ("auto", "none"):
            return value.lower()
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise TraitError(f"session_memory_limit: {exc}; or 'auto', or 0 for none") from None
        if 0 < size < MIN_SESSION_MEMORY:
            raise TraitError(
                f"session_memory_limit {value} is {size:,} bytes, and a kernel needs more than "
                f"{format_size(MIN_SESSION_MEMORY)} to start: give a unit, e.g. {value}M or "
                f"{value}G"
            )
        return value

    @validate(
        "usage_interval",
        "link_backoff_max",
        "workspace_check_interval",
        "environment_build_timeout",
    )
    def _validate_positive_float(self, proposal: dict[str, object]) -> float:
        value = float(proposal["value"])  # type: ignore[arg-type]
        if value <= 0:
            raise TraitError(f"{proposal['trait'].name} must be positive")  # type: ignore[attr-defined]
        return value

    @validate(
        "grace_period",
        "handshake_timeout",
        "ping_interval",
        "ping_timeout",
        "settle_tolerance_seconds",
    )
    def _validate_non_negative(self, proposal: dict[str, object]) -> float:
        value = float(proposal["value"])  # type: ignore[arg-type]
        if value < 0:
            raise TraitError(f"{proposal['trait'].name} must not be negative")  # type: ignore[attr-defined]
        return value

    @validate(
        "max_sessions",
        "max_frame_size",
        "max_unacked_bytes",
        "max_unauthenticated",
        "max_unauthenticated_per_address",
        "environment_cache_count",
    )
    def _validate_positive(self, proposal: dict[str, object]) -> int:
        value = int(proposal["value"])  # type: ignore[call-overload]
        if value <= 0:
            raise TraitError(f"{proposal['trait'].name} must be positive")  # type: ignore[attr-defined]
        return value

    # -- derived values (no side effects) --------------------------------------------------

    def listen_address(self) -> tuple[str, int]:
        """The ``(host, port)`` to bind; port 0 means any free port."""
        return parse_listen(self.listen)

    def keypair_file(self) -> Path:
        """The host key's file: ``keypair_path``, or ``host-keypair.json`` in ``data_dir``."""
        if self.keypair_path:
            return Path(self.keypair_path).expanduser()
        return Path(self.data_dir).expanduser() / HOST_KEY_FILE

    def load_keypair(self) -> Keypair:
        """The host's keypair. Without ``keypair_path``, the one in ``data_dir``, created there
        (0600, in a 0700 directory) if missing. Raises :class:`ConfigError` naming a missing
        or bad file."""
        if self.keypair_path:
            return load_keypair(self.keypair_path)
        return load_or_create_keypair(self.keypair_file())

    def load_allowlist(self) -> frozenset[Pubkey]:
        """Public keys from ``allow`` and ``allow_file``."""
        return load_allowlist(self.allow, self.allow_file)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context when ``certfile`` is set, else None (plain ws://)."""
        return server_ssl_context(self.certfile, self.keyfile, serves="wss://")

    def coordinator_urls(self) -> tuple[str, ...]:
        """The configured coordinator URLs, in order (() without a coordinator)."""
        return parse_coordinator_urls(self.coordinator_url, schemes=("http", "https", "ws", "wss"))

    def link_urls(self) -> list[str]:
        """The ``ws(s)://`` URL of the provider link of each configured coordinator URL
        (:class:`provider_host.coordinator_link.CoordinatorLink` rotates through them)."""
        return [_link_url(url) for url in self.coordinator_urls()]

    def link_url(self) -> str:
        """The ``ws(s)://`` URL of the first coordinator's provider link ("" without one)."""
        urls = self.link_urls()
        return urls[0] if urls else ""

    def settlements_path(self, host: Pubkey) -> Path:
        """The file of ``host``'s settlement records (:class:`provider_host.settlement.
        SettlementBook`): one per host key, so hosts sharing a data directory never mix."""
        return Path(self.data_dir).expanduser() / f"settlements-{host}.json"

    def file_store_path(self, owner: Pubkey) -> Path:
        """The content store of ``owner``'s files: ``data_dir/files/<pubkey>``."""
        return Path(self.data_dir).expanduser() / "files" / str(owner)

    def environments_path(self) -> Path:
        """Where course environments are built and kept: ``data_dir/environments``."""
        return Path(self.data_dir).expanduser() / "environments"

    def pinned_coordinator(self) -> Pubkey | None:
        """The configured ``coordinator_pubkey``, or None to pin the first one seen."""
        if not self.coordinator_pubkey:
            return None
        try:
            return Pubkey.from_string(self.coordinator_pubkey.strip())
        except ValueError:
            raise ConfigError(
                f"coordinator_pubkey {self.coordinator_pubkey!r} is not a base58 public key; "
                f"copy it from `jupyter io coordinator`'s startup output"
            ) from None

    def price_of(self) -> Callable[[str], int]:
        """A function from GPU model to its price in lamports per GPU-hour.

        Parses ``price`` and ``model_prices`` now, so a typo fails at startup
        (:class:`ConfigError`). Model names match case-insensitively.
        """
        default_price = _parse_price(self.price, "price")
        by_model: dict[str, int] = {}
        for entry in self.model_prices:
            model, sep, amount = entry.rpartition("=")
            if not sep or not model.strip():
                raise ConfigError(
                    f"model price {entry!r} must look like 'MODEL=SOL', e.g. 'RTX 4090=0.35'"
                )
            by_model[model.strip().casefold()] = _parse_price(amount, f"model price {entry!r}")

        def price_of(model: str) -> int:
            return by_model.get(model.strip().casefold(), default_price)

        return price_of

    def session_memory_bytes(self) -> int:
        """``session_memory_limit`` in bytes (0: none); 'auto' is RAM / ``max_sessions``."""
        value = self.session_memory_limit
        if value == "none":
            return 0
        if value != "auto":
            return parse_size(value)
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        share = ram // self.max_sessions
        return max(MIN_SESSION_MEMORY, share - share % (1 << 20))

    def resource_limits(self) -> ResourceLimits:
        """The per-kernel resource limits."""
        return ResourceLimits(
            address_space=self.mem_limit,
            open_files=self.max_open_files,
            processes=self.max_processes,
            file_size=min(
                (v for v in (self.max_file_size, self.max_workspace_bytes) if v > 0), default=0
            ),
        )


def _link_url(coordinator_url: str) -> str:
    parts = urlsplit(coordinator_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + LINK_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _parse_price(text: str, what: str) -> int:
    try:
        return parse_sol(text)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}; give SOL per GPU-hour, e.g. 0.25") from None
