"""The coordinator's side of the GPU challenge: ask, time, check, list or delist.

:class:`GpuChallenges` challenges every GPU of a provider when it links (its offers are
listed meanwhile as *unverified*: ``verified`` null in ``GET /api/v1/offers``) and, at random
times (exponential gaps of mean ``interval`` seconds), one idle GPU of a linked provider. A
GPU a lease holds is never challenged. Each challenge (``docs/gpu-verification.md``):

1. picks a fresh seed and the size ``n`` (most of the offer's VRAM, at most ``max_n``; the
   ``cpu (no GPU)`` offer and simulated GPUs get ``cpu_n``) and sends ``gpu_challenge``;
   ``B @ R`` for ``k`` secret random 0/1 vectors ``R`` is computed in a thread meanwhile;
2. waits for the commitment no longer than the claimed model's time window allows
   (:func:`~jupyter_io.gpu_challenge.time_window`); too late, or sooner than the model's top
   speed allows, fails; so does an NVML identity that does not match the offer or the kernel
   driver's listing (real GPUs), or a simulated answer for a real offer;
3. reveals ``rows`` random rows; each opening must match the committed root (Merkle path)
   and pass Freivalds' check against every vector.

A verdict is stored (:meth:`Store.record_gpu_check`) and kept per offer (provider, GPU
model): a failure takes the offer out of the scheduler's index (the registry asks
:meth:`GpuChallenges.listed`) until a later challenge of it passes. A ``busy`` refusal is
no verdict. Verification is O(k n**2) on the coordinator's CPU, in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..gpu_challenge import (
    CPU_BAND,
    GpuIdentity,
    Verifier,
    challenge_size,
    identity_mismatch,
    merkle_verify,
    row_leaf,
    tflops_band,
    time_window,
)
from ..gpu_names import normalise_gpu_name
from ..provider_link import (
    GpuChallenge,
    GpuCommitment,
    GpuOpening,
    GpuRefused,
    GpuReply,
    GpuReveal,
)

if TYPE_CHECKING:
    from .registry import Registry
    from .scheduler import Offer

__all__ = ["ChallengeSettings", "GpuChallenges", "Verdict"]


@dataclass(frozen=True, slots=True)
class ChallengeSettings:
    """How the coordinator challenges GPUs (traits of the same names in its config)."""

    #: Challenge every GPU of a provider when it links.
    at_join: bool = True
    #: Mean seconds between challenges of idle GPUs (0: never at random).
    interval: float = 3600.0
    #: Secret 0/1 vectors per challenge (a wrong row passes all with chance <= 2**-k).
    vectors: int = 16
    #: Rows opened per challenge.
    rows: int = 8
    #: Fraction of the offer's VRAM the three matrices fill.
    vram_fraction: float = 0.8
    #: Largest n for a real GPU (the coordinator's check costs O(k n**2)).
    max_n: int = 32768
    #: n for the CPU offer and simulated GPUs.
    cpu_n: int = 1024
    #: Seconds allowed beyond the product itself (link, scheduling, hashing slack).
    overhead: float = 5.0
    #: Seconds a commitment may take for a model without a known band.
    unknown_model_timeout: float = 600.0
    #: Seconds the provider has to send the opened rows after the reveal.
    reveal_timeout: float = 60.0
    #: Take a failed offer out of the listing.
    delist: bool = True
    #: Challenges run at once, all providers together (each may take a worker thread for
    #: the O(k n**2) check): what many providers linking at once, or one relinking again and
    #: again, can cost the coordinator.
    concurrency: int = 2


@dataclass(slots=True)
class Verdict:
    """The latest judgement of an offer: ``ok`` (None: not judged yet), when, and why."""

    ok: bool | None
    at: float | None = None
    reason: str = "not challenged yet"
    seconds: float | None = None
    #: Read back from the store (not judged by this coordinator since its start).
    restored: bool = False


@dataclass(slots=True)
class _Pending:
    pubkey: str
    n: int
    commitment: asyncio.Future[GpuReply]
    rows: frozenset[int] = frozenset()
    openings: dict[int, GpuOpening] = field(default_factory=dict)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    #: The provider's link closed while the challenge was pending.
    dropped: bool = False


class GpuChallenges:
    """Challenges the GPUs of the providers linked to ``registry`` (see the module
    docstring). :meth:`start` hooks it to the registry, :meth:`stop` unhooks it;
    :meth:`challenge` runs one challenge now and returns its verdict."""

    def __init__(
        self,
        registry: Registry,
        settings: ChallengeSettings | None = None,
        *,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.settings = settings or ChallengeSettings()
        self.log = log or logging.getLogger("jupyter_io.coordinator")
        self.clock = clock
        #: Verdicts by (provider, GPU model key).
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        #: Challenges judged (passed or failed) since the start.
        self.judged = 0
        self._pending: dict[str, _Pending] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._rng = secrets.SystemRandom()

    # -- wiring ----------------------------------------------------------------------------

    def start(self) -> None:
        """Hook into the registry (links, replies, listing) and start the random challenges.
        Imports numpy now (at startup), not on the event loop at the first challenge, where
        loading its libraries would hold up every link's messages for a moment."""
        importlib.import_module("numpy")
        registry = self.registry
        registry.gpu_replies = self.reply
        registry.offer_listed = self.listed
        registry.link_listeners.append(self._linked)
        registry.unlink_listeners.append(self._unlinked)
        if self.settings.interval > 0:
            self._loop_task = asyncio.create_task(self._random_challenges(), name="gpu-checks")

    async def stop(self) -> None:
        """Stop challenging (pending challenges are dropped without a verdict)."""
        registry = self.registry
        if self._linked in registry.link_listeners:
            registry.link_listeners.remove(self._linked)
        if self._unlinked in registry.unlink_listeners:
            registry.unlink_listeners.remove(self._unlinked)
        registry.gpu_replies = None
        # Every pending challenge ends now, without a verdict, whatever it is waiting for (a
        # cancellation alone could be lost in a wait that completes at the same moment, and
        # the challenge then waited out its reveal timeout, holding up the shutdown).
        for pending in self._pending.values():
            pending.dropped = True
            if not pending.commitment.done():
                pending.commitment.cancel()
            pending.opened.set()
        tasks = list(self._tasks) + ([self._loop_task] if self._loop_task else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop_task = None

    # -- reading ---------------------------------------------------------------------------

    def verdict(self, pubkey: str, gpu: str) -> Verdict:
        """The offer's latest verdict (``ok`` None when it was never judged)."""
        return self.verdicts.get((pubkey, normalise_gpu_name(gpu))) or Verdict(None)

    def listed(self, pubkey: str, gpu: str) -> bool:
        """Whether the offer may be scheduled: not failed (or failures do not delist)."""
        return not self.settings.delist or self.verdict(pubkey, gpu).ok is not False

    def fields(self, offer: Offer) -> dict[str, Any]:
        """``verified`` (true/false/null) and ``verified_at`` (ISO 8601 or null) for the
        offers API's row of ``offer``."""
        verdict = self.verdict(offer.provider, offer.gpu)
        at = verdict.at
        return {
            "verified": verdict.ok,
            "verified_at": None
            if at is None
            else datetime.fromtimestamp(at, tz=timezone.utc).isoformat(),
        }

    # -- the link --------------------------------------------------------------------------

    def reply(self, pubkey: str, message: GpuReply) -> None:
        """A provider's ``gpu_commitment``, ``gpu_refused`` or ``gpu_opening``."""
        pending = self._pending.get(message.id)
        if pending is None or pending.pubkey != pubkey:
            return  # late, unknown, or another provider's: ignored
        if isinstance(message, GpuOpening):
            if message.row in pending.rows and message.row not in pending.openings:
                pending.openings[message.row] = message
                if len(pending.openings) == len(pending.rows):
                    pending.opened.set()
        elif not pending.commitment.done():
            pending.commitment.set_result(message)

    def _linked(self, pubkey: str) -> None:
        if self.settings.at_join:
            self._spawn(self.challenge_all(pubkey))

    def _unlinked(self, pubkey: str) -> None:
        """The provider's link closed: its pending challenges end at once, without a
        verdict, and their checks stop (no O(k n**2) work for an answer that cannot come)."""
        for pending in self._pending.values():
            if pending.pubkey == pubkey:
                pending.dropped = True
                if not pending.commitment.done():
                    pending.commitment.cancel()
                pending.opened.set()

    # -- challenging -----------------------------------------------------------------------

    def idle_gpus(self, pubkey: str) -> list[tuple[str, int]]:
        """(GPU model, device index) of the provider's offers that no lease holds."""
        state = self.registry.provider(pubkey)
        if state is None or not state.linked:
            return []
        held = {i for lease in state.leases.values() for i in lease.indices}
        idle = []
        for group in state.offers:
            cpu = normalise_gpu_name(group.gpu_model) == "cpu"
            if cpu and state.leases:
                continue  # a CPU challenge would take the CPU from a running kernel
            idle += [(group.gpu_model, i) for i in group.gpu_indices if i not in held]
        return idle

    def _link(self, pubkey: str) -> Any:
        state = self.registry.provider(pubkey)
        return None if state is None else state.link

    async def restore(self, pubkey: str) -> None:
        """Take the provider's latest stored verdict per GPU model where none is known here
        (after a coordinator restart a failed offer stays delisted)."""
        known = False
        for check in reversed(await self.registry.store.gpu_checks(pubkey)):
            key = (pubkey, normalise_gpu_name(check.gpu_model))
            current = self.verdicts.get(key)
            if current is None or (current.restored and current.at is not None):
                self.verdicts[key] = Verdict(
                    check.ok, check.at.timestamp(), check.reason, check.seconds, restored=True
                )
                known = True
        if known:
            self.registry.relist(pubkey)

    async def challenge_all(self, pubkey: str) -> list[Verdict]:
        """Challenge each idle GPU of the provider in turn (at a link), after restoring its
        stored verdicts (:meth:`restore`)."""
        await self.restore(pubkey)
        verdicts = []
        for gpu, index in self.idle_gpus(pubkey):
            verdict = await self.challenge(pubkey, gpu, index)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    async def challenge(self, pubkey: str, gpu: str, index: int) -> Verdict | None:
        """Run one challenge of device ``index`` of the provider's ``gpu`` offer now; its
        verdict (stored, and applied to the listing), or None when none was reached (not
        linked, busy, coordinator stopping)."""
        lock = self._locks.setdefault(pubkey, asyncio.Lock())
        async with lock, self._slots:
            group = self.registry.group_of(pubkey, gpu)
            if group is None:
                return None
            simulated = group.simulated or normalise_gpu_name(group.gpu_model) == "cpu"
            settings = self.settings
            n = (
                settings.cpu_n
                if simulated
                else challenge_size(
                    group.vram_bytes, fraction=settings.vram_fraction, max_n=settings.max_n
                )
            )
            outcome = await self._run(pubkey, group.gpu_model, index, n, simulated)
            if outcome is None:
                return None
            ok, reason, seconds = outcome
            verdict = Verdict(ok, self.clock(), reason, seconds)
            await self.registry.store.record_gpu_check(
                pubkey,
                group.gpu_model,
                index,
                ok=ok,
                reason=reason,
                seconds=seconds,
                n=n,
                at=datetime.fromtimestamp(verdict.at or 0.0, tz=timezone.utc),
            )
            key = (pubkey, normalise_gpu_name(group.gpu_model))
            was_listed = self.listed(pubkey, gpu)
            self.verdicts[key] = verdict
            self.judged += 1
            if was_listed != self.listed(pubkey, gpu) or ok:
                self.registry.relist(pubkey)
            log = self.log.info if ok else self.log.warning
            log("GPU challenge of %s %s #%d: %s", pubkey, group.gpu_model, index, reason)
            return verdict

    async def _run(
        self, pubkey: str, gpu: str, index: int, n: int, simulated: bool
    ) -> tuple[bool, str, float | None] | None:
        import numpy as np

        settings = self.settings
        loop = asyncio.get_running_loop()
        seed = secrets.token_bytes(32)
        challenge_id = secrets.token_hex(16)
        vectors = np.random.default_rng(secrets.randbits(128)).integers(
            0, 2, size=(n, settings.vectors), dtype=np.uint8
        )
        verifier = Verifier(seed, n, vectors)
        pending = _Pending(pubkey, n, loop.create_future())
        self._pending[challenge_id] = pending
        band = tflops_band(gpu, simulated=simulated)
        earliest, latest = time_window(n, band or CPU_BAND, overhead=settings.overhead)
        if band is None:
            earliest, latest = 0.0, settings.unknown_model_timeout
        try:
            prepared = asyncio.ensure_future(asyncio.to_thread(verifier.prepare))
            sent = loop.time()
            link = self._link(pubkey)
            if not self.registry.deliver(pubkey, GpuChallenge(challenge_id, index, seed, n), ttl=0):
                prepared.cancel()
                return None
            try:
                answer = await asyncio.wait_for(asyncio.shield(pending.commitment), latest)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.dropped or (task is not None and task.cancelling()):
                    raise
                await _settle(prepared, verifier)
                return None  # the link closed: no verdict
            except asyncio.TimeoutError:
                await _settle(prepared, verifier)
                if self._link(pubkey) is not link:
                    return None  # the link dropped (or was replaced): no verdict
                return False, f"too slow: no commitment within {latest:.2f} s (n = {n})", None
            # The link's round trip is the provider's due for the upper bound, not for the
            # lower: a stale or inflated measure (taken under load) must not make an honest,
            # quick answer look "faster than any" card, so that bound sees the whole time.
            elapsed = loop.time() - sent
            hop = (self.registry.relay_hop_ms(pubkey) or 0.0) / 1000.0
            seconds = max(0.0, elapsed - hop)
            if isinstance(answer, GpuRefused):
                await _settle(prepared, verifier)
                if answer.code == "busy":
                    return None
                return False, f"the provider could not run the challenge: {answer.reason}", None
            assert isinstance(answer, GpuCommitment)
            problem = self._judge_commitment(answer, gpu, simulated, elapsed, earliest, n)
            if problem is not None:
                await _settle(prepared, verifier)
                return False, problem, seconds
            rows = self._rng.sample(range(n), min(settings.rows, n))
            pending.rows = frozenset(rows)
            self.registry.deliver(pubkey, GpuReveal(challenge_id, tuple(rows)), ttl=0)
            try:
                await asyncio.wait_for(pending.opened.wait(), settings.reveal_timeout)
            except asyncio.TimeoutError:
                await _settle(prepared, verifier)
                if self._link(pubkey) is not link:
                    return None
                missing = len(rows) - len(pending.openings)
                return False, f"{missing} opened row(s) never came", seconds
            if pending.dropped:
                await _settle(prepared, verifier)
                return None
            await prepared
            for row in rows:
                opening = pending.openings[row]
                leaf = row_leaf(row, opening.values)
                if not merkle_verify(answer.root, leaf, row, opening.proof, n):
                    return False, f"row {row} does not match the commitment", seconds
                wrong = await asyncio.to_thread(verifier.check_row, row, opening.values)
                if wrong is not None:
                    return False, f"wrong product: {wrong}", seconds
            what = "simulated, not checked" if simulated else "NVML matches the driver"
            band_text = f"band {band[0]:g}-{band[1]:g} TFLOP/s" if band else "no known band"
            tflops = 2.0 * n**3 / max(seconds, 1e-9) / 1e12
            return (
                True,
                f"passed: n = {n}, {seconds:.2f} s (~{tflops:.3g} TFLOP/s, {band_text}); "
                f"identity: {what}",
                seconds,
            )
        finally:
            self._pending.pop(challenge_id, None)
            verifier.stop()  # a no-op once prepared; else (stopping) its thread ends soon

    @staticmethod
    def _judge_commitment(
        answer: GpuCommitment, gpu: str, simulated: bool, seconds: float, earliest: float, n: int
    ) -> str | None:
        if answer.simulated and not simulated:
            return f"the offer claims a real {gpu} but the challenge ran simulated"
        if seconds < earliest:
            return (
                f"faster than any {gpu}: {seconds:.3f} s for n = {n}, the model needs at "
                f"least {earliest:.3f} s"
            )
        if simulated:
            return None
        if not answer.nvml_name:
            return "no NVML identity for the device"
        if normalise_gpu_name(answer.nvml_name) != normalise_gpu_name(gpu):
            return f"NVML names the device {answer.nvml_name!r}, the offer claims {gpu!r}"
        if not answer.driver_information:
            return "no kernel driver listing for the device"
        identity = GpuIdentity(answer.nvml_name, answer.nvml_uuid, answer.nvml_pci_bus_id)
        return identity_mismatch(identity, answer.driver_information)

    async def _random_challenges(self) -> None:
        while True:
            await asyncio.sleep(self._rng.expovariate(1.0 / self.settings.interval))
            candidates = [
                (state.pubkey, gpu, index)
                for state in self.registry.providers()
                if not self._locks.get(state.pubkey, asyncio.Lock()).locked()
                for gpu, index in self.idle_gpus(state.pubkey)
            ]
            if candidates:
                self._spawn(self.challenge(*self._rng.choice(candidates)))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("GPU challenge failed", exc_info=task.exception())


async def _settle(task: asyncio.Future[Any], verifier: Verifier) -> None:
    # Stop the verifier's thread (it ends after its current block) and wait for it, so no
    # work outlives the call.
    verifier.stop()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task
