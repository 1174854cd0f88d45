"""Warm kernels (issue 16 part 3): a lease's kernel is already up, and still its tenant's own.

Real provider hosts, real bubblewrap sandboxes and real ipykernel processes; whether a kernel
was warm is read from the host's counters and the process ids, never from timing.
"""

from __future__ import annotations

import json
import os

import pytest

from jupyter_io.protocol import FrameKind
from provider_host.server import ProviderServer
from provider_host.warm_pool import WarmKernel, WarmPool, start_env_differs

from .conftest import TunnelClient, pid_alive, sandbox_processes, wait_until

pytestmark = pytest.mark.timeout(90)


async def _armed(
    host: ProviderServer, slot: tuple[int, ...] = (), old: str | None = None
) -> WarmKernel:
    """The warm kernel waiting on ``slot`` once one (other than id ``old``) is there."""
    pool = host.warm
    assert pool is not None

    def ready() -> bool:
        warm = pool.warm(slot)
        return warm is not None and warm.id != old

    await wait_until(ready, what="a warm kernel")
    warm = pool.warm(slot)
    assert warm is not None
    return warm


async def _start(client: TunnelClient, env: dict[str, str] | None = None) -> dict:
    await client.connect()
    started = await client.launch(env)
    await client.wait_ready()
    return started


async def test_a_lease_gets_the_warm_kernel_with_its_own_key_uid_and_workspace(
    make_host, make_client
):
    host = await make_host()
    assert host.warm is not None and host.config.warm_kernels  # on by default
    first = await _armed(host)
    assert first.kernel.running
    throwaway = json.loads((first.runtime_dir / "kernel.json").read_text())["key"]

    alice = make_client(host)
    started = await _start(alice, {"JIO_WARM_TEST": "alice"})
    session = host.sessions[alice.session_id]
    assert host.warm.stats.claimed == 1 and session.warm_claimed
    # The very process started ahead of the lease, now the session's, in its sandbox.
    assert started["pid"] == first.kernel.pid and alice.session_id == first.id
    assert session.workspace == first.workspace and session.user == first.user
    # The tenant's key, written at the claim (the kernel answered requests signed with it).
    key = json.loads((session.runtime_dir / "kernel.json").read_text())["key"]
    assert key == alice.key != throwaway
    assert await alice.evaluate("__import__('os').environ['JIO_WARM_TEST']") == "alice"
    assert await alice.evaluate("__import__('os').getcwd()") == str(session.workspace)
    await alice.evaluate("open('diary.txt', 'w').write('alice-secret') and None")
    await alice.evaluate("globals().__setitem__('secret', 42) or None")

    # The next tenant's warm kernel is armed at once, in a sandbox of its own that alice's
    # code cannot reach (nor plant anything in before it is claimed).
    second = await _armed(host, old=first.id)
    assert second.user is None or first.user is None or second.user.uid != first.user.uid
    for path in (second.workspace, second.runtime_dir):
        assert await alice.evaluate(f"__import__('os').path.exists({str(path)!r})") is False

    bob = make_client(host)
    started = await _start(bob)
    assert host.warm.stats.claimed == 2 and started["pid"] == second.kernel.pid
    assert json.loads((second.runtime_dir / "kernel.json").read_text())["key"] == bob.key
    assert await bob.evaluate("__import__('os').path.exists('diary.txt')") is False
    assert await bob.evaluate(f"__import__('os').path.exists({str(session.workspace)!r})") is False
    assert await bob.evaluate("'secret' in globals()") is False
    assert await bob.evaluate("__import__('os').environ.get('JIO_WARM_TEST')") is None
    if first.user is not None:
        assert await bob.evaluate("__import__('os').getuid()") != first.user.uid


async def test_a_launch_env_read_at_interpreter_start_gets_a_cold_kernel(make_host, make_client):
    host = await make_host()
    warm = await _armed(host)
    client = make_client(host)
    started = await _start(client, {"PYTHONHASHSEED": "0"})
    pool = host.warm
    assert pool is not None
    assert pool.stats.claimed == 0 and pool.stats.discarded == 1
    session = host.sessions[client.session_id]
    assert not session.warm_claimed and started["pid"] != warm.kernel.pid
    assert not pid_alive(warm.kernel.pid)
    # The cold kernel, in the sandbox the warm one left, has the hash seed from its start.
    assert await client.evaluate("__import__('sys').flags.hash_randomization") == 0
    assert await client.evaluate("__import__('os').getcwd()") == str(warm.workspace)
    assert start_env_differs({"A": "1"}, {"A": "2", "TZ": "UTC"}) == ["TZ"]


