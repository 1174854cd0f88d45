"""``jupyter io demo`` (jupyter_io.demo): services up in order, down in reverse, nothing left.

Most tests run the demo with a stand-in provider: a real process that prints the provider
host's listening line and waits for SIGTERM, so the demo's own lifecycle is tested apart
from provider_host. The last tests run the real provider host.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from jupyter_io.demo import READY_LINE, ProviderService
from jupyter_io.errors import JupyterIOError
from jupyter_io.identity import load_keypair

JUPYTER = str(Path(sys.executable).with_name("jupyter"))
TIMEOUT = 60

FAKE_PROVIDER = textwrap.dedent(
    """
    import signal, sys, threading
    def bye(*_):
        print("fake provider: stopped cleanly", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if "--stubborn" in sys.argv else bye)
    print("args " + " ".join(sys.argv[1:]), flush=True)
    if "--exit-early" in sys.argv:
        sys.exit(3)
    if "--silent" not in sys.argv:
        print("jupyter-io provider inventory:", flush=True)
        print("  cpu: cpu (no GPU), 2 cores", flush=True)
        print("jupyter-io provider listening on ws://127.0.0.1:9/tunnel", flush=True)
    threading.Event().wait()
    """
)


@pytest.fixture
def fake_provider(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_provider.py"
    script.write_text(FAKE_PROVIDER)
    return [sys.executable, str(script)]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


async def wait_gone(pids: set[int], timeout: float = 15) -> set[int]:
    """Poll until none of ``pids`` is alive or ``timeout`` passes; return the survivors."""
    deadline = time.monotonic() + timeout
    # Not our children (a kernel is the provider's), so there is nothing to await but /proc.
    while (survivors := {p for p in pids if alive(p)}) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return survivors


async def read_until(stream: asyncio.StreamReader, marker: str, timeout: float = TIMEOUT) -> str:
    """Lines from ``stream`` up to and including the one containing ``marker``."""
    seen: list[str] = []

    async def read() -> str:
        while raw := await stream.readline():
            seen.append(raw.decode())
            if marker in seen[-1]:
                return "".join(seen)
        raise AssertionError(f"stream ended before {marker!r}:\n{''.join(seen)}")

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no {marker!r} within {timeout} s:\n{''.join(seen)}") from None


async def start_demo(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        JUPYTER, "io", "demo", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        out = await read_until(proc.stdout, READY_LINE)
    except BaseException:
        proc.kill()
        _, err = await proc.communicate()
        print(err.decode(), file=sys.stderr)
        raise
    out += (await read_until(proc.stdout, "Ctrl-C stops everything")).split(READY_LINE, 1)[-1]
    return proc, out


async def stop_demo(proc: asyncio.subprocess.Process, signum: int) -> tuple[str, str]:
    proc.send_signal(signum)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    return out.decode(), err.decode()


def demo_args(
    jupyter_env: Path, tmp_path: Path, provider: list[str] | None = None, stop_timeout: float = 10
) -> list[str]:
    args = [
        "--data-dir", str(tmp_path / "demo"),
        f"--Demo.kernelspec_prefix={jupyter_env}",
        f"--Demo.stop_timeout={stop_timeout}",
    ]  # fmt: skip
    if provider is not None:
        args.append(f"--Demo.provider_command={provider!r}")
    return args


# -- the provider service on its own -------------------------------------------------------


def provider_service(argv: list[str], start_timeout: float = TIMEOUT) -> ProviderService:
    return ProviderService(
        argv, start_timeout=start_timeout, stop_timeout=10, log=logging.getLogger(__name__)
    )


async def test_provider_service_reads_url_and_offer_and_stops_cleanly(
    fake_provider: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    service = provider_service(fake_provider)
    await service.start()
    assert service.url == "ws://127.0.0.1:9/tunnel"
    assert service.offer == "cpu (no GPU)"
    assert service.proc is not None
    await service.stop(asyncio.Event())
    assert service.proc.returncode == 0  # it got SIGTERM and exited by itself
    assert "fake provider: stopped cleanly" in capsys.readouterr().out
    await service.stop(asyncio.Event())  # idempotent


async def test_provider_exiting_before_it_listens_is_reported(fake_provider: list[str]) -> None:
    service = provider_service([*fake_provider, "--exit-early"])
    with pytest.raises(JupyterIOError, match="exited with code 3 before listening"):
        await service.start()


async def test_provider_that_never_listens_times_out_and_is_killed(
    fake_provider: list[str],
) -> None:
    service = provider_service([*fake_provider, "--silent"], start_timeout=0.5)
    with pytest.raises(JupyterIOError, match=r"did not report listening within 0.5 s"):
        await service.start()
    assert service.proc is not None
    await service.stop(asyncio.Event())
    assert not alive(service.proc.pid)


# -- the whole demo, with the stand-in provider --------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo_installs_the_kernelspec_and_stops_in_reverse_order(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str], signum: int
) -> None:
    proc, out = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path, fake_provider))
    kernel_dir = jupyter_env / "share" / "jupyter" / "kernels" / "jupyter-io-demo"
    children = descendants(proc.pid)
    try:
        # The provider got fresh demo keys, the user's public key on its allow-list.
        data = tmp_path / "demo"
        user = load_keypair(data / "user-keypair.json").pubkey()
        assert f"--allow {user} --keypair {data / 'provider-keypair.json'}" in out
        assert f"--workspace {data / 'workspace'}" in out
        assert "--listen 127.0.0.1:0" in out
        # The kernelspec points at it, under the name the provider's offer gave.
        spec = KernelSpecManager().get_kernel_spec("jupyter-io-demo")
        assert spec.display_name == "Python 3 · jupyter-io demo provider (cpu (no GPU))"
        assert spec.metadata["kernel_provisioner"]["config"] == {
            "provider_url": "ws://127.0.0.1:9/tunnel",
            "keypair_path": str(data / "user-keypair.json"),
            # pinned: only the demo's own provider can take the session
            "provider_pubkey": str(load_keypair(data / "provider-keypair.json").pubkey()),
        }
        assert Path(spec.resource_dir) == kernel_dir
        assert len(children) == 1
    finally:
        out, err = await stop_demo(proc, signum)
    assert proc.returncode == 0, err
    assert "fake provider: stopped cleanly" in out
    assert not kernel_dir.exists()
    assert not await wait_gone(children, timeout=0)
    # Reverse order: the kernelspec goes before its provider stops.
    assert err.index("kernelspec: removed") < err.index("provider: stopping")


async def test_a_provider_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    stubborn = [*fake_provider, "--stubborn"]
    proc, _ = await start_demo(
        "--no-lab", *demo_args(jupyter_env, tmp_path, stubborn, stop_timeout=0.5)
    )
    (provider,) = descendants(proc.pid)
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert "provider: did not stop in time, killing it" in err
    assert not alive(provider)


async def test_a_second_ctrl_c_kills_what_is_still_stopping(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    # The stop timeout outlasts stop_demo's own: only the second Ctrl-C can end this in time.
    stubborn = [*fake_provider, "--stubborn"]
    proc, _ = await start_demo(
        "--no-lab", *demo_args(jupyter_env, tmp_path, stubborn, stop_timeout=3 * TIMEOUT)
    )
    (provider,) = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    await read_until(proc.stderr, "provider: stopping")
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert "killing what is still running" in err
    assert not alive(provider)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
async def test_the_provider_does_not_outlive_a_killed_demo(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, _ = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path, fake_provider))
    (provider,) = descendants(proc.pid)
    proc.kill()  # no chance to stop anything itself
    # Not proc.wait(): on Python 3.11 it also waits for the pipes, which a survivor holds.
    survivors = await wait_gone({provider})
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    await proc.wait()
    assert not survivors, "the provider outlived the demo"


async def test_demo_stops_when_the_provider_dies(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, _ = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path, fake_provider))
    (provider,) = descendants(proc.pid)
    os.kill(provider, signal.SIGKILL)
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 1
    assert "provider exited unexpectedly" in err.decode()
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "jupyter-io-demo").exists()


async def test_demo_reports_a_provider_that_fails_to_start(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        JUPYTER, "io", "demo", "--no-lab",
        *demo_args(jupyter_env, tmp_path, [*fake_provider, "--exit-early"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 1
    assert "error: the provider host exited with code 3 before listening" in err.decode()
    assert "Traceback" not in err.decode()
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "jupyter-io-demo").exists()


def http_get(url: str | urllib.request.Request, timeout: float = TIMEOUT) -> bytes:
    """Fetch ``url``, retrying while the connection is refused: Jupyter Server prints its URL
    just before its event loop binds the port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read()  # type: ignore[no-any-return]
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


