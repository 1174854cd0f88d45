"""Metering: how many seconds of service a lease has had, as signed usage reports.

The coordinator bills from these (``docs/coordinator-contract.md`` section 1, item 5). Each
lease hosted here gets a :class:`UsageMeter` when its session is admitted;
:meth:`UsageMeter.start` is called when its kernel first starts (service is delivered from
kernel ready, not from connect), :meth:`UsageMeter.report` makes the next report (``seq``
counts up, ``seconds`` is the total so far, so a lost report costs nothing: the next one
carries it) and :meth:`UsageMeter.stop` freezes the total when the session ends, before the
last report. Reports are signed with the provider's key by
:func:`jupyter_io.signing.sign_usage`. With :attr:`UsageMeter.idle` set (the session's
:meth:`~provider_host.activity.SessionActivity.idle_seconds`) they carry ``idle_seconds``,
which a class's idle timeout counts.

:class:`GpuUtilisation` reads NVML's utilisation of the lease's GPUs (None where NVML is
missing, and for simulated GPUs or CPU slots, which have none).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from solders.keypair import Keypair

from jupyter_io.signing import sign_usage

__all__ = ["GpuUtilisation", "UsageMeter"]

log = logging.getLogger(__name__)


class GpuUtilisation:
    """NVML's GPU utilisation, 0..1, averaged over some devices; None when unknown.

    Initialises NVML on first use and keeps it; :meth:`close` shuts it down.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def _init(self) -> Any:
        if not self._tried:
            self._tried = True
            if importlib.util.find_spec("pynvml") is not None:
                import pynvml

                try:
                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except pynvml.NVMLError as exc:
                    log.info("NVML unavailable (%s): usage reports carry no utilisation", exc)
        return self._nvml

    def __call__(self, gpu_indices: Sequence[int]) -> float | None:
        """Mean utilisation of the real GPUs ``gpu_indices`` (NVML indices), or None."""
        if not gpu_indices:
            return None
        nvml = self._init()
        if nvml is None:
            return None
        try:
            rates = [
                nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(i)).gpu
                for i in gpu_indices
            ]
        except nvml.NVMLError as exc:
            log.debug("NVML utilisation failed: %s", exc)
            return None
        return round(sum(rates) / (100.0 * len(rates)), 4)

    def close(self) -> None:
        """Shut NVML down if it was started."""
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


class UsageMeter:
    """Seconds of service delivered on one lease, and its numbered signed reports.

    ``gpus`` are the real GPU indices the lease's kernel is pinned to (for utilisation);
    ``clock`` is monotonic seconds (injectable for tests), ``wall`` Unix seconds for ``at``.
    """

    def __init__(
        self,
        lease_id: str,
        gpus: Sequence[int] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.lease_id = lease_id
        self.gpus = tuple(gpus)
        self._clock = clock
        self._wall = wall
        self._started: float | None = None
        self._stopped: float | None = None
        self._seq = 0
        #: Seconds the kernel has been idle, reported as ``idle_seconds`` (None: not
        #: reported). Coordinators that predate the field ignore it; the signature covers it.
        self.idle: Callable[[], int] | None = None

    @classmethod
    def restored(
        cls, lease_id: str, seconds: int, seq: int, gpus: Sequence[int] = (), **clocks: Any
    ) -> UsageMeter:
        """A stopped meter that delivered ``seconds`` and made ``seq`` reports (what a host
        saved before it restarted): its next report carries ``seq + 1`` and that total."""
        meter = cls(lease_id, gpus, **clocks)
        if seconds > 0:  # exact: a stopped meter never reads its clock again
            meter._started, meter._stopped = 0.0, float(seconds)
        meter._seq = max(0, seq)
        return meter

    @property
    def seq(self) -> int:
        """How many reports were made (the last one's ``seq``)."""
        return self._seq

    @property
    def started(self) -> bool:
        """True once the lease's kernel first started."""
        return self._started is not None

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` froze the total."""
        return self._stopped is not None

    def start(self) -> None:
        """The kernel is ready: service starts now (later calls change nothing)."""
        if self._started is None:
            self._started = self._clock()

    def stop(self) -> None:
        """The session ended: service stops now (idempotent)."""
        if self._stopped is None:
            self._stopped = self._clock()

    def seconds(self) -> int:
        """Whole seconds delivered so far (0 before the kernel started)."""
        if self._started is None:
            return 0
        end = self._stopped if self._stopped is not None else self._clock()
        return max(0, math.floor(end - self._started))

    def report(self, keypair: Keypair, utilisation: float | None = None) -> dict[str, Any]:
        """The next signed ``usage`` message (a fresh ``seq`` each call)."""
        self._seq += 1
        fields = {
            "type": "usage",
            "lease": self.lease_id,
            "seq": self._seq,
            "seconds": self.seconds(),
            "gpu_utilisation": utilisation,
            "at": self._wall(),
        }
        if self.idle is not None:
            fields["idle_seconds"] = self.idle()
        return sign_usage(keypair, fields)