async def test_a_warm_kernel_of_another_environment_is_discarded(make_host):
    host = await make_host()
    warm = await _armed(host)
    pool = host.warm
    assert pool is not None
    assert pool.take((), "ab" * 32) is None  # the lease names a course environment
    await wait_until(lambda: pool.stats.discarded == 1, what="the discard")
    assert not pid_alive(warm.kernel.pid) and not warm.workspace.exists()
    await _armed(host, old=warm.id)  # the slot is kept warm


async def test_each_gpu_slot_is_armed_pinned_to_its_gpu_and_rearmed_after_its_lease(make_host):
    host = await make_host(warm_kernels=False)
    assert host.warm is None and host._context is not None
    pool = WarmPool(
        config=host.config,
        context=host._context,
        gpu_indices=[0, 1],  # no GPU here: the pinning and the sandbox's devices are the same
        sandbox=host.sandbox,
        cgroups=host.cgroups,
        environments=None,
        log=host.log,
    )
    try:
        pool.start()
        await wait_until(lambda: pool.warm((0,)) and pool.warm((1,)), what="two warm kernels")
        zero, one = pool.warm((0,)), pool.warm((1,))
        assert zero is not None and one is not None
        assert zero.env["CUDA_VISIBLE_DEVICES"] == "0" and one.env["CUDA_VISIBLE_DEVICES"] == "1"
        # A lease on both GPUs gets neither (each is pinned to one): both are discarded,
        # and none is armed while the lease holds them.
        assert pool.take((0, 1), None) is None
        await wait_until(lambda: pool.stats.discarded == 2, what="the discards")
        assert pool.warm((0,)) is None and pool.warm((1,)) is None
        taken_before = pool.stats.armed
        pool.release((0, 1), None)
        await wait_until(lambda: pool.warm((0,)) and pool.warm((1,)), what="re-armed")
        assert pool.stats.armed == taken_before + 2
        assert pool.take((1,), None) is not None and pool.stats.taken == 1
    finally:
        await pool.close()
    for warm in (zero, one):
        assert not pid_alive(warm.kernel.pid)


async def test_a_spare_that_dies_while_waiting_is_replaced(make_host, make_client):
    host = await make_host()
    dead = await _armed(host)
    dead.kernel.kill_group()  # the OOM killer, or anyone
    fresh = await _armed(host, old=dead.id)
    assert fresh.kernel.running and not dead.workspace.exists()
    client = make_client(host)
    started = await _start(client)
    assert started["pid"] == fresh.kernel.pid and host.sessions[client.session_id].warm_claimed


async def test_shutdown_kills_warm_kernels_and_removes_their_sandboxes(make_host, make_client):
    host = await make_host()
    client = make_client(host)
    await _start(client)
    spare = await _armed(host, old=client.session_id)
    claimed = host.sessions[client.session_id]
    pids = (spare.kernel.pid, claimed.kernel.pid if claimed.kernel else 0)
    await client.send_control(FrameKind.END, {})
    await client.wait_closed()
    await host.shutdown()
    for pid in pids:
        assert not pid_alive(pid)
    for path in (spare.workspace, spare.runtime_dir, claimed.workspace):
        assert not path.exists()
    assert os.listdir(host.config.workspace_root) == []


async def test_shutdown_while_a_warm_kernel_starts_leaves_no_process(make_host):
    host = await make_host()  # its slot is being armed as shutdown begins
    await host.shutdown()
    launchers = [
        pid
        for pid, argv in sandbox_processes(os.getpid())
        if "provider_host.kernel_launcher" in argv
    ]
    assert launchers == []
    assert host.warm is not None and host.warm.stats.armed == host.warm.stats.discarded
    assert os.listdir(host.config.workspace_root) == []
