"""Lab shows one truth, live (issue 12, point 8), in Chromium against the real stack: a lease
and its end show in the picker within seconds of the coordinator recording them, and the
session's refund in the wallet once it lands; the status bar and the picker show the same
cost, and cost + escrow left is the deposit; cards are updated in place, not rebuilt; a GPU
kernel's name fits its launcher tile. Screenshots for the README: see conftest.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.coordinator_client import CoordinatorClient, LeaseInfo
from jupyter_io.identity import load_keypair
from jupyter_io.payments.amounts import format_sol

from .conftest import CARD, open_picker

pytest.importorskip("playwright.sync_api")

#: How soon after the event the page must show it (the issue asks for a second or two; the
#: model polls sessions each second, the offers fetch follows at once).
LIVE = 2.5
RTX = CARD.format(gpu="rtx4090")
TOAST = ".Toastify__toast"

#: Records, in the page, when the element at a selector first shows a text (Date.now(), ms),
#: so the time is the page's own, however late the test looks.
WATCH = """([key, selector, text]) => {
    window.__jioSeen = window.__jioSeen || {};
    const check = () => {
        const el = document.querySelector(selector);
        if (el && !el.closest('[hidden]') && el.textContent === text) {
            window.__jioSeen[key] = Date.now();
            return true;
        }
        return false;
    };
    if (!check()) {
        const observer = new MutationObserver(() => check() && observer.disconnect());
        observer.observe(document.body, {subtree: true, childList: true, characterData: true});
    }
}"""


def watch(page: Any, key: str, selector: str, text: str) -> None:
    page.evaluate(WATCH, [key, selector, text])


def seen(page: Any, key: str, timeout: float) -> float:
    """When (Unix seconds) the watch ``key`` saw its text; fails after ``timeout`` s."""
    handle = page.wait_for_function(
        "key => window.__jioSeen && window.__jioSeen[key]", arg=key, timeout=timeout * 1000
    )
    return float(handle.json_value()) / 1000


def user_leases(stack: Any) -> list[LeaseInfo]:
    """The user's leases as the coordinator bills them (signed by the user's key), asked in
    a thread of its own (Playwright's sync API runs an event loop in this one)."""

    async def ask() -> list[LeaseInfo]:
        client = CoordinatorClient(
            stack.backend.coordinator_url, load_keypair(stack.user_keypair), timeout=10
        )
        try:
            return await client.list_leases(limit=5)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, ask()).result(timeout=30)


def wait_lease(
    stack: Any, lease_id: str, done: Any, timeout: float = 60
) -> tuple[LeaseInfo, float]:
    """Poll the coordinator until lease ``lease_id`` satisfies ``done``; returns it and when
    this test first saw it so (at or after the fact)."""
    deadline = time.monotonic() + timeout
    while True:
        (info,) = [lease for lease in user_leases(stack) if lease.lease == lease_id]
        if done(info):
            return info, time.time()
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


