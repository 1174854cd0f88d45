"""The state journal on the user's side: carried back after each cell, restored into a new
kernel.

The remote kernel writes its journal (:mod:`jupyter_io.journal`) in its workspace's
``.jupyter-io/journal``. A :class:`LocalJournal` attached to a tunnel session pulls it over
the file channel after each execute_reply, in the background (the next execution never waits
for it): first the manifest, then the objects it names that are not here yet, so an unchanged
variable never travels twice. It lives outside the notebook's directory, in
:func:`journal_dir` (Jupyter's data directory, per kernel id), never mixed with the user's
files; ``complete.json`` there is the newest manifest whose objects have all arrived.

:func:`restore` pushes a journal into a new kernel's workspace and loads it there::

    journal = LocalJournal(journal_dir(kernel_id))
    journal.attach(client)                   # before client.open()
    ...
    result = await restore(journal, kernel_client, source=journal_dir(old_kernel_id))
    result.restored, result.missing          # names; [{"name", "cell", "source", "why"}]
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_core.paths import jupyter_data_dir

from jupyter_io.bridge import Tap
from jupyter_io.confine import hash_fd, open_beneath
from jupyter_io.content_store import ContentStore
from jupyter_io.errors import JupyterIOError
from jupyter_io.file_endpoint import FileEndpoint, Transfer
from jupyter_io.files import CHUNK_SIZE, FileEntry, Pull, content_hash, new_transfer_id
from jupyter_io.journal.snapshot import JOURNAL_DIR, MANIFEST, OBJECTS, QUEUED, Manifest
from jupyter_io.journal.vetting import vet
from jupyter_io.protocol import Channel, Frame, FrameKind

from .connection import TunnelClient

__all__ = ["COMPLETE", "LocalJournal", "RestoreResult", "journal_dir", "restore"]

#: The newest manifest whose objects are all here (in the local journal's directory).
COMPLETE = "complete.json"

#: Bytes of received objects the journal's transfer store keeps besides the journal.
_STORE_BYTES = 256 * 1024**2

_DELIMITER = b"<IDS|MSG>"


def journal_dir(kernel_id: str) -> str:
    """Where the journal of kernel ``kernel_id`` is kept on this machine."""
    if not kernel_id or "/" in kernel_id or kernel_id.startswith("."):
        raise ValueError(f"not a kernel id: {kernel_id!r}")
    return os.path.join(jupyter_data_dir(), "jupyter-io", "journal", kernel_id)


def _is_execute_reply(parts: Sequence[bytes]) -> bool:
    try:
        header = bytes(parts[list(parts).index(_DELIMITER) + 2])
    except (ValueError, IndexError):
        return False
    return b'"execute_reply"' in header


def _file_entry(root: str, path: str) -> FileEntry:
    digests = []
    size = 0
    with open(os.path.join(root, path), "rb") as f:
        while block := f.read(CHUNK_SIZE):
            digests.append(hashlib.sha256(block).digest())
            size += len(block)
    return FileEntry(path, size, 0o600, content_hash(digests))


@dataclass
class RestoreResult:
    """What :func:`restore` brought back."""

    restored: list[str] = field(default_factory=list)
    #: Variables not restored: ``{"name", "cell", "source", "why"}`` (re-run ``source``).
    missing: list[dict[str, Any]] = field(default_factory=list)
    #: Bytes pushed to the new kernel's workspace, and seconds the push and the load took.
    pushed_bytes: int = 0
    push_s: float = 0.0
    load_s: float = 0.0


class LocalJournal:
    """One kernel's journal on this machine (see the module docstring)."""

    def __init__(
        self,
        directory: str,
        *,
        window: int = 2 * 1024**2,
        timeout: float = 120.0,
        max_bytes: int = 8 * 1024**3,
        trust_previous_provider: bool = False,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.directory = directory
        #: Push every object into the next kernel, even those whose pickles name code (see
        #: :func:`jupyter_io.journal.vetting.vet`): only if the provider that wrote the
        #: journal is trusted not to have forged them.
        self.trust_previous_provider = trust_previous_provider
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.window = window
        self.timeout = timeout
        #: Most bytes of objects a journal may name to be brought here.
        self.max_bytes = max_bytes
        self.log = log or logging.getLogger(__name__)
        self.endpoint: FileEndpoint | None = None
        self._client: TunnelClient | None = None
        #: Transfer ids of this journal's pulls and pushes (their frames are routed here).
        self._ids: dict[str, FileEndpoint] = {}
        self._pulling: asyncio.Task[None] | None = None
        self._again = False
        self._sync_lock = asyncio.Lock()
        #: The newest complete manifest (None before the first).
        self.complete: Manifest | None = self._read_complete()
        #: Set whenever a new complete manifest is here.
        self.updated = asyncio.Event()

    # -- attaching ----------------------------------------------------------------------------

    def attach(self, client: TunnelClient) -> None:
        """Carry the journal of ``client``'s kernel (call before ``client.open``, after any
        other file channel user has set ``client.on_files``: this journal's transfers are
        routed here, every other frame where it went before)."""
        self._client = client
        store = ContentStore(os.path.join(self.directory, ".store"), _STORE_BYTES)
        self.endpoint = FileEndpoint(
            client.bridge,
            self.directory,
            store,
            conflict="beside",
            window=self.window,
            log=self.log,
        )
        previous = client.on_files
        mine = self._ids

        def route(frame: Frame) -> Awaitable[None]:
            if frame.kind is FrameKind.FILE_CHUNK:
                ident = bytes(frame.parts[0][:16]).hex() if frame.parts else ""
            else:
                ident = str(frame.body.get("id", ""))
            endpoint = mine.get(ident)
            if endpoint is not None:
                return endpoint.handle(frame)
            if previous is None:
                return _nothing()
            return previous(frame)

        client.on_files = route
        # A provider answers a journal pull with journal files only; anything else it offers
        # is refused (it could only land in this directory, never run: see docs).
        self.endpoint.refuse_path = _outside_journal
        tap = client.bridge.taps.get(Channel.SHELL)
        client.bridge.taps[Channel.SHELL] = _with_tap(self._tap, tap)

    @property
    def enabled(self) -> bool:
        """True once attached to a session whose host speaks the file channel."""
        client = self._client
        return client is not None and "files" in client.features and self.endpoint is not None

    # -- pulling ----------------------------------------------------------------------------

    def _tap(self, parts: Sequence[bytes]) -> None:
        if not _is_execute_reply(parts) or not self.enabled:
            return
        if self._pulling is not None and not self._pulling.done():
            self._again = True
            return
        self._pulling = asyncio.ensure_future(self._pull_loop())

    async def _pull_loop(self) -> None:
        try:
            while True:
                self._again = False
                await self.sync()
                if not self._again:
                    return
        except (JupyterIOError, OSError, ValueError, asyncio.TimeoutError) as exc:
            self.log.warning("jupyter-io: the state journal did not come back: %s", exc)

    async def _pull(self, paths: Sequence[str]) -> Transfer:
        assert self.endpoint is not None
        pull = Pull(new_transfer_id(), tuple(paths), 0)
        self._ids[pull.id] = self.endpoint
        try:
            return await self.endpoint.request_pull(pull, self.timeout)
        finally:
            self._ids.pop(pull.id, None)

    async def sync(self, timeout: float | None = None) -> Manifest | None:
        """Bring the kernel's journal here, as of the snapshots it has queued so far (waits
        for the kernel's writer); return the newest complete manifest."""
        async with self._sync_lock:  # one at a time: each pull places the same paths
            return await self._sync(timeout)

    async def _sync(self, timeout: float | None) -> Manifest | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        delay = 0.02
        remote = os.path.join(self.directory, JOURNAL_DIR)
        while True:
            await self._pull([f"{JOURNAL_DIR}/{MANIFEST}", f"{JOURNAL_DIR}/{QUEUED}"])
            manifest, queued = await asyncio.to_thread(self._read_remote, remote)
            covers = manifest.covers if manifest is not None else 0
            if covers >= queued or loop.time() + delay > deadline:
                break
            await asyncio.sleep(delay)  # the kernel's writer is at work: nothing to await
            delay = min(delay * 2, 0.5)
        if manifest is None:
            return self.complete
        if manifest.total > self.max_bytes:
            raise JupyterIOError(
                f"the kernel's journal names {manifest.total:,} bytes, over this machine's "
                f"cap of {self.max_bytes:,} (journal_max_bytes); it was not brought back"
            )
        if (
            self.complete is not None
            and manifest.seq == self.complete.seq
            and (manifest.covers == self.complete.covers)
        ):
            return self.complete
        have = await asyncio.to_thread(_listing, os.path.join(remote, OBJECTS))
        wanted = sorted(manifest.objects() - have)
        if wanted:
            await self._pull([f"{JOURNAL_DIR}/{OBJECTS}/{sha}" for sha in wanted])
        await asyncio.to_thread(self._settle, manifest)
        return self.complete

    @staticmethod
    def _read_remote(remote: str) -> tuple[Manifest | None, int]:
        manifest: Manifest | None = None
        with contextlib.suppress(FileNotFoundError):
            with open(os.path.join(remote, MANIFEST), encoding="utf-8") as f:
                manifest = Manifest.parse(f.read())
        try:
            with open(os.path.join(remote, QUEUED), encoding="ascii") as f:
                queued = int(f.read(32) or 0)
        except (OSError, ValueError):
            queued = 0
        return manifest, queued

    def _settle(self, manifest: Manifest) -> None:
        """Keep ``manifest`` as complete if its objects are all here (each checked against
        its name); drop objects no complete manifest names."""
        objects = os.path.join(self.directory, JOURNAL_DIR, OBJECTS)
        for sha in manifest.objects():
            try:
                with open(os.path.join(objects, sha), "rb") as f:
                    ok = hashlib.file_digest(f, "sha256").hexdigest() == sha
            except OSError:
                ok = False
            if not ok:
                self.log.info("jupyter-io: journal object %s not here yet", sha[:12])
                return
        tmp = os.path.join(self.directory, COMPLETE + ".new")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
        os.replace(tmp, os.path.join(self.directory, COMPLETE))
        self.complete = manifest
        keep = manifest.objects()
        for name in os.listdir(objects):
            if name not in keep and ".jio-" not in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(objects, name))
        self.updated.set()

    def _read_complete(self) -> Manifest | None:
        try:
            with open(os.path.join(self.directory, COMPLETE), encoding="utf-8") as f:
                return Manifest.parse(f.read())
        except (OSError, ValueError):
            return None

    async def close(self) -> None:
        """Stop pulling (what is here stays)."""
        if self._pulling is not None:
            self._pulling.cancel()
            with contextlib.suppress(BaseException):
                await self._pulling
        if self.endpoint is not None:
            await self.endpoint.close()

    # -- pushing ----------------------------------------------------------------------------

    async def push(self, source: str) -> int:
        """Send the complete journal kept in ``source`` (a :func:`journal_dir`) into this
        session's workspace; return the bytes that travelled. FileNotFoundError when
        ``source`` holds no complete journal."""
        async with self._sync_lock:
            return await self._send(await self._stage(source))

    async def _stage(self, source: str) -> _Staged:
        """Read and vet ``source``'s complete journal for a push (see :func:`_stage`); hold
        :attr:`_sync_lock` from here until :meth:`_send` returned: no pull of this journal
        changes its directory meanwhile, so what is sent is what was vetted."""
        if self._client is None or "files" not in self._client.features:
            raise JupyterIOError("the new kernel's host does not speak the file channel")
        staging = os.path.join(self.directory, ".push")
        return await asyncio.to_thread(_stage, source, staging, self.trust_previous_provider)

    async def _send(self, staged: _Staged) -> int:
        """Send what :meth:`_stage` laid out: the objects from where they are kept, then the
        manifest (last: the objects it names are there first)."""
        client = self._client
        if client is None:
            raise JupyterIOError("the new kernel's host does not speak the file channel")
        store = ContentStore(os.path.join(self.directory, ".store"), _STORE_BYTES)
        sent = 0
        try:
            for root, entries in (
                (staged.source, staged.objects),
                (staged.staging, [staged.manifest]),
            ):
                if not entries:
                    continue
                endpoint = FileEndpoint(
                    client.bridge, root, store, window=self.window, log=self.log
                )
                if root == staged.source:
                    for path, info, sha, digests in staged.hashed:
                        endpoint.hashes.put(path, info, sha, digests)  # read once, not again
                ident = new_transfer_id()
                self._ids[ident] = endpoint
                try:
                    transfer = await endpoint.send(entries, "push", ident=ident)
                finally:
                    self._ids.pop(ident, None)
                    await endpoint.close()
                if transfer.refused:
                    raise JupyterIOError(
                        f"the new kernel's host refused the journal: {transfer.refused}"
                    )
                sent += transfer.bytes
        finally:
            store.close()
            await asyncio.to_thread(shutil.rmtree, staged.staging, True)
        return sent


