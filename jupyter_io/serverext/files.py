"""The file channel's REST endpoints: sync state per kernel, pull and push on request.

``GET {base_url}/jupyter-io/files`` lists the running kernels whose notebook directory is
mirrored; ``GET .../files/{kernel_id}`` is one kernel's state
(:meth:`kernel_provisioner.files.NotebookFiles.status`); ``POST .../files/{kernel_id}/pull``
with ``{"paths": [...]}`` (or ``null``: every changed file, any size) brings files back,
``POST .../files/{kernel_id}/push`` sends local changes now. ``jupyter io files`` and Lab
call these; the shapes are in docs/server-extension-api.md.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import JupyterIOError
from .handlers import URL_PREFIX, _Handler

__all__ = ["PULL_TIMEOUT", "file_handlers", "kernel_files", "kernel_state"]

#: Seconds a pull asked through the REST API may take.
PULL_TIMEOUT = 600.0


def kernel_files(kernel_manager: Any, kernel_id: str) -> Any:
    """The :class:`~kernel_provisioner.files.NotebookFiles` of a running kernel, or None."""
    try:
        km = kernel_manager.get_kernel(kernel_id)
    except KeyError:
        return None
    return getattr(getattr(km, "provisioner", None), "files", None)


def kernel_state(files: Any) -> dict[str, Any]:
    """``files.status()`` with, on each incoming transfer in progress, what a progress bar
    needs: ``paths`` (at most 100 of the files it carries) and ``total_bytes`` (content
    bytes it moves in all, what arrived included). Outgoing ones have neither."""
    state: dict[str, Any] = files.status()
    endpoint = getattr(files, "endpoint", None)
    incoming = getattr(endpoint, "_incoming", None)
    if not isinstance(incoming, dict):
        return state
    for transfer in state.get("active", []):
        found = incoming.get(transfer.get("id"))
        offer = getattr(found[0], "offer", None) if found else None
        # Accepted so far + still wanted (both move as a chunk is accepted; ``bytes`` only
        # once it is stored).
        accepted = getattr(found[0], "received", None) if found else None
        remaining = getattr(found[0], "wanted_bytes", None) if found else None
        if offer is not None and isinstance(accepted, int) and isinstance(remaining, int):
            transfer["paths"] = [entry.path for entry in offer.files[:100]]
            transfer["total_bytes"] = accepted + remaining
    return state


class _FilesHandler(_Handler):
    def files_of(self, kernel_id: str) -> Any:
        files = kernel_files(self.kernel_manager, kernel_id)
        if files is None:
            raise web.HTTPError(
                404,
                f"kernel {kernel_id} is not a running jupyter-io kernel with a notebook "
                f"directory (started without a cwd, or with sync_files off)",
            )
        return files


class FilesListHandler(_FilesHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """``{"kernels": [{"kernel_id", ...status}]}``."""
        rows = []
        for kernel_id in list(self.kernel_manager.list_kernel_ids()):
            files = kernel_files(self.kernel_manager, kernel_id)
            if files is not None:
                rows.append({"kernel_id": kernel_id, **kernel_state(files)})
        self.reply({"kernels": rows})


class FilesHandler(_FilesHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        self.reply({"kernel_id": kernel_id, **kernel_state(self.files_of(kernel_id))})


class FilesPullHandler(_FilesHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Body ``{"paths": [...] | null}``: answers the transfer (written, conflicts,
        refused, bytes)."""
        files = self.files_of(kernel_id)
        body = self.json_body()
        paths = body.get("paths") if isinstance(body, dict) else None
        if paths is not None and (
            not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)
        ):
            raise web.HTTPError(400, 'send {"paths": ["relative/path", ...]} or {"paths": null}')
        try:
            if paths is None:
                transfer = await files.pull(max_size=1 << 62, timeout=PULL_TIMEOUT)
            else:
                transfer = await files.pull(paths, timeout=PULL_TIMEOUT)
        except TimeoutError:
            raise web.HTTPError(504, "the provider did not finish the transfer in time") from None
        except JupyterIOError as exc:
            raise web.HTTPError(409, str(exc)) from None
        for path, _ in transfer.conflicts:  # it came, beside the local copy: not held back
            files.held_back.pop(path, None)
        self.reply(transfer.to_json())


class FilesPushHandler(_FilesHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Send local changes now; answers the transfer, or ``{"files": 0}``."""
        files = self.files_of(kernel_id)
        try:
            transfer = await files.push()
        except JupyterIOError as exc:
            raise web.HTTPError(409, str(exc)) from None
        self.reply(transfer.to_json() if transfer is not None else {"files": 0, "bytes": 0})


def file_handlers() -> list[tuple[str, type[_Handler]]]:
    """The file channel's routes, relative to the base URL."""
    kernel = r"(?P<kernel_id>[\w-]+)"
    routes: list[tuple[tuple[str, ...], type[_Handler]]] = [
        (("files",), FilesListHandler),
        (("files", kernel), FilesHandler),
        (("files", kernel, "pull"), FilesPullHandler),
        (("files", kernel, "push"), FilesPushHandler),
    ]
    return [(url_path_join("/", URL_PREFIX, *parts), handler) for parts, handler in routes]
