"""Remote kernels from the blocking jupyter_client APIs: the blocking KernelManager and
BlockingKernelClient (jupyter console, qtconsole, jupyter_kernel_test and scripts use them),
MultiKernelManager, nbclient, and an AsyncKernelManager whose loop runs only now and then.

The blocking manager runs an event loop only inside its own calls, so the tunnel runs on a
loop of its own thread (``RemoteKernelProvisioner.loop_thread``): these tests run no event
loop of their own, as such applications do, and everything between the manager's calls (the
client's requests and the kernel's replies, a resume after a cut, usage acknowledgements)
happens on that thread. Real provider hosts, real ipykernels, a real paid marketplace.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager, KernelManager
from jupyter_client.multikernelmanager import MultiKernelManager
from nbclient import NotebookClient

from kernel_provisioner.loop_thread import LoopThread
from kernel_provisioner.provisioner import RemoteKernelProvisioner

from .test_payments import ESCROW_ARGS, Ledger, PaidMarket, fund_parties, settled

RTX_PRICE = 120_000_000  # the relayed provider's RTX 4090: 0.12 SOL/h
SESSION_ENDED = "session ended: session ended"  # the provider's log line for END


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (state another process or thread changes) for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.05)


def ended_sessions(host: Any) -> int:
    """How many sessions the provider host has ended at its client's END so far."""
    return sum(SESSION_ENDED in line for line in list(host.stderr_lines))


def run_cell(kc: BlockingKernelClient, code: str, timeout: float = 30) -> tuple[Any, str]:
    """Execute ``code``; return the execute_reply and what it printed to stdout."""
    out: list[str] = []

    def keep(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=keep)
    return reply, "".join(out)


