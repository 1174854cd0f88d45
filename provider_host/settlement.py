"""The provider's half of a settlement: co-sign only what pays it for what it delivered.

``docs/payments-contract.md`` section 4. When a funded lease is over, the coordinator (the
arbiter) sends ``sign_settlement`` over the provider link with the transaction message that
pays the provider and closes the escrow. :class:`SettlementBook` keeps, for every lease whose
session this host served, what it needs to judge that request — the lease's claims (user,
price, coordinator) and its :class:`~provider_host.usage.UsageMeter` — from the moment the
session opens until the lease is settled, even long after the session ended.

:meth:`SettlementBook.answer` signs with the host keypair only when

* the message is byte for byte :func:`~jupyter_io.payments.escrow.settlement_message` of
  this lease's escrow terms (user from the token, provider = this host, arbiter = the
  coordinator pinned on the link, session id = the lease id) for the amount asked, fee paid
  by this host — for a cohort lease (the token's ``cohort`` claims) a
  :func:`~jupyter_io.payments.cohort_pool.cohort_settlement_message` returning the rest to
  the student's allowance (or its instructor), checked by
  :func:`~jupyter_io.payments.cohort_pool.match_cohort_settlement`; and
* the amount is at least price x (own delivered seconds - ``tolerance_seconds``) / 3600.

Otherwise it answers ``settlement_refused`` with the reason (code ``unknown_lease`` for a
lease it has no record of — never served here, or its record was pruned: the coordinator then
lets the user refund).

The records outlive the process. With a ``path`` (``ProviderConfig.settlements_path``) the book
keeps one JSON file, mode 0600, written whole and atomically (a temporary file, fsync,
``os.replace``): per lease its claims (no token, no key: ids, public keys, price) and its
meter's delivered seconds and report count. The host calls :meth:`SettlementBook.load` at
start, before it links (a restarted host co-signs the leases it served before), then
:meth:`SettlementBook.admit` when a lease's session opens and :meth:`SettlementBook.checkpoint`
after each round of usage reports and when a session ends; signing saves by itself. A lease
whose session was still running when the host died comes back with the total of its last
checkpoint (at most one ``usage_interval`` short, to the user's benefit). Entries go
``keep_seconds`` after being signed (the coordinator asks again only if its submission failed),
and the oldest go beyond ``max_entries``, which bounds the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey

from jupyter_io.errors import PaymentError
from jupyter_io.leases import LeaseClaims
from jupyter_io.payments.amounts import SECONDS_PER_HOUR, format_sol
from jupyter_io.payments.cohort_pool import AllowanceTerms, CohortSession, match_cohort_settlement
from jupyter_io.payments.escrow import EscrowTerms, settlement_message
from jupyter_io.provider_link import (
    SettlementRefused,
    SettlementReply,
    SettlementSignature,
    SignSettlement,
)

from .usage import UsageMeter

__all__ = ["DEFAULT_TOLERANCE_SECONDS", "FILE_VERSION", "SettlementBook"]

#: Seconds of its own metering a provider lets go (the coordinator observes a little less).
DEFAULT_TOLERANCE_SECONDS = 10.0
#: ``version`` of the records file this code writes and reads.
FILE_VERSION = 1


class _UnknownLease(PaymentError):
    """No record of the lease here: this host can never co-sign its settlement."""


@dataclass(slots=True)
class _Lease:
    claims: LeaseClaims
    meter: UsageMeter
    #: Unix seconds of the last co-signature (persisted: it must survive a restart).
    signed_at: float | None = None


class SettlementBook:
    """What this host needs to co-sign settlements (see the module docstring). Without
    ``path`` it keeps nothing on disk (a host without a data directory, unit tests)."""

    def __init__(
        self,
        keypair: Keypair,
        *,
        path: str | Path | None = None,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
        keep_seconds: float = 3600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
        log: logging.Logger | None = None,
    ) -> None:
        self.keypair = keypair
        self.path = None if path is None else Path(path).expanduser()
        self.tolerance_seconds = tolerance_seconds
        self.keep_seconds = keep_seconds
        self.max_entries = max_entries
        self.clock = clock
        self.log = log or logging.getLogger("provider_host")
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._saved: object = None  # what the file holds now (to skip rewriting it)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def load(self) -> int:
        """Read the records file (at start, before linking); returns how many leases it
        restored. A file that does not parse is moved aside (``.corrupt``) and logged: the
        host starts without those records rather than not at all."""
        path = self.path
        if path is None:
            return 0
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            aside = path.with_name(f"{path.name}.corrupt")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            self.log.error(
                "settlement records %s do not load (%s); moved to %s: leases served before "
                "will be refunded by their users instead of settled",
                path,
                exc,
                aside,
            )
            return 0
        me = str(self.keypair.pubkey())
        if not isinstance(body, dict) or body.get("version") != FILE_VERSION:
            self.log.error("settlement records %s: unknown format, ignored", path)
            return 0
        if body.get("provider") != me:
            self.log.error(
                "settlement records %s belong to provider %s, not to this host (%s); ignored",
                path,
                body.get("provider"),
                me,
            )
            return 0
        restored = 0
        for record in body.get("leases") or []:
            try:
                entry = _entry_from_json(record, self.keypair.pubkey())
            except (KeyError, TypeError, ValueError) as exc:
                self.log.warning("skipping a settlement record in %s: %s", path, exc)
                continue
            self._leases[entry.claims.lease_id] = entry
            restored += 1
        self._saved = self._state()
        self._prune()
        if restored:
            self.log.info("restored %d settlement record(s) from %s", restored, path)
        return restored

    def admit(self, claims: LeaseClaims, meter: UsageMeter) -> None:
        """A session of the lease opened here: remember its claims and meter until the
        lease is settled (saved at once)."""
        self._leases[claims.lease_id] = _Lease(claims, meter)
        self._leases.move_to_end(claims.lease_id)
        self.checkpoint()

    def checkpoint(self) -> None:
        """Drop what is done, and save the records if they changed since the last save
        (call after sending usage reports and when a session ends)."""
        self._prune()
        self._save()

    def meter(self, lease_id: str) -> UsageMeter | None:
        """The lease's meter (live, or frozen once its session ended), if known here."""
        entry = self._leases.get(lease_id)
        return None if entry is None else entry.meter

    def owed(self, lease_id: str) -> int:
        """The least this host accepts for the lease now, lamports."""
        entry = self._leases[lease_id]
        seconds = max(0.0, entry.meter.seconds() - self.tolerance_seconds)
        return int(entry.claims.price_lamports_per_hour * seconds) // SECONDS_PER_HOUR

    def answer(self, request: SignSettlement, coordinator: Pubkey | None) -> SettlementReply:
        """Check ``request`` and sign it, or say why not (see the module docstring)."""
        try:
            signature = self._check_and_sign(request, coordinator)
        except PaymentError as exc:
            self.log.warning("refusing to settle lease %s: %s", request.lease, exc)
            code = "unknown_lease" if isinstance(exc, _UnknownLease) else "refused"
            return SettlementRefused(request.lease, str(exc), code)
        self.log.info(
            "co-signed the settlement of lease %s: %s", request.lease, format_sol(request.amount)
        )
        return SettlementSignature(request.lease, signature)

    def _check_and_sign(self, request: SignSettlement, coordinator: Pubkey | None) -> str:
        entry = self._leases.get(request.lease)
        if entry is None:
            raise _UnknownLease(
                f"lease {request.lease} is unknown here (never served, or forgotten after a "
                f"restart); settle it by refund (user + arbiter)"
            )
        claims = entry.claims
        if coordinator is None or claims.coordinator != coordinator:
            raise PaymentError(
                f"lease {request.lease} was issued by coordinator {claims.coordinator}, not by "
                f"the one asking ({coordinator})"
            )
        me = self.keypair.pubkey()
        try:
            message = MessageV0.from_bytes(request.message)
            terms = EscrowTerms(claims.user, me, coordinator, request.lease)
            if claims.cohort is not None and claims.cohort_instructor is not None:
                # A cohort lease: the rest goes back to the student's allowance (or, reclaimed,
                # to its instructor), never anywhere else.
                allowance = AllowanceTerms(
                    claims.cohort_instructor, claims.user, coordinator, claims.cohort
                )
                exact = match_cohort_settlement(
                    CohortSession(allowance, terms),
                    request.amount,
                    request.message,
                    blockhash=message.recent_blockhash,
                )
            else:
                exact = request.message in [
                    bytes(
                        settlement_message(
                            terms,
                            request.amount,
                            blockhash=message.recent_blockhash,
                            fee_payer=me,
                            create_payout_account=create,
                        )
                    )
                    for create in (True, False)
                ]
        except (ValueError, PaymentError) as exc:
            raise PaymentError(f"the settlement message does not parse: {exc}") from None
        if not exact:
            what = "cohort lease" if claims.cohort is not None else "lease"
            raise PaymentError(
                f"the message is not the settlement of {what} {request.lease}'s escrow paying "
                f"this provider {request.amount} lamports with this provider as fee payer"
            )
        owed = self.owed(request.lease)
        if request.amount < owed:
            raise PaymentError(
                f"it pays {format_sol(request.amount)}, but this provider delivered "
                f"{entry.meter.seconds()} s at {format_sol(claims.price_lamports_per_hour)}/h: "
                f"at least {format_sol(owed)} is owed ({self.tolerance_seconds:g} s tolerance)"
            )
        entry.signed_at = self.clock()
        self._save()
        return str(self.keypair.sign_message(to_bytes_versioned(message)))

    def _prune(self) -> None:
        now = self.clock()
        done = [
            lease_id
            for lease_id, entry in self._leases.items()
            if entry.signed_at is not None and now - entry.signed_at > self.keep_seconds
        ]
        for lease_id in done:
            del self._leases[lease_id]
        while len(self._leases) > self.max_entries:
            lease_id, _ = self._leases.popitem(last=False)
            self.log.warning("forgetting lease %s: over %d records", lease_id, self.max_entries)

    def _state(self) -> object:
        return [
            (lease_id, e.meter.seconds(), e.meter.seq, e.signed_at)
            for lease_id, e in self._leases.items()
        ]

    def _save(self) -> None:
        if self.path is None:
            return
        state = self._state()
        if state == self._saved:
            return
        body = {
            "version": FILE_VERSION,
            "provider": str(self.keypair.pubkey()),
            "leases": [_entry_to_json(entry) for entry in self._leases.values()],
        }
        try:
            _write_atomically(self.path, json.dumps(body, separators=(",", ":")).encode())
        except OSError as exc:
            self.log.error(
                "cannot save settlement records to %s (%s): after a restart this host could "
                "not co-sign those leases; free space or fix the permissions of that directory",
                self.path,
                exc,
            )
            return
        self._saved = state


