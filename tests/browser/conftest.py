"""Fixtures for the browser tests: a whole jupyter-io setup as subprocesses, and Chromium.

``stack`` (one per module) runs, on loopback (through ``lab_stack.py``, which the browser
benchmark shares), what ``jupyter io demo`` runs: a coordinator
(SQLite) paid through escrows on its embedded ledger (``{coordinator}/solana``), a provider
host linked to it offering two simulated GPUs (RTX 4090 at 0.12 SOL/h, A100 at 0.9 SOL/h),
its key funded (it pays the settlements' fees), and JupyterLab with the jupyter_io extensions
pointed at the coordinator and the user's wallet. The wallet gets :data:`USER_FUNDS` by
airdrop, unless the test module says ``USER_FUNDS = 0`` (to see what an empty wallet does);
a module's ``LAB_OPTIONS`` are added to Lab's command line.
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

import os
import secrets
import shutil
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.payments.amounts import LAMPORTS_PER_SOL

from .lab_stack import CHROMIUM, CHROMIUM_ARGS, START_TIMEOUT, Lab, Process
from .lab_stack import Stack as Backend

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
#: What the user's wallet gets by airdrop (a module may set its own ``USER_FUNDS``).
USER_FUNDS = 5 * LAMPORTS_PER_SOL


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run the browser tests)")
    pytest.skip(message)


@dataclass
class Stack:
    """What the browser tests drive: the backend (:class:`lab_stack.Stack`) and its Lab."""

    backend: Backend
    lab: Lab

    @property
    def solana_url(self) -> str:
        """The coordinator's embedded ledger."""
        return self.backend.solana_url

    @property
    def user_keypair(self) -> Path:
        assert self.backend.user_keypair is not None
        return self.backend.user_keypair

    @property
    def processes(self) -> list[Process]:
        return self.backend.processes

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call Lab's server (``path`` below its base URL) with the token."""
        return self.lab.api(method, path, body)

    def logs(self) -> str:
        return self.backend.logs()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    backend = Backend(tmp_path_factory.mktemp("stack"))
    try:
        backend.start_backend(
            user_funds=getattr(request.module, "USER_FUNDS", USER_FUNDS), min_deposit_seconds=1
        )
        options = tuple(getattr(request.module, "LAB_OPTIONS", ()))
        yield Stack(backend, backend.start_lab("lab", options=options))
    finally:
        backend.close()


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
            f"{stack.lab.url}/lab/workspaces/{workspace}?reset&token={stack.lab.token}",
            timeout=START_TIMEOUT * 1000,
        )
        page.wait_for_selector("#jp-main-dock-panel", timeout=START_TIMEOUT * 1000)
        yield page
    finally:
        context.close()
        try:
            for kernel in stack.api("GET", "/api/kernels"):
                stack.api("DELETE", f"/api/kernels/{kernel['id']}")
            # Pending kernels shut down after the DELETE's answer: wait until they are gone
            # (and their leases ended), so the next test finds every GPU free.
            deadline = time.monotonic() + 60
            while stack.api("GET", "/api/kernels") and time.monotonic() < deadline:
                time.sleep(0.2)
        except urllib.error.HTTPError as error:
            # What the server answered and what its processes last logged: a failed shutdown
            # is otherwise a bare "500" in a CI log.
            body = error.read().decode(errors="replace")[:2000]
            raise AssertionError(f"{error}: {body}\n{stack.logs()}") from error


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