def next_message(get: Callable[..., Any], msg_id: str, msg_type: str, timeout: float) -> Any:
    """The next message of ``msg_type`` answering ``msg_id`` from a blocking channel."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = get(timeout=left)
        except Empty:
            break
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == msg_type:
            return msg
    raise AssertionError(f"no {msg_type} for {msg_id} within {timeout} s")


def ready_client(km: KernelManager) -> BlockingKernelClient:
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=30)
    return kc


def test_the_blocking_manager_runs_interrupts_restarts_and_shuts_down_a_remote_kernel(
    remote_spec: str, provider_host: Any, processes: Any
) -> None:
    ended_before = ended_sessions(provider_host)
    km = KernelManager(kernel_name=remote_spec)
    km.start_kernel()
    prov = km.provisioner
    assert isinstance(prov, RemoteKernelProvisioner)
    thread = prov.loop_thread
    assert thread is not None and thread.alive, "the tunnel runs on a thread of its own"
    first_pid = prov.kernel_pid
    assert first_pid is not None
    kc = ready_client(km)  # the client's requests and replies cross between manager calls
    try:
        reply, out = run_cell(kc, "x = 6 * 7\nprint(x)")
        assert reply["content"]["status"] == "ok" and out == "42\n"

        # Interrupt (a signal through the tunnel, sent from the manager's thread).
        msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(30)")
        next_message(kc.get_iopub_msg, msg_id, "stream", 15)
        started = time.monotonic()
        km.interrupt_kernel()
        reply = next_message(kc.get_shell_msg, msg_id, "execute_reply", 10)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10

        # Restart: a new kernel process on the same session, ports and thread.
        ports = {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")}
        km.restart_kernel()
        assert prov.kernel_pid not in (None, first_pid)
        assert processes.gone(first_pid), "the old kernel is gone after the restart"
        assert prov.loop_thread is thread
        assert {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")} == ports
        kc.wait_for_ready(timeout=30)
        reply, out = run_cell(kc, "print('x' in dir())")
        assert out == "False\n", "a fresh kernel"
        second_pid = prov.kernel_pid
    finally:
        kc.stop_channels()
        km.shutdown_kernel()

    assert not km.has_kernel
    assert second_pid is not None and processes.gone(second_pid)
    # The session ended at the provider (END, not a dropped connection), and the thread is
    # gone with it.
    wait_until(lambda: ended_sessions(provider_host) == ended_before + 1, 10, "session ended")
    assert prov.loop_thread is None and not thread.alive
    assert thread.name not in {t.name for t in threading.enumerate()}


def test_multi_kernel_manager_runs_remote_kernels_each_on_its_own_thread(
    remote_spec: str, processes: Any
) -> None:
    mkm = MultiKernelManager()
    ids = [mkm.start_kernel(kernel_name=remote_spec) for _ in range(2)]
    try:
        provs = [mkm.get_kernel(kid).provisioner for kid in ids]
        assert all(isinstance(p, RemoteKernelProvisioner) for p in provs)
        threads = [p.loop_thread for p in provs]  # type: ignore[union-attr]
        assert threads[0] is not None and threads[1] is not None
        assert threads[0] is not threads[1]
        pids = [p.kernel_pid for p in provs]  # type: ignore[union-attr]
        for n, kid in enumerate(ids):
            kc = ready_client(mkm.get_kernel(kid))
            try:
                _, out = run_cell(kc, f"print({n} + 40)")
                assert out == f"{n + 40}\n"
            finally:
                kc.stop_channels()
    finally:
        mkm.shutdown_all()
    assert mkm.list_kernel_ids() == []
    for thread, pid in zip(threads, pids, strict=True):
        assert thread is not None and not thread.alive
        assert pid is not None and processes.gone(pid)


def test_the_tunnel_resumes_on_its_thread_after_a_cut(
    provider_host: Any, kernelspecs: Any, threaded_proxy_to: Any
) -> None:
    proxy = threaded_proxy_to(provider_host)
    spec = kernelspecs.install("io-remote-cut", proxy.url, provider_host.user_keypair_path)
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    prov: Any = km.provisioner
    kc = ready_client(km)
    try:
        _, out = run_cell(kc, "print('before')")
        assert out == "before\n"
        proxy.cut()
        wait_until(lambda: not prov.tunnel.connected, 10, "the cut seen")
        # Sent while the tunnel is down: kept, and delivered when it comes back.
        msg_id = kc.execute("print('across the cut')")
        proxy.restore()
        stream = next_message(kc.get_iopub_msg, msg_id, "stream", 20)
        assert stream["content"]["text"] == "across the cut\n"
        assert prov.tunnel.resumes == 1
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_nbclient_executes_a_notebook_on_a_remote_kernel(remote_spec: str) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys\nprint(6 * 7)\nsys.version_info[0]")]
    )
    NotebookClient(nb, kernel_name=remote_spec, timeout=30).execute()
    outputs = nb.cells[0].outputs
    assert outputs[0]["text"] == "42\n"
    assert outputs[1]["data"]["text/plain"] == "3"


def test_an_async_manager_whose_loop_stops_keeps_its_tunnel_with_tunnel_thread_always(
    provider_host: Any, kernelspecs: Any, processes: Any
) -> None:
    """An application that runs its AsyncKernelManager's loop only inside its own calls
    (as nbclient's synchronous API does) asks for the thread with ``tunnel_thread``."""
    spec = kernelspecs.install(
        "io-remote-always",
        provider_host.url,
        provider_host.user_keypair_path,
        tunnel_thread="always",
    )
    loop = asyncio.new_event_loop()
    try:
        km = AsyncKernelManager(kernel_name=spec)
        loop.run_until_complete(km.start_kernel())
        prov: Any = km.provisioner
        thread = prov.loop_thread
        assert thread is not None and thread.alive
        pid = prov.kernel_pid
        # The manager's loop is not running now; a blocking client talks to the kernel.
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=30)
            _, out = run_cell(kc, "print('between calls')")
            assert out == "between calls\n"
        finally:
            kc.stop_channels()
        loop.run_until_complete(km.shutdown_kernel())
        assert not thread.alive and processes.gone(pid)
    finally:
        loop.close()


EXITING_SCRIPT = """
import sys
from jupyter_client.manager import KernelManager

km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel(independent=sys.argv[2] == "independent")
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=30)
kc.execute_interactive("print('ran')", timeout=30)
print("pid", km.provisioner.kernel_pid, flush=True)
kc.stop_channels()
# and exit, without shutting the kernel down
"""


@pytest.mark.parametrize("independent", [False, True], ids=["dependent", "independent"])
def test_a_process_that_exits_without_shutdown_ends_its_session_unless_independent(
    start_host: Any, kernelspecs: Any, processes: Any, independent: bool
) -> None:
    """As a local kernel dies with its parent process (unless started ``independent``), the
    remote session ends when the process that started it exits: END, not the provider's
    grace period (120 s here) after a dropped connection."""
    host = start_host()
    spec = kernelspecs.install("io-remote-exit", host.url, host.user_keypair_path)
    mode = "independent" if independent else "dependent"
    done = subprocess.run(
        [sys.executable, "-c", EXITING_SCRIPT, spec, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split("pid ", 1)[1].split()[0])
    if not independent:
        wait_until(lambda: ended_sessions(host) == 1, 10, "session ended")
        assert processes.gone(pid)
        return
    # Independent: the provider keeps the kernel for a client that may come back.
    wait_until(lambda: "keeping the kernel" in host.stderr(), 10, "connection loss seen")
    assert not processes.gone(pid) and ended_sessions(host) == 0


# -- a paid lease ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paid(start_module_market: Any) -> PaidMarket:
    """An escrow marketplace of this module's (see test_payments)."""
    return asyncio.run(fund_parties(start_module_market(*ESCROW_ARGS)))


def test_a_paid_lease_from_the_blocking_manager_escrows_acknowledges_and_settles_exactly(
    paid: PaidMarket, kernelspecs: Any
) -> None:
    market = paid.market
    user = market.user.pubkey()
    provider = market.relayed.pubkey
    spec = kernelspecs.install_lease(
        "paid-blocking", paid.url, market.user_keypair_path, gpu="RTX 4090",
        usage_ack_interval=0.5,
    )  # fmt: skip

    async def snapshot(lease: str) -> Any:
        chain = Ledger(paid.solana_url)
        try:
            return await chain.snapshot(paid.terms(user, provider, lease))
        finally:
            await chain.close()

    before = asyncio.run(snapshot("probe"))  # every account but the escrow, not yet known
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    prov: Any = km.provisioner
    try:
        assert prov.loop_thread is not None
        grant = prov.lease.grant
        assert grant.provider == provider and grant.price_lamports_per_hour == RTX_PRICE
        steps = [event.step.value for event in prov.progress]
        assert steps == ["queued", "leased", "escrowed", "launching", "ready"]
        setup = next(e for e in prov.progress if e.step.value == "escrowed").details[
            "escrow_signature"
        ]
        kc = ready_client(km)
        try:
            _, out = run_cell(kc, "import time\ntime.sleep(1.5)\nprint('paid')")
            assert out == "paid\n"
        finally:
            kc.stop_channels()
        # Acknowledged from the thread while the manager sat idle between calls.
        wait_until(lambda: prov.lease.acks_taken >= 3, 10, "usage acknowledged")
    finally:
        km.shutdown_kernel()

    async def books() -> None:
        info = await settled(paid, grant.lease)
        assert info.state == "ended"
        billing = info.billing
        assert billing is not None and billing.settlement is not None
        assert billing.billed_seconds >= 1
        assert billing.acknowledged_seconds is not None and billing.acknowledged_seconds >= 1
        assert billing.spent_lamports == RTX_PRICE * billing.billed_seconds // 3600
        terms = paid.terms(user, provider, grant.lease)
        chain = Ledger(paid.solana_url)
        try:
            after = await chain.snapshot(terms)
            assert after.escrow == 0, "the escrow is closed"
            await chain.assert_conserved(
                terms,
                before,
                after,
                paid_to_provider=billing.settlement.amount_lamports,
                signatures=[setup, billing.settlement.signature],
            )
        finally:
            await chain.close()

    asyncio.run(books())


# -- the loop thread itself -------------------------------------------------------------------


def test_the_loop_thread_runs_coroutines_passes_cancellation_on_and_stops_either_way() -> None:
    thread = LoopThread("test loop thread")
    on_thread = threading.Event()
    cancelled = threading.Event()

    async def where() -> str:
        return threading.current_thread().name

    async def hang() -> None:
        on_thread.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def caller() -> None:
        assert await thread.run(where()) == "test loop thread"
        task = asyncio.ensure_future(thread.run(hang()))
        await asyncio.get_running_loop().run_in_executor(None, on_thread.wait, 5)
        task.cancel()  # a timeout around start_kernel, say
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(caller())
    assert cancelled.wait(5), "the coroutine on the thread was cancelled too"

    async def stop_from_inside() -> None:
        thread.stop()  # only asks: the thread finishes once this returns

    asyncio.run(thread.run(stop_from_inside()))
    thread.stop()  # from outside: waits for it
    assert not thread.alive and thread.loop.is_closed()
    with pytest.raises(RuntimeError):
        asyncio.run(thread.run(where()))


def test_the_loop_threads_blocking_work_still_runs_once_its_executor_is_shut_down() -> None:
    """At interpreter exit ``concurrent.futures`` refuses new work, yet the session ending
    there (the provisioner's atexit END) reads and removes files in threads: the loop's
    executor then runs each call on a thread of its own (``jupyter console``'s exit, where
    this failed, is tested in test_console.py)."""
    thread = LoopThread("exit-safe test")
    try:
        executor = thread.loop._default_executor  # type: ignore[attr-defined]
        executor.shutdown(wait=True)  # what the interpreter's exit does to it

        async def blocking() -> str:
            return await asyncio.to_thread(lambda: threading.current_thread().name)

        name = asyncio.run_coroutine_threadsafe(blocking(), thread.loop).result(10)
        assert name == "io-remote exit work"
    finally:
        thread.stop()
