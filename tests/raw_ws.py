"""A raw websocket client for the attack tests: what a stranger can send before authenticating.

:func:`open_raw` opens a TCP connection (from a chosen loopback source address: Linux routes
all of ``127.0.0.0/8`` to loopback, so tests can play many sources) and sends the HTTP
upgrade; :func:`flood` then announces one huge binary frame and streams its payload until the
server closes, reading the server's frames meanwhile, so the sender stops as soon as the peer
gave up instead of pushing the whole payload through loopback. :func:`rss_kib` reads a
process's resident memory from ``/proc``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["RawConnection", "flood", "open_raw", "rss_kib"]

TIMEOUT = 20.0
_ZEROS = bytes(1 << 20)


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """``field_name`` (VmRSS, or VmHWM for the peak) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field_name} in /proc/{pid}/status")


@dataclass
class RawConnection:
    """One raw connection: the HTTP answer to its upgrade, then the server's frames."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    head: str
    body: bytes = b""
    #: ``(opcode, payload)`` of each frame the server sent, in order.
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    #: Set once the server sent a close frame or the TCP connection ended.
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame (None: none came)."""
        for opcode, payload in self.frames:
            if opcode == 0x8 and len(payload) >= 2:
                return int(struct.unpack("!H", payload[:2])[0])
        return None

    @property
    def close_reason(self) -> str:
        for opcode, payload in self.frames:
            if opcode == 0x8:
                return payload[2:].decode(errors="replace")
        return ""

    def start_reading(self) -> None:
        """Read the server's frames in the background (sets :attr:`closed` at the end)."""
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                payload = await self.reader.readexactly(length)
                self.frames.append((head[0] & 0x0F, payload))
                if head[0] & 0x0F == 0x8:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()

    async def wait_closed(self, timeout: float = TIMEOUT) -> None:
        """Until the server closed (a close frame or the end of the TCP connection)."""
        await asyncio.wait_for(self.closed.wait(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def open_raw(
    host: str,
    port: int,
    path: str,
    *,
    source: str = "127.0.0.1",
    headers: Iterable[tuple[str, str]] = (),
    subprotocol: str | None = None,
    upgrade: bool = True,
) -> RawConnection:
    """Connect from ``source`` and (when ``upgrade``) send a websocket upgrade for ``path``;
    return once the server's HTTP answer is read (status 0 when ``upgrade`` is False). The
    frames after a 101 are read in the background."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source, 0), limit=1 << 20), TIMEOUT
    )
    if not upgrade:
        return RawConnection(reader, writer, 0, "")
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *([f"Sec-WebSocket-Protocol: {subprotocol}"] if subprotocol else []),
        *(f"{name}: {value}" for name, value in headers),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    head = raw_head.decode(errors="replace")
    status = int(head.split(" ", 2)[1])
    connection = RawConnection(reader, writer, status, head)
    if status == 101:
        connection.start_reading()
        return connection
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            connection.body = await asyncio.wait_for(
                reader.readexactly(int(value.strip())), TIMEOUT
            )
    return connection


async def flood(connection: RawConnection, size: int = 64 << 20) -> int:
    """Announce one masked binary frame of ``size`` bytes and stream its payload (zeros,
    under a zero mask) until it is all sent or the server closed; returns the bytes sent."""
    writer = connection.writer
    writer.write(bytes((0x82, 0x80 | 127)) + struct.pack("!Q", size) + bytes(4))
    sent = 0
    try:
        while sent < size and not connection.closed.is_set():
            chunk = _ZEROS[: min(len(_ZEROS), size - sent)]
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), TIMEOUT)
            sent += len(chunk)
    except ConnectionError:
        pass
    return sent