TOKEN = "demo-test-token"


def lab_args(tmp_path: Path) -> list[str]:
    """Options for JupyterLab (the demo passes them on): any free port, a known token."""
    return [
        "--port", "0", "--no-browser", f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={tmp_path}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
    ]  # fmt: skip


async def lab_url(proc: asyncio.subprocess.Process, path: str) -> str:
    """``path`` on the demo's JupyterLab, once Lab has said where it runs."""
    assert proc.stderr is not None
    log = await read_until(proc.stderr, "/lab?token=")
    port = re.findall(r"http://127\.0\.0\.1:(\d+)/lab\?token=", log)[-1]
    return f"http://127.0.0.1:{port}{path}?token={TOKEN}"


@contextlib.asynccontextmanager
async def shown_on_failure(proc: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """If the block fails, stop the demo and print its log before the failure propagates."""
    try:
        yield
    except BaseException:
        _, err = await stop_demo(proc, signal.SIGINT)
        print(err, file=sys.stderr)
        raise


@pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None, reason="needs JupyterLab")
async def test_demo_with_lab_serves_the_kernelspec_and_stops_lab_first(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, _ = await start_demo(
        *demo_args(jupyter_env, tmp_path, fake_provider), *lab_args(tmp_path)
    )
    children = descendants(proc.pid)
    async with shown_on_failure(proc):
        url = await lab_url(proc, "/api/kernelspecs")
        specs = json.loads(await asyncio.to_thread(http_get, url))["kernelspecs"]
        assert specs["jupyter-io-demo"]["spec"]["display_name"] == (
            "Python 3 · jupyter-io demo provider (cpu (no GPU))"
        )
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert not await wait_gone(children, timeout=0)
    assert err.index("jupyterlab: stopping") < err.index("provider: stopping")
    assert "did not stop in time" not in err


# -- the whole demo, with the real provider host -------------------------------------------

needs_real_stack = pytest.mark.skipif(
    importlib.util.find_spec("provider_host.app") is None
    or importlib.util.find_spec("kernel_provisioner.provisioner") is None,
    reason="needs provider_host and kernel_provisioner",
)

NOTEBOOK = Path(__file__).parents[2] / "examples" / "gpu_check.ipynb"


def notebook_code() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


@needs_real_stack
async def test_demo_kernel_runs_the_example_notebook_and_nothing_outlives_the_demo(
    jupyter_env: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch", reason="the example notebook needs torch on the provider")
    from jupyter_client.manager import AsyncKernelManager

    proc, out = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path))
    assert "jupyter-io provider listening on ws://127.0.0.1:" in out
    km = AsyncKernelManager(kernel_name="jupyter-io-demo")
    try:
        await asyncio.wait_for(km.start_kernel(), TIMEOUT)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=TIMEOUT)
        printed: list[str] = []

        def on_output(msg: dict[str, object]) -> None:
            content = msg["content"]
            assert isinstance(content, dict)
            if msg["msg_type"] == "stream":
                printed.append(content["text"])
            elif msg["msg_type"] == "error":
                printed.append("\n".join(content["traceback"]))

        for code in notebook_code():
            reply = await kc.execute_interactive(code, timeout=120, output_hook=on_output)
            assert reply["content"]["status"] == "ok", "".join(printed)
        output = "".join(printed)
        assert "device: " in output
        assert "ok: the model learned" in output
        assert "Failed to initialize NumPy" not in output  # the provider extra brings numpy
        kc.stop_channels()

        # The kernel runs under the provider, below the demo; Ctrl-C with it still running.
        running = descendants(proc.pid)
        assert len(running) >= 2  # the provider host and at least the kernel
        _, err = await stop_demo(proc, signal.SIGINT)
        assert proc.returncode == 0, err
        assert not await wait_gone(running), f"left running: {running}\n{err}"
        assert "did not stop in time" not in err
        kernels = jupyter_env / "share" / "jupyter" / "kernels"
        assert not (kernels / "jupyter-io-demo").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # Our end of the tunnel: its provider is gone, so this must give up, not hang.
        await asyncio.wait_for(km.shutdown_kernel(now=True), TIMEOUT)


@needs_real_stack
@pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None, reason="needs JupyterLab")
async def test_demo_lab_shuts_its_remote_kernel_down_before_the_provider_stops(
    jupyter_env: Path, tmp_path: Path
) -> None:
    proc, _ = await start_demo(*demo_args(jupyter_env, tmp_path), *lab_args(tmp_path))
    async with shown_on_failure(proc):
        request = urllib.request.Request(
            await lab_url(proc, "/api/kernels"),
            data=json.dumps({"name": "jupyter-io-demo"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        kernel = json.loads(await asyncio.to_thread(http_get, request))
        assert kernel["name"] == "jupyter-io-demo"
        running = descendants(proc.pid)
        assert len(running) >= 3  # JupyterLab, the provider host, the kernel below it
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert not await wait_gone(running), f"left running: {running}\n{err}"
    assert "did not stop in time" not in err
    # Lab ended the remote kernel itself, through the tunnel, while the provider still ran.
    assert f"Kernel shutdown: {kernel['id']}" in err
    assert err.index(f"Kernel shutdown: {kernel['id']}") < err.index("provider: stopping")
