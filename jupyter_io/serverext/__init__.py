"""The jupyter-io Jupyter Server extension: what JupyterLab's GPU picker talks to.

:class:`~jupyter_io.serverext.app.JupyterIOExtension` (enabled as ``jupyter_io`` by the
shipped ``jupyter_server_config.d/jupyter_io.json``) serves ``{base_url}/jupyter-io/*``
(:mod:`.handlers`), adds one kernelspec per GPU type on offer and per configured direct
provider (:mod:`.kernelspecs`), and turns on pending kernels (a cell run while a remote kernel
starts is queued). Its services, one job each: :mod:`.offers` (the coordinator's offers,
cached), :mod:`.preferences` (price cap, region, budget), :mod:`.wallet`, :mod:`.billing`
(the coordinator's billing of the user's leases), :mod:`.sessions` (cost so far, escrow
left), :mod:`.progress` (kernel start steps, and the hook to publish more), :mod:`.cohorts`
(the user's classes, their kernelspecs, an instructor's dashboard and top-ups).
"""

from __future__ import annotations

from typing import Any

__all__ = ["_jupyter_server_extension_points"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import JupyterIOExtension

    return [{"module": "jupyter_io.serverext", "app": JupyterIOExtension}]
