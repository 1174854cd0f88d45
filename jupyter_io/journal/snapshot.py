"""The state journal's pure parts: which variables to keep, how each is written, the manifest.

A journal is a directory (:data:`JOURNAL_DIR` in the kernel's workspace, a copy of it on the
user's machine) holding ``manifest.json`` and ``objects/<sha256>``: each kept variable's
serialised bytes, named by their content hash, so that two names bound to the same tensor,
or a variable unchanged across cells, are stored and carried once. The manifest says which
object each name holds and which names could not be kept, with the cell that last assigned
them::

    {"version": 1, "seq": 7, "covers": 7, "bytes": 10485912,
     "vars": {"w": {"sha256": "...", "kind": "torch", "size": 10485912, "cell": 3,
                    "device": "cpu"}},
     "missing": {"gen": {"cell": 4, "source": "gen = (i for i in range(3))",
                         "why": "TypeError: cannot pickle 'generator' object"}}}

Kinds: ``torch`` (``torch.save`` of the tensor moved to the CPU; its ``device`` is where
it lived), ``numpy`` (``np.save``, no pickled objects), ``pickle`` (cloudpickle when
installed, so classes and functions defined in the notebook travel by value; else pickle).
:func:`kernel_ext <jupyter_io.journal.kernel_ext>` runs the journal in the kernel; the
provisioner's :mod:`kernel_provisioner.journal` carries it back and restores it.
"""

from __future__ import annotations

import hashlib
import io
import json
import keyword
import os
import pickle
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "JOURNAL_DIR",
    "MANIFEST",
    "OBJECTS",
    "QUEUED",
    "SKIPPED_NAMES",
    "Fingerprint",
    "Manifest",
    "Serialised",
    "fingerprint",
    "is_user_variable",
    "load_object",
    "names_in",
    "serialise",
]

#: The journal's directory, relative to the kernel's workspace (its HOME).
JOURNAL_DIR = ".jupyter-io/journal"
MANIFEST = "manifest.json"
OBJECTS = "objects"
#: Written by the kernel as it queues a snapshot: the number of snapshots queued so far. A
#: manifest whose ``covers`` is lower is not the newest yet.
QUEUED = "queued"

#: IPython's own names in the user namespace, never journalled.
SKIPPED_NAMES = frozenset(
    {"In", "Out", "exit", "quit", "get_ipython", "open", "_ih", "_oh", "_dh", "_sh", "_ii"}
)

