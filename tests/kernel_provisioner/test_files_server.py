"""A notebook in a real Jupyter Server, on a remote kernel: data.csv beside it is read
remotely, a large file the kernel writes is held back, then ``jupyter io files pull``
brings it (the extension's /jupyter-io/files endpoints, the CLI as a user runs it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from .test_jupyter_server import KERNEL_WS_PROTOCOL, JupyterServer, _decode, _encode, _message

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


async def _files_status(server: JupyterServer, kernel_id: str, predicate: Any) -> Any:
    """Poll the kernel's sync state until ``predicate`` holds (the REST API has no event)."""
    deadline = time.monotonic() + 30
    while True:
        rows = (await server.request("GET", "/jupyter-io/files"))["kernels"]
        row = next((r for r in rows if r["kernel_id"] == kernel_id), None)
        if row is not None and predicate(row):
            return row
        assert time.monotonic() < deadline, f"sync state never got there: {row}"
        await asyncio.sleep(0.1)


async def test_a_notebook_reads_data_and_pulls_its_model(
    tmp_path: Path, kernelspecs: Any, provider_host: Any
) -> None:
    spec = kernelspecs.install(
        "io-remote-files",
        provider_host.url,
        provider_host.user_keypair_path,
        files_pull_max_size=1000,
    )
    root = tmp_path / "notebooks"
    (root / "project").mkdir(parents=True)
    (root / "project" / "data.csv").write_text("a,b\n1,2\n")
    server = JupyterServer(root)
    try:
        await server.wait_listening()
        model = await server.request(
            "POST",
            "/api/sessions",
            {
                "path": "project/train.ipynb",
                "name": "train.ipynb",
                "type": "notebook",
                "kernel": {"name": spec},
            },
        )
        kernel_id = model["kernel"]["id"]
        row = await _files_status(server, kernel_id, lambda r: r["synced"])
        assert Path(row["root"]) == (root / "project").resolve()

        session = uuid.uuid4().hex
        url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={session}"
        async with connect(
            url,
            subprotocols=[KERNEL_WS_PROTOCOL],
            additional_headers={"Authorization": f"token {server.token}"},
            max_size=None,
        ) as ws:
            code = (
                "print(open('data.csv').read().splitlines()[1])\n"
                "open('model.pt', 'wb').write(b'w' * 5000)"
            )
            execute = _message("execute_request", {"code": code, "silent": False}, session)
            await ws.send(_encode(execute, "shell"))
            out = ""
            replied = idle = False
            # The reply (shell) and the output (iopub) travel apart: both, up to idle.
            while not (replied and idle):
                channel, msg = _decode(await asyncio.wait_for(ws.recv(), 60))
                if msg["parent_header"].get("msg_id") != execute["header"]["msg_id"]:
                    continue
                if msg["msg_type"] == "stream":
                    out += msg["content"]["text"]
                if channel == "shell":
                    assert msg["content"]["status"] == "ok", msg["content"]
                    replied = True
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
        assert out == "1,2\n"

        # 5000 bytes is over this kernelspec's files_pull_max_size: held back, listed.
        row = await _files_status(server, kernel_id, lambda r: r["held_back"])
        assert row["held_back"] == [["model.pt", 5000]]
        assert not (root / "project" / "model.pt").exists()

        cli = [JUPYTER, "io", "files", "--server", server.base, "--token", server.token]
        result = await asyncio.to_thread(
            subprocess.run,
            [*cli[:3], "pull", "model.pt", *cli[3:], "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["written"] == ["model.pt"]
        assert (root / "project" / "model.pt").read_bytes() == b"w" * 5000

        result = await asyncio.to_thread(
            subprocess.run,
            [*cli[:3], "status", *cli[3:]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"kernel {kernel_id}: {(root / 'project').resolve()}" in result.stdout
        assert "not yet here" not in result.stdout
        await server.request("DELETE", f"/api/sessions/{model['id']}")
    finally:
        server.stop()
