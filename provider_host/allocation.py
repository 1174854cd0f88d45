"""Which session holds which GPU: each session gets one real GPU of its own.

Call :meth:`GpuPool.acquire` when a session is created (None means every GPU is taken: refuse
with ``capacity``) and :meth:`GpuPool.release` when it ends. A host without real GPUs hands out
``()``, i.e. CPU-only sessions, without limit (``max_sessions`` still applies).

With a coordinator the lease token names the GPUs: :meth:`GpuPool.held_by_others` checks that
none of them is in use (the coordinator should never grant a GPU twice; this host does not
take its word for it), then :meth:`GpuPool.hold` records them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["GpuPool"]


class GpuPool:
    """Exclusive assignment of real GPU indices to sessions."""

    def __init__(self, indices: Sequence[int]) -> None:
        self._free = list(indices)
        self._held: dict[str, tuple[int, ...]] = {}
        self._has_gpus = bool(indices)

    def acquire(self, holder: str) -> tuple[int, ...] | None:
        """GPU indices for ``holder``: one GPU, ``()`` on a CPU host, None when all are taken."""
        if not self._has_gpus:
            self._held[holder] = ()
            return ()
        if not self._free:
            return None
        gpus = (self._free.pop(0),)
        self._held[holder] = gpus
        return gpus

    def next_free(self) -> tuple[int, ...] | None:
        """What :meth:`acquire` would give now (None: nothing)."""
        if not self._has_gpus:
            return ()
        return (self._free[0],) if self._free else None

    def release(self, holder: str) -> None:
        """Give ``holder``'s GPUs back (idempotent)."""
        for index in self._held.pop(holder, ()):
            self._free.append(index)
        self._free.sort()

    def held_by_others(self, indices: Sequence[int]) -> list[int]:
        """Those of ``indices`` that a session holds now."""
        held = {i for gpus in self._held.values() for i in gpus}
        return sorted(held.intersection(indices))

    def hold(self, holder: str, indices: Sequence[int]) -> None:
        """Record that ``holder`` uses ``indices`` (as the lease token assigned them)."""
        self._held[holder] = tuple(indices)
        self._free = [i for i in self._free if i not in indices]

    def available(self) -> bool:
        """True when :meth:`acquire` would succeed."""
        return not self._has_gpus or bool(self._free)
