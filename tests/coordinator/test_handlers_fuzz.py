"""Property-based tests of the coordinator's request bodies (hypothesis).

``POST /api/v1/leases`` (``docs/coordinator-contract.md`` section 2) takes any signed body: a
fresh keypair is all it costs, so the body is hostile input. The contract: it is a
:class:`~jupyter_io.coordinator.scheduler.LeaseRequest` or a 400 ``bad_request`` saying
why, never an internal error; what is accepted fits the store (64-bit integers) and the
scheduler's name matching (bounded strings).
"""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from solders.keypair import Keypair
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from jupyter_io.coordinator.handlers import MAX_GPU_NAME, MAX_REGION, _json_body, _lease_request
from jupyter_io.coordinator.scheduler import LeaseRequest
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.gpu_names import gpu_vram_hint, normalise_gpu_name
from jupyter_io.provider_link import MAX_INT
from jupyter_io.signing import sign_request

from ..fuzzing import hostile_json

FIELDS = ["gpu", "min_vram_bytes", "gpus", "max_price_lamports_per_hour", "region"]
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, 1, 64, 65, MAX_INT, MAX_INT + 1, 2**64, -(10**400)])
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["RTX 4090", "a100 80gb", "1" * 20_000, "(" * 5_000, "eu-west"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
BODIES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=5)


def parse(raw: bytes) -> LeaseRequest | None:
    """What the handler makes of a body: a request, or None for its 400."""
    try:
        return _lease_request(_json_body(raw))
    except ValueError:
        return None


def check(raw: bytes) -> None:
    request = parse(raw)
    if request is None:
        return
    for value in (request.min_vram_bytes, request.max_price_lamports_per_hour, request.gpus):
        assert value is None or 0 <= value <= MAX_INT
    assert request.gpu is None or len(request.gpu) <= MAX_GPU_NAME
    assert request.region is None or len(request.region) <= MAX_REGION
    started = time.perf_counter()  # what the scheduler does with the name stays cheap
    normalise_gpu_name(request.gpu or "")
    gpu_vram_hint(request.gpu or "")
    assert time.perf_counter() - started < 0.5


@given(hostile_json())
@example(b"[" * 60_000)  # found by fuzzing: RecursionError, a 500 instead of a 400
@example(b'{"gpus":' + b"1" * 5000 + b"}")
@example(b"\xff")
@example(b"")
def test_any_body_bytes_are_a_request_or_a_bad_request(raw: bytes) -> None:
    check(raw)


@given(BODIES)
@example({"max_price_lamports_per_hour": MAX_INT + 1})  # bounded like every stored integer
@example({"min_vram_bytes": 2**64})
@example({"gpu": "1" * 20_000})  # found: seconds of regex backtracking per request
@example({"region": "x" * 10_000})
def test_any_json_body_is_a_request_or_a_bad_request(body: dict[str, Any]) -> None:
    check(json.dumps(body).encode())


async def test_hostile_bodies_are_answered_400_by_a_real_coordinator(
    coordinator: CoordinatorServer,
) -> None:
    """Found by fuzzing: a deeply nested body was a 500 (RecursionError); a price cap past
    64 bits and a 1000-character GPU name (the scheduler's name matching is quadratic in
    it) were accepted. Each now gets the 400 ``bad_request`` the contract names."""
    http = AsyncHTTPClient(force_instance=True)
    user = Keypair()
    path = "/api/v1/leases"
    try:
        for body in (
            b"[" * 10_000,  # past the recursion limit, under the 16 KiB body limit
            json.dumps({"max_price_lamports_per_hour": MAX_INT + 1}).encode(),
            json.dumps({"gpu": "1" * 1000}).encode(),
        ):
            request = HTTPRequest(
                coordinator.url + path, "POST", body=body,
                headers=sign_request(user, "POST", path, body),
            )  # fmt: skip
            response = await http.fetch(request, raise_error=False)
            answer = json.loads(response.body)
            assert response.code == 400, answer
            assert answer["error"]["code"] == "bad_request"
    finally:
        http.close()
