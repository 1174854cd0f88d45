"""Disconnects: resume within the grace period replays, grace expiry kills the kernel."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_io.protocol import Channel

from .conftest import pid_alive, wait_until

pytestmark = pytest.mark.timeout(60)

LINES = 200
WAITING_CODE = f"""
import os, time
while not os.path.exists('go'):
    time.sleep(0.005)
for i in range({LINES}):
    print('line', i, flush=True)
open('done', 'w').close()
"""


async def test_resume_replays_output_made_while_away_exactly_once_in_order(host, client):
    await client.connect()
    await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    msg_id, _ = await client.execute(WAITING_CODE, wait=False)
    await client.message(
        Channel.IOPUB,
        lambda m: m["msg_type"] == "execute_input" and m["parent_header"]["msg_id"] == msg_id,
    )
    await client.disconnect()
    await wait_until(lambda: not session.attached, what="the host to notice the disconnect")
    sent_while_attached = session.tunnel.sent

    (session.workspace / "go").touch()
    await wait_until(lambda: (session.workspace / "done").exists(), what="the kernel's output")
    # The output reached the host while nobody was attached: it can only arrive by replay.
    await wait_until(
        lambda: session.tunnel.sent > sent_while_attached, what="output buffered on the host"
    )
    received_before = client.tunnel.received

    welcome = await client.connect(resume=True)
    assert welcome["resumed"] is True
    assert welcome["session"] == session.id
    assert welcome["kernel"] == {"state": "running", "generation": 1, "exit_code": None}
    outputs = await client.outputs(msg_id)
    text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert text == "".join(f"line {i}\n" for i in range(LINES))
    # On the wire: only frames the client had not received, each once, in sequence.
    seqs = [f.seq for f in client.raw if f.seq]
    assert seqs == list(range(received_before + 1, received_before + 1 + len(seqs)))


async def test_requests_sent_while_away_are_replayed_to_the_kernel(host, client):
    await client.connect()
    await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    await client.disconnect()
    await wait_until(lambda: not session.attached, what="the host to notice the disconnect")
    msg_id, _ = await client.execute("40 + 2", wait=False)  # kept in the client's tunnel

    welcome = await client.connect(resume=True)
    assert welcome["received"] < client.tunnel.sent
    reply = await client.message(
        Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == msg_id
    )
    assert reply["content"]["status"] == "ok"


async def test_a_newer_connection_replaces_the_old_one(host, make_client, client_keypair):
    first = make_client(host)
    await first.connect()
    await first.launch()
    await first.wait_ready()
    second = make_client(host)
    second.session_id = first.session_id
    second.key = first.key
    second.jsession = first.jsession
    second.tunnel = first.tunnel  # the same client end, reconnecting
    welcome = await second.connect(resume=True)
    assert welcome["resumed"] is True
    code, reason = await first.wait_closed()
    assert code == 1000 and "replaced" in reason
    assert await second.evaluate("'still here'") == "still here"


async def test_grace_expiry_kills_the_kernel_and_forgets_the_session(make_host, make_client):
    host = await make_host(grace_period=0.5)
    client = make_client(host)
    await client.connect()
    started = await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    await client.disconnect()
    await asyncio.wait_for(session.ended.wait(), 15)
    assert not pid_alive(started["pid"])
    assert not session.workspace.exists()
    assert client.session_id not in host.sessions
    with pytest.raises(client.Refused) as info:
        await client.connect(resume=True)
    assert info.value.error["code"] == "unknown_session"
    assert info.value.code == 4004


async def test_resume_within_grace_keeps_the_kernel(make_host, make_client):
    host = await make_host(grace_period=1.0)
    client = make_client(host)
    await client.connect()
    started = await client.launch()
    await client.wait_ready()
    assert await client.evaluate("[globals().setdefault('kept', 7)]") == [7]
    session = host.sessions[client.session_id]
    await client.disconnect()
    await wait_until(lambda: not session.attached, what="the host to notice the disconnect")
    await client.connect(resume=True)
    # Past the original grace deadline: the resume cancelled the timer.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(session.ended.wait(), 1.5)
    assert pid_alive(started["pid"])
    assert await client.evaluate("kept") == 7


BURST_CODE = """
import os, time
while not os.path.exists('go'):
    time.sleep(0.005)
