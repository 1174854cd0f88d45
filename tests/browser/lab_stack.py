"""A whole jupyter-io setup on loopback, as subprocesses: the browser tests' ``stack``
fixture and the browser benchmark (``benchmarks/bench_lab.py``) both run it. No pytest here.

:meth:`Stack.start_backend` starts what ``jupyter io demo`` runs: a coordinator (SQLite) paid
through escrows on its embedded ledger (``{coordinator}/solana``), a provider host linked to
it offering two simulated GPUs (RTX 4090 at 0.12 SOL/h, A100 at 0.9 SOL/h), its key funded
(it pays the settlements' fees) and the user's wallet funded by airdrop.
:meth:`Stack.start_lab` starts JupyterLab servers with fresh Jupyter config/data/runtime dirs,
a temporary workspaces dir, the news popup and update check off, and ``--allow-root`` when
root. ``start_lab(extension=False)`` starts a Lab with jupyter_io off: the server extension
disabled (``jpserver_extensions``) and the labextension disabled
(``labconfig/page_config.json``), both in a config dir of its own.

Every process runs in its own session; ``Stack.close()`` stops them all (SIGTERM, then
SIGKILL to the process group).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.identity import write_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient

CHROMIUM = os.environ.get("JUPYTER_IO_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 120.0


def airdrop(solana_url: str, pubkey: Pubkey, lamports: int) -> None:
    """Test SOL from the ledger at ``solana_url`` (the coordinator's embedded one), in a
    thread of its own (Playwright's sync API may run an event loop in this one)."""

    async def ask() -> None:
        ledger = EscrowClient.connect(solana_url)
        try:
            await ledger.airdrop(pubkey, lamports)
        finally:
            await ledger.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, ask()).result(timeout=60)


@dataclass
class Process:
    """A subprocess in its own session, its output kept for failure messages."""

    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Children left in the session (kernels), if any.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_process(
    name: str, argv: list[str], ready: re.Pattern[str], env: Any = None
) -> tuple[Process, re.Match[str]]:
    """Start ``argv``; return once a line of its output matches ``ready`` (and the match)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=env,
    )
    process = Process(name, proc)
    found: list[re.Match[str]] = []
    event = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            process.lines.append(line)
            if not found and (match := ready.search(line)):
                found.append(match)
                event.set()
        event.set()

    threading.Thread(target=read, daemon=True).start()
    if not event.wait(START_TIMEOUT) or not found:
        process.stop()
        raise RuntimeError(f"{name} did not start:\n{process.tail()}")
    return process, found[0]


@dataclass
class Lab:
    """A running JupyterLab: its URL, token, and the directory it serves."""

    url: str
    token: str
    process: Process
    notebooks: Path

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the server (``path`` below its base URL) with the token."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None


@dataclass
class Stack:
    root: Path
    coordinator_url: str = ""
    user_keypair: Path | None = None
    processes: list[Process] = field(default_factory=list)

    def _env(self, name: str) -> dict[str, str]:
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(self.root / name / "jupyter-config"),
            "JUPYTER_DATA_DIR": str(self.root / name / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(self.root / name / "jupyter-runtime"),
        }
        env.pop("JUPYTER_PREFER_ENV_PATH", None)
        return env

    @property
    def solana_url(self) -> str:
        """The coordinator's embedded ledger."""
        return self.coordinator_url + "/solana"

    def start_backend(
        self, user_funds: int = 20 * LAMPORTS_PER_SOL, min_deposit_seconds: int | None = None
    ) -> None:
        """Coordinator and provider host; the user's wallet gets ``user_funds`` (0: none).
        ``min_deposit_seconds``: the least escrow the coordinator accepts, in seconds of use
        (1 lets a test give a session a budget of seconds)."""
        env = self._env("backend")
        options = ["--CoordinatorConfig.offers_cache_ttl=0", "--CoordinatorConfig.payments=escrow"]
        if min_deposit_seconds is not None:
            options.append(f"--CoordinatorConfig.min_deposit_seconds={min_deposit_seconds}")
        coordinator, match = start_process(
            "coordinator",
            [sys.executable, "-c", "from jupyter_io.app import main; main()", "coordinator",
             "--listen", "127.0.0.1:0", "--data-dir", str(self.root / "coordinator"), *options],
            re.compile(r"jupyter-io coordinator listening on (http://\S+)"),
            env,
        )  # fmt: skip
        self.processes.append(coordinator)
        self.coordinator_url = match.group(1)
        self.start_provider("provider", "workspace")
        user_keypair = Keypair()
        self.user_keypair = write_keypair(user_keypair, self.root / "user.json")
        if user_funds:
            airdrop(self.solana_url, user_keypair.pubkey(), user_funds)
        self.wait_for_free_gpus()

    def start_provider(
        self,
        name: str,
        workspace: str,
        gpus: tuple[str, ...] = ("RTX 4090:24", "A100:80"),
        prices: tuple[str, ...] = ("RTX 4090=0.12", "A100=0.9"),
    ) -> tuple[Process, str]:
        """A provider host linked to the coordinator, its key in ``{root}/{name}.json`` and
        funded (it pays the settlements' fees): the process and its public key."""
        provider_keypair = Keypair()
        provider_key = write_keypair(provider_keypair, self.root / f"{name}.json")
        airdrop(self.solana_url, provider_keypair.pubkey(), LAMPORTS_PER_SOL)
        (self.root / workspace).mkdir()
        options = [option for gpu in gpus for option in ("--simulate-gpu", gpu)]
        options += [option for price in prices for option in ("--gpu-price", price)]
        provider, _ = start_process(
            name,
            [sys.executable, "-m", "provider_host", "--listen", "127.0.0.1:0",
             "--keypair", str(provider_key), "--workspace", str(self.root / workspace),
             "--coordinator", self.coordinator_url, "--region", "eu-west", *options,
             "--ProviderConfig.benchmark=False"],
            re.compile(r"jupyter-io provider listening on"),
            self._env("backend"),
        )  # fmt: skip
        self.processes.append(provider)
        return provider, str(provider_keypair.pubkey())

    def offers(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.coordinator_url}/api/v1/offers", timeout=10) as r:
            return json.loads(r.read())

    def wait_for_free_gpus(self, timeout: float = 60.0) -> None:
        """Until both simulated GPU types are offered with a GPU free."""
        deadline = time.monotonic() + timeout
        while True:
            types = self.offers()["types"]
            if len(types) == 2 and all(t.get("available", 0) >= 1 for t in types):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"GPUs not free: {types}")
            time.sleep(0.1)

    def start_lab(
        self,
        name: str,
        extension: bool = True,
        keypair: Path | None = None,
        options: tuple[str, ...] = (),
    ) -> Lab:
        """A JupyterLab named ``name``, leasing with ``keypair`` (default: the user's);
        ``options``: more command-line options (``--RemoteKernelProvisioner.x=y``)."""
        env = self._env(name)
        lab_root = self.root / name
        notebooks = lab_root / "notebooks"
        notebooks.mkdir(parents=True)
        settings = lab_root / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # No news popup, no update check: nothing but our UI on the page.
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        token = secrets.token_hex(16)
        argv = [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={notebooks}",
            f"--LabApp.workspaces_dir={lab_root / 'lab-workspaces'}",
            f"--LabApp.user_settings_dir={lab_root / 'lab-settings'}",
        ]  # fmt: skip
        if extension:
            argv += [
                f"--JupyterIOExtension.coordinator_url={self.coordinator_url}",
                f"--JupyterIOExtension.keypair_path={keypair or self.user_keypair}",
                f"--JupyterIOExtension.preferences_path={lab_root / 'preferences.json'}",
                "--JupyterIOExtension.offers_refresh_seconds=2",
            ]
        else:
            config = Path(env["JUPYTER_CONFIG_DIR"])
            (config / "labconfig").mkdir(parents=True)
            (config / "jupyter_server_config.json").write_text(
                json.dumps({"ServerApp": {"jpserver_extensions": {"jupyter_io": False}}})
            )
            (config / "labconfig" / "page_config.json").write_text(
                json.dumps({"disabledExtensions": {"jupyter-io": True}})
            )
        argv += options
        if os.geteuid() == 0:
            argv.append("--allow-root")
        process, match = start_process(
            f"jupyterlab-{name}", argv, re.compile(r"(http://127\.0\.0\.1:\d+)/lab\?token="), env
        )
        self.processes.append(process)
        return Lab(match.group(1), token, process, notebooks)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(60)}" for p in self.processes)

    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
