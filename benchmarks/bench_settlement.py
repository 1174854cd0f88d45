"""Escrow payments through the coordinator: lease → escrow → token, and end → settled (issue 4).

One coordinator in escrow mode runs in this process with its embedded ledger (LiteSVM, SQLite
files in a temporary directory, served at ``/solana``), as ``jupyter io coordinator`` does by
default. The provider is the real provider-side link (:class:`provider_host.coordinator_link.
CoordinatorLink`) with the host's real :class:`provider_host.settlement.SettlementBook` and
:class:`provider_host.usage.UsageMeter` (no kernel: metering starts and stops on command). The
user signs REST requests and opens escrows with :class:`jupyter_io.payments.escrow.
EscrowClient` against the coordinator's ``/solana``, as the provisioner does.

Per session, measured in sequence:

1. **lease → token**: ``POST /leases`` (201, no token), the escrow's setup transaction, and
   ``POST /leases/{id}/escrow`` (on-chain verification, the token): each step and the sum;
2. **end → settled**: the provider reports its session ended (final usage report first); the
   coordinator queues the settlement, asks the provider to co-sign over the link, submits,
   and marks it done. Measured with the worker's ``final_report_grace`` at its default (1 s:
   the wait for a late last usage report) and at 0 (what the machinery itself costs).

Prints a table; not a pass/fail test.

    python benchmarks/bench_settlement.py                 # 30 sessions per grace setting
    python benchmarks/bench_settlement.py --sessions 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.leases import verify_token
from jupyter_io.payments.amounts import LAMPORTS_PER_SOL
from jupyter_io.payments.escrow import EscrowClient
from jupyter_io.provider_link import (
    End,
    Inventory,
    OfferGroup,
    SessionEvent,
    SignSettlement,
)
from jupyter_io.signing import sign_request
from provider_host.coordinator_link import CoordinatorLink
from provider_host.settlement import SettlementBook
from provider_host.usage import UsageMeter

PRICE = 3_600_000_000  # 3.6 SOL per GPU-hour: 1,000,000 lamports a second


class Provider:
    """The provider's side: the real link, book and meters; sessions on command."""

    def __init__(self, url: str) -> None:
        self.keypair = Keypair()
        self.book = SettlementBook(self.keypair)
        self.meters: dict[str, UsageMeter] = {}
        link_url = url.replace("http", "ws", 1) + "/api/v1/providers/connect"
        self.link = CoordinatorLink(link_url, self.keypair, self)

    # LinkHost
    def link_inventory(self) -> Inventory:
        offer = OfferGroup("RTX 4090", 24 << 30, 64, tuple(range(64)), PRICE, simulated=True)
        return Inventory("bench", "local", None, 64, (offer,))

    def hosted_leases(self) -> frozenset[str]:
        return frozenset(lease for lease, m in self.meters.items() if not m.stopped)

    def load(self) -> float:
        return 0.0

    def coordinator_pinned(self, coordinator: Pubkey) -> None:
        pass

    def dial(self, message: Any) -> None:
        pass

    def end_lease(self, message: End) -> None:
        pass

    def settle(self, message: SignSettlement) -> None:
        self.link.send(self.book.answer(message, self.link.coordinator))

    # sessions
    def start(self, token: str, user: Pubkey) -> str:
        assert self.link.coordinator is not None
        claims = verify_token(
            token,
            coordinator=self.link.coordinator,
            user=user,
            provider=self.keypair.pubkey(),
            now=time.time(),
        )
        meter = self.meters[claims.lease_id] = UsageMeter(claims.lease_id)
        self.book.admit(claims, meter)
        meter.start()
        self.link.send(SessionEvent(claims.lease_id, "active", time.time()))
        return claims.lease_id

    def end(self, lease: str) -> None:
        meter = self.meters[lease]
        meter.stop()
        self.link.send(meter.report(self.keypair, None))
        self.link.send(SessionEvent(lease, "ended", time.time()))


