"""The provider's check of a cohort lease's settlement (docs/payments-contract.md section 6):
it co-signs the cohort shape (the rest back to the student's allowance, or to the instructor
once the allowance was reclaimed) and nothing else, and remembers the cohort across a
restart. The lease token's cohort claims are optional: a token without them reads as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from solders.hash import Hash
from solders.keypair import Keypair

from jupyter_io.errors import AuthError
from jupyter_io.leases import LeaseClaims, issue_token, verify_token
from jupyter_io.payments.cohort_pool import AllowanceTerms, cohort_settlement_message
from jupyter_io.payments.escrow import EscrowTerms, settlement_message
from jupyter_io.provider_link import SettlementRefused, SettlementSignature, SignSettlement
from provider_host.settlement import SettlementBook
from provider_host.usage import UsageMeter


def _claims(host: Keypair, user: Keypair, arbiter: Keypair, **kw: object) -> LeaseClaims:
    return LeaseClaims(
        lease_id="lease-c", user=user.pubkey(), provider=host.pubkey(), gpu="x",
        gpu_indices=(0,), price_lamports_per_hour=3_600_000, issued_at=0.0, expires_at=1e12,
        coordinator=arbiter.pubkey(), **kw,
    )  # fmt: skip


def test_the_book_co_signs_only_the_cohort_settlement_of_a_cohort_lease(tmp_path: Path) -> None:
    host, user, arbiter, instructor = Keypair(), Keypair(), Keypair(), Keypair()
    now = [100.0]
    meter = UsageMeter("lease-c", clock=lambda: now[0])
    meter.start()
    now[0] += 100.0
    claims = _claims(host, user, arbiter, cohort="c_abc", cohort_instructor=instructor.pubkey())
    path = tmp_path / "settlements.json"
    book = SettlementBook(host, path=path, tolerance_seconds=10)
    book.admit(claims, meter)
    allowance = AllowanceTerms(instructor.pubkey(), user.pubkey(), arbiter.pubkey(), "c_abc")
    session = allowance.session(host.pubkey(), "lease-c")
    blockhash = Hash.new_unique()

    def ask(message: bytes, amount: int = 90_000) -> object:
        return book.answer(SignSettlement("lease-c", amount, message), arbiter.pubkey())

    # The plain settlement would close the escrow to the student: the instructor's money.
    plain = settlement_message(session.escrow, 90_000, blockhash=blockhash)
    refused = ask(bytes(plain))
    assert isinstance(refused, SettlementRefused) and "cohort lease" in refused.reason
    # The rest sent to another student's allowance: refused.
    other = AllowanceTerms(instructor.pubkey(), Keypair().pubkey(), arbiter.pubkey(), "c_abc")
    elsewhere = EscrowTerms(other.student, host.pubkey(), arbiter.pubkey(), "lease-c")
    stolen = cohort_settlement_message(
        other.session(host.pubkey(), "lease-c"), 90_000, remainder=5, blockhash=blockhash
    )
    assert elsewhere.escrow != session.escrow.escrow
    assert isinstance(ask(bytes(stolen)), SettlementRefused)
    # Short pay is refused as for any lease.
    short = cohort_settlement_message(session, 89_999, remainder=5, blockhash=blockhash)
    assert isinstance(ask(bytes(short), 89_999), SettlementRefused)
    # A restarted host remembers the cohort and signs both cohort shapes.
    again = SettlementBook(host, path=path, tolerance_seconds=10)
    assert again.load() == 1
    for to in ("allowance", "instructor"):
        good = cohort_settlement_message(
            session, 90_000, remainder=1_234, remainder_to=to, blockhash=blockhash
        )
        answer = again.answer(SignSettlement("lease-c", 90_000, bytes(good)), arbiter.pubkey())
        assert isinstance(answer, SettlementSignature), answer


def test_cohort_claims_are_optional_and_go_together() -> None:
    host, user, arbiter, instructor = Keypair(), Keypair(), Keypair(), Keypair()
    plain = _claims(host, user, arbiter)
    assert b"cohort" not in plain.to_json()  # a token without them reads as before
    cohort = _claims(host, user, arbiter, cohort="c_abc", cohort_instructor=instructor.pubkey())
    token = issue_token(arbiter, cohort)
    read = verify_token(
        token, coordinator=arbiter.pubkey(), provider=host.pubkey(), user=user.pubkey(), now=1.0
    )
    assert read.cohort == "c_abc" and read.cohort_instructor == instructor.pubkey()
    with pytest.raises(ValueError, match="both or neither"):
        _claims(host, user, arbiter, cohort="c_abc")
    with pytest.raises(AuthError):
        verify_token(
            "x.y", coordinator=arbiter.pubkey(), user=user.pubkey(), provider=host.pubkey(), now=1
        )
