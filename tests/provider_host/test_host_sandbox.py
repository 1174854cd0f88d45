"""The session sandbox: from inside a leased kernel, the provider's secrets and other tenants'
data are out of reach (issue 11's attacks, replayed against real bubblewrap and real kernels)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.errors import ConfigError
from jupyter_io.protocol import FrameKind
from provider_host.cgroups import find_cgroup_parent, session_cgroup_name
from provider_host.config import ProviderConfig
from provider_host.isolation import HOST_ENV_ALLOWED
from provider_host.sandbox import GPU_CONTROL_NODES, SandboxPaths, bwrap_argv, sandbox_paths
from provider_host.server import ProviderServer
from provider_host.userpool import SessionUser, UserPool

from .conftest import TunnelClient, pid_alive, wait_until
from .test_host_cli import LISTENING, _start_host

pytestmark = pytest.mark.timeout(60)

_PRELUDE = """
def _jio_try(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError as exc:
        return type(exc).__name__
"""


async def _ready(client: TunnelClient) -> dict:
    await client.connect()
    started = await client.launch()
    await client.wait_ready()
    _, reply = await client.execute(_PRELUDE)
    assert reply is not None and reply["content"]["status"] == "ok", reply
    return started


async def _read(client: TunnelClient, path: str | Path) -> str:
    return str(await client.evaluate(f"_jio_try({str(path)!r})"))


# -- the attacks ---------------------------------------------------------------------------


async def test_a_kernel_cannot_read_the_hosts_environment(
    host_env_secret, client_keypair, host_keypair_file, tmp_path, jupyter_env
):
    # /proc/<pid>/environ shows what a process was started with: a host process, then.
    proc, lines = await _start_host(
        "--listen", "127.0.0.1:0", "--allow", str(client_keypair.pubkey()),
        "--keypair", str(host_keypair_file), "--workspace", str(tmp_path / "ws"),
    )  # fmt: skip
    try:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()  # noqa: ASYNC240
        assert host_env_secret.encode() in environ  # what the attack read
        match = LISTENING.match(lines[-1])
        assert match
        client = TunnelClient(match.group(1), client_keypair)
        await _ready(client)
        parent = await client.evaluate("__import__('os').getppid()")
        assert host_env_secret not in await _read(client, f"/proc/{parent}/environ")
        # Nor anywhere else in the /proc it sees (environ and cmdline of every process).
        leaked = await client.evaluate(
            f"[p for p in __import__('os').listdir('/proc') if p.isdigit() for n in "
            f"('environ', 'cmdline') if {host_env_secret!r} in _jio_try(f'/proc/{{p}}/{{n}}')]"
        )
        assert leaked == []
        assert parent == 1  # its own PID namespace: the host is not in it
        await client.disconnect()
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def test_a_kernel_cannot_read_the_hosts_keypair(host_keypair_file, make_host, make_client):
    host = await make_host()
    client = make_client(host)
    await _ready(client)
    assert host_keypair_file.read_text().startswith("[")  # the host reads it
    assert await _read(client, host_keypair_file) in ("FileNotFoundError", "PermissionError", "")


async def test_sessions_run_as_distinct_uids_and_cannot_read_each_others_workspace(
    make_host, make_client
):
    host = await make_host()
    alice, mallory = make_client(host), make_client(host)
    await _ready(alice)
    await _ready(mallory)
    await alice.evaluate("open('diary.txt', 'w').write('alice-secret') and None")
    alice_ws = host.sessions[alice.session_id].workspace
    assert (alice_ws / "diary.txt").read_text() == "alice-secret"

    assert await _read(mallory, alice_ws / "diary.txt") in ("FileNotFoundError", "PermissionError")
    assert await mallory.evaluate(f"__import__('os').path.exists({str(alice_ws)!r})") is False
    uids = {await c.evaluate("__import__('os').getuid()") for c in (alice, mallory)}
    assert len(uids) == 2 and os.getuid() not in uids


async def test_a_kernel_cannot_read_another_sessions_connection_file(make_host, make_client):
    host = await make_host()
    alice, mallory = make_client(host), make_client(host)
    await _ready(alice)
    await _ready(mallory)
    runtime = host.sessions[alice.session_id].runtime_dir
    assert runtime is not None
    connection = runtime / "kernel.json"
    assert json.loads(connection.read_text())["key"] == alice.key  # what the attack used
    assert await _read(mallory, connection) in ("FileNotFoundError", "PermissionError")
    # Nor its IPC sockets (through which that key ran code in alice's kernel).
    assert await mallory.evaluate(f"__import__('os').path.exists({str(runtime)!r})") is False


async def test_a_workspace_left_by_a_killed_host_is_wiped_at_startup(
    tmp_path: Path,
    client_keypair: Keypair,
    host_keypair_file: Path,
    jupyter_env: Path,
    make_host,
    make_client,
):
    workspaces = tmp_path / "ws"
    proc, lines = await _start_host(
        "--listen", "127.0.0.1:0", "--allow", str(client_keypair.pubkey()),
        "--keypair", str(host_keypair_file), "--workspace", str(workspaces),
    )  # fmt: skip
    try:
        match = LISTENING.match(lines[-1])
        assert match
        first = TunnelClient(match.group(1), client_keypair)
        started = await _ready(first)
        await first.evaluate("open('results.csv', 'w').write('tenant-1-data') and None")
        left = workspaces / str(first.session_id)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        await proc.wait()
        await wait_until(lambda: not pid_alive(started["pid"]), 10, "the orphaned kernel to die")
        await first.disconnect()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (left / "results.csv").read_text() == "tenant-1-data"  # what the killed host left

    # Its session's cgroup too (the host ran in this process's cgroup).
    spot = find_cgroup_parent(_proc("cgroup"), _proc("mountinfo"))
    name = session_cgroup_name(str(first.session_id), proc.pid)
    left_cgroup = None if spot is None else spot.path / name
    left_cgroup_existed = left_cgroup is not None and left_cgroup.is_dir()

    host = await make_host(workspace_root=str(workspaces))
    assert not left.exists()
    if host.cgroups is not None:  # a host that makes cgroups removes a dead host's
        assert left_cgroup_existed and left_cgroup is not None and not left_cgroup.exists()
    second = make_client(host)
    await _ready(second)
    assert await _read(second, left / "results.csv") in ("FileNotFoundError", "PermissionError")


async def test_a_kernel_cannot_make_the_host_write_through_a_link(
    make_host, make_client, tmp_path: Path
):
    # The runtime directory is shared with the kernel (its sockets live there); the host
    # (root) opens the next generation's log there.
    target = tmp_path / "host-owned.conf"
    target.write_text("host data\n")
    host = await make_host()
    client = make_client(host)
    await _ready(client)
    runtime = host.sessions[client.session_id].runtime_dir
    assert runtime is not None
    link = str(runtime / "kernel-2.log")
    await client.evaluate(f"__import__('os').symlink({str(target)!r}, {link!r})")
    await client.launch()  # generation 2
    await client.wait_ready()
    # The kernel's original stdout (ipykernel keeps a copy of it): the log the host opened.
    await client.evaluate(
        "__import__('os').write(__import__('sys').stdout._original_stdstream_copy, b'tenant\\n')"
    )
    assert target.read_text() == "host data\n"


async def test_a_link_planted_at_a_socket_name_does_not_connect_the_host_elsewhere(
    make_host, make_client
):
    # Mallory knows (a stronger attacker than the sandbox allows) where alice's iopub socket
    # is, puts a link to it where her host reconnects, and makes her own kernel exit.
    host = await make_host()
    alice, mallory = make_client(host), make_client(host)
    await _ready(alice)
    await _ready(mallory)
    alice_runtime = host.sessions[alice.session_id].runtime_dir
    mallory_runtime = host.sessions[mallory.session_id].runtime_dir
    assert alice_runtime is not None and mallory_runtime is not None
    iopub = "kernel-ipc-2"
    await mallory.execute(
        f"import os\nos.unlink({str(mallory_runtime / iopub)!r})\n"
        f"os.symlink({str(alice_runtime / iopub)!r}, {str(mallory_runtime / iopub)!r})\n"
        "os._exit(0)",
        wait=False,
    )
    assert (await mallory.control(FrameKind.EXITED))["exit_code"] == 0
    # Alice prints for a while (time enough for many reconnects, every 20 ms).
    msg_id, _ = await alice.execute(
        "import time\nfor _ in range(40):\n    print('alice-secret', flush=True)\n"
        "    time.sleep(0.02)"
    )
    assert any(m["msg_type"] == "stream" for m in await alice.outputs(msg_id))
    leaked = [
        part
        for frame in mallory.raw
        if frame.kind is FrameKind.DATA
        for part in frame.parts
        if b"alice-secret" in part
    ]
    assert leaked == []


# -- what the sandbox promises besides -----------------------------------------------------


async def test_the_kernel_environment_is_the_allow_list_and_nothing_else(
    host_env_secret, make_host, make_client, monkeypatch
):
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    host = await make_host()
    client = make_client(host)
    await _ready(client)
    await client.launch(env={"MY_SETTING": "42"})
    await client.wait_ready()
    # What the kernel process was started with (not what Python changed since).
    names = await client.evaluate(
        "sorted(e.split(b'=', 1)[0].decode() for e in "
        "open('/proc/self/environ', 'rb').read().split(b'\\0') if e)"
    )
    host_names = {n for n in os.environ if n in HOST_ENV_ALLOWED or n.startswith("LC_")}
    session = {"HOME", "PWD", "TMPDIR", "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES"}
    assert set(names) == host_names | session | {"USER", "LOGNAME", "MY_SETTING"}


async def test_limits_hold_inside_the_sandbox(make_host, make_client):
    host = await make_host(
        max_processes=300, max_open_files=512, sandbox_tmpfs_size=8 * 1024 * 1024
    )
    client = make_client(host)
    await _ready(client)
    seen = await client.evaluate(
        "(lambda r, os: {'nproc': r.getrlimit(r.RLIMIT_NPROC), "
        "'nofile': r.getrlimit(r.RLIMIT_NOFILE), "
        "'tmp': os.statvfs('/tmp').f_blocks * os.statvfs('/tmp').f_frsize, "
        "'shm': os.statvfs('/dev/shm').f_blocks * os.statvfs('/dev/shm').f_frsize})"
        "(__import__('resource'), __import__('os'))"
    )
    assert seen == {
        "nproc": [300, 300],
        "nofile": [512, 512],
        "tmp": 8 * 1024 * 1024,
        "shm": 8 * 1024 * 1024,
    }
    _, reply = await client.execute(
        "with open('/tmp/big', 'wb') as f:\n    for _ in range(16):\n        f.write(b'x' * 2**20)"
    )
    assert reply is not None and reply["content"]["ename"] == "OSError"  # ENOSPC at 8 MiB


async def test_a_workspace_growing_past_its_limit_stops_the_kernel(make_host, make_client):
    limit = 1024 * 1024
    host = await make_host(max_workspace_bytes=limit, workspace_check_interval=0.1)
    client = make_client(host)
    await _ready(client)
    # No single file may pass the limit either.
    assert await client.evaluate(
        "__import__('resource').getrlimit(__import__('resource').RLIMIT_FSIZE)"
    ) == [limit, limit]
    await client.execute(
        "for i in range(4):\n    open(f'part{i}', 'wb').write(b'x' * 400_000)", wait=False
    )
    exited = await client.control(FrameKind.EXITED)
    assert exited["exit_code"] == -signal.SIGKILL
    assert "over this host's limit of 1,048,576" in exited["reason"]
    assert "delete files" in exited["reason"]
    # The tenant may start again and clean up: a kernel in a full workspace may shrink it.
    await client.launch()
    await client.wait_ready()
    await client.evaluate("[__import__('os').remove(f'part{i}') for i in range(4)] and None")
    await client.evaluate("open('small', 'w').write('ok')")
    assert host.sessions[client.session_id].kernel_info()["state"] == "running"


def test_only_the_leased_gpus_device_nodes_are_bound():
    paths = SandboxPaths(hidden_dirs=(), software=(), host_dirs=(), host_files=())
    common = {
        "bwrap": "bwrap",
        "paths": paths,
        "workspace": "/srv/ws/s1",
        "runtime_dir": "/tmp/jio-1",
        "user": SessionUser(1_500_000_001, 1_500_000_001, "jio-1500000001"),
        "setpriv": "/usr/bin/setpriv",
        "tmpfs_bytes": 0,
    }

    def bound(argv: list[str]) -> set[str]:
        return {argv[i + 1] for i, a in enumerate(argv) if a == "--dev-bind-try"}

    assert bound(bwrap_argv(gpus=(1, 3), **common)) == {
        "/dev/nvidia1",
        "/dev/nvidia3",
        *GPU_CONTROL_NODES,
    }
    assert bound(bwrap_argv(gpus=(), **common)) == set()  # a CPU session sees no GPU at all
    argv = bwrap_argv(gpus=(0,), **common)
    assert "--dev-bind" not in argv and "--bind" in argv  # nothing of the host's /dev else
    assert argv[argv.index("--dev") + 1] == "/dev"


def test_the_uid_pool_never_hands_out_a_uid_that_is_held(tmp_path: Path):
    locks = tmp_path / "locks"
    here, other_host = UserPool(1_600_000_000, 2, locks), UserPool(1_600_000_000, 2, locks)
    here.prepare()
    first, second = here.acquire(), other_host.acquire()
    assert first.uid != second.uid and first.name == f"jio-{first.uid}"
    with pytest.raises(ConfigError, match="sandbox_uid_count"):
        other_host.acquire()
    here.release(first)
    here.release(first)  # idempotent
    assert other_host.acquire().uid == first.uid


def test_user_namespace_mode_hides_the_host_too(tmp_path: Path):
    """A host that is not root: bwrap's user namespace, with the same hiding (run for real)."""
    secret = tmp_path / "state" / "id.json"
    secret.parent.mkdir()
    secret.write_text("host-key")
    workspace, runtime = tmp_path / "ws" / "s1", tmp_path / "rt"
    workspace.mkdir(parents=True)
    runtime.mkdir()
    paths = sandbox_paths(
        workspace_root=str(tmp_path / "ws"),
        data_dir=str(secret.parent),
        runtime_root=str(tmp_path),
        secret_files=[str(secret)],
    )
    argv = bwrap_argv(
        bwrap="bwrap", paths=paths, workspace=str(workspace), runtime_dir=str(runtime),
        gpus=(), user=None, setpriv=None, tmpfs_bytes=0,
    )  # fmt: skip
    code = (
        "import os, sys\n"
        f"try:\n    open({str(secret)!r}).read(); sys.exit(1)\nexcept OSError:\n    pass\n"
        f"open({str(workspace / 'out')!r}, 'w').write(str(len(os.listdir('/proc'))))\n"
    )
    done = subprocess.run(
        [*argv, sys.executable, "-c", code], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "--unshare-user" in argv and "setpriv" not in " ".join(argv)


def test_an_installation_under_tmp_is_bound_back_into_the_private_tmp(tmp_path: Path):
    """A checkout (and its venv) under /tmp, as a CI clone may be: the sandbox's /tmp is a
    private tmpfs, so the kernel's import paths there must be bound back (run for real)."""
    assert str(tmp_path).startswith("/tmp/")
    site = tmp_path / "checkout" / "site"
    site.mkdir(parents=True)
    (site / "jio_probe.py").write_text("ANSWER = 42\n")
    (tmp_path / "checkout" / "private.txt").write_text("not for kernels")
    workspace, runtime = tmp_path / "ws" / "s1", tmp_path / "rt"
    workspace.mkdir(parents=True)
    runtime.mkdir()
    (tmp_path / "state").mkdir()
    interpreter = [sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent)]
    paths = sandbox_paths(
        workspace_root=str(tmp_path / "ws"),
        data_dir=str(tmp_path / "state"),
        runtime_root="/tmp",  # the host's default: session runtime dirs are /tmp/jio-*
        secret_files=[],
        python_paths=[*interpreter, str(site)],
    )
    assert str(site) in paths.software
    argv = bwrap_argv(
        bwrap="bwrap", paths=paths, workspace=str(workspace), runtime_dir=str(runtime),
        gpus=(), user=None, setpriv=None, tmpfs_bytes=0,
    )  # fmt: skip
    code = (
        f"import os, sys\nsys.path.insert(0, {str(site)!r})\nimport jio_probe\n"
        f"assert not os.path.exists({str(tmp_path / 'checkout' / 'private.txt')!r})\n"
        "print(jio_probe.ANSWER)\n"
    )
    done = subprocess.run(
        [*argv, sys.executable, "-c", code], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip() == b"42"


# -- refusals ------------------------------------------------------------------------------


async def test_isolation_none_is_refused_for_a_host_joined_to_a_coordinator(
    host_keypair_file: Path, workspace_root: Path
):
    config = ProviderConfig(
        listen="127.0.0.1:0",
        keypair_path=str(host_keypair_file),
        workspace_root=str(workspace_root),
        coordinator_url="http://127.0.0.1:9",
        isolation="none",
        benchmark=False,
    )
    server = ProviderServer(config, stdout=io.StringIO())
    with pytest.raises(ConfigError, match="isolation 'none' is refused"):
        await server.startup()
    assert server.url == "" and not server.started.is_set()  # never listened, so never linked


async def test_isolation_none_standalone_says_so_loudly(make_host, make_client, caplog):
    host = await make_host(isolation="none")
    assert host.sandbox is None
    printed = host.stdout.getvalue()
    assert "WARNING: isolation is none" in printed and "own user" in printed
    assert any("isolation is none" in r.getMessage() for r in caplog.records)
    client = make_client(host)
    await _ready(client)
    assert await client.evaluate("__import__('os').getuid()") == os.getuid()


async def test_a_host_without_bwrap_refuses_to_join_and_says_what_to_install(
    host_keypair_file: Path, workspace_root: Path, tmp_path: Path, monkeypatch
):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bubblewrap on this machine
    config = ProviderConfig(
        listen="127.0.0.1:0",
        keypair_path=str(host_keypair_file),
        workspace_root=str(workspace_root),
        coordinator_url="http://127.0.0.1:9",
        benchmark=False,
    )
    server = ProviderServer(config, stdout=io.StringIO())
    with pytest.raises(ConfigError) as refused:
        await server.startup()
    message = str(refused.value)
    assert "refusing to join the marketplace" in message
    assert "apt-get install bubblewrap" in message
    assert server.url == ""


def _proc(name: str) -> str:
    return Path(f"/proc/self/{name}").read_text()


@pytest.fixture
def host_env_secret(monkeypatch) -> str:
    """A secret in the provider host's environment (an API key set for the provider)."""
    secret = "sk-provider-" + os.urandom(8).hex()
    monkeypatch.setenv("PROVIDER_API_KEY", secret)
    return secret
