"""Failover as a Lab user sees it: the provider host under a notebook's GPU kernel is
SIGKILLed, the kernel continues on a second provider, and Lab's notice names both providers,
the variable restored and the one missing with its cell; its "Re-run missing cells" button
runs the notebook's own cell of that count (not the source the lost provider's journal
recorded), whose output appears under it, and brings the variable back in the same kernel."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
from typing import Any

import pytest

from jupyter_io.identity import load_keypair

from .conftest import CARD, open_picker

pytest.importorskip("playwright.sync_api")

NOTICE = ".Toastify__toast"
OWN_CELL = "ran the notebook's own cell"


def _type_cell(page: Any, code: str) -> None:
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")


def _journal_names(stack: Any, kernel_id: str, timeout: float = 60) -> None:
    """Until the journal kept on Lab's side names ``x`` (kept) and ``g`` (missing)."""
    root = stack.backend.root / "lab" / "jupyter-data" / "jupyter-io" / "journal" / kernel_id
    deadline = time.monotonic() + timeout
    while True:
        for path in root.rglob("manifest.json"):
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if "x" in manifest.get("vars", {}) and "g" in manifest.get("missing", {}):
                return
        assert time.monotonic() < deadline, f"the journal did not come back to {root}"
        time.sleep(0.1)


def _ready_kernel(stack: Any, timeout: float = 90) -> str:
    """The id of the one kernel, once its start is ready."""
    deadline = time.monotonic() + timeout
    while True:
        kernels = stack.api("GET", "/api/kernels")
        if kernels:
            (kernel,) = kernels
            with contextlib.suppress(urllib.error.HTTPError):  # 404 until its first step
                if stack.api("GET", f"/jupyter-io/progress/{kernel['id']}")["state"] == "ready":
                    return str(kernel["id"])
        assert time.monotonic() < deadline, "no GPU kernel ready"
        time.sleep(0.2)


def test_a_killed_provider_moves_the_kernel_and_lab_offers_to_rerun_the_missing_cells(
    page: Any, stack: Any
) -> None:
    first_key = str(load_keypair(stack.backend.root / "provider.json").pubkey())
    first = next(p for p in stack.processes if p.name == "provider")
    second, second_key = stack.backend.start_provider(
        "provider-2", "workspace-2", gpus=("RTX 4090:24",), prices=("RTX 4090=0.12",)
    )
    hosts = {first_key: first, second_key: second}
    picker = open_picker(page)
    picker.locator(CARD.format(gpu="rtx4090")).locator(".jio-GpuCard-notebook").click()
    kernel_id = _ready_kernel(stack)
    page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").first.click()
    _type_cell(page, "x = 6 * 7")
    _type_cell(page, "g = (i * i for i in range(5))")
    prompt = page.locator(".jp-NotebookPanel:visible .jp-InputPrompt", has_text="[2]")
    prompt.first.wait_for(timeout=60_000)
    old_key = stack.api("GET", f"/jupyter-io/progress/{kernel_id}")["provider"]
    (new_key,) = set(hosts) - {old_key}
    _journal_names(stack, kernel_id)

    # The user edits cell [2] without running it: its count stays [2], its source is no longer
    # the one the journal recorded. The re-run must run this text, the notebook's own.
    cell = page.locator(".jp-NotebookPanel:visible .jp-CodeCell").nth(1)
    cell.locator(".cm-content").click()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.insert_text(f"g = (i * i for i in range(5)); print({OWN_CELL!r})")

    os.killpg(hosts[old_key].proc.pid, signal.SIGKILL)  # the host and its kernels, no word

    notice = page.locator(NOTICE, has_text="was lost; the kernel continues").first
    notice.wait_for(timeout=90_000)
    text = notice.inner_text()
    assert f"Provider {old_key[:4]}" in text and f"provider {new_key[:4]}" in text, text
    assert "Restored: x" in text and "Missing: g (cell [2])" in text, text
    launch = stack.api("GET", f"/jupyter-io/progress/{kernel_id}")
    assert launch["step"] == "failover" and launch["provider"] == new_key, launch
    assert [k["id"] for k in stack.api("GET", "/api/kernels")] == [kernel_id]

    notice.locator("button", has_text="Re-run missing cells").click()
    page.locator(NOTICE, has_text="Re-ran 1 cell(s) of the notebook: [2]").first.wait_for(
        timeout=60_000
    )
    # The notebook's cell ran (its output under it), not the journal's `g = ...` line.
    cell.locator(".jp-OutputArea-output", has_text=OWN_CELL).wait_for(timeout=30_000)
    # The re-run made g again in the same kernel, next to the restored x.
    page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").last.click()
    _type_cell(page, "print(x, sum(g))")
    output = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output", has_text="42 30")
    output.first.wait_for(timeout=60_000)
