"""Two real coordinators on one database, and a provider that moves from one to the other:
the goodbye on its old link, and the old coordinator's shutdown, must not take it offline at
the new one (issue 12.4: a second demo's coordinator stopping broke the first demo's)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator.models import ProviderStatus
from jupyter_io.coordinator_client import CoordinatorClient

from .conftest import WAIT, FakeProvider, Starter

pytestmark = pytest.mark.timeout(90)


async def test_a_provider_that_moved_stays_online_when_its_old_coordinator_shuts_down(
    start_coordinator: Starter, providers: list[FakeProvider], store_url: str, tmp_path: Path
) -> None:
    old_home = await start_coordinator(db=store_url, data_dir=str(tmp_path / "a"))
    new_home = await start_coordinator(db=store_url, data_dir=str(tmp_path / "b"))
    assert old_home.registry is not None and new_home.registry is not None
    assert new_home.store is not None
    old_link = FakeProvider(old_home.url)
    providers.append(old_link)
    await old_link.connect()
    await old_home.registry.wait_for(lambda: old_home.registry.provider(old_link.pubkey), WAIT)  # type: ignore[union-attr]

    # The provider links to the other coordinator (same key), then its old link says goodbye.
    new_link = FakeProvider(new_home.url, keypair=old_link.keypair)
    providers.append(new_link)
    await new_link.connect()
    first = await new_home.store.get_provider(new_link.pubkey)
    assert first is not None and first.link_generation == 2  # its second link
    await old_link.close(1000)
    registry = old_home.registry

    def let_go() -> bool:  # on PostgreSQL it stays in the view, as linked at the other one
        state = registry.provider(old_link.pubkey)
        return state is None or state.elsewhere

    await registry.wait_for(let_go, WAIT)
    # Shutting the old coordinator down waits for the goodbye's handling to finish.
    await old_home.shutdown()

    record = await new_home.store.get_provider(new_link.pubkey)
    assert record is not None and record.status is ProviderStatus.ONLINE, record
    async with CoordinatorClient(new_home.url, Keypair(), timeout=WAIT) as user:
        grant = await user.request_lease("RTX 4090")
        assert grant.provider == new_link.pubkey
        await user.end_lease(grant.lease)

    # Its goodbye at the coordinator that holds its link still takes it offline.
    await new_link.close(1000)
    await new_home.registry.wait_for(
        lambda: new_home.registry.stats.providers_offline == 1,  # type: ignore[union-attr]
        WAIT,
    )
    record = await new_home.store.get_provider(new_link.pubkey)
    assert record is not None and record.status is ProviderStatus.OFFLINE


async def test_a_heartbeat_stored_elsewhere_while_a_loss_is_decided_keeps_the_provider_online(
    start_coordinator: Starter, providers: list[FakeProvider], store_url: str, tmp_path: Path
) -> None:
    """The provider falls silent here and, just as this coordinator has read its stored record
    (still stale), another coordinator it relinked to stores a fresh heartbeat: the loss is
    decided in the database, on the stored heartbeat, so it stays online with its lease."""
    # The leader's database sweep (which would find it silent too) is kept out of the way.
    home = await start_coordinator(db=store_url, data_dir=str(tmp_path / "a"), jobs_interval=600)
    registry, store = home.registry, home.store
    assert registry is not None and store is not None
    link = FakeProvider(home.url)
    providers.append(link)
    await link.connect(heartbeats=False)
    await registry.wait_for(lambda: registry.provider(link.pubkey) is not None, WAIT)
    async with CoordinatorClient(home.url, Keypair(), timeout=WAIT) as user:
        grant = await user.request_lease("RTX 4090")

    read = store.get_provider
    beaten: list[datetime] = []

    async def read_then_beat_elsewhere(pubkey: str) -> Any:
        record = await read(pubkey)
        if pubkey == link.pubkey and not beaten:  # the other coordinator's flush lands now
            beaten.append(datetime.now(timezone.utc))
            await store.record_heartbeats({pubkey: beaten[0]})
        return record

    store.get_provider = read_then_beat_elsewhere  # type: ignore[method-assign]

    def decided() -> bool:
        state = registry.provider(link.pubkey)
        gone = state is None or state.elsewhere
        return registry.stats.providers_lost > 0 or (bool(beaten) and gone)

    await registry.wait_for(decided, WAIT)
    store.get_provider = read  # type: ignore[method-assign]

    record = await store.get_provider(link.pubkey)
    assert record is not None and record.status is ProviderStatus.ONLINE, record
    assert record.times_lost == 0 and registry.stats.providers_lost == 0
    lease = await store.get_lease(grant.lease)
    assert lease is not None and lease.live, lease
