"""The user's usage acknowledgements: neither party meters alone.

A provider reports the seconds it served a lease (signed usage reports); the user's side
acknowledges, while it sees the kernel's tunnel alive, how many seconds it has had
(``docs/payments-contract.md``, "Neither party meters alone"; ``docs/coordinator-contract.md``
section 2). The coordinator bills the lesser of the two, the acknowledgement plus a grace
period (:func:`ack_bound`), so a provider that goes on reporting after the user has gone
bills at most :data:`DEFAULT_ACK_GRACE_S` past the user's last acknowledgement.

This module is the contract both sides import; it does no I/O and reads no clock::

    # the provisioner, every DEFAULT_ACK_INTERVAL_S while its tunnel is connected
    ack = UsageAck(lease_id, seconds_since_ready)
    await client.acknowledge_usage(ack)  # POST ack_path(lease_id), body ack.encode(), signed

    # the coordinator
    ack = UsageAck.parse(request.body, lease_id)  # AckRefused (400) when malformed
    check_ack(ack, recorded=lease.acked_seconds, observed=observed_seconds)  # 409s

The request is signed with the user's key like every user request (its signature covers the
method, the path with the lease id, a fresh timestamp and the body; a replayed request is
refused), and only the lease's user may acknowledge it. Acknowledgements are monotonic: one
below the recorded count is refused as stale (:class:`StaleAck`), one ahead of what the
coordinator observed of the lease is refused (:class:`AckAhead`); neither changes anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

__all__ = [
    "DEFAULT_ACK_GRACE_S",
    "DEFAULT_ACK_INTERVAL_S",
    "DEFAULT_ACK_TIMEOUT_S",
    "MAX_ACK_SECONDS",
    "MAX_AHEAD_S",
    "NOT_ACKNOWLEDGED",
    "AckAhead",
    "AckRefused",
    "StaleAck",
    "UsageAck",
    "ack_bound",
    "ack_path",
    "check_ack",
]

#: How often the provisioner acknowledges while its tunnel is connected (its
#: ``usage_ack_interval`` trait).
DEFAULT_ACK_INTERVAL_S = 15.0
#: Seconds billed past the last acknowledgement (the coordinator's ``usage_ack_grace``): the
#: tunnel's resume window (the provider host's ``grace_period``, 120 s), during which the host
#: keeps a disconnected user's kernel for a resume. A shorter grace would end a paid kernel on a
#: network cut the tunnel itself survives (a laptop lid closed for a minute); this one costs a
#: vanished user at most the time the provider held the kernel for them. It is well over two
#: intervals (one acknowledgement lost, the next not yet sent) plus network delay.
DEFAULT_ACK_GRACE_S = 120.0
#: A paid lease with no acknowledgement for this long ends (the coordinator's
#: ``usage_ack_timeout``). As long as the grace: the provider then stops metering about when
#: billing stops, so an honest provider host (which co-signs only settlements within its
#: ``settle_tolerance_seconds`` of its own metering) settles a vanished user's lease.
DEFAULT_ACK_TIMEOUT_S = DEFAULT_ACK_GRACE_S
#: The end reason of a lease the coordinator ended because its acknowledgements stopped.
NOT_ACKNOWLEDGED = "usage not acknowledged"
#: How far an acknowledgement may run ahead of the coordinator's own observation of the
#: lease (the user's READY and the provider's "active" event race; whole-second rounding).
MAX_AHEAD_S = 5
#: Largest acknowledged count accepted at all (about 31 years).
MAX_ACK_SECONDS = 1 << 30


class AckRefused(ProtocolError):
    """The acknowledgement is malformed or names another lease (400); nothing changed."""


class StaleAck(AckRefused):
    """Below the count already acknowledged: a replayed or reordered older
    acknowledgement (409 ``stale_ack``); nothing changed."""


class AckAhead(AckRefused):
    """More seconds than the coordinator observed the lease running (409
    ``ack_ahead``); nothing changed."""


def ack_path(lease_id: str) -> str:
    """The endpoint, below the coordinator's base URL: ``/api/v1/leases/{id}/ack``."""
    return f"/api/v1/leases/{lease_id}/ack"


