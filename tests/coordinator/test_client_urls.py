"""The coordinator client told a wrong URL says what is wrong, within a second or two: a
plain-HTTP server behind ``https://`` (it would wait out the TLS handshake's timeout), a TLS
server behind ``http://`` (it drops the connection), a web server that is no coordinator
(Jupyter's own port, say), each a real server on loopback. A real coordinator's own errors
are still its own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.coordinator_client import CoordinatorClient, CoordinatorError

from ..loopback_servers import strangers

#: What "within a second or two" means here, on a loaded machine.
PROMPT_S = 2.5


async def _error_of(url: str, *, signed: bool = False) -> tuple[str, float]:
    client = CoordinatorClient(url, Keypair(), timeout=30)
    start = time.monotonic()
    try:
        with pytest.raises(CoordinatorError) as raised:
            if signed:
                await client.request_lease("RTX 4090")
            else:
                await client.offers()
    finally:
        client.close()
    return str(raised.value), time.monotonic() - start


async def test_https_to_a_plain_server_says_use_http(certificate: tuple[Path, Path]) -> None:
    async with strangers(*certificate) as web:
        url = f"https://127.0.0.1:{web.plain_port}"
        message, took = await _error_of(url)
    assert message == (f"{url} speaks plain HTTP, not TLS: use http://127.0.0.1:{web.plain_port}")
    assert took < PROMPT_S, f"took {took:.1f} s"


async def test_http_to_a_tls_server_says_use_https(certificate: tuple[Path, Path]) -> None:
    async with strangers(*certificate) as web:
        url = f"http://127.0.0.1:{web.tls_port}"
        message, took = await _error_of(url)
    assert message == f"{url} speaks TLS, not plain HTTP: use https://127.0.0.1:{web.tls_port}"
    assert took < PROMPT_S, f"took {took:.1f} s"


@pytest.mark.parametrize("signed", [False, True], ids=["offers", "lease request"])
async def test_a_server_that_is_no_coordinator_is_named(
    certificate: tuple[Path, Path], signed: bool
) -> None:
    async with strangers(*certificate) as web:
        url = f"http://127.0.0.1:{web.plain_port}"
        message, took = await _error_of(url, signed=signed)
    assert message == (
        f"{url} answered, but it is not a jupyter-io coordinator (GET /api/v1/info: HTTP 404); "
        f"check the URL/port"
    )
    assert took < PROMPT_S


async def test_a_real_coordinators_errors_stay_its_own(coordinator: CoordinatorServer) -> None:
    client = CoordinatorClient(coordinator.url, Keypair(), timeout=10)
    try:
        assert "types" in await client.offers()
        with pytest.raises(CoordinatorError) as raised:
            await client.get_lease("0" * 32)
    finally:
        client.close()
    assert "not a jupyter-io coordinator" not in str(raised.value)
    assert raised.value.status == 404
