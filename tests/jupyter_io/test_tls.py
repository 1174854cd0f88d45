"""untrusted_certificate: a failed certificate check (from a real TLS handshake on loopback)
is recognised, also when wrapped, and nothing else is. scheme_mismatch and dial_checked: a
URL whose scheme disagrees with its (real, loopback) server is named with its fix, within a
second or two."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest

from jupyter_io.tls import SchemeMismatch, dial_checked, scheme_mismatch, untrusted_certificate

from ..loopback_servers import strangers


async def _handshake_error(cert: Path, key: Path) -> ssl.SSLCertVerificationError:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ssl.SSLCertVerificationError) as raised:
            await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context()), 10
            )
        return raised.value
    finally:
        server.close()
        await server.wait_closed()


async def test_a_self_signed_peer_is_named_with_the_fix(certificate: tuple[Path, Path]) -> None:
    exc = await _handshake_error(*certificate)
    hint = untrusted_certificate(exc)
    assert hint is not None
    assert "not trusted (self-signed certificate)" in hint and "SSL_CERT_FILE" in hint
    try:
        raise RuntimeError("could not connect") from exc
    except RuntimeError as wrapped:
        assert untrusted_certificate(wrapped) == hint


def test_other_errors_are_not_certificate_problems() -> None:
    assert untrusted_certificate(ConnectionRefusedError(111, "Connection refused")) is None
    assert untrusted_certificate(ssl.SSLError("wrong version number")) is None
    assert untrusted_certificate(None) is None


# -- a URL whose scheme disagrees with its server --------------------------------------------


async def test_a_scheme_that_disagrees_with_the_server_is_named_with_the_fix(
    certificate: tuple[Path, Path],
) -> None:
    async with strangers(*certificate) as web:
        plain, tls = web.plain_port, web.tls_port
        assert await scheme_mismatch(f"https://127.0.0.1:{plain}/api") == (
            f"https://127.0.0.1:{plain} speaks plain HTTP, not TLS: use "
            f"http://127.0.0.1:{plain}/api"
        )
        assert await scheme_mismatch(f"ws://127.0.0.1:{tls}/tunnel") == (
            f"ws://127.0.0.1:{tls} speaks TLS, not plain HTTP: use wss://127.0.0.1:{tls}/tunnel"
        )
        # Schemes that fit, and a port nothing listens on, are no mismatch.
        assert await scheme_mismatch(f"http://127.0.0.1:{plain}") is None
        assert await scheme_mismatch(f"wss://127.0.0.1:{tls}") is None
    assert await scheme_mismatch(f"https://127.0.0.1:{plain}") is None


async def test_a_tls_dial_to_a_silent_plain_server_ends_within_a_second_or_two(
    certificate: tuple[Path, Path],
) -> None:
    async with strangers(*certificate) as web:
        url = f"https://127.0.0.1:{web.plain_port}"
        # A TLS handshake with a plain HTTP server: it waits for a request line, in silence.
        handshake = asyncio.open_connection(
            "127.0.0.1", web.plain_port, ssl=ssl.create_default_context()
        )
        start = time.monotonic()
        with pytest.raises(SchemeMismatch, match="speaks plain HTTP, not TLS: use http://"):
            await asyncio.wait_for(dial_checked(url, handshake), 10)
        assert time.monotonic() - start < 2.0
        # A dial that answers is left alone, whatever it returns.
        assert await dial_checked(url, asyncio.sleep(0, "answered")) == "answered"
