"""Paying for GPU kernels in JupyterLab (Chromium), against an escrow coordinator and its
embedded ledger. The wallet starts empty here (``USER_FUNDS = 0``): a start then fails with
what the escrow needs, what the wallet holds and what to do; the wallet view's airdrop raises
the balance; a funded kernel's status bar shows the escrow left falling, and a click on it
tops the escrow up; a console on a GPU type runs code; a session whose small budget runs out
is warned about, then stopped by the coordinator, and Lab says so. Screenshots for the
README: see conftest.py."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.identity import load_keypair
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL

from .conftest import CARD, open_picker
from .lab_stack import airdrop

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import TimeoutError as PlaywrightTimeout

#: The wallet starts empty (see conftest.py).
USER_FUNDS = 0

TOAST = ".Toastify__toast"


def fund(stack: Any, sol: int = 2) -> None:
    airdrop(stack.solana_url, load_keypair(stack.user_keypair).pubkey(), sol * LAMPORTS_PER_SOL)


def close_lab_error_dialog(page: Any) -> None:
    """Lab's own "Error Starting Kernel" dialog may follow a failed start; close it."""
    dialog = page.locator(".jp-Dialog", has_text="Error Starting Kernel")
    try:
        dialog.wait_for(timeout=15_000)
    except PlaywrightTimeout:
        return
    dialog.locator("button", has_text="Ok").click()
    dialog.wait_for(state="detached")


def sol_in(text: str, after: str) -> float:
    match = re.search(re.escape(after) + r" (\d+\.\d+) SOL", text)
    assert match, text
    return float(match.group(1))


def test_an_empty_wallet_fails_plainly_with_what_is_needed_and_what_to_do(
    page: Any, stack: Any, screenshots: Path
) -> None:
    picker = open_picker(page)
    picker.locator(CARD.format(gpu="rtx4090")).locator(".jio-GpuCard-notebook").click()
    error = page.locator(TOAST, has_text="kernel failed")
    error.first.wait_for(timeout=90_000)
    text = error.first.inner_text()
    # What is needed (the deposit, 1 h at 0.12 SOL/h, plus rent and fee), what the wallet
    # holds, and what to do, with a button that does it on this local ledger.
    assert re.search(r"RTX 4090 kernel failed: the escrow needs 0\.12\d* SOL", text), text
    assert "the wallet holds 0 SOL" in text
    assert "Airdrop (local ledger) or fund the wallet, then retry." in text
    assert error.first.locator("button", has_text="Airdrop 1 SOL").is_visible()
    # The kernel never started: nothing leased stays behind, nothing was paid.
    assert stack.api("GET", "/jupyter-io/sessions")["sessions"] == []
    # Lab's own dialog shows the whole message, wrapped inside it, not cut at its edge.
    dialog = page.locator(".jp-Dialog", has_text="Error Starting Kernel")
    dialog.wait_for(timeout=30_000)
    message = dialog.locator(".jp-Dialog-body pre").first
    assert "holds 0 SOL" in message.inner_text()
    inside = message.evaluate(
        """el => {
            const box = el.closest('.jp-Dialog-content').getBoundingClientRect();
            const text = el.getBoundingClientRect();
            return el.scrollWidth <= el.clientWidth && text.right <= box.right;
        }"""
    )
    assert inside, message.evaluate("el => [el.scrollWidth, el.clientWidth]")
    page.wait_for_timeout(800)  # the toast slides in
    page.screenshot(path=str(screenshots / "launch-error-dialog.png"))
    close_lab_error_dialog(page)
    page.wait_for_timeout(800)  # the toast slides in
    page.screenshot(path=str(screenshots / "insufficient-funds.png"))


def test_the_wallet_views_airdrop_raises_the_balance(
    page: Any, stack: Any, screenshots: Path
) -> None:
    picker = open_picker(page)
    balance = picker.locator(".jio-Wallet-balance")
    balance.wait_for()
    page.wait_for_function(
        "el => /SOL/.test(el.textContent)", arg=balance.element_handle(), timeout=30_000
    )
    before = float(balance.inner_text().split()[0])
    picker.locator(".jio-Wallet-airdrop").click()
    page.locator(TOAST, has_text="Airdropped 1 SOL").first.wait_for(timeout=60_000)
    page.wait_for_function(
        f"el => parseFloat(el.textContent) >= {before + 1}",
        arg=balance.element_handle(),
        timeout=30_000,
    )
    assert float(balance.inner_text().split()[0]) == pytest.approx(before + 1)
    wallet = stack.api("GET", "/jupyter-io/wallet")
    assert wallet["rpc_url"] == stack.solana_url
    page.locator("#jupyter-io-picker .jio-Wallet").screenshot(path=str(screenshots / "wallet.png"))


