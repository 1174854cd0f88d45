"""The server's remote kernels and what they cost so far, for ``GET /jupyter-io/sessions``.

A session here is a kernel whose provisioner is io-remote
(:class:`~kernel_provisioner.provisioner.RemoteKernelProvisioner`), running or starting (a
kernel whose start failed is left out: it costs nothing). Cost so far is the lease's price
times the time since the lease was granted (its ``leased`` progress event), in whole
lamports, so it ticks between the coordinator's figures. The escrow figures are the
coordinator's (the lease's ``billing`` block, ``docs/payments-contract.md`` section 3, via
:class:`~jupyter_io.serverext.billing.LeaseBook`): the deposit, what is spent and left, and
the warning (80, 95, 100 % of the deposit spent). They are None for a lease without escrow
(a free coordinator, a provider named directly) or while the coordinator cannot be asked.

:func:`stopped_json` describes the leases the coordinator ended because their deposit was
spent, so the browser can say why a kernel stopped and what to do.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kernel_provisioner.provisioner import RemoteKernelProvisioner

from ..coordinator_client import BUDGET_EXHAUSTED, LeaseInfo
from ..payments.amounts import format_sol
from .preferences import Preferences

__all__ = ["BUDGET_ADVICE", "list_sessions", "session_json", "stopped_json"]

#: What to do when a session's deposit runs out, for people.
BUDGET_ADVICE = (
    "Raise the session budget (Settings → jupyter-io GPUs) so the next kernel deposits "
    "more, then start a kernel again; top up a running kernel's escrow before it runs out."
)


def _escrow_fields(info: LeaseInfo | None) -> dict[str, Any]:
    billing = info.billing if info is not None else None
    if billing is None or info is None or not (info.escrow and info.escrow.required):
        return {
            "escrow": None,
            "escrow_lamports": None,
            "escrow_left_lamports": None,
            "escrow_spent_lamports": None,
            "billed_seconds": None,
            "used_fraction": None,
            "warning": None,
            "lease_state": info.state if info is not None else None,
            "end_reason": info.end_reason if info is not None else None,
        }
    return {
        "escrow": billing.escrow,
        "escrow_lamports": billing.deposit_lamports,
        "escrow_left_lamports": billing.left_lamports,
        "escrow_spent_lamports": billing.spent_lamports,
        "billed_seconds": billing.billed_seconds,
        "used_fraction": billing.used_fraction,
        "warning": billing.warning,
        "lease_state": info.state,
        "end_reason": info.why_ended,
    }


def session_json(
    kernel_id: str,
    kernel_name: str,
    provisioner: RemoteKernelProvisioner,
    preferences: Preferences,
    now: float,
    lease_info: LeaseInfo | None = None,
    *,
    starting: bool = False,
) -> dict[str, Any]:
    """One remote kernel's row: GPU, provider, price, elapsed seconds, cost so far, budget,
    and the escrow as the coordinator bills it (``lease_info``, when known)."""
    lease = provisioner.lease
    grant = lease.grant if lease is not None else None
    events = provisioner.progress
    # The current lease began at its latest "leased" step; kernels that name their provider
    # directly (no lease, no price) count from their first "ready".
    begun = next((e.at for e in reversed(events) if e.step.value == "leased"), None)
    if begun is None:
        begun = next((e.at for e in events if e.step.value == "ready"), None)
    elapsed = max(0.0, now - begun) if begun is not None else None
    price = grant.price_lamports_per_hour if grant is not None else None
    cost = None if price is None or elapsed is None else int(price * elapsed // 3600)
    budget_hours = preferences.session_budget_hours
    budget = None if price is None or budget_hours is None else int(price * budget_hours)
    spec = provisioner.kernel_spec
    spec_io = ((spec.metadata or {}).get("jupyter_io") or {}) if spec else {}
    spec_gpu = spec_io.get("display")
    spec_cohort = spec_io.get("cohort")
    return {
        "kernel_id": kernel_id,
        "kernel_name": kernel_name,
        "state": _row_state(starting, lease_info),
        "gpu": grant.gpu if grant is not None else spec_gpu,
        "provider": grant.provider if grant is not None else None,
        "lease": grant.lease if grant is not None else None,
        "relay": grant.relay if grant is not None else None,
        "coordinator_url": provisioner.coordinator_url or None,
        "provider_url": provisioner.provider_url or None,
        "price_lamports_per_hour": price,
        # The tunnel's live round trip (keepalive pings) and the one measured before the lease.
        "round_trip": provisioner.round_trip_json(),
        "started_at": begun,
        "elapsed_seconds": elapsed,
        "cost_lamports": cost,
        "cost": None if cost is None else format_sol(cost),
        "budget_lamports": budget,
        "budget_left_lamports": None if budget is None or cost is None else budget - cost,
        **_escrow_fields(lease_info),
        # A class's kernel: which class pays, and the stops it warns of (idle, max length,
        # quota) while the lease lives.
        "cohort": lease_info.cohort if lease_info is not None else spec_cohort,
        "warnings": list(lease_info.warnings) if lease_info is not None and lease_info.live else [],
    }


def _row_state(starting: bool, info: LeaseInfo | None) -> str:
    """``starting``, ``running``, or ``stopped`` once the coordinator ended the lease (the
    kernel goes away after it: the provider stops it)."""
    if info is not None and not info.live:
        return "stopped"
    return "starting" if starting else "running"


def _state(km: Any, provisioner: RemoteKernelProvisioner) -> str | None:
    """``starting`` or ``running`` for a kernel worth a row, None for one that is not: its
    start failed, or it is being shut down after its session ended.

    Pending kernels (see :class:`~jupyter_io.serverext.app.JupyterIOExtension`) are listed
    while they start *and* while they shut down; the provisioner's progress tells the two
    apart: a start in progress has not reached ``ready`` yet.
    """
    if getattr(km, "execution_state", None) == "dead":
        return None
    ready = getattr(km, "ready", None)
    if ready is not None and ready.done():
        if ready.cancelled() or ready.exception() is not None:
            return None
        return "running" if provisioner.has_process else None
    last = provisioner.progress[-1].step.value if provisioner.progress else None
    if last == "failed":
        return None
    if last == "ready":  # shutting down or restarting: billed while the session lasts
        return "running" if provisioner.has_process else None
    return "starting"


def list_sessions(
    kernel_manager: Any,
    preferences: Preferences,
    now: float | None = None,
    leases: Mapping[str, LeaseInfo] | None = None,
) -> list[dict[str, Any]]:
    """A row per starting or running io-remote kernel of ``kernel_manager`` (Jupyter
    Server's MappingKernelManager), in the manager's order; ``leases`` (by lease id) give
    the escrow figures."""
    now = time.time() if now is None else now
    leases = leases or {}
    rows = []
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        try:
            km = kernel_manager.get_kernel(kernel_id)
        except KeyError:  # ended meanwhile
            continue
        provisioner = getattr(km, "provisioner", None)
        if not isinstance(provisioner, RemoteKernelProvisioner):
            continue
        state = _state(km, provisioner)
        if state is None:
            continue
        grant = provisioner.lease.grant if provisioner.lease is not None else None
        info = leases.get(grant.lease) if grant is not None else None
        rows.append(
            session_json(
                kernel_id,
                km.kernel_name,
                provisioner,
                preferences,
                now,
                info,
                starting=state == "starting",
            )
        )
    return rows


def stopped_json(kernel_id: str, info: LeaseInfo) -> dict[str, Any]:
    """A lease the coordinator ended because its deposit was spent: what it cost and what
    to do."""
    billing = info.billing
    deposit = billing.deposit_lamports if billing is not None else None
    return {
        "kernel_id": kernel_id,
        "lease": info.lease,
        "gpu": info.gpu,
        "ended_at": info.ended_at,
        "reason": info.why_ended or BUDGET_EXHAUSTED,
        "escrow_lamports": deposit,
        "escrow_spent_lamports": billing.spent_lamports if billing is not None else None,
        "message": (
            f"The coordinator stopped the {info.gpu} kernel: its escrow of "
            f"{format_sol(deposit or 0)} is spent (budget exhausted)."
        ),
        "advice": BUDGET_ADVICE,
    }