#: What the kernel imports to load objects of each kind, and the libraries a pickle may name
#: that take long enough to import to be worth starting early (:func:`restore`).
_KIND_MODULES = {"torch": "torch", "numpy": "numpy"}
_PICKLE_MODULES = ("numpy", "pandas", "torch")


@dataclass
class _Staged:
    """A journal ready to be pushed (:func:`_stage`)."""

    #: The journal's directory; ``objects`` are read there, beneath it, as they are sent.
    source: str
    objects: list[FileEntry]
    #: Where the (vetted) manifest was written, and its entry.
    staging: str
    manifest: FileEntry
    #: (path, stat, content hash, chunk digests) of each file listed, as it was read.
    hashed: list[tuple[str, os.stat_result, str, list[bytes]]]
    #: Libraries the kernel will import to load the objects (a hint: imported early).
    modules: list[str]


def _stage(source: str, staging: str, trusted: bool = False) -> _Staged:
    """List ``source``'s complete journal for a push, as the workspace has it: its objects
    stay where they are kept (their paths beneath ``source`` are those of the workspace)
    and only the manifest is written under ``staging``. Unless ``trusted``, objects whose
    pickles name anything but data constructors are left out (:func:`_hold_back`). Each
    object is opened beneath ``source`` as the file channel sends it (a link, or a file
    with other hard links, is refused), and read once: its content hash and chunk digests
    are those the channel sends."""
    with open(os.path.join(source, COMPLETE), encoding="utf-8") as f:
        text = f.read()
    manifest = Manifest.parse(text)
    if not trusted and _hold_back(source, manifest):
        text = manifest.to_json()
    kinds = {entry["sha256"]: entry["kind"] for entry in manifest.vars.values()}
    modules = {_KIND_MODULES[k] for k in kinds.values() if k in _KIND_MODULES}
    objects: list[FileEntry] = []
    hashed = []
    for sha in sorted(kinds):
        path = f"{JOURNAL_DIR}/{OBJECTS}/{sha}"
        fd, info = open_beneath(source, path)
        try:
            if info.st_size <= CHUNK_SIZE:
                data = os.pread(fd, info.st_size + 1, 0)
                digests = [hashlib.sha256(data).digest()] if data else []
                if kinds[sha] == "pickle":
                    modules.update(m for m in _PICKLE_MODULES if m.encode() in data)
                # One chunk: its digest is the sha256 the object is named by (checked as the
                # pull did), for free.
                changed = len(data) != info.st_size or (bool(data) and digests[0].hex() != sha)
            else:
                digests = hash_fd(fd)[1]
                after = os.fstat(fd)
                changed = (after.st_size, after.st_mtime_ns) != (info.st_size, info.st_mtime_ns)
        finally:
            os.close(fd)
        if changed:
            raise JupyterIOError(f"journal object {sha[:12]} changed since it was brought back")
        entry = FileEntry(path, info.st_size, 0o600, content_hash(digests))
        objects.append(entry)
        hashed.append((path, info, entry.sha256, digests))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, JOURNAL_DIR), mode=0o700)
    with open(os.path.join(staging, JOURNAL_DIR, MANIFEST), "w", encoding="utf-8") as f:
        f.write(text)
    return _Staged(
        source,
        objects,
        staging,
        _file_entry(staging, f"{JOURNAL_DIR}/{MANIFEST}"),
        hashed,
        sorted(modules),
    )


