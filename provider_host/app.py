"""The ``jupyter io provider`` command line: parse flags into a config, run the server.

:class:`ProviderApp` only builds a :class:`~provider_host.config.ProviderConfig` (from flags,
``jupyter_io_provider_config.py`` files and ``--config``) and hands it to
:class:`~provider_host.server.ProviderServer`. Run it as ``python -m provider_host`` or, once
registered, ``jupyter io provider``::

    python -m provider_host --listen 127.0.0.1:0 --allow PUBKEY --keypair id.json \\
        --workspace /srv/jupyter-io
"""

from __future__ import annotations

import sys
from typing import Any

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Unicode

from jupyter_io import __version__
from jupyter_io.errors import ConfigError

from .config import ProviderConfig
from .server import ProviderServer

__all__ = ["ProviderApp", "main"]

_aliases: dict[Any, Any] = {
    **base_aliases,
    "listen": "ProviderConfig.listen",
    "allow": "ProviderConfig.allow",
    "allow-file": "ProviderConfig.allow_file",
    "keypair": "ProviderConfig.keypair_path",
    "certfile": "ProviderConfig.certfile",
    "keyfile": "ProviderConfig.keyfile",
    "workspace": "ProviderConfig.workspace_root",
    "grace-period": "ProviderConfig.grace_period",
    "max-sessions": "ProviderConfig.max_sessions",
    "mem-limit": "ProviderConfig.mem_limit",
    "simulate-gpu": "ProviderConfig.simulate_gpu",
}


class ProviderApp(JupyterApp):
    """Host Jupyter kernels on this machine's GPUs for remote clients."""

    name = "jupyter-io-provider"
    version = __version__
    description = (
        "Run the jupyter-io provider host: clients whose keys are allowed open kernel "
        "sessions here through one websocket each."
    )
    examples = (
        "python -m provider_host --listen 127.0.0.1:8765 --allow 7xK...PUBKEY "
        "--keypair ~/.config/solana/id.json"
    )
    classes = [ProviderConfig]
    aliases = _aliases
    flags = dict(base_flags)
    log_format = Unicode("[%(name)s %(asctime)s %(levelname)s] %(message)s", config=True)

    def start(self) -> None:
        """Build the config and serve until SIGINT/SIGTERM."""
        super().start()  # handles subcommands
        config = ProviderConfig(parent=self)
        try:
            ProviderServer(config, log=self.log).run()
        except ConfigError as exc:
            self.log.critical("%s", exc)
            self.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m provider_host [flags]``."""
    ProviderApp.launch_instance(argv=argv if argv is not None else sys.argv[1:])
