"""A peer that breaks the wire protocol loses only its own connection; sessions carry on."""

from __future__ import annotations

import pytest

from jupyter_io.protocol import Channel, FrameKind, encode_frame

pytestmark = pytest.mark.timeout(60)

MAX_FRAME = 64 * 1024


def _oversize(client) -> bytes:
    return b"\x00" * (MAX_FRAME + 1)


def _gap(client) -> bytes:
    # Valid frame, but it skips a sequence number.
    return encode_frame(FrameKind.DATA, [b"x"], channel=Channel.SHELL, seq=client.tunnel.sent + 2)


def _iopub_from_client(client) -> bytes:
    return client.tunnel.send_data(Channel.IOPUB, [b"not", b"allowed"])


def _empty_data(client) -> bytes:
    return client.tunnel.send_data(Channel.SHELL, [])


CASES = {
    "malformed": (lambda client: b"\x00\x00\x01\x00garbage", 1002, "truncated"),
    "text": (lambda client: "a text message", 1002, "text message"),
    "oversize": (_oversize, 1009, "exceeds"),
    "sequence gap": (_gap, 1002, "sequence gap"),
    "iopub from client": (_iopub_from_client, 1002, "IOPUB"),
    "data without parts": (_empty_data, 1002, "no parts"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_frame_closes_only_that_connection(make_host, make_client, case):
    host = await make_host(max_frame_size=MAX_FRAME)
    good = make_client(host)
    await good.connect()
    await good.launch()
    await good.wait_ready()

    bad = make_client(host)
    await bad.connect()
    make_message, code, reason = CASES[case]
    assert bad.ws is not None
    await bad.ws.send(make_message(bad))
    closed_code, closed_reason = await bad.wait_closed()
    assert closed_code == code
    assert reason in closed_reason

    # The other session keeps executing...
    msg_id, reply = await good.execute("6 * 7")
    assert reply is not None and reply["content"]["status"] == "ok"
    results = [m for m in await good.outputs(msg_id) if m["msg_type"] == "execute_result"]
    assert results[0]["content"]["data"]["text/plain"] == "42"
    # ...and the broken connection's session waits for a resume.
    assert bad.session_id in host.sessions
    welcome = await bad.connect(resume=True)
    assert welcome["resumed"] is True
