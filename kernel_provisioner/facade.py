"""The local ZMQ facade: the five sockets Jupyter clients connect to instead of a kernel.

A remote kernel must look local. :class:`Facade` binds what a kernel would bind, on
127.0.0.1 and random ports: ROUTER sockets for shell, control, stdin and heartbeat, and an
XPUB for iopub. It does not forward anything itself: hand :attr:`Facade.outbound` and
:attr:`Facade.inbound` to a :class:`jupyter_io.bridge.Bridge`, which moves the raw frames
over the tunnel. Frames are never parsed, so the ROUTER's routing identity (the first part)
travels with each request, the remote kernel echoes it, and the reply is routed back to the
client that asked: several clients on one kernel each get their own replies.

One message is the facade's own: the ``iopub_welcome`` of JEP 65. A kernel greets each new
iopub subscription, but the remote kernel only ever sees the provider's subscription, so the
facade answers local subscribers itself, signed with the session key (known once
:meth:`Facade.connection_info` has been asked for).

Call :meth:`Facade.bind` (given the ports of an earlier facade when reattaching, so that
clients' connection files stay valid), then :meth:`Facade.connection_info` for what the
kernel manager writes to the connection file, and :meth:`Facade.close` when the kernel
session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from jupyter_io.errors import ConfigError
from jupyter_io.protocol import Channel

__all__ = ["CHANNEL_PORT_NAMES", "Facade"]

#: The connection-file port name of each channel.
CHANNEL_PORT_NAMES: Mapping[Channel, str] = {
    Channel.SHELL: "shell_port",
    Channel.IOPUB: "iopub_port",
    Channel.STDIN: "stdin_port",
    Channel.CONTROL: "control_port",
    Channel.HB: "hb_port",
}

_SOCKET_TYPES: Mapping[Channel, int] = {
    Channel.SHELL: zmq.ROUTER,
    Channel.IOPUB: zmq.XPUB,
    Channel.STDIN: zmq.ROUTER,
    Channel.CONTROL: zmq.ROUTER,
    Channel.HB: zmq.ROUTER,
}


class Facade:
    """Kernel-shaped ZMQ sockets on 127.0.0.1, owned by one kernel session.

    The facade owns its own :class:`zmq.asyncio.Context` so that closing it never touches
    the kernel manager's sockets. Sockets have no high-water mark on the iopub side, so a
    burst of output (or a large comm buffer) is queued for a slow client rather than dropped.
    """

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.ip = ip
        self.context: zmq.asyncio.Context | None = None
        self.sockets: dict[Channel, zmq.asyncio.Socket] = {}
        self.ports: dict[Channel, int] = {}
        self._drain: asyncio.Task[None] | None = None
        #: Signs the facade's ``iopub_welcome`` messages (None until the key is known).
        self.session: Session | None = None

    @property
    def bound(self) -> bool:
        """True between :meth:`bind` and :meth:`close`."""
        return bool(self.sockets)

    def bind(self, ports: Mapping[Channel, int] | None = None) -> dict[Channel, int]:
        """Bind the five sockets and return their ports.

        ``ports`` asks for specific ports (a reattaching provisioner rebinds the ports the
        connection file names); channels missing from it, or given 0, get a random port.
        Raises :class:`ConfigError` when a requested port is taken. Must be called from the
        event loop that will run the bridge.
        """
        if self.sockets:
            return dict(self.ports)
        ports = dict(ports or {})
        self.context = zmq.asyncio.Context()
        try:
            for channel, kind in _SOCKET_TYPES.items():
                sock = self.context.socket(kind)
                sock.linger = 0
                if kind == zmq.ROUTER:
                    # Replies for a client that went away are dropped, never an error.
                    sock.router_mandatory = False
                else:
                    sock.sndhwm = 0
                    # See every subscription, so that the drain below is the only reader.
                    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
                self.sockets[channel] = sock
                wanted = ports.get(channel, 0)
                if wanted:
                    try:
                        sock.bind(f"tcp://{self.ip}:{wanted}")
                    except zmq.ZMQError as exc:
                        raise ConfigError(
                            f"cannot bind the {channel.name.lower()} port {self.ip}:{wanted} "
                            f"again ({exc}); another process holds it"
                        ) from None
                    self.ports[channel] = wanted
                else:
                    self.ports[channel] = sock.bind_to_random_port(f"tcp://{self.ip}")
        except BaseException:
            self.close()
            raise
        self._drain = asyncio.create_task(self._drain_subscriptions())
        return dict(self.ports)

    @property
    def outbound(self) -> dict[Channel, zmq.asyncio.Socket]:
        """Sockets whose incoming messages go to the kernel (client requests)."""
        return {ch: s for ch, s in self.sockets.items() if ch is not Channel.IOPUB}

    @property
    def inbound(self) -> dict[Channel, zmq.asyncio.Socket]:
        """Sockets that deliver the kernel's messages to clients (all five)."""
        return dict(self.sockets)

    def connection_info(self, key: bytes, kernel_name: str = "") -> dict[str, Any]:
        """The connection info a kernel manager writes for clients of this facade; from
        now on new iopub subscribers are welcomed with messages signed by ``key``."""
        self.set_key(key)
        info: dict[str, Any] = {
            "transport": "tcp",
            "ip": self.ip,
            "key": key,
            "signature_scheme": "hmac-sha256",
            "kernel_name": kernel_name,
        }
        for channel, name in CHANNEL_PORT_NAMES.items():
            info[name] = self.ports[channel]
        return info

    def set_key(self, key: bytes) -> None:
        """Sign ``iopub_welcome`` messages with the session ``key`` (HMAC-SHA256), as the
        kernel signs everything else (a reattaching provisioner passes the saved key)."""
        self.session = Session(key=key, signature_scheme="hmac-sha256", username="jupyter-io")

    async def _drain_subscriptions(self) -> None:
        # A Jupyter client's SUB announces its subscription (b"\x01" + topic). The remote end
        # already subscribes to everything, so nothing goes upstream; each subscription is
        # answered with an iopub_welcome, as ipykernel's XPUB does (an unread XPUB would also
        # queue the announcements forever).
        sock = self.sockets[Channel.IOPUB]
        with contextlib.suppress(zmq.ZMQError, asyncio.CancelledError):
            while True:
                for frame in await sock.recv_multipart():
                    if frame[:1] == b"\x01":
                        await self._welcome(sock, frame[1:])

    async def _welcome(self, sock: zmq.asyncio.Socket, topic: bytes) -> None:
        if self.session is None:
            return
        try:
            subscription = topic.decode()
        except UnicodeDecodeError:
            return
        msg = self.session.msg("iopub_welcome", content={"subscription": subscription})
        frames = self.session.serialize(msg)
        await sock.send_multipart([topic, *frames] if topic else frames)

    def close(self) -> None:
        """Close the sockets and the context (idempotent)."""
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        self.ports.clear()
        if self.context is not None:
            self.context.term()
            self.context = None
