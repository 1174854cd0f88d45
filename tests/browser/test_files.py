"""Files that follow the kernel (issue 15), in JupyterLab in Chromium against the real stack:
a notebook that reads ``data.csv`` beside it and writes ``model.pt`` works unchanged on a
remote kernel; the file browser shows what the kernel wrote, marks what it holds back (too
large to come back on its own) and the conflict copies, and the "Pull from the remote
kernel" command brings a held-back file with a progress notification. Screenshot for the
README: see conftest.py."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from .conftest import CARD, open_picker

pytest.importorskip("playwright.sync_api")

#: Files over 1 MB stay on the provider until pulled (16 MB by default: smaller files here).
LAB_OPTIONS = ("--RemoteKernelProvisioner.files_pull_max_size=1000000",)
TOAST = ".Toastify__toast"
DATA = "sample,value\na,1\nb,2\n"
BIG = 6_000_000  # over the labextension's progress threshold (4 MiB)

#: Records in the page every toast text and every file mark (`path=state`) shown, so one
#: that lasts a moment (a 6 MB pull on loopback) is not missed.
SEEN = """() => {
    window.__jioToasts = [];
    window.__jioMarks = [];
    const note = (list, text) => list.includes(text) || list.push(text);
    const seen = () => {
        document.querySelectorAll('.Toastify__toast').forEach(
            el => note(window.__jioToasts, el.textContent));
        document.querySelectorAll('[data-jio-file]').forEach(
            el => note(window.__jioMarks, `${el.dataset.jioPath}=${el.dataset.jioFile}`));
    };
    new MutationObserver(seen).observe(document.body,
        {subtree: true, childList: true, characterData: true, attributes: true,
         attributeFilter: ['data-jio-file']});
}"""

#: Writes the model (torch.save when torch is there), a large file and a 2 MB notes.txt.
WRITE = f"""import hashlib, importlib, importlib.util, os
torch = importlib.import_module('torch') if importlib.util.find_spec('torch') else None
torch.save({{'w': torch.arange(6.0)}}, 'model.pt') if torch else open('model.pt', 'wb').write(b'w')
big = os.urandom({BIG}); open('big.bin', 'wb').write(big)
open('notes.txt', 'w').write('remote\\n' * 300_000)
print('sha', hashlib.sha256(big).hexdigest())"""


def run_cell(page: Any, index: int, code: str) -> str:
    """Type ``code`` into the visible notebook's cell ``index``, run it, return its output."""
    cell = page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=90_000)
    return str(output.inner_text())


def item(page: Any, name: str) -> Any:
    """The file browser's item named ``name``."""
    return page.locator(".jp-DirListing-item").filter(
        has=page.locator(".jp-DirListing-itemText", has_text=re.compile(f"^{re.escape(name)}$"))
    )


def show_files(page: Any, refresh: bool = False) -> None:
    """Show the file browser; ``refresh``: have it list the folder again now."""
    tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="filebrowser"]')
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()  # (a click on the current tab would fold the sidebar)
    if refresh:
        page.locator('#filebrowser [data-command="filebrowser:refresh"]').first.click()


def pull_from_context_menu(page: Any, target: Any) -> None:
    target.click(button="right")
    page.locator(".lm-Menu-item", has_text="Pull from the remote kernel").click()