chunk = 'x' * (256 * 1024)
for i in range({chunks}):
    print(i, chunk, flush=True)
open('burst-done', 'w').close()
while not os.path.exists('resumed'):
    time.sleep(0.005)
for i in range({live}):
    print('live', i, flush=True)
    time.sleep(0.001)  # paced: a flood would overrun the kernel's own iopub queue
"""


async def test_live_output_never_overtakes_a_long_replay(host, client):
    # 16 MiB replayed while the kernel keeps printing: the replay must finish before live
    # frames go out, or the client sees a sequence gap and the connection breaks.
    await client.connect()
    await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    msg_id, _ = await client.execute(BURST_CODE.format(chunks=64, live=1000), wait=False)
    await client.message(
        Channel.IOPUB,
        lambda m: m["msg_type"] == "execute_input" and m["parent_header"]["msg_id"] == msg_id,
    )
    await client.disconnect()
    await wait_until(lambda: not session.attached, what="the host to notice the disconnect")
    (session.workspace / "go").touch()
    await wait_until(lambda: (session.workspace / "burst-done").exists(), what="the burst")
    await wait_until(
        lambda: session.tunnel.unacked_bytes > 16 * 1024 * 1024, what="the burst on the host"
    )
    await client.connect(resume=True)
    (session.workspace / "resumed").touch()  # live output while the replay goes out
    outputs = await client.outputs(msg_id, timeout=40)
    text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    lines = text.splitlines()
    assert [line.split(" ", 1)[0] for line in lines[:64]] == [str(i) for i in range(64)]
    assert lines[64:] == [f"live {i}" for i in range(1000)]
    assert client.ws is not None and client.ws.close_code is None


async def test_output_beyond_the_replay_bound_ends_the_session(make_host, make_client):
    host = await make_host(max_unacked_bytes=1024 * 1024)
    client = make_client(host)
    await client.connect()
    started = await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    await client.execute(WAITING_CODE.replace("'line', i", "'x' * 65536"), wait=False)
    await client.disconnect()
    await wait_until(lambda: not session.attached, what="the host to notice the disconnect")
    (session.workspace / "go").touch()
    # 200 x 64 KiB cannot be kept for a replay: the session ends rather than lose output.
    await asyncio.wait_for(session.ended.wait(), 20)
    assert not pid_alive(started["pid"])
    assert client.session_id not in host.sessions


async def test_the_host_keeps_listening_while_a_replay_is_stuck(host, client):
    # A replay larger than every socket buffer on the way, to a client that stops reading:
    # the host must still hear the client (acks, pongs, requests) instead of waiting for
    # the replay to finish, or its keepalive would drop the connection mid-replay.
    await client.connect()
    await client.launch()
    await client.wait_ready()
    session = host.sessions[client.session_id]
    msg_id, _ = await client.execute(BURST_CODE.format(chunks=160, live=3), wait=False)
    await client.message(
        Channel.IOPUB,
        lambda m: m["msg_type"] == "execute_input" and m["parent_header"]["msg_id"] == msg_id,
    )
    await client.disconnect()
    await wait_until(lambda: not session.attached, what="the host to notice the disconnect")
    (session.workspace / "go").touch()
    await wait_until(
        lambda: session.tunnel.unacked_bytes > 40 * 1024 * 1024, what="40 MiB on the host"
    )
    (session.workspace / "resumed").touch()

    await client.connect(resume=True)
    assert client._reader is not None
    client._reader.cancel()  # stop reading: the host's replay blocks on a full socket
    info_id = await client.request(Channel.SHELL, "kernel_info_request", {})
    await wait_until(
        lambda: session.tunnel.received == client.tunnel.sent,
        what="the host to receive a request in the middle of its replay",
    )
    assert session.bridge.ws is None  # the replay is indeed still going on

    client._reader = asyncio.create_task(client._read(client.ws))  # read again
    reply = await client.message(
        Channel.SHELL, lambda m: m["parent_header"].get("msg_id") == info_id, timeout=40
    )
    assert reply["msg_type"] == "kernel_info_reply"
    outputs = await client.outputs(msg_id, timeout=40)
    text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert text.splitlines()[-4:] == ["159 " + "x" * 256 * 1024, "live 0", "live 1", "live 2"]
