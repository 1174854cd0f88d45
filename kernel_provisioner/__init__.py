"""The jupyter_client provisioner for remote kernels and its local end of the tunnel.

- :mod:`kernel_provisioner.provisioner`: ``io-remote``, the
  :class:`~kernel_provisioner.provisioner.RemoteKernelProvisioner` a kernelspec selects;
- :mod:`kernel_provisioner.lease`: a lease from the marketplace coordinator and its payment
  (the escrow the user's wallet opens before the kernel starts, refunds after a lost provider);
- :mod:`kernel_provisioner.progress`: the steps of a remote start as structured log records;
- :mod:`kernel_provisioner.connection`: one resumable tunnel session to a provider host;
- :mod:`kernel_provisioner.facade`: the local ZMQ sockets Jupyter clients connect to.

Nothing is imported here, so that listing entry points stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
