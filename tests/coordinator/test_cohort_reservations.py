"""Reservations (issue 14.3): during a cohort's reservation window the scheduler keeps its
unused reserved GPUs from everyone else, and the cohort itself can still use them."""

from __future__ import annotations

import pytest

from jupyter_io.coordinator.scheduler import LeaseRequest, Offer, OfferIndex, schedule
from jupyter_io.errors import LeaseError

GIB = 1 << 30


def _t4(provider: str, free: int) -> Offer:
    return Offer(provider, "Tesla T4", 16 * GIB, 4, free, 1000, "eu-west")


def test_held_gpus_are_taken_for_everyone_but_their_cohort() -> None:
    index = OfferIndex([_t4("p1", 2), _t4("p2", 1)])
    index.hold("c_class", "T4", 2)
    request = LeaseRequest(gpu="T4")
    assert schedule(index, request).gpu == "Tesla T4"  # 3 free, 2 held: one left for others
    index.reserve("p2", "T4", 1)
    with pytest.raises(LeaseError, match="reserved for a class"):
        schedule(index, request)
    assert schedule(index, request, cohort="c_class").provider == "p1"
    with pytest.raises(LeaseError, match="reserved for a class"):
        schedule(index, request, cohort="c_other")
    assert index.held("T4") == 2 and index.held("t4", "c_class") == 0
    index.hold("c_class", "T4", 0)  # the window closed
    assert schedule(index, request).provider == "p1"


def test_holds_leave_other_models_alone() -> None:
    a100 = Offer("p3", "A100", 80 * GIB, 1, 1, 5000, "eu-west")
    index = OfferIndex([_t4("p1", 1), a100])
    index.hold("c_class", "T4", 1)
    assert schedule(index, LeaseRequest()).gpu == "A100"  # no type named: the T4 is held
    assert schedule(index, LeaseRequest(), cohort="c_class").gpu == "Tesla T4"
