"""The queue ticket contract (jupyter_io.queue_tickets): what the coordinator's 202 and the
ticket endpoint carry, as the provisioner parses and shows it."""

from __future__ import annotations

import pytest

from jupyter_io.errors import ProtocolError
from jupyter_io.queue_tickets import QueuePlace, progress_message, queue_path


def test_a_place_round_trips_and_reads_as_lab_shows_it() -> None:
    place = QueuePlace("q_abc", "c_AAAAAAAAAAAAAAAA", 3, 230.0, 1_900_000_000.0, waiting=12)
    assert QueuePlace.from_json(place.to_json()) == place
    assert progress_message(place) == "In the queue: place 3, about 4 min"
    assert progress_message(QueuePlace("q", "c", 1, 20, 0)) == (
        "In the queue: place 1, less than a minute"
    )
    assert queue_path("c_x", "q_y") == "/api/v1/cohorts/c_x/queue/q_y"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"ticket": "q", "cohort": "c", "place": "1", "estimated_wait_seconds": 1, "expires_at": 2},
        {"ticket": "q", "cohort": "c", "place": 1, "estimated_wait_seconds": float("nan"),
         "expires_at": 2},
        {"ticket": 5, "cohort": "c", "place": 1, "estimated_wait_seconds": 1, "expires_at": 2},
    ],
)  # fmt: skip
def test_a_malformed_answer_is_a_protocol_error(body: object) -> None:
    with pytest.raises(ProtocolError):
        QueuePlace.from_json(body)
