"""The server extension's REST API against a real coordinator with simulated GPUs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_io.payments.amounts import DEFAULT_SESSION_HOURS
from jupyter_io.serverext.progress import publish_progress
from kernel_provisioner.progress import PROGRESS_ATTR

GIB = 1 << 30
RTX_PRICE = 120_000_000
A100_PRICE = 900_000_000
ENDPOINTS = [
    ("GET", "offers"),
    ("GET", "preferences"),
    ("PUT", "preferences"),
    ("GET", "wallet"),
    ("POST", "wallet/airdrop"),
    ("GET", "sessions"),
    ("GET", "progress"),
    ("GET", "progress/some-kernel"),
]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_every_endpoint_needs_a_logged_in_user(jp_fetch: Any, method: str, path: str) -> None:
    body = None if method == "GET" else "{}"
    response = await jp_fetch(
        "jupyter-io", *path.split("/"), method=method, body=body,
        headers={"Authorization": ""}, raise_error=False,
    )  # fmt: skip
    assert response.code == 403


async def test_every_endpoint_is_authorized_on_the_jupyter_io_resource(
    jp_serverapp: Any, fetch_json: Any
) -> None:
    from jupyter_server.auth.authorizer import Authorizer

    asked: list[tuple[str, str]] = []

    class Deny(Authorizer):
        def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
            asked.append((action, resource))
            return False

    jp_serverapp.web_app.settings["authorizer"] = Deny(parent=jp_serverapp)
    for method, path in ENDPOINTS:
        status, _ = await fetch_json(
            "jupyter-io", *path.split("/"), method=method, body=None if method == "GET" else {}
        )
        assert status == 403, (method, path)
    assert {resource for _, resource in asked} == {"jupyter_io"}
    assert {action for action, _ in asked} == {"read", "write"}


async def test_offers_lists_the_simulated_gpus_of_a_real_coordinator(fetch_json: Any) -> None:
    status, body = await fetch_json("jupyter-io", "offers")
    assert status == 200, body
    types = {row["display"]: row for row in body["types"]}
    assert set(types) == {"RTX 4090", "A100"}
    rtx = types["RTX 4090"]
    assert rtx["vram_bytes"] == 24 * GIB
    assert rtx["price_min"] == RTX_PRICE and types["A100"]["price_min"] == A100_PRICE
    assert (rtx["available"], rtx["total"]) == (1, 1)
    assert rtx["simulated"] is True and rtx["regions"] == ["eu-west"]
    assert rtx["kernel_name"] == "jupyter-io-rtx-4090"
    assert rtx["display_name"] == "RTX 4090 (simulated) · 0.12 SOL/h"
    assert rtx["price_max"] == RTX_PRICE  # one offer: an exact price, not a range
    assert rtx["within_cap"] is True
    assert {row["price_lamports_per_hour"] for row in body["providers"]} == {
        RTX_PRICE,
        A100_PRICE,
    }
    assert body["preferences"]["max_price_per_hour"] is None
    assert body["gpu_kernelspecs"] is True


@pytest.fixture
def io_config(market: Any, user_keypair_path: Path, request: pytest.FixtureRequest) -> Any:
    config = {
        "coordinator_url": market.url,
        "keypair_path": str(user_keypair_path),
        "offers_cache_seconds": 0.0,
    }
    config.update(getattr(request, "param", {}))
    return config


@pytest.mark.parametrize("io_config", [{"offers_cache_seconds": 60.0}], indirect=True)
async def test_offers_are_cached_for_the_configured_seconds(fetch_json: Any, market: Any) -> None:
    _, first = await fetch_json("jupyter-io", "offers")
    await market.provider.shutdown()  # the coordinator forgets it; the cache does not yet
    _, second = await fetch_json("jupyter-io", "offers")
    assert second["fetched_at"] == first["fetched_at"]
    assert len(second["types"]) == 2


@pytest.mark.parametrize(
    "io_config", [{"coordinator_url": f"http://127.0.0.1:{closed_port()}"}], indirect=True
)
async def test_an_unreachable_coordinator_is_a_502_that_says_what_to_do(fetch_json: Any) -> None:
    status, body = await fetch_json("jupyter-io", "offers")
    assert status == 502
    assert "cannot reach the coordinator at http://127.0.0.1:" in body["message"]
    assert "jupyter io coordinator" in body["message"]


@pytest.mark.parametrize("io_config", [{"coordinator_url": ""}], indirect=True)
async def test_no_coordinator_is_a_503_that_names_the_setting(fetch_json: Any) -> None:
    status, body = await fetch_json("jupyter-io", "offers")
    assert status == 503
    assert "--JupyterIOExtension.coordinator_url=" in body["message"]


async def test_preferences_are_validated_stored_and_applied_to_offers(
    fetch_json: Any, jp_data_dir: Path
) -> None:
    status, body = await fetch_json("jupyter-io", "preferences")
    assert status == 200
    assert body == {
        "max_price_per_hour": None,
        "max_price_lamports_per_hour": None,
        "max_price_display": None,
        "region": None,
        "max_latency_ms": None,
        "min_reliability": None,
        # No budget chosen: the default the escrow takes, said as such.
        "session_budget_hours": DEFAULT_SESSION_HOURS,
        "session_budget_default_hours": DEFAULT_SESSION_HOURS,
        "session_budget_is_default": True,
    }
    wanted = {"max_price_per_hour": "0.5", "region": "eu-west", "session_budget_hours": 2}
    status, body = await fetch_json("jupyter-io", "preferences", method="PUT", body=wanted)
    assert status == 200, body
    assert body["max_price_lamports_per_hour"] == 500_000_000
    assert body["max_price_display"] == "0.5 SOL/h"
    assert (body["region"], body["session_budget_hours"]) == ("eu-west", 2)
    stored = json.loads((jp_data_dir / "io" / "preferences.json").read_text())
    assert stored == {"max_price_per_hour": "0.5", "region": "eu-west", "session_budget_hours": 2}

    # A field left out keeps its value; null clears one.
    status, body = await fetch_json(
        "jupyter-io", "preferences", method="PUT", body={"region": None}
    )
    assert (body["max_price_per_hour"], body["region"]) == ("0.5", None)
    assert (body["session_budget_hours"], body["session_budget_is_default"]) == (2, False)
    # A cleared budget is the default again, and the file keeps no number for it.
    _, body = await fetch_json(
        "jupyter-io", "preferences", method="PUT", body={"session_budget_hours": None}
    )
    assert (body["session_budget_hours"], body["session_budget_is_default"]) == (
        DEFAULT_SESSION_HOURS,
        True,
    )
    stored = json.loads((jp_data_dir / "io" / "preferences.json").read_text())
    assert stored["session_budget_hours"] is None

    _, offers = await fetch_json("jupyter-io", "offers")
    within = {row["display"]: row["within_cap"] for row in offers["types"]}
    assert within == {"RTX 4090": True, "A100": False}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"max_price_per_hour": "cheap"}, "max_price_per_hour"),
        ({"max_price_per_hour": "0.0000000001"}, "more than 9 decimals"),
        ({"max_price_per_hour": "0"}, "more than 0 SOL"),
        ({"max_price_per_hour": -1}, "non-negative"),
        ({"region": "eu west!"}, "region must be"),
        ({"session_budget_hours": 0}, "session_budget_hours must be more than 0"),
        ({"session_budget_hours": "2"}, "number of hours"),
        ({"colour": "blue"}, "unknown preference(s) colour"),
        (["max_price_per_hour"], "send a JSON object"),
    ],
)
async def test_invalid_preferences_are_a_400_naming_the_field(
    fetch_json: Any, jp_data_dir: Path, body: Any, words: str
) -> None:
    status, reply = await fetch_json("jupyter-io", "preferences", method="PUT", body=body)
    assert status == 400
    assert words in reply["message"]
    assert not (jp_data_dir / "io" / "preferences.json").exists()


async def test_a_body_that_is_not_json_is_a_400(jp_fetch: Any) -> None:
    response = await jp_fetch(
        "jupyter-io", "preferences", method="PUT", body="{not json", raise_error=False
    )
    assert response.code == 400
    assert "not JSON" in json.loads(response.body)["message"]


async def test_sessions_are_empty_without_remote_kernels(fetch_json: Any) -> None:
    status, body = await fetch_json("jupyter-io", "sessions")
    assert status == 200
    assert body["sessions"] == [] and body["now"] == pytest.approx(time.time(), abs=5)


async def test_progress_comes_from_the_provisioner_log_and_from_the_hook(
    fetch_json: Any, jp_serverapp: Any
) -> None:
    t0 = time.time()
    log = jp_serverapp.log  # the logger a provisioner under this server logs to
    for step, message, extra in [
        ("queued", "asking for RTX 4090", {"gpu": "rtx4090"}),
        ("leased", "leased RTX 4090", {"gpu": "RTX 4090", "price_lamports_per_hour": RTX_PRICE}),
    ]:
        event = {"step": step, "kernel_id": "k-1", "message": message, "at": t0, **extra}
        log.info("jupyter-io: %s", message, extra={PROGRESS_ATTR: event})
        t0 += 1
    publish_progress({"step": "escrowed", "kernel_id": "k-1", "message": "escrow", "at": t0})
    # The same event by both paths is kept once.
    twice = {"step": "launching", "kernel_id": "k-1", "message": "launching", "at": t0 + 1}
    publish_progress(twice)
    log.info("jupyter-io: launching", extra={PROGRESS_ATTR: twice})

    status, body = await fetch_json("jupyter-io", "progress")
    assert status == 200
    (launch,) = body["launches"]
    assert launch["kernel_id"] == "k-1" and launch["state"] == "starting"
    assert [e["step"] for e in launch["events"]] == ["queued", "leased", "escrowed", "launching"]
    assert launch["gpu"] == "RTX 4090" and launch["price_lamports_per_hour"] == RTX_PRICE

    publish_progress({"step": "ready", "kernel_id": "k-1", "message": "ready", "at": t0 + 2})
    _, launch = await fetch_json("jupyter-io", "progress", "k-1")
    assert launch["state"] == "ready" and launch["step"] == "ready"

    # A restart starts a new launch; its history keeps the old one.
    publish_progress({"step": "launching", "kernel_id": "k-1", "message": "again", "at": t0 + 3})
    _, launch = await fetch_json("jupyter-io", "progress", "k-1")
    assert launch["state"] == "starting"
    assert [e["step"] for e in launch["events"]] == ["launching"]
    assert len(launch["history"]) == 6

    _, body = await fetch_json("jupyter-io", "progress", params={"since": str(t0 + 2.5)})
    assert [launch["kernel_id"] for launch in body["launches"]] == ["k-1"]
    _, body = await fetch_json("jupyter-io", "progress", params={"since": str(t0 + 10)})
    assert body["launches"] == []


async def test_progress_of_an_unknown_kernel_is_a_404_and_since_must_be_a_time(
    fetch_json: Any,
) -> None:
    status, body = await fetch_json("jupyter-io", "progress", "nope")
    assert status == 404 and "no start of kernel nope" in body["message"]
    status, body = await fetch_json("jupyter-io", "progress", params={"since": "yesterday"})
    assert status == 400 and "Unix seconds" in body["message"]


async def test_the_log_filter_is_removed_when_the_extension_stops(jp_serverapp: Any) -> None:
    extension = jp_serverapp.extension_manager.extension_points["jupyter_io"].app
    log: logging.Logger = jp_serverapp.log
    assert extension._progress_filter in log.filters
    await extension.stop_extension()
    assert extension._progress_filter not in log.filters
    # It must not see events any more.
    publish_progress({"step": "queued", "kernel_id": "late", "message": "x", "at": 1.0})
    assert extension.progress.launch("late") is None


def _extension(jp_serverapp: Any) -> Any:
    """The server's running JupyterIOExtension."""
    (extension,) = [
        point.app
        for ext in jp_serverapp.extension_manager.extensions.values()
        for point in ext.extension_points.values()
        if point.app is not None and point.app.name == "jupyter_io"
    ]
    return extension


