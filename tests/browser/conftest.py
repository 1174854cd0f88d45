"""Fixtures for the browser tests: a whole jupyter-io setup as subprocesses, and Chromium.

``stack`` (one per module) runs, on loopback, what ``jupyter io demo`` runs: a coordinator
(SQLite) paid through escrows on its embedded ledger (``{coordinator}/solana``), a provider
host linked to it offering two simulated GPUs (RTX 4090 at 0.12 SOL/h, A100 at 0.9 SOL/h),
its key funded (it pays the settlements' fees), and JupyterLab with the jupyter_io extensions
pointed at the coordinator and the user's wallet. The wallet gets :data:`USER_FUNDS` by
airdrop, unless the test module says ``USER_FUNDS = 0`` (to see what an empty wallet does).
The coordinator accepts escrows that cover one second (``min_deposit_seconds=1``), so a test
can give a session a budget of seconds. Lab runs with fresh Jupyter config/data/runtime
dirs, a temporary workspaces dir, the news popup and update check off, and ``--allow-root``
when root.

``page`` is a Chromium page (Python Playwright driving Debian's ``/usr/bin/chromium``; no
browser download) with Lab loaded. Without Chromium or Playwright the tests are skipped,
except under CI (the ``CI`` environment variable), where they must run, so they fail.

Screenshots are taken on every run; they replace the README's in ``docs/screenshots/`` only
with ``JUPYTER_IO_UPDATE_SCREENSHOTS=1`` (otherwise a temporary directory), so a test run does
not leave changed images in the working tree::

    JUPYTER_IO_UPDATE_SCREENSHOTS=1 pytest tests/browser
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
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
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
#: What the user's wallet gets by airdrop (a module may set its own ``USER_FUNDS``).
USER_FUNDS = 5 * LAMPORTS_PER_SOL
#: Starting Lab and loading it in Chromium is slow on a busy 2-core machine.
START_TIMEOUT = 120.0


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run the browser tests)")
    pytest.skip(message)


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


def start_process(name: str, argv: list[str], ready: re.Pattern[str], env: Any = None) -> Any:
    """Start ``argv``; return ``(Process, match)`` once a line of its output matches
    ``ready``. Fails the test (with the output) if it exits or takes too long first."""
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
        pytest.fail(f"{name} did not start:\n{process.tail()}")
    return process, found[0]


def airdrop(solana_url: str, pubkey: Pubkey, lamports: int) -> None:
    """Test SOL from the ledger at ``solana_url`` (the coordinator's embedded one)."""

    async def ask() -> None:
        ledger = EscrowClient.connect(solana_url)
        try:
            await ledger.airdrop(pubkey, lamports)
        finally:
            await ledger.close()

    # In a thread of its own: Playwright's sync API runs an event loop in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, ask()).result(timeout=60)


@dataclass
class Stack:
    coordinator_url: str
    lab_url: str
    token: str
    root: Path
    user_keypair: Path
    processes: list[Process]

    @property
    def solana_url(self) -> str:
        """The coordinator's embedded ledger."""
        return self.coordinator_url + "/solana"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call Lab's server (``path`` below its base URL) with the token."""
        request = urllib.request.Request(
            f"{self.lab_url}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(60)}" for p in self.processes)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    user_funds = getattr(request.module, "USER_FUNDS", USER_FUNDS)
    processes: list[Process] = []
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(root / "jupyter-config"),
        "JUPYTER_DATA_DIR": str(root / "jupyter-data"),
        "JUPYTER_RUNTIME_DIR": str(root / "jupyter-runtime"),
    }
    env.pop("JUPYTER_PREFER_ENV_PATH", None)
    try:
        coordinator, match = start_process(
            "coordinator",
            [sys.executable, "-c", "from jupyter_io.app import main; main()", "coordinator",
             "--listen", "127.0.0.1:0", "--data-dir", str(root / "coordinator"),
             "--CoordinatorConfig.offers_cache_ttl=0", "--CoordinatorConfig.payments=escrow",
             "--CoordinatorConfig.min_deposit_seconds=1"],
            re.compile(r"jupyter-io coordinator listening on (http://\S+)"),
            env,
        )  # fmt: skip
        processes.append(coordinator)
        coordinator_url = match.group(1)
        provider_keypair = Keypair()
        provider_key = write_keypair(provider_keypair, root / "provider.json")
        airdrop(coordinator_url + "/solana", provider_keypair.pubkey(), LAMPORTS_PER_SOL)
        (root / "workspace").mkdir()
        provider, _ = start_process(
            "provider",
            [sys.executable, "-m", "provider_host", "--listen", "127.0.0.1:0",
             "--keypair", str(provider_key), "--workspace", str(root / "workspace"),
             "--coordinator", coordinator_url, "--region", "eu-west",
             "--simulate-gpu", "RTX 4090:24", "--simulate-gpu", "A100:80",
             "--gpu-price", "RTX 4090=0.12", "--gpu-price", "A100=0.9",
             "--ProviderConfig.benchmark=False"],
            re.compile(r"jupyter-io provider listening on"),
            env,
        )  # fmt: skip
        processes.append(provider)
        _wait_for_offers(coordinator_url)

        user_keypair = Keypair()
        user_key = write_keypair(user_keypair, root / "user.json")
        if user_funds:
            airdrop(coordinator_url + "/solana", user_keypair.pubkey(), user_funds)
        notebooks = root / "notebooks"
        notebooks.mkdir()
        settings = root / "lab-settings" / "@jupyterlab" / "apputils-extension"
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
            f"--LabApp.workspaces_dir={root / 'lab-workspaces'}",
            f"--LabApp.user_settings_dir={root / 'lab-settings'}",
            f"--JupyterIOExtension.coordinator_url={coordinator_url}",
            f"--JupyterIOExtension.keypair_path={user_key}",
            f"--JupyterIOExtension.preferences_path={root / 'preferences.json'}",
            "--JupyterIOExtension.offers_refresh_seconds=2",
        ]  # fmt: skip
        if os.geteuid() == 0:
            argv.append("--allow-root")
        lab, match = start_process(
            "jupyterlab", argv, re.compile(r"(http://127\.0\.0\.1:\d+)/lab\?token="), env
        )
        processes.append(lab)
        yield Stack(coordinator_url, match.group(1), token, root, user_key, processes)
    finally:
        for process in reversed(processes):
            process.stop()