class User:
    def __init__(self, url: str, solana_url: str) -> None:
        self.url = url
        self.keypair = Keypair()
        self.http = AsyncHTTPClient(force_instance=True)
        self.escrow = EscrowClient.connect(solana_url)

    async def call(self, method: str, path: str, body: object = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        headers = sign_request(self.keypair, method, path, data)
        request = HTTPRequest(self.url + path, method, headers=headers, body=data)
        response = await self.http.fetch(request, raise_error=False)
        answer = json.loads(response.body)
        assert response.code < 300, answer
        return answer


def stats(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * 1e3:8.1f} ms median {p90 * 1e3:8.1f} ms p90"


async def run(sessions: int) -> None:
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-settlement-") as root:
        config = CoordinatorConfig(listen="127.0.0.1:0", data_dir=root, payments="escrow")
        server = CoordinatorServer(config, stdout=io.StringIO())
        await server.startup()
        provider = Provider(server.url)
        provider.link.start()
        await asyncio.wait_for(provider.link.wait_linked(), 30)
        user = User(server.url, server.solana_url)
        await user.escrow.airdrop(user.keypair.pubkey(), 500 * LAMPORTS_PER_SOL)
        await user.escrow.airdrop(provider.keypair.pubkey(), LAMPORTS_PER_SOL)
        worker, registry = server.settlements, server.registry
        assert worker is not None and registry is not None and server.store is not None
        key = str(provider.keypair.pubkey())

        def over(lease: str) -> Callable[[], bool]:
            def check() -> bool:
                state = registry.provider(key)
                return state is None or lease not in state.leases

            return check

        rows: dict[str, list[float]] = {}
        arbiter = server.keypair.pubkey()  # type: ignore[union-attr]
        try:
            for grace in (1.0, 0.0):
                worker.final_report_grace = grace
                for i in range(sessions + 1):  # the first one warms caches: not counted
                    t0 = time.perf_counter()
                    grant = await user.call("POST", "/api/v1/leases", {})
                    t1 = time.perf_counter()
                    receipt = await user.escrow.open_escrow(
                        user.keypair, Pubkey.from_string(grant["provider"]), arbiter,
                        grant["lease"], 60 * PRICE // 3600,
                    )  # fmt: skip
                    t2 = time.perf_counter()
                    funded = await user.call(
                        "POST", f"/api/v1/leases/{grant['lease']}/escrow",
                        {"signature": str(receipt.signature)},
                    )  # fmt: skip
                    t3 = time.perf_counter()
                    lease = provider.start(funded["token"], user.keypair.pubkey())
                    await asyncio.sleep(0)
                    t4 = time.perf_counter()
                    provider.end(lease)
                    await registry.wait_for(over(lease), 30)
                    await asyncio.wait_for(worker.wait_idle(), 60)
                    t5 = time.perf_counter()
                    row = await server.store.get_settlement(lease)
                    assert row is not None and row.state.value == "done", row
                    if i == 0:
                        continue
                    if grace:
                        for name, value in (
                            ("POST /leases (201, no token)", t1 - t0),
                            ("escrow setup transaction (user)", t2 - t1),
                            ("POST /leases/{id}/escrow (verify, token)", t3 - t2),
                            ("lease -> escrow -> token", t3 - t0),
                        ):
                            rows.setdefault(name, []).append(value)
                    rows.setdefault(f"end -> settled (grace {grace:g} s)", []).append(t5 - t4)
        finally:
            await user.escrow.close()
            user.http.close()
            await provider.link.stop()
            await server.shutdown()
    print(
        f"bench_settlement {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
        f"({os.cpu_count()} CPUs), {sessions} sessions per setting, embedded ledger, SQLite"
    )
    for name, values in rows.items():
        print(f"  {name:44s} {stats(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(run(args.sessions))


if __name__ == "__main__":
    main()
