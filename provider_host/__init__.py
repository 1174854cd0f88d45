"""The provider daemon: hosts kernels on this machine's GPUs and serves their tunnels.

Start at :mod:`provider_host.app` (the command line, ``python -m provider_host``), which fills
a :class:`~provider_host.config.ProviderConfig` and runs a
:class:`~provider_host.server.ProviderServer`. The rest, one job per module:

- :mod:`~provider_host.handshake`: the decision over a HELLO (auth before anything exists);
- :mod:`~provider_host.session`: one client's kernel session, its workspace and tunnel end;
- :mod:`~provider_host.kernel`: one kernel process, launched through jupyter_client;
- :mod:`~provider_host.isolation`: the kernel's scrubbed environment and resource limits;
- :mod:`~provider_host.inventory`: the GPUs (or CPU) this host offers;
- :mod:`~provider_host.allocation`: which session holds which GPU.
"""

from __future__ import annotations

__all__: list[str] = []
