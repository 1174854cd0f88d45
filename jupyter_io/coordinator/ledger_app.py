"""``jupyter io ledger``: the embedded ledger on its own, for coordinators that share it.

A coordinator with no ``solana_url`` runs the embedded ledger (LiteSVM, see
:mod:`~jupyter_io.coordinator.embedded_ledger`) inside its own process. Several replicas of
one marketplace (``--db postgresql://...``) must settle on one ledger, so for a local or test
deployment of replicas run the ledger once, here, and give every replica its URL::

    jupyter io ledger                                  # http://127.0.0.1:8899, accounts kept
    jupyter io coordinator --db postgresql://... --solana-url http://127.0.0.1:8899

It serves only the ledger's Solana JSON-RPC (:mod:`~jupyter_io.coordinator.ledger_rpc`, the
same endpoint a coordinator mounts at ``/solana``) at the root path, and keeps the accounts in
a SQLite file of its own (``DATA_DIR/ledger.db``; ``--memory`` for a throw-away ledger). One
process per data directory (a second is refused: two runtimes on one file would fork the
chain). Once listening it prints, flushed, exactly one line
``jupyter-io ledger listening on http://HOST:PORT``; SIGINT/SIGTERM stop it after the request
in flight. ``requestAirdrop`` mints SOL for whoever asks, as on any test ledger: keep it on
loopback (the default) or a trusted network. A production marketplace points its replicas at
a real cluster instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import IO, Any

from jupyter_core.paths import jupyter_data_dir
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets import Bool, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from .. import __version__
from ..app import IOCommand
from ..daemon import Daemon, is_loopback, parse_listen, server_ssl_context
from ..data_lock import DataDirBusy, DataDirLock
from ..errors import ConfigError
from .embedded_ledger import EmbeddedLedger
from .ledger_rpc import ledger_handlers
from .store.ledger_accounts import SqlLedgerStore

__all__ = [
    "DEFAULT_LEDGER_PORT",
    "LEDGER_FILE",
    "LISTENING_PREFIX",
    "LedgerApp",
    "LedgerConfig",
    "LedgerServer",
]

#: The port ``solana-test-validator`` serves its RPC on: the same role, so the same default.
DEFAULT_LEDGER_PORT = 8899
#: The accounts' file in the data directory.
LEDGER_FILE = "ledger.db"
#: Start of the one line printed once the ledger accepts connections.
LISTENING_PREFIX = "jupyter-io ledger listening on "
#: The lock file that keeps a second ledger off the same data directory.
_LOCK_FILE = "ledger.lock"
#: Largest JSON-RPC body taken, bytes: a transaction is at most 1,232 bytes (1,644 in
#: base64) and 100 accounts in one call about 5 KB (the coordinator's ``/solana`` limit).
MAX_BODY_SIZE = 64 * 1024
#: Seconds a body may take to arrive, and a connection may idle or dribble its headers.
BODY_TIMEOUT = 30.0
HEADER_TIMEOUT = 30.0
MAX_HEADER_SIZE = 16 * 1024


class LedgerConfig(Configurable):
    """What ``jupyter io ledger`` needs to know before it listens."""

    listen = Unicode(
        f"127.0.0.1:{DEFAULT_LEDGER_PORT}",
        config=True,
        help="Address to serve the JSON-RPC on, HOST:PORT; port 0 picks a free one. Loopback "
        "unless you say otherwise: anyone who reaches it can airdrop SOL.",
    )
    data_dir = Unicode(config=True, help="Directory of the ledger's accounts file (ledger.db).")
    memory = Bool(
        False, config=True, help="Keep the accounts in memory only (lost when the process ends)."
    )
    certfile = Unicode("", config=True, help="TLS certificate (PEM); serve https when set.")
    keyfile = Unicode("", config=True, help="TLS private key (PEM) for certfile.")

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return str(Path(jupyter_data_dir()) / "io" / "ledger")

    @validate("listen")
    def _validate_listen(self, proposal: dict[str, object]) -> str:
        value = str(proposal["value"])
        try:
            parse_listen(value, example_port=DEFAULT_LEDGER_PORT)
        except ConfigError as exc:
            raise TraitError(str(exc)) from None
        return value

    def ledger_path(self) -> Path:
        """The accounts' SQLite file."""
        return Path(self.data_dir).expanduser() / LEDGER_FILE


