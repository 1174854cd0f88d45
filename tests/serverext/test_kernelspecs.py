"""GPU kernelspecs: one per GPU type on offer, served next to the installed ones."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from jupyter_io.serverext.kernelspecs import (
    GPUKernelSpecManager,
    display_name,
    spec_name,
    with_price_max,
)

GIB = 1 << 30


def test_names_and_display_names_say_what_the_picker_shows() -> None:
    assert spec_name("RTX 4090") == "jupyter-io-rtx-4090"
    assert spec_name("A100 80GB (SXM4)") == "jupyter-io-a100-80gb-sxm4"
    assert spec_name("cpu (no GPU)") == "jupyter-io-cpu-no-gpu"
    row = {"display": "RTX 4090", "gpu": "rtx4090", "vram_bytes": 24 * GIB, "available": 1,
           "price_min": 120_000_000, "price_median": 120_000_000, "simulated": True}  # fmt: skip
    # Short enough for a launcher tile; a simulated GPU is named as one.
    assert display_name(row) == "RTX 4090 (simulated) · 0.12 SOL/h"
    taken = {**row, "available": 0, "price_min": None, "simulated": False}
    assert display_name(taken) == "RTX 4090 · none free"
    cpu = {"display": "cpu (no GPU)", "gpu": "cpu", "vram_bytes": 8 * GIB, "available": 2,
           "price_min": 10_000_000, "simulated": False}  # fmt: skip
    assert display_name(cpu) == "cpu (no GPU) · 0.01 SOL/h"


def test_from_is_said_only_where_the_price_is_a_range() -> None:
    row = {"display": "A100", "gpu": "a100", "available": 3, "price_min": 900_000_000,
           "price_median": 900_000_000, "simulated": False}  # fmt: skip
    providers = [
        {"gpu": "A100", "free": 1, "price_lamports_per_hour": 900_000_000},
        {"gpu": "A100", "free": 2, "price_lamports_per_hour": 900_000_000},
        {"gpu": "A100", "free": 0, "price_lamports_per_hour": 2_000_000_000},  # taken
    ]
    (same,) = with_price_max([row], providers)
    assert same["price_max"] == 900_000_000
    assert display_name(same) == "A100 · 0.9 SOL/h"
    # Two free at 0.9, one at 1.5: the median is the cheapest, yet the price is a range.
    dearer = [*providers[:2], {"gpu": "A100", "free": 1, "price_lamports_per_hour": 1_500_000_000}]
    (spread,) = with_price_max([row], dearer)
    assert display_name(spread) == "A100 · from 0.9 SOL/h"
    # Without provider rows for the type, a median above the cheapest tells a range.
    assert display_name({**row, "price_median": 1_200_000_000}) == "A100 · from 0.9 SOL/h"


async def test_gpu_kernelspecs_are_listed_next_to_the_installed_ones(
    fetch_json: Any, market: Any, user_keypair_path: Path, jp_serverapp: Any
) -> None:
    assert isinstance(jp_serverapp.kernel_spec_manager, GPUKernelSpecManager)
    assert jp_serverapp.kernel_manager.kernel_spec_manager is jp_serverapp.kernel_spec_manager
    assert jp_serverapp.web_app.settings["kernel_spec_manager"] is jp_serverapp.kernel_spec_manager

    await fetch_json("jupyter-io", "offers")  # what the background refresh does on a server
    status, body = await fetch_json("api", "kernelspecs")
    assert status == 200
    specs = body["kernelspecs"]
    assert {"python3", "echo", "jupyter-io-rtx-4090", "jupyter-io-a100"} <= set(specs)
    assert body["default"] == "python3"
    rtx = specs["jupyter-io-rtx-4090"]
    assert rtx["spec"]["display_name"] == "RTX 4090 (simulated) · 0.12 SOL/h"
    assert rtx["spec"]["language"] == "python"
    provisioner = rtx["spec"]["metadata"]["kernel_provisioner"]
    assert provisioner == {
        "provisioner_name": "io-remote",
        "config": {
            "coordinator_url": market.url,
            "keypair_path": str(user_keypair_path),
            "gpu": "rtx4090",
        },
    }
    assert rtx["spec"]["metadata"]["jupyter_io"]["simulated"] is True
    assert "logo-64x64" in rtx["resources"]  # ipykernel's logos, served by the server

    status, one = await fetch_json("api", "kernelspecs", "jupyter-io-a100")
    assert status == 200 and one["spec"]["display_name"] == "A100 (simulated) · 0.9 SOL/h"


async def test_the_price_cap_and_region_go_into_every_gpu_kernelspec(fetch_json: Any) -> None:
    await fetch_json(
        "jupyter-io", "preferences", method="PUT",
        body={"max_price_per_hour": "0.5", "region": "eu-west"},
    )  # fmt: skip
    await fetch_json("jupyter-io", "offers")
    _, body = await fetch_json("api", "kernelspecs")
    for name in ("jupyter-io-rtx-4090", "jupyter-io-a100"):
        config = body["kernelspecs"][name]["spec"]["metadata"]["kernel_provisioner"]["config"]
        assert (config["max_price_per_hour"], config["region"]) == ("0.5", "eu-west")


async def test_a_gpu_type_no_longer_listed_still_resolves(
    fetch_json: Any, market: Any, jp_serverapp: Any
) -> None:
    await fetch_json("jupyter-io", "offers")
    await market.provider.shutdown()
    ksm = jp_serverapp.kernel_spec_manager
    # Gone from the market: still startable (the coordinator then says what is on offer),
    # and so is a saved notebook's GPU type this server has never seen.
    spec = ksm.get_kernel_spec("jupyter-io-rtx-4090")
    assert spec.metadata["kernel_provisioner"]["config"]["gpu"] == "rtx4090"
    spec = ksm.get_kernel_spec("jupyter-io-h100")
    assert spec.metadata["kernel_provisioner"]["config"]["gpu"] == "h100"
    with pytest.raises(NoSuchKernel):
        ksm.get_kernel_spec("not-a-gpu-kernel")


class CustomKernelSpecManager(KernelSpecManager):
    """Somebody else's kernelspec manager, configured on the server."""


