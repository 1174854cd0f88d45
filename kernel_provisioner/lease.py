"""One provisioner's lease from the marketplace coordinator: request, token renewal, end.

:class:`KernelLease` wraps :class:`~jupyter_io.coordinator.client.CoordinatorClient` for the
provisioner (``docs/coordinator-contract.md`` section 2)::

    lease = KernelLease(coordinator_url, keypair)
    grant = await lease.request(LeaseTerms(gpu="RTX 4090", max_price_lamports_per_hour=...))
    client = TunnelClient(grant.tunnel_url, keypair, credentials=lease.credentials, ...)
    ...
    await lease.end()        # DELETE /api/v1/leases/{id}; idempotent
    lease.close()

:meth:`KernelLease.credentials` is the tunnel's
:data:`~kernel_provisioner.connection.CredentialSource`: the token for HELLO and, when the
lease is relayed, the ``X-JIO-Lease-Token`` header; it renews the token (``POST
/api/v1/leases/{id}/token``) when it is about to expire, so a session may resume after its
first token's life. Refusals raise :class:`LeaseRefused` (a :class:`KernelLaunchError` and a
:class:`LeaseError`) carrying the coordinator's message, which names the GPU types on offer or
the cheapest price; an unreachable coordinator raises :class:`KernelLaunchError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from solders.keypair import Keypair

from jupyter_io.coordinator.client import CoordinatorClient, LeaseGrant, LeaseInfo
from jupyter_io.errors import JupyterIOError, KernelLaunchError, LeaseError
from jupyter_io.payments.amounts import format_sol

from .connection import Credentials

__all__ = ["KernelLease", "LeaseRefused", "LeaseTerms"]

#: Renew the token when it has less than this many seconds left, or less than a tenth of
#: its life when that is shorter (a coordinator may hand out short-lived tokens).
RENEW_MARGIN_S = 120.0


class LeaseRefused(KernelLaunchError, LeaseError):
    """The coordinator leased nothing: no offer fits the kernelspec's request (the message is
    the coordinator's: GPU types on offer, the cheapest price against the cap, capacity)."""


@dataclass(frozen=True)
class LeaseTerms:
    """What a kernelspec asks the coordinator for (``POST /api/v1/leases``)."""

    gpu: str | None = None
    min_vram_bytes: int | None = None
    max_price_lamports_per_hour: int | None = None
    region: str | None = None
    gpus: int = 1

    def describe(self) -> str:
        """``RTX 4090, ≤ 0.5 SOL/h, region eu-west`` (for progress messages)."""
        parts = [self.gpu or "any GPU"]
        if self.min_vram_bytes:
            parts.append(f"≥ {self.min_vram_bytes / (1 << 30):g} GiB VRAM")
        if self.max_price_lamports_per_hour is not None:
            parts.append(f"≤ {format_sol(self.max_price_lamports_per_hour)}/h")
        if self.region:
            parts.append(f"region {self.region}")
        return ", ".join(parts)


