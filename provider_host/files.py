"""The provider's end of the file channel: a session's workspace mirrors the notebook's
directory.

:func:`session_files` gives a :class:`~provider_host.session.KernelSession` its
:class:`~jupyter_io.file_endpoint.FileEndpoint`: files the client offers are written into
the session's workspace (never outside it: paths are checked, links are not followed, the
workspace's byte limit applies), their content kept in the user's content store
(``data_dir/files/<user pubkey>``, hidden from kernels like the rest of ``data_dir``, at
most ``file_store_max_bytes``) so a restart or a second kernel of the same user re-sends
nothing. A client's pull is answered with the workspace's files that changed since the
last transfer (:func:`changed_files`), leaving out the kernel's own state in HOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from jupyter_io.bridge import Bridge
from jupyter_io.confine import HashCache, open_beneath, open_parent, scan
from jupyter_io.content_store import ContentStore
from jupyter_io.errors import JupyterIOError, ProtocolError
from jupyter_io.file_endpoint import FileEndpoint
from jupyter_io.files import STREAM_MIN, FileEntry, Pull, UnsafePath, check_path
from jupyter_io.journal.snapshot import JOURNAL_DIR
from jupyter_io.magics import REQUESTS_FILE

from .workspaces import disk_usage

__all__ = ["JOURNAL_PREFIX", "WORKSPACE_SKIP", "changed_files", "session_files", "take_requests"]

#: Paths of the state journal (jupyter_io.journal) in a workspace.
JOURNAL_PREFIX = JOURNAL_DIR + "/"

#: Directories of a workspace never sent back unless pulled by name: the kernel's HOME
#: state (the workspace is its HOME), caches and checkpoints.
WORKSPACE_SKIP = frozenset(
    {
        ".tmp",
        ".ipython",
        ".local",
        ".cache",
        ".config",
        ".jupyter",
        ".npm",
        ".nv",
        ".triton",
        ".jupyter-io",
        "__pycache__",
        ".ipynb_checkpoints",
    }
)


def _skip(path: str, is_dir: bool) -> bool:
    name = path.rsplit("/", 1)[-1]
    if is_dir:
        anywhere = name in ("__pycache__", ".ipynb_checkpoints")
        return anywhere or ("/" not in path and name in WORKSPACE_SKIP)
    # Compiled bytecode, and the temporary files of a placement in progress.
    return name.endswith(".pyc") or (name.startswith(".") and ".jio-" in name)


def changed_files(
    root: str,
    baseline: dict[str, str],
    hashes: HashCache,
    pull: Pull,
    stream_min: int = STREAM_MIN,
) -> tuple[list[FileEntry], list[tuple[str, int]]]:
    """The workspace's files to send for ``pull``, and those held back for their size.

    ``pull.paths`` given: those files whatever their size (missing ones are left out).
    Otherwise every file whose content differs from ``baseline`` and is at most
    ``pull.max_size``; larger changed files are returned as held back ``(path, size)``.
    When the pull takes streams (``pull.stream``), a file of ``stream_min`` bytes or more
    whose hash is not known is not hashed here but offered as a streamed entry (hashed as
    it is sent: one read of it, not two). Blocking (it hashes what changed): call it in a
    thread.
    """
    wanted = None if pull.paths is None else set(pull.paths)
    entries: list[FileEntry] = []
    held_back: list[tuple[str, int]] = []
    for item in scan(root, (lambda p, d: False) if wanted is not None else _skip):
        if wanted is not None and item.path not in wanted:
            continue
        if wanted is None and item.size > pull.max_size:
            known = hashes.get(item)
            if known is None or known != baseline.get(item.path):
                held_back.append((item.path, item.size))
            continue
        if pull.stream and item.size >= stream_min and hashes.get(item) is None:
            entries.append(FileEntry(item.path, item.size, item.mode, "0" * 64, stream=True))
            continue
        try:
            sha = hashes.hash(root, item)
        except (UnsafePath, OSError):
            continue
        if wanted is None and baseline.get(item.path) == sha:
            continue
        entries.append(FileEntry(item.path, item.size, item.mode, sha))
    return entries, held_back


def take_requests(root: str) -> tuple[list[str], list[str]]:
    """The ``%io pull`` and ``%io push`` paths the kernel left in its workspace
    (:data:`jupyter_io.magics.REQUESTS_FILE`), removing the file. The kernel wrote it: at
    most 64 KB is read, and each path is checked."""
    try:
        fd, _ = open_beneath(root, REQUESTS_FILE)
    except (OSError, UnsafePath):
        return [], []
    try:
        text = os.read(fd, 64 * 1024).decode("utf-8", "replace")
    finally:
        os.close(fd)
    with contextlib.suppress(OSError, UnsafePath):
        parent, name = open_parent(root, REQUESTS_FILE)
        try:
            os.unlink(name, dir_fd=parent)
        finally:
            os.close(parent)
    pulls: list[str] = []
    pushes: list[str] = []
    for line in text.splitlines()[:1000]:
        try:
            item = json.loads(line)
            path = check_path(item.get("path"))
        except (ValueError, AttributeError, ProtocolError):
            continue
        target = pulls if item.get("op") == "pull" else pushes if item.get("op") == "push" else None
        if target is not None and path not in target:
            target.append(path)
    return pulls, pushes


def session_files(
    *,
    bridge: Bridge,
    workspace: Path,
    store_root: Path,
    store_max_bytes: int,
    max_workspace_bytes: int,
    owner: tuple[int, int] | None,
    log: logging.Logger | logging.LoggerAdapter[Any],
    window: int,
) -> FileEndpoint:
    """The file channel of one session (see the module docstring)."""
    store = ContentStore(store_root, store_max_bytes)

    def check_space(incoming: int) -> str | None:
        if store_max_bytes > 0 and incoming > store_max_bytes:
            return (
                f"the offer needs {incoming:,} new bytes, over this host's store of "
                f"{store_max_bytes:,} per user; send fewer files (.jupyter-io-ignore)"
            )
        if max_workspace_bytes <= 0:
            return None
        used = disk_usage(workspace)
        if used + incoming <= max_workspace_bytes:
            return None
        return (
            f"the workspace would hold {used + incoming:,} bytes, over this host's limit "
            f"of {max_workspace_bytes:,}; send fewer files (.jupyter-io-ignore)"
        )

    endpoint: FileEndpoint

    async def on_pull(pull: Pull) -> None:
        try:
            if pull.paths is not None and all(p.startswith(JOURNAL_PREFIX) for p in pull.paths):
                # The state journal's pull (kernel_provisioner.journal): its files only,
                # leaving the kernel's %io requests to the notebook's own pull.
                entries, _ = await asyncio.to_thread(
                    changed_files, str(workspace), endpoint.baseline, endpoint.hashes, pull
                )
                await endpoint.send(entries, "pull", ident=pull.id)
                return
            pulls, pushes = await asyncio.to_thread(take_requests, str(workspace))
            entries, held_back = await asyncio.to_thread(
                changed_files, str(workspace), endpoint.baseline, endpoint.hashes, pull
            )
            if pulls:  # %io pull in the kernel: these whatever their size
                asked = Pull(pull.id, tuple(pulls), 0, pull.stream)
                extra, _ = await asyncio.to_thread(
                    changed_files, str(workspace), endpoint.baseline, endpoint.hashes, asked
                )
                have = {e.path for e in entries}
                entries += [e for e in extra if e.path not in have]
                held_back = [h for h in held_back if h[0] not in pulls]
            await endpoint.send(
                entries, "pull", ident=pull.id, held_back=held_back, push_requests=pushes
            )
        except JupyterIOError as exc:
            log.warning("a pull of the workspace's files failed: %s", exc)

    endpoint = FileEndpoint(
        bridge,
        str(workspace),
        store,
        conflict="aside",
        window=window,
        owner=owner,
        check_space=check_space,
        on_pull=on_pull,
        log=log,
    )
    return endpoint
