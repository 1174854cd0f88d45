"""The kernel through the host: channels, stdin, signals, restart, END, exit, isolation."""

from __future__ import annotations

import os
import resource
import signal

import pytest

from jupyter_io.protocol import Channel, FrameKind

from .conftest import CLIENT_ID, pid_alive, sandbox_processes

pytestmark = pytest.mark.timeout(60)


async def test_execute_over_shell_result_on_iopub_and_heartbeat(client):
    await client.connect()
    started = await client.launch()
    assert started["generation"] == 1
    assert pid_alive(started["pid"])
    info = await client.wait_ready()
    assert info["msg_type"] == "kernel_info_reply"
    # The Jupyter client's routing identity comes back first, for the facade's ROUTER.
    assert info["idents"] == [CLIENT_ID]

    msg_id, reply = await client.execute("1+1")
    assert reply is not None and reply["content"]["status"] == "ok"
    outputs = await client.outputs(msg_id)
    assert [m["msg_type"] for m in outputs] == ["execute_input", "execute_result"]
    assert outputs[1]["content"]["data"]["text/plain"] == "2"

    await client.send_data(Channel.HB, [b"hb-client", b"", b"ping-1"])
    echo = await client.next_frame(lambda f: f.kind is FrameKind.DATA and f.channel is Channel.HB)
    assert list(echo.parts) == [b"hb-client", b"", b"ping-1"]


async def test_stdin_input_request_and_reply(client):
    await client.connect()
    await client.launch()
    await client.wait_ready()
    msg_id, _ = await client.execute("name = input('name? ')", wait=False)
    request = await client.message(Channel.STDIN)
    assert request["msg_type"] == "input_request"
    assert request["content"]["prompt"] == "name? "
    assert request["parent_header"]["msg_id"] == msg_id
    assert request["idents"] == [CLIENT_ID]
    await client.request(Channel.STDIN, "input_reply", {"value": "Ada"})
    reply = await client.message(
        Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id
    )
    assert reply["content"]["status"] == "ok"
    assert await client.evaluate("name") == "Ada"


async def test_sigint_interrupts_a_long_sleep(client):
    await client.connect()
    await client.launch()
    await client.wait_ready()
    msg_id, _ = await client.execute(
        "import time\nprint('sleeping', flush=True)\ntime.sleep(60)",
        wait=False,
        stop_on_error=False,  # the next request follows the interrupt at once
    )
    await client.message(
        Channel.IOPUB,
        lambda m: m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id,
    )
    await client.send_control(FrameKind.SIGNAL, {"signum": int(signal.SIGINT)})
    reply = await client.message(
        Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id, timeout=15
    )
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert await client.evaluate("1 + 2") == 3  # the kernel survived


async def test_launch_again_restarts_with_a_clean_kernel(host, client):
    await client.connect()
    first = await client.launch()
    await client.wait_ready()
    assert await client.evaluate("[globals().setdefault('a', 41)]") == [41]

    second = await client.launch()
    exited = await client.control(FrameKind.EXITED)
    assert exited["generation"] == 1
    assert exited["exit_code"] == -signal.SIGKILL
    assert second["generation"] == 2
    assert second["pid"] != first["pid"]
    assert not pid_alive(first["pid"])
    await client.wait_ready()
    assert await client.evaluate("'a' in globals()") is False
    session = host.sessions[client.session_id]
    assert session.kernel_info() == {"state": "running", "generation": 2, "exit_code": None}


async def test_requests_queued_for_a_kernel_that_never_started_die_with_it(host, client):
    # A restart before the kernel was ready: the shutdown_request that the kernel manager
    # sent the first kernel (which never bound its sockets) must not reach the second.
    await client.connect()
    await client.launch()
    await client.request(Channel.CONTROL, "shutdown_request", {"restart": True})
    second = await client.launch()
    assert (await client.control(FrameKind.EXITED))["generation"] == 1
    assert second["generation"] == 2
    await client.wait_ready()
    msg_id = await client.request(Channel.CONTROL, "kernel_info_request", {})
    first_reply = await client.message(Channel.CONTROL)
    assert first_reply["msg_type"] == "kernel_info_reply"
    assert first_reply["parent_header"]["msg_id"] == msg_id
    assert host.sessions[client.session_id].kernel_info()["state"] == "running"


