"""A memory cgroup per session: a kernel that takes more memory than its session's limit is
killed and told why, and the host and the other sessions go on (issue 11, part 2). Real
bubblewrap, real kernels, real cgroups of this machine."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from traitlets import TraitError

from jupyter_io.protocol import FrameKind
from provider_host.cgroups import (
    HOST_LEAF,
    CgroupParent,
    cgroup_settings,
    find_cgroup_parent,
    parse_size,
    prepare_cgroups,
)
from provider_host.config import ProviderConfig

from .conftest import TunnelClient

pytestmark = pytest.mark.timeout(60)

_MiB = 1 << 20


def _cgroups_here() -> bool:
    tree, _ = prepare_cgroups(root="", memory=256 * _MiB, pids=0)
    return tree is not None


needs_cgroups = pytest.mark.skipif(
    not _cgroups_here(), reason="this machine does not let the tests create memory cgroups"
)


async def _ready(client: TunnelClient) -> dict:
    await client.connect()
    started = await client.launch()
    await client.wait_ready()
    return started


@needs_cgroups
async def test_a_kernel_past_its_memory_limit_dies_out_of_memory_and_the_host_serves_on(
    make_host, make_client
):
    host = await make_host(session_memory_limit="200M")
    greedy, other = make_client(host), make_client(host)
    await _ready(greedy)
    await _ready(other)
    # 400 MiB written (not just reserved) in a session limited to 200 MiB.
    await greedy.execute("hoard = bytearray(b'x') * (400 << 20)", wait=False)
    exited = await greedy.control(FrameKind.EXITED)
    assert exited["exit_code"] == -signal.SIGKILL
    assert exited["reason"].startswith("out of memory")
    assert "200 MiB (209,715,200 bytes)" in exited["reason"]
    # The other session and the host carry on; the tenant may start again in its session.
    assert await other.evaluate("sum(range(10))") == 45
    await greedy.launch()
    await greedy.wait_ready()
    assert await greedy.evaluate("len(bytearray(b'x') * (50 << 20))") == 50 << 20
    assert len(host.sessions) == 2


@needs_cgroups
async def test_a_kernel_under_the_limit_runs_inside_its_cgroup_which_goes_with_the_session(
    make_host, make_client
):
    host = await make_host(session_memory_limit="300M")
    client = make_client(host)
    started = await _ready(client)
    session = host.sessions[client.session_id]
    cgroup = session.cgroup
    assert cgroup is not None and cgroup.path.is_dir()
    limit_file = "memory.limit_in_bytes" if cgroup.version == 1 else "memory.max"
    assert (cgroup.path / limit_file).read_text().strip() == str(300 * _MiB)
    assert started["pid"] in cgroup.pids()  # bwrap itself: joined before it ran
    # The kernel holds 100 MiB and works; its cgroup namespace shows its cgroup as the root.
    await client.execute("kept = bytearray(b'x') * (100 << 20)")
    assert await client.evaluate("len(kept)") == 100 << 20
    seen = await client.evaluate("open('/proc/self/cgroup').read()")
    assert all(line.endswith(":/") for line in seen.splitlines() if "memory" in line)
    await client.send_control(FrameKind.END)
    await session.ended.wait()
    assert not cgroup.path.exists()
    assert session.cgroup is None


async def test_a_host_that_cannot_create_cgroups_says_so_once_and_falls_back_to_rlimit_as(
    make_host, make_client, tmp_path: Path, caplog
):
    missing = tmp_path / "no-cgroup-here"
    host = await make_host(cgroup_root=str(missing), mem_limit=8 << 30)
    assert host.cgroups is None
    printed = host.stdout.getvalue()
    warning = (
        f"WARNING: no memory limit per session (cgroup_root {missing} does not exist "
        f"(it must be a cgroup directory)): only the address-space limit mem_limit="
        f"{8 << 30} applies"
    )
    assert printed.count("no memory limit per session") == 1 and warning in printed
    said = [r for r in caplog.records if "no memory limit per session" in r.getMessage()]
    assert len(said) == 1
    client = make_client(host)
    await _ready(client)
    assert host.sessions[client.session_id].cgroup is None
    address_space = await client.evaluate(
        "__import__('resource').getrlimit(__import__('resource').RLIMIT_AS)"
    )
    assert address_space == [8 << 30, 8 << 30]


async def test_a_directory_that_is_not_a_cgroup_is_refused_with_the_reason(tmp_path: Path):
    tree, why = prepare_cgroups(root=str(tmp_path), memory=256 * _MiB, pids=0)
    assert tree is None
    assert "neither a cgroup v2 directory nor one of a cgroup v1 memory hierarchy" in why
    assert prepare_cgroups(root="", memory=0, pids=0) == (None, "session_memory_limit is 0")


# -- what is written where (pure) ----------------------------------------------------------


def test_the_settings_written_for_each_cgroup_version():
    assert cgroup_settings(1, memory=200 * _MiB, pids=300) == [
        ("memory.limit_in_bytes", "209715200"),
        ("memory.memsw.limit_in_bytes", "209715200"),  # swap never extends the limit
    ]
    assert cgroup_settings(2, memory=200 * _MiB, pids=300) == [
        ("memory.max", "209715200"),
        ("memory.swap.max", "0"),
        ("memory.oom.group", "1"),
        ("pids.max", "300"),
    ]
    assert ("pids.max", "0") not in cgroup_settings(2, memory=_MiB, pids=0)


_V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
_V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_where_session_cgroups_go():
    v1 = find_cgroup_parent("4:memory:/process_api/ab12\n1:cpu:/\n0::/\n", _V1_MOUNTS)
    assert v1 == CgroupParent(1, Path("/sys/fs/cgroup/memory/process_api/ab12"))
    # A systemd service with Delegate=yes: the host moves into a leaf, sessions beside it.
    service = "/sys/fs/cgroup/system.slice/jio.service"
    v2 = find_cgroup_parent("0::/system.slice/jio.service\n", _V2_MOUNTS)
    assert v2 == CgroupParent(2, Path(service), Path(service) / HOST_LEAF)
    moved = find_cgroup_parent(f"0::/system.slice/jio.service/{HOST_LEAF}\n", _V2_MOUNTS)
    assert moved == v2  # a host restarted in the leaf: the same place, not one level deeper
    assert find_cgroup_parent("0::/\n", _V2_MOUNTS) == CgroupParent(
        2, Path("/sys/fs/cgroup/jupyter-io")
    )
    # A container whose mount is rooted below the process's cgroup path: not usable.
    rooted = "30 23 0:26 /other /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert find_cgroup_parent("0::/mine\n", rooted) is None
    assert find_cgroup_parent("0::/\n", "") is None


def test_session_memory_limit_takes_sizes_and_refuses_a_bare_small_number():
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 * _MiB
    assert parse_size("1.5g") == 3 << 29 and parse_size("1048576") == _MiB
    assert ProviderConfig(session_memory_limit="8G").session_memory_bytes() == 8 << 30
    assert ProviderConfig(session_memory_limit="0").session_memory_bytes() == 0
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    auto = ProviderConfig(max_sessions=4).session_memory_bytes()
    assert ram // 4 - _MiB < auto <= ram // 4
    with pytest.raises(TraitError, match="give a unit"):
        ProviderConfig(session_memory_limit="200")
    with pytest.raises(TraitError, match="is not a size"):
        ProviderConfig(session_memory_limit="8 gigs")