@dataclass(frozen=True, slots=True)
class UsageAck:
    """The user saw lease ``lease``'s kernel tunnel alive for ``seconds`` whole seconds
    since the kernel first became ready on it (gaps it resumed after included).

    ``idle_seconds`` (optional): seconds since the kernel last executed anything as the
    user's side saw it; a cohort's idle timeout counts it (``docs/cohorts.md``, "Time
    rules": idle when either party says idle)."""

    lease: str
    seconds: int
    idle_seconds: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"lease": self.lease, "seconds": self.seconds}
        if self.idle_seconds is not None:
            body["idle_seconds"] = self.idle_seconds
        return body

    def encode(self) -> bytes:
        """The request body (what the request's signature covers)."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def parse(cls, body: bytes | str, lease_id: str) -> UsageAck:
        """The acknowledgement in a request body sent to ``lease_id``'s endpoint. Raises
        :class:`AckRefused` when it is not ``{"lease": lease_id, "seconds": N}`` (and
        optionally ``"idle_seconds": I``) with whole ``0 <= N, I <=``
        :data:`MAX_ACK_SECONDS`."""
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):
            raise AckRefused('the body must be JSON: {"lease": ID, "seconds": N}') from None
        if not isinstance(fields, dict) or not (
            {"lease", "seconds"} <= set(fields) <= {"lease", "seconds", "idle_seconds"}
        ):
            raise AckRefused(
                'an acknowledgement is exactly {"lease": ID, "seconds": N} and optionally '
                '"idle_seconds": I'
            )
        lease, seconds = fields["lease"], fields["seconds"]
        if lease != lease_id:
            raise AckRefused(
                f"the acknowledgement names lease {str(lease)[:64]!r} but was sent to lease "
                f"{lease_id}'s endpoint; acknowledge each lease at its own"
            )
        if type(seconds) is not int or not 0 <= seconds <= MAX_ACK_SECONDS:
            raise AckRefused(f"'seconds' must be a whole number from 0 to {MAX_ACK_SECONDS}")
        idle = fields.get("idle_seconds")
        if idle is not None and (type(idle) is not int or not 0 <= idle <= MAX_ACK_SECONDS):
            raise AckRefused(
                f"'idle_seconds' must be a whole number from 0 to {MAX_ACK_SECONDS} or absent"
            )
        return cls(lease_id, seconds, idle)


def check_ack(ack: UsageAck, *, recorded: int | None, observed: int) -> None:
    """Refuse ``ack`` when it goes back on the count ``recorded`` so far
    (:class:`StaleAck`; the same count again is accepted and changes nothing) or claims
    more than ``observed`` seconds of service, which the coordinator measured from the
    provider's kernel start, plus :data:`MAX_AHEAD_S` (:class:`AckAhead`)."""
    if recorded is not None and ack.seconds < recorded:
        raise StaleAck(
            f"lease {ack.lease} is acknowledged up to {recorded} s already; an "
            f"acknowledgement of {ack.seconds} s is older (acknowledge the seconds so far)"
        )
    if ack.seconds > observed + MAX_AHEAD_S:
        raise AckAhead(
            f"lease {ack.lease} has run {observed} s by the coordinator's clock; an "
            f"acknowledgement of {ack.seconds} s is ahead of it (count from the kernel's "
            f"READY)"
        )


def ack_bound(acknowledged: int | None, grace: float) -> int | None:
    """The most seconds a lease may be billed given its acknowledgements: the count
    acknowledged (0 when none was) plus ``grace``, whole seconds. None when ``acknowledged``
    is None: a lease recorded before acknowledgements existed, billed as it was then."""
    if acknowledged is None:
        return None
    return acknowledged + math.floor(grace)