@pytest.mark.parametrize("io_config", [{"offers_cache_seconds": 60.0}], indirect=True)
async def test_a_kernel_starts_step_bumps_the_version_and_the_offers_are_asked_afresh(
    fetch_json: Any, market: Any
) -> None:
    _, first = await fetch_json("jupyter-io", "offers")
    _, sessions = await fetch_json("jupyter-io", "sessions")
    version = sessions["version"]
    await market.provider.shutdown()  # what is free changes at the coordinator
    _, cached = await fetch_json("jupyter-io", "offers")
    assert cached["fetched_at"] == first["fetched_at"]  # cached for 60 s...
    # ... until one of our kernels takes a step (its lease began or ended).
    publish_progress({"step": "leased", "kernel_id": "k-2", "message": "leased", "at": time.time()})
    _, sessions = await fetch_json("jupyter-io", "sessions")
    assert sessions["version"] > version  # the browser's cue to fetch offers and wallet
    _, fresh = await fetch_json("jupyter-io", "offers")
    assert fresh["fetched_at"] > first["fetched_at"] and fresh["types"] == []


async def test_polling_sessions_with_no_remote_kernel_does_not_ask_the_coordinator(
    fetch_json: Any, jp_serverapp: Any
) -> None:
    book = _extension(jp_serverapp).lease_book
    asked = []
    book._refresh._fetch = lambda: asked.append(1) or asyncio.sleep(0)  # count, fetch nothing
    for _ in range(3):
        _, body = await fetch_json("jupyter-io", "sessions")
        assert body["sessions"] == []
    assert asked == []  # the browser polls each second; an idle Lab costs the coordinator nothing
