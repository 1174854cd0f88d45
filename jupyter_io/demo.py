"""``jupyter io demo``: a whole jupyter-io marketplace on this machine, in one command.

The demo is an ordered list of :class:`Service` objects, started in order and stopped in
reverse (so JupyterLab shuts its kernels down while their provider and the coordinator still
run, and the provider reports its sessions' end to a coordinator that still listens):

1. :class:`CoordinatorService`: the marketplace coordinator (``jupyter io coordinator``) on
   loopback, its SQLite database and keypair in the data dir. It is paid through escrows
   (``payments = "escrow"``) on its embedded ledger, served at ``{coordinator}/solana``;
2. :class:`WalletService`: funds the demo user's wallet (and the provider host's key, which
   pays the settlements' fees) on that ledger by airdrop, so kernels can escrow their
   sessions at once;
3. :class:`ProviderService`: a provider host (``python -m provider_host``) registered with it.
   It gets no public URL, so clients reach it through the coordinator's relay, as they would
   a gamer's PC behind a home router. It offers its CPU and simulated GPUs
   (``--simulate-gpu "RTX 4090:24"``), always labelled simulated;
4. :class:`KernelspecsService` (with ``--no-lab``): one lease-mode kernelspec per GPU type on
   offer (``jupyter-io-rtx-4090``: "RTX 4090 (simulated) · 0.12 SOL/h"),
   installed in ``sys.prefix`` so the Jupyter of this environment finds them, removed again
   on the way out. Each kernel started from one leases its GPU through the coordinator;
5. :class:`LabService`: JupyterLab on loopback (left out with ``--no-lab``), its GPU picker
   pointed at the coordinator and the demo wallet (the wallet view reads the coordinator's
   ledger); its server extension serves one kernelspec per GPU type on offer under the same
   names, with the user's session budget, price cap and region applied.

Ctrl-C or SIGTERM stops everything; a second Ctrl-C kills what is still running at once. Build a
:class:`Demo` (a traitlets Configurable) and ``await demo.run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir
from traitlets import Bool, Enum, Float, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .data_lock import DataDirBusy, DataDirLock
from .errors import ConfigError, JupyterIOError
from .identity import load_or_create_keypair
from .kernelspec import install_lease_kernelspec
from .payments.amounts import format_sol, parse_sol

__all__ = [
    "READY_LINE",
    "CoordinatorService",
    "Demo",
    "KernelspecsService",
    "LabService",
    "ProviderService",
    "Service",
    "WalletService",
    "demo_display_name",
]

#: The demo prints this line (then details) once every service is up.
READY_LINE = "jupyter-io demo ready"
#: SOL the demo provider host's key holds for the settlements' fees it pays.
PROVIDER_FEE_SOL = "1"

#: Runs ``jupyter io coordinator`` with the arguments that follow, from this Python (the
#: coordinator package has no ``__main__``, and a console script may not be on PATH).
COORDINATOR_COMMAND = (
    "from jupyter_io.coordinator.app import CoordinatorApp; CoordinatorApp.launch_instance()"
)
_COORDINATOR_LISTENING = re.compile(r"^jupyter-io coordinator listening on (?P<url>https?://\S+)")

# What the provider host prints on stdout before it accepts tunnels: its inventory, one
# device a line ("  gpu 0: MODEL, 80.0 GiB VRAM" or "  cpu: cpu (no GPU), 2 cores"), then the
# listening line, whose URL the kernelspec needs.
_LISTENING = re.compile(r"^jupyter-io provider listening on (?P<url>wss?://\S+)")
_DEVICE = re.compile(r"^\s+(?P<kind>cpu|gpu \d+): (?P<model>.+), [^,]+$")


class Service:
    """One step of the demo. :meth:`start` brings it up; :meth:`stop` must be safe to call
    whether or not :meth:`start` finished (the demo stops what it began, in reverse)."""

    name = "service"
    #: Whether the service ending by itself is a normal way for the demo to end.
    may_end_demo = False

    def describe(self) -> list[str]:
        """Lines for the demo's ready message, once started."""
        return []

    async def start(self) -> None:
        """Bring the service up; return once it is usable."""

    async def stop(self, hurry: asyncio.Event) -> None:
        """Take it down. When ``hurry`` is set (a second Ctrl-C), stop waiting and kill."""

    async def ended(self) -> int:
        """Return (an exit code) only if the service ends by itself; most never do."""
        await asyncio.Future()
        raise AssertionError("unreachable")


