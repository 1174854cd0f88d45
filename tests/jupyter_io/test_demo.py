"""``jupyter io demo`` (jupyter_io.demo): services up in order, down in reverse, nothing left.

The demo runs a real coordinator. Most tests give it a stand-in provider: a real process that
joins the coordinator over the real provider link (challenge, signed hello, heartbeats) and
prints the provider host's lines, but starts no kernels, so the demo's own lifecycle is tested
apart from provider_host. The last tests run the real provider host and lease real kernels
through the demo's kernelspecs.
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

from jupyter_io.data_lock import DataDirLock
from jupyter_io.demo import READY_LINE, ProviderService, demo_display_name
from jupyter_io.errors import JupyterIOError
from jupyter_io.identity import load_keypair

JUPYTER = str(Path(sys.executable).with_name("jupyter"))
TIMEOUT = 60
KERNEL = "jupyter-io-rtx-4090"  # the server extension's name for the type too
DISPLAY = "RTX 4090 (simulated) · 0.12 SOL/h"

FAKE_PROVIDER = textwrap.dedent(
    """
    import json, signal, sys, threading
    def bye(*_):
        print("fake provider: stopped cleanly", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if "--stubborn" in sys.argv else bye)
    print("args " + " ".join(sys.argv[1:]), flush=True)
    if "--exit-early" in sys.argv:
        sys.exit(3)
    if "--silent" in sys.argv:
        threading.Event().wait()
    print("jupyter-io provider inventory:", flush=True)
    print("  gpu 0: RTX 4090 (simulated), 24.0 GiB VRAM", flush=True)
    print("  cpu: cpu (no GPU), 2 cores", flush=True)
    print("jupyter-io provider listening on ws://127.0.0.1:9/tunnel", flush=True)
    if "--coordinator" not in sys.argv:
        threading.Event().wait()
    coordinator = sys.argv[sys.argv.index("--coordinator") + 1]
    from solders.pubkey import Pubkey
    from websockets.sync.client import connect
    from jupyter_io.signing import sign_provider_hello
    from jupyter_io.identity import load_keypair
    keypair = load_keypair(sys.argv[sys.argv.index("--keypair") + 1])
    ws = connect(coordinator.replace("http", "ws", 1) + "/api/v1/providers/connect")
    challenge = json.loads(ws.recv())
    offer = {"gpu": "RTX 4090", "vram_bytes": 24 << 30, "count": 1, "gpu_indices": [1],
             "price_lamports_per_hour": 120_000_000, "simulated": True, "driver": None,
             "cuda": None, "benchmark_tflops": None}
    ws.send(json.dumps({
        "type": "hello", "version": 1, "pubkey": str(keypair.pubkey()),
        "signature": sign_provider_hello(
            keypair, Pubkey.from_string(challenge["coordinator"]),
            bytes.fromhex(challenge["nonce"])),
        "inventory": {"name": "fake", "region": "local", "reachable_url": None,
                      "max_kernels": 4, "offers": [offer]},
        "sessions": [],
    }))
    welcome = json.loads(ws.recv())
    assert welcome["type"] == "welcome", welcome
    while True:
        ws.send(json.dumps({"type": "heartbeat", "load": 0.0, "sessions": []}))
        threading.Event().wait(welcome["heartbeat_interval"] / 2)
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


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


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
        # The real provider would measure a CPU benchmark first (it imports torch): seconds
        # these tests need not spend.
        "--Demo.provider_args=['--no-benchmark']",
    ]  # fmt: skip
    if provider is not None:
        args.append(f"--Demo.provider_command={provider!r}")
    return args


