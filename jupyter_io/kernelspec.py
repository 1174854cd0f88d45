"""Kernelspecs that run a Python kernel on a jupyter-io provider.

A jupyter-io kernelspec is an ordinary ``kernel.json`` whose ``metadata.kernel_provisioner``
names the ``io-remote`` provisioner (:mod:`kernel_provisioner`) and passes it, as traits, the
path of the user's keypair and where the kernel runs, in one of two modes:

- **provider**: the tunnel URL of one provider host (``provider_url``);
- **lease**: a marketplace coordinator (``coordinator_url``) and what to lease there: a GPU
  type (``gpu``), optionally a price cap in SOL per GPU-hour (``max_price_per_hour``, kept as
  text so it stays exact), a ``region``, ``min_vram_gb`` and the session budget
  (``max_session_hours``; left out, the escrow hook's default,
  :data:`~jupyter_io.payments.amounts.DEFAULT_SESSION_HOURS`). Each start leases a GPU.

The ``argv`` is a plain ipykernel command line: Jupyter needs one, but the provider host
decides what really runs.

Call :func:`install_kernelspec` (provider mode) or :func:`install_lease_kernelspec` (lease
mode) to write one (each validates its URL, price and keypair first), :func:`find_kernelspecs`
to list the installed ones, :func:`remove_kernelspec` to delete one. ``jupyter io kernelspec
install|list|remove`` (:mod:`jupyter_io.app`) wraps these.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .errors import ConfigError
from .identity import load_keypair, parse_pubkey
from .payments.amounts import MAX_SESSION_HOURS, format_sol, parse_sol

__all__ = [
    "KERNEL_ARGV",
    "PROVISIONER_NAME",
    "InstalledKernelspec",
    "find_kernelspecs",
    "install_kernelspec",
    "install_lease_kernelspec",
    "kernel_json",
    "lease_kernel_json",
    "remove_kernelspec",
    "validate_coordinator_url",
    "validate_provider_url",
]

#: Entry point name of the provisioner in ``jupyter_client.kernel_provisioners``.
PROVISIONER_NAME = "io-remote"
#: What kernel.json says to run. The provider host runs its own kernel command; this line
#: only tells Jupyter (and the reader) that the kernel is an ipykernel.
KERNEL_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]

_LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


@dataclass(frozen=True)
class InstalledKernelspec:
    """One installed jupyter-io kernelspec, as :func:`find_kernelspecs` reports it."""

    name: str
    display_name: str
    provider_url: str
    keypair_path: str
    resource_dir: str
    #: Lease mode: the coordinator leasing the GPU ("" in provider mode).
    coordinator_url: str = ""
    #: Lease mode: the GPU type asked for ("" for any).
    gpu: str = ""
    #: Lease mode: the price cap in SOL per GPU-hour, as written ("" for none).
    max_price_per_hour: str = ""

    @property
    def target(self) -> str:
        """Where its kernels run, for a listing: the provider URL, or ``RTX 4090 via URL``
        (with ``≤ 0.5 SOL/h`` when capped) for a lease-mode kernelspec."""
        if not self.coordinator_url:
            return self.provider_url
        cap = f" ≤ {self.max_price_per_hour} SOL/h" if self.max_price_per_hour else ""
        return f"{self.gpu or 'any GPU'}{cap} via {self.coordinator_url}"


def validate_provider_url(url: str) -> str:
    """Return ``url`` if it is a ``ws://`` or ``wss://`` URL with a host; else ConfigError."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ConfigError(
            f"provider URL {url!r} must start with ws:// or wss:// (the provider prints it: "
            f"'jupyter-io provider listening on ws://HOST:PORT/tunnel')"
        )
    try:
        port_ok = parts.port != 0  # None (no port) is fine; a bad port raises ValueError
    except ValueError:
        port_ok = False
    if not parts.hostname or not port_ok:
        raise ConfigError(
            f"provider URL {url!r} needs a host and a valid port, e.g. ws://HOST:PORT/tunnel"
        )
    return url


def validate_coordinator_url(url: str) -> str:
    """Return ``url`` without a trailing slash if it is an ``http://`` or ``https://`` URL
    with a host, or a comma-separated list of such URLs (a coordinator's replicas) without
    spaces; else ConfigError naming the entry at fault."""
    if "," in url:
        entries = [entry.strip() for entry in url.split(",")]
        if not all(entries):
            raise ConfigError(
                f"coordinator URL list {url!r} has an empty entry; separate the replicas' "
                f"URLs with single commas, e.g. http://a:8700,http://b:8700"
            )
        return ",".join(dict.fromkeys(validate_coordinator_url(entry) for entry in entries))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"coordinator URL {url!r} must start with http:// or https:// (the coordinator "
            f"prints it: 'jupyter-io coordinator listening on http://HOST:PORT')"
        )
    try:
        port_ok = parts.port != 0
    except ValueError:
        port_ok = False
    if not parts.hostname or not port_ok:
        raise ConfigError(
            f"coordinator URL {url!r} needs a host and a valid port, e.g. http://HOST:8700"
        )
    return url.rstrip("/")


