"""The provider's kernel launcher: iopub output waits for a slow host instead of dropping."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

pytestmark = pytest.mark.timeout(90)

LINES = 6000


@pytest.fixture
async def launched_kernel(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Session]]:
    runtime = Path(tempfile.mkdtemp(prefix="jio-t", dir="/tmp"))
    key = b"launcher-test-key"
    connection_file, _ = write_connection_file(
        str(runtime / "k.json"), transport="ipc", ip=str(runtime / "k"), key=key
    )
    module = request.param
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "-f", connection_file,
        cwd=runtime, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield str(runtime / "k"), Session(key=key)
    finally:
        process.kill()
        await process.wait()
        shutil.rmtree(runtime, ignore_errors=True)


async def _run_with_a_slow_subscriber(base: str, session: Session) -> int:
    """Print LINES lines while the only iopub subscriber is not reading; count what arrives."""
    ctx = zmq.asyncio.Context()
    iopub = ctx.socket(zmq.SUB)
    iopub.rcvhwm = 10  # a host that has fallen behind
    iopub.subscribe(b"")
    iopub.connect(f"ipc://{base}-{_port(base, 'iopub')}")
    shell = ctx.socket(zmq.DEALER)
    shell.connect(f"ipc://{base}-{_port(base, 'shell')}")
    try:
        # Subscribed once kernel_info's status messages reach us.
        while True:
            session.send(shell, "kernel_info_request", {})
            try:
                await asyncio.wait_for(iopub.recv_multipart(), 0.5)
                break
            except TimeoutError:
                continue
        while await iopub.poll(200):
            await iopub.recv_multipart()
        code = f"for i in range({LINES}):\n    print(i, flush=True)"
        sent = session.send(shell, "execute_request", {"code": code, "silent": False})
        msg_id = sent["header"]["msg_id"]
        # The subscriber stays away while the kernel prints (or until it gives up waiting).
        while True:
            try:
                _, reply = session.feed_identities(
                    await asyncio.wait_for(shell.recv_multipart(), 3)
                )
            except TimeoutError:
                break  # the kernel is waiting for the subscriber: good
            if session.deserialize(reply)["parent_header"].get("msg_id") == msg_id:
                break
        text = []
        # Until idle; a stock kernel may have dropped idle too, so silence also ends it.
        while await iopub.poll(5000):
            _, parts = session.feed_identities(await iopub.recv_multipart())
            msg = session.deserialize(parts)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                text.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        return len("".join(text).split())
    finally:
        iopub.close(linger=0)
        shell.close(linger=0)
        ctx.term()


def _port(base: str, channel: str) -> int:
    import json

    return int(json.loads(Path(base).with_name("k.json").read_text())[f"{channel}_port"])


@pytest.mark.parametrize("launched_kernel", ["provider_host.kernel_launcher"], indirect=True)
async def test_no_output_is_dropped_for_a_slow_host(launched_kernel: tuple[str, Session]) -> None:
    base, session = launched_kernel
    assert await _run_with_a_slow_subscriber(base, session) == LINES


@pytest.mark.parametrize("launched_kernel", ["ipykernel_launcher"], indirect=True)
async def test_a_plain_ipykernel_drops_output_for_a_slow_subscriber(
    launched_kernel: tuple[str, Session],
) -> None:
    """Why the launcher exists: the same scenario loses lines with a stock kernel."""
    base, session = launched_kernel
    assert await _run_with_a_slow_subscriber(base, session) < LINES
