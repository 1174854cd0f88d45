"""A provider host started without ``--keypair`` makes its host key in its data dir on the
first start (as sshd makes its host keys), prints it, and reuses it on the next start."""

from __future__ import annotations

import asyncio
import re
import signal
import stat
import sys
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.identity import load_keypair
from provider_host.config import HOST_KEY_FILE

pytestmark = pytest.mark.timeout(90)

HOST_KEY = re.compile(r"^jupyter-io provider host key (\S+)$", re.M)


async def run_host_once(workspace: Path) -> str:
    """Start ``python -m provider_host`` without --keypair until it listens, then SIGTERM it;
    return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_host", "--listen", "127.0.0.1:0",
        "--allow", str(Keypair().pubkey()), "--workspace", str(workspace), "--no-benchmark",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("jupyter-io provider listening on"):
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not raw:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"the host exited: {lines} {err.decode()}")
            lines.append(raw.decode().rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    return "\n".join(lines) + "\n" + rest.decode()


async def test_a_host_without_keypair_creates_its_host_key_once_and_reuses_it(
    tmp_path: Path, jupyter_env: Path
) -> None:
    workspace = tmp_path / "ws"
    key_file = tmp_path / "ws-state" / HOST_KEY_FILE  # data_dir's default: next to workspace
    first = await run_host_once(workspace)
    host_key = HOST_KEY.findall(first)
    assert host_key == [str(load_keypair(key_file).pubkey())], first
    assert f"created its host key {host_key[0]} in {key_file}" in first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700

    second = await run_host_once(workspace)
    assert HOST_KEY.findall(second) == host_key, "the same identity at every start"
    assert "created its host key" not in second
