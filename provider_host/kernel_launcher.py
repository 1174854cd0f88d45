"""Starts a provider-hosted ipykernel whose iopub never drops output.

Run as ``python -m provider_host.kernel_launcher -f CONNECTION_FILE`` (the host's kernelspec
does). The host is the kernel's only iopub subscriber, over IPC in the session's private
runtime directory. A plain ipykernel's iopub XPUB silently drops messages for a subscriber
that falls 1,000 behind, which a busy host on a loaded machine does: lines printed by the
kernel were lost before they ever reached the tunnel (measured: up to 3% of 50,000 lines
under load). With ``XPUB_NODROP`` the kernel's output waits for the host instead, so
back-pressure reaches the kernel and nothing is lost.

In a sandbox it is started by bubblewrap, which ignores the signals a client may send
(:data:`provider_host.isolation.FORWARDED_SIGNALS`) so that they reach the kernel instead of
ending the sandbox; ignored dispositions survive exec, so the launcher restores them first.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _app_class() -> Any:
    # Imported here, after __main__ has taken the working directory off sys.path.
    import zmq
    from ipykernel.kernelapp import IPKernelApp

    class ProviderKernelApp(IPKernelApp):
        """IPKernelApp whose iopub socket applies back-pressure instead of dropping."""

        def init_iopub(self, context: zmq.Context[Any]) -> None:
            super().init_iopub(context)
            self.iopub_thread.socket.setsockopt(zmq.XPUB_NODROP, 1)

    return ProviderKernelApp


def _restore_signals() -> None:
    # Kept in step with provider_host.isolation.FORWARDED_SIGNALS, without importing it (and
    # its dependencies) before the kernel.
    names = ("SIGHUP", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP")
    for name in (*names, "SIGTTIN", "SIGTTOU"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    """Launch the kernel (blocks until it exits)."""
    _restore_signals()
    _app_class().launch_instance()


if __name__ == "__main__":
    # As ipykernel_launcher does: the session's working directory must not shadow imports.
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    main()
