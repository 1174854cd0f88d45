"""The ``jupyter io provider`` command line: parse flags into a config, run the server.

:class:`ProviderApp` only builds a :class:`~provider_host.config.ProviderConfig` (from flags,
``jupyter_io_provider_config.py`` files and ``--config``) and hands it to
:class:`~provider_host.server.ProviderServer`. Run it as ``python -m provider_host`` or
``jupyter io provider``::

    python -m provider_host --listen 127.0.0.1:0 --allow PUBKEY --keypair id.json \\
        --workspace /srv/jupyter-io
    jupyter io provider --coordinator http://127.0.0.1:8700 --price 0.25 --region eu-west \\
        --simulate-gpu "RTX 4090:24"
"""

from __future__ import annotations

import sys
from typing import Any

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import TraitError, Unicode

from jupyter_io import __version__
from jupyter_io.errors import ConfigError
from jupyter_io.options import flag_names

from .config import ProviderConfig
from .server import ProviderServer

__all__ = ["ProviderApp", "main"]

_aliases: dict[Any, Any] = {
    **base_aliases,
    "listen": "ProviderConfig.listen",
    "allow": "ProviderConfig.allow",
    "allow-file": "ProviderConfig.allow_file",
    "keypair": "ProviderConfig.keypair_path",
    "data-dir": "ProviderConfig.data_dir",
    "certfile": "ProviderConfig.certfile",
    "keyfile": "ProviderConfig.keyfile",
    "workspace": "ProviderConfig.workspace_root",
    "grace-period": "ProviderConfig.grace_period",
    "max-sessions": "ProviderConfig.max_sessions",
    "mem-limit": "ProviderConfig.mem_limit",
    "session-memory-limit": "ProviderConfig.session_memory_limit",
    "cgroup-root": "ProviderConfig.cgroup_root",
    "simulate-gpu": "ProviderConfig.simulate_gpu",
    "coordinator": "ProviderConfig.coordinator_url",
    "coordinator-url": "ProviderConfig.coordinator_url",  # the trait's (and kernel.json's) name
    "coordinator-pubkey": "ProviderConfig.coordinator_pubkey",
    "price": "ProviderConfig.price",
    "gpu-price": "ProviderConfig.model_prices",
    "region": "ProviderConfig.region",
    "name": "ProviderConfig.name",
    "public-url": "ProviderConfig.public_url",
    "usage-interval": "ProviderConfig.usage_interval",
    "isolation": "ProviderConfig.isolation",
    "environment-pip-arg": "ProviderConfig.environment_pip_args",
    "environment-cache": "ProviderConfig.environment_cache_count",
    "environment-build-timeout": "ProviderConfig.environment_build_timeout",
    "environment-max-bytes": "ProviderConfig.environment_max_bytes",
}

_flags: dict[Any, Any] = {
    **base_flags,
    "no-benchmark": (
        {"ProviderConfig": {"benchmark": False}},
        "Publish no benchmark (skip the torch matmul measurement at startup).",
    ),
    "no-warm-kernels": (
        {"ProviderConfig": {"warm_kernels": False}},
        "Start every kernel cold (keep no warm kernel per free slot).",
    ),
    "no-environment-network": (
        {"ProviderConfig": {"environment_network": False}},
        "Build course environments without the network (pip sees only --environment-pip-arg "
        "paths, e.g. --find-links=/srv/wheels).",
    ),
}


class ProviderApp(JupyterApp):
    """Host Jupyter kernels on this machine's GPUs for remote clients."""

    name = "jupyter-io-provider"
    version = __version__
    description = (
        "Run the jupyter-io provider host: clients open kernel sessions here through one "
        "websocket each. Standalone, the keys on the allow-list (--allow) may connect. With "
        "--coordinator the host joins that marketplace (outbound link, works behind NAT): it "
        "publishes its GPUs (or CPU) at --price SOL per GPU-hour, and only clients holding a "
        "lease token from the coordinator may connect, directly at --public-url or, without "
        "one, through the coordinator's relay."
    )
    examples = "\n".join(
        [
            "python -m provider_host --listen 127.0.0.1:8765 --allow 7xK...PUBKEY "
            "--keypair id.json",
            "jupyter io provider --coordinator http://127.0.0.1:8700 --price 0.25 --region eu-west",
            "jupyter io provider --coordinator http://127.0.0.1:8700 --simulate-gpu 'RTX 4090:24'",
            "jupyter io provider --coordinator https://coord.example --gpu-price 'RTX 4090=0.35' "
            "--listen 0.0.0.0:8765 --public-url wss://gpu-box.example:8765/tunnel "
            "--certfile cert.pem --keyfile key.pem",
        ]
    )
    classes = [ProviderConfig]
    aliases = _aliases
    flags = _flags
    log_format = Unicode("[%(name)s %(asctime)s %(levelname)s] %(message)s", config=True)

    def start(self) -> None:
        """Build the config and serve until SIGINT/SIGTERM."""
        super().start()  # handles subcommands
        try:
            config = ProviderConfig(parent=self)
        except TraitError as exc:
            self.log.critical("%s", flag_names(str(exc), self.aliases))
            self.exit(1)
        try:
            if not config.keypair_path:
                _host_key(config)
            ProviderServer(config, log=self.log).run()
        except ConfigError as exc:
            self.log.critical("%s", exc)
            self.exit(1)


def _host_key(config: ProviderConfig) -> None:
    """Without --keypair: create the host key in the data dir on the first start, and say so."""
    path = config.keypair_file()
    created = not path.exists()
    pubkey = config.load_keypair().pubkey()
    if created:
        print(
            f"jupyter-io provider created its host key {pubkey} in {path} (no --keypair given; "
            f"it is reused at each start: back it up, it is this host's identity and is paid "
            f"its earnings)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m provider_host [flags]``."""
    ProviderApp.launch_instance(argv=argv if argv is not None else sys.argv[1:])