def test_a_notebook_reads_data_beside_it_and_its_model_comes_back(
    page: Any, stack: Any, screenshots: Path
) -> None:
    project = stack.lab.notebooks / "project"
    project.mkdir()
    (project / "data.csv").write_text(DATA)

    # In the file browser, go into project/; a GPU notebook started now is created there.
    show_files(page, refresh=True)
    item(page, "project").dblclick()
    item(page, "data.csv").wait_for()
    picker = open_picker(page)
    picker.locator(CARD.format(gpu="rtx4090")).locator(".jio-GpuCard-notebook").click()
    page.locator(TOAST, has_text="is ready").first.wait_for(timeout=90_000)
    (session,) = stack.api("GET", "/api/sessions")
    assert session["path"].startswith("project/"), session
    kernel_id = session["kernel"]["id"]

    # The notebook reads data.csv by its relative path, unchanged.
    shown = run_cell(page, 0, "print(open('data.csv').read(), end='')")
    assert shown.rstrip("\n") == DATA.rstrip("\n")
    page.evaluate(SEEN)
    output = run_cell(page, 1, WRITE)
    sha = re.search(r"sha ([0-9a-f]{64})", output)
    assert sha, output

    # What the kernel wrote under 1 MB came back after the cell: in the file browser (the
    # extension refreshes it when files arrive) and on disk.
    show_files(page)
    item(page, "model.pt").wait_for(timeout=30_000)
    model = (project / "model.pt").read_bytes()
    if importlib.util.find_spec("torch"):
        import io

        import torch

        assert torch.load(io.BytesIO(model))["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    else:
        assert model == b"w"

    # The larger ones are held back on the provider, listed as remote below the listing.
    remote = page.locator(".jio-RemoteFile[data-jio-file='remote']")
    remote.filter(has_text="big.bin").wait_for(timeout=30_000)
    remote.filter(has_text="notes.txt").wait_for()
    assert not (project / "big.bin").exists()
    state = stack.api("GET", f"/jupyter-io/files/{kernel_id}")
    assert dict(state["held_back"]) == {"big.bin": BIG, "notes.txt": 2_100_000}

    # The user makes a notes.txt here too: once listed, its item is marked remote (the
    # kernel's newer copy is held back), and pulling it keeps both.
    (project / "notes.txt").write_text("local\n")
    show_files(page, refresh=True)
    notes = item(page, "notes.txt")
    page.wait_for_function(
        "el => el.dataset.jioFile === 'remote' && el.title.startsWith('jupyter-io: a newer copy')",
        arg=notes.element_handle(timeout=30_000),
        timeout=30_000,
    )
    pull_from_context_menu(page, notes)
    conflict = item(page, "notes.remote-conflict.txt")
    conflict.wait_for(timeout=60_000)
    page.wait_for_function(
        "el => el.dataset.jioFile === 'conflict' && el.title.includes('copy of notes.txt')",
        arg=conflict.element_handle(),
        timeout=30_000,
    )
    assert (project / "notes.txt").read_text() == "local\n"
    assert (project / "notes.remote-conflict.txt").read_text() == "remote\n" * 300_000
    page.locator(TOAST, has_text="the kernel's copy is notes.remote-conflict.txt").first.wait_for()
    page.wait_for_timeout(400)  # the toast slides in
    page.screenshot(path=str(screenshots / "files-remote.png"))

    # The palette's command pulls what is still held back (big.bin), with a progress
    # notification that ends saying what came.
    page.keyboard.press("Control+Shift+C")
    page.keyboard.insert_text("Pull from the remote kernel")
    page.locator(".lm-CommandPalette-item", has_text="Pull from the remote kernel").first.click()
    page.locator(TOAST, has_text="Pulled big.bin (6.0 MB)").first.wait_for(timeout=60_000)
    assert hashlib.sha256((project / "big.bin").read_bytes()).hexdigest() == sha.group(1)
    toasts = page.evaluate("() => window.__jioToasts")
    progress = re.compile(r"Pulling big\.bin: [\d.]+ MB of 6\.0 MB \(\d+%\)")
    assert any(progress.search(t) for t in toasts), toasts
    marks = page.evaluate("() => window.__jioMarks")
    assert {"project/big.bin=remote", "project/big.bin=syncing"} <= set(marks), marks
    item(page, "big.bin").wait_for(timeout=30_000)
    page.wait_for_function(
        "() => !document.querySelector('.jio-RemoteFile')"
        " && !document.querySelector('.jp-DirListing-item[data-jio-file=\"remote\"]')",
        timeout=30_000,
    )
