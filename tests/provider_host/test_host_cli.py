"""``python -m provider_host`` as a real process: the listening line, SIGTERM, config errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from solders.keypair import Keypair

from .conftest import TunnelClient, pid_alive, wait_until

pytestmark = pytest.mark.timeout(90)

LISTENING = re.compile(r"^jupyter-io provider listening on (ws://127\.0\.0\.1:(\d+)/tunnel)$")


async def _start_host(*args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_host",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not raw:
            stderr = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"host exited before listening: {lines} {stderr.decode()}")
        lines.append(raw.decode().rstrip("\n"))
        if LISTENING.match(lines[-1]):
            return proc, lines


async def test_sigterm_shuts_down_cleanly_and_leaves_no_kernel(
    tmp_path: Path, client_keypair: Keypair, host_keypair_file: Path, jupyter_env: Path
):
    workspace = tmp_path / "ws"
    other = Keypair()
    proc, lines = await _start_host(
        "--listen",
        "127.0.0.1:0",
        "--allow",
        str(other.pubkey()),
        "--allow",
        str(client_keypair.pubkey()),
        "--keypair",
        str(host_keypair_file),
        "--workspace",
        str(workspace),
        "--simulate-gpu",
        "A100:80",
        "--simulate-gpu",
        "RTX 4090:24",
    )
    try:
        listening = [line for line in lines if line.startswith("jupyter-io provider listening")]
        assert len(listening) == 1
        match = LISTENING.match(listening[0])
        assert match and int(match.group(2)) > 0
        output = "\n".join(lines)
        assert "A100 (simulated), 80.0 GiB" in output
        assert "RTX 4090 (simulated), 24.0 GiB" in output
        assert "cpu (no GPU)" in output or "gpu 0:" in output

        client = TunnelClient(match.group(1), client_keypair)
        await client.connect()  # the second --allow counted too
        started = await client.launch()
        await client.wait_ready()
        session_dir = workspace / str(client.session_id)
        assert session_dir.is_dir()

        proc.send_signal(signal.SIGTERM)
        code, reason = await client.wait_closed()
        assert code == 1001 and "shutting down" in reason
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not pid_alive(started["pid"])
        assert not session_dir.exists()
        stdout_rest = await proc.stdout.read() if proc.stdout else b""
        stderr = await proc.stderr.read() if proc.stderr else b""
        assert client.key not in (stdout_rest + stderr).decode()  # no session key in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_missing_keypair_is_a_clear_error(tmp_path: Path, jupyter_env: Path):
    missing = tmp_path / "nope.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_host",
        "--listen",
        "127.0.0.1:0",
        "--keypair",
        str(missing),
        "--workspace",
        str(tmp_path / "ws"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert str(missing) in stderr.decode()
    assert "solana-keygen" in stderr.decode()
    assert "listening" not in stdout.decode()


async def test_serve_captures_sigterm_and_restores_the_previous_handler(
    tmp_path: Path, client_keypair: Keypair, host_keypair_file: Path
):
    import io

    from provider_host.config import ProviderConfig
    from provider_host.server import ProviderServer

    received: list[int] = []

    def sentinel(signum: int, frame: object) -> None:  # stands in for pytest's own handler
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        out = io.StringIO()
        server = ProviderServer(
            ProviderConfig(
                listen="127.0.0.1:0",
                allow=[str(client_keypair.pubkey())],
                keypair_path=str(host_keypair_file),
                workspace_root=str(tmp_path / "ws"),
            ),
            stdout=out,
        )
        serving = asyncio.create_task(server.serve())
        await asyncio.wait_for(server.started.wait(), 30)
        client = TunnelClient(server.url, client_keypair)
        await client.connect()
        started = await client.launch()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 30)
        assert received == []  # the server's handler took it...
        assert signal.getsignal(signal.SIGTERM) is sentinel  # ...and gave the old one back
        assert not pid_alive(started["pid"])
        assert server.sessions == {}
        lines = out.getvalue().splitlines()
        assert [line for line in lines if "listening on" in line] == [
            f"jupyter-io provider listening on {server.url}"
        ]
        assert lines[-1] == f"jupyter-io provider listening on {server.url}"
        assert f"host key {server.host_keypair.pubkey()}" in lines[0]
        await client.disconnect()
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_kernels_die_with_a_killed_host(
    tmp_path: Path, client_keypair: Keypair, host_keypair_file: Path, jupyter_env: Path
):
    proc, lines = await _start_host(
        "--listen",
        "127.0.0.1:0",
        "--allow",
        str(client_keypair.pubkey()),
        "--keypair",
        str(host_keypair_file),
        "--workspace",
        str(tmp_path / "ws"),
    )
    try:
        match = LISTENING.match(lines[-1])
        assert match
        client = TunnelClient(match.group(1), client_keypair)
        await client.connect()
        started = await client.launch()
        await client.wait_ready()
        proc.kill()  # no chance to clean up
        await proc.wait()
        await wait_until(lambda: not pid_alive(started["pid"]), 10, "the orphaned kernel to die")
        await client.disconnect()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