def _hold_back(source: str, manifest: Manifest) -> bool:
    """Move the variables whose objects may not be loaded into a kernel the writer did not
    run (:func:`jupyter_io.journal.vetting.vet`, read here without unpickling) from the
    manifest's ``vars`` to its ``missing``, with the cell that made them and why; True when
    any was."""
    verdicts: dict[tuple[str, str], str | None] = {}
    held = False
    for name, entry in list(manifest.vars.items()):
        key = (entry["sha256"], entry["kind"])
        if key not in verdicts:
            path = os.path.join(source, JOURNAL_DIR, OBJECTS, key[0])
            with open(path, "rb") as f:
                verdicts[key] = vet(key[1], f.read())
        why = verdicts[key]
        if why is not None:
            del manifest.vars[name]
            manifest.missing[name] = {"cell": entry.get("cell"), "source": "", "why": why}
            held = True
    return held


def _outside_journal(path: str) -> str | None:
    if path.startswith(JOURNAL_DIR + "/"):
        return None
    return "not a file of the state journal"


def _listing(directory: str) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


async def _nothing() -> None:
    return None


def _with_tap(first: Tap, second: Tap | None) -> Tap:
    if second is None:
        return first

    def tap(parts: Sequence[bytes]) -> None:
        first(parts)
        second(parts)

    return tap