async def second_demo(jupyter_env: Path, tmp_path: Path) -> str:
    """Run a second demo on the first one's data dir; it must fail at once: its stderr."""
    proc = await asyncio.create_subprocess_exec(
        JUPYTER, "io", "demo", "--no-lab", *demo_args(jupyter_env, tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and READY_LINE not in out.decode(), err.decode()
    assert "coordinator: stopping" not in err.decode()  # it started nothing
    return err.decode()


def kernelspec_dir(jupyter_env: Path, name: str = KERNEL) -> Path:
    return jupyter_env / "share" / "jupyter" / "kernels" / name


def coordinator_url(out: str) -> str:
    return re.findall(r"jupyter-io coordinator listening on (http://\S+)", out)[-1]


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
    assert service.offer == "RTX 4090 (simulated)"  # a GPU, so not the CPU
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
async def test_demo_starts_coordinator_provider_and_kernelspecs_and_stops_in_reverse_order(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str], signum: int
) -> None:
    proc, out = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path, fake_provider))
    children = descendants(proc.pid)
    try:
        data = tmp_path / "demo"
        # The coordinator keeps its database and keypair in the demo's data dir.
        url = coordinator_url(out)
        assert url.startswith("http://127.0.0.1:")
        assert (data / "coordinator" / "coordinator.db").is_file()
        assert (data / "coordinator" / "coordinator-keypair.json").is_file()
        # Paid through escrows on its embedded ledger, where the demo wallet was funded.
        user = load_keypair(data / "user-keypair.json").pubkey()
        assert (
            f"wallet:      {user} holds 10 SOL on the coordinator's ledger {url}/solana" in out
        ), out
        # The provider got fresh demo keys and joins that coordinator, with no public URL
        # (so the relay is used), a simulated GPU and the demo's price.
        assert f"--keypair {data / 'provider-keypair.json'}" in out
        assert f"--workspace {data / 'workspace'}" in out
        assert "--listen 127.0.0.1:0" in out and "--public-url" not in out
        provider_args = "--simulate-gpu RTX 4090:24 --price 0.12 --no-benchmark"
        assert f"{provider_args} --coordinator {url}\n" in out
        # One lease-mode kernelspec per GPU type on offer, named after it.
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        assert spec.display_name == DISPLAY
        assert spec.metadata["kernel_provisioner"]["config"] == {
            "coordinator_url": url,
            "keypair_path": str(data / "user-keypair.json"),
            "gpu": "RTX 4090",
        }
        assert Path(spec.resource_dir) == kernelspec_dir(jupyter_env)
        assert f"kernelspec:  {KERNEL} ({DISPLAY!r})" in out
        assert len(children) == 2  # the coordinator and the provider
    finally:
        out, err = await stop_demo(proc, signum)
    assert proc.returncode == 0, err
    assert "fake provider: stopped cleanly" in out
    assert not kernelspec_dir(jupyter_env).exists()
    assert not await wait_gone(children, timeout=0)
    # Reverse order: kernelspecs, then the provider, then the coordinator.
    assert err.index("kernelspecs: removed") < err.index("provider: stopping")
    assert err.index("provider: stopping") < err.index("coordinator: stopping")
    assert "did not stop in time" not in err


def test_display_names_say_simulation_and_price_and_fit_a_launcher_tile() -> None:
    rtx = {"display": "RTX 4090", "vram_bytes": 24 << 30, "simulated": True,
           "price_min": 120_000_000}  # fmt: skip
    assert demo_display_name(rtx) == DISPLAY
    cpu = {"display": "cpu (no GPU)", "vram_bytes": 0, "simulated": False, "price_min": 10**8}
    assert demo_display_name(cpu) == "cpu (no GPU) · 0.1 SOL/h"
    # Every GPU of the type leased: no minimum price to show, the median then.
    busy = {**rtx, "simulated": False, "price_min": None, "price_median": 1_500_000_000}
    assert demo_display_name(busy) == "RTX 4090 · 1.5 SOL/h"


async def test_a_provider_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    stubborn = [*fake_provider, "--stubborn"]
    proc, _ = await start_demo(
        "--no-lab", *demo_args(jupyter_env, tmp_path, stubborn, stop_timeout=0.5)
    )
    children = descendants(proc.pid)
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert "provider: did not stop in time, killing it" in err
    assert not await wait_gone(children, timeout=0)
    # The coordinator after it, as always, and cleanly.
    assert err.index("provider: did not stop") < err.index("coordinator: stopping")


async def test_a_second_ctrl_c_kills_what_is_still_stopping(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    # The stop timeout outlasts stop_demo's own: only the second Ctrl-C can end this in time.
    stubborn = [*fake_provider, "--stubborn"]
    proc, _ = await start_demo(
        "--no-lab", *demo_args(jupyter_env, tmp_path, stubborn, stop_timeout=3 * TIMEOUT)
    )
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    await read_until(proc.stderr, "provider: stopping")
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert "killing what is still running" in err
    assert not await wait_gone(children, timeout=0)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
async def test_neither_coordinator_nor_provider_outlives_a_killed_demo(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, out = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path, fake_provider))
    children = descendants(proc.pid)
    assert len(children) == 2
    # A second demo on the same data dir is refused at once, told where the first one is.
    second = await second_demo(jupyter_env, tmp_path)
    assert f"(pid {proc.pid}) is running on the data directory {tmp_path / 'demo'}" in second
    assert f"its coordinator is at {coordinator_url(out)}" in second
    proc.kill()  # no chance to stop anything itself
    # Not proc.wait(): on Python 3.11 it also waits for the pipes, which a survivor holds.
    survivors = await wait_gone(children)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    await proc.wait()
    assert not survivors, "a child outlived the demo"
    # Its lock died with it: the data dir is free again, with nothing to clean up by hand.
    lock = DataDirLock(tmp_path / "demo")
    lock.acquire()
    lock.release()


