"""Course environments, end to end on loopback: a cohort's requirements reach the provider
over its link, the host builds them once (pip, --no-index from a wheel this test makes, in
the session sandbox), the cohort's real remote kernels import the package, later sessions
reuse the build, a build that fails tells the user why and is not kept, and requirements
that do not match their hash are never built. Nothing is mocked: a real coordinator, real
provider hosts, real pip, real sandboxed ipykernel processes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from jupyter_io.cohorts import CohortSettings
from jupyter_io.coordinator.scheduler import LeaseRequest
from jupyter_io.coordinator.server import CoordinatorServer
from jupyter_io.errors import KernelLaunchError
from jupyter_io.gpu_names import CPU_OFFER
from jupyter_io.protocol import FrameKind, Progress
from jupyter_io.provider_link import Environment, EnvironmentRefused, environment_sha256
from kernel_provisioner.connection import Credentials
from kernel_provisioner.connection import TunnelClient as ProvisionerTunnelClient
from kernel_provisioner.facade import Facade
from provider_host.coordinator_link import CoordinatorLink
from provider_host.environments import (
    COMPLETE_MARKER,
    EnvironmentBuildError,
    EnvironmentCache,
    check_requirements,
)
from provider_host.server import ProviderServer

from .conftest import DEFAULT_TIMEOUT, HostFactory, TunnelClient, UserFactory

pytestmark = pytest.mark.timeout(120)

REQUIREMENTS = "coursepkg==1.0\n"


def make_wheel(directory: Path, name: str, version: str, code: str) -> Path:
    """A pure-Python wheel of one module ``name`` (built by hand: no build backend)."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": code.encode(),
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ).encode(),
        f"{dist}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(directory, "coursepkg", "1.0", "VALUE = 42\n").chmod(0o644)
    directory.chmod(0o755)  # a root host builds as a uid of its pool, which must read it
    return directory


def offline(wheelhouse: Path) -> dict[str, Any]:
    """Host traits: pip sees only ``wheelhouse``, and no network."""
    return {
        "environment_pip_args": ["--no-index", "--find-links", str(wheelhouse)],
        "environment_network": False,
    }


async def new_cohort(coordinator: CoordinatorServer, requirements: str) -> str:
    store = coordinator.store
    assert store is not None
    cohort_id = "c_" + secrets.token_urlsafe(12)
    settings = CohortSettings(
        name="ML 101",
        gpu_types=(CPU_OFFER,),
        max_price_lamports_per_hour=10**9,
        term_ends_at=time.time() + 86400,
        requirements=requirements,
    )
    await store.create_cohort(instructor=str(Pubkey.new_unique()), settings=settings,
                              cohort_id=cohort_id)  # fmt: skip
    return cohort_id


async def cohort_client(
    coordinator: CoordinatorServer, make_user: UserFactory, cohort_id: str
) -> TunnelClient:
    """A student's tunnel client holding a cohort lease's token (issued by the service)."""
    assert coordinator.leases is not None
    user = make_user()
    grant = await coordinator.leases.request(
        user.keypair.pubkey(), LeaseRequest(gpu=CPU_OFFER), cohort_id=cohort_id
    )
    assert grant.token is not None
    return TunnelClient(grant.tunnel_url, user.keypair, token=grant.token)


async def launch_answer(client: TunnelClient) -> tuple[list[Progress], dict[str, Any], bool]:
    """LAUNCH; return the PROGRESS steps before the answer, the answer's body and whether it
    was STARTED."""
    await client.send_control(
        FrameKind.LAUNCH, {"key": client.key, "signature_scheme": "hmac-sha256", "env": {}}
    )
    steps = []
    while True:
        frame = await client.next_frame(
            lambda f: f.kind in (FrameKind.PROGRESS, FrameKind.STARTED, FrameKind.EXITED)
        )
        if frame.kind is FrameKind.PROGRESS:
            steps.append(Progress.parse(frame.body))
        else:
            return steps, frame.body, frame.kind is FrameKind.STARTED


def built(host: ProviderServer) -> EnvironmentCache:
    assert host.environments is not None
    return host.environments