def ledger_balance(stack: Any) -> int:
    pubkey = str(load_keypair(stack.user_keypair).pubkey())
    body = {"jsonrpc": "2.0", "id": 1, "method": "getBalance",
            "params": [pubkey, {"commitment": "confirmed"}]}  # fmt: skip
    request = urllib.request.Request(
        stack.solana_url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result = json.loads(response.read())["result"]
    return int(result["value"] if isinstance(result, dict) else result)


def progress_at(stack: Any, kernel_id: str, step: str, timeout: float = 90) -> float:
    """When (Unix seconds) kernel ``kernel_id``'s start took ``step``."""
    deadline = time.monotonic() + timeout
    while True:
        launch = stack.api("GET", f"/jupyter-io/progress/{kernel_id}")
        found = [e["at"] for e in launch["history"] if e["step"] == step]
        if found:
            return float(found[-1])
        assert launch["state"] != "failed", launch
        assert time.monotonic() < deadline, launch
        time.sleep(0.1)


def test_a_lease_its_end_and_its_refund_show_within_seconds(page: Any, stack: Any) -> None:
    picker = open_picker(page)
    availability = f"#jupyter-io-picker {RTX} .jio-GpuCard-availability"
    balance = "#jupyter-io-picker .jio-Wallet-balance"
    picker.locator(RTX, has_text="1/1 free").wait_for()
    page.locator(balance, has_text="SOL").wait_for()
    before = page.locator(balance).inner_text()
    assert before == format_sol(ledger_balance(stack))
    button = picker.locator(RTX).locator(".jio-GpuCard-notebook")
    assert button.is_enabled()
    watch(page, "taken", availability, "0/1 free")

    # A kernel started elsewhere (here: the REST API, as another tab or client would).
    kernel = stack.api("POST", "/api/kernels", {"name": "jupyter-io-rtx-4090"})
    leased = progress_at(stack, kernel["id"], "leased")
    taken = seen(page, "taken", timeout=90) - leased
    print(f"lease → picker shows it taken: {taken:.2f} s")
    assert taken <= LIVE
    assert button.is_disabled()  # the same button: no click lands on a free-looking card
    escrowed = progress_at(stack, kernel["id"], "escrowed")
    paid = format_sol(ledger_balance(stack))
    assert paid != before
    page.wait_for_function(
        "([sel, text]) => document.querySelector(sel).textContent === text",
        arg=[balance, paid],
        timeout=max(0.5, escrowed + LIVE - time.time()) * 1000 + 1000,
    )
    progress_at(stack, kernel["id"], "ready")
    (row,) = stack.api("GET", "/jupyter-io/sessions")["sessions"]

    watch(page, "free", availability, "1/1 free")
    stack.api("DELETE", f"/api/kernels/{kernel['id']}")
    ended, _ = wait_lease(stack, row["lease"], lambda info: info.ended_at is not None)
    assert ended.ended_at is not None
    free = seen(page, "free", timeout=30) - ended.ended_at
    print(f"lease end → picker shows it free: {free:.2f} s")
    assert free <= LIVE
    assert button.is_enabled()

    # The unused deposit comes back to the wallet when the escrow is settled; the wallet
    # shows it without a Refresh.
    _, settled = wait_lease(
        stack,
        row["lease"],
        lambda info: (
            bool(info.billing and info.billing.settlement)
            and info.billing.settlement.state == "done"
        ),
    )
    refunded = format_sol(ledger_balance(stack))
    assert refunded != paid
    page.wait_for_function(
        "([sel, text]) => document.querySelector(sel).textContent === text",
        arg=[balance, refunded],
        timeout=max(0.5, settled + LIVE - time.time()) * 1000,
    )
    print(f"settlement seen → wallet shows the refund: {time.time() - settled:.2f} s (at most)")


def _figures(text: str) -> tuple[str, Decimal, Decimal]:
    """``RTX 4090 · 0:05 · 0.000192 SOL · escrow left 0.119808 SOL`` → elapsed, cost, left."""
    match = re.search(
        r"(\d+:\d\d) · (\d+\.\d+) SOL(?: at [\d.]+ SOL/h)? · escrow left (\d+\.\d+) SOL", text
    )
    assert match, text
    return match.group(1), Decimal(match.group(2)), Decimal(match.group(3))


def test_the_status_bar_and_the_picker_show_one_cost_that_adds_up_to_the_deposit(
    page: Any, stack: Any, screenshots: Path
) -> None:
    picker = open_picker(page)
    picker.locator(RTX).locator(".jio-GpuCard-notebook").click()
    page.locator(TOAST, has_text="is ready").first.wait_for(timeout=90_000)
    status = page.locator(".jio-CostStatus:not(.jio-mod-hidden)")
    page.wait_for_function(
        "el => el.textContent.includes('escrow left')", arg=status.element_handle(), timeout=30_000
    )
    picker.locator(".jio-Session .jio-Session-escrow:not([hidden])").wait_for(timeout=30_000)
    shown: set[str] = set()
    while len(shown) < 3:  # three different seconds
        # Both read in one task of the page: the same moment.
        bar, row, title = page.evaluate(
            """() => [
                document.querySelector('.jio-CostStatus').textContent,
                document.querySelector('#jupyter-io-picker .jio-Session').textContent,
                document.querySelector('.jio-CostStatus').title,
            ]"""
        )
        elapsed, cost, left = _figures(bar)
        assert _figures(row) == (elapsed, cost, left), (bar, row)
        deposit = re.search(r"Deposit: (\d+(?:\.\d+)?) SOL = cost", title)
        assert deposit, title
        assert cost + left == Decimal(deposit.group(1)), title
        shown.add(elapsed)
        page.wait_for_function(
            "before => document.querySelector('.jio-CostStatus').textContent !== before",
            arg=bar,
            timeout=5_000,
        )
    picker.screenshot(path=str(screenshots / "gpu-picker-running.png"))


def test_cards_are_updated_in_place_when_nothing_changed(page: Any, stack: Any) -> None:
    picker = open_picker(page)
    picker.locator(RTX, has_text="1/1 free").wait_for()
    # Mark the card's button, and count every change to the card list from now on.
    page.evaluate(
        """sel => {
            document.querySelector(sel).__jioMark = 'kept';
            window.__jioMutations = 0;
            new MutationObserver(records => { window.__jioMutations += records.length; })
                .observe(document.querySelector('#jupyter-io-picker .jio-GpuList'),
                         {subtree: true, childList: true, characterData: true, attributes: true});
        }""",
        f"#jupyter-io-picker {RTX} .jio-GpuCard-notebook",
    )
    for _ in range(2):  # two fetches of the same offers
        with page.expect_response(lambda r: r.url.split("?")[0].endswith("/jupyter-io/offers")):
            picker.locator(".jio-Picker-refresh").click()
        page.evaluate("() => new Promise(requestAnimationFrame)")  # the model's update ran
    mark, mutations = page.evaluate(
        """sel => [document.querySelector(sel).__jioMark, window.__jioMutations]""",
        f"#jupyter-io-picker {RTX} .jio-GpuCard-notebook",
    )
    assert mark == "kept"  # the very button a user may be clicking
    assert mutations == 0


def test_a_gpu_kernels_name_fits_its_launcher_tile(
    page: Any, stack: Any, screenshots: Path
) -> None:
    page.locator(".jp-Launcher:visible").wait_for(timeout=30_000)
    # The launcher lists what the kernelspecs are when Lab loads; the GPU ones come with the
    # server extension's first offers fetch, so refresh them until they are there.
    name = "RTX 4090 (simulated) · 0.12 SOL/h"
    card = page.locator(f'.jp-LauncherCard[title="{name}"]').first
    card.wait_for(timeout=30_000)
    label = card.locator(".jp-LauncherCard-label")
    assert label.inner_text() == name
    fits = label.evaluate(
        "el => el.scrollHeight <= el.clientHeight + 1 && el.scrollWidth <= el.clientWidth + 1"
    )
    assert fits, label.evaluate("el => [el.scrollHeight, el.clientHeight, el.scrollWidth]")
    page.locator(".jp-Launcher:visible").screenshot(path=str(screenshots / "launcher.png"))
