from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


async def test_launch_and_execute(host, client):
    welcome = await client.connect()
    assert welcome["resumed"] is False
    started = await client.launch()
    assert started["generation"] == 1
    await client.wait_ready()
    msg_id, reply = await client.execute("1+1")
    assert reply["content"]["status"] == "ok"
    outputs = await client.outputs(msg_id)
    results = [m for m in outputs if m["msg_type"] == "execute_result"]
    assert results[0]["content"]["data"]["text/plain"] == "2"
