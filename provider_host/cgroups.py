"""A memory cgroup per session: a limit on the real memory its kernels use.

An address-space rlimit (``mem_limit``) cannot bound a GPU kernel: CUDA reserves virtual
ranges larger than RAM + VRAM. A memory cgroup counts what is really used instead (resident
memory and the page cache of the files the session reads and writes), and when a session goes
over its limit the kernel's OOM killer ends a process of that session, never the host's or
another session's.

Where the cgroups live (:func:`find_cgroup_parent`, decided once at startup):

- cgroup v1 (a ``memory`` hierarchy is mounted): children of the host's own memory cgroup,
  ``memory.limit_in_bytes`` and, where swap accounting is on, ``memory.memsw.limit_in_bytes``
  (memory + swap) at the same value.
- cgroup v2: ``memory.max``, ``memory.swap.max = 0``, ``memory.oom.group = 1`` (the whole
  session dies together) and ``pids.max``. A cgroup with processes may not have children with
  controllers, so a host in a cgroup of its own (a systemd service with ``Delegate=yes``)
  first moves itself into a leaf, ``jupyter-io-host``, and the sessions' cgroups are its
  siblings; a host in the root cgroup uses ``/sys/fs/cgroup/jupyter-io``.

``cgroup_root`` names the parent instead (a directory delegated to the host: it must exist,
and on v2 hold no process). A host that cannot create cgroups (not root, nothing delegated)
runs without them and says so at startup (:func:`prepare_cgroups` returns why).

Each kernel joins its session's cgroup between fork and exec
(:func:`provider_host.isolation.limits_preexec` writes to ``cgroup.procs``), before bwrap or
the kernel runs, so nothing of the tenant's ever runs outside it; bwrap's cgroup namespace
then shows the kernel its cgroup as the root. Call :meth:`CgroupTree.create` when a session
opens, :meth:`SessionCgroup.oom_kills` to tell an out-of-memory death, and
:meth:`SessionCgroup.remove` when it ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CGROUP_PREFIX",
    "HOST_LEAF",
    "MIN_SESSION_MEMORY",
    "CgroupParent",
    "CgroupTree",
    "SessionCgroup",
    "cgroup_settings",
    "find_cgroup_parent",
    "format_size",
    "parse_size",
    "prepare_cgroups",
    "session_cgroup_name",
]

#: Name prefix of every cgroup a host makes for a session: ``jupyter-io-<host pid>-<session>``.
CGROUP_PREFIX = "jupyter-io-"
#: The leaf a cgroup v2 host moves itself into, so that its cgroup may have session children.
HOST_LEAF = "jupyter-io-host"
#: The smallest limit accepted: an idle ipykernel alone uses some 60 MiB.
MIN_SESSION_MEMORY = 64 * 1024 * 1024

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*\Z", re.IGNORECASE)
_OUR_CGROUP = re.compile(rf"{re.escape(CGROUP_PREFIX)}(\d+)-")
_REMOVE_TIMEOUT = 2.0


def parse_size(text: str) -> int:
    """Bytes from ``"8589934592"``, ``"8G"``, ``"512M"``, ``"1.5GiB"`` (binary units).

    Raises :class:`ValueError` with an example of what is accepted.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: give bytes or a number with K, M, G or T, e.g. 8G"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(value: int) -> str:
    """``value`` bytes for people: ``"200 MiB"``, ``"7.8 GiB"``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{value} B"


def session_cgroup_name(session_id: str, host_pid: int) -> str:
    """The directory name of a session's cgroup (the host's pid lets a later host tell a dead
    host's leftovers from a live one's)."""
    return f"{CGROUP_PREFIX}{host_pid}-{session_id}"


def cgroup_settings(version: int, *, memory: int, pids: int) -> list[tuple[str, str]]:
    """The files to write in a session's cgroup and their values, in order (pure).

    ``memory`` in bytes; ``pids`` the most tasks (0: no limit; v2 only, where the pids
    controller shares the hierarchy). The first file is the memory limit itself; the others
    are written where the hierarchy has them: swap is limited too wherever it is accounted
    (v1 ``memsw``: memory + swap; v2 ``memory.swap.max``), so swapping never extends the limit.
    """
    if version == 1:
        # memsw must never be below limit_in_bytes, hence after it.
        return [
            ("memory.limit_in_bytes", str(memory)),
            ("memory.memsw.limit_in_bytes", str(memory)),
        ]
    if version != 2:
        raise ValueError(f"cgroup version {version}?")
    settings = [("memory.max", str(memory)), ("memory.swap.max", "0"), ("memory.oom.group", "1")]
    if pids > 0:
        settings.append(("pids.max", str(pids)))
    return settings


@dataclass(frozen=True, slots=True)
class CgroupParent:
    """Where a host makes its sessions' cgroups."""

    version: int
    path: Path
    #: cgroup v2 only: the leaf the host moves itself into first (None: it stays).
    host_leaf: Path | None = None


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _inside(own: str, root: str) -> str | None:
    """``own`` relative to the mount's ``root`` ("" at the root), None when outside it."""
    if root == "/":
        return own.strip("/")
    if own == root or own.startswith(root.rstrip("/") + "/"):
        return own[len(root) :].strip("/")
    return None


