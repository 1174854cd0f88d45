"""examples/haproxy/haproxy.cfg, as shipped, in front of two coordinator replicas.

Debian's HAProxy runs the example with its addresses from the environment: REST calls are
spread over both replicas, a provider links through it (a websocket upgrade), and when the
replica holding that link is killed with SIGKILL, every request through the balancer is
still answered and the provider re-links, through the balancer, to the other replica.

Without ``/usr/sbin/haproxy`` the test is skipped, except under CI (``CI`` set), where it
fails: scripts/test.sh installs the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from solders.keypair import Keypair

from jupyter_io.coordinator_client import CoordinatorClient

from ...kernel_provisioner.conftest import free_port, get_json
from .conftest import Cluster

pytestmark = pytest.mark.timeout(90)

CONFIG = Path(__file__).resolve().parents[3] / "examples" / "haproxy" / "haproxy.cfg"
HAPROXY = "/usr/sbin/haproxy"
#: Requests through the balancer right after the kill: each must be answered.
REQUESTS = 20


def _haproxy_binary() -> str:
    found = HAPROXY if os.path.exists(HAPROXY) else shutil.which("haproxy")
    if found is None:
        message = "HAProxy not installed: `apt-get install haproxy` (scripts/test.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run the load-balancer test)")
        pytest.skip(message)
    return found


@pytest.fixture
def balancer(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    """The example config in front of replicas r0 and r1 (its third server names a port
    nothing listens on: down, and never given a request); yields the balancer's URL."""
    binary = _haproxy_binary()
    listen = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "JIO_LB_LISTEN": listen,
        "JIO_REPLICA1": f"127.0.0.1:{cluster.replicas[0].port}",
        "JIO_REPLICA2": f"127.0.0.1:{cluster.replicas[1].port}",
        "JIO_REPLICA3": f"127.0.0.1:{free_port()}",
    }
    log = (tmp_path / "haproxy.log").open("w")
    proc = subprocess.Popen(
        [binary, "-f", str(CONFIG), "-db"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://{listen}"
    try:
        deadline = time.monotonic() + 15
        while True:  # it prints nothing when ready: ask through it
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                get_json(f"{url}/api/v1/info")
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, "HAProxy did not answer in 15 s"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_rest_and_a_provider_link_through_haproxy_survive_a_replica_killed(
    cluster: Cluster, balancer: str, tmp_path: Path
) -> None:
    behind = cluster.replicas[:2]
    # REST is spread over both replicas: each answer says which replica gave it.
    answered = {get_json(f"{balancer}/api/v1/status")["replica"]["id"] for _ in range(6)}
    assert len(answered) == 2, answered
    client = CoordinatorClient(balancer, Keypair(), timeout=15)
    try:
        assert await client.list_leases() == []  # a signed request through it
    finally:
        client.close()

    # A provider links through the balancer (the websocket upgrade passes through).
    host = cluster.start_provider(tmp_path / "host", "--simulate-gpu", "RTX 4090:24",
                                  coordinator=balancer)  # fmt: skip
    holder = await cluster.wait_link_holder(host.pubkey, 10)
    assert holder in behind

    holder.kill()
    # Every request right after the kill is answered (a refused connect goes to the other
    # replica; the health check marks the dead one down within two seconds).
    for _ in range(REQUESTS):
        info = get_json(f"{balancer}/api/v1/info")
        assert info["coordinator"]
    survivor = await cluster.wait_link_holder(host.pubkey, 10, other_than=holder)
    assert survivor in behind and survivor is not holder
    took = time.monotonic() - (holder.killed_at or 0.0)
    assert took < 10, f"re-linked through the balancer {took:.1f} s after the kill"
    rows = get_json(f"{balancer}/api/v1/offers")["providers"]
    assert [r["provider"] for r in rows if r["provider"] == host.pubkey] == [host.pubkey]