@pytest.fixture
def jp_server_config(io_config: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    server = {"jpserver_extensions": {"jupyter_io": True}, **getattr(request, "param", {})}
    return {"ServerApp": server, "JupyterIOExtension": io_config}


@pytest.fixture
def server_log() -> Any:
    """Every record logged on the server's logger from now on. A filter, not a handler or
    caplog: the server replaces its logger's handlers and stops propagation while it starts."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            records.append(record)
            return True

    logger, keep = logging.getLogger("ServerApp"), Keep()
    logger.addFilter(keep)
    yield records
    logger.removeFilter(keep)


@pytest.mark.parametrize(
    "jp_server_config", [{"kernel_spec_manager_class": CustomKernelSpecManager}], indirect=True
)
async def test_another_kernelspec_manager_is_left_alone_with_a_log_line_saying_why(
    server_log: list[logging.LogRecord], fetch_json: Any, jp_serverapp: Any
) -> None:
    assert type(jp_serverapp.kernel_spec_manager) is CustomKernelSpecManager
    warnings = [r.getMessage() for r in server_log if r.levelno == logging.WARNING]
    assert any(
        "not adding GPU kernelspecs" in text
        and "CustomKernelSpecManager" in text
        and "GPUKernelSpecManager" in text
        for text in warnings
    ), warnings
    _, offers = await fetch_json("jupyter-io", "offers")
    assert offers["gpu_kernelspecs"] is False
    _, body = await fetch_json("api", "kernelspecs")
    assert not any(name.startswith("jupyter-io-") for name in body["kernelspecs"])


@pytest.fixture
def io_config(market: Any, user_keypair_path: Path) -> dict[str, Any]:
    """For every test here; only the refresh test below starts the refresh."""
    return {
        "coordinator_url": market.url,
        "keypair_path": str(user_keypair_path),
        "offers_cache_seconds": 0.0,
        "offers_refresh_seconds": 0.2,
    }


async def test_the_background_refresh_keeps_the_gpu_kernelspecs_in_step_with_the_market(
    fetch_json: Any, jp_serverapp: Any, market: Any
) -> None:
    extension = jp_serverapp.extension_manager.extension_points["jupyter_io"].app
    # Started by the server once its loop runs (pytest-jupyter's server never runs that hook).
    await extension._start_jupyter_server_extension(jp_serverapp)
    try:
        for _ in range(100):
            _, body = await fetch_json("api", "kernelspecs")
            if "jupyter-io-rtx-4090" in body["kernelspecs"]:
                break
            await asyncio.sleep(0.05)
        assert "jupyter-io-rtx-4090" in body["kernelspecs"]
        await market.provider.shutdown()  # its offers leave the market...
        for _ in range(200):
            _, body = await fetch_json("api", "kernelspecs")
            if not any(name.startswith("jupyter-io-") for name in body["kernelspecs"]):
                break
            await asyncio.sleep(0.05)
        # ...and so do its kernelspecs.
        assert not any(name.startswith("jupyter-io-") for name in body["kernelspecs"])
    finally:
        await extension.stop_extension()
    assert extension._refresher is None
