"""Progress of a remote kernel's start, as structured log records others can publish.

A remote start takes longer than a local one (a lease from the coordinator, a tunnel, the
provider's own kernel start), so the provisioner reports each step as it happens::

    queued → [queue …] → leased → escrowed → launching → [environment] → ready
                                                                (or failed, anywhere)

``queue`` only for a class's kernel waiting for a GPU in the class's queue (once per new
place or estimate: ``"In the queue: place 3, about 4 min"``).

``queued`` and ``leased`` only happen with a coordinator (``coordinator_url``), ``escrowed``
only with a coordinator that is paid through an escrow (``docs/payments-contract.md``),
``environment`` only when the provider builds a cohort's course environment first (its
``state`` detail: ``building``, then ``ready`` or ``failed``); a kernelspec that names its
provider directly starts at ``launching``. Each step is one
:class:`ProgressEvent`, logged at INFO on the provisioner's logger with the event's JSON
form in the record's :data:`PROGRESS_ATTR` attribute, so a logging handler (a Jupyter
Server extension, say) can pick the records out and publish them without parsing text::

    class Publish(logging.Handler):
        def emit(self, record):
            event = getattr(record, PROGRESS_ATTR, None)
            if event is not None:
                send_to_the_browser(event)   # {"step", "kernel_id", "message", "at", ...}

The provisioner also keeps its events in ``RemoteKernelProvisioner.progress``.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROGRESS_ATTR", "ProgressEvent", "ProgressStep", "report"]

#: The attribute of a log record that carries a progress event's JSON form.
PROGRESS_ATTR = "jupyter_io_progress"


class ProgressStep(str, enum.Enum):
    """The steps of a remote kernel's start, in order (``failed`` may end any of them)."""

    QUEUED = "queued"
    """A lease was requested from the coordinator."""
    QUEUE = "queue"
    """A class's request waits in the class's queue (no GPU of its types free): ``place``,
    ``waiting``, ``estimated_wait_seconds``, ``expires_at``, ``ticket``; repeated as they
    change (:mod:`jupyter_io.queue_tickets`)."""
    LEASED = "leased"
    """The coordinator granted a lease: provider, GPU and price are known."""
    ESCROWED = "escrowed"
    """The lease's escrow is funded and the coordinator verified it on-chain (escrow address,
    deposit, setup signature are known); the lease has its token."""
    LAUNCHING = "launching"
    """The tunnel to the provider is open; the provider is starting the kernel."""
    ENVIRONMENT = "environment"
    """The provider builds the cohort's course environment before the kernel can start
    (only on its first start there); ``state`` is ``building``, ``ready`` or ``failed``."""
    READY = "ready"
    """The kernel runs and answers through the local facade."""
    FAILED = "failed"
    """The start failed; ``message`` says why."""
    FAILOVER = "failover"
    """The provider was lost and the kernel moves to another (``failover`` trait): ``phase``
    ``lost`` (old provider, reason), then ``leased``/``escrowed``/``launching``/``ready`` of
    the new lease, then ``done`` (old and new provider, ``restored`` and ``missing``
    variables with their cells) or ``failed`` (the kernel is lost, as without failover)."""


@dataclass(frozen=True)
class ProgressEvent:
    """One step of one kernel's start."""

    step: ProgressStep
    #: The kernel manager's kernel id (None outside a kernel manager).
    kernel_id: str | None
    #: One line for people: what happened, naming provider, GPU or reason.
    message: str
    #: Unix seconds.
    at: float = field(default_factory=time.time)
    #: Step-specific facts (lease id, provider, GPU, price in lamports, relay, ...).
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"step", "kernel_id", "message", "at", **details}``."""
        return {
            **self.details,
            "step": self.step.value,
            "kernel_id": self.kernel_id,
            "message": self.message,
            "at": self.at,
        }


def report(log: logging.Logger | logging.LoggerAdapter[Any], event: ProgressEvent) -> ProgressEvent:
    """Log ``event`` (INFO, or WARNING for ``failed``) with its JSON in :data:`PROGRESS_ATTR`."""
    level = logging.WARNING if event.step is ProgressStep.FAILED else logging.INFO
    log.log(
        level,
        "jupyter-io: %s: %s",
        event.step.value,
        event.message,
        extra={PROGRESS_ATTR: event.to_json()},
    )
    return event
