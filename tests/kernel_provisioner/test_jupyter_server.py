"""A real Jupyter Server runs an io-remote kernel: a session created over REST, then the
kernel's ``/channels`` websocket spoken the way JupyterLab speaks it (the
``v1.kernel.websocket.jupyter.org`` binary protocol)."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

SERVER_READY_TIMEOUT = 60
KERNEL_WS_PROTOCOL = Subprotocol("v1.kernel.websocket.jupyter.org")


class JupyterServer:
    """A ``jupyter server`` subprocess with a token."""

    def __init__(self, root: Path) -> None:
        self.token = secrets.token_hex(16)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                f"--IdentityProvider.token={self.token}",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.port=0",
                "--ServerApp.port_retries=0",
                "--ServerApp.open_browser=False",
                "--ServerApp.allow_root=True",
                f"--ServerApp.root_dir={root}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.log: list[str] = []
        found: list[int] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
                if match and not found:
                    found.append(int(match.group(1)))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(SERVER_READY_TIMEOUT) or not found:
            self.stop()
            pytest.fail(f"jupyter server did not start:\n{''.join(self.log[-40:])}")
        self.port = found[0]
        self.base = f"http://127.0.0.1:{self.port}"

    async def wait_listening(self, timeout: float = 30) -> None:
        """The URL is logged just before the server listens: probe until it answers."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self.request("GET", "/api/status")
                return
            except ConnectionRefusedError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        response = await AsyncHTTPClient().fetch(
            HTTPRequest(
                f"{self.base}{path}",
                method=method,
                headers={"Authorization": f"token {self.token}"},
                body=None if body is None else json.dumps(body),
                request_timeout=90,
            ),
            raise_error=False,
        )
        assert response.code < 400, (
            f"{method} {path} -> {response.code} {response.body!r}\n{''.join(self.log[-40:])}"
        )
        return json.loads(response.body) if response.body else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def jupyter_server(tmp_path: Path, remote_spec: str) -> Iterator[JupyterServer]:
    root = tmp_path / "notebooks"
    root.mkdir()
    server = JupyterServer(root)
    try:
        yield server
    finally:
        server.stop()


def _message(msg_type: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": session,
            "username": "lab",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
    }


def _encode(msg: dict[str, Any], channel: str) -> bytes:
    return bytes(serialize_msg_to_ws_v1(msg, channel, lambda part: json.dumps(part).encode()))


def _decode(data: bytes) -> tuple[str, dict[str, Any]]:
    channel, parts = deserialize_msg_from_ws_v1(data)
    header, parent, metadata, content = (json.loads(p) for p in parts[:4])
    return channel, {
        "header": header,
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "msg_type": header["msg_type"],
    }


async def test_jupyter_server_session_runs_code_over_the_kernel_websocket(
    jupyter_server: JupyterServer, remote_spec: str, provider_host: Any, processes: Any
) -> None:
    await jupyter_server.wait_listening()
    before = {p.pid for p in provider_host.descendants()}
    model = await jupyter_server.request(
        "POST",
        "/api/sessions",
        {
            "path": "remote.ipynb",
            "name": "remote.ipynb",
            "type": "notebook",
            "kernel": {"name": remote_spec},
        },
    )
    kernel_id = model["kernel"]["id"]
    assert model["kernel"]["name"] == remote_spec
    # The server extension turns on pending kernels: the session is answered while the
    # remote start goes on. The provider's process table has no event to await: poll it.
    deadline = time.monotonic() + 30
    kernel_pids: set[int] = set()
    while not kernel_pids and time.monotonic() < deadline:
        kernel_pids = {p.pid for p in provider_host.descendants()} - before
        await asyncio.sleep(0.05)
    assert kernel_pids, "the server's kernel does not run on the provider host"

    client_session = uuid.uuid4().hex
    url = (
        f"ws://127.0.0.1:{jupyter_server.port}/api/kernels/{kernel_id}/channels"
        f"?session_id={client_session}"
    )
    async with connect(
        url,
        subprotocols=[KERNEL_WS_PROTOCOL],
        additional_headers={"Authorization": f"token {jupyter_server.token}"},
        max_size=None,
    ) as ws:
        assert ws.subprotocol == KERNEL_WS_PROTOCOL

        async def reply_to(msg: dict[str, Any], channel: str = "shell") -> list[Any]:
            """Send ``msg``; gather (channel, message) pairs until both its shell reply and
            its idle status arrived (the two channels are not ordered with each other)."""
            await ws.send(_encode(msg, channel))
            seen = []
            replied = idle = False
            while not (replied and idle):
                raw = await asyncio.wait_for(ws.recv(), 60)
                assert isinstance(raw, bytes)
                chan, got = _decode(raw)
                if got["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                    continue
                seen.append((chan, got))
                replied |= chan == "shell" and got["msg_type"].endswith("_reply")
                idle |= (
                    chan == "iopub"
                    and got["msg_type"] == "status"
                    and got["content"]["execution_state"] == "idle"
                )
            return seen

        # What Lab sends first on a new kernel connection.
        seen = await reply_to(_message("kernel_info_request", {}, client_session))
        [info] = [m for chan, m in seen if chan == "shell"]
        assert info["msg_type"] == "kernel_info_reply"
        assert info["content"]["language_info"]["name"] == "python"

        execute = _message(
            "execute_request",
            {
                "code": "print('hello through the server')",
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            client_session,
        )
        seen = await reply_to(execute)
        streams = [m for chan, m in seen if chan == "iopub" and m["msg_type"] == "stream"]
        assert "".join(m["content"]["text"] for m in streams) == "hello through the server\n"
        [(_, reply)] = [(c, m) for c, m in seen if c == "shell"]
        assert reply["msg_type"] == "execute_reply"
        assert reply["content"]["status"] == "ok"

    await jupyter_server.request("DELETE", f"/api/sessions/{model['id']}")
    for pid in kernel_pids:
        assert await processes.wait_gone(pid, 15), f"kernel process {pid} outlived its session"
    # A pending kernel's shutdown also goes on after the answer: poll the kernel list.
    deadline = time.monotonic() + 15
    kernels = await jupyter_server.request("GET", "/api/kernels")
    while kernels and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        kernels = await jupyter_server.request("GET", "/api/kernels")
    assert kernels == []