_RESTORE = (
    "__import__('json').dumps(__import__('jupyter_io.journal.kernel_ext', "
    "fromlist=['restore']).restore())"
)


async def restore(
    journal: LocalJournal,
    kernel_client: Any,
    source: str | None = None,
    timeout: float = 120.0,
) -> RestoreResult:
    """Push the journal kept in ``source`` (default: ``journal``'s own directory) into the
    kernel ``journal`` is attached to, and load its variables there through
    ``kernel_client`` (a started :class:`jupyter_client.AsyncKernelClient` of that kernel).
    The load runs silently: no cell in the notebook's history, no output. The objects are
    sent from where ``source`` keeps them (only those the vetting let through, then the
    vetted manifest), and the kernel imports the libraries the load will need (torch,
    numpy, pandas) while they travel."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = RestoreResult()
    async with journal._sync_lock:  # see LocalJournal._stage
        staged = await journal._stage(source or journal.directory)
        if staged.modules:
            # The kernel imports the libraries the load needs (torch: seconds) while the
            # objects travel, instead of after; an import that fails only costs its time.
            kernel_client.execute(
                "",
                silent=True,
                store_history=False,
                user_expressions={m: f"__import__({m!r}).__name__" for m in staged.modules},
            )
        result.pushed_bytes = await journal._send(staged)
    loaded = loop.time()
    result.push_s = loaded - start
    msg_id = kernel_client.execute(
        "", silent=True, store_history=False, user_expressions={"journal": _RESTORE}
    )
    reply = await _reply(kernel_client, msg_id, timeout)
    expr = reply["content"].get("user_expressions", {}).get("journal", {})
    if expr.get("status") != "ok":
        raise JupyterIOError(
            f"restoring the journal failed in the new kernel: {expr.get('ename')}: "
            f"{expr.get('evalue')}"
        )
    answer = json.loads(ast.literal_eval(expr["data"]["text/plain"]))  # the repr of a str
    result.restored = list(answer["restored"])
    result.missing = list(answer["missing"])
    result.load_s = loop.time() - loaded
    return result


async def _reply(kernel_client: Any, msg_id: str, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise JupyterIOError(f"the new kernel did not answer the restore in {timeout:.0f} s")
        msg: dict[str, Any] = await kernel_client.get_shell_msg(timeout=remaining)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