def test_the_status_bar_shows_the_escrow_left_falling_and_tops_it_up(
    page: Any, stack: Any, screenshots: Path
) -> None:
    fund(stack)
    picker = open_picker(page)
    picker.locator(CARD.format(gpu="rtx4090")).locator(".jio-GpuCard-notebook").click()
    ready = page.locator(TOAST, has_text="is ready")
    ready.first.wait_for(timeout=90_000)
    assert "escrow ✓" in ready.first.inner_text()  # the escrow step was taken

    editor = page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").first
    editor.click()
    page.keyboard.insert_text("print(6 * 7)")
    page.keyboard.press("Shift+Enter")
    page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output").first.wait_for(timeout=60_000)

    status = page.locator(".jio-CostStatus:not(.jio-mod-hidden)")
    page.wait_for_function(
        "el => el.textContent.includes('escrow left')",
        arg=status.element_handle(),
        timeout=30_000,
    )
    first = status.inner_text()
    assert first.startswith("RTX 4090 · ")
    # The deposit: one hour at 0.12 SOL/h (the default budget).
    assert "Deposit: 0.12 SOL" in (status.get_attribute("title") or "")
    left = sol_in(first, "escrow left")
    assert 0 < left <= 0.12
    page.wait_for_function(
        f"el => parseFloat(el.textContent.split('escrow left ')[1]) < {left}",
        arg=status.element_handle(),
        timeout=30_000,
    )
    assert sol_in(status.inner_text(), "escrow left") < left
    page.locator("#jp-main-statusbar").screenshot(path=str(screenshots / "status-bar-escrow.png"))

    # A click on the item tops the escrow up from the wallet.
    status.click()
    dialog = page.locator(".jp-Dialog", has_text="Top up the escrow of the RTX 4090 kernel")
    dialog.locator("input").fill("0.05")
    dialog.locator("button", has_text="Top up").click()
    done = page.locator(TOAST, has_text="Escrow topped up by 0.05 SOL: it now holds 0.17 SOL")
    done.first.wait_for(timeout=60_000)
    page.wait_for_function(
        f"el => parseFloat(el.textContent.split('escrow left ')[1]) > {left}",
        arg=status.element_handle(),
        timeout=30_000,
    )


def test_a_console_on_a_gpu_type_runs_code(page: Any, stack: Any) -> None:
    fund(stack)
    picker = open_picker(page)
    picker.locator(CARD.format(gpu="a100")).locator(".jio-GpuCard-console").click()
    # A console drops input run before it has its kernel session; wait for the start.
    page.locator(TOAST, has_text=re.compile(r"A100 .*is ready")).first.wait_for(timeout=90_000)
    console = page.locator(".jp-CodeConsole:visible")
    prompt = console.locator(".jp-CodeConsole-promptCell .cm-content")
    prompt.click()
    page.keyboard.insert_text(
        "import os; print('console', 6 * 7, os.environ.get('JPY_SESSION_NAME'))"
    )
    page.keyboard.press("Shift+Enter")
    output = console.locator(".jp-OutputArea-output", has_text="console 42")
    output.wait_for(timeout=90_000)
    sessions = stack.api("GET", "/jupyter-io/sessions")["sessions"]
    (session,) = [s for s in sessions if s["kernel_name"] == "jupyter-io-a100"] or [sessions]
    assert session["gpu"] == "A100", sessions
    assert session["escrow_lamports"] == 900_000_000, sessions  # 1 h at 0.9 SOL/h


def test_a_spent_budget_is_warned_about_then_the_kernel_is_stopped_with_what_to_do(
    page: Any, stack: Any, screenshots: Path
) -> None:
    fund(stack)
    # A budget of 30 s: warned at 80 % (or 95 %) spent, stopped by the coordinator at 100 %.
    stack.api("PUT", "/jupyter-io/preferences", {"session_budget_hours": 30 / 3600})
    try:
        page.reload()
        page.wait_for_selector("#jp-main-dock-panel")
        picker = open_picker(page)
        picker.locator(CARD.format(gpu="rtx4090")).locator(".jio-GpuCard-notebook").click()
        page.locator(TOAST, has_text="is ready").first.wait_for(timeout=90_000)
        started = time.monotonic()
        warning = page.locator(TOAST, has_text=re.compile(r"has spent (80|95) % of its escrow"))
        warning.first.wait_for(timeout=60_000)
        text = warning.first.inner_text()
        assert text.startswith("RTX 4090 kernel has spent") and "Top up" in text
        page.locator(".jio-CostStatus.jio-mod-warning, .jio-CostStatus.jio-mod-danger").wait_for()
        stopped = page.locator(TOAST, has_text="The coordinator stopped the RTX 4090 kernel")
        stopped.first.wait_for(timeout=60_000)
        text = stopped.first.inner_text()
        assert "its escrow of 0.001 SOL is spent" in text
        assert "Raise the session budget" in text
        assert time.monotonic() - started >= 20  # not before the budget could be spent
        page.wait_for_timeout(800)  # the toast slides in
        page.screenshot(path=str(screenshots / "budget-exhausted.png"))
        # The kernel is not restarted on a new lease behind the user's back.
        refused = page.locator(TOAST, has_text="RTX 4090 kernel not restarted: its escrow is spent")
        refused.first.wait_for(timeout=60_000)
        assert "Raise the session budget in Settings" in refused.first.inner_text()
    finally:
        stack.api("PUT", "/jupyter-io/preferences", {"session_budget_hours": None})
