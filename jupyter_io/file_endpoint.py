"""One end of the file channel over a tunnel :class:`~jupyter_io.bridge.Bridge`.

Both the provisioner (the notebook's directory) and the provider host (the session's
workspace) run a :class:`FileEndpoint` over their bridge: it answers the other end's
offers (content it lacks is wanted, written to its :class:`~jupyter_io.content_store.
ContentStore`, then placed beneath its root without following links), and sends files the
other end asks for or its owner pushes (:meth:`FileEndpoint.send`), at most ``window``
bytes of file frames awaiting acknowledgement at a time so that kernel messages never
wait behind more than that.

Feed it every FILES and FILE_CHUNK frame with :meth:`FileEndpoint.handle`. The wire
messages are :mod:`jupyter_io.files`; confinement is :mod:`jupyter_io.confine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .bridge import Bridge
from .confine import HashCache, Scanned, hash_fd, open_beneath, open_parent, place
from .content_store import ContentStore
from .errors import JupyterIOError, ProtocolError
from .files import (
    CHUNK_SIZE,
    DEFAULT_WINDOW,
    Done,
    FileEntry,
    Incoming,
    Offer,
    Outgoing,
    Pull,
    Resolution,
    Seal,
    UnsafePath,
    Want,
    check_path,
    conflict_name,
    content_hash,
    decode_chunk,
    encode_chunk,
    parse_files_body,
    resolve,
)
from .protocol import Frame, FrameKind

__all__ = ["BUSY_RATE", "KERNEL_QUIET", "FileEndpoint", "Transfer", "TransferFailed"]

#: Chunks at least this large are hashed and written (read and hashed) in a thread.
_THREAD_BYTES = 256 * 1024
#: Objects that arrive whole in one chunk smaller than :data:`_THREAD_BYTES` wait in memory,
#: at most this many bytes of them per endpoint (past it they go to the store as they
#: arrive): each is placed from memory and written to the store only once half of this is
#: held, or when the endpoint closes, so a cold start creates one file per small file on
#: its way, not two (the store's object, then the placed file), a restart soon after it
#: does not wait behind the store's writes, and the event loop never waits for a file's
#: creation.
_SMALL_BUDGET = 32 * 1024 * 1024
#: Objects at least this large may be moved into place (:attr:`FileEndpoint.move_large`).
_MOVE_BYTES = 64 * 1024 * 1024
#: A kernel message within this many seconds (either way) makes a transfer yield: it keeps
#: at most one chunk unacknowledged instead of its window, so the kernel's messages never
#: queue behind more than one chunk and the transfer's CPU (hashing, framing on both ends)
#: leaves room for the kernel's round trip.
KERNEL_QUIET = 0.25
#: ... that is, it sends its next chunk once at most this much awaits acknowledgement: room
#: for the kernel's own frames (a transfer must not starve behind a kernel streaming
#: output), not for a second chunk ...
_YIELD_WINDOW = 256 * 1024
#: ... and at most this many bytes a second (:attr:`FileEndpoint.busy_rate`).
BUSY_RATE = 32 * 1024 * 1024
#: A streamed file is asked of the disk this far ahead of its reads (bytes, in steps of it).
_READ_AHEAD = 8 * 1024 * 1024
#: Chunks a sender has read (and hashed) ahead of the one it sends: reading waits neither
#: for the window nor for the event loop's turn, nor the sending for one thread hop a chunk.
_CHUNKS_AHEAD = 4
#: A streamed file's first look waits until its last change is this old (nanoseconds), so
#: that any write during the stream moves its mtime or ctime (see ``_stream_object``).
_SETTLED_NS = 50_000_000


@dataclass(frozen=True)
class _Stored:
    """What storing one chunk did: its transfer, why the transfer fails (None: it goes on),
    and whether the transfer is complete with it."""

    ident: str
    failure: str | None
    complete: bool = False


class _Reader:
    """``read(offset)`` for each of ``offsets``, in order on ``thread``, at most
    :data:`_CHUNKS_AHEAD` ahead of the caller's :meth:`next`. :meth:`close` before the
    descriptor ``read`` uses is closed: it waits for the read under way."""

    def __init__(
        self, thread: ThreadPoolExecutor, read: Callable[[int], Any], offsets: Iterable[int]
    ) -> None:
        self._thread = thread
        self._read = read
        self._offsets = iter(offsets)
        self._pending: deque[Future[Any]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < _CHUNKS_AHEAD:
            offset = next(self._offsets, None)
            if offset is None:
                return
            self._pending.append(self._thread.submit(self._read, offset))

    async def next(self) -> Any:
        """What the next read returned (or raised)."""
        # Shielded: a cancelled sender must not cancel the wrapped read (close waits for it).
        result = await asyncio.shield(asyncio.wrap_future(self._pending[0]))
        self._pending.popleft()
        self._fill()
        return result

    async def close(self) -> None:
        running = [f for f in self._pending if not f.cancel()]  # the rest never start
        self._pending.clear()
        cancelled = False
        for future in running:
            waiter = asyncio.wrap_future(future)
            while not waiter.done():
                try:
                    await asyncio.shield(waiter)
                except asyncio.CancelledError:
                    cancelled = True  # the read still uses the descriptor: wait for it
                except Exception:
                    break  # the read failed: it is over
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: its sender has failed already
        if cancelled:
            raise asyncio.CancelledError


class TransferFailed(JupyterIOError):
    """A transfer did not complete (the other end refused it, or it timed out)."""


@dataclass
class Transfer:
    """What one transfer did, for logs, status and the caller."""

    id: str
    direction: str
    """"sent" or "received"."""
    why: str
    files: int = 0
    bytes: int = 0
    """Content bytes that travelled (what the receiver held already did not)."""
    written: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    held_back: list[tuple[str, int]] = field(default_factory=list)
    #: Paths the other end asks this one to send (``%io push`` in the kernel).
    push_requests: list[str] = field(default_factory=list)
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "direction": self.direction,
            "why": self.why,
            "files": self.files,
            "bytes": self.bytes,
            "written": self.written,
            "conflicts": [list(c) for c in self.conflicts],
            "refused": [list(r) for r in self.refused],
            "held_back": [list(h) for h in self.held_back],
            "push_requests": self.push_requests,
            "seconds": round(self.seconds, 3),
        }


class FileEndpoint:
    """The file channel's end over ``bridge``, placing files beneath ``root``.

    ``conflict``: what to do with an incoming file both ends changed since they last
    agreed on it: ``"beside"`` writes the incoming copy as ``name.remote-conflict.ext``
    (the local end), ``"aside"`` moves this end's copy there and writes the incoming one
    (the provider, whose aside copy then travels back). ``check_space(bytes)`` returns why
    an offer needing that many new bytes must be refused (a workspace quota), or None.
    ``on_pull`` serves the other end's pulls (the provider). ``owner`` (uid, gid) owns the
    files written.
    """

    def __init__(
        self,
        bridge: Bridge,
        root: str,
        store: ContentStore,
        *,
        conflict: str = "beside",
        window: int = DEFAULT_WINDOW,
        reply_timeout: float = 60.0,
        owner: tuple[int, int] | None = None,
        check_space: Callable[[int], str | None] | None = None,
        on_pull: Callable[[Pull], Awaitable[None]] | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.bridge = bridge
        self.root = root
        self.store = store
        self.conflict = conflict
        self.window = window
        self.reply_timeout = reply_timeout
        self.owner = owner
        self.check_space = check_space
        self.on_pull = on_pull
        #: Hears each offer received, before its content arrives.
        self.on_offer: Callable[[Transfer], None] | None = None
        #: Why an offer is refused whole (None: take it), e.g. one this end never asked for.
        self.refuse_offer: Callable[[Offer], str | None] | None = None
        #: Why an incoming path is not written here (None: write it).
        self.refuse_path: Callable[[str], str | None] | None = None
        self.log = log or logging.getLogger(__name__)
        #: path -> sha256 both ends agreed on at the last transfer of that path.
        self.baseline: dict[str, str] = {}
        self.hashes = HashCache()
        #: The most recent transfers, newest last.
        self.history: deque[Transfer] = deque(maxlen=50)
        #: Content bytes sent and received over the session.
        self.bytes_sent = 0
        self.bytes_received = 0
        self._incoming: dict[str, tuple[Incoming, Transfer, float]] = {}
        self._wants: dict[str, asyncio.Future[Want]] = {}
        self._dones: dict[str, asyncio.Future[Done]] = {}
        self._pulls: dict[str, tuple[asyncio.Future[Transfer], list[tuple[str, int]]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Transfers in progress (sent or received), by id.
        self.active: dict[str, Transfer] = {}
        # Chunks wait here for the worker; the sender's window (acks once stored) bounds it.
        self._chunks: asyncio.Queue[tuple[Frame, asyncio.Future[_Stored | None] | None]] = (
            asyncio.Queue()
        )
        self._worker: asyncio.Task[None] | None = None
        self._queued = 0
        self._drained = asyncio.Event()
        #: Every write to the store of what arrives (chunks, finishing, discarding) runs on
        #: this one thread, in arrival order: a chunk is checked and written in one hop from
        #: the moment it arrives, the next ones queue behind it, and no descriptor of a
        #: partial object is closed while a write to it runs.
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="jupyter-io-store")
        #: Chunks queued but not handed to the store thread yet (small ones, taken on the
        #: event loop, and the large ones behind them): while any wait, later ones wait too.
        self._deferred = 0
        #: Reads (and hashes) of the chunks being sent, in order, ahead of the sending.
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="jupyter-io-read")
        #: Small whole objects (sha256 -> content, checked) not in the store yet.
        self._small: dict[str, bytes] = {}
        self._small_bytes = 0
        self._keeping: asyncio.Task[None] | None = None
        self._placing = asyncio.Lock()
        #: Place objects of :data:`_MOVE_BYTES` or more by moving them out of the store
        #: rather than copying them (the notebook's side: its store is for resuming, and a
        #: gigabyte's copy is a second of disk; the provider keeps its store whole, so a
        #: second session re-sends nothing).
        self.move_large = False
        self._placements: set[asyncio.Task[None]] = set()
        #: Bytes a second a transfer may send while the kernel is talking (see
        #: :data:`KERNEL_QUIET`); at full speed once it has been quiet that long.
        self.busy_rate = BUSY_RATE
        self._paced_until = 0.0

    # -- frames from the other end ---------------------------------------------------------

    async def handle(self, frame: Frame) -> None:
        """Act on one FILES or FILE_CHUNK frame. A bad offer or chunk fails its transfer
        (the other end hears why in DONE); it never ends the tunnel."""
        if frame.kind is FrameKind.FILE_CHUNK:
            # Stored by a worker, in order, while the tunnel goes on delivering the kernel's
            # messages that follow it (a kernel message never waits for a chunk's disk write).
            parts = frame.parts
            storing = None
            if len(parts) == 2 and len(parts[1]) >= _THREAD_BYTES and not self._deferred:
                # Checked and written on the store thread from now on, behind the chunks
                # before it: the worker only waits for each in turn and acknowledges it.
                storing = asyncio.get_running_loop().run_in_executor(
                    self._store_thread, self._take_chunk, parts
                )
            else:
                self._deferred += 1
            self._chunks.put_nowait((frame, storing))
            self._queued += len(frame.parts[-1]) if frame.parts else 0
            if self._worker is None or self._worker.done():
                self._worker = asyncio.ensure_future(self._store_chunks())
            while self._queued > 4 * max(self.window, CHUNK_SIZE):
                # A sender ignoring its window: stop reading the tunnel until the worker
                # catches up (TCP pushes back), rather than queue without bound.
                self._drained.clear()
                await self._drained.wait()
            return
        body = frame.body
        try:
            message = parse_files_body(body)
        except ProtocolError as exc:
            self.log.warning("refusing a file channel message: %s", exc)
            ident = body.get("id")
            if body.get("op") == "offer" and isinstance(ident, str) and len(ident) == 32:
                with contextlib.suppress(ValueError):
                    bytes.fromhex(ident)
                    await self._send_done(Done(ident, refused=(("", str(exc)),)))
            return
        if isinstance(message, Offer):
            await self._on_offer(message, body)
        elif isinstance(message, Want):
            waiter = self._wants.pop(message.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif isinstance(message, Done):
            waiter_done = self._dones.pop(message.id, None)
            if waiter_done is not None and not waiter_done.done():
                waiter_done.set_result(message)
        elif isinstance(message, Seal):
            # In order behind the chunks it seals: the worker takes it after them.
            self._chunks.put_nowait((frame, None))
            if self._worker is None or self._worker.done():
                self._worker = asyncio.ensure_future(self._store_chunks())
        elif isinstance(message, Pull):
            if self.on_pull is None:
                await self._send_done(Done(message.id, refused=(("", "pulls go the other way"),)))
            else:
                self._spawn(self.on_pull(message))

    async def _on_offer(self, offer: Offer, body: dict[str, Any]) -> None:
        transfer = Transfer(offer.id, "received", offer.why, files=len(offer.files))
        held_back = body.get("held_back") or []
        if isinstance(held_back, list):
            transfer.held_back = [
                (str(h[0]), int(h[1]))
                for h in held_back[:1000]
                if isinstance(h, list) and len(h) == 2 and isinstance(h[1], int)
            ]
        requests = body.get("push_requests") or []
        if isinstance(requests, list):
            for raw in requests[:1000]:
                with contextlib.suppress(ProtocolError):
                    transfer.push_requests.append(check_path(raw))
        refusal = self.refuse_offer(offer) if self.refuse_offer is not None else None
        if refusal is not None:
            self.log.warning("refused an offer of %d file(s): %s", len(offer.files), refusal)
            transfer.refused = [(e.path, refusal) for e in offer.files] or [("", refusal)]
            await self._finish_received(transfer, Done(offer.id, refused=tuple(transfer.refused)))
            return
        if self.on_offer is not None:
            self.on_offer(transfer)
        incoming = Incoming(offer, self._held)
        refusal = self.check_space(incoming.wanted_bytes) if self.check_space else None
        if refusal is not None:
            transfer.refused = [(e.path, refusal) for e in offer.files]
            await self._finish_received(transfer, Done(offer.id, refused=tuple(transfer.refused)))
            return
        self._incoming[offer.id] = (incoming, transfer, time.monotonic())
        self.active[offer.id] = transfer
        await self.bridge.send_control(FrameKind.FILES, incoming.want().to_body())
        if incoming.complete:
            # Placed beside the tunnel, not on its path: the frames after this offer (a
            # LAUNCH, the kernel's messages) go on while its files are written.
            placing = asyncio.ensure_future(self._place_all(offer.id))
            self._placements.add(placing)
            placing.add_done_callback(self._placed)

    def _held(self, sha: str, size: int) -> int:
        data = self._small.get(sha)
        if data is not None and len(data) == size:
            return size
        return self.store.held(sha, size)

    async def _store_chunks(self) -> None:
        while True:
            frame, storing = await self._chunks.get()
            try:
                if storing is None and frame.kind is FrameKind.FILE_CHUNK:
                    self._deferred -= 1
                await self._on_chunk(frame, storing)
            except ProtocolError as exc:  # a broken peer: its transfer times out there
                self.log.warning("dropping a file chunk: %s", exc)
            except Exception:
                self.log.exception("storing a file chunk failed")
            finally:
                self._chunks.task_done()
                if frame.kind is FrameKind.FILE_CHUNK and frame.parts:
                    self._queued -= len(frame.parts[-1])
                self._drained.set()
            # The sender's window moves as what it sent is stored (small chunks: once the
            # queue is empty, not one ack each).
            big = frame.kind is FrameKind.FILE_CHUNK and len(frame.parts[-1]) >= _THREAD_BYTES
            if self._chunks.empty() or big:
                await self.bridge.send_ack()

    @property
    def queued_bytes(self) -> int:
        """Chunk bytes received and not stored yet (at most 4 windows: then the tunnel
        stops reading)."""
        return self._queued

    async def flush(self) -> None:
        """Return once every chunk received so far is stored, and every offer received so
        far whose content was all here is placed (and its transfer answered)."""
        await self._chunks.join()
        while self._placements:
            await asyncio.wait(set(self._placements))

    def _placed(self, task: asyncio.Task[None]) -> None:
        self._placements.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("placing received files failed: %s", task.exception())

    async def _on_seal(self, seal: Seal) -> None:
        found = self._incoming.get(seal.id)
        if found is None:
            return  # a transfer already failed
        incoming, transfer, _ = found
        try:
            discard = incoming.seal(seal)
        except ProtocolError as exc:
            await self._fail(incoming, transfer, f"transfer failed: {exc}")
            return
        for key in discard:
            await self._in_store(self.store.discard, key)
        for key, sha in [
            (k, incoming.sealed[k]) for k, _, _ in seal.sealed if k in incoming.sealed
        ]:
            moved = await self._in_store(self.store.finish_as, key, sha)
            if not moved:
                path = next(e.path for e in incoming.offer.files if e.sha256 == key)
                del incoming.sealed[key]
                incoming.torn.append((path, f"the stored chunks do not hash to {sha[:12]}"))
        for path, why in incoming.torn:
            self.log.warning("not writing %s: %s", path, why)
        if incoming.complete:
            await self._place_all(seal.id)

    async def _fail(self, incoming: Incoming, transfer: Transfer, failure: str) -> None:
        """Fail a received transfer: nothing more of it is written or placed."""
        self._incoming.pop(transfer.id, None)
        for entry in incoming.offer.files:
            if entry.stream:
                await self._in_store(self.store.discard, entry.sha256)
        transfer.refused = [("", failure)]
        await self._finish_received(transfer, Done(transfer.id, refused=tuple(transfer.refused)))

    async def _in_store(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on the store thread, behind the chunks handed to it."""
        return await asyncio.get_running_loop().run_in_executor(self._store_thread, call, *args)

    async def _on_chunk(self, frame: Frame, storing: asyncio.Future[_Stored | None] | None) -> None:
        if frame.kind is FrameKind.FILES:
            message = parse_files_body(frame.body)
            assert isinstance(message, Seal)
            await self._on_seal(message)
            return
        parts = frame.parts
        if storing is not None:
            outcome = await storing
        elif len(parts) == 2 and len(parts[1]) >= _THREAD_BYTES:
            outcome = await self._in_store(self._take_chunk, parts)
        else:
            # Small: taken here (no thread hop). Nothing is on the store thread now: what
            # came before is stored, what came after waits for this (``_deferred``).
            outcome = self._take_chunk(parts)
        if outcome is None:
            return
        found = self._incoming.get(outcome.ident)
        if found is None:
            return
        if outcome.failure is not None:
            await self._fail(found[0], found[1], outcome.failure)
            return
        if outcome.complete:
            await self._place_all(outcome.ident)

    def _take_chunk(self, parts: Any) -> _Stored | None:
        """Check and store one chunk (on the store thread, or the event loop while nothing
        is on that thread); None for a transfer that already failed. A chunk whose bytes do
        not match its hash is a broken peer: :class:`ProtocolError`. A small object whole in
        this chunk is kept in memory; an object whole in the store is finished (checked
        against its name) here."""
        chunk = decode_chunk(parts)
        found = self._incoming.get(chunk.id)
        if found is None:
            return None  # a transfer already failed; its remaining chunks are dropped
        incoming, transfer, _ = found
        sha = chunk.sha256
        try:
            whole = incoming.accept(chunk)
            size = len(chunk.data)
            if (
                whole
                and chunk.offset == 0
                and not incoming.is_stream(chunk.sha256)
                and size < _THREAD_BYTES
                and self._small_bytes + size <= _SMALL_BUDGET
            ):
                # The whole object: checked here as the store's finish() would check it.
                if content_hash([chunk.digest]) != sha:
                    return _Stored(chunk.id, f"content {sha[:12]} does not match its sha256")
                if sha not in self._small:
                    self._small[sha] = bytes(chunk.data)
                    self._small_bytes += size
                transfer.bytes += size
                return _Stored(chunk.id, None, incoming.complete)
            self.store.write(sha, chunk.offset, chunk.data, chunk.digest)
            transfer.bytes += len(chunk.data)
            if whole and not incoming.is_stream(sha) and not self.store.finish(sha):
                return _Stored(chunk.id, f"content {sha[:12]} does not match its sha256")
        except (ProtocolError, OSError) as exc:
            self.store.close(sha)
            return _Stored(chunk.id, f"transfer failed: {exc}")
        # Whether the transfer is complete is decided here, after this chunk is stored:
        # the chunks behind it may be accepted on this thread before the worker looks.
        return _Stored(chunk.id, None, incoming.complete)

    async def _place_all(self, ident: str) -> None:
        incoming, transfer, _ = self._incoming.pop(ident)
        files = incoming.entries()  # streamed ones under their sealed, checked hash
        transfer.refused.extend(incoming.torn)
        async with self._placing:  # one transfer's files at a time, in arrival order
            await asyncio.to_thread(self._place_sync, files, transfer)
        await self._in_store(self.store.evict, frozenset(e.sha256 for e in files))
        done = Done(
            ident,
            tuple(transfer.written),
            tuple(transfer.conflicts),
            tuple(transfer.refused),
            transfer.bytes,
        )
        await self._finish_received(transfer, done)
        if self._small_bytes >= _SMALL_BUDGET // 2:
            self._start_keeping()

    def _start_keeping(self) -> None:
        if self._small and (self._keeping is None or self._keeping.done()):
            self._keeping = asyncio.ensure_future(self._keep_small())

    async def _keep_small(self) -> None:
        """Write the small objects held in memory to the store (after their transfers'
        DONE: off the start's path), then forget them. One that cannot be written is
        dropped: its content travels again when next offered."""
        while self._small:
            batch = dict(self._small)
            try:
                await asyncio.to_thread(self._put_all, batch)
            finally:
                for sha in batch:
                    data = self._small.pop(sha, None)
                    if data is not None:
                        self._small_bytes -= len(data)
            busy = {e.sha256 for found in self._incoming.values() for e in found[0].offer.files}
            self.store.evict(keep=frozenset(batch) | busy)

    def _put_all(self, batch: dict[str, bytes]) -> None:
        for sha, data in batch.items():
            try:
                self.store.put(sha, data)
            except OSError as exc:
                self.log.warning("not keeping %s in the file store: %s", sha[:12], exc)

    def _place_sync(self, files: Iterable[FileEntry], transfer: Transfer) -> None:
        files = list(files)
        uses: dict[str, int] = {}
        for entry in files:
            uses[entry.sha256] = uses.get(entry.sha256, 0) + 1
        for entry in files:
            try:
                movable = self.move_large and uses[entry.sha256] == 1
                self._place_one(entry, transfer, movable)
            except (UnsafePath, OSError) as exc:
                self.log.warning("not writing %s: %s", entry.path, exc)
                transfer.refused.append((entry.path, str(exc)))

    def _current(self, path: str) -> str | None:
        """sha256 of ``path`` beneath the root now (None when absent)."""
        try:
            fd, info = open_beneath(self.root, path)
        except FileNotFoundError:
            return None
        try:
            item = Scanned(
                path, info.st_size, info.st_mode, info.st_mtime_ns, info.st_ino, info.st_ctime_ns
            )
            known = self.hashes.get(item)
            if known is not None:
                return known
            sha, digests = hash_fd(fd)
            self.hashes.put(path, info, sha, digests)
            return sha
        finally:
            os.close(fd)

    def _place_one(self, entry: FileEntry, transfer: Transfer, movable: bool = False) -> None:
        path = entry.path
        refusal = self.refuse_path(path) if self.refuse_path is not None else None
        if refusal is not None:
            raise UnsafePath(f"{path!r}: {refusal}")
        try:
            current = self._current(path)
        except UnsafePath:
            if self.conflict != "aside":
                raise
            current = "link"  # the provider's own tenant planted it: move it aside
        decision = resolve(current, self.baseline.get(path), entry.sha256)
        target = path
        if decision is Resolution.SAME:
            self.baseline[path] = entry.sha256
            return
        if decision is Resolution.CONFLICT:
            aside = conflict_name(path)
            if self.conflict == "aside":
                parent, name = open_parent(self.root, path)
                try:
                    os.replace(name, aside.rsplit("/", 1)[-1], src_dir_fd=parent, dst_dir_fd=parent)
                finally:
                    os.close(parent)
            else:
                target = aside
            transfer.conflicts.append((path, aside))
            self.log.warning(
                "%s changed on both ends; the remote copy is kept as %s",
                path,
                path if self.conflict == "aside" else aside,
            )
        data = self._small.get(entry.sha256)
        info = None
        if data is not None and len(data) == entry.size:
            info = place(self.root, target, data, entry.size, entry.mode, owner=self.owner)
        elif movable and entry.size >= _MOVE_BYTES:
            # Moved out of the store, not copied (the store no longer holds it).
            with contextlib.suppress(OSError):  # another filesystem: copied below
                info = place(
                    self.root,
                    target,
                    self.store.path(entry.sha256),
                    entry.size,
                    entry.mode,
                    owner=self.owner,
                )
        if info is None:
            source = self.store.open(entry.sha256)
            try:
                info = place(self.root, target, source, entry.size, entry.mode, owner=self.owner)
            finally:
                os.close(source)
        self.hashes.put(target, info, entry.sha256)
        if target == path:
            self.baseline[path] = entry.sha256
            transfer.written.append(path)

    async def _finish_received(self, transfer: Transfer, done: Done) -> None:
        self.active.pop(transfer.id, None)
        self.bytes_received += transfer.bytes
        self._incoming.pop(transfer.id, None)
        transfer.seconds = time.monotonic() - transfer.started
        self.history.append(transfer)
        await self._send_done(done)
        pull = self._pulls.pop(transfer.id, None)
        if pull is not None and not pull[0].done():
            pull[0].set_result(transfer)
        if transfer.conflicts:
            self.log.warning(
                "kept both copies of %d file(s): %s", len(transfer.conflicts), transfer.conflicts
            )

    async def _send_done(self, done: Done) -> None:
        await self.bridge.send_control(FrameKind.FILES, done.to_body())

    # -- sending ---------------------------------------------------------------------------

    async def send(
        self,
        entries: Iterable[FileEntry],
        why: str,
        ident: str | None = None,
        held_back: Iterable[tuple[str, int]] = (),
        push_requests: Iterable[str] = (),
    ) -> Transfer:
        """Offer ``entries`` (files beneath the root), send what the other end wants, and
        return once it says DONE. Raises :class:`TransferFailed` when it does not answer
        within ``reply_timeout`` (counted afresh for each chunk acknowledged)."""
        outgoing = Outgoing(entries, why, ident)
        transfer = Transfer(outgoing.id, "sent", why, files=len(outgoing.files))
        streamed: dict[str, str] = {}  # path -> content hash, of streamed files sent whole
        self.active[outgoing.id] = transfer
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        want_waiter: asyncio.Future[Want] = loop.create_future()
        done_waiter: asyncio.Future[Done] = loop.create_future()
        self._wants[outgoing.id] = want_waiter
        self._dones[outgoing.id] = done_waiter
        body = outgoing.offer().to_body()
        held = list(held_back)
        if held:
            body["held_back"] = [list(h) for h in held]
        asked = list(push_requests)
        if asked:
            body["push_requests"] = asked
        try:
            await self.bridge.send_control(FrameKind.FILES, body)
            want = await self._await(want_waiter, done_waiter)
            if isinstance(want, Done):
                done = want
            else:
                paths: dict[str, str] = {}
                for entry in outgoing.files:
                    paths.setdefault(entry.sha256, entry.path)
                sealed: list[tuple[str, str | None, str | None]] = []
                for sha, offset, end in outgoing.plan(want):
                    if sha in outgoing.streams:
                        sent_bytes, content, torn = await self._stream_object(
                            outgoing.id, paths[sha], sha, end
                        )
                        transfer.bytes += sent_bytes
                        sealed.append((sha, content, torn))
                        if content is not None:
                            streamed[paths[sha]] = content
                    else:
                        transfer.bytes += await self._send_object(
                            outgoing.id, paths[sha], sha, offset, end
                        )
                if outgoing.streams:
                    seal = Seal(outgoing.id, tuple(sealed))
                    await self.bridge.send_control(FrameKind.FILES, seal.to_body())
                done = await self._await(done_waiter)
        finally:
            self._wants.pop(outgoing.id, None)
            self._dones.pop(outgoing.id, None)
            self.active.pop(outgoing.id, None)
        assert isinstance(done, Done)
        sent = {e.path: streamed.get(e.path, e.sha256) for e in outgoing.files}
        for path in done.written:
            if path in sent:
                self.baseline[path] = sent[path]
        for path, _ in done.conflicts:
            if path in sent:
                self.baseline[path] = sent[path]
        transfer.written = list(done.written)
        transfer.conflicts = list(done.conflicts)
        transfer.refused = list(done.refused)
        transfer.held_back = held
        transfer.seconds = time.monotonic() - start
        self.bytes_sent += transfer.bytes
        self.history.append(transfer)
        return transfer

    async def _await(self, *waiters: asyncio.Future[Any]) -> Any:
        done, _ = await asyncio.wait(
            waiters, timeout=self.reply_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            raise TransferFailed(
                f"the other end did not answer a file transfer within {self.reply_timeout:g} s"
            )
        return next(iter(done)).result()

    async def _send_object(self, ident: str, path: str, sha: str, offset: int, end: int) -> int:
        try:
            fd, info = open_beneath(self.root, path)
        except (UnsafePath, OSError) as exc:
            raise TransferFailed(f"cannot read {path}: {exc}") from exc
        digests = self.hashes.digests(path, info, sha)  # hashed by the scan: not again
        sent = 0

        def read(offset: int) -> list[bytes]:
            data = os.pread(fd, min(CHUNK_SIZE, end - offset), offset)
            if not data:
                raise TransferFailed(f"{path} shrank while it was sent; push it again")
            index = offset // CHUNK_SIZE
            digest = digests[index] if digests is not None and index < len(digests) else None
            return encode_chunk(ident, sha, offset, data, digest)

        if end - offset < _THREAD_BYTES:  # one small chunk: no thread hop
            try:
                await self._pace(end - offset)
                await self.bridge.send_chunk(read(offset))
            finally:
                os.close(fd)
            return end - offset
        reader: _Reader | None = None
        try:
            reader = _Reader(self._read_thread, read, range(offset, end, CHUNK_SIZE))
            while offset < end:
                size = min(CHUNK_SIZE, end - offset)
                parts = await reader.next()
                await self._pace(size)
                await self.bridge.send_chunk(parts)
                offset += size
                sent += size
        finally:
            if reader is not None:
                await reader.close()
            os.close(fd)
        return sent

    async def _stream_object(
        self, ident: str, path: str, key: str, size: int
    ) -> tuple[int, str | None, str | None]:
        """Send streamed object ``key`` (``path``, ``size`` bytes when offered) reading each
        chunk once: hashed as it is read, the content hash known at its end. Returns (bytes
        sent, content hash or None, why it is torn or None): torn when the file's size,
        mtime or ctime moved while it was read (or it came short), since then what was sent
        may mix two versions; the receiver then discards it."""
        try:
            fd, before = open_beneath(self.root, path)
        except (UnsafePath, OSError) as exc:
            raise TransferFailed(f"cannot read {path}: {exc}") from exc
        digests: list[bytes] = []
        sent = 0
        torn: str | None = None
        try:
            # A write's timestamps come from a coarse clock (a few ms a tick): were the file
            # written in the tick of this first look, a write in that same tick would keep
            # size, mtime and ctime alike. Looking once its last change is older than any
            # tick, a write from now on moves them.
            age = time.time_ns() - before.st_ctime_ns
            if age < _SETTLED_NS:
                await asyncio.sleep((_SETTLED_NS - age) / 1e9)
                before = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

        def read(offset: int) -> list[bytes] | None:
            if offset % _READ_AHEAD == 0 and hasattr(os, "posix_fadvise"):
                # Ask the disk for what follows before it is needed (a file the kernel just
                # wrote is partly out of the page cache): reads then meet the cache.
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, offset, 2 * _READ_AHEAD, os.POSIX_FADV_WILLNEED)
            data = os.pread(fd, min(CHUNK_SIZE, size - offset), offset)
            if len(data) != min(CHUNK_SIZE, size - offset):
                return None
            parts = encode_chunk(ident, key, offset, data)
            digests.append(bytes(parts[0][-32:]))
            return parts

        # The next chunks are read and hashed on the read thread while this one waits for
        # the window and goes out: the disk (a file the kernel just wrote is partly out of
        # the page cache) and sha256 overlap the sending.
        reader: _Reader | None = None
        try:
            if before.st_size != size:
                torn = f"{path} changed between its offer and its read"
            else:
                reader = _Reader(self._read_thread, read, range(0, size, CHUNK_SIZE))
            offset = 0
            while reader is not None and torn is None and offset < size:
                parts = await reader.next()
                if parts is None:
                    torn = f"{path} shrank while it was sent"
                    break
                chunk = min(CHUNK_SIZE, size - offset)
                await self._pace(chunk)
                await self.bridge.send_chunk(parts)
                offset += chunk
                sent += chunk
            after = os.fstat(fd)
            if torn is None and (
                (after.st_size, after.st_mtime_ns, after.st_ctime_ns)
                != (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
            ):
                torn = f"{path} changed while it was sent"
        finally:
            if reader is not None:
                await reader.close()  # its thread may still read the descriptor
            os.close(fd)
        if torn is not None:
            self.log.warning("%s; the other end discards it", torn)
            return sent, None, torn
        content = content_hash(digests)
        self.hashes.put(path, before, content, digests)  # unchanged since: not hashed again
        return sent, content, None

    async def _pace(self, size: int) -> None:
        """Wait until a chunk of ``size`` may be sent (see :data:`KERNEL_QUIET`)."""
        bridge = self.bridge
        if size < _THREAD_BYTES or bridge.kernel_quiet(KERNEL_QUIET):
            await bridge.wait_window(self.window)
            return
        # The kernel is talking: one chunk at a time, at most busy_rate.
        loop = asyncio.get_running_loop()
        await bridge.wait_window(_YIELD_WINDOW)
        pause = self._paced_until - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        self._paced_until = max(self._paced_until, loop.time()) + size / self.busy_rate

    def expects(self, ident: str) -> bool:
        """True while a pull this end asked for under ``ident`` awaits its offer."""
        return ident in self._pulls

    async def request_pull(self, pull: Pull, timeout: float | None = None) -> Transfer:
        """Ask the other end for files (:class:`~jupyter_io.files.Pull`); return the
        transfer that answered it once it is placed here."""
        waiter: asyncio.Future[Transfer] = asyncio.get_running_loop().create_future()
        self._pulls[pull.id] = (waiter, [])
        try:
            await self.bridge.send_control(FrameKind.FILES, pull.to_body())
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._pulls.pop(pull.id, None)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done_task)

    def _done_task(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("file transfer failed: %s", task.exception())

    async def close(self) -> None:
        """Stop background work and close partial objects (kept for a resume); small
        objects held in memory are written to the store first."""
        self._start_keeping()
        if self._keeping is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._keeping), 30)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(BaseException):
                await self._worker
        for task in [*self._tasks, *self._placements]:
            task.cancel()
        for task in [*self._tasks, *self._placements]:
            with contextlib.suppress(BaseException):
                await task
        for thread in (self._store_thread, self._read_thread):
            thread.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(thread.shutdown)  # the write or read under way ends
        self.store.close()
