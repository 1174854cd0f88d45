"""jupyter-io: remote GPU kernels for Jupyter, paid per second from a SOL escrow.

The core package: the tunnel's wire protocol (:mod:`jupyter_io.protocol`), identities
(:mod:`jupyter_io.identity`), the error tree (:mod:`jupyter_io.errors`) and the ``jupyter io``
command line (:mod:`jupyter_io.app`).
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