async def test_end_kills_the_kernel_and_removes_the_workspace(host, client):
    await client.connect()
    started = await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    # Something the kernel left running in its sandbox dies with it (the pid it sees is the
    # sandbox's own: find the process on the host).
    await client.evaluate("__import__('subprocess').Popen(['sleep', '600']).pid")
    children = [pid for pid, argv in sandbox_processes(started["pid"]) if argv[:1] == ["sleep"]]
    assert len(children) == 1
    child_pid = children[0]
    assert pid_alive(child_pid)
    (session.workspace / "notes.txt").write_text("scratch")

    await client.send_control(FrameKind.END, {})
    code, reason = await client.wait_closed()
    assert (code, reason) == (4010, "session ended")
    assert not pid_alive(started["pid"])
    assert not pid_alive(child_pid)
    assert not session.workspace.exists()
    assert session.runtime_dir is not None and not session.runtime_dir.exists()
    assert client.session_id not in host.sessions


async def test_exited_is_sent_when_the_kernel_dies_and_launch_recovers(host, client):
    await client.connect()
    await client.launch()
    await client.wait_ready()
    await client.execute("import os; os._exit(3)", wait=False)
    exited = await client.control(FrameKind.EXITED)
    assert exited == {"generation": 1, "exit_code": 3}
    session = host.sessions[client.session_id]
    assert session.kernel_info() == {"state": "exited", "generation": 1, "exit_code": 3}
    again = await client.launch()
    assert again["generation"] == 2
    await client.wait_ready()
    assert await client.evaluate("2 ** 10") == 1024


async def test_launch_failure_is_reported_as_exited_with_error(client):
    await client.connect()
    await client.send_control(
        FrameKind.LAUNCH, {"key": client.key, "signature_scheme": "rot13", "env": {}}
    )
    exited = await client.control(FrameKind.EXITED)
    assert exited["generation"] == 1
    assert exited["exit_code"] is None
    assert "signature_scheme" in exited["error"]


async def test_kernel_environment_is_scrubbed_pinned_and_limited(
    make_host, make_client, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "provider-secret-1")
    monkeypatch.setenv("JUPYTER_IO_SECRET", "provider-secret-2")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    mem_limit = 16 * 1024**3
    host = await make_host(mem_limit=mem_limit)
    client = make_client(host)
    await client.connect()
    started = await client.launch(
        env={
            "MY_SETTING": "42",
            "LD_PRELOAD": "/tmp/evil.so",
            "PYTHONPATH": "/tmp/evil",
            "CUDA_VISIBLE_DEVICES": "0",
            "PATH": "/tmp/evil",
        }
    )
    assert started["ignored_env"] == ["CUDA_VISIBLE_DEVICES", "LD_PRELOAD", "PATH", "PYTHONPATH"]
    await client.wait_ready()
    seen = await client.evaluate(
        "{'env': dict(__import__('os').environ), 'cwd': __import__('os').getcwd(),"
        " 'as': __import__('resource').getrlimit(__import__('resource').RLIMIT_AS),"
        " 'core': __import__('resource').getrlimit(__import__('resource').RLIMIT_CORE),"
        " 'argv': __import__('sys').argv}"
    )
    env = seen["env"]
    workspace = str(host.sessions[client.session_id].workspace)
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "JUPYTER_IO_SECRET" not in env
    assert not any("provider-secret" in value for value in env.values())
    assert env["MY_SETTING"] == "42"
    assert env["LC_ALL"] == "C.UTF-8"
    assert "LD_PRELOAD" not in env and "PYTHONPATH" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["HOME"] == workspace
    assert seen["cwd"] == workspace
    assert seen["as"] == [mem_limit, mem_limit]
    assert seen["core"] == [0, 0]
    # The kernel is in the process group the host signals: the sandbox's (bwrap's) own.
    kernels = [
        pid
        for pid, argv in sandbox_processes(started["pid"])
        if argv[1:3] == ["-m", "provider_host.kernel_launcher"]
    ]
    assert len(kernels) == 1
    assert os.getpgid(kernels[0]) == started["pid"] == os.getpgid(started["pid"])
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != mem_limit  # the host is not limited


async def test_memory_limit_stops_a_runaway_allocation(make_host, make_client):
    host = await make_host(mem_limit=2 * 1024**3)
    client = make_client(host)
    await client.connect()
    await client.launch()
    await client.wait_ready()
    _, reply = await client.execute("x = bytearray(4 * 1024**3)")
    assert reply is not None
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "MemoryError"
