"""A lean Jupyter client for benchmarks: raw ZMQ sockets, signing by jupyter_client's Session.

:class:`WireClient` speaks the Jupyter wire protocol to whatever a connection file names (a
local ipykernel or the io-remote provisioner's facade) without jupyter_client's channel
machinery, so the client itself is as small a part of every figure as it can be: it parses
only the header and parent header of each message, and counts the bytes of content and
buffer frames without decoding them. Both kernels of a comparison are measured with the same
client, so its own cost cancels out of the ratios.

Create it with a kernel manager's ``get_connection_info()``, ``await wait_ready()``, then
``await execute(code)``; ``close()`` when done.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

__all__ = ["Execution", "IopubCounter", "WireClient", "endpoint"]

DELIM = b"<IDS|MSG>"


@dataclass
class Execution:
    """Timings of one execute_request (seconds since it was sent)."""

    msg_id: str
    reply: float = 0.0
    idle: float = 0.0
    status: str = ""


@dataclass
class IopubCounter:
    """What arrived on iopub for one request: messages by type and their payload bytes."""

    messages: int = 0
    stream_messages: int = 0
    stream_bytes: int = 0
    #: Newlines in the stream text (``\\n`` escapes in the JSON content): printed lines.
    stream_lines: int = 0
    comm_messages: int = 0
    buffer_bytes: int = 0


def endpoint(info: Mapping[str, Any], port_name: str) -> str:
    """The ZMQ endpoint of one channel of a connection file, written the way jupyter_client
    does for its two transports (``tcp://IP:PORT``, ``ipc://PATH-PORT``)."""
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{info[port_name]}"
    return f"tcp://{info['ip']}:{info[port_name]}"


def _split(parts: list[zmq.Frame]) -> int:
    """Index of the ``<IDS|MSG>`` delimiter among the frames of one message."""
    for i, frame in enumerate(parts):
        buf = frame.buffer
        if len(buf) == len(DELIM) and buf == DELIM:
            return i
    raise ValueError("no <IDS|MSG> delimiter in a Jupyter message")


class WireClient:
    """Shell DEALER + iopub SUB to one kernel (see the module docstring)."""

    def __init__(self, info: Mapping[str, Any], context: zmq.asyncio.Context) -> None:
        key = info["key"]
        self.session = Session(
            key=key if isinstance(key, bytes) else key.encode(),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
        )
        self.shell = context.socket(zmq.DEALER)
        self.shell.linger = 0
        self.shell.connect(endpoint(info, "shell_port"))
        self.iopub = context.socket(zmq.SUB)
        self.iopub.linger = 0
        # Never the client's queue that drops output: a loss must be the kernel's or tunnel's.
        self.iopub.rcvhwm = 0
        self.iopub.subscribe(b"")
        self.iopub.connect(endpoint(info, "iopub_port"))

    def close(self) -> None:
        self.shell.close(linger=0)
        self.iopub.close(linger=0)

    async def send(self, msg_type: str, content: dict[str, Any]) -> str:
        """Sign and send one shell request; return its msg_id."""
        msg = self.session.msg(msg_type, content)
        await self.shell.send_multipart(self.session.serialize(msg))
        return str(msg["header"]["msg_id"])

    async def _shell_reply(self, msg_id: str) -> tuple[dict[str, Any], float]:
        while True:
            parts = await self.shell.recv_multipart(copy=False)
            arrived = time.perf_counter()
            i = _split(parts)
            parent = json.loads(parts[i + 3].bytes)
            if parent.get("msg_id") == msg_id:
                return json.loads(parts[i + 5].bytes), arrived

    async def _iopub_until_idle(self, msg_id: str, counter: IopubCounter | None) -> float:
        """Read iopub until ``status: idle`` for ``msg_id``; return its arrival time."""
        while True:
            parts = await self.iopub.recv_multipart(copy=False)
            arrived = time.perf_counter()
            i = _split(parts)
            header = json.loads(parts[i + 2].bytes)
            msg_type = header["msg_type"]
            if counter is not None:
                counter.messages += 1
                if msg_type == "stream":
                    counter.stream_messages += 1
                    content = parts[i + 5].bytes
                    counter.stream_bytes += len(content)
                    counter.stream_lines += content.count(b"\\n")
                elif msg_type == "comm_msg":
                    counter.comm_messages += 1
                    counter.buffer_bytes += sum(len(f.buffer) for f in parts[i + 6 :])
            if msg_type == "status":
                parent = json.loads(parts[i + 3].bytes)
                if parent.get("msg_id") == msg_id:
                    state = json.loads(parts[i + 5].bytes)["execution_state"]
                    if state == "idle":
                        return arrived

    async def execute(
        self, code: str, counter: IopubCounter | None = None, timeout: float = 120.0
    ) -> Execution:
        """Run ``code``; time the execute_reply and the iopub ``idle`` from the send."""
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        start = time.perf_counter()
        msg_id = await self.send("execute_request", content)
        (reply, replied), idle = await asyncio.wait_for(
            asyncio.gather(self._shell_reply(msg_id), self._iopub_until_idle(msg_id, counter)),
            timeout,
        )
        return Execution(msg_id, replied - start, idle - start, str(reply.get("status")))

    async def late_stream_lines(self, seconds: float) -> int:
        """Stream lines that arrive on iopub within ``seconds`` (after a request went idle)."""
        lines = 0
        deadline = time.perf_counter() + seconds
        while (remaining := deadline - time.perf_counter()) > 0:
            try:
                parts = await asyncio.wait_for(self.iopub.recv_multipart(copy=False), remaining)
            except asyncio.TimeoutError:
                break
            i = _split(parts)
            if json.loads(parts[i + 2].bytes)["msg_type"] == "stream":
                lines += parts[i + 5].bytes.count(b"\\n")
        return lines

    async def kernel_info(self, timeout: float = 60.0, resend: float = 5.0) -> float:
        """Ask kernel_info until a reply comes; return seconds until it did (or raise)."""
        start = time.perf_counter()
        deadline = start + timeout
        while True:
            msg_id = await self.send("kernel_info_request", {})
            try:
                _, arrived = await asyncio.wait_for(self._shell_reply(msg_id), resend)
                return arrived - start
            except asyncio.TimeoutError:
                if time.perf_counter() > deadline:
                    raise TimeoutError("no kernel_info_reply") from None

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until both shell and iopub carry messages (iopub's slow joiner included)."""
        deadline = time.perf_counter() + timeout
        await self.kernel_info(timeout)
        while time.perf_counter() < deadline:
            try:
                await self.execute("None", timeout=1.0)
                return
            except asyncio.TimeoutError:
                continue
        raise TimeoutError("iopub never delivered a status message")