def kernel_json(
    provider_url: str, keypair_path: str, display_name: str, provider_pubkey: str = ""
) -> dict[str, Any]:
    """The kernel.json of a kernelspec that runs on the provider at ``provider_url`` (whose
    host key must be ``provider_pubkey``, when given)."""
    config = {"provider_url": provider_url, "keypair_path": keypair_path}
    if provider_pubkey:
        config["provider_pubkey"] = provider_pubkey
    return _spec(display_name, config)


def lease_kernel_json(
    coordinator_url: str,
    keypair_path: str,
    display_name: str,
    *,
    gpu: str = "",
    max_price_per_hour: str = "",
    region: str = "",
    min_vram_gb: float = 0,
    max_session_hours: float = 0,
    max_latency_ms: float = 0,
    cohort: str = "",
    min_reliability: float = 0,
) -> dict[str, Any]:
    """The kernel.json of a kernelspec whose kernels lease ``gpu`` through the coordinator
    at ``coordinator_url``. Empty options are left out (the provisioner's defaults: any
    GPU, no cap, any region, the escrow hook's budget, no latency cap, no reliability
    minimum)."""
    config: dict[str, Any] = {"coordinator_url": coordinator_url, "keypair_path": keypair_path}
    if gpu:
        config["gpu"] = gpu
    if max_price_per_hour:
        config["max_price_per_hour"] = max_price_per_hour
    if region:
        config["region"] = region
    if min_vram_gb:
        config["min_vram_gb"] = min_vram_gb
    if max_session_hours:
        config["max_session_hours"] = max_session_hours
    if max_latency_ms:
        config["max_latency_ms"] = max_latency_ms
    if min_reliability:
        config["min_reliability"] = min_reliability
    if cohort:
        config["cohort"] = cohort  # the class's pool pays (RemoteKernelProvisioner.cohort)
    return _spec(display_name, config)


def _spec(display_name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "argv": list(KERNEL_ARGV),
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config}
        },
    }


def install_kernelspec(
    name: str,
    provider_url: str,
    keypair_path: str | os.PathLike[str],
    *,
    display_name: str = "",
    provider_pubkey: str = "",
    user: bool = False,
    prefix: str | None = None,
    replace: bool = False,
    kernel_spec_manager: KernelSpecManager | None = None,
) -> str:
    """Validate, then install a provider-mode kernelspec; return the directory it went to.

    Where it goes follows ``jupyter kernelspec install``: the per-user kernels directory with
    ``user``, ``PREFIX/share/jupyter/kernels`` with ``prefix`` (``sys.prefix`` for this
    environment), the system-wide one otherwise. The keypair path is stored absolute, since
    the server that reads the kernelspec may run from another directory. With
    ``provider_pubkey`` (base58) the provisioner accepts only a host proving that key, so
    nothing else answering at the provider's address gets the session.

    An existing kernelspec of the same name is replaced when it is a jupyter-io one; any other
    is left alone unless ``replace`` is set (a typo of ``--name python3`` must not clobber
    the user's local Python kernel). Raises :class:`ConfigError` with what to fix.
    """
    validate_provider_url(provider_url)
    if provider_pubkey:
        provider_pubkey = str(parse_pubkey(provider_pubkey))
    keypair = _checked_keypair(keypair_path)
    if not display_name:
        host = urlsplit(provider_url).netloc
        display_name = f"jupyter-io · {host}"  # short: a launcher tile holds ~3 lines
    spec = kernel_json(provider_url, str(keypair), display_name, provider_pubkey)
    return _install(name, spec, user, prefix, replace, kernel_spec_manager)


def install_lease_kernelspec(
    name: str,
    coordinator_url: str,
    keypair_path: str | os.PathLike[str],
    *,
    gpu: str = "",
    max_price_per_hour: str | float = "",
    region: str = "",
    min_vram_gb: float = 0,
    max_session_hours: float = 0,
    display_name: str = "",
    user: bool = False,
    prefix: str | None = None,
    replace: bool = False,
    kernel_spec_manager: KernelSpecManager | None = None,
) -> str:
    """Validate, then install a lease-mode kernelspec: each kernel leases ``gpu`` through the
    coordinator at ``coordinator_url`` (at most ``max_price_per_hour`` SOL per GPU-hour, in
    ``region``, with at least ``min_vram_gb`` GiB), its escrow covering ``max_session_hours``
    (0: the escrow hook's default). Returns the directory it went to.

    ``max_price_per_hour`` must be an exact amount of SOL (at most nine decimals); it is
    stored as text, as given. Where the kernelspec goes and when an existing one is replaced
    follow :func:`install_kernelspec`. Raises :class:`ConfigError` with what to fix.
    """
    coordinator_url = validate_coordinator_url(coordinator_url)
    price = str(max_price_per_hour).strip()
    if price:
        try:
            parse_sol(price)
        except ConfigError as exc:
            raise ConfigError(f"--max-price: {exc}") from None
    if min_vram_gb < 0:
        raise ConfigError("--min-vram must not be negative")
    if not 0 <= max_session_hours <= MAX_SESSION_HOURS:
        raise ConfigError(
            f"--budget must be more than 0 and at most {MAX_SESSION_HOURS} hours, not "
            f"{max_session_hours:g} (leave it out for the default)"
        )
    keypair = _checked_keypair(keypair_path)
    gpu, region = gpu.strip(), region.strip()
    if not display_name:
        cap = f" · ≤ {format_sol(parse_sol(price))}/h" if price else ""
        display_name = f"{gpu or 'any GPU'}{cap} · jupyter-io"  # the host is in `list`
    spec = lease_kernel_json(
        coordinator_url,
        str(keypair),
        display_name,
        gpu=gpu,
        max_price_per_hour=price,
        region=region,
        min_vram_gb=min_vram_gb,
        max_session_hours=max_session_hours,
    )
    return _install(name, spec, user, prefix, replace, kernel_spec_manager)


