"""An async client of the coordinator's REST API, for users, provisioners and the CLI.

::

    client = CoordinatorClient("http://127.0.0.1:8700", keypair)
    grant = await client.request_lease(gpu="RTX 4090", max_price_lamports_per_hour=2_000_000)
    # connect the tunnel to grant.tunnel_url, presenting grant.token (relay: as the
    # X-JIO-Lease-Token header too, see relay_headers())
    await client.end_lease(grant.lease)
    client.close()

Requests that act for a key are signed with
:func:`~jupyter_io.coordinator.auth.sign_request`. Errors: :class:`~jupyter_io.errors.LeaseError`
when no offer fits (409, with the coordinator's message naming the GPU types or the cheapest
price), :class:`~jupyter_io.errors.AuthError` for 401/403, :class:`CoordinatorError` for
everything else (unreachable, 404, 5xx), each with a message that says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from solders.keypair import Keypair
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from ..errors import AuthError, ConfigError, JupyterIOError, LeaseError
from .auth import HEADER_LEASE_TOKEN, sign_request

__all__ = ["CoordinatorClient", "CoordinatorError", "LeaseGrant", "LeaseInfo"]


class CoordinatorError(JupyterIOError):
    """The coordinator could not be reached or answered with an unexpected error."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease (the body of ``201`` to ``POST /api/v1/leases``)."""

    lease: str
    token: str
    provider: str
    tunnel_url: str
    relay: bool
    gpu: str
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    expires_at: float

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> LeaseGrant:
        return cls(
            lease=body["lease"],
            token=body["token"],
            provider=body["provider"],
            tunnel_url=body["tunnel_url"],
            relay=bool(body["relay"]),
            gpu=body["gpu"],
            gpu_indices=tuple(body["gpu_indices"]),
            price_lamports_per_hour=int(body["price_lamports_per_hour"]),
            expires_at=float(body["expires_at"]),
        )

    def relay_headers(self) -> dict[str, str]:
        """Headers the relay's client side needs (empty for a direct lease)."""
        return {HEADER_LEASE_TOKEN: self.token} if self.relay else {}


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as ``GET /api/v1/leases/{id}`` shows it; times are Unix seconds."""

    lease: str
    user: str
    provider: str
    gpu: str
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    state: str
    relay: bool
    tunnel_url: str | None
    requested_at: float
    active_at: float | None
    ended_at: float | None
    end_of_service: float | None
    failure_reason: str | None
    expires_at: float | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> LeaseInfo:
        return cls(
            lease=body["lease"],
            user=body["user"],
            provider=body["provider"],
            gpu=body["gpu"],
            gpu_indices=tuple(body["gpu_indices"]),
            price_lamports_per_hour=int(body["price_lamports_per_hour"]),
            state=body["state"],
            relay=bool(body["relay"]),
            tunnel_url=body.get("tunnel_url"),
            requested_at=float(body["requested_at"]),
            active_at=body.get("active_at"),
            ended_at=body.get("ended_at"),
            end_of_service=body.get("end_of_service"),
            failure_reason=body.get("failure_reason"),
            expires_at=body.get("expires_at"),
        )

    @property
    def live(self) -> bool:
        return self.state in ("requested", "active")


class CoordinatorClient:
    """Talks to one coordinator. ``keypair`` signs lease requests (not needed for
    :meth:`info` and :meth:`offers`). ``ca_certs`` trusts a private CA for https. Call
    :meth:`close` when done (or use ``async with``)."""

    def __init__(
        self,
        url: str,
        keypair: Keypair | None = None,
        *,
        timeout: float = 30.0,
        ca_certs: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"coordinator URL {url!r} must look like http://HOST:PORT (https:// with TLS)"
            )
        self.url = url.rstrip("/")
        self._base_path = parts.path.rstrip("/")
        self.keypair = keypair
        self.timeout = timeout
        self.ca_certs = ca_certs
        self._http = AsyncHTTPClient(force_instance=True)

    def close(self) -> None:
        self._http.close()

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """``{"coordinator", "version", "relay"}``: check you reached the right coordinator."""
        return await self._call("GET", "/api/v1/info")

    async def offers(self) -> dict[str, Any]:
        """``{"types": [...], "providers": [...]}``: what is on offer now."""
        return await self._call("GET", "/api/v1/offers")

    async def status(self) -> dict[str, Any]:
        """The coordinator's counters (providers linked, heartbeats absorbed, ...)."""
        return await self._call("GET", "/api/v1/status")

    async def request_lease(
        self,
        gpu: str | None = None,
        *,
        gpus: int = 1,
        min_vram_bytes: int | None = None,
        max_price_lamports_per_hour: int | None = None,
        region: str | None = None,
    ) -> LeaseGrant:
        """Lease GPUs; :class:`LeaseError` with the coordinator's reason when none fits."""
        body = {
            "gpu": gpu,
            "min_vram_bytes": min_vram_bytes,
            "gpus": gpus,
            "max_price_lamports_per_hour": max_price_lamports_per_hour,
            "region": region,
        }
        return LeaseGrant.from_json(await self._call("POST", "/api/v1/leases", body, sign=True))

    async def get_lease(self, lease_id: str) -> LeaseInfo:
        """Your lease's record (state, times, failure reason)."""
        return LeaseInfo.from_json(await self._call("GET", f"/api/v1/leases/{lease_id}", sign=True))

    async def end_lease(self, lease_id: str) -> LeaseInfo:
        """End your lease (idempotent); returns its final record."""
        return LeaseInfo.from_json(
            await self._call("DELETE", f"/api/v1/leases/{lease_id}", sign=True)
        )

    async def renew_token(self, lease_id: str) -> LeaseGrant:
        """A fresh token for your live lease (to resume a session after the old one expired)."""
        return LeaseGrant.from_json(
            await self._call("POST", f"/api/v1/leases/{lease_id}/token", b"", sign=True)
        )

    # -- plumbing --------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, body: Any = None, *, sign: bool = False
    ) -> dict[str, Any]:
        data: bytes | None
        if body is None:
            data = None if method in ("GET", "DELETE") else b""
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if sign:
            if self.keypair is None:
                raise ConfigError("this request must be signed: give CoordinatorClient a keypair")
            signed_path = self._base_path + path  # what the server sees as the request path
            headers.update(sign_request(self.keypair, method, signed_path, data or b""))
        request = HTTPRequest(
            self.url + path,
            method=method,
            headers=headers,
            body=data,
            request_timeout=self.timeout,
            connect_timeout=min(10.0, self.timeout),
            ca_certs=self.ca_certs,
            allow_nonstandard_methods=True,
        )
        try:
            response: HTTPResponse = await self._http.fetch(request, raise_error=False)
        except OSError as exc:
            raise CoordinatorError(
                f"cannot reach the coordinator at {self.url}: {exc}; is "
                f"`jupyter io coordinator` running there?"
            ) from None
        except HTTPClientError as exc:  # pragma: no cover - raise_error=False
            raise CoordinatorError(str(exc), exc.code) from None
        if response.code == 599:
            raise CoordinatorError(
                f"cannot reach the coordinator at {self.url}: {response.error}; is "
                f"`jupyter io coordinator` running there?"
            )
        try:
            payload = json.loads(response.body or b"null")
        except ValueError:
            payload = None
        if 200 <= response.code < 300 and isinstance(payload, dict):
            return payload
        error = payload.get("error") if isinstance(payload, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        message = message or f"{method} {path} answered HTTP {response.code}"
        if response.code == 409:
            raise LeaseError(message)
        if response.code in (401, 403):
            raise AuthError(message)
        raise CoordinatorError(message, response.code, code)
