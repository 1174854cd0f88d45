"""A provider host told a wrong ``--coordinator`` URL says what is wrong in its link error,
within a second or two, instead of retrying in silence or after a handshake timeout: a
plain-HTTP server behind ``https://``, a TLS server behind ``http://``, a web server that is
no coordinator (real servers on loopback; a real in-process provider host)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ..loopback_servers import strangers
from .conftest import HostFactory

#: What "within a second or two" means here, on a loaded machine.
PROMPT_S = 2.5


async def _link_error(make_host: HostFactory, coordinator_url: str) -> tuple[str, float]:
    start = time.monotonic()
    host = await make_host(coordinator_url=coordinator_url, benchmark=False, allow=[])
    link = host.coordinator_link
    assert link is not None
    await asyncio.wait_for(link.wait_for(lambda: link.last_error is not None), 15)
    return link.last_error or "", time.monotonic() - start


@pytest.mark.parametrize(
    ("scheme", "server", "expected"),
    [
        ("https", "plain", "{url} speaks plain HTTP, not TLS: use http://{where} (--coordinator)"),
        ("http", "tls", "{url} speaks TLS, not plain HTTP: use https://{where} (--coordinator)"),
        (
            "http",
            "plain",
            "{url} answered, but it is not a jupyter-io coordinator (HTTP 404); check the "
            "--coordinator URL/port",
        ),
    ],
    ids=["https-to-plain", "http-to-tls", "not-a-coordinator"],
)
async def test_a_wrong_coordinator_url_is_named(
    make_host: HostFactory,
    certificate: tuple[Path, Path],
    scheme: str,
    server: str,
    expected: str,
) -> None:
    async with strangers(*certificate) as web:
        port = web.plain_port if server == "plain" else web.tls_port
        where = f"127.0.0.1:{port}"
        url = f"{scheme}://{where}"
        error, took = await _link_error(make_host, url)
    assert error == expected.format(url=url, where=where)
    assert took < PROMPT_S, f"took {took:.1f} s"
