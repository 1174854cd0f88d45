"""The state journal in a remote kernel: an IPython extension.

The provider host loads it into every kernel it starts (``provider_host.kernel_launcher``;
not when the launch asked for no journal: ``JUPYTER_IO_JOURNAL=off``). After each cell that
succeeds it compares the user's variables with what it saw last (:func:`~jupyter_io.journal.
snapshot.fingerprint`: identity, and a tensor's version counter; the content of a name the
cell mentions) and hands what changed to a background thread, which serialises each value
and writes the journal (:mod:`jupyter_io.journal.snapshot`) in the workspace, where the file
channel carries it to the user's machine. The next cell never waits for it. ::

    %io journal status          # what is kept, what is not and why
    %io journal exclude big     # never keep ``big`` (include NAME undoes it)
    %io journal off             # stop journalling this kernel (on: start again)

Limits: a value changed in place through another name than the one the cell mentions (an
alias, a function's side effect) is kept as it was until its own name is used; a numpy
array's in-place writes are seen the same way (it has no version counter).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from .snapshot import (
    JOURNAL_DIR,
    OBJECTS,
    QUEUED,
    Fingerprint,
    Manifest,
    fingerprint,
    is_user_variable,
    load_object,
    names_in,
    serialise,
)

__all__ = ["DEFAULT_MAX_BYTES", "Journal", "journal_magic", "load_ipython_extension", "restore"]

#: Bytes of objects a session's journal keeps at most (``JUPYTER_IO_JOURNAL_MAX_BYTES``,
#: set by the host); a variable over it is recorded as missing.
DEFAULT_MAX_BYTES = 4 * 1024**3

log = logging.getLogger(__name__)

_journal: Journal | None = None


class Journal:
    """One kernel's journal, written under ``root``/:data:`JOURNAL_DIR`."""

    def __init__(self, shell: Any, root: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.shell = shell
        self.directory = os.path.join(root, JOURNAL_DIR)
        self.objects = os.path.join(self.directory, OBJECTS)
        self.max_bytes = max_bytes
        self.enabled = True
        #: Names the user asked not to keep (``%io journal exclude``).
        self.excluded: set[str] = set()
        #: Seconds the last post_run_cell spent on the execution path.
        self.last_check_s = 0.0
        self.manifest = Manifest()
        self._prints: dict[str, Fingerprint] = {}
        self._stale: set[str] = set()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Any, int, str]] = {}
        self._present: set[str] | None = None
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._closed = False
        #: Snapshots queued so far (a manifest's ``covers`` says up to which it holds).
        self._queued = 0
        self._worker = threading.Thread(target=self._run, name="jupyter-io-journal", daemon=True)
        self._worker.start()

    # -- on the execution path ---------------------------------------------------------------

    def post_run_cell(self, result: Any) -> None:
        """IPython's post_run_cell: find what the cell changed and queue it (no I/O here)."""
        if not self.enabled or not getattr(result, "success", False):
            return
        start = time.perf_counter()
        info = getattr(result, "info", None)
        source = getattr(info, "raw_cell", "") or ""
        cell = result.execution_count or 0
        mentioned = names_in(source)
        prints = self._prints
        while self._stale:
            prints.pop(self._stale.pop(), None)
        changed: dict[str, tuple[Any, int, str]] = {}
        present: set[str] = set()
        excluded = self.excluded
        for name, value in list(self.shell.user_ns.items()):
            old = prints.get(name)
            if (
                old is not None
                and old[1] == id(value)
                and old[0] != "torch"
                and name not in mentioned
                and name not in excluded
            ):
                present.add(name)  # the fast path: the same object, not named by the cell
                continue
            if name in excluded or not is_user_variable(name, value):
                continue
            present.add(name)
            fp = fingerprint(value)
            if old == fp and (fp[0] == "torch" or name not in mentioned):
                continue
            prints[name] = fp
            changed[name] = (value, cell, source)
        removed = len(prints) != len(present)
        if removed:
            for name in [n for n in prints if n not in present]:
                del prints[name]
        if changed or removed:
            with self._lock:
                self._pending.update(changed)
                self._present = present
                self._queued += 1
                queued = self._queued
                self._wake.notify()
            # The one write on the execution path (~50 us): tells the user's side, pulling
            # after the execute_reply, that a manifest newer than the one it finds is coming.
            with contextlib.suppress(OSError):
                os.makedirs(self.directory, exist_ok=True)
                with open(os.path.join(self.directory, QUEUED), "w", encoding="ascii") as f:
                    f.write(str(queued))
        self.last_check_s = time.perf_counter() - start

    # -- in the background ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and self._present is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                pending, present = self._pending, self._present
                self._pending, self._present = {}, None
                covers = self._queued
                self._busy = True
            try:
                self._write(pending, present, covers)
            except Exception:  # the journal must never take the kernel down
                log.exception("the state journal failed to write a snapshot")
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _write(
        self, pending: dict[str, tuple[Any, int, str]], present: set[str] | None, covers: int
    ) -> None:
        os.makedirs(self.objects, exist_ok=True)
        manifest = self.manifest
        before = manifest.to_json()
        for name, (value, cell, source) in pending.items():
            seen = fingerprint(value)
            try:
                ser = serialise(value)
            except Exception as exc:
                manifest.vars.pop(name, None)
                why = f"{type(exc).__name__}: {exc}"[:300]
                manifest.missing[name] = {"cell": cell, "source": source, "why": why}
                continue
            if seen[0] == "torch" and fingerprint(value) != seen:
                self._stale.add(name)  # written to while saved: the next cell looks again
                continue
            old = manifest.vars.get(name)
            if old is not None and old["sha256"] == ser.sha256:
                continue
            size = len(ser.data)
            others = {v["sha256"]: v["size"] for n, v in manifest.vars.items() if n != name}
            if ser.sha256 not in others and sum(others.values()) + size > self.max_bytes:
                manifest.vars.pop(name, None)
                manifest.missing[name] = {
                    "cell": cell,
                    "source": source,
                    "why": f"{size:,} bytes would take the journal over its cap of "
                    f"{self.max_bytes:,} bytes",
                }
                continue
            path = os.path.join(self.objects, ser.sha256)
            if not os.path.exists(path):
                tmp = path + ".new"
                with open(tmp, "wb") as f:
                    f.write(ser.data)
                os.replace(tmp, path)
            entry: dict[str, Any] = {"sha256": ser.sha256, "kind": ser.kind, "size": size}
            entry["cell"] = cell
            if ser.device is not None:
                entry["device"] = ser.device
            manifest.vars[name] = entry
            manifest.missing.pop(name, None)
        if present is not None:
            for table in (manifest.vars, manifest.missing):
                for name in [n for n in table if n not in present]:
                    del table[name]
        if manifest.to_json() != before:
            manifest.seq += 1  # else only ``covers`` moves: the user's side stops waiting
        manifest.covers = covers
        manifest.write(self.directory)
        keep = manifest.objects()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.objects):
                if name not in keep and not name.endswith(".new"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.objects, name))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued snapshot is written (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or self._present is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def close(self) -> None:
        """Stop the background thread (what is queued is dropped)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    # -- restore -------------------------------------------------------------------------

    def restore(self) -> dict[str, Any]:
        """Load the journal found in the directory (pushed there by the user's side) into the
        user's namespace: ``{"restored": [name], "missing": [{"name", "cell", "source",
        "why"}]}``. What is loaded counts as seen: the next cell does not write it again."""
        self.flush()
        with open(os.path.join(self.directory, "manifest.json"), encoding="utf-8") as f:
            manifest = Manifest.parse(f.read())
        restored: list[str] = []
        missing: list[dict[str, Any]] = [
            {"name": n, "cell": m.get("cell"), "source": m.get("source"), "why": m.get("why")}
            for n, m in manifest.missing.items()
        ]
        ns = self.shell.user_ns
        for name, entry in list(manifest.vars.items()):
            try:
                with open(os.path.join(self.objects, entry["sha256"]), "rb") as f:
                    value = load_object(entry["kind"], f.read(), entry.get("device"))
            except Exception as exc:
                del manifest.vars[name]
                why = f"{type(exc).__name__}: {exc}"[:300]
                gone = {"cell": entry.get("cell"), "source": "", "why": why}
                manifest.missing[name] = gone
                missing.append({"name": name, **gone})
                continue
            ns[name] = value
            self._prints[name] = fingerprint(value)
            restored.append(name)
        with self._lock:
            self.manifest = manifest
            self._queued = max(self._queued, manifest.covers)
        return {"restored": sorted(restored), "missing": missing}

    def status(self) -> str:
        """What ``%io journal status`` prints."""
        m = self.manifest
        lines = [
            f"journal {'on' if self.enabled else 'off'}: {len(m.vars)} variables kept, "
            f"{m.total:,} bytes (cap {self.max_bytes:,}), snapshot {m.seq}"
        ]
        for name, entry in sorted(m.missing.items()):
            lines.append(f"  not kept: {name} (cell {entry.get('cell')}): {entry.get('why')}")
        if self.excluded:
            lines.append(f"  excluded: {', '.join(sorted(self.excluded))}")
        return "\n".join(lines)


def journal_magic(words: list[str]) -> str:
    """``%io journal on|off|status|exclude NAME...|include NAME...``; returns what to print."""
    journal = _journal
    if journal is None:
        return "%io journal: the state journal is not running in this kernel"
    verb, names = (words[0], words[1:]) if words else ("status", [])
    if verb == "on":
        journal.enabled = True
        return "the state journal is on"
    if verb == "off":
        journal.enabled = False
        return "the state journal is off: variables changed from now on are not kept"
    if verb == "status":
        journal.flush(5)
        return journal.status()
    if verb in ("exclude", "include") and names:
        for name in names:
            if verb == "exclude":
                journal.excluded.add(name)  # still seen: the next check drops it
            else:
                journal.excluded.discard(name)
                journal._prints.pop(name, None)  # unseen: the next check keeps it
        journal.post_run_cell(_Resync())  # drop excluded names from the journal now
        return f"{verb}d: {', '.join(names)}"
    return "usage: %io journal on | off | status | exclude NAME... | include NAME..."


class _Resync:
    success = True
    execution_count = 0
    info = None


def restore() -> dict[str, Any]:
    """Restore the journal pushed into this kernel's workspace (run by
    :func:`kernel_provisioner.journal.restore` in a new kernel)."""
    if _journal is None:
        raise RuntimeError("the state journal is not running in this kernel")
    return _journal.restore()


def load_ipython_extension(ipython: Any) -> None:
    """Start the journal in ``ipython`` (a kernel whose HOME is its workspace) and the
    ``%io`` magics (:mod:`jupyter_io.magics`, whose ``%io journal`` lands here)."""
    global _journal
    if _journal is not None:
        return
    max_bytes = int(os.environ.get("JUPYTER_IO_JOURNAL_MAX_BYTES") or DEFAULT_MAX_BYTES)
    _journal = Journal(ipython, os.path.realpath(os.path.expanduser("~")), max_bytes)
    ipython.events.register("post_run_cell", _journal.post_run_cell)
    ipython.extension_manager.load_extension("jupyter_io.magics")


def unload_ipython_extension(ipython: Any) -> None:
    """Stop the journal (``%unload_ext``)."""
    global _journal
    if _journal is not None:
        with contextlib.suppress(ValueError):
            ipython.events.unregister("post_run_cell", _journal.post_run_cell)
        _journal.close()
        _journal = None
