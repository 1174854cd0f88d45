"""GPU kernelspecs: one per GPU type on offer, next to the installed ones.

``POST /api/kernels`` carries only a kernelspec name, so the GPU type a user picks travels in
the name: ``jupyter-io-rtx-4090`` for the coordinator's "RTX 4090". Each such spec is a
lease-mode kernel.json (:func:`jupyter_io.kernelspec.lease_kernel_json`) naming the
coordinator, the user's keypair, the GPU type, and the user's price cap and region
(:mod:`jupyter_io.serverext.preferences`); its display name is short enough for a launcher
tile (the picker shows the rest)::

    RTX 4090 (simulated) · 0.12 SOL/h

It also serves one provider-mode kernelspec per **direct provider** configured on the server
extension (``c.JupyterIOExtension.direct_providers``, see :func:`direct_kernelspecs`): a
provider host reached at its own tunnel URL, no coordinator, no lease, admitted by its
allow-list. ``jupyter-io-direct-gpu-box`` for ``{"name": "gpu-box", ...}``.

:class:`GPUKernelSpecManager` serves them. Jupyter asks kernelspec managers synchronously, so
the specs come from a provider function (:attr:`GPUKernelSpecManager.gpu_specs`) that reads the
offers a fetch already brought; the server extension sets it, and refreshes the offers in the
background. Installed kernelspecs keep precedence over a GPU spec of the same name.

:func:`adopt_kernel_spec_manager` puts one in place of the ServerApp's plain kernelspec
manager from the extension's initialize hook, and refuses, with a log line saying what to do,
when another kernelspec manager class is configured. (The link hook is too early to tell: the
ServerApp's default class depends on gateway settings it has not read yet.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from ..errors import ConfigError
from ..identity import parse_pubkey
from ..kernelspec import kernel_json, lease_kernel_json, validate_provider_url
from ..payments.amounts import format_sol
from .preferences import Preferences

__all__ = [
    "DIRECT_PREFIX",
    "SPEC_PREFIX",
    "GPUKernelSpecManager",
    "GPUSpecSource",
    "adopt_kernel_spec_manager",
    "direct_kernelspecs",
    "direct_provider",
    "display_name",
    "gpu_kernelspecs",
    "spec_name",
    "with_price_max",
]

#: Every GPU kernelspec's name starts with this.
SPEC_PREFIX = "jupyter-io-"
#: Every direct provider's kernelspec name starts with this.
DIRECT_PREFIX = SPEC_PREFIX + "direct-"
_DIRECT_KEYS = ("name", "url", "display_name", "pubkey")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
GIB = 1 << 30


class GPUSpecSource(Protocol):
    """Where :class:`GPUKernelSpecManager` gets its GPU kernelspecs (kernel.json dicts)."""

    def specs(self) -> Mapping[str, Mapping[str, Any]]:
        """The GPU kernelspecs to list, by name."""

    def spec(self, name: str) -> Mapping[str, Any] | None:
        """The GPU kernelspec ``name`` to start a kernel with (may know more names than
        :meth:`specs` lists), or None."""


def spec_name(gpu_display: str) -> str:
    """``"RTX 4090"`` → ``"jupyter-io-rtx-4090"`` (a valid kernelspec name)."""
    slug = _NOT_SLUG.sub("-", gpu_display.lower()).strip("-")
    return SPEC_PREFIX + (slug or "gpu")


def _gigabytes(vram_bytes: int) -> str:
    gb = vram_bytes / GIB
    return f"{gb:.0f} GB" if abs(gb - round(gb)) < 0.05 else f"{gb:.1f} GB"


def display_name(row: Mapping[str, Any]) -> str:
    """What a launcher tile can hold: ``RTX 4090 · 0.12 SOL/h``; ``from 0.12 SOL/h`` only when
    free offers of the type ask different prices (``price_max`` above ``price_min``, or
    without ``price_max`` a median above it); ``none free`` when every GPU is taken; a
    simulated GPU says so (``RTX 4090 (simulated) · 0.12 SOL/h``). The VRAM, providers and
    the rest are in the picker and the spec's ``metadata.jupyter_io``."""
    name = str(row.get("display") or row.get("gpu"))
    if row.get("simulated"):
        name += " (simulated)"
    price = row.get("price_min")
    if price is None or not row.get("available"):
        return f"{name} · none free"
    top = row.get("price_max", row.get("price_median"))
    exact = top is None or int(top) <= int(price)
    return f"{name} · {'' if exact else 'from '}{format_sol(int(price))}/h"


