"""``io-remote``: a jupyter_client kernel provisioner whose kernels run on a provider host.

To Jupyter the kernel looks local: :meth:`RemoteKernelProvisioner.launch_kernel` returns
connection info for a :class:`~kernel_provisioner.facade.Facade` on 127.0.0.1, and a
:class:`~kernel_provisioner.connection.TunnelClient` carries the facade's frames over one
websocket to the provider host, which runs the real ipykernel. Select it in a kernelspec::

    "metadata": {"kernel_provisioner": {"provisioner_name": "io-remote",
                 "config": {"provider_url": "ws://host:8765/tunnel",
                            "keypair_path": "~/.config/solana/id.json"}}}

or, to lease a GPU from the marketplace coordinator instead of naming a provider::

                 "config": {"coordinator_url": "http://127.0.0.1:8700",
                            "gpu": "RTX 4090", "max_price_per_hour": "0.5",
                            "keypair_path": "~/.config/solana/id.json"}

With a coordinator, :meth:`~RemoteKernelProvisioner.launch_kernel` first leases a GPU (a
request signed by the user's keypair, see :mod:`kernel_provisioner.lease`), then pays for it
(an escrow coordinator's lease has no token until the payment hook, ``payment_hook_class``,
opened the lease's escrow and the coordinator verified it on-chain), then opens the tunnel to
the lease's ``tunnel_url`` (the provider itself, or the coordinator's relay when the provider
cannot be reached directly), presenting the lease token. Restarts keep the lease, its escrow,
provider and session; a full shutdown ends the session, then the lease (the coordinator
settles the escrow); a start that fails (a wallet too poor, a ledger unreachable) ends the
lease too. When the provider was lost the lease's escrow is refunded (the coordinator's
arbiter and the user's key co-sign); a restart then leases anew, with a new escrow, unless
the lease ended because its budget ran out (:class:`~kernel_provisioner.lease.BudgetExhausted`).
While the tunnel is connected the provisioner acknowledges the seconds it has had every
``usage_ack_interval`` (and once more at shutdown); the coordinator bills no more than that
plus its grace period, so a provider cannot bill on once this side is gone.
Each step is reported as a structured progress record (:mod:`kernel_provisioner.progress`).

Each method's docstring names the KernelManager method that calls it and what happens on
the provider. Every jupyter_client API works: the tunnel pumps frames in tasks of an event
loop, between the kernel manager's calls too, so under an
:class:`~jupyter_client.manager.AsyncKernelManager` (Jupyter Server, nbclient,
``AsyncMultiKernelManager``) it shares the caller's running loop, and under the blocking
:class:`~jupyter_client.manager.KernelManager` (``jupyter console``, qtconsole,
``MultiKernelManager``, scripts), whose loop runs only during its calls, it runs on a loop of
its own thread (:mod:`kernel_provisioner.loop_thread`; see ``tunnel_thread``). There, a
session the process never shut down is ended when the process exits, as a local kernel dies
with its parent (unless started with ``independent=True``).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import signal
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.manager import AsyncKernelManager, KernelManager
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from solders.keypair import Keypair
from traitlets import Bool, CaselessStrEnum, Float, Int, List, Type, Unicode, Union, validate

from jupyter_io.coordinator_client import LeaseGrant
from jupyter_io.coordinator_urls import parse_coordinator_urls, relay_urls
from jupyter_io.errors import ConfigError, JupyterIOError, KernelLaunchError, PaymentError
from jupyter_io.files import DEFAULT_WINDOW
from jupyter_io.identity import DEFAULT_KEYPAIR_PATH, load_keypair, parse_pubkey
from jupyter_io.latency import (
    DEFAULT_PROBE_TIMEOUT,
    DEFAULT_PROBES,
    Candidate,
    Measurement,
    RoundTripWatch,
    latencies,
    shared_prober,
)
from jupyter_io.payments.amounts import DEFAULT_SESSION_HOURS, format_sol, parse_sol
from jupyter_io.payments.hooks import PaymentHook, SolanaEscrowHook, close_ledger_clients
from jupyter_io.protocol import DEFAULT_MAX_FRAME_SIZE, Progress
from jupyter_io.queue_tickets import QueuePlace, progress_message
from jupyter_io.usage_acks import DEFAULT_ACK_INTERVAL_S

from .activity import KernelActivity
from .connection import LOST_EXIT_CODE, KernelState, TunnelClient, tunnel_url
from .facade import CHANNEL_PORT_NAMES, Facade
from .failover import Failover
from .files import NotebookFiles, default_store_root
from .journal import LocalJournal, journal_dir
from .lease import BudgetExhausted, KernelLease, LeaseTerms
from .loop_thread import LoopThread
from .progress import ProgressEvent, ProgressStep, report

__all__ = ["RemoteKernelProvisioner"]

#: Environment variables forwarded to the remote kernel besides the kernelspec's own ``env``.
#: The rest of the local environment (tokens, paths of this machine) stays here.
FORWARDED_ENV = ("JPY_SESSION_NAME",)

#: Seconds a session the process never shut down may take to end at interpreter exit, on top
#: of ``settle_timeout`` (the cleanup it runs also waits for the lease's settlement).
EXIT_END_TIMEOUT = 15.0

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Method = Callable[Concatenate["RemoteKernelProvisioner", _P], Coroutine[Any, Any, _T]]


def _on_tunnel_loop(*, opens: bool = False) -> Callable[[_Method[_P, _T]], _Method[_P, _T]]:
    """Run the decorated method on the tunnel's own loop thread when it has one (see
    ``tunnel_thread``), awaited from the caller's loop; on the caller's loop otherwise.

    ``opens``: the method may start the session, so it starts the thread first when the
    provisioner wants one. After each call, a provisioner left holding nothing (no session,
    facade, lease or background refund) stops its thread.
    """

    def decorate(method: _Method[_P, _T]) -> _Method[_P, _T]:
        @functools.wraps(method)
        async def on_loop(self: RemoteKernelProvisioner, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            thread = self._loop_thread
            if thread is None and opens and self._wants_own_loop():
                thread = self._start_loop_thread()
            if thread is None or thread.is_current():
                return await method(self, *args, **kwargs)
            try:
                return await thread.run(self._then_release(method(self, *args, **kwargs)))
            finally:
                if thread.stopping:
                    thread.stop()  # from here: wait for it to finish

        return on_loop

    return decorate


def _end_at_exit(ref: weakref.ref[RemoteKernelProvisioner]) -> None:
    provisioner = ref()
    if provisioner is not None:
        provisioner._end_at_exit()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class RemoteKernelProvisioner(KernelProvisionerBase):
    """Runs the kernel on a provider host and exposes it through a local ZMQ facade.

    One provisioner holds one tunnel session (and, with a coordinator, one lease). Restarts
    reuse it (same provider, same facade ports, same session key), so they are as fast as
    the kernel's own start; a full shutdown ends the session, the provider deletes the
    kernel's workspace, and the lease ends.
    """

    provider_url = Unicode(
        "",
        config=True,
        help="Tunnel URL of the provider host, e.g. ws://gpu-box:8765/tunnel (or "
        "ws://gpu-box:8765: the /tunnel path is implied). Leave empty "
        "and set coordinator_url to lease a GPU from the marketplace instead.",
    )
    coordinator_url = Unicode(
        "",
        config=True,
        help="The marketplace coordinator's http(s)://HOST:PORT: lease a GPU there (gpu, "
        "min_vram_gb, max_price_per_hour, region) instead of naming a provider. Its replicas "
        "may be listed, comma-separated (http://a:8700,http://b:8700): requests move to the "
        "next when one cannot be reached, and a relayed tunnel resumes through another's relay.",
    )
    gpu = Unicode(
        "",
        config=True,
        help="GPU type to lease, e.g. 'RTX 4090' (any spelling the coordinator lists); empty "
        "takes the best GPU on offer. Only with coordinator_url.",
    )
    min_vram_gb = Float(
        0.0, config=True, help="Least GPU memory to lease, GiB (0: any). Only with coordinator_url."
    )
    max_price_per_hour = Union(
        [Unicode(), Float(), Int()],
        default_value="",
        config=True,
        help="Most to pay per GPU-hour, in SOL (e.g. '0.5'); empty for no cap. Only with "
        "coordinator_url.",
    )
    region = Unicode(
        "", config=True, help="Region to lease in (empty: any). Only with coordinator_url."
    )
    cohort = Unicode(
        "",
        config=True,
        help="The class (cohort id, c_...) whose pool pays for this kernel: the lease is "
        "requested for it and funded from your allowance there (the coordinator pays the fees; "
        "your wallet needs no SOL). Empty: your own escrow pays. Only with coordinator_url.",
    )
    max_latency_ms = Float(
        0.0,
        config=True,
        help="Lease only from providers whose round trip from here, measured before the "
        "lease, is at most this many ms (0: no cap; latency still counts in the choice). "
        "Only with coordinator_url.",
    )
    min_reliability = Float(
        0.0,
        config=True,
        help="Lease only from providers whose measured reliability over 30 days (sessions "
        "completed x uptime, see docs/coordinator-contract.md) is at least this, 0..1, e.g. "
        "0.95. 0: no minimum. A provider with no record yet (a newcomer) never meets one. "
        "Only with coordinator_url.",
    )
    probe_candidates = Int(
        DEFAULT_PROBES,
        config=True,
        help="How many of the coordinator's candidate providers to measure before a lease "
        "(0: measure none). Measurements are reused for minutes.",
    )
    probe_timeout = Float(
        DEFAULT_PROBE_TIMEOUT,
        config=True,
        help="Seconds all latency probes before a lease may take together; a provider that "
        "has not answered by then counts as unreachable.",
    )
    round_trip_notice_after = Float(
        30.0,
        config=True,
        help="Seconds the tunnel's round trip must stay above twice its best (and 30 ms more) "
        "before the session is reported degraded (Lab then shows a notice).",
    )
    coordinator_timeout = Float(
        30.0, config=True, help="Seconds allowed for one request to the coordinator."
    )
    keypair_path = Unicode(
        DEFAULT_KEYPAIR_PATH,
        config=True,
        help="Solana keypair file (JSON array of 64 bytes) that proves who you are.",
    )
    provider_pubkey = Unicode(
        "",
        config=True,
        help="Expected base58 public key of the provider host; empty accepts any host "
        "(with a coordinator, the lease names the provider and only that key is accepted).",
    )
    grace_period = Float(
        120.0,
        config=True,
        help="Seconds to keep resuming a dropped tunnel before the kernel is declared dead.",
    )
    connect_timeout = Float(
        10.0, config=True, help="Seconds allowed for one connection and handshake."
    )
    launch_timeout = Float(
        60.0, config=True, help="Seconds the provider may take to start the kernel."
    )
    refused_limit = Float(
        3.0,
        config=True,
        help="Seconds of refused connections after which the provider counts as down "
        "(direct connections only: through the relay a refusal means the coordinator is "
        "down, and the session keeps resuming for the grace period). A refusal means no "
        "process listens on the host's port: its sessions lived in that process and its "
        "kernels were its children, so waiting longer saves nothing (a restarted host "
        "answers unknown_session). With the resume backoff (0.1 s doubling) 3 s declares "
        "the loss at the attempt 3.1 s after the first refusal (5 s: 6.3 s).",
    )
    max_frame_size = Int(
        DEFAULT_MAX_FRAME_SIZE,
        config=True,
        help="Largest tunnel frame (one Jupyter message) in bytes, both directions.",
    )
    ping_interval = Float(10.0, config=True, help="Seconds between websocket keepalive pings.")
    ping_timeout = Float(10.0, config=True, help="Seconds to wait for a keepalive pong.")
    end_timeout = Float(
        5.0,
        config=True,
        help="Seconds to wait for the provider to confirm the session's end, and then for "
        "the coordinator to confirm the lease's.",
    )
    settle_timeout = Float(
        15.0,
        config=True,
        help="Seconds a full shutdown waits, after ending the lease, for the coordinator to "
        "settle its escrow (the provider co-signs), so that a process stopping with its "
        "kernels (Jupyter Server, the demo) leaves nothing to settle later; 0: do not wait.",
    )
    journal = Bool(
        True,
        config=True,
        help="Keep the state journal: after each cell that succeeds the kernel keeps the "
        "variables it changed and they come back to this machine (Jupyter's data directory, "
        "per kernel id), to be restored into a new kernel if the provider is lost "
        "(docs/architecture.md, 'State journal'). False: the kernel keeps none.",
    )
    failover = Bool(
        True,
        config=True,
        help="When the provider is lost, lease the same GPU class again (or the next of "
        "fallback_gpus, within max_price_per_hour) from another provider, start the kernel "
        "there under the same kernel id and ports, push the notebook's files and restore the "
        "state journal; the user is told what came back (docs/architecture.md, 'Failover'). "
        "Only with coordinator_url (a kernelspec naming its provider has no other to move to). "
        "False: a lost provider ends the kernel and the lease is refunded.",
    )
    fallback_gpus = List(
        Unicode(),
        config=True,
        help="GPU classes a failover may lease, in order, when none of ``gpu`` is free.",
    )
    failover_timeout = Float(
        60.0,
        config=True,
        help="Seconds a failover may wait for a lease from another provider, and then for "
        "the journal's restore.",
    )
    failover_check_interval = Float(
        2.0,
        config=True,
        help="With failover on: while the tunnel is down, ask the coordinator this often "
        "whether it failed the lease (it misses the provider's heartbeats), and fail over "
        "then rather than after the grace period.",
    )
    journal_max_bytes = Int(
        8 * 1024**3,
        config=True,
        help="Most bytes of variables a kernel's state journal may name to be brought to this "
        "machine; a larger journal is not brought back (the kernel's own cap is lower).",
    )
    journal_trust_previous_provider = Bool(
        False,
        config=True,
        help="At a failover, load every object of the state journal into the new kernel, as "
        "the lost provider's kernel wrote it. False: objects whose pickles name anything but "
        "data constructors (functions and classes defined in the notebook, other libraries' "
        "objects, a forged os.system) are not restored and the notice offers to re-run their "
        "cells, since a hostile provider could forge a pickle that runs code in the next "
        "kernel (docs/architecture.md, 'Failover').",
    )
    sync_files = Bool(
        True,
        config=True,
        help="Mirror the notebook's directory (the kernel's cwd, as Jupyter Server gives it) "
        "into the remote workspace before the first execution, send local edits before each "
        "execution and bring back what the kernel writes (docs/architecture.md, 'Files').",
    )
    files_max_bytes = Int(
        2 * 1024**3,
        config=True,
        help="Most bytes of the notebook's directory a kernel start sends; over it the start "
        "fails naming the biggest files to list in .jupyter-io-ignore. 0: no cap.",
    )
    files_pull_max_size = Int(
        16 * 1024**2,
        config=True,
        help="Largest file the kernel wrote that comes back on its own after an execution; "
        "larger ones come back when pulled (jupyter io files pull) or at the session's end.",
    )
    files_store_max_bytes = Int(
        10 * 1024**3,
        config=True,
        help="Most bytes kept in the local store of files received from kernels "
        "(Jupyter's data dir, io/files); the least recently used go first.",
    )
    files_window = Int(
        DEFAULT_WINDOW,
        config=True,
        help="Most bytes of file transfer awaiting acknowledgement while the kernel is quiet. "
        "While it talks a transfer keeps one chunk in flight (at most 32 MiB/s), so a kernel "
        "message never waits behind more than one chunk.",
    )
    files_timeout = Float(
        300.0,
        config=True,
        help="Seconds the first sync of the notebook's directory, and the last transfer "
        "back at the session's end, may take.",
    )
    payment_hook_class = Type(
        SolanaEscrowHook,
        klass=PaymentHook,
        config=True,
        help="How leases from an escrow coordinator are paid: SolanaEscrowHook (default; "
        "configure it as c.SolanaEscrowHook.max_session_hours, .solana_url) or, for "
        "explicitly free private pools only, FreeHook. A coordinator that leases for free "
        "asks for no payment, and no hook is called.",
    )
    max_session_hours = Float(
        0.0,
        config=True,
        help="Hours of GPU time a lease's escrow covers (deposit = price * hours); the "
        "coordinator stops the kernel when they are spent. 0: the payment hook's own "
        f"setting (c.SolanaEscrowHook.max_session_hours, default {DEFAULT_SESSION_HOURS:g} h).",
    )
    usage_ack_interval = Float(
        DEFAULT_ACK_INTERVAL_S,
        config=True,
        help="Seconds between the signed usage acknowledgements sent to the coordinator "
        "while the kernel's tunnel is connected; the coordinator bills no more than the last "
        "one plus its grace period (keep this below half of that grace, 120 s by default).",
    )
    refund_timeout = Float(
        60.0,
        config=True,
        help="Seconds to wait, after the provider was lost, for the coordinator to see it "
        "too and offer the refund of the lease's escrow (it needs a few missed heartbeats).",
    )
    tunnel_thread = CaselessStrEnum(
        ("auto", "always", "never"),
        default_value="auto",
        config=True,
        help="Where the tunnel's I/O runs. 'auto': on the caller's event loop under an "
        "AsyncKernelManager (Jupyter Server, nbclient), on a loop of its own thread under the "
        "blocking KernelManager (jupyter console, qtconsole, MultiKernelManager, scripts), "
        "whose loop runs only during its calls. 'always': a thread of its own under any "
        "manager (for an application that runs its AsyncKernelManager's loop only now and "
        "then). 'never': always the caller's loop.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Instance state only: the base class's class-level ``connection_info = {}`` would
        # otherwise be shared by every provisioner.
        self.connection_info: KernelConnectionInfo = {}
        #: The steps of this kernel's starts so far (see :mod:`kernel_provisioner.progress`).
        self.progress: list[ProgressEvent] = []
        self._facade: Facade | None = None
        self._client: TunnelClient | None = None
        self._lease: KernelLease | None = None
        self._key: str | None = None
        self._remote_env: dict[str, str] = {}
        self._launched = False
        self._last_exit_code: int | None = None
        #: Leases whose provider was lost, being refunded while a new lease runs.
        self._winding_up: set[asyncio.Task[None]] = set()
        #: The tunnel's own event loop thread, when the caller keeps no loop running.
        self._loop_thread: LoopThread | None = None
        self._at_exit: Callable[[], None] | None = None
        #: Started with ``independent=True``: the session outlives this process.
        self._independent = False
        #: The round trip measured to the leased provider before the lease (None: unknown).
        self.latency: Measurement | None = None
        self._round_trip = RoundTripWatch()
        #: The notebook's directory as the kernel manager gave it (``cwd``), if any.
        self._cwd: str | None = None
        self._files: NotebookFiles | None = None
        #: The state journal carried back from the kernel (``journal``; after a launch).
        self._journal: LocalJournal | None = None
        #: Executions on the kernel, for a class's idle timeout (``docs/cohorts.md``).
        self._activity = KernelActivity()
        #: Moves the kernel to another provider when its own is lost (``failover``).
        self._failover = Failover(self)
        #: Why this kernel's restarts are refused for good (its lease's budget ran out):
        #: Jupyter's restarter tries again up to its ``restart_limit``, and every try must
        #: be refused the same way, without leasing or paying anew.
        self._exhausted: str | None = None

    @validate("provider_url")
    def _check_provider_url(self, proposal: Any) -> str:
        url = str(proposal["value"]).strip()
        if url and not url.startswith(("ws://", "wss://")):
            raise ConfigError(
                f"provider_url {url!r} must be a ws:// or wss:// URL, e.g. ws://gpu-box:8765/tunnel"
            )
        return tunnel_url(url) if url else url  # ws://HOST:PORT means its /tunnel

    @validate("coordinator_url")
    def _check_coordinator_url(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip()
        entries = [entry.strip().rstrip("/") for entry in value.split(",")] if value else []
        for entry in entries:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"coordinator_url {entry!r} must be an http:// or https:// URL, e.g. "
                    f"http://127.0.0.1:8700 (several replicas: separate them with commas)"
                )
        return ",".join(parse_coordinator_urls(entries, what="coordinator_url"))

    @validate("max_price_per_hour")
    def _check_max_price(self, proposal: Any) -> str | float | int:
        value = proposal["value"]
        if isinstance(value, str):
            value = value.strip()
        if value != "":
            try:
                parse_sol(value)
            except ConfigError as exc:
                raise ConfigError(f"max_price_per_hour: {exc}") from None
        return value

    @validate("usage_ack_interval")
    def _check_ack_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise ConfigError("usage_ack_interval must be positive (seconds)")
        return value

    @validate("min_reliability")
    def _check_min_reliability(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0 <= value <= 1:
            raise ConfigError(
                f"min_reliability must lie in 0..1 (0.95: 95 % of sessions completed), not {value}"
            )
        return value

    @validate("min_vram_gb", "max_session_hours")
    def _check_not_negative(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value < 0:
            raise ConfigError(f"{proposal['trait'].name} must not be negative")
        return value

    # -- what callers may inspect ----------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        """The provider's id of this provisioner's tunnel session (None before launch)."""
        return self._client.session_id if self._client is not None else None

    @property
    def kernel_pid(self) -> int | None:
        """The kernel's process id on the provider host (as the host reported it)."""
        return self._client.kernel.pid if self._client is not None else None

    @property
    def tunnel(self) -> TunnelClient | None:
        """The tunnel session, for progress and diagnostics (None before launch)."""
        return self._client

    @property
    def lease(self) -> KernelLease | None:
        """The coordinator lease behind the session (None without a coordinator)."""
        return self._lease

    @property
    def loop_thread(self) -> LoopThread | None:
        """The thread whose event loop runs the tunnel, while it has one of its own (see
        ``tunnel_thread``); None while it runs on the caller's loop, or holds no session."""
        return self._loop_thread

    @property
    def max_price_lamports_per_hour(self) -> int | None:
        """``max_price_per_hour`` in exact lamports per GPU-hour (None: no cap)."""
        value = self.max_price_per_hour
        return None if value == "" else parse_sol(value)

    @property
    def lease_terms(self) -> LeaseTerms:
        """What this kernelspec asks the coordinator for."""
        return LeaseTerms(
            gpu=self.gpu.strip() or None,
            min_vram_bytes=int(self.min_vram_gb * (1 << 30)) or None,
            max_price_lamports_per_hour=self.max_price_lamports_per_hour,
            region=self.region.strip() or None,
            max_latency_ms=self.max_latency_ms or None,
            cohort=self.cohort.strip() or None,
            min_reliability=self.min_reliability or None,
        )

    @property
    def has_process(self) -> bool:
        """True from a successful :meth:`launch_kernel` until :meth:`wait` reaps the kernel.

        KernelManager.has_kernel reads it (it asserts it right after launch_kernel).
        """
        return self._launched

    def _where(self) -> str:
        """The provider as logs name it."""
        grant = self._lease.grant if self._lease is not None else None
        if grant is not None:
            path = "the coordinator's relay" if grant.relay else grant.tunnel_url
            return f"provider {grant.provider} via {path}"
        return self.provider_url

    def _report(self, step: ProgressStep, message: str, **details: Any) -> ProgressEvent:
        event = ProgressEvent(step, self.kernel_id or None, message, details=details)
        self.progress.append(event)
        return report(self.log, event)

    # -- the tunnel's event loop ----------------------------------------------------------

    def _wants_own_loop(self) -> bool:
        """Does the tunnel need a loop thread of its own (see ``tunnel_thread``)? Under the
        blocking KernelManager, yes: its run_sync runs a loop only inside its calls."""
        if self.tunnel_thread != "auto":
            return bool(self.tunnel_thread == "always")
        parent = self.parent
        return isinstance(parent, KernelManager) and not isinstance(parent, AsyncKernelManager)

    def _start_loop_thread(self) -> LoopThread:
        thread = self._loop_thread = LoopThread(
            f"io-remote tunnel {self.kernel_id}", on_stop=close_ledger_clients
        )
        # A weak reference: a provisioner the application dropped is no business of ours.
        self._at_exit = functools.partial(_end_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)
        self.log.debug("jupyter-io: the tunnel runs on thread %r", thread.name)
        return thread

    @property
    def _holds_nothing(self) -> bool:
        return (
            self._client is None
            and self._facade is None
            and self._lease is None
            and not self._winding_up
        )

    async def _then_release(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await ``coro`` on the loop thread, then stop the thread if nothing is left on it."""
        try:
            return await coro
        finally:
            self._release_loop_thread()

    def _release_loop_thread(self) -> None:
        """On the loop thread: stop it once the provisioner holds nothing that runs there."""
        thread = self._loop_thread
        if thread is None or not thread.is_current() or not self._holds_nothing:
            return
        self._loop_thread = None
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        thread.stop()
        self.log.debug("jupyter-io: the tunnel's thread %r stops", thread.name)

    def _end_at_exit(self) -> None:
        """At interpreter exit, end the session that the application never shut down (the
        remote kernel, its workspace, the lease and its settlement), as a local kernel dies
        with its parent; bounded by :data:`EXIT_END_TIMEOUT` plus ``settle_timeout``."""
        thread = self._loop_thread
        if thread is None or thread.stopping or self._independent or self._holds_nothing:
            return
        where = self._where()
        self.log.info("jupyter-io: ending the session on %s as the process exits", where)
        future = asyncio.run_coroutine_threadsafe(
            self._then_release(self.cleanup(restart=False)), thread.loop
        )
        try:
            future.result(EXIT_END_TIMEOUT + self.settle_timeout)
        except Exception as exc:
            future.cancel()
            self.log.warning(
                "jupyter-io: the session on %s did not end as the process exited (%s); the "
                "provider ends it after its grace period, and the coordinator bills no "
                "more than the usage acknowledged plus its grace",
                where,
                _describe(exc),
            )

    # -- start ----------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Prepare the launch; called from ``KernelManager.pre_start_kernel()``.

        Locally: check the configuration and choose the environment to send. Nothing is
        written to a connection file yet (the facade's ports are the truth, and the kernel
        manager writes them after :meth:`launch_kernel`). Remotely: nothing (the lease is
        requested in :meth:`launch_kernel`, where a failure is cleaned up). The kernelspec's
        ``argv`` is not run here: the provider decides how it starts ipykernel.
        """
        if self.provider_url and self.coordinator_url:
            raise ConfigError(
                "the io-remote provisioner takes provider_url or coordinator_url, not both: "
                "name a provider, or lease one through the coordinator"
            )
        if not self.provider_url and not self.coordinator_url:
            raise ConfigError(
                "the io-remote provisioner needs provider_url (e.g. ws://gpu-box:8765/tunnel) "
                "or coordinator_url (e.g. http://127.0.0.1:8700) in the kernelspec's "
                "kernel_provisioner.config"
            )
        extra_arguments = kwargs.pop("extra_arguments", [])
        cmd = [*self.kernel_spec.argv, *extra_arguments] if self.kernel_spec else []
        kwargs = await super().pre_launch(cmd=cmd, **kwargs)
        env: Mapping[str, str] = kwargs.get("env") or {}
        cwd = kwargs.get("cwd")
        self._cwd = str(cwd) if cwd and self.sync_files else None
        wanted = set(self.kernel_spec.env if self.kernel_spec else ()) | set(FORWARDED_ENV)
        self._remote_env = {k: str(env[k]) for k in sorted(wanted) if k in env}
        return kwargs

    @_on_tunnel_loop(opens=True)
    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the kernel on the provider; called from ``KernelManager.launch_kernel()``.

        With a coordinator and no lease yet (or one whose session died), leases a GPU
        first and pays for it: the payment hook opens the lease's escrow (one transaction the
        user's wallet signs) and the coordinator verifies it on-chain before it hands out the
        lease's token, so no kernel starts unpaid. Opens the tunnel session (unless a restart
        reuses it), binds the local facade, and sends LAUNCH with the session key (the same
        key on every restart, so clients keep working); the provider starts ipykernel,
        killing a previous one of the session first. Returns connection info pointing at the
        facade once the provider says STARTED; raises :class:`KernelLaunchError` with the
        reason otherwise: a :class:`~kernel_provisioner.lease.LeaseRefused` when no lease
        could be had, a :class:`~kernel_provisioner.lease.LeaseNotFunded` (a
        :class:`~kernel_provisioner.lease.LeaseUnaffordable` when the wallet is short, naming
        what is needed and what it holds) when the escrow could not be opened, a
        :class:`~kernel_provisioner.lease.BudgetExhausted` on a restart after the
        coordinator ended the lease for a spent deposit. A failed first launch leaves
        nothing behind: no session, no facade, no lease (nothing moved from the wallet but
        what an opened escrow holds for the coordinator to settle).
        """
        if self._key is None:
            self._key = str(uuid.uuid4())
        self._independent = bool(kwargs.get("independent", False))
        try:
            if self.connection_info and self._exhausted is not None:
                raise BudgetExhausted(self._exhausted)  # refused already: over for good
            if self.connection_info and self._lease is not None:
                await self._check_budget(self._lease)  # a restart: is the lease still paid?
            await self._check_files()
            client = await self._ensure_session(launch=(self._key, self._remote_env))
            files = self._files
            if files is not None and files.enabled:
                files.start_sync()  # beside the kernel's start; executions wait for it
            self._report(
                ProgressStep.LAUNCHING,
                f"starting the kernel on {self._where()}",
                session=client.session_id,
            )
            started = await client.launch(self._key, self._remote_env, self.launch_timeout)
            if files is not None:
                await files.wait_synced(self.files_timeout)
        except JupyterIOError as exc:
            if not self.connection_info:
                self._report(ProgressStep.FAILED, str(exc))
                # A first launch failed: no kernel manager will clean up after us, and
                # nobody has the facade's ports yet. End the session (and the lease)
                # rather than leak them.
                await self.cleanup(restart=False)
            else:
                try:
                    if isinstance(exc, BudgetExhausted):
                        # Over for good, and Jupyter Server drops a kernel whose restart
                        # failed without calling cleanup(): release the facade and the
                        # session now (a facade left to the garbage collector blocks in
                        # zmq's Context.term()).
                        self._exhausted = str(exc)
                        await self.cleanup(restart=False)
                    elif self._client is not None and not self._client.alive:
                        await self._drop_session()
                finally:
                    # A failed restart is reported once its cleanup is done, as it fails:
                    # a client told may shut the kernel down at once, and jupyter_client's
                    # shutdown fails (InvalidStateError, HTTP 500) while the restart it
                    # races is still pending.
                    self._report(ProgressStep.FAILED, str(exc))
            if isinstance(exc, (KernelLaunchError, ConfigError)):
                raise  # a bad keypair file stays a ConfigError: the fix is in the config
            raise KernelLaunchError(str(exc)) from exc
        except asyncio.CancelledError:
            # An abandoned start (a timeout around start_kernel, a server shutting down):
            # the same cleanup, shielded from a second cancellation, then on with it.
            self._report(ProgressStep.FAILED, "the kernel's start was cancelled")
            if not self.connection_info:
                await asyncio.shield(self.cleanup(restart=False))
            raise
        self._launched = True
        self._last_exit_code = None
        if self._lease is not None:
            self._lease.mark_ready()
            self._acknowledge_while_connected(self._lease, client)
        if started.ignored_env:
            self.log.warning(
                "jupyter-io: the provider did not set these environment variables for the "
                "kernel: %s",
                ", ".join(started.ignored_env),
            )
        self._report(
            ProgressStep.READY,
            f"kernel ready on {self._where()} (session {client.session_id}, generation "
            f"{started.generation}, pid {started.pid})",
            session=client.session_id,
            generation=started.generation,
            pid=started.pid,
        )
        assert self._facade is not None
        self.connection_info = self._connection_info()
        if self._lease is not None:
            self._failover.watch(client)
        return self.connection_info

    async def _ensure_session(
        self, launch: tuple[str, Mapping[str, str]] | None = None
    ) -> TunnelClient:
        """The live tunnel session, opened anew when there is none (``launch``: see
        :meth:`TunnelClient.open`; the caller still calls ``launch`` to get the answer)."""
        if self._client is not None and self._client.alive:
            return self._client
        await self._drop_session()
        keypair = load_keypair(self.keypair_path)
        url = self.provider_url
        if self.coordinator_url:
            url = await self._ensure_lease(keypair)
        facade = self._facade
        if facade is None or not facade.bound:
            facade = self._facade = Facade()
            facade.bind()
        client = self._new_client(url, keypair, facade)
        if self._files is not None:
            self._files.attach(client)
        client.journal = self.journal
        if self.journal and self.kernel_id:
            if self._journal is None:
                self._journal = LocalJournal(
                    journal_dir(str(self.kernel_id)),
                    max_bytes=self.journal_max_bytes,
                    trust_previous_provider=self.journal_trust_previous_provider,
                    log=self.log,
                )
            self._journal.attach(client)  # after the files: routes its transfers past them
        self._activity.watch(client.bridge)
        self.log.info("jupyter-io: connecting to %s", self._where())
        try:
            await client.open(launch=launch)
        except JupyterIOError as exc:
            if not self.connection_info:
                # No client was ever given these ports; do not hold them for nothing.
                facade.close()
                self._facade = None
            raise KernelLaunchError(str(exc)) from exc
        self.log.info("jupyter-io: tunnel session %s open", client.session_id)
        self._client = client
        return client

    def _new_lease(self, keypair: Keypair) -> KernelLease:
        """A lease with a payment hook of its own (one escrow per lease)."""
        lease = KernelLease(
            self.coordinator_url,
            keypair,
            hook=self._new_hook(),
            timeout=self.coordinator_timeout,
            log=self.log,
        )
        lease.on_queue = self._queue_progress
        lease.idle_of = self._activity.idle_seconds
        return lease

    def _queue_progress(self, place: QueuePlace) -> None:
        """A class's start waits in the class's queue: report each new place or estimate."""
        message = progress_message(place)
        last = self.progress[-1] if self.progress else None
        if last is None or last.step is not ProgressStep.QUEUE or last.message != message:
            self._report(ProgressStep.QUEUE, message, **place.to_json())

    def _new_hook(self) -> PaymentHook:
        # The hook is configured like any Configurable below this provisioner
        # (c.SolanaEscrowHook.*); what the kernelspec fixes wins: the escrow is paid by the
        # key that signs the lease, and the kernelspec's budget if it sets one.
        hook = self.payment_hook_class(parent=self)
        if hook.has_trait("keypair_path"):
            hook.set_trait("keypair_path", self.keypair_path)
        if self.max_session_hours and hook.has_trait("max_session_hours"):
            hook.set_trait("max_session_hours", self.max_session_hours)
        return hook

    async def _ensure_lease(self, keypair: Keypair) -> str:
        """A paid lease whose token no session has used yet; returns where to connect."""
        lease = self._lease
        if lease is None:
            lease = self._lease = self._new_lease(keypair)
        if lease.grant is not None and lease.bound:
            # The provider binds a lease to one session; that session is gone (a restart
            # after the provider was lost), so this lease is over: take a new one (and a new
            # escrow), unless its budget ran out.
            await self._check_budget(lease)
            self.log.info(
                "jupyter-io: the session of lease %s is gone; ending it and leasing again",
                lease.grant.lease,
            )
            self._retire(lease)
            lease = self._lease = self._new_lease(keypair)
        if lease.grant is None:
            terms = self.lease_terms
            self._report(
                ProgressStep.QUEUED,
                f"asking {self.coordinator_url} for {terms.describe()}",
                coordinator=self.coordinator_url,
                gpu=terms.gpu,
                max_price_lamports_per_hour=terms.max_price_lamports_per_hour,
                region=terms.region,
            )
            measured = await self._measure_latency(lease, terms)
            grant = await lease.request(terms, latencies(measured.values()))
            self.latency = measured.get(grant.provider)
            self._report(
                ProgressStep.LEASED,
                f"leased {grant.gpu} from provider {grant.provider} at "
                f"{format_sol(grant.price_lamports_per_hour)}/h"
                f"{' through the relay' if grant.relay else ''} (lease {grant.lease})",
                lease=grant.lease,
                provider=grant.provider,
                gpu=grant.gpu,
                gpu_indices=list(grant.gpu_indices),
                price_lamports_per_hour=grant.price_lamports_per_hour,
                relay=grant.relay,
                latency_ms=None if self.latency is None else self.latency.latency_ms,
            )
        assert lease.grant is not None
        if lease.grant.token is None:
            await self._fund(lease)
        assert lease.grant is not None
        return lease.grant.tunnel_url

    async def _measure_latency(
        self, lease: KernelLease, terms: LeaseTerms
    ) -> dict[str, Measurement]:
        """Round trips to the coordinator's candidates for ``terms``, measured from here
        (:mod:`jupyter_io.latency`): cached ones cost nothing, the others are pinged at once
        within ``probe_timeout``. Never fails the start: without figures the coordinator
        scores latency as unknown (and a latency cap then finds no provider)."""
        if self.probe_candidates <= 0:
            return {}
        try:
            rows = await lease.client.candidates(
                terms.gpu,
                gpus=terms.gpus,
                min_vram_bytes=terms.min_vram_bytes,
                max_price_lamports_per_hour=terms.max_price_lamports_per_hour,
                region=terms.region,
                limit=min(16, self.probe_candidates),
            )
        except JupyterIOError as exc:
            self.log.info("jupyter-io: no latency candidates from the coordinator: %s", exc)
            return {}
        measured = await shared_prober().measure(
            [Candidate.from_json(row) for row in rows],
            probes=self.probe_candidates,
            timeout=self.probe_timeout,
        )
        if measured:
            shown = ", ".join(
                f"{p[:8]}… {'unreachable' if m.latency_ms is None else f'{m.latency_ms:.0f} ms'}"
                f"{' via relay' if m.via_relay else ''}"
                for p, m in measured.items()
            )
            self.log.info("jupyter-io: round trips measured from here: %s", shown)
        return measured

    def round_trip_json(self) -> dict[str, Any]:
        """The running tunnel's round trip from its keepalive pings (``ms``, ``best_ms``,
        ``degraded``, ``degraded_for_s``), and what was measured before the lease
        (``measured_ms``, ``via_relay``): the server extension's sessions JSON shows it."""
        now = time.monotonic()
        client = self._client
        self._round_trip.after = self.round_trip_notice_after
        self._round_trip.observe(client.round_trip_ms if client is not None else None, now)
        found = self.latency
        measured = found.latency_ms if found is not None else None
        return {
            **self._round_trip.to_json(now),
            "measured_ms": None if measured is None else round(measured, 2),
            "via_relay": found.via_relay if found is not None else None,
        }

    async def _fund(self, lease: KernelLease) -> None:
        """Open the lease's escrow and have the coordinator verify it; on failure end the
        lease (a restart's new lease too: none is left waiting for an escrow)."""
        try:
            escrow = await lease.fund()
        except (JupyterIOError, asyncio.CancelledError):
            await asyncio.shield(lease.release(self.end_timeout))
            raise
        grant = lease.grant
        if escrow is None and grant is not None and lease.cohort_funding is not None:
            address, deposit = lease.cohort_funding
            self._report(
                ProgressStep.ESCROWED,
                f"class {lease.cohort} funded escrow {address} with {format_sol(deposit)} from "
                f"your allowance, verified by the coordinator",
                lease=grant.lease,
                escrow=address,
                deposit_lamports=deposit,
                cohort=lease.cohort,
            )
            return
        if escrow is None or grant is None:
            return
        price = grant.price_lamports_per_hour
        hours = escrow.deposit / price if price else 0.0
        setup = f"setup {escrow.signature}" if escrow.signature else "found open"
        self._report(
            ProgressStep.ESCROWED,
            f"escrow {escrow.address} holds {format_sol(escrow.deposit)} ({hours:g} h at "
            f"{format_sol(grant.price_lamports_per_hour)}/h; {setup}), verified by the "
            f"coordinator",
            lease=grant.lease,
            escrow=str(escrow.address),
            deposit_lamports=escrow.deposit,
            escrow_signature=str(escrow.signature) if escrow.signature else None,
            max_session_hours=hours,
        )

    async def _check_budget(self, lease: KernelLease) -> None:
        """Raise :class:`BudgetExhausted` when the coordinator ended ``lease`` because its
        deposit was spent (a restart must not lease and pay again behind the user's back).
        A coordinator that cannot say lets the restart go on (logged)."""
        grant = lease.grant
        if grant is None or not lease.funded:
            return
        info = await lease.info()
        if info is None or not info.budget_exhausted:
            return
        raise BudgetExhausted(self._budget_message(grant, lease))

    @staticmethod
    def _budget_message(grant: LeaseGrant, lease: KernelLease) -> str:
        escrow = lease.escrow
        deposit = escrow.deposit if escrow is not None else 0
        price = grant.price_lamports_per_hour
        hours = deposit / price if price else 0
        return (
            f"the budget of lease {grant.lease} ran out: its escrow of {format_sol(deposit)} "
            f"({hours:g} h of {grant.gpu} at {format_sol(price)}/h) is spent, so the "
            f"coordinator ended the session and the kernel is not restarted on a new lease. "
            f"Start the kernel again to lease and pay anew; for longer sessions raise "
            f"c.SolanaEscrowHook.max_session_hours (or the kernelspec's max_session_hours), "
            f"or top up a running session with `jupyter io wallet topup LEASE SOL`"
        )

    def _acknowledge_while_connected(self, lease: KernelLease, client: TunnelClient) -> None:
        """Acknowledge ``lease``'s usage while ``client``'s tunnel is connected (that
        session's only: a later session belongs to another lease)."""
        lease.keep_acknowledging(lambda: client.connected, self.usage_ack_interval)

    def _retire(self, lease: KernelLease) -> None:
        """Let go of a lease whose session is gone, in the background: a funded one is
        refunded if its provider failed (or settled by the coordinator), a free one ended."""
        lease.stop_acknowledging()

        async def wind_up() -> None:
            try:
                if lease.funded:
                    self.log.info("jupyter-io: %s", await lease.wind_up_lost(self.refund_timeout))
                else:
                    await lease.release(self.end_timeout)
            finally:
                await lease.close()

        task = asyncio.ensure_future(wind_up())
        self._winding_up.add(task)

        def wound_up(task: asyncio.Task[None]) -> None:
            self._winding_up.discard(task)
            self._release_loop_thread()

        task.add_done_callback(wound_up)

    @_on_tunnel_loop()
    async def top_up(self, lamports: int) -> LeaseGrant:
        """Add ``lamports`` to the running lease's escrow from the user's wallet (one
        transaction) and have the coordinator record the larger deposit; returns the grant
        with its new ``billing``. Not called by jupyter_client: for the server extension
        and ``jupyter io wallet topup``. Raises :class:`PaymentError` when there is no
        escrow, :class:`~jupyter_io.errors.InsufficientFunds` when the wallet is short."""
        lease = self._lease
        if lease is None:
            raise PaymentError("this kernel holds no lease; nothing to top up")
        return await lease.top_up(lamports)

    def _new_client(self, url: str, keypair: Keypair, facade: Facade) -> TunnelClient:
        lease = self._lease
        grant = lease.grant if lease is not None else None
        host = grant.provider if grant is not None else self.provider_pubkey
        relay = grant is not None and grant.relay
        # A relayed tunnel resumes through another replica's relay when its own dies.
        alternates = relay_urls(url, parse_coordinator_urls(self.coordinator_url))[1:]
        return TunnelClient(
            url,
            keypair,
            outbound=facade.outbound,
            inbound=facade.inbound,
            host_pubkey=parse_pubkey(host) if host else None,
            credentials=lease.credentials if lease is not None and grant is not None else None,
            grace_period=self.grace_period,
            connect_timeout=self.connect_timeout,
            # Through the relay a refused connection means the coordinator is down (or
            # restarting), not the provider: keep resuming for the whole grace period.
            refused_limit=None if relay else self.refused_limit,
            max_frame_size=self.max_frame_size,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            log=self.log,
            on_progress=self._provider_progress,
            alternates=alternates if relay else (),
        )

    def _provider_progress(self, progress: Progress) -> None:
        """A step the provider reports before STARTED: a course environment's build."""
        self._report(ProgressStep.ENVIRONMENT, progress.message, state=progress.state)

    @property
    def state_journal(self) -> LocalJournal | None:
        """The kernel's state journal on this machine (None: ``journal`` off, or before
        the first launch); :func:`kernel_provisioner.journal.restore` takes it."""
        return self._journal

    @property
    def files(self) -> NotebookFiles | None:
        """The notebook directory's file channel (None: no cwd, or ``sync_files`` off)."""
        return self._files

    async def _check_files(self) -> None:
        """Scan the notebook's directory before a session opens: a start over the cap
        fails here (:class:`~kernel_provisioner.files.FilesOverCap`)."""
        if self._cwd is None:
            return
        if self._files is None or self._files.origin != self._cwd:
            self._files = NotebookFiles(
                self._cwd,
                max_bytes=self.files_max_bytes,
                pull_max_size=self.files_pull_max_size,
                store_root=default_store_root(),
                store_max_bytes=self.files_store_max_bytes,
                window=self.files_window,
                log=self.log,
            )
        await asyncio.to_thread(self._files.check)

    async def _drop_session(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _connection_info(self) -> KernelConnectionInfo:
        assert self._facade is not None and self._key is not None
        kernel_name = self.kernel_spec.name if self.kernel_spec is not None else ""
        info = self._facade.connection_info(self._key.encode(), kernel_name or "")
        return info  # type: ignore[return-value]

    # -- running --------------------------------------------------------------------------

    @_on_tunnel_loop()
    async def poll(self) -> int | None:
        """Is the kernel running? Called from ``KernelManager.is_alive()`` (and the restarter).

        None while the kernel runs *and* while the tunnel is down (unknown is not dead:
        jupyter_client restarts, and wipes, a kernel whose poll() reports an exit). An exit
        code only once the provider reported EXITED, or once the provider is declared lost
        (:data:`~kernel_provisioner.connection.LOST_EXIT_CODE`). Nothing is sent remotely.
        """
        if self._failover.running:
            return None  # moving to another provider: not dead
        client = self._client
        if client is None or not self._launched:
            return self._last_exit_code if self._last_exit_code is not None else 0
        code = client.exit_code
        if code == LOST_EXIT_CODE and client.dead_reason and self._failover.pending(client):
            return None  # lost a moment ago; the failover is starting
        return code

    @_on_tunnel_loop()
    async def wait(self) -> int | None:
        """Wait for the kernel to end; called from ``KernelManager.finish_shutdown()`` and
        ``KernelManager.kill_kernel()`` (which bound it with timeouts).

        Returns once the provider reported EXITED (or was declared lost), then forgets the
        process, so ``has_process`` turns False. Nothing is sent remotely.
        """
        client = self._client
        if client is None or not self._launched:
            return await self.poll()
        code = await client.wait_exited()
        self._last_exit_code = code
        self._launched = False
        return code

    @_on_tunnel_loop()
    async def send_signal(self, signum: int) -> None:
        """Signal the kernel; called from ``KernelManager.signal_kernel()`` (and so from
        ``interrupt_kernel()`` with SIGINT when the kernelspec's interrupt_mode is signal).

        Sends SIGNAL; the provider delivers it to the kernel's process group. While the
        tunnel is down the signal is queued and delivered on resume.
        """
        client = self._client
        if client is not None and self._launched:
            await client.signal(signum)

    @_on_tunnel_loop()
    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel; called from ``KernelManager.kill_kernel()`` (shutdown with
        ``now=True``, or a graceful shutdown that timed out).

        Sends SIGNAL SIGKILL; the provider kills the kernel's process group and reports
        EXITED. The tunnel session stays (a restart follows when ``restart`` is True).
        """
        await self.send_signal(signal.SIGKILL)

    @_on_tunnel_loop()
    async def terminate(self, restart: bool = False) -> None:
        """Terminate the kernel; called from ``KernelManager.finish_shutdown()`` when the
        kernel did not exit after its shutdown_request.

        Sends SIGNAL SIGTERM to the kernel's process group on the provider.
        """
        await self.send_signal(signal.SIGTERM)

    # -- stop -----------------------------------------------------------------------------

    async def shutdown_requested(self, restart: bool = False) -> None:
        """Note a shutdown; called from ``KernelManager.request_shutdown()``.

        The shutdown_request itself travels to the kernel on the control channel through
        the facade; nothing else is sent remotely.
        """
        self.log.info(
            "jupyter-io: %s requested for the kernel on %s",
            "restart" if restart else "shutdown",
            self._where(),
        )

    @_on_tunnel_loop()
    async def cleanup(self, restart: bool = False) -> None:
        """Release resources; called from ``KernelManager.cleanup_resources()``.

        ``restart=True``: keep the tunnel session, the facade and the lease (and its
        escrow), so the next :meth:`launch_kernel` reuses them (same provider, same ports).
        ``restart=False``: send END (the provider kills whatever is left of the kernel,
        deletes the session's workspace and forgets the session), close the tunnel and the
        facade, then end the lease at the coordinator (``DELETE``), which stops its metering
        and settles its escrow (the provider is paid for the seconds it delivered, the user
        refunded the rest), and waits (at most ``settle_timeout``) until it has, so that a
        process stopping with its kernels leaves nothing to settle later. When the provider
        was lost instead, the lease's escrow is refunded: once the coordinator failed the
        lease (it waits for missed heartbeats, at most ``refund_timeout``), it offers the
        refund its arbiter signed; the user's key co-signs it, it is submitted and the
        coordinator told. Refunds of earlier leases still running in the background are
        awaited (as long again at most).
        """
        await self._failover.stop()
        client = self._client
        if restart:
            if client is not None and not client.alive:
                await self._drop_session()  # the next launch opens a new session
            return
        where = self._where()
        self._client = None
        self._launched = False
        lost = client is not None and client.dead_reason is not None and not client.ended
        lease = self._lease
        if lease is not None:
            lease.stop_acknowledging()
            if client is not None and client.connected:
                # The last acknowledgement covers the session up to its end.
                await lease.acknowledge(self.end_timeout)
        files, self._files = self._files, None
        if files is not None and client is not None and client.alive:
            await files.finish(self.files_timeout)
        journal, self._journal = self._journal, None
        if journal is not None:
            await journal.close()
            if not lost:  # kept only for a restore after a lost provider
                await asyncio.to_thread(shutil.rmtree, journal.directory, True)
        if client is not None:
            if client.alive and not await client.end(self.end_timeout):
                self.log.warning(
                    "jupyter-io: %s did not confirm the end of session %s; it ends the "
                    "session itself after its grace period",
                    where,
                    client.session_id,
                )
            await client.close()
        if self._facade is not None:
            self._facade.close()
            self._facade = None
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                if lost and lease.funded and lease.ready_at is not None:
                    self.log.info("jupyter-io: %s", await lease.wind_up_lost(self.refund_timeout))
                else:
                    ran = lease.ready_at is not None
                    ended = await lease.release(self.end_timeout)
                    if ran and ended is not None:
                        later = await lease.wait_settled(ended, self.settle_timeout)
                        if later is not None:
                            self.log.warning("jupyter-io: %s", later)
            finally:
                await lease.close()
        await self._wound_up()

    async def _wound_up(self) -> None:
        """Wait (bounded) for the background refunds of earlier leases."""
        pending = set(self._winding_up)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=self.refund_timeout + self.end_timeout)
        for task in late:
            self.log.warning(
                "jupyter-io: a lost lease's refund did not finish in time; run `jupyter io "
                "wallet history` to see it and `jupyter io wallet refund LEASE` to finish it"
            )
            task.cancel()

    @_on_tunnel_loop()
    async def detach(self) -> None:
        """Release the local side and leave the remote session (and its lease) running.

        Not called by jupyter_client: for applications that persist
        :meth:`get_provisioner_info` and let another process :meth:`load_provisioner_info`
        within the provider's grace period.
        """
        await self._drop_session()
        self._launched = False
        if self._facade is not None:
            self._facade.close()
            self._facade = None
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.close()

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """Time for a graceful shutdown; called from ``KernelManager.finish_shutdown()``.

        At least 5 s: the kernel's exit has to travel back over the network as EXITED
        before the kernel manager escalates to SIGTERM and SIGKILL.
        """
        return max(recommended, 5.0)

    # -- persistence ----------------------------------------------------------------------

    @_on_tunnel_loop()
    async def get_provisioner_info(self) -> dict[str, Any]:
        """What another process needs to reattach; JSON-serialisable.

        Called by applications through ``KernelManager.provisioner`` (jupyter_client itself
        does not). Holds the provider URL (or the coordinator URL and the lease, token and
        escrow included: address, parties, deposit, setup signature, so another process can
        top it up or refund it; no key), the session id, the facade's ports and the session
        key (as text): store it as carefully as a connection file.
        """
        info = await super().get_provisioner_info()
        connection = dict(self.connection_info)
        key = connection.get("key")
        if isinstance(key, bytes):
            connection["key"] = key.decode()
        client = self._client
        info.update(
            {
                "connection_info": connection,
                "provider_url": self.provider_url,
                "coordinator_url": self.coordinator_url,
                "lease": self._lease.to_json() if self._lease is not None else None,
                "session_id": client.session_id if client else None,
                "received": client.tunnel.received if client else 0,
                "generation": client.kernel.generation if client else 0,
                "pid": client.kernel.pid if client else None,
                "key": self._key,
                "launched": self._launched,
            }
        )
        return info

    @_on_tunnel_loop(opens=True)
    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Reattach to a session described by :meth:`get_provisioner_info`.

        Rebinds the facade on the same ports (clients' connection files stay valid), takes
        over the lease and its escrow if there is one (with a payment hook of this process's
        configuration, which must hold the same wallet), and resumes the tunnel session with
        HELLO.session.
        If the provider no longer has the session, the kernel counts as lost: :meth:`poll`
        reports an exit code.
        """
        await super().load_provisioner_info(provisioner_info)
        connection = dict(provisioner_info["connection_info"])
        if isinstance(connection.get("key"), str):
            connection["key"] = connection["key"].encode()
        self.connection_info = connection  # type: ignore[assignment]
        self.provider_url = provisioner_info.get("provider_url") or ""
        self.coordinator_url = provisioner_info.get("coordinator_url") or ""
        self._key = provisioner_info.get("key")
        keypair = load_keypair(self.keypair_path)
        url = self.provider_url
        saved_lease = provisioner_info.get("lease")
        if self.coordinator_url and saved_lease:
            self._lease = self._new_lease(keypair)
            url = self._lease.restore(saved_lease).tunnel_url
        session = provisioner_info.get("session_id")
        if not provisioner_info.get("launched") or session is None:
            return
        facade = self._facade = Facade()
        facade.bind({ch: int(connection[name]) for ch, name in CHANNEL_PORT_NAMES.items()})
        if self._key:
            facade.set_key(self._key.encode())  # this process's clients get their welcome too
        client = self._new_client(url, keypair, facade)
        client.kernel.generation = int(provisioner_info.get("generation") or 0)
        client.kernel.pid = provisioner_info.get("pid")
        client.kernel.state = KernelState.RUNNING
        self._launched = True
        self._client = client
        try:
            await client.open(resume=session, received=int(provisioner_info.get("received", 0)))
        except JupyterIOError as exc:
            self.log.error("jupyter-io: cannot reattach to session %s: %s", session, exc)
            client.dead_reason = str(exc)
            self._last_exit_code = LOST_EXIT_CODE
            return
        if self._lease is not None:
            self._acknowledge_while_connected(self._lease, client)
