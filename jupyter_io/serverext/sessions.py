"""The server's remote kernels and what they cost so far, for ``GET /jupyter-io/sessions``.

A session here is a running kernel whose provisioner is io-remote
(:class:`~kernel_provisioner.provisioner.RemoteKernelProvisioner`). Cost so far is the lease's
price times the time since the lease was granted (its ``leased`` progress event), in whole
lamports; the escrow fields stay None until escrow lands in the provisioner.
"""

from __future__ import annotations

import time
from typing import Any

from kernel_provisioner.provisioner import RemoteKernelProvisioner

from ..payments.amounts import format_sol
from .preferences import Preferences

__all__ = ["list_sessions", "session_json"]


def session_json(
    kernel_id: str,
    kernel_name: str,
    provisioner: RemoteKernelProvisioner,
    preferences: Preferences,
    now: float,
) -> dict[str, Any]:
    """One remote kernel's row: GPU, provider, price, elapsed seconds, cost so far, budget."""
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
    return {
        "kernel_id": kernel_id,
        "kernel_name": kernel_name,
        "gpu": grant.gpu if grant is not None else None,
        "provider": grant.provider if grant is not None else None,
        "lease": grant.lease if grant is not None else None,
        "relay": grant.relay if grant is not None else None,
        "coordinator_url": provisioner.coordinator_url or None,
        "provider_url": provisioner.provider_url or None,
        "price_lamports_per_hour": price,
        "started_at": begun,
        "elapsed_seconds": elapsed,
        "cost_lamports": cost,
        "cost": None if cost is None else format_sol(cost),
        "budget_lamports": budget,
        "budget_left_lamports": None if budget is None or cost is None else budget - cost,
        # Escrow arrives with the payments work; the fields are here so clients need not
        # change when it does.
        "escrow_lamports": None,
        "escrow_left_lamports": None,
    }


def list_sessions(
    kernel_manager: Any, preferences: Preferences, now: float | None = None
) -> list[dict[str, Any]]:
    """A row per running io-remote kernel of ``kernel_manager`` (Jupyter Server's
    MappingKernelManager), in the manager's order."""
    now = time.time() if now is None else now
    rows = []
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        try:
            km = kernel_manager.get_kernel(kernel_id)
        except KeyError:  # ended meanwhile
            continue
        provisioner = getattr(km, "provisioner", None)
        if isinstance(provisioner, RemoteKernelProvisioner):
            rows.append(session_json(kernel_id, km.kernel_name, provisioner, preferences, now))
    return rows
