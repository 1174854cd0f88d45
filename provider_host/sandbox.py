"""A bubblewrap sandbox per kernel: what a tenant's code can see of the provider's machine.

With ``ProviderConfig.isolation = "sandbox"`` (the default) every kernel process is started as
``bwrap ... -- [setpriv ...] python -m provider_host.kernel_launcher``. Inside it the kernel has
its own PID, IPC, UTS and cgroup namespaces (it sees only its own processes: not the host's
``/proc/<pid>/environ``, not other tenants' kernels), the system read-only, a private ``/tmp``
and ``/dev/shm`` (size-limited tmpfs), a minimal ``/dev`` with only the leased GPUs' device
nodes (``/dev/nvidiaN`` plus the control nodes) added, home directories replaced by empty
tmpfs with only the Python installation the kernel runs bound back read-only, and the host's
own state (data dir, workspace root, runtime root, Jupyter config and data dirs) hidden, its
keypair, allow-list and TLS files masked. Its workspace and its runtime directory (connection
file and IPC sockets) are the only host paths it can write, and the only ones of their kind it
can see. The environment is the one the host built (:func:`provider_host.isolation.kernel_env`):
nothing of the provider's is inherited.

Who the kernel runs as: a host running as root gives each session a uid of its own
(:class:`~provider_host.userpool.UserPool`); bwrap sets up the mounts as root, keeping only
CAP_SETUID, CAP_SETGID, CAP_SETPCAP and CAP_DAC_READ_SEARCH (to enter the session's 0700
workspace), and ``setpriv`` (util-linux) drops to the session's uid
with no supplementary groups, no capabilities (bounding set emptied) and ``no_new_privs``
before the interpreter starts. Any other host runs bwrap in a new user namespace
(``--unshare-user``): the kernel keeps the host's uid outside the namespace, so the mount
namespace alone keeps it from the host's files.

The network is not isolated (tenants install packages); see docs/security.md for what the
sandbox does not cover.

At startup call :func:`prepare_isolation` (it checks the setting, finds bwrap, probes it once
and refuses with what to install); per kernel, :meth:`Sandbox.argv` gives the command prefix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jupyter_core.paths import (
    jupyter_config_dir,
    jupyter_config_path,
    jupyter_data_dir,
    jupyter_runtime_dir,
)

from jupyter_io.errors import ConfigError

from .userpool import DEFAULT_LOCK_DIR, SessionUser, UserPool

if TYPE_CHECKING:
    from .config import ProviderConfig

__all__ = [
    "GPU_CONTROL_NODES",
    "INSTALL_HINT",
    "MIN_BWRAP_VERSION",
    "PRIVATE_TMPFS",
    "Sandbox",
    "SandboxPaths",
    "bwrap_argv",
    "prepare_isolation",
    "sandbox_paths",
]

#: Device nodes every CUDA process needs besides its GPUs' ``/dev/nvidiaN``.
GPU_CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
#: Private, size-limited tmpfs in every sandbox (nothing of the host's shows there).
PRIVATE_TMPFS = ("/tmp", "/dev/shm")
#: The oldest bubblewrap with every option used here (``--disable-userns``, ``--size``).
MIN_BWRAP_VERSION = "0.8.0"
#: What a host without bubblewrap is told to do.
INSTALL_HINT = "install bubblewrap: `apt-get install bubblewrap` (the package's name elsewhere too)"

# Capabilities bwrap keeps for setpriv, which drops them all with the uid; bwrap's own
# --chdir into the workspace (0700, the session's uid) needs the last one.
_SETPRIV_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH")
_PROBE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """What of the host's filesystem the sandbox hides and shows (decided once, at startup)."""

    hidden_dirs: tuple[str, ...]
    """Replaced by an empty tmpfs: home directories."""
    software: tuple[str, ...]
    """Bound back read-only inside ``hidden_dirs`` or :data:`PRIVATE_TMPFS`: the interpreter
    and its import paths."""
    host_dirs: tuple[str, ...]
    """The host's state, replaced by an empty tmpfs after ``software`` is bound back."""
    host_files: tuple[str, ...]
    """Single files masked with ``/dev/null``: keypair, allow-lists, TLS files."""


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _minimal(paths: Iterable[str]) -> tuple[str, ...]:
    """Sorted, without duplicates and without paths inside another one of them."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not _under(path, kept):
            kept.append(path)
    return tuple(kept)


def sandbox_paths(
    *,
    workspace_root: str,
    data_dir: str,
    runtime_root: str,
    secret_files: Iterable[str],
    python_paths: Iterable[str] | None = None,
) -> SandboxPaths:
    """Decide :class:`SandboxPaths` for a host (reads the filesystem; no mounts).

    ``python_paths`` defaults to this interpreter's prefixes and ``sys.path``: the kernel runs
    the same interpreter. Raises :class:`ConfigError` when a host directory to hide contains
    the Python installation (the kernel could not start).
    """
    homes = {"/root", "/home", _real(Path.home())}
    hidden = _minimal(p for p in homes if os.path.isdir(p) and p != "/")
    # The sandbox's /tmp and /dev/shm are private tmpfs too: an installation there (a
    # checkout's venv under /tmp) is bound back like one under a home directory.
    covered = [*hidden, *(_real(p) for p in PRIVATE_TMPFS if os.path.isdir(p))]
    if python_paths is None:
        python_paths = [
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            sys.base_exec_prefix,
            os.path.dirname(_real(sys.executable)),
            *sys.path,
        ]
    software = _minimal(
        real
        for path in python_paths
        if path and os.path.isabs(path)
        for real in [_real(path)]
        if os.path.exists(real) and _under(real, covered) and real not in covered
    )
    wanted = [workspace_root, data_dir, runtime_root, jupyter_config_dir(), jupyter_data_dir()]
    wanted += [jupyter_runtime_dir(), *jupyter_config_path()]
    host_dirs = []
    for path in wanted:
        real = _real(path)
        if real == "/" or not os.path.isdir(real):
            continue
        if _under(real, covered):
            continue  # out of sight already (a hidden home, the private /tmp)
        for soft in software:
            if _under(soft, [real]):
                raise ConfigError(
                    f"{path} holds the Python installation kernels run ({soft}) and must be "
                    f"hidden from them; move the host's workspace_root/data_dir elsewhere"
                )
        host_dirs.append(real)
    files = [_real(f) for f in secret_files if f]
    return SandboxPaths(
        hidden_dirs=hidden,
        software=software,
        host_dirs=_minimal(host_dirs),
        host_files=tuple(sorted({f for f in files if os.path.isfile(f)})),
    )


def bwrap_argv(
    *,
    bwrap: str,
    paths: SandboxPaths,
    workspace: str,
    runtime_dir: str,
    gpus: Sequence[int],
    user: SessionUser | None,
    setpriv: str | None,
    tmpfs_bytes: int,
    read_only: Sequence[str] = (),
    network: bool = True,
) -> list[str]:
    """The command prefix that runs a kernel in its sandbox (pure: no I/O).

    ``user`` and ``setpriv`` are given together (a root host: drop to ``user``) or both None
    (a user namespace). ``gpus`` are the leased devices' indices: only their
    ``/dev/nvidiaN`` and, when any, :data:`GPU_CONTROL_NODES` are bound (``--dev-bind-try``:
    a node this machine lacks is skipped). ``read_only`` are host directories shown
    read-only even where the host's state is hidden (a course environment in the data
    dir); ``network=False`` gives the sandbox a network namespace of its own (loopback
    only). The kernel command follows the returned list.
    """
    if (user is None) != (setpriv is None):
        raise ValueError("give user and setpriv together (root host) or neither (user namespace)")
    args = [bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try"]
    if not network:
        args += ["--unshare-net"]
    if user is None:
        args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    else:
        args += ["--cap-drop", "ALL"]
        for cap in _SETPRIV_CAPS:
            args += ["--cap-add", cap]
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    size = ["--size", str(tmpfs_bytes)] if tmpfs_bytes > 0 else []
    # Mounts in the order made: the last one covering a path decides what is there.
    mounts: list[tuple[str, bool]] = [("/", False)]  # (path, is a fresh tmpfs)

    def covering(path: str) -> tuple[str, bool]:
        return next(m for m in reversed(mounts) if _under(path, [m[0]]))

    def out_of_sight(path: str) -> bool:
        top, empty = covering(path)
        return empty and path != top

    def tmpfs(path: str, *extra: str) -> None:
        args.extend([*extra, "--tmpfs", path])
        mounts.append((path, True))

    def bind(option: str, path: str) -> None:
        # A mount point inside a tmpfs is created 0700 by bwrap, and the session's uid could
        # not walk through it to its own workspace: make each missing parent 0755 first.
        missing = []
        parent = os.path.dirname(path)
        while parent != "/" and out_of_sight(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            args.extend(["--perms", "0755", "--dir", directory])
            mounts.append((directory, True))  # an empty directory, like a tmpfs
        args.extend([option, path, path])
        mounts.append((path, False))

    for path in PRIVATE_TMPFS:
        tmpfs(path, *size, "--perms", "1777")
    for path in paths.hidden_dirs:
        tmpfs(path)
    for path in paths.software:
        bind("--ro-bind", path)
    for path in paths.host_dirs:
        if not covering(path)[1]:  # not already inside (or at) an empty mount
            tmpfs(path)
    for path in paths.host_files:
        if not covering(path)[1]:
            args += ["--ro-bind", "/dev/null", path]
    for path in read_only:
        bind("--ro-bind", path)
    for path in (workspace, runtime_dir):
        bind("--bind", path)
    if gpus:
        for node in (*(f"/dev/nvidia{index}" for index in gpus), *GPU_CONTROL_NODES):
            args += ["--dev-bind-try", node, node]
    # ipykernel would take the host's pid for a parent it can never see, and exit at once.
    args += ["--unsetenv", "JPY_PARENT_PID", "--chdir", workspace, "--"]
    if user is not None and setpriv is not None:
        args += [
            setpriv,
            f"--reuid={user.uid}",
            f"--regid={user.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
    return args


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How this host sandboxes kernels (built by :func:`prepare_isolation`)."""

    bwrap: str
    paths: SandboxPaths
    tmpfs_bytes: int
    #: A root host's uid pool and setpriv; both None in user-namespace mode.
    users: UserPool | None
    setpriv: str | None

    def argv(
        self,
        *,
        workspace: Path,
        runtime_dir: Path,
        gpus: Sequence[int],
        user: SessionUser | None,
        read_only: Sequence[Path] = (),
        network: bool = True,
    ) -> list[str]:
        """The command prefix for one kernel of the session running as ``user`` (see
        :func:`bwrap_argv` for ``read_only`` and ``network``)."""
        return bwrap_argv(
            bwrap=self.bwrap,
            paths=self.paths,
            workspace=str(workspace),
            runtime_dir=str(runtime_dir),
            gpus=gpus,
            user=user,
            setpriv=self.setpriv,
            tmpfs_bytes=self.tmpfs_bytes,
            read_only=[str(path) for path in read_only],
            network=network,
        )

    def probe(self) -> None:
        """Run ``true`` in a sandbox once. Raises :class:`ConfigError` with bwrap's words."""
        user = self.users.acquire() if self.users is not None else None
        with tempfile.TemporaryDirectory(prefix="jio-probe-") as scratch:
            workspace, runtime = Path(scratch) / "w", Path(scratch) / "r"
            workspace.mkdir()
            runtime.mkdir()
            if user is not None:
                for path in (workspace, runtime):
                    os.chown(path, user.uid, user.gid)
            argv = self.argv(workspace=workspace, runtime_dir=runtime, gpus=(), user=user)
            try:
                done = subprocess.run(
                    [*argv, sys.executable, "-c", "pass"],
                    capture_output=True,
                    timeout=_PROBE_TIMEOUT,
                    env={"PATH": os.environ.get("PATH", os.defpath)},
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(f"bubblewrap could not start a sandbox: {exc}") from None
            finally:
                if user is not None and self.users is not None:
                    self.users.release(user)
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()[-400:]
            if "Unknown option" in said:
                hint = f"; this needs bubblewrap {MIN_BWRAP_VERSION} or later"
            elif self.users is None:
                hint = (
                    "; this host is not root, so bwrap needs unprivileged user namespaces "
                    "(sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu "
                    "kernel.apparmor_restrict_unprivileged_userns=0), or run the host as root"
                )
            else:
                hint = ""
            raise ConfigError(f"bubblewrap could not start a sandbox: {said}{hint}")


def prepare_isolation(config: ProviderConfig) -> Sandbox | None:
    """Check ``config.isolation`` and, for ``sandbox``, find and probe bubblewrap.

    Returns the :class:`Sandbox`, or None for ``isolation = "none"``. Raises
    :class:`ConfigError` when ``none`` is asked of a host linked to a coordinator, or when
    this machine cannot sandbox (no bwrap, no setpriv as root, no user namespaces): the
    message says what to install, and such a host never joins a marketplace.
    """
    marketplace = bool(config.coordinator_url)
    if config.isolation == "none":
        if marketplace:
            raise ConfigError(
                "isolation 'none' is refused for a host joined to a coordinator: tenants are "
                "strangers and must be sandboxed; remove --isolation none (sandbox is the "
                "default)"
            )
        return None
    refusal = (
        f"refusing to join the marketplace at {config.coordinator_url}: "
        if marketplace
        else "cannot start: "
    )
    fallback = (
        ""
        if marketplace
        else " (or, on a standalone host whose allow-listed users you trust, --isolation none)"
    )
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigError(
            f"{refusal}kernels must run sandboxed and bwrap is not on PATH; "
            f"{INSTALL_HINT}{fallback}"
        )
    users: UserPool | None = None
    setpriv: str | None = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ConfigError(
                f"{refusal}a root host drops each kernel to a uid of its own with setpriv, "
                f"which is not on PATH; install util-linux (`apt-get install util-linux`){fallback}"
            )
        users = UserPool(config.sandbox_first_uid, config.sandbox_uid_count, DEFAULT_LOCK_DIR)
        users.prepare()
    secret_files = [config.keypair_path, config.certfile, config.keyfile, *config.allow_file]
    sandbox = Sandbox(
        bwrap=bwrap,
        paths=sandbox_paths(
            workspace_root=config.workspace_root,
            data_dir=config.data_dir,
            runtime_root=tempfile.gettempdir(),
            secret_files=secret_files,
        ),
        tmpfs_bytes=config.sandbox_tmpfs_size,
        users=users,
        setpriv=setpriv,
    )
    try:
        sandbox.probe()
    except ConfigError as exc:
        raise ConfigError(f"{refusal}{exc}{fallback}") from None
    return sandbox
