"""Start a real provider host subprocess and write the kernelspecs the benchmarks compare.

:func:`start_host` runs ``python -m provider_host`` on a free loopback port with fresh keys
(as the provisioner tests do) and returns once it printed its listening line;
:meth:`ProviderHost.stop` ends it (SIGTERM: it kills its kernels). :func:`install_specs`
writes, into a directory to put on ``JUPYTER_PATH``, a local ipykernel spec and io-remote
specs pointing at given tunnel URLs, all running this interpreter.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from solders.keypair import Keypair

from jupyter_io.identity import write_keypair

__all__ = ["LOCAL_SPEC", "ProviderHost", "install_remote_spec", "install_specs", "start_host"]

LISTENING = "jupyter-io provider listening on "
LOCAL_SPEC = "bench-local"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class ProviderHost:
    """A running provider host and the user keypair it allows."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    user_keypair: Path
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def kernels(self) -> list[psutil.Process]:
        """The host's live descendants (its kernels)."""
        try:
            children = self.process.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_host(
    tmp: Path, *extra: str, timeout: float = 30.0, listen: str = "127.0.0.1:0"
) -> ProviderHost:
    """Start ``python -m provider_host`` on ``listen`` (a free port) with state under ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    user = Keypair()
    user_path = write_keypair(user, tmp / "user.json")
    host_path = write_keypair(Keypair(), tmp / "host.json")
    (tmp / "workspace").mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "provider_host",
        "--listen",
        listen,
        "--allow",
        str(user.pubkey()),
        "--keypair",
        str(host_path),
        "--workspace",
        str(tmp / "workspace"),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        start_new_session=True,
    )
    ready = threading.Event()
    found: list[str] = []
    stderr_lines: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not found and line.startswith(LISTENING):
                found.append(line[len(LISTENING) :].strip())
                ready.set()
        ready.set()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)
            del stderr_lines[:-200]

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"provider host did not start:\n{''.join(stderr_lines)}")
    url = found[0]
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    return ProviderHost(proc, url, port, user_path, stderr_lines)


def _write_spec(root: Path, name: str, spec: dict[str, Any]) -> None:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def install_specs(root: Path) -> None:
    """A local ipykernel spec (:data:`LOCAL_SPEC`) running this interpreter."""
    _write_spec(
        root,
        LOCAL_SPEC,
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Local (benchmark)",
            "language": "python",
            "interrupt_mode": "signal",
        },
    )


def install_remote_spec(root: Path, name: str, url: str, keypair: Path) -> str:
    """An io-remote spec whose kernel runs on the provider at ``url``."""
    _write_spec(
        root,
        name,
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Remote ({name})",
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": "io-remote",
                    "config": {"provider_url": url, "keypair_path": str(keypair)},
                }
            },
        },
    )
    return name
