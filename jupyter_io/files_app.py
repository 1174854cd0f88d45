"""``jupyter io files status|pull|push``: a running remote kernel's files, for scripts.

The notebook directory's file channel lives in the Jupyter Server that started the kernel
(its provisioner), so these commands ask that server, through the jupyter-io extension's
REST endpoints (:mod:`jupyter_io.serverext.files`): ``--server`` (default: the one running
Jupyter Server of this user, found in the runtime directory) and ``--kernel`` (default:
the one kernel whose directory is mirrored).

    jupyter io files status              # what is mirrored, held back, in conflict
    jupyter io files pull model.pt       # bring a large file back now
    jupyter io files pull                # every changed file, whatever its size
    jupyter io files push                # send local edits now
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from traitlets import Bool, Float, Unicode

from .app import IOCommand, _CommandGroup
from .errors import JupyterIOError

__all__ = ["FilesApp", "FilesPullApp", "FilesPushApp", "FilesStatusApp"]

_aliases = {
    "server": "_FilesCommand.server_url",
    "token": "_FilesCommand.token",
    "kernel": "_FilesCommand.kernel",
    "timeout": "_FilesCommand.timeout",
}
_flags = {"json": ({"_FilesCommand": {"json": True}}, "Print the answer as JSON.")}


class _FilesCommand(IOCommand):
    server_url = Unicode(
        "", config=True, help="The Jupyter Server's URL (default: the one running here)."
    )
    token = Unicode("", config=True, help="Its token (default: the running server's).")
    kernel = Unicode("", config=True, help="Kernel id (default: the only mirrored kernel).")
    timeout = Float(600.0, config=True, help="Seconds to wait for the server's answer.")
    json = Bool(False, config=True, help="Print JSON.")
    aliases = _aliases
    flags = _flags

    def _server(self) -> tuple[str, str]:
        if self.server_url:
            return self.server_url.rstrip("/") + "/", self.token
        from jupyter_server.serverapp import list_running_servers

        servers = list(list_running_servers())
        if len(servers) != 1:
            found = ", ".join(s.get("url", "?") for s in servers) or "none"
            raise JupyterIOError(
                f"found {len(servers)} running Jupyter Servers ({found}); name one with "
                f"--server URL --token TOKEN"
            )
        server = servers[0]
        return str(server["url"]).rstrip("/") + "/", self.token or str(server.get("token", ""))

    def request(self, method: str, path: str, body: Any = None) -> Any:
        base, token = self._server()
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{base}jupyter-io/{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"token {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("message") or exc.reason
            except ValueError:
                reason = exc.reason
            raise JupyterIOError(f"{method} {path}: {exc.code} {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise JupyterIOError(f"cannot reach the Jupyter Server at {base}: {exc}") from None

    def kernel_id(self) -> str:
        if self.kernel:
            return self.kernel
        rows = self.request("GET", "files")["kernels"]
        if len(rows) != 1:
            listed = "; ".join(f"{r['kernel_id']} ({r['root']})" for r in rows) or "none"
            raise JupyterIOError(
                f"{len(rows)} kernels have their notebook directory mirrored ({listed}); "
                f"name one with --kernel ID"
            )
        return str(rows[0]["kernel_id"])

    def show(self, answer: dict[str, Any]) -> None:
        if self.json:
            print(json.dumps(answer, indent=2))
            return
        for path in answer.get("written", []):
            print(f"  {path}")
        for path, kept in answer.get("conflicts", []):
            print(f"  {path}: changed on both ends; the remote copy is {kept}")
        for path, why in answer.get("refused", []):
            print(f"  {path or '*'}: not transferred: {why}", file=sys.stderr)
        print(f"{answer.get('files', 0)} file(s), {answer.get('bytes', 0):,} bytes travelled")


class FilesStatusApp(_FilesCommand):
    """``jupyter io files status``"""

    name = "jupyter-io-files-status"
    description = "Show a remote kernel's mirrored directory: sent, received, held back."

    def run(self) -> int | None:
        status = self.request("GET", f"files/{self.kernel_id()}")
        if self.json:
            print(json.dumps(status, indent=2))
            return None
        print(f"kernel {status['kernel_id']}: {status['root']}")
        print(
            f"  {status['files']} file(s) mirrored; {status['bytes_sent']:,} bytes sent, "
            f"{status['bytes_received']:,} received"
        )
        for path, size in status["held_back"]:
            print(f"  on the provider, not yet here: {path} ({size:,} bytes); pull it")
        for path, kept in status["conflicts"]:
            print(f"  conflict: {path} (the remote copy is {kept})")
        for transfer in status["active"]:
            print(f"  in progress: {transfer['why']} of {transfer['files']} file(s)")
        return None


class FilesPullApp(_FilesCommand):
    """``jupyter io files pull [PATH...]``"""

    name = "jupyter-io-files-pull"
    description = "Bring files back from a remote kernel (no PATH: every changed file)."

    def run(self) -> int | None:
        paths = list(self.extra_args) or None
        self.show(self.request("POST", f"files/{self.kernel_id()}/pull", {"paths": paths}))
        return None


class FilesPushApp(_FilesCommand):
    """``jupyter io files push``"""

    name = "jupyter-io-files-push"
    description = "Send the notebook directory's local edits to a remote kernel now."

    def run(self) -> int | None:
        self.show(self.request("POST", f"files/{self.kernel_id()}/push", {}))
        return None


class FilesApp(_CommandGroup):
    """``jupyter io files``"""

    name = "jupyter-io-files"
    description = "A remote kernel's files: status, pull, push (through the Jupyter Server)."
    subcommands = {
        "status": (FilesStatusApp, FilesStatusApp.description),
        "pull": (FilesPullApp, FilesPullApp.description),
        "push": (FilesPushApp, FilesPushApp.description),
    }