def find_cgroup_parent(proc_cgroup: str, mountinfo: str) -> CgroupParent | None:
    """Where this process's sessions' cgroups go, from ``/proc/self/cgroup`` and
    ``/proc/self/mountinfo`` (pure; see the module docstring). None: no memory controller
    is mounted where this process could use it."""
    own_v1: str | None = None
    own_v2: str | None = None
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            own_v2 = path
        elif "memory" in controllers.split(","):
            own_v1 = path
    v2: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        if fstype == "cgroup" and "memory" in options and own_v1 is not None:
            relative = _inside(own_v1, root)
            if relative is not None:
                return CgroupParent(1, Path(mount_point) / relative)
        elif fstype == "cgroup2" and v2 is None:
            v2 = (root, mount_point)
    if v2 is None or own_v2 is None:
        return None
    relative = _inside(own_v2, v2[0])
    if relative is None:
        return None
    mount = Path(v2[1])
    if relative == "":
        return CgroupParent(2, mount / "jupyter-io")
    if Path(relative).name == HOST_LEAF:  # this host, or one before it, moved here already
        relative = str(Path(relative).parent).removeprefix(".")
        if relative == "":
            return CgroupParent(2, mount / "jupyter-io")
    return CgroupParent(2, mount / relative, host_leaf=mount / relative / HOST_LEAF)


class SessionCgroup:
    """One session's cgroup (made by :meth:`CgroupTree.create`)."""

    def __init__(self, path: Path, version: int, memory: int) -> None:
        self.path = path
        self.version = version
        #: Its memory limit in bytes.
        self.memory = memory

    def open_procs(self) -> int:
        """A descriptor of its ``cgroup.procs`` (close-on-exec): writing ``b"0"`` to it moves
        the writer in. Open in the host; the child writes it between fork and exec."""
        return os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def oom_kills(self) -> int | None:
        """How many processes of the session the OOM killer has ended (None: not told)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def oom_reason(self) -> str:
        """What a client is told when its kernel was killed for going over the limit."""
        return (
            f"out of memory: the kernel's processes used more than this session's memory "
            f"limit of {format_size(self.memory)} ({self.memory:,} bytes) and were killed; "
            f"LAUNCH again to continue, and hold less in memory"
        )

    def pids(self) -> list[int]:
        """The processes in it (pids as the host sees them)."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def remove(self, timeout: float = _REMOVE_TIMEOUT) -> bool:
        """Kill whatever still runs in it and remove it; True once it is gone.

        Normally its kernel is dead and it is empty already (a sandbox's processes die with
        its PID namespace); a process that left the kernel's process group is killed here.
        """
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)  # killed processes take a moment to exit; no event here
            else:
                return True


