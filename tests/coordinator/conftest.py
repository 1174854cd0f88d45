"""Fixtures for the coordinator's tests: a database URL on SQLite and on a real PostgreSQL.

``store_url`` is parametrized: each test that takes it runs once on a fresh SQLite file and
once on a fresh PostgreSQL database. The PostgreSQL server is, in order of preference:

* the one ``JUPYTER_IO_TEST_POSTGRES_URL`` points at (a role allowed to CREATE DATABASE);
* a throwaway cluster started once per test session from the Debian ``postgresql`` package's
  binaries (``/usr/lib/postgresql/*/bin``), in a temporary directory, listening on
  127.0.0.1 only, trust authentication, stopped and deleted at the end;
* otherwise the PostgreSQL cases are skipped, except when the ``CI`` environment variable is
  set: CI must really run them, so there they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL_ENV = "JUPYTER_IO_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    #: libpq-style URL of a maintenance database (``postgresql://user@host:port/postgres``).
    admin_url: str

    def url_for(self, database: str) -> str:
        """An asyncpg URL for ``database`` on this server."""
        url = make_url(self.admin_url).set(drivername="postgresql+asyncpg", database=database)
        return url.render_as_string(hide_password=False)

    def execute(self, sql: str) -> None:
        """Run one statement on the maintenance database (outside any event loop)."""
        import asyncpg

        dsn = make_url(self.admin_url).set(drivername="postgresql")

        async def run() -> None:
            conn = await asyncpg.connect(dsn.render_as_string(hide_password=False), timeout=10)
            try:
                await conn.execute(sql, timeout=30)
            finally:
                await conn.close()

        # A thread of its own: the test's event loop may be running in this one.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result(timeout=60)


def _postgres_bindir() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _throwaway_cluster(bindir: Path) -> Iterator[str]:
    """initdb + pg_ctl start in a temporary directory; yields the admin URL."""
    root = Path(tempfile.mkdtemp(prefix="jupyter-io-pg-"))
    data, socket_dir, log = root / "data", root / "socket", root / "server.log"
    socket_dir.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        postgres = pwd.getpwnam("postgres")
        for path in (root, socket_dir):
            os.chown(path, postgres.pw_uid, postgres.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*argv: str) -> None:
        result = subprocess.run(
            [*as_user, *argv], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed:\n{result.stdout}{result.stderr}{server_log}")

    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        for attempt in range(3):
            port = _free_port()
            # fsync off: the tests exercise PostgreSQL's locking and SQL, not crash recovery.
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                    "-w", "-t", "60", "start")  # fmt: skip
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see the module docstring)."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield PostgresServer(given)
        return
    bindir = _postgres_bindir()
    if bindir is None:
        message = (
            "PostgreSQL server binaries not found under /usr/lib/postgresql: "
            f"`apt-get install postgresql`, or set {POSTGRES_URL_ENV}"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run the PostgreSQL tests)")
        pytest.skip(message)
    with _throwaway_cluster(bindir) as admin_url:
        yield PostgresServer(admin_url)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, or a fresh database on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    database = f"test_{uuid.uuid4().hex[:16]}"
    server.execute(f'CREATE DATABASE "{database}"')
    try:
        yield server.url_for(database)
    finally:
        server.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