def with_price_max(
    types: Sequence[Mapping[str, Any]], providers: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The coordinator's type rows, each with ``price_max`` where it is known: the dearest
    price among the type's offers with a GPU free, so a price can be told exact or a range.
    Provider rows name their GPU for people (a type row's ``display``)."""
    dearest: dict[str, int] = {}
    for offer in providers:
        if not offer.get("free"):
            continue
        gpu = str(offer.get("gpu"))
        dearest[gpu] = max(dearest.get(gpu, 0), int(offer.get("price_lamports_per_hour") or 0))
    rows = []
    for row in types:
        top = dearest.get(str(row.get("display"))) or dearest.get(str(row.get("gpu")))
        # An offer spelled otherwise than its type: no price_max, the median tells instead.
        rows.append({**row, "price_max": top} if top and row.get("price_min") else dict(row))
    return rows


def gpu_kernelspecs(
    types: Sequence[Mapping[str, Any]],
    *,
    coordinator_url: str,
    keypair_path: str,
    preferences: Preferences,
) -> dict[str, dict[str, Any]]:
    """One lease-mode kernel.json per GPU type row of the coordinator's offers, by name.

    Each spec's ``metadata.jupyter_io`` repeats what the picker needs (GPU key and name, VRAM,
    cheapest price, simulated) so a client can tell GPU kernelspecs apart.
    """
    specs: dict[str, dict[str, Any]] = {}
    for row in types:
        gpu = str(row.get("gpu") or "")
        if not gpu:
            continue
        name = spec_name(str(row.get("display") or gpu))
        if name in specs:  # two keys with one slug: keep both, the second by its key
            name = spec_name(gpu)
        spec = lease_kernel_json(
            coordinator_url,
            keypair_path,
            display_name(row),
            gpu=gpu,
            max_price_per_hour=preferences.max_price_per_hour,
            region=preferences.region,
            max_latency_ms=preferences.max_latency_ms or 0,
            min_reliability=preferences.min_reliability or 0,
        )
        if preferences.chosen_budget_hours is not None:
            # The escrow's deposit covers the session budget (price * hours); unchosen, the
            # provisioner's escrow hook takes its own default, the one preferences show.
            spec["metadata"]["kernel_provisioner"]["config"]["max_session_hours"] = (
                preferences.session_budget_hours
            )
        spec["metadata"]["jupyter_io"] = {
            "gpu": gpu,
            "display": row.get("display") or gpu,
            "vram_bytes": row.get("vram_bytes"),
            "price_min": row.get("price_min"),
            "simulated": bool(row.get("simulated")),
            "coordinator_url": coordinator_url,
        }
        specs[name] = spec
    return specs


def direct_provider(entry: Any) -> dict[str, str]:
    """Check one entry of ``direct_providers``; return it with every key filled in.

    ``{"name": "gpu-box", "url": "wss://gpu-box:8765/tunnel"}`` plus, optionally,
    ``"display_name"`` (default ``Python 3 · gpu-box · direct``) and ``"pubkey"`` (the
    provider host's base58 key: only a host proving it gets the session). Raises
    :class:`~jupyter_io.errors.ConfigError` naming what to fix.
    """
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f'each direct provider is a dict such as {{"name": "gpu-box", "url": '
            f'"wss://gpu-box:8765/tunnel"}}, not {entry!r}'
        )
    unknown = sorted(set(entry) - set(_DIRECT_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in direct provider {dict(entry)!r}; "
            f"known: {', '.join(_DIRECT_KEYS)}"
        )
    name = str(entry.get("name") or "").strip()
    slug = _NOT_SLUG.sub("-", name.lower()).strip("-")
    if not slug:
        raise ConfigError(f'direct provider {dict(entry)!r} needs a "name", e.g. "gpu-box"')
    url = validate_provider_url(str(entry.get("url") or "").strip())
    pubkey = str(entry.get("pubkey") or "").strip()
    if pubkey:
        pubkey = str(parse_pubkey(pubkey))
    display = str(entry.get("display_name") or "").strip() or f"Python 3 · {name} · direct"
    return {"name": DIRECT_PREFIX + slug, "url": url, "display_name": display, "pubkey": pubkey}


def direct_kernelspecs(
    providers: Sequence[Mapping[str, str]], *, keypair_path: str
) -> dict[str, dict[str, Any]]:
    """One provider-mode kernel.json per checked direct provider (:func:`direct_provider`),
    by name; ``metadata.jupyter_io`` says it is direct and where it runs."""
    specs: dict[str, dict[str, Any]] = {}
    for provider in providers:
        spec = kernel_json(
            provider["url"], keypair_path, provider["display_name"], provider["pubkey"]
        )
        spec["metadata"]["jupyter_io"] = {
            "direct": True,
            "display": provider["name"][len(DIRECT_PREFIX) :],
            "provider_url": provider["url"],
        }
        specs[provider["name"]] = spec
    return specs


def _resource_dir() -> str:
    """Where the GPU specs' logos come from: ipykernel's (they are Python kernels)."""
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:  # pragma: no cover - ipykernel is a dependency
        return ""
    return str(RESOURCES)


class GPUKernelSpecManager(KernelSpecManager):
    """The installed kernelspecs plus one GPU kernelspec per GPU type on offer (and one per
    configured direct provider).

    Without :attr:`gpu_specs` (no server extension, no coordinator) it is exactly a
    :class:`~jupyter_client.kernelspec.KernelSpecManager`.
    """

    #: The GPU kernelspecs' source; set by the server extension.
    gpu_specs: GPUSpecSource | None = None

    def _allowed(self, name: str) -> bool:
        return not self.allowed_kernelspecs or name in self.allowed_kernelspecs

    def find_kernel_specs(self) -> dict[str, str]:
        found = super().find_kernel_specs()
        if self.gpu_specs is not None:
            resources = _resource_dir()
            for name in self.gpu_specs.specs():
                if self._allowed(name):
                    found.setdefault(name, resources)
        return found

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        try:
            return super().get_kernel_spec(kernel_name)
        except NoSuchKernel:
            name = kernel_name.lower()
            spec = self.gpu_specs.spec(name) if self.gpu_specs is not None else None
            if spec is None or not self._allowed(name):
                raise
            return self.kernel_spec_class(resource_dir=_resource_dir(), **spec)


def adopt_kernel_spec_manager(
    serverapp: Any, settings: dict[str, Any]
) -> GPUKernelSpecManager | None:
    """Put a :class:`GPUKernelSpecManager` in place of the ServerApp's plain
    :class:`~jupyter_client.kernelspec.KernelSpecManager`: on the ServerApp, its kernel
    manager (which hands it to every kernel it starts) and the web app ``settings`` (which
    the kernelspec handlers read). Call it from an extension's initialize hook, once the
    ServerApp has built its managers.

    Returns the manager, or None, logging why and what to do, when another kernelspec
    manager class is configured (a gateway's, a custom one): it is left alone.
    """
    current = serverapp.kernel_spec_manager
    if isinstance(current, GPUKernelSpecManager):
        return current
    if type(current) is not KernelSpecManager:
        kind = type(current)
        serverapp.log.warning(
            "jupyter-io: not adding GPU kernelspecs: this server's kernelspec manager is "
            "%s.%s (ServerApp.kernel_spec_manager_class), and jupyter-io does not replace "
            "another kernelspec manager. Subclass "
            "jupyter_io.serverext.kernelspecs.GPUKernelSpecManager in it, or drop that "
            "setting; installed jupyter-io kernelspecs (`jupyter io kernelspec install`) "
            "still work.",
            kind.__module__,
            kind.__qualname__,
        )
        return None
    ksm = GPUKernelSpecManager(parent=serverapp, log=serverapp.log)
    serverapp.kernel_spec_manager_class = GPUKernelSpecManager
    serverapp.kernel_spec_manager = ksm
    serverapp.kernel_manager.kernel_spec_manager = ksm
    settings["kernel_spec_manager"] = ksm
    return ksm