class CgroupTree:
    """The parent under which this host makes a cgroup per session."""

    def __init__(self, parent: CgroupParent, *, memory: int, pids: int) -> None:
        self.parent = parent
        #: The memory limit of each session, bytes.
        self.memory = memory
        self.pids = pids

    @property
    def version(self) -> int:
        """1 or 2."""
        return self.parent.version

    def prepare(self) -> None:
        """Make the parent usable (v2: move the host into its leaf, enable the memory and
        pids controllers for children), then create, configure and remove one cgroup.

        Raises :class:`OSError` (or :class:`ValueError`) saying what failed.
        """
        path = self.parent.path
        if self.version == 2:
            leaf = self.parent.host_leaf
            if leaf is not None:
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(os.getpid()))
            elif not path.exists():
                path.mkdir()
                _enable(path.parent, ["memory", "pids"])
            _enable(path, ["memory", "pids"])
        self.sweep()
        probe = self.create(f"probe-{os.urandom(4).hex()}")
        if not probe.remove():
            raise OSError(f"could not remove the probe cgroup {probe.path}")

    def create(self, session_id: str) -> SessionCgroup:
        """Create and configure the cgroup of session ``session_id``; raises :class:`OSError`
        (nothing left behind)."""
        path = self.parent.path / session_cgroup_name(session_id, os.getpid())
        path.mkdir(mode=0o755)
        cgroup = SessionCgroup(path, self.version, self.memory)
        try:
            settings = cgroup_settings(self.version, memory=self.memory, pids=self.pids)
            for index, (name, value) in enumerate(settings):
                if index and not (path / name).exists():
                    continue  # no swap accounting, or no pids controller, here
                _write(path / name, value)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def sweep(self) -> list[Path]:
        """Remove the session cgroups a host that is no longer running left behind."""
        removed = []
        with contextlib.suppress(OSError):
            for child in self.parent.path.iterdir():
                match = _OUR_CGROUP.match(child.name)
                if match is None or not child.is_dir() or _alive(int(match.group(1))):
                    continue
                if SessionCgroup(child, self.version, self.memory).remove(timeout=0.5):
                    removed.append(child)
        return removed

    def describe(self) -> str:
        """One line for the host's startup output."""
        return (
            f"each session's kernels limited to {format_size(self.memory)} of memory "
            f"(cgroup v{self.version} under {self.parent.path})"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(path: Path, value: str) -> None:
    # One write(2): cgroup files take a value per write, and report errors from it.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _enable(path: Path, controllers: Iterable[str]) -> None:
    """Enable ``controllers`` for ``path``'s children (those its parent offers it)."""
    available = (path / "cgroup.controllers").read_text().split()
    if "memory" not in available:
        raise OSError(
            f"the memory controller is not available in {path} (its parent must enable it "
            f"in cgroup.subtree_control)"
        )
    enabled = (path / "cgroup.subtree_control").read_text().split()
    for controller in controllers:
        if controller in available and controller not in enabled:
            _write(path / "cgroup.subtree_control", f"+{controller}")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def prepare_cgroups(*, root: str, memory: int, pids: int) -> tuple[CgroupTree | None, str]:
    """Find where this host may make a memory cgroup per session, check it works once.

    ``root``: the configured ``cgroup_root`` ("" to find it from ``/proc/self``); ``memory``
    the limit per session in bytes (0: no cgroups); ``pids`` the most tasks per session (v2).
    Returns the tree, or None and the reason the host runs without (for its startup output).
    """
    if memory <= 0:
        return None, "session_memory_limit is 0"
    if root:
        path = Path(root)
        if not path.is_dir():
            return None, f"cgroup_root {root} does not exist (it must be a cgroup directory)"
        if (path / "cgroup.controllers").exists():
            parent = CgroupParent(2, path)
        elif (path / "memory.limit_in_bytes").exists():
            parent = CgroupParent(1, path)
        else:
            return None, (
                f"cgroup_root {root} is neither a cgroup v2 directory nor one of a cgroup v1 "
                f"memory hierarchy"
            )
    else:
        found = find_cgroup_parent(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
        if found is None:
            return None, "no cgroup memory controller is mounted for this host"
        parent = found
    tree = CgroupTree(parent, memory=memory, pids=pids)
    try:
        tree.prepare()
    except (OSError, ValueError) as exc:
        who = "" if os.geteuid() == 0 else "this host is not root; "
        return None, (
            f"{who}cannot create cgroups under {parent.path}: {exc}; run the host as root or "
            f"delegate a cgroup to it and name it with cgroup_root"
        )
    return tree, ""
