"""JupyterLab in Chromium: GPU notebook start to first output, and Lab load time with and
without the jupyter_io extension (issue 5).

Starts, on loopback, a coordinator paid through escrows on its embedded ledger (each start
escrows its session from a funded wallet, as in ``jupyter io demo``), a provider host with
two simulated GPUs (RTX 4090, A100) and two JupyterLab servers
(``tests/browser/lab_stack.py``, which the browser tests start the same way): one with
jupyter_io pointed at the coordinator, one with jupyter_io off (server extension disabled
through ``jpserver_extensions``, labextension through ``page_config.json``). Chromium
(Debian's ``/usr/bin/chromium``, Playwright) then, in one interleaved loop:

1. load time: ``page.goto`` of a fresh workspace (``?reset``) in a fresh browser context
   (empty HTTP cache) → the launcher visible, with / without alternating (W O, O W, ...),
   after one discarded warm-up load of each; the "with" page is checked to show the GPU
   picker's tab and the "without" page not to.
2. on the first N "with" pages, after the load is timed: open the GPU picker, click the
   RTX 4090 card's "Notebook" button, type ``print(1+1)`` into the new notebook's first cell
   and Shift+Enter as soon as Lab has the notebook's kernel connection (the kernel still
   starting: Lab queues the run, as for a local kernel; a run before Lab has the session is
   dropped by Lab for every kind of kernel), and time click → the output ``2`` visible (and
   click → the "is ready" toast), both clocked in the page (``performance.now()``, a
   MutationObserver).
   The kernel is then shut down through Lab's API and the GPU waited for to be free again;
   starts are kept 6 s apart so that a page never shows the previous start's "is ready"
   toast (a launch begun up to 5 s before a page loads is still news to it).

Prints median and max (p99 of so few samples is the max) and the with/without ratio. Bounded
(~1-2 min), loopback only; every process started is stopped. Not a pass/fail test.

    python benchmarks/bench_lab.py              # 6 loads each, 5 notebook starts
    python benchmarks/bench_lab.py --loads 4 --starts 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The whole setup on loopback, as the browser tests start it (no pytest in that module).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))

from lab_stack import CHROMIUM, CHROMIUM_ARGS, Lab, Stack

PICKER_TAB = '.jp-SideBar .lm-TabBar-tab[title="GPUs (jupyter-io)"]'
CARD = '.jio-GpuCard[data-gpu="{gpu}"]'
LAUNCHER = ".jp-Launcher"

OBSERVE = """() => {
  const t = {ready: null, output: null};
  window.__jioBench = t;
  const obs = new MutationObserver(() => {
    const now = performance.now();
    if (t.ready === null) {
      for (const el of document.querySelectorAll('.Toastify__toast')) {
        if (el.textContent.includes('is ready')) { t.ready = now; break; }
      }
    }
    if (t.output === null) {
      for (const el of document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output')) {
        if (el.textContent.trim() === '2' && el.offsetParent !== null) { t.output = now; break; }
      }
    }
    if (t.ready !== null && t.output !== null) obs.disconnect();
  });
  obs.observe(document.body, {childList: true, subtree: true, characterData: true});
  return performance.now();
}"""


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def load(browser: Any, lab: Lab, with_extension: bool) -> tuple[float, Any]:
    """Seconds from goto to the launcher visible, and the (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    page = context.new_page()
    page.set_default_timeout(90_000)
    url = f"{lab.url}/lab/workspaces/bench-{secrets.token_hex(4)}?reset&token={lab.token}"
    start = time.monotonic()
    page.goto(url)
    page.locator(LAUNCHER).first.wait_for(state="visible")
    elapsed = time.monotonic() - start
    if with_extension:
        page.locator(PICKER_TAB).wait_for(state="visible")
    else:
        page.wait_for_timeout(200)
        if page.locator(PICKER_TAB).count():
            raise RuntimeError("the 'without' Lab shows the GPU picker: extension not disabled")
    return elapsed, (context, page)


#: True once the notebook has its kernel connection (the kernel may still be starting), as
#: its toolbar's execution indicator shows, or once the kernel is ready.
HAS_KERNEL = """() => {
  const el = document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator');
  const status = el ? el.dataset.status : null;
  return ['connecting', 'unknown', 'starting', 'busy'].includes(status)
    || window.__jioBench.ready !== null;
}"""


def notebook_start(page: Any) -> tuple[float, float]:
    """Seconds click → "is ready" toast, click → first output, in the page's clock."""
    page.locator(PICKER_TAB).click()
    picker = page.locator("#jupyter-io-picker")
    button = picker.locator(CARD.format(gpu="rtx4090")).locator(".jio-GpuCard-notebook")
    button.wait_for()
    clicked = page.evaluate(OBSERVE)
    button.click()
    editor = page.locator(".jp-NotebookPanel:visible .jp-Cell .cm-content").first
    # Keys typed while the new notebook is still being set up can be lost: type until the
    # cell holds the code (as a user would), then run it.
    for _ in range(50):
        editor.click()
        page.keyboard.type("print(1+1)")
        if "print(1+1)" in editor.inner_text():
            break
        page.wait_for_timeout(50)
    else:
        raise RuntimeError(f"typing into the cell failed: {editor.inner_text()!r}")
    # Run it once Lab has the kernel connection: it queues the run until the kernel is ready.
    page.wait_for_function(HAS_KERNEL, timeout=90_000, polling=20)
    editor.click()
    page.keyboard.press("Shift+Enter")
    try:
        page.wait_for_function(
            "() => window.__jioBench.output !== null && window.__jioBench.ready !== null",
            timeout=90_000,
        )
    except Exception:
        state = page.evaluate(
            "() => [window.__jioBench,"
            " [...document.querySelectorAll('.Toastify__toast')].map(e => e.textContent),"
            " [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent),"
            " [...document.querySelectorAll('.jp-Cell .cm-content')].map(e => e.textContent)]"
        )
        raise RuntimeError(f"no output/ready toast: {state}") from None
    t = page.evaluate("() => window.__jioBench")
    return (t["ready"] - clicked) / 1000, (t["output"] - clicked) / 1000


def shutdown_kernels(stack: Stack, lab: Lab) -> None:
    for kernel in lab.api("GET", "/api/kernels"):
        lab.api("DELETE", f"/api/kernels/{kernel['id']}")
    stack.wait_for_free_gpus()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, default=6, help="loads of each Lab (default 6)")
    parser.add_argument("--starts", type=int, default=5, help="notebook starts (default 5)")
    parser.add_argument("--json", help="write the raw samples here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    began = time.monotonic()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-lab-")
    stack = Stack(Path(tmp.name))
    loads: dict[str, list[float]] = {"with": [], "without": []}
    ready: list[float] = []
    output: list[float] = []
    last_click = -1e9
    try:
        stack.start_backend()
        labs = {"with": stack.start_lab("with", True), "without": stack.start_lab("without", False)}
        for name, expected in (("with", True), ("without", False)):
            loaded = any(
                "jupyter_io" in line and "successfully loaded" in line
                for line in labs[name].process.lines
            )
            if loaded != expected:
                raise RuntimeError(f"Lab {name!r}: jupyter_io server extension loaded={loaded}")
        print(f"stack up in {time.monotonic() - began:.1f} s", flush=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for name in ("with", "without"):  # warm-up, discarded
                    _, (context, _page) = load(browser, labs[name], name == "with")
                    context.close()
                for i in range(max(args.loads, args.starts)):
                    order = ("with", "without") if i % 2 == 0 else ("without", "with")
                    for name in order:
                        if i >= args.loads and not (name == "with" and i < args.starts):
                            continue
                        if name == "with" and i < args.starts:
                            # A launch begun up to 5 s before a page loads is still news to
                            # it (progress.ts): the previous start's "is ready" toast would
                            # show on this page. Keep 6 s between starts.
                            time.sleep(max(0.0, last_click + 6.0 - time.monotonic()))
                        elapsed, (context, page) = load(browser, labs[name], name == "with")
                        try:
                            if i < args.loads:
                                loads[name].append(elapsed)
                            line = f"{i}: {name:7s} load {elapsed * 1000:6.0f} ms"
                            if name == "with" and i < args.starts:
                                last_click = time.monotonic()
                                r, o = notebook_start(page)
                                ready.append(r)
                                output.append(o)
                                line += f"   click→ready {r:5.2f} s  click→output {o:5.2f} s"
                            print(line, flush=True)
                        finally:
                            context.close()
                            if name == "with":
                                shutdown_kernels(stack, labs["with"])
            finally:
                browser.close()
    except Exception:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.close()
        tmp.cleanup()

    def row(label: str, xs: list[float], unit: float, fmt: str) -> str:
        return (
            f"| {label} | {len(xs)} | {format(statistics.median(xs) * unit, fmt)} "
            f"| {format(p99(xs) * unit, fmt)} |"
        )

    print()
    print(f"load average: {os.getloadavg()}; total {time.monotonic() - began:.1f} s")
    print("| what | n | median | p99 (= max) |")
    print("| --- | --- | --- | --- |")
    print(row('click Notebook → "is ready" toast (s)', ready, 1, ".2f"))
    print(row("click Notebook → `print(1+1)` output (s)", output, 1, ".2f"))
    print(row("Lab load → launcher, with jupyter_io (ms)", loads["with"], 1000, ".0f"))
    print(row("Lab load → launcher, without jupyter_io (ms)", loads["without"], 1000, ".0f"))
    w, wo = loads["with"], loads["without"]
    print(
        f"| ratio with / without | | {statistics.median(w) / statistics.median(wo):.2f} "
        f"| {p99(w) / p99(wo):.2f} |"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"loads": loads, "ready": ready, "output": output}, indent=1)
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