async def test_a_cohort_kernel_imports_its_course_packages_built_once_for_all_sessions(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    make_user: UserFactory,
    wheelhouse: Path,
) -> None:
    host = await market_host(direct=True, **offline(wheelhouse))
    cohort_id = await new_cohort(coordinator, REQUIREMENTS)
    sha256 = environment_sha256(REQUIREMENTS)
    first = await cohort_client(coordinator, make_user, cohort_id)
    # The second student starts through the provisioner's own tunnel client, with a launch
    # timeout far shorter than the build: the build's progress holds it off.
    second = await cohort_client(coordinator, make_user, cohort_id)
    token = second.token
    seen: list[Progress] = []

    async def credentials(_stale: bool) -> Credentials:
        return Credentials(token=token)

    facade = Facade()
    facade.bind()
    provisioner_client = ProvisionerTunnelClient(
        second.url,
        second.keypair,
        outbound=facade.outbound,
        inbound=facade.inbound,
        credentials=credentials,
        on_progress=seen.append,
    )
    try:
        # Two sessions start at once: one build, both wait for it and see it as a step.
        await first.connect()
        await provisioner_client.open()
        (steps_1, started_1, ok_1), started_2 = await asyncio.gather(
            launch_answer(first), provisioner_client.launch(first.key, {}, timeout=0.05)
        )
        assert ok_1, started_1
        assert started_2.generation == 1 and started_2.pid
        assert built(host).builds == 1
        for steps in (steps_1, seen):
            assert [(s.step, s.state) for s in steps] == [
                ("environment", "building"),
                ("environment", "ready"),
            ]
            assert steps[0].timeout is not None and steps[0].timeout >= 1800
        await first.wait_ready()
        value, where = await first.evaluate(
            "[__import__('coursepkg').VALUE, __import__('coursepkg').__file__]"
        )
        assert value == 42 and f"/environments/{sha256}/venv/" in where
        # The environment is the kernel's to read, not to change.
        _, reply = await first.execute(
            f"open({where!r}, 'a').write('VALUE = 0')", stop_on_error=False
        )
        assert reply is not None and reply["content"]["status"] == "error"
        assert reply["content"]["ename"] in ("OSError", "PermissionError")

        # A later session of the cohort starts at once from the cache: no build, no step.
        third = await cohort_client(coordinator, make_user, cohort_id)
        try:
            await third.connect()
            steps_3, _, ok_3 = await launch_answer(third)
            assert ok_3 and steps_3 == [] and built(host).builds == 1
            await third.wait_ready()
            assert await third.evaluate("__import__('coursepkg').VALUE") == 42
        finally:
            await third.disconnect()
    finally:
        await first.disconnect()
        await provisioner_client.end()
        facade.close()


async def test_a_failed_build_tells_the_user_why_and_is_not_kept(
    coordinator: CoordinatorServer,
    market_host: HostFactory,
    make_user: UserFactory,
    wheelhouse: Path,
) -> None:
    host = await market_host(direct=True, **offline(wheelhouse))
    requirements = "coursepkg==1.0\nno-such-package-anywhere==9.9\n"
    cohort_id = await new_cohort(coordinator, requirements)
    client = await cohort_client(coordinator, make_user, cohort_id)
    try:
        await client.connect()
        steps, exited, ok = await launch_answer(client)
        assert not ok and exited["exit_code"] is None
        assert "building the course environment failed" in exited["error"]
        assert "no-such-package-anywhere" in exited["error"]  # pip's own words
        assert [s.state for s in steps] == ["building", "failed"]
        assert not (built(host).root / environment_sha256(requirements)).exists()
        # Not remembered as built, nor as failed: the next LAUNCH runs pip again.
        _, again, ok = await launch_answer(client)
        assert not ok and "no-such-package-anywhere" in again["error"]
        assert built(host).builds == 2
    finally:
        await client.disconnect()


async def test_requirements_go_only_to_a_provider_hosting_the_cohort_and_must_match_the_hash(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    host = await market_host(direct=True)
    link = host.coordinator_link
    assert link is not None and coordinator.store is not None
    cohort_id = await new_cohort(coordinator, REQUIREMENTS)
    sha256 = environment_sha256(REQUIREMENTS)
    # No lease of that cohort on this provider: the coordinator keeps the text to itself.
    with pytest.raises(KernelLaunchError, match="no live lease of this provider"):
        await link.environment(sha256, DEFAULT_TIMEOUT)
    await cohort_client(coordinator, make_user, cohort_id)  # a live lease here now
    assert await link.environment(sha256, DEFAULT_TIMEOUT) == REQUIREMENTS

    # Text whose hash is not the one asked for is never handed to pip: the coordinator
    # refuses its own altered row, and the provider refuses altered text on the wire.
    engine = coordinator.store.engine
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("UPDATE cohorts SET requirements = :r WHERE id = :id"),
            {"r": "evil==6.6.6\n", "id": cohort_id},
        )
    with pytest.raises(KernelLaunchError, match="no longer match their hash"):
        await link.environment(sha256, DEFAULT_TIMEOUT)

    # The provider's own check, on a link of its that is not connected (so only the
    # answers this test hands it arrive): altered text is refused, as is a refusal.
    offline_link = CoordinatorLink("ws://127.0.0.1:9/api/v1/providers/connect", Keypair(), host)
    for answer, error in [
        (Environment(sha256, "evil==6.6.6\n"), "do not match their sha256"),
        (EnvironmentRefused(sha256, "cohort ended"), "cohort ended"),
        (Environment(sha256, REQUIREMENTS), None),
    ]:
        waiting = asyncio.ensure_future(offline_link.environment(sha256, DEFAULT_TIMEOUT))
        await asyncio.wait_for(offline_link._queued.wait(), DEFAULT_TIMEOUT)  # asked
        offline_link._queued.clear()
        offline_link._dispatch(answer.to_json())
        if error is None:
            assert await waiting == REQUIREMENTS
        else:
            with pytest.raises(KernelLaunchError, match=error):
                await waiting