def _wait_for_offers(coordinator_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{coordinator_url}/api/v1/offers", timeout=10) as response:
            if len(json.loads(response.read())["types"]) == 2:
                return
        if time.monotonic() > deadline:
            raise TimeoutError("the provider's offers did not reach the coordinator")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[test]'")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    """A fresh page with JupyterLab loaded (its shell drawn) in a workspace of its own, so
    nothing a previous test opened comes back. Every kernel still running afterwards is shut
    down (ending its lease), so each test finds every GPU free."""
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        workspace = f"test-{secrets.token_hex(4)}"
        page.goto(
            f"{stack.lab_url}/lab/workspaces/{workspace}?reset&token={stack.token}",
            timeout=START_TIMEOUT * 1000,
        )
        page.wait_for_selector("#jp-main-dock-panel", timeout=START_TIMEOUT * 1000)
        yield page
    finally:
        context.close()
        for kernel in stack.api("GET", "/api/kernels"):
            stack.api("DELETE", f"/api/kernels/{kernel['id']}")
        # Pending kernels shut down after the DELETE's answer: wait until they are gone (and
        # their leases ended), so the next test finds every GPU free.
        deadline = time.monotonic() + 60
        while stack.api("GET", "/api/kernels") and time.monotonic() < deadline:
            time.sleep(0.2)


#: The GPU picker's sidebar tab, and one GPU type's card in it.
PICKER_TAB = '.jp-SideBar .lm-TabBar-tab[title="GPUs (jupyter-io)"]'
CARD = '.jio-GpuCard[data-gpu="{gpu}"]'


def open_picker(page: Any) -> Any:
    """Show the GPU picker; return it once it lists the RTX 4090."""
    page.locator(PICKER_TAB).click()
    picker = page.locator("#jupyter-io-picker")
    picker.locator(CARD.format(gpu="rtx4090")).wait_for()
    return picker


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``docs/screenshots`` when updating them (see the module doc)."""
    if os.environ.get("JUPYTER_IO_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")
