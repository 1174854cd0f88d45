"""The local end of the file channel: the notebook's directory travels with its kernel.

:class:`NotebookFiles` belongs to one :class:`~kernel_provisioner.provisioner.
RemoteKernelProvisioner` whose kernel manager gave a ``cwd`` (Jupyter Server gives the
notebook's directory). It

- scans that directory (:meth:`NotebookFiles.check`, before the session opens), honouring
  ``.gitignore`` files and a ``.jupyter-io-ignore`` (gitignore syntax, ``pathspec``),
  skipping :data:`DEFAULT_SKIP` (version control, virtual environments, node_modules,
  caches, checkpoints), and refuses a start over ``max_bytes`` naming the biggest files;
- mirrors it into the session's workspace (:meth:`NotebookFiles.start_sync`, run beside the
  kernel's start, reusing the check's scan); the provider's per-user store makes content it
  holds travel never, and a restart of an unchanged directory sends nothing at all (no
  offer: the session's workspace holds what both ends last agreed on). What each start
  spent on the files is :attr:`NotebookFiles.start_times` (logged at debug level);
- holds each execute_request until local edits made since the last transfer have been sent
  (a gate on the facade's shell channel), so the kernel reads what the user saved;
- after each execute_reply, pulls back what the kernel created or changed, files up to
  ``pull_max_size``; larger ones are listed as held back, pulled by name
  (:meth:`NotebookFiles.pull`) or at the session's end (:meth:`NotebookFiles.finish`).

A file both ends changed keeps both copies: the remote one beside the local one as
``name.remote-conflict.ext`` (logged, and listed in the transfer's ``conflicts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pathspec

from jupyter_io.bridge import Gate, Tap
from jupyter_io.confine import HashCache, Scanned, scan
from jupyter_io.content_store import ContentStore
from jupyter_io.errors import JupyterIOError, KernelLaunchError
from jupyter_io.file_endpoint import FileEndpoint, Transfer
from jupyter_io.files import FileEntry, Offer, Pull, check_path, new_transfer_id
from jupyter_io.protocol import Channel

if TYPE_CHECKING:
    from .connection import TunnelClient

__all__ = [
    "DEFAULT_SKIP",
    "IGNORE_FILE",
    "FilesOverCap",
    "IgnoreRules",
    "NotebookFiles",
    "StartTimes",
]

#: Directory names never sent, wherever they are.
DEFAULT_SKIP = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "node_modules",
        "__pycache__",
        ".ipynb_checkpoints",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".cache",
    }
)
#: The ignore file of the notebook's directory, in gitignore syntax.
IGNORE_FILE = ".jupyter-io-ignore"

_DELIMITER = b"<IDS|MSG>"
#: A start's sync reuses the check's scan when it is at most this old (seconds): a restart,
#: or a session opened straight after it. An edit made since is sent before the first
#: execution all the same (the shell gate pushes what changed).
_SCAN_REUSE_S = 2.0


@dataclass
class StartTimes:
    """What one kernel start spent on the notebook's files (seconds, ``time.monotonic``).

    ``check`` (the scan before the session opens, refusing a start over the cap) is on the
    start's path; the sync runs beside the kernel's launch, and only ``waited`` of it (the
    launch's wait for the sync once the kernel was up) is on the path, so ``on_path`` is
    what the files added to the start."""

    #: The check's scan (and, on a first start, loading the kept hashes).
    check: float = 0.0
    #: The sync's scan (0 when it reused the check's) and comparison with what both ends
    #: agreed on (hashing what changed).
    scan: float = 0.0
    #: Offer → DONE (the want round trip, the content, the provider's placement); 0 when
    #: nothing was offered (a restart of an unchanged directory).
    transfer: float = 0.0
    #: The whole sync, from :meth:`NotebookFiles.start_sync` to its end.
    sync: float = 0.0
    #: How long the launch waited for the sync after the kernel was up.
    waited: float = 0.0
    #: Files offered, and content bytes that travelled.
    files: int = 0
    bytes: int = 0
    #: Whether an offer was sent at all.
    offered: bool = False

    @property
    def on_path(self) -> float:
        """Seconds the files added to the start (the check, then the wait for the sync)."""
        return self.check + self.waited

    def to_json(self) -> dict[str, Any]:
        return {
            "check_ms": round(self.check * 1000, 2),
            "scan_ms": round(self.scan * 1000, 2),
            "transfer_ms": round(self.transfer * 1000, 2),
            "sync_ms": round(self.sync * 1000, 2),
            "waited_ms": round(self.waited * 1000, 2),
            "on_path_ms": round(self.on_path * 1000, 2),
            "files": self.files,
            "bytes": self.bytes,
            "offered": self.offered,
        }


class FilesOverCap(KernelLaunchError):
    """The notebook's directory holds more to send than the configured cap."""


class IgnoreRules:
    """``.gitignore`` files (each applies beneath its directory) and ``.jupyter-io-ignore``
    (the root's), plus :data:`DEFAULT_SKIP` and virtual environments (``pyvenv.cfg``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._specs: dict[str, pathspec.PathSpec | None] = {}

    def _spec(self, directory: str) -> pathspec.PathSpec | None:
        if directory not in self._specs:
            lines: list[str] = []
            names = [".gitignore", IGNORE_FILE] if directory == "" else [".gitignore"]
            for name in names:
                path = os.path.join(self.root, directory, name)
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    if os.path.isfile(path) and not os.path.islink(path):
                        with open(path, encoding="utf-8") as f:
                            lines += f.read().splitlines()
            self._specs[directory] = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
        return self._specs[directory]

    def skip(self, path: str, is_dir: bool) -> bool:
        """True when ``path`` (relative, ``/``-separated) is not sent."""
        name = path.rsplit("/", 1)[-1]
        if is_dir and (
            name in DEFAULT_SKIP or os.path.isfile(os.path.join(self.root, path, "pyvenv.cfg"))
        ):
            return True
        if not is_dir and name.startswith(".") and ".jio-" in name:
            return True  # a placement in progress
        parts = path.split("/")
        for depth in range(len(parts)):
            spec = self._spec("/".join(parts[:depth]))
            if spec is not None:
                rel = "/".join(parts[depth:]) + ("/" if is_dir else "")
                if spec.match_file(rel):
                    return True
        return False


def _msg_type_is(parts: Sequence[bytes], msg_type: bytes) -> bool:
    """Is this ZMQ multipart Jupyter message of ``msg_type``? (Cheap for the others.)"""
    try:
        index = list(parts).index(_DELIMITER)
        header = bytes(parts[index + 2])
    except (ValueError, IndexError):
        return False
    if msg_type not in header:
        return False
    try:
        return json.loads(header).get("msg_type") == msg_type.decode()
    except (ValueError, AttributeError):
        return False


def _both_gates(first: Gate, second: Gate | None) -> Gate:
    if second is None:
        return first

    def gate(parts: list[bytes]) -> Awaitable[None] | None:
        waits = [w for w in (first(parts), second(parts)) if w is not None]
        if not waits:
            return None
        if len(waits) == 1:
            return waits[0]

        async def both() -> None:
            for wait in waits:
                await wait

        return both()

    return gate


def _both_taps(first: Tap, second: Tap | None) -> Tap:
    if second is None:
        return first

    def tap(parts: Sequence[bytes]) -> None:
        first(parts)
        second(parts)

    return tap


class NotebookFiles:
    """The notebook directory's side of the file channel (see the module docstring)."""

    def __init__(
        self,
        root: str,
        *,
        max_bytes: int,
        pull_max_size: int,
        store_root: str,
        store_max_bytes: int,
        window: int,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        #: The directory as given, and resolved.
        self.origin = root
        self.root = os.path.realpath(root)
        self.max_bytes = max_bytes
        self.pull_max_size = pull_max_size
        self.window = window
        self.log = log or logging.getLogger(__name__)
        self.store = ContentStore(store_root, store_max_bytes)
        self.hashes = HashCache()
        #: Where this directory's hashes are kept between sessions (the local store's
        #: ``hashes/``): a new session of an unchanged directory hashes nothing again.
        key = hashlib.sha256(self.root.encode()).hexdigest()[:32]
        self.hash_file = os.path.join(store_root, "hashes", f"{key}.json")
        self._hashes_loaded = False
        self.endpoint: FileEndpoint | None = None
        #: The last scan's refusals (links, devices, hard links): (path, why).
        self.refused: list[tuple[str, str]] = []
        #: Changed remote files too large to come back on their own: (path, size).
        self.held_back: dict[str, int] = {}
        self._client: TunnelClient | None = None
        self._sync: asyncio.Task[Transfer | None] | None = None
        self._push_lock = asyncio.Lock()
        #: path -> content hash of files offered by a push still running.
        self._inflight: dict[str, str] = {}
        self._pull_lock = asyncio.Lock()
        self._pull_queued = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._settled = asyncio.Event()
        self._requested: asyncio.Future[Transfer | None] | None = None
        #: Pulls awaiting their offer: id -> (paths asked or None, automatic?).
        self._pulls_asked: dict[str, tuple[tuple[str, ...] | None, bool]] = {}
        #: ``%io push`` paths not sent: absent, kept back by the rules, not plain files.
        self.push_refused: list[str] = []
        #: What the last start spent on the files (None before the first check).
        self.start_times: StartTimes | None = None
        #: The check's scan (when it was taken, the files) for the sync to reuse.
        self._scanned: tuple[float, list[Scanned]] | None = None
        #: A check began :attr:`start_times` that no sync has taken yet.
        self._checked = False
        #: Whether this session's workspace was synced once (a restart then offers only
        #: what changed, and nothing when nothing did).
        self._synced_once = False
        #: The hashes being kept for the next session (a thread's save).
        self._keeping: asyncio.Future[None] | None = None

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``predicate()`` holds, checked after each
        transfer; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._settled.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)
        return True

    def _transferred(self) -> None:
        self._settled.set()

    # -- scanning --------------------------------------------------------------------------

    def scan(self) -> list[Scanned]:
        """The files to mirror (blocking). Raises :class:`FilesOverCap` over ``max_bytes``."""
        rules = IgnoreRules(self.root)
        refused: list[tuple[str, str]] = []
        files = list(scan(self.root, rules.skip, refused))
        self.refused = refused
        total = sum(f.size for f in files)
        if self.max_bytes > 0 and total > self.max_bytes:
            biggest = sorted(files, key=lambda f: f.size, reverse=True)[:5]
            names = ", ".join(f"{f.path} ({f.size / 1e6:,.1f} MB)" for f in biggest)
            raise FilesOverCap(
                f"the notebook's directory {self.root} holds {total / 1e6:,.1f} MB to send to "
                f"the remote kernel, over the cap of {self.max_bytes / 1e6:,.1f} MB "
                f"(files_max_bytes); the biggest: {names}. List what the kernel does not "
                f"need in {IGNORE_FILE} (gitignore syntax) or raise files_max_bytes"
            )
        return files

    def check(self) -> None:
        """Scan once before the session opens, so a start over the cap fails first (and
        take the hashes an earlier session of this directory kept); the start's sync
        reuses this scan. Starts a new :attr:`start_times`."""
        started = time.monotonic()
        times = self.start_times = StartTimes()
        self._checked = True
        self._scanned = None
        if not self._hashes_loaded:
            self._hashes_loaded = True
            self.hashes.load(self.hash_file)
        try:
            files = self.scan()
        finally:
            times.check = time.monotonic() - started
        self._scanned = (time.monotonic(), files)

    def _keep_hashes(self) -> None:
        """Save the hashes for the next session when something was hashed (blocking)."""
        if self.hashes.dirty:
            try:
                self.hashes.save(self.hash_file)
            except OSError as exc:
                self.log.warning("jupyter-io: not keeping the files' hashes: %s", exc)

    def _changed(self, scanned: list[Scanned] | None = None) -> list[FileEntry]:
        """Files whose content differs from what both ends last agreed on (blocking);
        ``scanned``: a scan just taken (else the directory is scanned now)."""
        endpoint = self.endpoint
        assert endpoint is not None
        entries = []
        for item in self.scan() if scanned is None else scanned:
            try:
                sha = self.hashes.hash(self.root, item)
            except (OSError, JupyterIOError):
                continue
            if endpoint.baseline.get(item.path) != sha and self._inflight.get(item.path) != sha:
                entries.append(FileEntry(item.path, item.size, item.mode, sha))
        return entries

    # -- the session -----------------------------------------------------------------------

    def attach(self, client: TunnelClient) -> None:
        """Serve the file channel over ``client`` (a new tunnel session; call before its
        ``open``): route its file frames here, gate execute_requests, tap execute_replies."""
        self._client = client
        self.endpoint = FileEndpoint(
            client.bridge,
            self.root,
            self.store,
            conflict="beside",
            window=self.window,
            log=self.log,
        )
        self.endpoint.hashes = self.hashes
        # Large files pulled here are moved out of the local store into place, not copied:
        # that store is for resuming a cut transfer, the provider's keeps what travelled.
        self.endpoint.move_large = True
        self.endpoint.on_offer = self._offered
        endpoint = self.endpoint
        # The provider sends files only in answer to a pull, and never where they could
        # run on this machine by themselves (.git/hooks, a virtual environment's bin).
        endpoint.refuse_offer = self.refuse_offer
        endpoint.refuse_path = self.refuse_incoming
        self._sync = None
        self._synced_once = False  # a new session: a new, empty workspace
        client.on_files = self.endpoint.handle
        # Beside any gate and tap already there (the idle watch's): both hear every message.
        gate, tap = client.bridge.gates.get(Channel.SHELL), client.bridge.taps.get(Channel.SHELL)
        client.bridge.gates[Channel.SHELL] = _both_gates(self._gate, gate)
        client.bridge.taps[Channel.SHELL] = _both_taps(self._tap, tap)

    @property
    def enabled(self) -> bool:
        """True once attached to a session whose host speaks the file channel."""
        client = self._client
        return client is not None and "files" in client.features and self.endpoint is not None

    def start_sync(self) -> asyncio.Task[Transfer | None]:
        """Mirror the directory now (in the background; :meth:`wait_synced` waits). The
        first execute_request waits for it. A restart of the session offers only what
        changed since the last transfer: nothing (no message at all) when nothing did."""
        self._sync = asyncio.ensure_future(self._timed_sync())
        return self._sync

    async def _timed_sync(self) -> Transfer | None:
        times = self.start_times
        if times is None or not self._checked:  # a sync with no check before it (failover)
            times = self.start_times = StartTimes()
        self._checked = False
        started = time.monotonic()
        try:
            return await self._push("sync", times)
        finally:
            times.sync = time.monotonic() - started

    async def wait_synced(self, timeout: float) -> Transfer | None:
        """The start's transfer, once done; :class:`KernelLaunchError` when it failed."""
        if self._sync is None:
            return None
        started = time.monotonic()
        try:
            transfer = await asyncio.wait_for(asyncio.shield(self._sync), timeout)
        except asyncio.TimeoutError:
            raise KernelLaunchError(
                f"the notebook's files did not reach the provider within {timeout:g} s"
            ) from None
        except JupyterIOError as exc:
            raise KernelLaunchError(f"sending the notebook's files failed: {exc}") from exc
        finally:
            times = self.start_times
            if times is not None:
                times.waited = time.monotonic() - started
        if times is not None and self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("jupyter-io: the files at this start: %s", json.dumps(times.to_json()))
        if transfer is not None and transfer.refused:
            self.log.warning(
                "jupyter-io: the provider did not take %d file(s): %s",
                len(transfer.refused),
                "; ".join(f"{p or '*'}: {why}" for p, why in transfer.refused[:5]),
            )
        return transfer

    async def _push(self, why: str, times: StartTimes | None = None) -> Transfer | None:
        if not self.enabled:
            return None
        assert self.endpoint is not None
        async with self._push_lock:  # one scan at a time; the transfers may overlap
            started = time.monotonic()
            scanned = None
            if why == "sync" and self._scanned is not None:
                taken, files = self._scanned
                self._scanned = None  # once: a later push scans afresh
                if started - taken <= _SCAN_REUSE_S:
                    scanned = files
            entries = await asyncio.to_thread(self._changed, scanned)
            if times is not None:
                times.scan = time.monotonic() - started
                times.files = len(entries)
            # A sync offers even nothing on a session's first start (so both ends have
            # agreed once); a restart of an unchanged directory sends nothing at all.
            if not entries and (why != "sync" or self._synced_once):
                return None
            for entry in entries:
                self._inflight[entry.path] = entry.sha256
        try:
            # Content already on its way (a large push still running) is not offered again:
            # an execution waits only for edits no transfer carries yet.
            offered = time.monotonic()
            transfer = await self.endpoint.send(entries, why)
            if times is not None:
                times.offered = True
                times.transfer = time.monotonic() - offered
                times.bytes = transfer.bytes
            if why == "sync":
                self._synced_once = True
        finally:
            for entry in entries:
                if self._inflight.get(entry.path) == entry.sha256:
                    del self._inflight[entry.path]
            self._transferred()
        if self.hashes.dirty and (self._keeping is None or self._keeping.done()):
            # Kept for the next session, off the start's path (awaited by close()).
            self._keeping = asyncio.ensure_future(asyncio.to_thread(self._keep_hashes))
        self.log.info(
            "jupyter-io: %s: %d file(s), %d bytes travelled in %.2f s",
            why,
            transfer.files,
            transfer.bytes,
            transfer.seconds,
        )
        return transfer

    async def push(self) -> Transfer | None:
        """Send local changes now (None when nothing changed)."""
        return await self._push("push")

    async def pull(
        self,
        paths: Sequence[str] | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
    ) -> Transfer:
        """Bring back ``paths`` (any size), or every changed file up to ``max_size``
        (default ``pull_max_size``); returns the transfer (``conflicts``, ``held_back``)."""
        if not self.enabled:
            raise JupyterIOError("this kernel's provider does not speak the file channel")
        assert self.endpoint is not None
        wanted = None if paths is None else tuple(check_path(p) for p in paths)
        limit = self.pull_max_size if max_size is None else max_size
        request = Pull(new_transfer_id(), wanted, limit, stream=True)
        async with self._pull_lock:
            self._pull_queued = False
            self._pulls_asked[request.id] = (wanted, max_size is None)
            try:
                transfer = await self.endpoint.request_pull(request, timeout)
            finally:
                self._pulls_asked.pop(request.id, None)
                self._transferred()
        if wanted is None:
            self.held_back = dict(transfer.held_back)
        else:
            for path in transfer.written:
                self.held_back.pop(path, None)
            # A file both ends changed came back too, beside the local copy: not held back.
            for path, _ in transfer.conflicts:
                self.held_back.pop(path, None)
        if transfer.written or transfer.conflicts:
            self.log.info(
                "jupyter-io: from the kernel: %s%s",
                ", ".join(transfer.written[:10]),
                f"; kept both copies of {transfer.conflicts}" if transfer.conflicts else "",
            )
        return transfer

    async def finish(self, timeout: float) -> Transfer | None:
        """At the session's end: bring back every changed file, whatever its size."""
        if not self.enabled:
            return None
        try:
            return await self.pull(max_size=1 << 62, timeout=timeout)
        except (JupyterIOError, asyncio.TimeoutError) as exc:
            self.log.warning("jupyter-io: could not bring the kernel's files back: %s", exc)
            return None
        finally:
            await self.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._keeping is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._keeping), 10)
        if self.endpoint is not None:
            await self.endpoint.close()

    # -- the facade's shell channel --------------------------------------------------------

    def _gate(self, parts: list[bytes]) -> Awaitable[None] | None:
        if not _msg_type_is(parts, b"execute_request") or not self.enabled:
            return None
        return self._before_execute()

    def refuse_offer(self, offer: Offer) -> str | None:
        """Why an offer from the provider is refused whole (None: it is taken): one this
        end did not ask for, files it did not name, or (an automatic pull) more than
        ``max_bytes`` in all, which bounds what one execution can write here."""
        endpoint = self.endpoint
        asked = self._pulls_asked.get(offer.id)
        if offer.why != "pull" or endpoint is None or not endpoint.expects(offer.id) or not asked:
            return "this end asked for no files under that id"
        paths, automatic = asked
        if paths is not None and not {e.path for e in offer.files} <= set(paths):
            return "the offer names files this pull did not ask for"
        total = sum(e.size for e in offer.files)
        if automatic and self.max_bytes > 0 and total > self.max_bytes:
            return (
                f"the provider offered {total:,} bytes after one execution, over files_max_bytes "
                f"({self.max_bytes:,}); pull what you need by name"
            )
        return None

    def refuse_incoming(self, path: str) -> str | None:
        """Why a file from the provider may not be written at ``path`` (None: it may):
        inside a directory the scan never sends (``.git``, virtual environments,
        ``node_modules``...), where a planted file could run here on its own."""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if parts[depth - 1] in DEFAULT_SKIP or os.path.isfile(
                os.path.join(self.root, directory, "pyvenv.cfg")
            ):
                return f"{directory}/ is a directory files never travel to or from"
        return None

    def _offered(self, transfer: Transfer) -> None:
        if transfer.push_requests:  # %io push in the kernel: before the next execution
            self._requested = asyncio.ensure_future(self._push_paths(transfer.push_requests))

    async def _push_paths(self, paths: Sequence[str]) -> Transfer | None:
        """Send ``paths`` again whatever the provider holds (``%io push``): only paths
        the scan would send (the provider asked; it gets nothing the rules keep back)."""
        assert self.endpoint is not None
        wanted = set(paths)

        def entries() -> list[FileEntry]:
            found = []
            for item in self.scan():
                if item.path in wanted:
                    with contextlib.suppress(OSError, JupyterIOError):
                        sha = self.hashes.hash(self.root, item)
                        found.append(FileEntry(item.path, item.size, item.mode, sha))
            return found

        chosen = await asyncio.to_thread(entries)
        refused = sorted(wanted - {e.path for e in chosen})
        if refused:
            self.push_refused.extend(refused)
            self.log.warning(
                "jupyter-io: %%io push: not sent (absent, ignored or not a plain file): %s",
                ", ".join(refused),
            )
        if not chosen:
            self._transferred()
            return None
        try:
            return await self.endpoint.send(chosen, "push")
        finally:
            self._transferred()

    async def _before_execute(self) -> None:
        try:
            if self._sync is not None and not self._sync.done():
                await asyncio.shield(self._sync)
            requested = self._requested
            if requested is not None and not requested.done():
                await asyncio.shield(requested)
            await self._push("changed")
        except Exception as exc:  # an execution must not hang on a failed transfer
            self.log.warning("jupyter-io: local edits were not sent before execution: %s", exc)

    def _tap(self, parts: Sequence[bytes]) -> None:
        if self._pull_queued or not _msg_type_is(parts, b"execute_reply"):
            return
        self._pull_queued = True
        task = asyncio.ensure_future(self._after_execute())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_execute(self) -> None:
        try:
            await self.pull()
        except Exception as exc:
            self.log.warning("jupyter-io: the kernel's new files did not come back: %s", exc)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The sync state for ``jupyter io files status`` and Lab (JSON)."""
        endpoint = self.endpoint
        conflicts = [list(c) for t in (endpoint.history if endpoint else ()) for c in t.conflicts]
        return {
            "root": self.root,
            "enabled": self.enabled,
            "synced": self._sync is not None and self._sync.done(),
            "files": len(endpoint.baseline) if endpoint else 0,
            "bytes_sent": endpoint.bytes_sent if endpoint else 0,
            "bytes_received": endpoint.bytes_received if endpoint else 0,
            "active": [t.to_json() for t in endpoint.active.values()] if endpoint else [],
            "held_back": [[p, s] for p, s in sorted(self.held_back.items())],
            "conflicts": conflicts,
            "refused": [list(r) for r in self.refused],
            "history": [t.to_json() for t in endpoint.history] if endpoint else [],
        }


def default_store_root() -> str:
    """The local content store: Jupyter's data directory, ``io/files``."""
    from jupyter_core.paths import jupyter_data_dir

    return str(Path(jupyter_data_dir()) / "io" / "files")
