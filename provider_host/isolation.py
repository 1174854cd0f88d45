"""What a kernel process starts with: a scrubbed environment and resource limits.

A kernel runs code the provider does not control, so it starts from nothing rather than from
the host's environment: :func:`kernel_env` copies only an allow-list of harmless provider
variables (never the provider's secrets), adds the client's requested variables minus the names
that would hijack the process, pins ``CUDA_VISIBLE_DEVICES`` to the session's GPUs and points
``HOME`` at the session's workspace. :func:`limits_preexec` returns the ``preexec_fn`` that
applies :class:`ResourceLimits` in the child between fork and exec, after moving it into its
session's memory cgroup (:mod:`provider_host.cgroups`).

This is not isolation by itself: with ``--isolation none`` a kernel still runs as the
provider's user and can read whatever that user can (its keypair, other tenants'
workspaces, ``/proc`` of the host). What keeps kernels from the host and from each other is
the sandbox (:mod:`provider_host.sandbox`); the limits here hold in both modes, and
``RLIMIT_NPROC`` bounds a session only where it has a uid of its own (a sandbox on a root host).

Call :func:`kernel_env` and :func:`limits_preexec` when launching a kernel
(:mod:`provider_host.session` and :mod:`provider_host.kernel` do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "FORWARDED_SIGNALS",
    "HOST_ENV_ALLOWED",
    "ResourceLimits",
    "client_env_refused",
    "kernel_env",
    "limits_preexec",
]

#: Provider variables a kernel inherits (plus every ``LC_*``): locale, time zone, search path.
HOST_ENV_ALLOWED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TZDIR", "SYSTEMROOT"})

# Names a client may not set: they change which code the process loads or runs, which
# devices it sees, or where it lives.
_CLIENT_REFUSED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "TMPDIR",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "NVIDIA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RESOLV_HOST_CONF",
        "BASH_ENV",
        "ENV",
        "IFS",
        "SHELLOPTS",
        "PS4",
        "PERL5OPT",
        "PERL5LIB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "JPY_PARENT_PID",
        "JPY_INTERRUPT_EVENT",
        "IPY_INTERRUPT_EVENT",
    }
)
_CLIENT_REFUSED_PREFIXES = ("LD_", "DYLD_", "PYTHON", "MALLOC_", "JUPYTER_IO_")
# PYTHON* variables that only change output or hashing, not what gets imported.
_CLIENT_PYTHON_ALLOWED = frozenset(
    {
        "PYTHONHASHSEED",
        "PYTHONUNBUFFERED",
        "PYTHONIOENCODING",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER",
        "PYTHONUTF8",
    }
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def client_env_refused(name: str) -> bool:
    """True when a client may not set variable ``name`` in its kernel's environment."""
    if not _NAME.match(name):
        return True
    upper = name.upper()
    if upper in _CLIENT_PYTHON_ALLOWED:
        return False
    return upper in _CLIENT_REFUSED or upper.startswith(_CLIENT_REFUSED_PREFIXES)


def kernel_env(
    *,
    host_env: Mapping[str, str],
    client_env: Mapping[str, object],
    gpus: Sequence[int],
    workspace: str,
    keep: Iterable[str] = (),
    user: str | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Build a kernel's environment; return it and the client names that were refused.

    ``host_env`` is the provider's environment (``os.environ``): only
    :data:`HOST_ENV_ALLOWED`, ``LC_*`` and the names in ``keep`` pass. ``client_env`` comes
    from LAUNCH; names refused by :func:`client_env_refused` and non-string values are
    dropped and reported. ``gpus`` are the device indices the session may use (empty: CPU only,
    ``CUDA_VISIBLE_DEVICES=""`` hides every GPU). ``user`` (a sandboxed session's user name)
    sets ``USER`` and ``LOGNAME``.
    """
    kept = set(keep)
    env = {
        name: value
        for name, value in host_env.items()
        if name in HOST_ENV_ALLOWED or name.startswith("LC_") or name in kept
    }
    env.setdefault("PATH", os.defpath)
    refused: list[str] = []
    for name, value in client_env.items():
        if not isinstance(name, str) or not isinstance(value, str) or client_env_refused(name):
            refused.append(str(name))
            continue
        env[name] = value
    tmp = os.path.join(workspace, ".tmp")
    env.update(
        {
            "HOME": workspace,
            "PWD": workspace,
            "TMPDIR": tmp,
            # NVML numbers GPUs by PCI bus; CUDA's default order is "fastest first".
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in gpus),
        }
    )
    if user is not None:
        env["USER"] = env["LOGNAME"] = user
    return env, sorted(refused)


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """Per-kernel rlimits; 0 leaves a limit as inherited (core dumps are always off)."""

    address_space: int = 0
    """RLIMIT_AS in bytes: bounds the kernel's memory."""
    open_files: int = 0
    """RLIMIT_NOFILE."""
    processes: int = 0
    """RLIMIT_NPROC (per user on Linux; root ignores it)."""
    file_size: int = 0
    """RLIMIT_FSIZE in bytes."""

    def rlimits(self) -> list[tuple[int, int]]:
        """``(resource, value)`` pairs to apply, core dumps included."""
        pairs = [(resource.RLIMIT_CORE, 0)]
        for name, value in (
            ("RLIMIT_AS", self.address_space),
            ("RLIMIT_NOFILE", self.open_files),
            ("RLIMIT_NPROC", self.processes),
            ("RLIMIT_FSIZE", self.file_size),
        ):
            if value > 0 and hasattr(resource, name):
                pairs.append((getattr(resource, name), value))
        return pairs


_PR_SET_PDEATHSIG = 1

#: Signals a client may send its kernel that a sandbox's bwrap must ignore (its default would
#: end it, and the sandbox with it, instead of letting the kernel handle them); the kernel
#: launcher restores them.
FORWARDED_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name)
    for name in (
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGTERM",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
    )
    if hasattr(signal, name)
)


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc.prctl


def limits_preexec(
    limits: ResourceLimits, ignore: Iterable[int] = (), join: Iterable[int] = ()
) -> Callable[[], None]:
    """A ``preexec_fn`` for the kernel's Popen: cgroup, rlimits, private umask, death with
    the host.

    Everything is resolved here, in the parent, so the child only makes system calls.
    ``join`` are open ``cgroup.procs`` descriptors
    (:meth:`provider_host.cgroups.SessionCgroup.open_procs`): the child moves itself into
    each before anything else, so no code of the kernel's runs outside its session's cgroup
    (a failed write fails the launch).
    jupyter_client already starts the kernel in its own session (process group); on Linux
    the kernel also gets SIGKILL if the host dies (``PR_SET_PDEATHSIG``), on top of
    ipykernel's ``JPY_PARENT_PID`` poller (unsandboxed) or bwrap's ``--die-with-parent``.
    The signals in ``ignore`` start ignored (dispositions survive exec).
    """
    ignored = tuple(ignore)
    cgroups = tuple(join)
    pairs = []
    for res, value in limits.rlimits():
        _soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        pairs.append((res, value))
    prctl = _prctl()

    def preexec() -> None:
        for fd in cgroups:
            os.write(fd, b"0")  # "0": the writing process
        for res, value in pairs:
            resource.setrlimit(res, (value, value))
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        os.umask(0o077)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec
