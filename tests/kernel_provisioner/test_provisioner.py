"""RemoteKernelProvisioner end to end: AsyncKernelManager and AsyncKernelClient, through the
io-remote kernelspec, the local facade and the tunnel, to a real provider host running a
real ipykernel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session
from solders.keypair import Keypair

from jupyter_io.errors import ConfigError, KernelLaunchError
from jupyter_io.identity import write_keypair
from kernel_provisioner.provisioner import RemoteKernelProvisioner


async def test_outputs_display_data_and_errors(
    remote_spec: str, start_kernel: Any, cells: Any
) -> None:
    km = await start_kernel(remote_spec)
    assert isinstance(km.provisioner, RemoteKernelProvisioner)
    info = km.get_connection_info()
    assert info["ip"] == "127.0.0.1" and info["transport"] == "tcp"
    assert info["signature_scheme"] == "hmac-sha256"
    kc = await cells.connect(km)
    try:
        ex = await cells.run(
            kc,
            "import sys\n"
            "from IPython.display import display, HTML\n"
            "print('hello out')\n"
            "print('hello err', file=sys.stderr)\n"
            "display(HTML('<b>rich</b>'))\n"
            "6 * 7",
        )
        assert ex.status == "ok"
        assert ex.stream("stdout") == "hello out\n"
        assert ex.stream("stderr") == "hello err\n"
        [display] = ex.of_type("display_data")
        assert display["content"]["data"]["text/html"] == "<b>rich</b>"
        [result] = ex.of_type("execute_result")
        assert result["content"]["data"]["text/plain"] == "42"

        ex = await cells.run(kc, "1 / 0")
        assert ex.status == "error"
        assert ex.reply is not None and ex.reply["content"]["ename"] == "ZeroDivisionError"
        [error] = ex.of_type("error")
        assert error["content"]["ename"] == "ZeroDivisionError"
    finally:
        kc.stop_channels()


async def test_input_over_stdin(remote_spec: str, start_kernel: Any, cells: Any) -> None:
    km = await start_kernel(remote_spec)
    kc = await cells.connect(km)
    try:
        msg_id = kc.execute("name = input('who? ')\nprint('hi', name)", allow_stdin=True)
        request = await kc.get_stdin_msg(timeout=30)
        assert request["msg_type"] == "input_request"
        assert request["content"]["prompt"] == "who? "
        assert request["parent_header"]["msg_id"] == msg_id
        kc.input("ada")
        ex = await cells.collect(kc, msg_id)
        assert ex.status == "ok"
        assert ex.stream() == "hi ada\n"
    finally:
        kc.stop_channels()


async def _interrupt_sleep(km: AsyncKernelManager, cells: Any) -> float:
    kc = await cells.connect(km)
    try:
        # Interrupt once user code runs: an interrupt landing in ipykernel's own dispatch,
        # before the cell starts, is a different (local kernels share it) story.
        msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
        await cells.next_iopub(kc, msg_id, "stream")
        start = time.monotonic()
        await km.interrupt_kernel()
        ex = await cells.collect(kc, msg_id, timeout=10)
        elapsed = time.monotonic() - start
        assert ex.status == "error"
        assert ex.reply is not None and ex.reply["content"]["ename"] == "KeyboardInterrupt"
        # The kernel survives an interrupt and keeps its state.
        ex = await cells.run(kc, "print('still here')")
        assert ex.stream() == "still here\n"
        return elapsed
    finally:
        kc.stop_channels()


async def test_interrupt_by_signal(remote_spec: str, start_kernel: Any, cells: Any) -> None:
    km = await start_kernel(remote_spec)
    assert km.kernel_spec.interrupt_mode == "signal"
    assert await _interrupt_sleep(km, cells) < 2.0


async def test_interrupt_by_message(
    kernelspecs: Any, provider_host: Any, start_kernel: Any, cells: Any
) -> None:
    name = kernelspecs.install(
        "io-remote-msg",
        provider_host.url,
        provider_host.user_keypair_path,
        interrupt_mode="message",
    )
    km = await start_kernel(name)
    assert km.kernel_spec.interrupt_mode == "message"
    assert await _interrupt_sleep(km, cells) < 2.0


async def test_restart_clears_state_and_keeps_the_session(
    remote_spec: str, start_kernel: Any, cells: Any, processes: Any
) -> None:
    km = await start_kernel(remote_spec)
    prov = km.provisioner
    session, old_pid, ports = prov.session_id, prov.kernel_pid, km.get_connection_info()
    assert session and old_pid
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "x = 'before'")).status == "ok"
        await asyncio.wait_for(km.restart_kernel(), 60)
        assert km.provisioner is prov
        assert prov.session_id == session, "a restart must reuse the provider session"
        assert prov.kernel_pid != old_pid
        assert await processes.wait_gone(old_pid, 10), "the old kernel survived the restart"
        # Same facade, ports and key: the already-connected client carries on.
        assert km.get_connection_info() == ports
        await kc.wait_for_ready(timeout=30)
        ex = await cells.run(kc, "x")
        assert ex.status == "error"
        assert ex.reply is not None and ex.reply["content"]["ename"] == "NameError"
        assert (await cells.run(kc, "print('new kernel')")).stream() == "new kernel\n"
    finally:
        kc.stop_channels()


async def test_shutdown_leaves_no_process(
    remote_spec: str, provider_host: Any, processes: Any
) -> None:
    km = AsyncKernelManager(kernel_name=remote_spec)
    await asyncio.wait_for(km.start_kernel(), 60)
    prov = km.provisioner
    pid, tunnel = prov.kernel_pid, prov.tunnel
    assert pid is not None and not processes.gone(pid)
    await asyncio.wait_for(km.shutdown_kernel(), 30)
    assert tunnel.ended, "the provider must confirm END"
    assert await processes.wait_gone(pid, 10)
    assert not km.has_kernel
    assert not any(p.pid == pid for p in provider_host.descendants())


async def test_comm_with_a_10_mb_buffer_arrives_intact(
    remote_spec: str, start_kernel: Any, cells: Any
) -> None:
    km = await start_kernel(remote_spec)
    kc = await cells.connect(km)
    try:
        ex = await cells.run(
            kc,
            "def _echo(comm, open_msg):\n"
            "    comm.send({'echo': True}, buffers=open_msg['buffers'])\n"
            "get_ipython().kernel.comm_manager.register_target('echo', _echo)",
        )
        assert ex.status == "ok"
        payload = os.urandom(10 * 1024 * 1024)
        msg = kc.session.msg("comm_open", {"comm_id": "c-10mb", "target_name": "echo", "data": {}})
        kc.session.send(kc.shell_channel.socket, msg, buffers=[payload])
        echoed = await cells.next_iopub(kc, msg["header"]["msg_id"], "comm_msg")
        assert echoed["content"]["data"] == {"echo": True}
        [buffer] = echoed["buffers"]
        received = bytes(buffer)
        assert len(received) == len(payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    finally:
        kc.stop_channels()


async def _own_replies(kc: Any, get: Any, wanted: list[str]) -> list[str]:
    """Replies on one client until all of ``wanted`` answered; each must answer this client.

    A client's message ids start with its session id, so a reply to the other client is
    cross-talk. (wait_for_ready may leave a late kernel_info_reply of its own: skipped.)
    """
    got: list[str] = []
    while not set(wanted) <= set(got):
        parent = (await get(timeout=30))["parent_header"]["msg_id"]
        assert parent.startswith(kc.session.session), f"cross-talk: {parent} reached {kc}"
        if parent in wanted:
            got.append(parent)
    return got


async def test_two_clients_get_their_own_replies(
    remote_spec: str, start_kernel: Any, cells: Any
) -> None:
    km = await start_kernel(remote_spec)
    a = await cells.connect(km, own_session=True)
    b = await cells.connect(km, own_session=True)
    try:
        assert a.session.bsession != b.session.bsession
        sent_a = [a.execute(f"a{i} = {i}") for i in range(5)]
        sent_b = [b.execute(f"b{i} = {i}") for i in range(5)]
        assert await _own_replies(a, a.get_shell_msg, sent_a) == sent_a
        assert await _own_replies(b, b.get_shell_msg, sent_b) == sent_b
        # The control channel routes by identity too.
        ka, kb = a.session.msg("kernel_info_request"), b.session.msg("kernel_info_request")
        a.control_channel.send(ka)
        b.control_channel.send(kb)
        assert await _own_replies(a, a.get_control_msg, [ka["header"]["msg_id"]])
        assert await _own_replies(b, b.get_control_msg, [kb["header"]["msg_id"]])
    finally:
        a.stop_channels()
        b.stop_channels()


async def test_provisioner_info_round_trip_reattaches(
    remote_spec: str, provider_host: Any, start_kernel: Any, cells: Any, processes: Any
) -> None:
    km = await start_kernel(remote_spec)
    prov = km.provisioner
    kc = await cells.connect(km)
    assert (await cells.run(kc, "survivor = 'kept'")).status == "ok"
    info = json.loads(json.dumps(await prov.get_provisioner_info()))
    assert info["provider_url"] == provider_host.url
    assert info["session_id"] == prov.session_id
    assert info["connection_info"]["shell_port"] == km.get_connection_info()["shell_port"]
    pid = prov.kernel_pid
    # Traffic after the snapshot: the new owner must skip what the old one already consumed.
    assert (await cells.run(kc, "late = 'after'; print(late)")).stream() == "after\n"
    kc.stop_channels()

    # Another process takes over: the old provisioner lets go without ending the session.
    await prov.detach()
    km2 = AsyncKernelManager(kernel_name=remote_spec)
    prov2 = RemoteKernelProvisioner(
        kernel_id=info["kernel_id"],
        kernel_spec=km2.kernel_spec,
        provider_url=info["provider_url"],
        keypair_path=str(provider_host.user_keypair_path),
    )
    await prov2.load_provisioner_info(info)
    try:
        assert prov2.session_id == info["session_id"]
        assert prov2.has_process and await prov2.poll() is None
        km2.provisioner = prov2
        km2.load_connection_info(prov2.connection_info)
        assert km2.get_connection_info() == km.get_connection_info()
        # The rebound facade welcomes this process's iopub subscribers (JEP 65).
        await _assert_welcomed(km2.get_connection_info())
        kc2 = await cells.connect(km2)
        try:
            ex = await cells.run(kc2, "print(survivor, late)")
            assert ex.stream() == "kept after\n"
        finally:
            kc2.stop_channels()
        assert prov2.kernel_pid == pid
    finally:
        tunnel = prov2.tunnel
        await prov2.cleanup(restart=False)
    assert tunnel is not None and tunnel.ended
    assert await processes.wait_gone(pid, 10)
    km.provisioner = None  # nothing left for the fixture to shut down


async def test_unknown_key_is_refused_with_a_clear_error(
    kernelspecs: Any, provider_host: Any, tmp_path: Any
) -> None:
    stranger = write_keypair(Keypair(), tmp_path / "stranger.json")
    name = kernelspecs.install("io-remote-stranger", provider_host.url, stranger)
    km = AsyncKernelManager(kernel_name=name)
    before = {p.pid for p in provider_host.descendants()}
    with pytest.raises(KernelLaunchError, match="refused key"):
        await asyncio.wait_for(km.start_kernel(), 30)
    assert not km.has_kernel
    # The LAUNCH that went out behind the refused HELLO started nothing.
    assert {p.pid for p in provider_host.descendants()} <= before


async def test_unreachable_provider_fails_the_launch(kernelspecs: Any, provider_host: Any) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = kernelspecs.install(
        "io-remote-nowhere", f"ws://127.0.0.1:{port}/tunnel", provider_host.user_keypair_path
    )
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(KernelLaunchError, match="cannot open a tunnel"):
        await asyncio.wait_for(km.start_kernel(), 30)


async def test_a_kernel_that_exits_reports_its_exit_code_and_restarts(
    remote_spec: str, start_kernel: Any, cells: Any, processes: Any
) -> None:
    km = await start_kernel(remote_spec)
    prov = km.provisioner
    pid = prov.kernel_pid
    kc = await cells.connect(km)
    try:
        kc.execute("import os; os._exit(3)")
        assert await prov.tunnel.wait_exited(timeout=10) == 3
        assert await prov.poll() == 3
        assert not await km.is_alive()
        assert await processes.wait_gone(pid, 10)
        # What jupyter_client's restarter does next: a restart on the same session.
        session = prov.session_id
        await asyncio.wait_for(km.restart_kernel(now=True), 60)
        assert prov.session_id == session and await prov.poll() is None
        await kc.wait_for_ready(timeout=30)
        assert (await cells.run(kc, "print('back')")).stream() == "back\n"
    finally:
        kc.stop_channels()


async def test_a_failed_first_launch_ends_its_session(
    kernelspecs: Any, provider_host: Any, processes: Any
) -> None:
    before = {p.pid for p in provider_host.descendants()}
    workspaces = set(provider_host.workspace.iterdir())
    name = kernelspecs.install(
        "io-remote-impatient",
        provider_host.url,
        provider_host.user_keypair_path,
        launch_timeout=0.001,
    )
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(KernelLaunchError, match="did not start the kernel within"):
        await asyncio.wait_for(km.start_kernel(), 30)
    # The provider got END: it deletes the session's workspace (the host may close the
    # websocket just before the deletion, hence the bounded wait) and its kernel is gone.
    deadline = time.monotonic() + 10
    while not set(provider_host.workspace.iterdir()) <= workspaces:
        assert time.monotonic() < deadline, "the failed launch's session was never ended"
        await asyncio.sleep(0.05)
    for pid in {p.pid for p in provider_host.descendants()} - before:
        assert await processes.wait_gone(pid, 10)


def test_configuration_is_checked_and_state_is_per_instance() -> None:
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        RemoteKernelProvisioner(provider_url="http://gpu-box:8765/tunnel")
    a, b = RemoteKernelProvisioner(), RemoteKernelProvisioner()
    assert a.connection_info is not b.connection_info
    assert a.keypair_path == "~/.config/solana/id.json" and a.grace_period == 120
    assert not a.has_process


async def _assert_welcomed(info: dict[str, Any]) -> None:
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    try:
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
        session = Session(key=info["key"], signature_scheme=info["signature_scheme"])

        async def welcome() -> None:  # the kernel's own output may come first
            while True:
                _, parts = session.feed_identities(await sub.recv_multipart())
                if session.deserialize(parts)["header"]["msg_type"] == "iopub_welcome":
                    return

        await asyncio.wait_for(welcome(), 10)
    finally:
        sub.close()
        context.term()


async def test_a_remote_kernel_started_through_jupyter_is_the_hosts_warm_kernel(
    kernelspecs: Any, start_host: Any, start_kernel: Any, cells: Any
) -> None:
    # Warm kernels on (the host's default; this module's other hosts turn them off).
    host = start_host("--ProviderConfig.warm_kernels=True", "--log-level=INFO")
    name = kernelspecs.install("io-remote-warm", host.url, host.user_keypair_path)

    # A lease that comes before the spare is armed gets a cold kernel (rightly): wait for it.
    def armed() -> None:
        deadline = time.monotonic() + 30
        while "warm kernel armed" not in host.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)  # the host's log, read by a thread of the fixture's

    await asyncio.to_thread(armed)
    km = await start_kernel(name)
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "print(1)")).stream() == "1\n"
    finally:
        kc.stop_channels()
    # The host's word that the first LAUNCH claimed the kernel it had started beforehand,
    # whose pid the provisioner was told; the teardown checks that none outlives the host.
    assert f"kernel generation 1: warm, pid {km.provisioner.kernel_pid}" in host.stderr()
