"""``%io pull PATH`` and ``%io push PATH`` in a remote kernel: an IPython extension.

The magics run in the remote kernel, and the files they name live on the user's machine, so
they do not transfer anything themselves: they leave a request in the workspace
(``~/.jupyter-io/requests.jsonl``; the kernel's HOME is its workspace) that the provider
reads when the local end pulls after the cell's execute_reply. A pulled path then comes
back whatever its size; a pushed path is sent again from the notebook's directory before
the next cell runs (only a path the directory's ignore rules would send). ::

    %load_ext jupyter_io.magics
    %io pull model.pt          # a large file: back when this cell ends
    %io push data.csv          # the notebook's copy again, before the next cell
    %io status                 # the requests not yet served
    %io journal status         # the state journal (jupyter_io.journal.kernel_ext)

Load it with ``%load_ext jupyter_io.magics`` (the provider's Python must have jupyter_io).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["REQUESTS_FILE", "load_ipython_extension", "request"]

#: Where the kernel leaves its requests, relative to the workspace.
REQUESTS_FILE = ".jupyter-io/requests.jsonl"


def _workspace() -> str:
    return os.path.realpath(os.path.expanduser("~"))


def request(op: str, path: str) -> str:
    """Record a ``pull`` or ``push`` of ``path`` (relative to the current directory);
    return it relative to the workspace. ValueError for a path outside the workspace."""
    if op not in ("pull", "push"):
        raise ValueError("%io takes pull, push or status")
    root = _workspace()
    full = os.path.realpath(os.path.join(os.getcwd(), path))
    rel = os.path.relpath(full, root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        raise ValueError(f"{path} is outside the workspace ({root}); only its files travel")
    os.makedirs(os.path.join(root, ".jupyter-io"), exist_ok=True)
    with open(os.path.join(root, REQUESTS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps({"op": op, "path": rel.replace(os.sep, "/")}) + "\n")
    return rel


def _pending() -> list[dict[str, Any]]:
    try:
        with open(os.path.join(_workspace(), REQUESTS_FILE), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%io`` (called by ``%load_ext jupyter_io.magics``)."""

    def io(line: str) -> None:
        words = line.split()
        if words and words[0] == "journal":  # the state journal (jupyter_io.journal)
            from jupyter_io.journal.kernel_ext import journal_magic

            print(journal_magic(words[1:]))
            return
        if not words or words[0] not in ("pull", "push", "status"):
            print("usage: %io pull PATH... | %io push PATH... | %io status | %io journal ...")
            return
        if words[0] == "status":
            for item in _pending():
                print(f"{item.get('op')} {item.get('path')}")
            return
        for path in words[1:]:
            try:
                rel = request(words[0], path)
            except ValueError as exc:
                print(f"%io: {exc}")
                continue
            if words[0] == "pull":
                print(f"{rel} comes back to the notebook's directory when this cell ends")
            else:
                print(f"{rel} is sent again from the notebook's directory before the next cell")

    ipython.register_magic_function(io, "line", "io")