def test_requirements_may_not_choose_the_index_or_read_other_files() -> None:
    check_requirements("numpy==2.1  # a comment\n\nscipy>=1.11\n")
    for line in ("--index-url http://evil.example/simple", "-r /etc/passwd", "  -e ./src"):
        with pytest.raises(EnvironmentBuildError, match=r"line 2 .* pip option"):
            check_requirements(f"numpy\n{line}\n")


async def test_a_cache_on_the_same_directory_finds_the_build_and_evicts_the_least_used(
    tmp_path: Path, wheelhouse: Path
) -> None:
    cache = EnvironmentCache(
        tmp_path / "environments",
        sandbox=None,
        pip_args=["--no-index", "--find-links", str(wheelhouse)],
        keep=1,
    )

    async def fetch(text: str) -> str:
        return text

    first = await cache.get(environment_sha256(REQUIREMENTS), lambda: fetch(REQUIREMENTS))
    assert (first.path / COMPLETE_MARKER).is_file() and cache.builds == 1
    again = EnvironmentCache(tmp_path / "environments", sandbox=None)  # a restarted host
    assert (await again.get(first.sha256, lambda: fetch("unused"))) == first
    assert again.builds == 0

    # keep=1: past it the least recently used environment goes, unless a session holds it.
    other = environment_sha256("coursepkg\n")
    shutil.copytree(first.path, cache.root / other, symlinks=True)  # as if built just now
    hold = cache.hold(first)
    assert cache._evict(keep_hash=other) == [] and first.path.exists()
    EnvironmentCache.release(hold)
    assert cache._evict(keep_hash=other) == [first.sha256]
    assert not first.path.exists() and (cache.root / other).exists() and cache.builds == 1


async def test_a_session_ends_at_once_while_its_environment_builds_and_shutdown_stops_the_build(
    coordinator: CoordinatorServer, market_host: HostFactory, make_user: UserFactory
) -> None:
    # An index that accepts pip's connection and never answers: the build hangs in pip.
    connections: list[asyncio.StreamWriter] = []
    asked = asyncio.Event()

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        asked.set()

    index = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = index.sockets[0].getsockname()[1]
    host = await market_host(
        direct=True,
        environment_pip_args=["--index-url", f"http://127.0.0.1:{port}/simple", "--timeout", "90"],
    )
    cohort_id = await new_cohort(coordinator, "slowpkg\n")
    client = await cohort_client(coordinator, make_user, cohort_id)
    cache = built(host)
    try:
        await client.connect()
        await client.send_control(
            FrameKind.LAUNCH, {"key": client.key, "signature_scheme": "hmac-sha256", "env": {}}
        )
        building = Progress.parse(await client.control(FrameKind.PROGRESS))
        assert building.state == "building"
        await asyncio.wait_for(asked.wait(), DEFAULT_TIMEOUT)  # pip is waiting on the index
        # The tunnel is not held by the build: END is heard and answered now.
        await client.send_control(FrameKind.END)
        code, _ = await client.wait_closed(DEFAULT_TIMEOUT)
        assert code == 4010
        assert cache.builds == 1 and cache._building  # the build itself goes on...
        build_dir = cache.root / environment_sha256("slowpkg\n")
        assert build_dir.exists()
        await asyncio.wait_for(cache.close(), DEFAULT_TIMEOUT)  # ...until the host stops it
        assert not cache._building and not build_dir.exists()
    finally:
        await client.disconnect()
        for writer in connections:
            writer.close()
        index.close()
