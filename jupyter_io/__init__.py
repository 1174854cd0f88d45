"""jupyter-io: remote GPU kernels for Jupyter, paid per second from a SOL escrow.

The core package: the tunnel's wire protocol (:mod:`jupyter_io.protocol`), identities
(:mod:`jupyter_io.identity`), the error tree (:mod:`jupyter_io.errors`) and the ``jupyter io``
command line (:mod:`jupyter_io.app`). As a Jupyter Server extension (``jupyter_io``) it
serves JupyterLab's GPU picker (:mod:`jupyter_io.serverext`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__"]

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Jupyter Server's entry point (``jpserver_extensions: {"jupyter_io": true}``)."""
    from .serverext import _jupyter_server_extension_points

    return _jupyter_server_extension_points()


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built Lab extension is, for ``jupyter labextension develop``."""
    return [{"src": "labextension", "dest": "jupyter-io"}]