_OUTPUT_NAME = re.compile(r"^_+\d*$|^_i+\d*$|^_(i|ii|iii|oh|ih|dh)$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: A cheap fingerprint of a value: compared after each cell to tell what changed.
Fingerprint = tuple[Any, ...]


def is_user_variable(name: str, value: Any) -> bool:
    """True for a name the journal keeps: not private to IPython (``In``, ``_``, ``_i3``,
    ``__builtins__``...), not a module, not a function or class from an installed package
    (one defined in the notebook is kept: it may be all there is of it)."""
    if name.startswith("__") or name in SKIPPED_NAMES or _OUTPUT_NAME.match(name):
        return False
    if isinstance(value, types.ModuleType):
        return False
    if callable(value) or isinstance(value, type):
        module = getattr(value, "__module__", None)
        return module in (None, "__main__", "builtins") and not isinstance(
            value, (types.BuiltinFunctionType, types.BuiltinMethodType)
        )
    return True


def names_in(source: str) -> frozenset[str]:
    """The identifiers a cell's source mentions: a name it mentions may have been changed
    in place (``x.append(1)``, ``d["k"] = v``), so its content is checked again."""
    return frozenset(w for w in _IDENTIFIER.findall(source) if not keyword.iskeyword(w))


def _torch() -> Any:
    return sys.modules.get("torch")  # never imported by the journal itself


def _numpy() -> Any:
    return sys.modules.get("numpy")


def fingerprint(value: Any) -> Fingerprint:
    """What cheaply tells that a value changed. A tensor's in-place writes move its version
    counter, so a tensor is fully described without reading its data; other values are
    described by identity only (their content is hashed when the cell mentions their name)."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return (
            "torch",
            id(value),
            value.data_ptr() if value.layout == torch.strided else 0,
            tuple(value.shape),
            str(value.dtype),
            str(value.device),
            value._version,
            value.requires_grad,
        )
    np = _numpy()
    if np is not None and isinstance(value, np.ndarray):
        address = value.__array_interface__["data"][0]
        return ("numpy", id(value), address, value.shape, value.dtype.str)
    return ("object", id(value), type(value))


@dataclass
class Serialised:
    """One variable's bytes, ready to be stored as ``objects/<sha256>``."""

    kind: str
    data: bytes
    sha256: str
    device: str | None = None


def _pickler() -> Any:
    try:
        import cloudpickle  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return pickle
    return cloudpickle


def serialise(value: Any) -> Serialised:
    """The bytes a variable is kept as. Raises whatever pickling raises for a value that
    cannot be kept (a generator, an open file, a lock...)."""
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        device = str(value.device)
        buf = io.BytesIO()
        torch.save(value.detach().cpu() if device != "cpu" else value, buf)
        data = buf.getvalue()
        return Serialised("torch", data, hashlib.sha256(data).hexdigest(), device)
    np = _numpy()
    if np is not None and type(value) is np.ndarray and not value.dtype.hasobject:
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        data = buf.getvalue()
        return Serialised("numpy", data, hashlib.sha256(data).hexdigest())
    data = _pickler().dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return Serialised("pickle", data, hashlib.sha256(data).hexdigest())


def load_object(kind: str, data: bytes, device: str | None = None) -> Any:
    """The value :func:`serialise` wrote. A tensor goes back to its ``device`` when this
    machine has it, else stays on the CPU."""
    if kind == "torch":
        import torch

        # Only tensors are kept in this kind: the restricted loader runs no pickled code.
        value = torch.load(io.BytesIO(data), weights_only=True)
        if device and device != "cpu":
            try:
                value = value.to(device)
            except (RuntimeError, AssertionError):
                pass  # no such device here: the CPU copy is still the data
        return value
    if kind == "numpy":
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)
    if kind == "pickle":
        return pickle.loads(data)  # cloudpickle's output is read by plain pickle
    raise ValueError(f"unknown journal object kind {kind!r}")


@dataclass
class Manifest:
    """The journal's index (see the module docstring)."""

    seq: int = 0
    vars: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The kernel's count of queued snapshots this manifest includes (see :data:`QUEUED`).
    covers: int = 0

    @property
    def total(self) -> int:
        """Bytes of the distinct objects the manifest names."""
        sizes = {v["sha256"]: v["size"] for v in self.vars.values()}
        return sum(sizes.values())

    def objects(self) -> set[str]:
        """The content hashes the manifest names."""
        return {v["sha256"] for v in self.vars.values()}

    def to_json(self) -> str:
        body = {
            "version": 1,
            "seq": self.seq,
            "covers": self.covers,
            "bytes": self.total,
            "vars": self.vars,
            "missing": self.missing,
        }
        return json.dumps(body, sort_keys=True)

    @classmethod
    def parse(cls, text: str | bytes) -> Manifest:
        """Read a manifest; ValueError for one that is malformed (its object names are
        checked: 64 hex digits, so no path can be built from them)."""
        body = json.loads(text)
        if not isinstance(body, dict) or body.get("version") != 1:
            raise ValueError("not a version 1 journal manifest")
        vars_, missing = body.get("vars"), body.get("missing")
        if not isinstance(vars_, dict) or not isinstance(missing, dict):
            raise ValueError("a journal manifest needs 'vars' and 'missing' objects")
        for name, entry in vars_.items():
            sha = entry.get("sha256") if isinstance(entry, dict) else None
            if (
                not isinstance(name, str)
                or not isinstance(sha, str)
                or not re.fullmatch(r"[0-9a-f]{64}", sha)
                or entry.get("kind") not in ("torch", "numpy", "pickle")
                or not isinstance(entry.get("size"), int)
            ):
                raise ValueError(f"journal manifest entry {name!r} is malformed")
        return cls(int(body.get("seq", 0)), vars_, missing, int(body.get("covers", 0)))

    def write(self, directory: str) -> None:
        """Write ``manifest.json`` in ``directory`` by renaming a new file over it, so a
        reader sees the old manifest or the new one, never half of one."""
        path = os.path.join(directory, MANIFEST)
        tmp = path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
