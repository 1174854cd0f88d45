"""untrusted_certificate: a failed certificate check (from a real TLS handshake on loopback)
is recognised, also when wrapped, and nothing else is."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from jupyter_io.tls import untrusted_certificate


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
