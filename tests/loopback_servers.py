"""Web servers on loopback that are not jupyter-io's: what a user reaches with a wrong URL.

:func:`strangers` starts one tornado application (no routes: every path is a 404, as on
Jupyter's own port or any other web server) twice on 127.0.0.1, once plain and once behind
TLS with the given certificate. Import it relatively (``from ..loopback_servers import
strangers``) and run it on the test's event loop.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application


@dataclass(frozen=True)
class Strangers:
    #: Port of the plain-HTTP server.
    plain_port: int
    #: Port of the TLS server.
    tls_port: int


@asynccontextmanager
async def strangers(cert: Path, key: Path) -> AsyncIterator[Strangers]:
    """A plain and a TLS web server of no jupyter-io party, for as long as the block runs."""
    app = Application([])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    servers: list[HTTPServer] = []
    ports: list[int] = []
    for options in (None, context):
        server = HTTPServer(app, ssl_options=options)
        sockets = bind_sockets(0, "127.0.0.1")
        server.add_sockets(sockets)
        servers.append(server)
        ports.append(sockets[0].getsockname()[1])
    try:
        yield Strangers(*ports)
    finally:
        for server in servers:
            server.stop()
            await server.close_all_connections()