def _checked_keypair(keypair_path: str | os.PathLike[str]) -> Path:
    keypair = Path(keypair_path).expanduser().absolute()
    load_keypair(keypair)  # fail now, not when the first kernel starts
    return keypair


def _install(
    name: str,
    spec: dict[str, Any],
    user: bool,
    prefix: str | None,
    replace: bool,
    kernel_spec_manager: KernelSpecManager | None,
) -> str:
    if user and prefix:
        raise ConfigError("choose one of --user and --prefix/--sys-prefix, not both")
    ksm = kernel_spec_manager or KernelSpecManager()
    name = name.lower()
    destination = Path(ksm._get_destination_dir(name, user=user, prefix=prefix))
    existing = _read_kernel_json(destination)
    if existing is not None and _provisioner_config(existing) is None and not replace:
        raise ConfigError(
            f"a kernelspec named {name!r} already exists in {destination} and is not a "
            f"jupyter-io one; pick another --name or pass --replace to overwrite it"
        )
    with tempfile.TemporaryDirectory(prefix="jupyter-io-kernelspec-") as tmp:
        source = Path(tmp, name)
        source.mkdir()
        (source / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        _copy_logos(source)
        try:
            return ksm.install_kernel_spec(str(source), kernel_name=name, user=user, prefix=prefix)
        except ValueError as exc:  # jupyter_client's word for an invalid kernel name
            raise ConfigError(str(exc)) from None
        except PermissionError as exc:
            raise ConfigError(
                f"cannot write the kernelspec to {destination}: {exc.strerror}; "
                f"install with --user or --sys-prefix instead"
            ) from None


def find_kernelspecs(
    kernel_spec_manager: KernelSpecManager | None = None,
) -> list[InstalledKernelspec]:
    """Every installed kernelspec that runs on a jupyter-io provider, sorted by name."""
    ksm = kernel_spec_manager or KernelSpecManager()
    found = []
    for name, info in sorted(ksm.get_all_specs().items()):
        spec = info.get("spec", {})
        config = _provisioner_config(spec)
        if config is None:
            continue
        found.append(
            InstalledKernelspec(
                name=name,
                display_name=spec.get("display_name", name),
                provider_url=str(config.get("provider_url", "")),
                keypair_path=str(config.get("keypair_path", "")),
                resource_dir=info.get("resource_dir", ""),
                coordinator_url=str(config.get("coordinator_url", "")),
                gpu=str(config.get("gpu", "")),
                max_price_per_hour=str(config.get("max_price_per_hour", "")),
            )
        )
    return found


def remove_kernelspec(name: str, kernel_spec_manager: KernelSpecManager | None = None) -> str:
    """Remove the jupyter-io kernelspec ``name``; return the directory that was deleted.

    Refuses (ConfigError) to remove a kernelspec that is not a jupyter-io one: use
    ``jupyter kernelspec remove`` for those.
    """
    ksm = kernel_spec_manager or KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec(name)
    except NoSuchKernel:
        raise ConfigError(
            f"no kernelspec named {name!r}; `jupyter io kernelspec list` shows the installed ones"
        ) from None
    if _provisioner_config(spec.to_dict()) is None:
        raise ConfigError(
            f"kernelspec {name!r} ({spec.resource_dir}) is not a jupyter-io kernelspec; "
            f"remove it with `jupyter kernelspec remove {name}` if you mean to"
        )
    return ksm.remove_kernel_spec(name)


def _provisioner_config(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The io-remote provisioner config of a kernel.json dict, or None if it is not ours."""
    provisioner = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
    if provisioner.get("provisioner_name") != PROVISIONER_NAME:
        return None
    config = provisioner.get("config") or {}
    return config if isinstance(config, dict) else {}


def _read_kernel_json(directory: Path) -> dict[str, Any] | None:
    try:
        spec = json.loads((directory / "kernel.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # something is there that we did not write: treat it as foreign
    return spec if isinstance(spec, dict) else {}


def _copy_logos(destination: Path) -> None:
    """Give the kernelspec ipykernel's Python logos, so Lab's launcher shows one."""
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:  # the logos are a nicety; a kernelspec works without them
        return
    for logo in _LOGOS:
        source = Path(RESOURCES, logo)
        if source.is_file():
            shutil.copyfile(source, destination / logo)
