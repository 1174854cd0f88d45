"""A marketplace behind TLS whose certificate no default trust store knows (self-signed, as
from a private CA): a coordinator subprocess serving https/wss, provider host subprocesses
linked to it, and a user's process leasing a kernel through the relay over wss.

Operators trust such a CA by starting each process with ``SSL_CERT_FILE`` (README, "Run a
coordinator"); without it, every client says what is wrong and what to set, instead of "is
the coordinator running?".
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.errors import TunnelError
from jupyter_io.identity import load_keypair, write_keypair
from kernel_provisioner.connection import TunnelClient
from kernel_provisioner.facade import Facade

from ..loopback_servers import strangers
from .conftest import (
    MARKET_PROVIDER_ARGS,
    ProviderHost,
    start_coordinator_process,
    start_provider_host,
    stop_provider_host,
    wait_for_offers,
)

HINT = "SSL_CERT_FILE"

# The user's side in a process of its own, as Jupyter Server would run it: start a leased
# kernel, run a cell, shut down. Prints the cell's output, or the start's error.
USER = """
import asyncio, sys
from jupyter_client.manager import AsyncKernelManager

async def main():
    km = AsyncKernelManager(kernel_name=sys.argv[1])
    try:
        await asyncio.wait_for(km.start_kernel(), 60)
    except Exception as exc:
        print("start failed:", exc, flush=True)
        sys.exit(3)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        reply = await kc.execute_interactive("print(6 * 7)", timeout=30)
        print("status", reply["content"]["status"], flush=True)
    finally:
        kc.stop_channels()
        await asyncio.wait_for(km.shutdown_kernel(), 30)

asyncio.run(main())
"""


def run_user(kernel_name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", USER, kernel_name],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for_log(host: ProviderHost, text: str, timeout: float = 30.0) -> str:
    """The first stderr line of ``host`` containing ``text`` (lines arrive from a reader
    thread; there is nothing to await)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(host.stderr_lines):
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{host.stderr()}")


def test_a_private_ca_is_trusted_through_ssl_cert_file(
    tmp_path: Path, certificate: tuple[Path, Path], kernelspecs: Any
) -> None:
    cert, key = certificate
    coordinator = start_coordinator_process(
        tmp_path / "coordinator", "--certfile", str(cert), "--keyfile", str(key)
    )
    hosts: list[ProviderHost] = []
    try:
        url = coordinator.public_url
        assert url.startswith("https://127.0.0.1:")
        provider_args = [*MARKET_PROVIDER_ARGS, "--coordinator", url]

        # Not trusted: the provider keeps retrying and says why and what to set.
        hosts.append(start_provider_host(tmp_path / "untrusted", provider_args))
        line = wait_for_log(hosts[-1], HINT)
        assert "certificate is not trusted" in line and "self-signed" in line

        # Trusted through SSL_CERT_FILE: it links and its GPU is on offer.
        trust = {"SSL_CERT_FILE": str(cert)}
        host = start_provider_host(
            tmp_path / "trusted", [*provider_args, "--simulate-gpu", "RTX 4090:24"], env=trust
        )
        hosts.append(host)
        wait_for_offers(url, host.pubkey, context=ssl.create_default_context(cafile=str(cert)))

        user = write_keypair(Keypair(), tmp_path / "user.json")
        name = kernelspecs.install_lease("tls-rtx", url, user, gpu="rtx-4090")

        refused = run_user(name, {})
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "certificate is not trusted" in refused.stdout and HINT in refused.stdout

        # The lease over https and the tunnel through the relay over wss.
        done = run_user(name, trust)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-2:] == ["42", "status ok"]
    finally:
        for host in hosts:
            stop_provider_host(host)
        coordinator.stop()


async def test_a_tunnel_to_an_untrusted_provider_says_what_to_set(
    start_host: Any, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    host = start_host("--certfile", str(cert), "--keyfile", str(key))
    assert host.url.startswith("wss://")
    facade = Facade()
    facade.bind()
    client = TunnelClient(
        host.url,
        load_keypair(host.user_keypair_path),
        outbound=facade.outbound,
        inbound=facade.inbound,
    )
    try:
        with pytest.raises(TunnelError, match="certificate is not trusted") as raised:
            await asyncio.wait_for(client.open(), 30)
        assert HINT in str(raised.value)
    finally:
        await client.close()
        facade.close()


# -- provider URLs as users write them -------------------------------------------------------

#: What "within a second or two" means here, on a loaded machine.
PROMPT_S = 2.5


async def _open_error(url: str, keypair_path: Path) -> tuple[str, float]:
    facade = Facade()
    facade.bind()
    client = TunnelClient(
        url, load_keypair(keypair_path), outbound=facade.outbound, inbound=facade.inbound
    )
    start = time.monotonic()
    try:
        with pytest.raises(TunnelError) as raised:
            await asyncio.wait_for(client.open(), 30)
        return str(raised.value), time.monotonic() - start
    finally:
        await client.close()
        facade.close()


async def test_a_provider_url_without_its_path_reaches_the_tunnel(
    provider_host: ProviderHost, kernelspecs: Any, start_kernel: Any, cells: Any
) -> None:
    url = f"ws://127.0.0.1:{provider_host.port}"
    name = kernelspecs.install("no-path", url, provider_host.user_keypair_path)
    km = await start_kernel(name)
    assert km.provisioner.provider_url == f"{url}/tunnel"
    kc = await cells.connect(km)
    try:
        assert (await cells.run(kc, "print(6 * 7)")).stream() == "42\n"
    finally:
        kc.stop_channels()


async def test_wss_to_a_plain_provider_says_use_ws(provider_host: ProviderHost) -> None:
    url = f"wss://127.0.0.1:{provider_host.port}/tunnel"
    message, took = await _open_error(url, provider_host.user_keypair_path)
    assert message == (
        f"cannot open a tunnel to the provider at {url}: wss://127.0.0.1:{provider_host.port} "
        f"speaks plain HTTP, not TLS: use ws://127.0.0.1:{provider_host.port}/tunnel"
    )
    assert took < PROMPT_S, f"took {took:.1f} s"


async def test_ws_to_a_tls_provider_says_use_wss(
    start_host: Any, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    host = start_host("--certfile", str(cert), "--keyfile", str(key))
    url = f"ws://127.0.0.1:{host.port}/tunnel"
    message, took = await _open_error(url, host.user_keypair_path)
    assert message == (
        f"cannot open a tunnel to the provider at {url}: ws://127.0.0.1:{host.port} speaks "
        f"TLS, not plain HTTP: use wss://127.0.0.1:{host.port}/tunnel"
    )
    assert took < PROMPT_S, f"took {took:.1f} s"


async def test_a_url_of_some_other_server_says_it_is_no_provider(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    keypair = write_keypair(Keypair(), tmp_path / "user.json")
    async with strangers(*certificate) as web:
        url = f"ws://127.0.0.1:{web.plain_port}"
        message, took = await _open_error(url, keypair)
    assert message == (
        f"{url}/tunnel answered, but it is not a jupyter-io provider or relay (HTTP 404); check "
        f"the URL/port (a provider prints it: 'jupyter-io provider listening on "
        f"ws://HOST:PORT/tunnel')"
    )
    assert took < PROMPT_S