async def test_demo_stops_when_the_provider_dies(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, _ = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path, fake_provider))
    children = descendants(proc.pid)
    (provider,) = [pid for pid in children if "fake_provider" in cmdline(pid)]
    os.kill(provider, signal.SIGKILL)
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 1
    assert "provider exited unexpectedly" in err.decode()
    assert not kernelspec_dir(jupyter_env).exists()
    assert not await wait_gone(children, timeout=0)  # the coordinator stopped too


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
    assert "coordinator: stopping" in err.decode()  # what had started is stopped
    assert not kernelspec_dir(jupyter_env).exists()


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
async def test_demo_with_lab_serves_the_gpu_kernelspec_from_its_extension_and_stops_lab_first(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, out = await start_demo(
        *demo_args(jupyter_env, tmp_path, fake_provider), *lab_args(tmp_path)
    )
    children = descendants(proc.pid)
    async with shown_on_failure(proc):
        # Nothing installed: Lab's server extension serves the GPU type's kernelspec under the
        # same name, with the user's Lab settings (budget, cap, region) applied.
        assert not kernelspec_dir(jupyter_env).exists()
        assert "kernelspec:" not in out
        url = await lab_url(proc, "/api/kernelspecs")
        deadline = time.monotonic() + TIMEOUT
        while KERNEL not in (specs := json.loads(await asyncio.to_thread(http_get, url))[
            "kernelspecs"
        ]):  # fmt: skip
            assert time.monotonic() < deadline, specs  # its first offers fetch
            await asyncio.sleep(0.2)
        spec = specs[KERNEL]["spec"]
        assert spec["display_name"] == "RTX 4090 (simulated) · 0.12 SOL/h"
        config = spec["metadata"]["kernel_provisioner"]["config"]
        assert config["coordinator_url"] == coordinator_url(out)
        assert config["keypair_path"] == str(tmp_path / "demo" / "user-keypair.json")
        # A second demo on this data dir is refused, and sent to this one's Lab.
        lock = DataDirLock(tmp_path / "demo")
        while "lab_url" not in (record := lock.holder()):
            assert time.monotonic() < deadline, record  # Lab's server info file is written
            await asyncio.sleep(0.1)
        assert record["lab_url"] == url.replace("/api/kernelspecs?", "/lab?")
        second = await second_demo(jupyter_env, tmp_path)
        assert f"its JupyterLab is at {record['lab_url']}" in second
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert not await wait_gone(children, timeout=0)
    assert err.index("jupyterlab: stopping") < err.index("provider: stopping")
    assert err.index("provider: stopping") < err.index("coordinator: stopping")
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
async def test_demo_leases_a_kernel_through_its_kernelspec_and_nothing_outlives_it(
    jupyter_env: Path, tmp_path: Path
) -> None:
    from jupyter_client.manager import AsyncKernelManager
    from traitlets.config import Config

    proc, out = await start_demo("--no-lab", *demo_args(jupyter_env, tmp_path))
    assert "jupyter-io provider joining coordinator http://127.0.0.1:" in out
    assert "(clients connect via its relay)" in out
    # When the demo is gone, the kernel's end cannot reach the coordinator for a refund of
    # its escrow: give up after 5 s (the default waits a minute for a lost provider).
    config = Config({"RemoteKernelProvisioner": {"refund_timeout": 5.0}})
    km = AsyncKernelManager(kernel_name=KERNEL, config=config)
    try:
        await asyncio.wait_for(km.start_kernel(), TIMEOUT)
        grant = km.provisioner.lease.grant
        assert grant.relay and grant.gpu == "RTX 4090"
        # Paid from the demo wallet: the lease's escrow holds an hour at 0.12 SOL/h.
        assert km.provisioner.lease.funded
        assert km.provisioner.lease.escrow.deposit == 120_000_000
        assert grant.provider == str(
            load_keypair(tmp_path / "demo" / "provider-keypair.json").pubkey()
        )
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=TIMEOUT)
        printed: list[str] = []
        results: list[str] = []

        def on_output(msg: dict[str, object]) -> None:
            content = msg["content"]
            assert isinstance(content, dict)
            if msg["msg_type"] == "stream":
                printed.append(content["text"])
            elif msg["msg_type"] == "execute_result":
                results.append(content["data"]["text/plain"])
            elif msg["msg_type"] == "error":
                printed.append("\n".join(content["traceback"]))

        reply = await kc.execute_interactive("1 + 1", timeout=TIMEOUT, output_hook=on_output)
        assert reply["content"]["status"] == "ok" and results == ["2"], printed
        if importlib.util.find_spec("torch") is not None:
            # The example notebook, through the lease and the relay.
            for code in notebook_code():
                reply = await kc.execute_interactive(code, timeout=120, output_hook=on_output)
                assert reply["content"]["status"] == "ok", "".join(printed)
            output = "".join(printed)
            assert "device: " in output and "ok: the model learned" in output
            assert "Failed to initialize NumPy" not in output  # the provider extra brings numpy
        kc.stop_channels()

        # The kernel runs under the provider, below the demo; Ctrl-C with it still running.
        running = descendants(proc.pid)
        assert len(running) >= 3  # the coordinator, the provider host and the kernel
        _, err = await stop_demo(proc, signal.SIGINT)
        assert proc.returncode == 0, err
        assert not await wait_gone(running), f"left running: {running}\n{err}"
        assert "did not stop in time" not in err
        assert not kernelspec_dir(jupyter_env).exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # Our end of the tunnel: its provider and coordinator are gone, so this must give
        # up (ending the lease is best effort then), not hang.
        await asyncio.wait_for(km.shutdown_kernel(now=True), TIMEOUT)


