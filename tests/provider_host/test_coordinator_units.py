"""The marketplace side of the host, without sockets: flags and settings, published offers,
the lease token gate, usage metering, the link's outbox."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from traitlets import TraitError

from jupyter_io.errors import AuthError, ConfigError
from jupyter_io.leases import LeaseClaims, issue_token
from jupyter_io.provider_link import (
    Dial,
    End,
    Inventory,
    SessionEvent,
    SignSettlement,
    Usage,
)
from jupyter_io.signing import verify_usage
from provider_host.allocation import GpuPool
from provider_host.config import ProviderConfig
from provider_host.coordinator_link import CoordinatorLink
from provider_host.handshake import Refusal
from provider_host.inventory import CPU_LABEL, Device, offer_groups
from provider_host.inventory import Inventory as HostInventory
from provider_host.lease_gate import LeaseGate
from provider_host.usage import GpuUtilisation, UsageMeter

GIB = 1 << 30


def test_marketplace_flags_fill_the_config(tmp_path: Path) -> None:
    from provider_host.app import ProviderApp

    app = ProviderApp()
    app.initialize([
        "--coordinator", "https://coord.example:8700",
        "--coordinator-pubkey", str(Pubkey.default()),
        "--price", "0.25",
        "--gpu-price", "RTX 4090=0.35", "--gpu-price", "A100=1",
        "--region", "eu-west",
        "--name", "gamer rig",
        "--public-url", "wss://rig.example:8765/tunnel",
        "--usage-interval", "5",
        "--no-benchmark",
    ])  # fmt: skip
    config = ProviderConfig(parent=app)
    assert config.coordinator_url == "https://coord.example:8700"
    assert config.pinned_coordinator() == Pubkey.default()
    assert (config.price, config.model_prices) == ("0.25", ["RTX 4090=0.35", "A100=1"])
    assert (config.region, config.name) == ("eu-west", "gamer rig")
    assert config.public_url == "wss://rig.example:8765/tunnel"
    assert config.usage_interval == 5.0 and config.benchmark is False


def test_prices_are_exact_lamports_per_model() -> None:
    price_of = ProviderConfig(price="0.25", model_prices=["rtx 4090=0.000000001"]).price_of()
    assert price_of("RTX 4090") == 1
    assert price_of("A100") == 250_000_000
    assert price_of(CPU_LABEL) == 250_000_000
    for bad in (
        {"price": "0.0000000001"},
        {"price": "-1"},
        {"price": "cheap"},
        {"model_prices": ["A100"]},
        {"model_prices": ["=1"]},
        {"model_prices": ["A100=x"]},
    ):
        with pytest.raises(ConfigError):
            ProviderConfig(**bad).price_of()


def test_coordinator_and_public_urls_are_checked() -> None:
    assert ProviderConfig().link_url() == ""
    assert (
        ProviderConfig(coordinator_url="http://127.0.0.1:8700").link_url()
        == "ws://127.0.0.1:8700/api/v1/providers/connect"
    )
    assert (
        ProviderConfig(coordinator_url="https://c.example/market/").link_url()
        == "wss://c.example/market/api/v1/providers/connect"
    )
    for bad in ("c.example:8700", "ftp://c.example", "http://"):
        with pytest.raises(TraitError):
            ProviderConfig(coordinator_url=bad)
    with pytest.raises(TraitError):
        ProviderConfig(public_url="http://rig.example/tunnel")
    with pytest.raises(ConfigError):
        ProviderConfig(coordinator_pubkey="not a key").pinned_coordinator()
    assert ProviderConfig().pinned_coordinator() is None


def test_offers_group_gpus_by_model_and_mark_simulated_ones() -> None:
    inventory = HostInventory(
        (
            Device(0, "NVIDIA GeForce RTX 4090", 24 * GIB),
            Device(1, "NVIDIA GeForce RTX 4090", 23 * GIB),
            Device(2, "NVIDIA A100-SXM4-80GB", 80 * GIB),
            Device(3, "L4", 24 * GIB, simulated=True),
            Device(4, "l-4", 24 * GIB, simulated=True),
        ),
        driver="550.54",
        cuda="12.4",
    )
    offers = offer_groups(
        inventory,
        price_of=lambda model: 7 if "A100" in model else 3,
        cpu_slots=8,
        benchmarks={"NVIDIA GeForce RTX 4090": 80.0, "L4": 99.0},
    )
    assert [(o.gpu, o.count, o.gpu_indices, o.vram_bytes) for o in offers] == [
        ("NVIDIA GeForce RTX 4090", 2, (0, 1), 23 * GIB),
        ("NVIDIA A100-SXM4-80GB", 1, (2,), 80 * GIB),
        ("L4", 2, (3, 4), 24 * GIB),
    ]
    rtx, a100, l4 = offers
    assert (rtx.driver, rtx.cuda, rtx.benchmark_tflops, rtx.simulated) == (
        "550.54",
        "12.4",
        80.0,
        False,
    )
    assert (a100.price_lamports_per_hour, a100.benchmark_tflops) == (7, None)
    # A simulated GPU is never benchmarked, nor given the host's driver.
    assert (l4.simulated, l4.benchmark_tflops, l4.driver, l4.cuda) == (True, None, None, None)
    clash = dataclasses.replace(
        inventory, devices=(*inventory.devices, Device(5, "RTX-4090", 24 * GIB, simulated=True))
    )
    with pytest.raises(ConfigError, match="simulated GPU"):
        offer_groups(clash, price_of=lambda model: 1, cpu_slots=1)


def test_a_host_without_gpus_offers_cpu_slots() -> None:
    inventory = HostInventory((Device(0, CPU_LABEL, 0, kind="cpu"),))
    (offer,) = offer_groups(
        inventory, price_of=lambda model: 5, cpu_slots=3, benchmarks={CPU_LABEL: 0.05}
    )
    assert (offer.gpu, offer.count, offer.gpu_indices, offer.vram_bytes) == (
        CPU_LABEL,
        3,
        (0, 1, 2),
        0,
    )
    assert (offer.simulated, offer.benchmark_tflops, offer.price_lamports_per_hour) == (
        False,
        0.05,
        5,
    )
    # Simulated GPUs replace the CPU offer: the host offers GPUs (pretend ones) then.
    simulated = HostInventory((Device(0, "A100", 80 * GIB, simulated=True),))
    assert [o.gpu for o in offer_groups(simulated, price_of=lambda m: 1, cpu_slots=3)] == ["A100"]


def _claims(coordinator: Keypair, provider: Pubkey, user: Pubkey, **kw: object) -> LeaseClaims:
    now = time.time()
    fields: dict[str, object] = {
        "lease_id": "lease-1",
        "user": user,
        "provider": provider,
        "gpu": "A100",
        "gpu_indices": (0,),
        "price_lamports_per_hour": 1,
        "issued_at": now,
        "expires_at": now + 60,
        "coordinator": coordinator.pubkey(),
    }
    fields.update(kw)
    return LeaseClaims(**fields)  # type: ignore[arg-type]


def test_the_gate_checks_tokens_and_binds_each_lease_to_one_session() -> None:
    coordinator, provider, user = Keypair(), Keypair().pubkey(), Keypair().pubkey()
    gate = LeaseGate(provider, devices={0, 1})
    token = issue_token(coordinator, _claims(coordinator, provider, user))
    nobody = lambda lease: None  # noqa: E731

    with pytest.raises(Refusal) as early:  # the coordinator is not known yet
        gate.check_new(token, user=user, live_session_of=nobody)
    assert (early.value.code, early.value.close_code) == ("capacity", 1013)

    gate.pin(coordinator.pubkey())
    claims = gate.check_new(token, user=user, live_session_of=nobody)
    gate.bind(claims, "s1")
    with pytest.raises(Refusal) as replay:
        gate.check_new(token, user=user, live_session_of=nobody)
    assert (replay.value.code, replay.value.close_code) == ("lease_in_use", 1008)
    assert gate.check_resume(token, user=user, session="s1", session_lease="lease-1") == claims
    with pytest.raises(Refusal) as mixed:
        gate.check_resume(token, user=user, session="s1", session_lease="lease-2")
    assert mixed.value.code == "auth"

    other = issue_token(coordinator, _claims(coordinator, provider, user, lease_id="lease-3"))
    with pytest.raises(Refusal) as live:  # a live session the book forgot still counts
        gate.check_new(other, user=user, live_session_of=lambda lease: "s9")
    assert live.value.code == "lease_in_use"

    strange = issue_token(
        coordinator, _claims(coordinator, provider, user, lease_id="x", gpu_indices=(7,))
    )
    with pytest.raises(Refusal, match=r"devices \[7\]"):
        gate.check_new(strange, user=user, live_session_of=nobody)

    gate.end("lease-1")
    assert gate.ended("lease-1")
    for attempt in (
        lambda: gate.check_new(token, user=user, live_session_of=nobody),
        lambda: gate.check_resume(token, user=user, session="s1", session_lease="lease-1"),
    ):
        with pytest.raises(Refusal, match="ended") as over:
            attempt()
        assert over.value.code == "auth"
    with pytest.raises(Refusal, match="send the lease token") as missing:
        gate.check_new(None, user=user, live_session_of=nobody)
    assert missing.value.code == "auth"


def test_usage_counts_whole_seconds_from_kernel_ready_and_is_signed() -> None:
    now = [100.0]
    meter = UsageMeter("lease-1", (0,), clock=lambda: now[0], wall=lambda: 1.7e9)
    assert meter.seconds() == 0 and not meter.started
    now[0] = 150.0
    assert meter.seconds() == 0  # connected, but no kernel yet: nothing delivered
    meter.start()
    now[0] = 162.9
    assert meter.seconds() == 12
    meter.start()  # a kernel restart does not restart the count
    provider = Keypair()
    first = meter.report(provider, 0.25)
    now[0] = 170.2
    meter.stop()
    now[0] = 500.0
    assert meter.seconds() == 20 and meter.stopped
    last = meter.report(provider)
    assert (first["seq"], first["seconds"], first["gpu_utilisation"]) == (1, 12, 0.25)
    assert (last["seq"], last["seconds"], last["gpu_utilisation"]) == (2, 20, None)
    for report in (first, last):
        verify_usage(provider.pubkey(), report)
        assert Usage.parse(report).lease == "lease-1"
    with pytest.raises(AuthError):
        verify_usage(provider.pubkey(), {**last, "seconds": 9999})


def test_gpu_utilisation_is_none_without_devices_or_nvml() -> None:
    reader = GpuUtilisation()
    assert reader(()) is None
    reader.close()


def test_gpu_pool_refuses_a_gpu_held_by_another_session() -> None:
    pool = GpuPool([0, 1, 2])
    pool.hold("a", (1,))
    assert pool.held_by_others((0, 1)) == [1]
    assert pool.acquire("b") == (0,)
    pool.release("a")
    assert pool.held_by_others((1,)) == []
    assert pool.acquire("c") == (1,)


class _Host:
    """The least a link needs of a host, for tests of its queue (no network)."""

    def link_inventory(self) -> Inventory:
        raise AssertionError("not linking in this test")

    def hosted_leases(self) -> frozenset[str]:
        return frozenset()

    def load(self) -> float:
        return 0.0

    def coordinator_pinned(self, coordinator: Pubkey) -> None:
        pass

    def dial(self, message: Dial) -> None:
        pass

    def end_lease(self, message: End) -> None:
        pass

    def settle(self, message: SignSettlement) -> None:
        pass


def test_the_outbox_keeps_order_and_only_the_newest_usage_per_lease() -> None:
    provider = Keypair()
    link = CoordinatorLink("ws://127.0.0.1:1/x", provider, _Host())
    meter = UsageMeter("a", clock=lambda: 0.0)
    link.send(SessionEvent("a", "active", 1.0))
    link.send(meter.report(provider))
    link.send(meter.report(provider))
    link.send(UsageMeter("b").report(provider))
    link.send(SessionEvent("a", "ended", 2.0))
    queued = [text for text, _, _ in link._outbox]
    assert [('"active"' in t, '"seq":2' in t, '"lease":"b"' in t) for t in queued] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, False, False),
    ]
    # A lease whose "ended" has not gone out yet is still listed in the next hello, so the
    # coordinator ends it instead of failing it.
    assert link._pending_ended() == frozenset({"a"})