class LedgerServer(Daemon):
    """The ledger's lifecycle: :meth:`startup` (lock the data directory, open the accounts,
    listen, print the ready line), :meth:`main_loop` (until :meth:`request_exit` or a
    signal), :meth:`shutdown` (stop accepting, finish the request in flight, close the
    accounts). :meth:`run` does all three under ``asyncio.run``; tests call them directly."""

    def __init__(
        self,
        config: LedgerConfig,
        *,
        log: logging.Logger | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        self.config = config
        self.log = log or logging.getLogger("jupyter_io.ledger")
        self.stdout = stdout or sys.stdout
        #: ``http://HOST:PORT``: what ``AsyncClient`` and ``--solana-url`` take, after startup.
        self.url = ""
        self.ledger: EmbeddedLedger | None = None
        self.should_exit = asyncio.Event()
        self._http: HTTPServer | None = None
        self._lock: DataDirLock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self) -> None:
        """Raises :class:`~jupyter_io.errors.ConfigError` for a bad listen address, TLS files,
        or a data directory another ledger holds (nothing is left open then)."""
        self._loop = asyncio.get_running_loop()
        config = self.config
        host, port = parse_listen(config.listen, example_port=DEFAULT_LEDGER_PORT)
        ssl_context = server_ssl_context(config.certfile, config.keyfile, serves="https")
        store: SqlLedgerStore | None = None
        if not config.memory:
            lock = DataDirLock(config.data_dir, _LOCK_FILE)
            try:
                lock.acquire(pid=os.getpid())
            except DataDirBusy as busy:
                serving = busy.holder.get("url")
                raise ConfigError(
                    f"{busy}{f', a ledger serving {serving}' if serving else ''}: point "
                    "--solana-url at that one, or give this one another --data-dir"
                ) from None
            self._lock = lock
            store = SqlLedgerStore.sqlite(config.ledger_path())
        try:
            sockets = bind_sockets(port, host)
        except OSError as exc:
            self._release()
            raise ConfigError(f"cannot listen on {config.listen}: {exc}") from None
        try:
            self.ledger = await EmbeddedLedger.open(store)
        except BaseException:
            for sock in sockets:
                sock.close()
            self._release()
            raise
        bound = sockets[0].getsockname()
        self.url = _url(host, bound[1], ssl_context is not None)
        self._http = HTTPServer(
            web.Application(ledger_handlers(self.ledger, "/")),
            ssl_options=ssl_context,
            max_body_size=MAX_BODY_SIZE,
            body_timeout=BODY_TIMEOUT,
            idle_connection_timeout=HEADER_TIMEOUT,
            max_header_size=MAX_HEADER_SIZE,
            xheaders=False,
        )
        self._http.add_sockets(sockets)
        if self._lock is not None:
            self._lock.update(url=self.url)
        if not is_loopback(host):
            self.log.warning(
                "the ledger listens on %s: anyone who reaches it can airdrop SOL and send "
                "transactions; keep it on a trusted network",
                host,
            )
        where = "in memory only" if config.memory else str(config.ledger_path())
        self.log.info("ledger accounts: %s", where)
        print(f"{LISTENING_PREFIX}{self.url}", file=self.stdout, flush=True)

    async def shutdown(self) -> None:
        """Stop accepting, close open connections, close the accounts (already durable)."""
        if self._http is not None:
            self._http.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._http.close_all_connections(), 5)
            self._http = None
        if self.ledger is not None:
            await self.ledger.close()
            self.ledger = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class LedgerApp(IOCommand):
    """``jupyter io ledger``"""

    name = "jupyter io ledger"
    version = __version__
    description = (
        "Serve the embedded Solana ledger (LiteSVM) on its own, for coordinator replicas that "
        "share one ledger (--solana-url): JSON-RPC only, accounts in DATA_DIR/ledger.db."
    )
    examples = """jupyter io ledger
jupyter io ledger --listen 127.0.0.1:0 --data-dir /tmp/ledger
jupyter io ledger --memory"""
    classes = [LedgerConfig]
    aliases: dict[Any, Any] = {
        "listen": "LedgerConfig.listen",
        "data-dir": "LedgerConfig.data_dir",
        "certfile": "LedgerConfig.certfile",
        "keyfile": "LedgerConfig.keyfile",
        "log-level": "Application.log_level",
        "config": "JupyterApp.config_file",
    }
    flags: dict[Any, Any] = {
        "memory": (
            {"LedgerConfig": {"memory": True}},
            "Keep the accounts in memory only (a throw-away ledger).",
        ),
        "debug": ({"Application": {"log_level": 10}}, "Log debug messages."),
    }

    def run(self) -> None:
        LedgerServer(LedgerConfig(parent=self), log=self.log).run()


def _url(host: str, port: int, tls: bool) -> str:
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"
