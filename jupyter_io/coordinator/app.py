"""The coordinator's command lines: ``jupyter io coordinator`` and ``jupyter io offers``.

:class:`CoordinatorApp` only builds a :class:`~jupyter_io.coordinator.config.CoordinatorConfig`
(from flags, ``jupyter_io_coordinator_config.py`` files and ``--config``) and hands it to
:class:`~jupyter_io.coordinator.server.CoordinatorServer`::

    jupyter io coordinator                               # 127.0.0.1:8700, SQLite in the data dir
    jupyter io coordinator --listen 0.0.0.0:8700 --public-url https://coord.example:8700 \\
        --certfile cert.pem --keyfile key.pem --db postgresql://coord@db/jupyter_io

:class:`OffersApp` asks a coordinator what is on offer and prints a table (``--json`` for
scripts).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Float, TraitError, Unicode

from .. import __version__
from ..app import IOCommand
from ..coordinator_client import CoordinatorClient
from ..errors import ConfigError
from ..latency import Candidate, LatencyProber, annotate_offers
from ..options import flag_names
from .config import DEFAULT_PORT, CoordinatorConfig
from .offers import format_offers_table
from .server import CoordinatorServer

__all__ = ["CoordinatorApp", "OffersApp"]


class CoordinatorApp(JupyterApp):
    """``jupyter io coordinator``"""

    name = "jupyter-io-coordinator"
    version = __version__
    description = (
        "Run the jupyter-io marketplace coordinator: providers link to it, users lease GPUs "
        "from it, and it relays tunnels to providers nobody can reach directly."
    )
    examples = """jupyter io coordinator
jupyter io coordinator --listen 127.0.0.1:0 --data-dir /tmp/coordinator
jupyter io coordinator --listen 0.0.0.0:8700 --certfile cert.pem --keyfile key.pem"""
    classes = [CoordinatorConfig]
    aliases: dict[Any, Any] = {
        **base_aliases,
        "listen": "CoordinatorConfig.listen",
        "public-url": "CoordinatorConfig.public_url",
        "replica-url": "CoordinatorConfig.replica_url",
        "db": "CoordinatorConfig.db",
        "data-dir": "CoordinatorConfig.data_dir",
        "keypair": "CoordinatorConfig.keypair_path",
        "certfile": "CoordinatorConfig.certfile",
        "keyfile": "CoordinatorConfig.keyfile",
        "heartbeat-interval": "CoordinatorConfig.heartbeat_interval",
        "heartbeat-misses": "CoordinatorConfig.heartbeat_misses",
        "token-ttl": "CoordinatorConfig.token_ttl",
        "claim-window": "CoordinatorConfig.claim_window",
        "max-unfunded-per-key": "CoordinatorConfig.max_unfunded_per_key",
        "max-unfunded-leases": "CoordinatorConfig.max_unfunded_leases",
        "payments": "CoordinatorConfig.payments",
        "solana-url": "CoordinatorConfig.solana_url",
        "gpu-check-interval": "CoordinatorConfig.gpu_check_interval",
    }
    flags = {
        **base_flags,
        "gpu-checks": (
            {"CoordinatorConfig": {"gpu_checks": True}},
            "Challenge providers' GPUs at each link and at random idle times "
            "(docs/gpu-verification.md; the default).",
        ),
        "no-gpu-checks": (
            {"CoordinatorConfig": {"gpu_checks": False}},
            "Do not challenge providers' GPUs: offers are listed on their providers' word.",
        ),
    }
    log_format = Unicode("[%(name)s %(asctime)s %(levelname)s] %(message)s", config=True)

    def start(self) -> None:
        """Build the config and serve until SIGINT/SIGTERM."""
        super().start()
        try:
            config = CoordinatorConfig(parent=self)
        except TraitError as exc:
            self.log.critical("%s", flag_names(str(exc), self.aliases))
            self.exit(1)
        try:
            CoordinatorServer(config, log=self.log).run()
        except ConfigError as exc:
            self.log.critical("%s", exc)
            self.exit(1)


class OffersApp(IOCommand):
    """``jupyter io offers``"""

    name = "jupyter io offers"
    description = (
        "Show the GPUs on offer at a coordinator, by type: available, price min/median in "
        "SOL per GPU-hour, regions, reliability, benchmark, and the best round trip measured "
        "from this machine (pinging each provider, or the relay plus its hop: 'via relay'); "
        "simulated GPUs are marked."
    )
    examples = """jupyter io offers
jupyter io offers --coordinator https://coord.example:8700 --json"""

    coordinator = Unicode(
        f"http://127.0.0.1:{DEFAULT_PORT}", help="The coordinator's http(s)://HOST:PORT."
    ).tag(config=True)
    json_output = Bool(False, help="Print the offers as JSON (for scripts).").tag(config=True)
    timeout = Float(15.0, help="Seconds to wait for the coordinator's answer.").tag(config=True)
    probe = Bool(True, help="Measure the round trip to the providers on offer.").tag(config=True)
    probe_timeout = Float(
        1.0, help="Seconds all latency probes may take together (no answer: unreachable)."
    ).tag(config=True)

    aliases = {
        "coordinator": "OffersApp.coordinator",
        "coordinator-url": "OffersApp.coordinator",
        "timeout": "OffersApp.timeout",
        "probe-timeout": "OffersApp.probe_timeout",
    }
    flags = {
        "json": ({"OffersApp": {"json_output": True}}, "Print the offers as JSON."),
        "no-probe": ({"OffersApp": {"probe": False}}, "Do not measure round trips."),
        "debug": base_flags["debug"],
    }

    def run(self) -> None:
        body = asyncio.run(self._fetch())
        if self.json_output:
            print(json.dumps(body, indent=2))
        else:
            print(format_offers_table(body))

    async def _fetch(self) -> dict[str, Any]:
        async with CoordinatorClient(self.coordinator, timeout=self.timeout) as client:
            body = await client.offers()
        if not self.probe:
            return body
        # Three pings per endpoint, the fastest counting: a one-off command can afford it.
        prober = LatencyProber(timeout=self.probe_timeout, samples=3)
        rows = [r for r in body.get("providers") or [] if isinstance(r, dict)]
        wanted = [Candidate.from_json(r) for r in rows if r.get("free")]
        measured = await prober.measure(wanted, probes=len(wanted))
        types, providers = annotate_offers(body.get("types") or [], rows, measured.get)
        return {**body, "types": types, "providers": providers}
