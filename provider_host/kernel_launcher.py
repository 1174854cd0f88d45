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

import os
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL_EXTENSION", "WARM_FLAG", "main"]

#: The IPython extension every provider kernel loads (the launch's ``journal`` option).
JOURNAL_EXTENSION = "jupyter_io.journal.kernel_ext"


def _app_class() -> Any:
    # Imported here, after __main__ has taken the working directory off sys.path.
    import zmq
    from ipykernel.kernelapp import IPKernelApp

    class ProviderKernelApp(IPKernelApp):
        """IPKernelApp whose iopub socket applies back-pressure instead of dropping."""

        def init_iopub(self, context: zmq.Context[Any]) -> None:
            super().init_iopub(context)
            self.iopub_thread.socket.setsockopt(zmq.XPUB_NODROP, 1)

        def init_extensions(self) -> None:
            super().init_extensions()
            # The state journal (jupyter_io.journal), unless the launch asked for none. A
            # course environment's Python may lack jupyter_io: the kernel runs without it.
            if os.environ.get("JUPYTER_IO_JOURNAL", "on") == "off" or self.shell is None:
                return
            try:
                self.shell.extension_manager.load_extension(JOURNAL_EXTENSION)
            except Exception as exc:
                self.log.warning("the state journal is not running: %s", exc)

    return ProviderKernelApp


def _restore_signals() -> None:
    # Kept in step with provider_host.isolation.FORWARDED_SIGNALS, without importing it (and
    # its dependencies) before the kernel.
    names = ("SIGHUP", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP")
    for name in (*names, "SIGTTIN", "SIGTTOU"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


#: The launcher's flag for a warm kernel (see :func:`main`); taken off argv before the app.
WARM_FLAG = "--warm"


def _await_claim() -> bool:
    """A warm kernel's wait: the host's claim is one JSON object on stdin, ``{"env": {...}}``,
    the environment the tenant's kernel runs with; the connection file (with the tenant's
    key) is written before it. True once claimed; False at EOF without one (discarded)."""
    import json

    data = sys.stdin.buffer.read()  # left open at EOF, as a cold kernel's stdin is
    if not data:
        return False
    env = json.loads(data)["env"]
    os.environ.clear()
    os.environ.update(env)
    return True


def main() -> None:
    """Launch the kernel (blocks until it exits).

    With :data:`WARM_FLAG` (a warm kernel, :mod:`provider_host.warm_pool`), import the kernel
    first, then wait for the host's claim (:func:`_await_claim`) before reading the
    connection file: such a process never holds a key or runs code before its tenant's.
    """
    _restore_signals()
    warm = WARM_FLAG in sys.argv
    if warm:
        sys.argv.remove(WARM_FLAG)
    app = _app_class()
    if warm:
        _preimport()
        if not _await_claim():
            return
    app.launch_instance()


def _preimport() -> None:
    # What IPKernelApp.initialize() imports on its own; here before the claim, not after.
    import importlib

    for name in ("IPython.core.interactiveshell", "ipykernel.ipkernel", "ipykernel.zmqshell"):
        importlib.import_module(name)


if __name__ == "__main__":
    # As ipykernel_launcher does: the session's working directory must not shadow imports.
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    main()
