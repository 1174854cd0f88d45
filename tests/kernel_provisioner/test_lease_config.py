"""The lease traits of the io-remote provisioner, as a kernelspec sets them: the price cap in
exact lamports, URLs checked before anything starts, what a lease request asks for, and a
coordinator that cannot be reached."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from solders.keypair import Keypair

from jupyter_io.errors import ConfigError, KernelLaunchError
from jupyter_io.identity import write_keypair
from kernel_provisioner.lease import KernelLease, LeaseRefused, LeaseTerms
from kernel_provisioner.provisioner import RemoteKernelProvisioner


@pytest.mark.parametrize(
    ("value", "lamports"),
    [("0.5", 500_000_000), (" 0.12 ", 120_000_000), (0.12, 120_000_000), (2, 2 * 10**9),
     ("0.000000001", 1), ("", None)],
)  # fmt: skip
def test_the_price_cap_becomes_exact_lamports(value: Any, lamports: int | None) -> None:
    prov = RemoteKernelProvisioner(max_price_per_hour=value)
    assert prov.max_price_lamports_per_hour == lamports
    assert prov.lease_terms.max_price_lamports_per_hour == lamports


@pytest.mark.parametrize(
    ("value", "message"),
    [("0.0000000001", "more than 9 decimals"), ("cheap", "not an amount of SOL"),
     ("-1", "non-negative")],
)  # fmt: skip
def test_a_bad_price_cap_is_refused_when_configured(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"max_price_per_hour: .*{message}"):
        RemoteKernelProvisioner(max_price_per_hour=value)


def test_lease_terms_say_what_the_kernelspec_asks_for() -> None:
    prov = RemoteKernelProvisioner(gpu=" RTX 4090 ", min_vram_gb=24, region="eu-west")
    assert prov.lease_terms == LeaseTerms(
        gpu="RTX 4090", min_vram_bytes=24 << 30, max_price_lamports_per_hour=None,
        region="eu-west",
    )  # fmt: skip
    assert RemoteKernelProvisioner().lease_terms == LeaseTerms()
    assert LeaseTerms(gpu="A100", max_price_lamports_per_hour=500_000_000).describe() == (
        "A100, ≤ 0.5 SOL/h"
    )
    with pytest.raises(ConfigError, match="min_vram_gb must not be negative"):
        RemoteKernelProvisioner(min_vram_gb=-1)


def test_the_coordinator_url_must_be_http() -> None:
    assert RemoteKernelProvisioner(coordinator_url="http://h:8700/").coordinator_url == (
        "http://h:8700"
    )
    for bad in ("ws://h:8700", "h:8700", "http://"):
        with pytest.raises(ConfigError, match="must be an http:// or https:// URL"):
            RemoteKernelProvisioner(coordinator_url=bad)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "needs provider_url .* or coordinator_url"),
        ({"provider_url": "ws://h:1/tunnel", "coordinator_url": "http://h:2"}, "not both"),
    ],
)
async def test_a_kernelspec_names_one_place_to_run(config: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        await RemoteKernelProvisioner(**config).pre_launch()


def test_kernel_json_config_reaches_the_provisioner(jupyter_env: Path, kernelspecs: Any) -> None:
    # As Jupyter reads it: JSON numbers and strings from kernel.json become the traits.
    name = kernelspecs.install_lease(
        "typed", "http://127.0.0.1:8700", "/keys/id.json", gpu="A100", max_price_per_hour=0.25,
        min_vram_gb=40, region="us-east",
    )  # fmt: skip
    spec = KernelSpecManager().get_kernel_spec(name)
    km = AsyncKernelManager(kernel_name=name)
    prov = KernelProvisionerFactory.instance().create_provisioner_instance("k1", spec, parent=km)
    assert isinstance(prov, RemoteKernelProvisioner)
    assert (prov.coordinator_url, prov.keypair_path) == ("http://127.0.0.1:8700", "/keys/id.json")
    assert prov.lease_terms == LeaseTerms("A100", 40 << 30, 250_000_000, "us-east")


async def test_an_unreachable_coordinator_fails_the_start_with_what_to_check(
    jupyter_env: Path, kernelspecs: Any, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    user = write_keypair(Keypair(), tmp_path / "user.json")
    name = kernelspecs.install_lease("nowhere", f"http://127.0.0.1:{port}", user, gpu="A100")
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(KernelLaunchError, match="cannot reach the coordinator") as failed:
        await asyncio.wait_for(km.start_kernel(), 30)
    assert not isinstance(failed.value, LeaseRefused)  # not the marketplace's answer
    assert f"127.0.0.1:{port}" in str(failed.value)
    prov = km.provisioner
    assert [e.step.value for e in prov.progress] == ["queued", "failed"]
    assert prov.lease is None and prov.tunnel is None


def test_each_lease_gets_a_payment_hook_paid_by_the_kernelspecs_wallet(tmp_path: Path) -> None:
    """The hook is configured like any Configurable below the provisioner (the server's
    c.SolanaEscrowHook.*), and what the kernelspec fixes wins: the wallet that signs the
    lease pays its escrow, and the kernelspec's budget."""
    from traitlets.config import Config

    from jupyter_io.payments.hooks import FreeHook, SolanaEscrowHook

    path = write_keypair(Keypair(), tmp_path / "id.json")
    config = Config(
        {"SolanaEscrowHook": {"solana_url": "http://ledger:8899", "max_session_hours": 3.0,
                              "keypair_path": "/elsewhere.json"}}
    )  # fmt: skip
    parent = AsyncKernelManager(config=config)
    prov = RemoteKernelProvisioner(parent=parent, keypair_path=str(path))
    assert prov.payment_hook_class is SolanaEscrowHook
    first, second = prov._new_hook(), prov._new_hook()
    assert first is not second, "one hook (one escrow) per lease"
    assert isinstance(first, SolanaEscrowHook)
    assert first.solana_url == "http://ledger:8899" and first.max_session_hours == 3.0
    assert first.keypair_path == str(path)

    budget = RemoteKernelProvisioner(parent=parent, keypair_path=str(path), max_session_hours=0.5)
    assert budget._new_hook().max_session_hours == 0.5  # type: ignore[attr-defined]
    free = RemoteKernelProvisioner(payment_hook_class="jupyter_io.payments.hooks.FreeHook")
    assert isinstance(free._new_hook(), FreeHook)
    with pytest.raises(ConfigError, match="max_session_hours must not be negative"):
        RemoteKernelProvisioner(max_session_hours=-1)


async def test_winding_up_a_lost_lease_gives_up_at_once_without_a_coordinator() -> None:
    # Shutting a kernel down after its provider and the coordinator are both gone must not
    # wait out refund_timeout polling a coordinator that refuses connections.
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    lease = KernelLease(f"http://127.0.0.1:{port}", Keypair(), timeout=5)
    lease.restore(
        {"lease": "gone-lease", "token": "t", "provider": str(Keypair().pubkey()),
         "tunnel_url": "ws://127.0.0.1:1/relay/gone-lease", "relay": True, "gpu": "RTX 4090",
         "gpu_indices": [0], "price_lamports_per_hour": 1, "expires_at": time.time() + 60}
    )  # fmt: skip
    started = time.monotonic()
    try:
        said = await asyncio.wait_for(lease.wind_up_lost(timeout=60), 30)
    finally:
        await lease.close()
    assert time.monotonic() - started < 10
    assert "cannot reach the coordinator" in said and "wallet refund gone-lease" in said
    assert lease.grant is None