def _entry_to_json(entry: _Lease) -> dict[str, Any]:
    claims, meter = entry.claims, entry.meter
    return {
        "lease": claims.lease_id,
        "user": str(claims.user),
        "coordinator": str(claims.coordinator),
        "gpu": claims.gpu,
        "gpu_indices": list(claims.gpu_indices),
        "price_lamports_per_hour": claims.price_lamports_per_hour,
        "issued_at": claims.issued_at,
        "expires_at": claims.expires_at,
        "relay": claims.relay,
        "cohort": claims.cohort,
        "cohort_instructor": None
        if claims.cohort_instructor is None
        else str(claims.cohort_instructor),
        "seconds": meter.seconds(),
        "seq": meter.seq,
        "signed_at": entry.signed_at,
    }


def _entry_from_json(record: Any, provider: Pubkey) -> _Lease:
    if not isinstance(record, dict):
        raise TypeError("a record must be an object")
    seconds, seq, signed_at = record["seconds"], record["seq"], record["signed_at"]
    if type(seconds) is not int or type(seq) is not int or seconds < 0 or seq < 0:
        raise ValueError("seconds and seq must be non-negative integers")
    if signed_at is not None and not isinstance(signed_at, (int, float)):
        raise ValueError("signed_at must be a number or null")
    claims = LeaseClaims(
        lease_id=record["lease"],
        user=Pubkey.from_string(record["user"]),
        provider=provider,
        gpu=record["gpu"],
        gpu_indices=tuple(record["gpu_indices"]),
        price_lamports_per_hour=record["price_lamports_per_hour"],
        issued_at=float(record["issued_at"]),
        expires_at=float(record["expires_at"]),
        coordinator=Pubkey.from_string(record["coordinator"]),
        relay=bool(record["relay"]),
        cohort=record.get("cohort"),
        cohort_instructor=None
        if record.get("cohort_instructor") is None
        else Pubkey.from_string(record["cohort_instructor"]),
    )
    meter = UsageMeter.restored(claims.lease_id, seconds, seq, claims.gpu_indices)
    return _Lease(claims, meter, None if signed_at is None else float(signed_at))


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole or not at all; the file is private (0600)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