@needs_real_stack
@pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None, reason="needs JupyterLab")
async def test_demo_lab_shuts_its_remote_kernel_down_before_the_provider_stops(
    jupyter_env: Path, tmp_path: Path
) -> None:
    proc, _ = await start_demo(*demo_args(jupyter_env, tmp_path), *lab_args(tmp_path))
    async with shown_on_failure(proc):
        kernels_url = await lab_url(proc, "/api/kernels")
        request = urllib.request.Request(
            kernels_url,
            data=json.dumps({"name": KERNEL}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        kernel = json.loads(await asyncio.to_thread(http_get, request))
        assert kernel["name"] == KERNEL
        # A pending kernel: the answer comes at once; wait for the start to finish.
        progress = kernels_url.replace("/api/kernels?", f"/jupyter-io/progress/{kernel['id']}?")
        deadline = time.monotonic() + TIMEOUT
        while json.loads(await asyncio.to_thread(http_get, progress))["state"] != "ready":
            assert time.monotonic() < deadline, "the kernel did not start"
            await asyncio.sleep(0.2)
        running = descendants(proc.pid)
        assert len(running) >= 4  # JupyterLab, the coordinator, the provider, its kernel
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert not await wait_gone(running), f"left running: {running}\n{err}"
    assert "did not stop in time" not in err
    # Lab ended the remote kernel itself, through the relay, while the provider and the
    # coordinator still ran, and ended its lease.
    assert f"Kernel shutdown: {kernel['id']}" in err
    assert err.index(f"Kernel shutdown: {kernel['id']}") < err.index("provider: stopping")
    assert re.search(r"jupyter-io: lease \S+ ended", err), err


async def test_lab_is_pointed_at_the_demo_coordinator_and_wallet(tmp_path: Path) -> None:
    """The GPU picker in the demo's Lab must talk to the demo's coordinator, not a default."""
    import logging
    import types

    from jupyter_io.demo import LabService

    coordinator = types.SimpleNamespace(url="http://127.0.0.1:8799")
    lab = LabService(
        ["jupyter-lab"],
        coordinator=coordinator,  # type: ignore[arg-type]
        keypair_path=tmp_path / "user.json",
        stop_timeout=1.0,
        log=logging.getLogger("test"),
    )
    spawned: list[list[str]] = []

    async def spawn() -> None:
        spawned.append(list(lab.argv))

    lab.spawn = spawn  # type: ignore[method-assign]
    await lab.start()
    assert spawned == [
        [
            "jupyter-lab",
            "--JupyterIOExtension.coordinator_url=http://127.0.0.1:8799",
            f"--JupyterIOExtension.keypair_path={tmp_path / 'user.json'}",
        ]
    ]


# -- demo --cohort: a class with simulated students ------------------------------------------


def class_lines(out: str) -> tuple[str, str, list[Path]]:
    """The demo class's id, its join code and the students' key files, from the ready lines."""
    cohort_id = re.findall(r"class:\s+Demo class \((c_[\w-]+)\)", out)[-1]
    code = re.findall(r"join code:\s+(\S+)", out)[-1]
    keys = [Path(key) for key in re.findall(r"student \d+:\s+key (\S+)", out)]
    return cohort_id, code, keys


async def test_demo_cohort_makes_a_class_whose_students_joined_with_funded_allowances(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    from solders.pubkey import Pubkey

    from jupyter_io.cohort_client import CohortClient
    from jupyter_io.coordinator_client import CoordinatorClient
    from jupyter_io.payments.amounts import parse_sol
    from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortPoolClient

    args = ("--no-lab", "--cohort", "--cohort-students", "2")
    proc, out = await start_demo(*args, *demo_args(jupyter_env, tmp_path, fake_provider))
    data = tmp_path / "demo"
    try:
        cohort_id, code, keys = class_lines(out)
        assert keys == [data / "students" / f"student-{i}.json" for i in (1, 2)]
        students = {str(load_keypair(key).pubkey()) for key in keys}
        instructor = load_keypair(data / "user-keypair.json")
        url = coordinator_url(out)
        # The demo user teaches it, the students are in it: the coordinator says so.
        teacher = CohortClient(url, instructor, timeout=10)
        try:
            board = await teacher.dashboard(cohort_id)
        finally:
            teacher.close()
        assert board["cohort"]["instructor"] == str(instructor.pubkey())
        assert board["cohort"]["gpu_types"] == ["rtx4090"]
        assert {row["student"] for row in board["students"]} == students
        # Each student's allowance holds 0.5 SOL on the coordinator's ledger, delegated.
        async with CoordinatorClient(url, timeout=10) as client:
            payments = await client.payments()
        assert payments.solana_url and payments.arbiter
        ledger = CohortPoolClient.connect(payments.solana_url)
        try:
            # The arbiter can front the class sessions' rents (the demo funded it).
            assert await ledger.balance(Pubkey.from_string(payments.arbiter)) >= parse_sol("1")
            for key in keys:
                terms = AllowanceTerms(
                    instructor.pubkey(),
                    load_keypair(key).pubkey(),
                    Pubkey.from_string(payments.arbiter),
                    cohort_id,
                )
                state = await ledger.allowance_state(terms)  # type: ignore[attr-defined]
                assert state is not None
                assert state.amount == state.delegated_amount == parse_sol("0.5")
        finally:
            await ledger.close()
        assert "moved now in 1 transaction(s)" in out, out
    finally:
        _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err

    # Started again on its data dir: the same class, a fresh code, nothing more to fund.
    proc, out = await start_demo(*args, *demo_args(jupyter_env, tmp_path, fake_provider))
    try:
        again, new_code, keys_again = class_lines(out)
        assert (again, keys_again) == (cohort_id, keys)
        assert new_code != code
        assert "(0 SOL moved now in 0 transaction(s))" in out, out
    finally:
        _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err


@pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None, reason="needs JupyterLab")
async def test_demo_cohort_gives_the_first_student_a_lab_of_their_own(
    jupyter_env: Path, tmp_path: Path, fake_provider: list[str]
) -> None:
    proc, out = await start_demo(
        "--cohort", "--cohort-students", "2", "--Demo.payments=free",
        *demo_args(jupyter_env, tmp_path, fake_provider), *lab_args(tmp_path),
    )  # fmt: skip
    children = descendants(proc.pid)
    async with shown_on_failure(proc):
        cohort_id, _, keys = class_lines(out)
        [student_lab] = re.findall(r"jupyterlab \(student 1\): (http://\S+/lab\?token=\S+)", out)
        assert "student 2): http" not in out  # one student Lab by default
        # That Lab leases with student 1's key: it sees the class as a student, quota and all.
        cohorts_url = student_lab.replace("/lab?", "/jupyter-io/cohorts?")
        body = json.loads(await asyncio.to_thread(http_get, cohorts_url))
        [cohort] = body["cohorts"]
        assert (cohort["id"], cohort["role"]) == (cohort_id, "student")
        assert cohort["me"]["student"] == str(load_keypair(keys[0]).pubkey())
        wallet = json.loads(
            await asyncio.to_thread(http_get, student_lab.replace("/lab?", "/jupyter-io/wallet?"))
        )
        assert wallet["keypair_path"] == str(keys[0])
        assert "free coordinator" in out
    _, err = await stop_demo(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert not await wait_gone(children, timeout=0)
    assert "jupyterlab (student 1): stopping" in err
