"""``jupyter console`` (the real one, from jupyter_console) on a remote kernel, driven through
a pseudo-terminal as a person types: it starts the kernel with the blocking KernelManager,
runs cells through a BlockingKernelClient, relays Ctrl-C as an interrupt, and on ``exit``
only asks the kernel to shut down, then exits: the provisioner ends the session on the
provider as the process exits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

#: Any run of terminal escape sequences (prompt_toolkit colours and moves the cursor).
ESC = r"(?:\x1b\[[0-9;?]*[a-zA-Z])*"
SESSION_ENDED = "session ended: session ended"  # the provider's log line for END


def prompt(n: int) -> str:
    """The regular expression of IPython's ``In [n]:`` prompt, escapes and all."""
    return rf"In \[{ESC}{n}{ESC}\]"


def ended_sessions(host: Any) -> int:
    return sum(SESSION_ENDED in line for line in list(host.stderr_lines))


def test_jupyter_console_runs_interrupts_and_exits_cleanly_on_a_remote_kernel(
    remote_spec: str,
    provider_host: Any,
    processes: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    ended_before = ended_sessions(provider_host)
    transcript = tmp_path / "console.txt"
    with transcript.open("w") as log:
        child = pexpect.spawn(
            sys.executable,
            ["-m", "jupyter_console", "--kernel", remote_spec],
            encoding="utf-8",
            timeout=30,
            dimensions=(40, 120),
        )
        child.logfile_read = log
        try:
            child.expect(prompt(1))
            kernels = provider_host.descendants()
            assert kernels, "the kernel runs on the provider"

            child.sendline("print(6 * 7)")
            child.expect(r"42\r\n")  # the echo of the input has no 42
            child.expect(prompt(2))

            # Ctrl-C while a cell runs: the console interrupts the kernel through its
            # manager (a signal over the tunnel), and the prompt comes back.
            child.sendline("import time; print('sl' + 'eeping', flush=True); time.sleep(30)")
            child.expect(r"sleeping\r\n")  # nor "sleeping"
            interrupted = time.monotonic()
            child.sendintr()
            child.expect("KeyboardInterrupt", timeout=15)
            child.expect(prompt(3), timeout=15)
            assert time.monotonic() - interrupted < 15

            child.sendline("exit")
            child.expect(pexpect.EOF, timeout=30)
            at_exit = child.before
        finally:
            if child.isalive():
                child.terminate(force=True)
            child.close()
    output = transcript.read_text()
    assert child.exitstatus == 0, output
    assert "Shutting down kernel" in at_exit
    assert "Traceback" not in at_exit and "Error" not in at_exit, at_exit
    # The console only sent shutdown_request; the session ended (END) as it exited, and
    # with it the kernel, at once rather than after the provider's grace period.
    deadline = time.monotonic() + 10
    while ended_sessions(provider_host) == ended_before and time.monotonic() < deadline:
        time.sleep(0.05)  # the host's log, read by a thread of the fixture's
    assert ended_sessions(provider_host) == ended_before + 1, provider_host.stderr()
    for proc in kernels:
        assert processes.gone(proc.pid)
