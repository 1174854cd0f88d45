"""Fixtures for the server extension's tests: a real marketplace and a Jupyter Server with
the ``jupyter_io`` extension, all in this process on loopback.

``market`` is a coordinator (SQLite in ``tmp_path``) with one provider host linked to it that
offers two simulated GPUs (RTX 4090 at 0.12 SOL/h, A100 at 0.9 SOL/h, region eu-west); the
host runs real ipykernels, reached through the coordinator's relay. ``jp_serverapp``
(pytest-jupyter) is a Jupyter Server whose ``JupyterIOExtension`` points at that coordinator
and at ``user_keypair_path``; override ``io_config`` in a test module (or parametrize it
indirectly) to change the extension's traits.

pytest-jupyter's fixtures are imported here, for this package only, without its collection
and call hooks: the suite runs async tests with pytest-asyncio, and the server must live on
the loop the test runs on, so ``jp_asyncio_loop`` is that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_jupyter import jupyter_server as _pytest_jupyter
from solders.keypair import Keypair

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.identity import write_keypair
from provider_host.config import ProviderConfig
from provider_host.server import ProviderServer

# pytest-jupyter's fixtures (jp_serverapp, jp_fetch, jp_environ, ...), not its hooks.
globals().update(
    {
        name: value
        for name, value in vars(_pytest_jupyter).items()
        if (name.startswith(("jp_", "http_server")) or name in ("io_loop", "echo_kernel_spec"))
        and name != "jp_asyncio_loop"
    }
)

WAIT = 20.0
RTX_PRICE = 120_000_000  # 0.12 SOL per GPU-hour, in lamports
A100_PRICE = 900_000_000


@pytest.fixture
async def jp_asyncio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """The loop pytest-asyncio runs this test on: the server is built and cleaned up on it."""
    yield asyncio.get_running_loop()


@dataclass
class Market:
    coordinator: CoordinatorServer
    provider: ProviderServer

    @property
    def url(self) -> str:
        return self.coordinator.url


@contextlib.asynccontextmanager
async def running_market(
    tmp_path: Path, gpus: dict[str, str], **coordinator_traits: Any
) -> AsyncIterator[Market]:
    """A coordinator (``coordinator_traits`` on top of fast test timings) and one provider
    host linked to it, offering one simulated GPU per ``gpus`` entry (model → SOL/h)."""
    coordinator = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            data_dir=str(tmp_path / "coordinator"),
            heartbeat_interval=0.5,
            flush_interval=0.2,
            offers_cache_ttl=0,
            **{"gpu_check_cpu_n": 64, "gpu_check_max_n": 64, **coordinator_traits},
        ),
        stdout=io.StringIO(),
    )
    await coordinator.startup()
    provider = ProviderServer(
        ProviderConfig(
            listen="127.0.0.1:0",
            keypair_path=str(write_keypair(Keypair(), tmp_path / "provider.json")),
            workspace_root=str(tmp_path / "workspaces"),
            coordinator_url=coordinator.url,
            simulate_gpu=[f"{model}:{VRAM_GB[model]}" for model in gpus],
            model_prices=[f"{model}={price}" for model, price in gpus.items()],
            region="eu-west",
            benchmark=False,
            usage_interval=0.5,
        ),
        stdout=io.StringIO(),
    )
    try:
        await provider.startup()
        assert provider.coordinator_link is not None
        await asyncio.wait_for(provider.coordinator_link.wait_linked(), WAIT)
        yield Market(coordinator, provider)
    finally:
        await provider.shutdown()
        await coordinator.shutdown()


#: The simulated GPUs' memory, by model.
VRAM_GB = {"RTX 4090": 24, "A100": 80}


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[Market]:
    """A coordinator and one provider host offering simulated GPUs (see the module doc)."""
    gpus = {"RTX 4090": "0.12", "A100": "0.9"}
    async with running_market(tmp_path, gpus, payments="free") as market:
        yield market


@pytest.fixture
def user_keypair_path(tmp_path: Path) -> Path:
    return write_keypair(Keypair(), tmp_path / "user.json")


@pytest.fixture
def io_config(
    market: Market, user_keypair_path: Path, request: pytest.FixtureRequest
) -> dict[str, Any]:
    """``JupyterIOExtension`` traits for the server under test (parametrize it indirectly
    with a dict of traits to change)."""
    return {
        "coordinator_url": market.url,
        "keypair_path": str(user_keypair_path),
        "offers_cache_seconds": 0.0,
        **getattr(request, "param", {}),
    }


@pytest.fixture
def jp_server_config(io_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_io": True}},
        "JupyterIOExtension": io_config,
    }


@pytest.fixture
def fetch_json(jp_fetch: Any) -> Any:
    """``await fetch_json("jupyter-io", "offers", method=..., body=...)`` →
    ``(status, parsed JSON body)``, without raising on error statuses."""

    async def fetch(*parts: str, **kwargs: Any) -> tuple[int, Any]:
        if kwargs.get("body") is None:
            kwargs.pop("body", None)
        elif not isinstance(kwargs["body"], (str, bytes)):
            kwargs["body"] = json.dumps(kwargs["body"])
        response = await jp_fetch(*parts, raise_error=False, **kwargs)
        return response.code, json.loads(response.body or b"null")

    return fetch