class KernelLease:
    """The lease behind one provisioner's tunnel session (see the module docstring).

    ``timeout`` bounds each coordinator request. All methods run on the provisioner's event
    loop; call :meth:`close` when the provisioner is done with the coordinator.
    """

    def __init__(
        self,
        coordinator_url: str,
        keypair: Keypair,
        *,
        timeout: float = 30.0,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.coordinator_url = coordinator_url
        self.keypair = keypair
        self.timeout = timeout
        self.log = log or logging.getLogger(__name__)
        #: The current grant (None before :meth:`request` and after :meth:`end`).
        self.grant: LeaseGrant | None = None
        #: True once a tunnel session presented the grant's token: the provider binds a
        #: lease to one session, so a new session needs a new lease.
        self.bound = False
        self._client: CoordinatorClient | None = None
        self._margin = RENEW_MARGIN_S

    @property
    def client(self) -> CoordinatorClient:
        """The coordinator's REST client (created on first use)."""
        if self._client is None:
            self._client = CoordinatorClient(
                self.coordinator_url, self.keypair, timeout=self.timeout
            )
        return self._client

    async def request(self, terms: LeaseTerms) -> LeaseGrant:
        """Lease GPUs on ``terms``; remember and return the grant.

        Raises :class:`LeaseRefused` with the coordinator's reason when no offer fits, and
        :class:`KernelLaunchError` when the coordinator cannot be reached or refuses our key.
        """
        try:
            grant = await self.client.request_lease(
                terms.gpu,
                gpus=terms.gpus,
                min_vram_bytes=terms.min_vram_bytes,
                max_price_lamports_per_hour=terms.max_price_lamports_per_hour,
                region=terms.region,
            )
        except LeaseError as exc:
            raise LeaseRefused(f"no lease from {self.coordinator_url}: {exc}") from None
        except JupyterIOError as exc:
            raise KernelLaunchError(
                f"cannot lease from the coordinator at {self.coordinator_url}: {exc}"
            ) from None
        self.grant = grant
        self.bound = False
        self._learn_life(grant)
        return grant

    def _learn_life(self, grant: LeaseGrant) -> None:
        life = grant.expires_at - time.time()
        if life > 0:
            self._margin = min(RENEW_MARGIN_S, life / 10)

    async def credentials(self, stale: bool = False) -> Credentials:
        """The token (and relay header) for the next tunnel connection; renews the token
        first when it is ``stale`` (refused) or about to expire. A failed renewal is logged
        and the current token used: the connection attempt then says what is wrong."""
        grant = self.grant
        if grant is None:
            raise KernelLaunchError("no lease to connect with; the lease has ended")
        left = grant.expires_at - time.time()
        if stale or left < self._margin:
            try:
                renewed = await self.client.renew_token(grant.lease)
            except JupyterIOError as exc:
                self.log.warning(
                    "jupyter-io: cannot renew the token of lease %s: %s", grant.lease, exc
                )
            else:
                grant = self.grant = renewed
                self._learn_life(renewed)
                self.log.info(
                    "jupyter-io: renewed the token of lease %s (valid %.0f s)",
                    grant.lease,
                    grant.expires_at - time.time(),
                )
        self.bound = True
        return Credentials(grant.token, grant.relay_headers())

    async def end(self, timeout: float | None = None) -> LeaseInfo | None:
        """End the lease (``DELETE``; idempotent) and forget it. Returns the final record,
        or None when there was no lease or the coordinator could not be told (logged: the
        lease then ends when its token expires unused, or when the provider reports the
        session's end)."""
        grant, self.grant = self.grant, None
        self.bound = False
        if grant is None:
            return None
        try:
            info = await asyncio.wait_for(
                self.client.end_lease(grant.lease), timeout or self.timeout
            )
        except (JupyterIOError, asyncio.TimeoutError) as exc:
            self.log.warning(
                "jupyter-io: could not end lease %s at %s: %s",
                grant.lease,
                self.coordinator_url,
                exc or "timed out",
            )
            return None
        self.log.info("jupyter-io: lease %s %s", grant.lease, info.state)
        return info

    def close(self) -> None:
        """Release the HTTP client (the lease itself is untouched)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any] | None:
        """The grant as JSON (for ``get_provisioner_info``), or None without one."""
        grant = self.grant
        if grant is None:
            return None
        return {
            "lease": grant.lease,
            "token": grant.token,
            "provider": grant.provider,
            "tunnel_url": grant.tunnel_url,
            "relay": grant.relay,
            "gpu": grant.gpu,
            "gpu_indices": list(grant.gpu_indices),
            "price_lamports_per_hour": grant.price_lamports_per_hour,
            "expires_at": grant.expires_at,
            "bound": self.bound,
        }

    def restore(self, body: dict[str, Any]) -> LeaseGrant:
        """Take over a grant saved by :meth:`to_json` (another process's lease)."""
        self.grant = LeaseGrant.from_json(body)
        self.bound = bool(body.get("bound", True))
        return self.grant