class _Process(Service):
    """A child process in its own session, so the terminal's Ctrl-C reaches only the demo
    and the demo decides the order in which children stop."""

    def __init__(self, argv: Sequence[str], *, stop_timeout: float, log: Any) -> None:
        self.argv = list(argv)
        self.stop_timeout = stop_timeout
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self, **kwargs: Any) -> asyncio.subprocess.Process:
        self.log.debug("%s: starting %s", self.name, " ".join(self.argv))
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )
        return self.proc

    async def ended(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, hurry: asyncio.Event) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self.log.info("%s: stopping (pid %d)", self.name, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        if not await _first(proc.wait(), hurry.wait(), timeout=self.stop_timeout):
            self.log.warning("%s: did not stop in time, killing it", self.name)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session is its own process group
            # Dead now; on Python 3.11 wait() also waits for its pipes, which a stray
            # grandchild could hold, so don't wait on them forever.
            await _first(proc.wait(), timeout=5)


class _Announcing(_Process):
    """A child that prints a ready line on stdout once usable: :meth:`start` echoes its
    stdout until :meth:`_ready` says so, then keeps draining the pipe in the background (its
    logs, on stderr, go straight to the terminal)."""

    what = "the process"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        start_timeout: float,
        stop_timeout: float,
        log: Any,
        echo: TextIO | None = None,
    ) -> None:
        super().__init__(argv, stop_timeout=stop_timeout, log=log)
        self.start_timeout = start_timeout
        self.echo = echo or sys.stdout
        self._pump: asyncio.Task[None] | None = None

    def _ready(self, line: str) -> bool:
        """Look at one line of stdout; True once it says the process is ready."""
        raise NotImplementedError

    def _timeout_hint(self) -> str:
        return ""

    async def _announced(self) -> None:
        """What else must hold before the service counts as started (after the line)."""

    async def start(self) -> None:
        proc = await self.spawn(stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            await asyncio.wait_for(self._read_until_ready(proc.stdout), self.start_timeout)
            # Keep draining its stdout, or it would block once the pipe fills.
            self._pump = asyncio.create_task(self._echo_rest(proc.stdout))
            await asyncio.wait_for(self._announced(), self.start_timeout)
        except asyncio.TimeoutError:
            raise JupyterIOError(
                f"{self.what} did not report {self._timeout_hint() or 'listening'} within "
                f"{self.start_timeout:g} s (raise the start timeout if this machine is slow): "
                f"{' '.join(self.argv)}"
            ) from None

    async def _read_until_ready(self, stream: asyncio.StreamReader) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                code = await self.ended()
                raise JupyterIOError(
                    f"{self.what} exited with code {code} before listening; its messages are "
                    f"above. Command: {' '.join(self.argv)}"
                )
            line = raw.decode(errors="replace")
            self.echo.write(line)
            self.echo.flush()
            if self._ready(line):
                return

    async def _echo_rest(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            self.echo.write(raw.decode(errors="replace"))
            self.echo.flush()

    async def stop(self, hurry: asyncio.Event) -> None:
        await super().stop(hurry)
        if self._pump is not None:
            # EOF comes once the process is gone (and any kernel that inherited the pipe,
            # which dies with its host); don't wait forever on a straggler.
            await _first(self._pump, hurry.wait(), timeout=5)


class CoordinatorService(_Announcing):
    """The marketplace coordinator on loopback. After :meth:`start`, :attr:`url` is its
    ``http://127.0.0.1:PORT``."""

    name = "coordinator"
    what = "the coordinator"

    def __init__(self, argv: Sequence[str], **kwargs: Any) -> None:
        super().__init__(argv, **kwargs)
        self.url = ""

    def _ready(self, line: str) -> bool:
        if listening := _COORDINATOR_LISTENING.match(line):
            self.url = listening["url"]
            return True
        return False

    def describe(self) -> list[str]:
        return [f"  coordinator: {self.url}"]


class ProviderService(_Announcing):
    """A provider host on loopback. After :meth:`start`, :attr:`url` is its tunnel URL and
    :attr:`offer` what its inventory lists (e.g. ``cpu (no GPU)``, ``2 x A100``).

    With a ``coordinator``, the host is told to join it (``--coordinator URL``, added to
    ``argv`` on start, when the coordinator's URL is known), and :meth:`start` returns only
    once the coordinator lists the offers of ``pubkey`` (the host's key): then they can be
    leased.
    """

    name = "provider"
    what = "the provider host"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        coordinator: CoordinatorService | None = None,
        pubkey: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(argv, **kwargs)
        self.coordinator = coordinator
        self.pubkey = pubkey
        self.url = ""
        self.offer = ""
        #: This host's offers as the coordinator lists them (with a coordinator).
        self.offers: list[dict[str, Any]] = []
        self._devices: list[tuple[bool, str]] = []  # (is the CPU, model)
        self._linking = False

    async def start(self) -> None:
        if self.coordinator is not None:
            self.argv += ["--coordinator", self.coordinator.url]
        await super().start()

    def _ready(self, line: str) -> bool:
        if device := _DEVICE.match(line):
            self._devices.append((device["kind"] == "cpu", device["model"]))
        if listening := _LISTENING.match(line):
            self.url = listening["url"]
            self.offer = _describe_offer(self._devices)
            return True
        return False

    def _timeout_hint(self) -> str:
        if self._linking and self.coordinator is not None:
            return f"its offers at the coordinator {self.coordinator.url}"
        return ""

    async def _announced(self) -> None:
        if self.coordinator is None:
            return
        from .coordinator_client import CoordinatorClient

        self._linking = True
        proc = self.proc
        assert proc is not None
        async with CoordinatorClient(self.coordinator.url, timeout=10) as client:
            # The coordinator publishes no event for a provider joining; asking its offers
            # list is what a user would do, so ask until ours are there.
            while not self.offers:
                if proc.returncode is not None:
                    raise JupyterIOError(
                        f"the provider host exited with code {proc.returncode} before it "
                        f"joined the coordinator; its messages are above"
                    )
                body = await client.offers()
                self.offers = [o for o in body["providers"] if o["provider"] == self.pubkey]
                if not self.offers:
                    await asyncio.sleep(0.1)

    def describe(self) -> list[str]:
        offer = f" offering {self.offer}" if self.offer else ""
        route = ", reached through the coordinator's relay" if self.coordinator else ""
        return [f"  provider:    {self.url}{offer}{route}"]


class WalletService(Service):
    """Funds the demo's keys on the coordinator's ledger, when the coordinator is paid
    through escrows: the user's wallet (``user_lamports``: kernels escrow their sessions from
    it) and the provider host's key (``provider_lamports``: it pays the settlements' fees).
    Airdrops only what is missing, so a restarted demo (its ledger persists in the data dir)
    does not pile SOL up. With a free coordinator it does nothing."""

    name = "wallet"

    def __init__(
        self,
        coordinator: CoordinatorService,
        *,
        user_keypair_path: Path,
        provider_pubkey: str,
        user_lamports: int,
        provider_lamports: int,
        log: Any,
    ) -> None:
        self.coordinator = coordinator
        self.user_keypair_path = user_keypair_path
        self.provider_pubkey = provider_pubkey
        self.user_lamports = user_lamports
        self.provider_lamports = provider_lamports
        self.log = log
        #: The coordinator's ledger ("" for a free coordinator), and the user's balance on it.
        self.solana_url = ""
        self.balance = 0
        self.user = ""

    async def start(self) -> None:
        from solders.pubkey import Pubkey

        from .coordinator_client import CoordinatorClient
        from .identity import load_keypair
        from .payments.escrow import EscrowClient

        async with CoordinatorClient(self.coordinator.url, timeout=10) as client:
            payments = await client.payments()
        if payments.payments != "escrow" or not payments.solana_url:
            return
        self.solana_url = payments.solana_url
        user = load_keypair(self.user_keypair_path).pubkey()
        wanted = [
            (user, self.user_lamports),
            (Pubkey.from_string(self.provider_pubkey), self.provider_lamports),
        ]
        ledger = EscrowClient.connect(self.solana_url)
        try:
            for pubkey, lamports in wanted:
                held = (await ledger.client.get_balance(pubkey)).value
                if held < lamports:
                    await ledger.airdrop(pubkey, lamports - held)
                    self.log.info(
                        "wallet: airdropped %s to %s", format_sol(lamports - held), pubkey
                    )
            self.balance = (await ledger.client.get_balance(user)).value
        finally:
            await ledger.close()
        self.user = str(user)

    def describe(self) -> list[str]:
        if not self.solana_url:
            return ["  payments:    free (the coordinator asks for no escrow)"]
        return [
            f"  wallet:      {self.user} holds {format_sol(self.balance)} on the coordinator's "
            f"ledger {self.solana_url} (each kernel escrows its session from it)"
        ]


class KernelspecsService(Service):
    """Installs one lease-mode kernelspec per GPU type the coordinator has on offer
    (``KERNEL_NAME-rtx-4090``, ...) on start, and removes exactly those directories on stop."""

    name = "kernelspecs"

    def __init__(
        self,
        coordinator: CoordinatorService,
        *,
        kernel_name: str,
        keypair_path: Path,
        prefix: str,
        log: Any,
    ) -> None:
        self.coordinator = coordinator
        self.kernel_name = kernel_name
        self.keypair_path = keypair_path
        self.prefix = prefix
        self.log = log
        #: ``(kernel name, display name, directory)`` of each installed kernelspec.
        self.installed: list[tuple[str, str, str]] = []

    def describe(self) -> list[str]:
        lines = [
            f"  kernelspec:  {name} ({display!r}) in {path}"
            for name, display, path in self.installed
        ]
        return [*lines, f"  user key:    {self.keypair_path}"]

    async def start(self) -> None:
        from .coordinator_client import CoordinatorClient

        async with CoordinatorClient(self.coordinator.url, timeout=10) as client:
            types = (await client.offers())["types"]
        if not types:
            raise JupyterIOError(f"the coordinator at {self.coordinator.url} has nothing on offer")
        for offer in types:
            name = f"{self.kernel_name}-{_slug(offer['display'])}"
            display = demo_display_name(offer)
            path = install_lease_kernelspec(
                name,
                self.coordinator.url,
                self.keypair_path,
                gpu=offer["display"],
                display_name=display,
                prefix=self.prefix,
            )
            self.installed.append((name, display, path))

    async def stop(self, hurry: asyncio.Event) -> None:
        for _, _, path in self.installed:
            shutil.rmtree(path, ignore_errors=True)
            self.log.info("kernelspecs: removed %s", path)
        self.installed = []


def demo_display_name(offer: dict[str, Any]) -> str:
    """``RTX 4090 (simulated) · 0.12 SOL/h`` for a type of the offers list: short enough
    for a launcher tile, as the server extension's GPU kernelspecs are (the cheapest price,
    else the median)."""
    name = str(offer["display"]) + (" (simulated)" if offer.get("simulated") else "")
    price = offer.get("price_min")
    if price is None:
        price = offer.get("price_median")
    return name if price is None else f"{name} · {format_sol(int(price))}/h"


def _slug(text: str) -> str:
    """``rtx-4090`` for ``RTX 4090``: what a kernel name may hold."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


class LabService(_Process):
    """JupyterLab, its output straight on the terminal. Ends the demo if it exits itself
    (File → Shut Down). With a ``coordinator``, its jupyter_io server extension (the GPU
    picker, one kernel per GPU type on offer) is pointed at it and the demo user's wallet."""

    name = "jupyterlab"
    may_end_demo = True

    def __init__(
        self,
        argv: Sequence[str],
        *,
        coordinator: CoordinatorService | None = None,
        keypair_path: Path | None = None,
        on_url: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(argv, **kwargs)
        self.coordinator = coordinator
        self.keypair_path = keypair_path
        #: Called with Lab's URL (``http://127.0.0.1:8889/lab?token=...``) once it serves.
        self.on_url = on_url
        self.url = ""
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.coordinator is not None:
            self.argv.append(f"--JupyterIOExtension.coordinator_url={self.coordinator.url}")
        if self.keypair_path is not None:
            self.argv.append(f"--JupyterIOExtension.keypair_path={self.keypair_path}")
        proc = await self.spawn()
        if self.on_url is not None:
            self._watch = asyncio.create_task(self._watch_url(proc))

    async def _watch_url(self, proc: asyncio.subprocess.Process) -> None:
        """Learn Lab's URL from the server info file Jupyter Server writes once it listens
        (``jpserver-PID.json`` in the runtime dir; the port may not be the one asked for).
        Lab tells no one else, so look a few times a second until it is there."""
        info = Path(jupyter_runtime_dir(), f"jpserver-{proc.pid}.json")
        while proc.returncode is None:
            try:
                server = json.loads(await asyncio.to_thread(info.read_text))
            except (OSError, ValueError):
                await asyncio.sleep(0.25)
                continue
            url = f"{str(server['url']).rstrip('/')}/lab"
            self.url = f"{url}?token={server['token']}" if server.get("token") else url
            assert self.on_url is not None
            self.on_url(self.url)
            return

    async def stop(self, hurry: asyncio.Event) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await super().stop(hurry)


class Demo(LoggingConfigurable):
    """Runs the demo's services; see the module docstring. Configure with ``c.Demo.*``."""

    data_dir = Unicode(
        help="Where the demo keeps its keypairs and the provider's workspace "
        "(default: JUPYTER_DATA_DIR/io/demo).",
    ).tag(config=True)

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return str(Path(jupyter_data_dir(), "io", "demo"))

    lab = Bool(
        True,
        help="Start JupyterLab. Without it, run only the coordinator, the provider and the "
        "kernelspecs until Ctrl-C.",
    ).tag(config=True)
    port = Int(8888, help="JupyterLab's port (it tries the next ones if taken).").tag(config=True)
    coordinator_port = Int(0, help="The coordinator's port on 127.0.0.1 (0: any free one).").tag(
        config=True
    )
    provider_port = Int(0, help="The provider host's port on 127.0.0.1 (0: any free one).").tag(
        config=True
    )
    simulate_gpus = List(
        Unicode(),
        default_value=["RTX 4090:24"],
        help="GPUs the demo's provider pretends to have, as MODEL:VRAM_GB; they are always "
        "marked simulated (its CPU is offered too when it has no real GPU).",
    ).tag(config=True)
    price = Unicode(
        "0.12", help="The demo provider's price in SOL per GPU-hour (exact to the lamport)."
    ).tag(config=True)
    payments = Enum(
        ["escrow", "free"],
        "escrow",
        help="How the demo coordinator is paid: escrow (each kernel escrows its session on the "
        "coordinator's embedded ledger, settled when it ends) or free.",
    ).tag(config=True)
    wallet_sol = Unicode(
        "10",
        help="SOL the demo user's wallet holds on the embedded ledger (airdropped up to it at "
        "each start; escrow payments only).",
    ).tag(config=True)
    kernel_name = Unicode(
        "jupyter-io",
        # The same names the server extension gives its GPU kernelspecs (it serves them when
        # Lab runs), so a notebook saved in one mode opens in the other.
        help="Prefix of the --no-lab kernelspecs' names: one per GPU type on offer, e.g. "
        "jupyter-io-rtx-4090.",
    ).tag(config=True)
    kernelspec_prefix = Unicode(
        help="Prefix the kernelspecs are installed under (PREFIX/share/jupyter/kernels); "
        "default sys.prefix, where this environment's Jupyter looks.",
    ).tag(config=True)

    @default("kernelspec_prefix")
    def _kernelspec_prefix_default(self) -> str:
        return sys.prefix

    lab_args = List(Unicode(), help="Extra command-line arguments for JupyterLab.").tag(config=True)
    coordinator_command = List(
        Unicode(),
        help="How to run the coordinator; the demo appends --listen, --data-dir and "
        "coordinator_args. Default: `jupyter io coordinator` from this Python.",
    ).tag(config=True)

    @default("coordinator_command")
    def _coordinator_command_default(self) -> list[str]:
        return [sys.executable, "-c", COORDINATOR_COMMAND]

    coordinator_args = List(
        Unicode(), help="Extra command-line arguments for the coordinator."
    ).tag(config=True)
    provider_command = List(
        Unicode(),
        help="How to run the provider host; the demo appends --listen, --keypair, --workspace, "
        "--simulate-gpu, the price, provider_args and the coordinator's URL. Default: this "
        "Python's `-m provider_host`.",
    ).tag(config=True)

    @default("provider_command")
    def _provider_command_default(self) -> list[str]:
        return [sys.executable, "-m", "provider_host"]

    provider_args = List(Unicode(), help="Extra command-line arguments for the provider host.").tag(
        config=True
    )
    coordinator_start_timeout = Float(
        60.0, help="Seconds to wait for the coordinator to listen (it migrates its database)."
    ).tag(config=True)
    provider_start_timeout = Float(
        120.0,
        help="Seconds to wait for the provider host to listen, and again for it to join the "
        "coordinator (it probes the GPU and measures a benchmark first).",
    ).tag(config=True)
    stop_timeout = Float(
        30.0, help="Seconds each process gets to stop cleanly before it is killed."
    ).tag(config=True)

    def services(self, lock: DataDirLock | None = None) -> list[Service]:
        """The demo's services, in start order. Creates the data dir and demo keypairs.
        Lab's URL goes into ``lock``'s record once Lab serves."""
        data = Path(self.data_dir).expanduser().absolute()
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        user_key = data / "user-keypair.json"
        provider_key = data / "provider-keypair.json"
        load_or_create_keypair(user_key)
        host = load_or_create_keypair(provider_key)
        workspace = data / "workspace"
        workspace.mkdir(exist_ok=True)

        coordinator = CoordinatorService(
            [
                *self.coordinator_command,
                "--listen",
                f"127.0.0.1:{self.coordinator_port}",
                "--data-dir",
                str(data / "coordinator"),
                # One user: no need to cache the offers list, and the demo waits on it.
                "--CoordinatorConfig.offers_cache_ttl=0",
                f"--CoordinatorConfig.payments={self.payments}",
                *self.coordinator_args,
            ],
            start_timeout=self.coordinator_start_timeout,
            stop_timeout=self.stop_timeout,
            log=self.log,
        )
        simulated = [arg for spec in self.simulate_gpus for arg in ("--simulate-gpu", spec)]
        provider = ProviderService(
            [
                *self.provider_command,
                "--listen",
                f"127.0.0.1:{self.provider_port}",
                "--keypair",
                str(provider_key),
                "--workspace",
                str(workspace),
                *simulated,
                "--price",
                self.price,
                *self.provider_args,
            ],
            coordinator=coordinator,
            pubkey=str(host.pubkey()),
            start_timeout=self.provider_start_timeout,
            stop_timeout=self.stop_timeout,
            log=self.log,
        )
        wallet = WalletService(
            coordinator,
            user_keypair_path=user_key,
            provider_pubkey=str(host.pubkey()),
            user_lamports=parse_sol(self.wallet_sol),
            provider_lamports=parse_sol(PROVIDER_FEE_SOL),
            log=self.log,
        )
        services: list[Service] = [coordinator, wallet, provider]
        if not self.lab:
            # For Jupyter frontends without the extension. With Lab, its server extension
            # serves the same kernelspec names itself, with the user's Lab settings (session
            # budget, price cap, region) applied: installed ones would take precedence.
            services.append(
                KernelspecsService(
                    coordinator,
                    kernel_name=self.kernel_name,
                    keypair_path=user_key,
                    prefix=self.kernelspec_prefix,
                    log=self.log,
                )
            )
        else:
            services.append(
                LabService(
                    self.lab_argv(),
                    coordinator=coordinator,
                    keypair_path=user_key,
                    on_url=None if lock is None else (lambda url: lock.update(lab_url=url)),
                    stop_timeout=self.stop_timeout,
                    log=self.log,
                )
            )
        return services

    def lab_argv(self) -> list[str]:
        """JupyterLab's command line: loopback only, plus :attr:`lab_args`."""
        argv = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
        ]
        if os.name == "posix" and os.geteuid() == 0:
            # Jupyter Server refuses to run as root without it; the demo binds loopback only.
            argv.append("--allow-root")
        return argv + list(self.lab_args)

    async def run(self) -> int:
        """Start the services, wait for Ctrl-C/SIGTERM (or one ending by itself), stop them in
        reverse. Returns the exit status: 0 after a requested stop or Lab's own shutdown."""
        if self.lab and importlib.util.find_spec("jupyterlab") is None:
            raise ConfigError(
                "JupyterLab is not installed here: `pip install -e '.[lab]'`, or run "
                "`jupyter io demo --no-lab` for the coordinator, provider and kernelspecs alone"
            )
        lock = self.lock_data_dir()
        try:
            return await self._run(lock)
        finally:
            lock.release()

    def lock_data_dir(self) -> DataDirLock:
        """Lock the data dir for this demo (released when it ends or dies). Raises
        :class:`ConfigError` naming the demo that holds it: its Lab URL, or its coordinator."""
        lock = DataDirLock(self.data_dir)
        try:
            lock.acquire(pid=os.getpid(), lab=self.lab)
        except DataDirBusy as busy:
            raise ConfigError(_busy_message(busy)) from None
        return lock

    async def _run(self, lock: DataDirLock) -> int:
        stop = asyncio.Event()
        hurry = asyncio.Event()
        started: list[Service] = []
        status = 0
        with _signals_set(stop, hurry, self.log):
            try:
                for service in self.services(lock):
                    started.append(service)
                    if not await _first(service.start(), stop.wait()):
                        break  # asked to stop while starting
                    if isinstance(service, CoordinatorService):
                        lock.update(coordinator_url=service.url)
                else:
                    self._announce(started)
                    status = await self._wait(started, stop)
            finally:
                for service in reversed(started):
                    try:
                        await service.stop(hurry)
                    except Exception:
                        self.log.exception("%s: failed to stop cleanly", service.name)
        self.log.info("jupyter-io demo stopped")
        return status

    async def _wait(self, services: list[Service], stop: asyncio.Event) -> int:
        """Until a stop is asked for (0) or a service ends by itself (Lab: 0, else 1)."""
        stopping = asyncio.ensure_future(stop.wait())
        ended = {asyncio.ensure_future(s.ended()): s for s in services}
        try:
            done, _ = await asyncio.wait([stopping, *ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopping, *ended]:
                task.cancel()
        for task in done:
            if task in ended:
                service = ended[task]
                code = task.result()
                if service.may_end_demo:
                    self.log.info("%s exited (code %s); stopping the demo", service.name, code)
                    return 0
                self.log.error(
                    "%s exited unexpectedly (code %s); stopping the demo", service.name, code
                )
                return 1
        return 0

    def _announce(self, services: list[Service]) -> None:
        lines = [READY_LINE]
        for service in services:
            lines.extend(service.describe())
        lines.append(
            "Open the URL JupyterLab prints and pick a GPU in its GPU picker (left sidebar) or a "
            "GPU kernel in its launcher: each start leases its GPU through the coordinator and "
            "escrows the session from the wallet. Ctrl-C stops everything."
            if self.lab
            else "Running without JupyterLab; Ctrl-C stops everything."
        )
        print("\n".join(lines), flush=True)


def _busy_message(busy: DataDirBusy) -> str:
    """Why this demo cannot start: which demo holds the data dir, and where to find it."""
    holder = busy.holder
    where = (
        f"its JupyterLab is at {holder['lab_url']}"
        if holder.get("lab_url")
        else f"its coordinator is at {holder['coordinator_url']}"
        if holder.get("coordinator_url")
        else "it is still starting"
    )
    return (
        f"another `jupyter io demo` (pid {holder.get('pid', '?')}) is running on the data "
        f"directory {busy.directory}: {where}. Use that one, stop it (Ctrl-C in its "
        f"terminal), or start this one with a data directory of its own (--data-dir DIR)"
    )


def _describe_offer(devices: list[tuple[bool, str]]) -> str:
    """``2 x A100, RTX 4090`` for GPUs; the CPU's label only when there is no GPU."""
    gpus = Counter(model for is_cpu, model in devices if not is_cpu)
    if not gpus:
        return ", ".join(model for _, model in devices)
    return ", ".join(f"{n} x {model}" if n > 1 else model for model, n in gpus.items())


async def _first(
    awaitable: Awaitable[Any], *others: Awaitable[Any], timeout: float | None = None
) -> bool:
    """Await ``awaitable`` unless one of ``others`` (or the timeout) comes first; then cancel
    it. True when ``awaitable`` finished (its exception, if any, is raised)."""
    main = asyncio.ensure_future(awaitable)
    rest = [asyncio.ensure_future(o) for o in others]
    try:
        await asyncio.wait([main, *rest], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in rest:
            task.cancel()
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
    if main.cancelled():
        return False
    main.result()
    return True


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, hurry: asyncio.Event, log: Any) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``; a second one sets ``hurry``. Restores the old handlers."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("killing what is still running")
            hurry.set()
        else:
            log.info("%s: stopping the demo (again to kill at once)", signal.Signals(signum).name)
            stop.set()

    signums = (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)


_PR_SET_PDEATHSIG = 1
_libc = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM if the demo dies without stopping
    us (``kill -9``), so no provider or Lab outlives it. A no-op elsewhere."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
