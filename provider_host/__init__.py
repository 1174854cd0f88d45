"""The provider daemon: hosts kernels on this machine's GPUs and serves their tunnels.

Start at :mod:`provider_host.app` (the command line, ``python -m provider_host``), which fills
a :class:`~provider_host.config.ProviderConfig` and runs a
:class:`~provider_host.server.ProviderServer`. The rest, one job per module:

- :mod:`~provider_host.handshake`: the decision over a HELLO (auth before anything exists);
- :mod:`~provider_host.session`: one client's kernel session, its workspace and tunnel end;
- :mod:`~provider_host.kernel`: one kernel process, launched through jupyter_client;
- :mod:`~provider_host.isolation`: the kernel's scrubbed environment and resource limits;
- :mod:`~provider_host.sandbox`: the bubblewrap sandbox each kernel runs in;
- :mod:`~provider_host.userpool`: the per-session uids of a root host's sandboxes;
- :mod:`~provider_host.workspaces`: session workspaces, and wiping those a killed host left;
- :mod:`~provider_host.inventory`: the GPUs (or CPU) this host offers, and the offers it
  publishes;
- :mod:`~provider_host.allocation`: which session holds which GPU;
- :mod:`~provider_host.coordinator_link`: the link to a marketplace coordinator (hello,
  heartbeats, relinking, ``dial`` and ``end``);
- :mod:`~provider_host.lease_gate`: the lease token check in HELLO (one session per lease);
- :mod:`~provider_host.usage`: seconds delivered per lease, as signed usage reports;
- :mod:`~provider_host.benchmark`: the torch matmul benchmark published with the offers.

Who may open a session: standalone (no ``--coordinator``), the keys on the allow-list
(``--allow``, ``--allow-file``). Joined to a coordinator, a valid lease token signed by that
coordinator, for the connecting key and this host, is the authorisation; the allow-list is not
consulted then (the coordinator decides who rents the host, and bills for it).
"""

from __future__ import annotations

__all__: list[str] = []
