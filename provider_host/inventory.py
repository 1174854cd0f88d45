"""What this host can offer: its GPUs (from NVML, cross-checked with torch), or its CPU.

Call :func:`probe_inventory` once at startup with the configured simulated GPUs, then
:func:`render_inventory` for the lines printed at startup, and :func:`offer_groups` for what
the host publishes to a marketplace coordinator (one offer per GPU model). Real GPUs come from NVML
(``nvidia-ml-py``, optional); when torch is importable its view is compared and any
disagreement is reported in :attr:`Inventory.warnings` (a GPU NVML sees but CUDA cannot use is
no use to a kernel). Simulated GPUs are always labelled ``simulated``; a host without a real GPU
offers its CPU, labelled ``cpu (no GPU)``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from jupyter_io.errors import ConfigError
from jupyter_io.gpu_names import CPU_OFFER, normalise_gpu_name
from jupyter_io.provider_link import OfferGroup

__all__ = [
    "CPU_LABEL",
    "Device",
    "Inventory",
    "offer_groups",
    "parse_simulated_gpu",
    "probe_inventory",
    "render_inventory",
]

#: How the CPU is labelled when the host has no GPU: the marketplace's own name for it.
CPU_LABEL = CPU_OFFER

_GIB = 1024**3
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Device:
    """One thing a session can run on."""

    index: int
    """CUDA/NVML index for real GPUs; simulated GPUs are numbered after them."""
    model: str
    vram_bytes: int
    """GPU memory in bytes (0 for the CPU)."""
    simulated: bool = False
    """True for a GPU that exists only in configuration (marketplace testing)."""
    kind: Literal["gpu", "cpu"] = "gpu"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what the host will publish to the coordinator)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every device found at startup, plus what looked wrong while probing."""

    devices: tuple[Device, ...]
    warnings: tuple[str, ...] = field(default=())
    driver: str | None = None
    """The NVIDIA driver version NVML reports (None without NVML)."""
    cuda: str | None = None
    """The CUDA version the driver supports, ``"12.4"`` (None without NVML)."""

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """Indices of the real GPUs, the ones kernels can be pinned to."""
        return tuple(d.index for d in self.devices if d.kind == "gpu" and not d.simulated)


def parse_simulated_gpu(spec: str) -> tuple[str, int]:
    """``"MODEL:VRAM_GB"`` → ``(model, vram_bytes)``; GB here means GiB, as GPU vendors do."""
    model, sep, size = spec.rpartition(":")
    model = model.strip()
    try:
        gib = float(size)
    except ValueError:
        gib = -1.0
    if not sep or not model or gib <= 0:
        raise ConfigError(f"simulated GPU {spec!r} must look like MODEL:VRAM_GB, e.g. 'A100:80'")
    return model, int(gib * _GIB)


def _probe_nvml() -> list[tuple[str, int]] | None:
    """``(model, vram_bytes)`` per GPU from NVML, or None when NVML is unavailable."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable (%s); no GPU inventory from the driver", exc)
        return None
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            found.append((str(name), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return found
    finally:
        pynvml.nvmlShutdown()


def _cuda_text(version: int) -> str:
    """NVML's CUDA driver version (``12040``) as people write it (``"12.4"``)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _probe_versions() -> tuple[str | None, str | None]:
    """``(driver, cuda)`` versions from NVML, None where NVML cannot tell."""
    if importlib.util.find_spec("pynvml") is None:
        return None, None
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None, None
    try:
        driver: str | None = None
        cuda: str | None = None
        with contextlib.suppress(pynvml.NVMLError):
            raw = pynvml.nvmlSystemGetDriverVersion()
            driver = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        with contextlib.suppress(pynvml.NVMLError):
            cuda = _cuda_text(int(pynvml.nvmlSystemGetCudaDriverVersion()))
        return driver, cuda
    finally:
        pynvml.nvmlShutdown()


def _nvidia_driver_present() -> bool:
    """False only where we can tell cheaply that no NVIDIA driver is loaded (Linux)."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def _probe_torch() -> list[tuple[str, int]] | None:
    """``(model, vram_bytes)`` per GPU CUDA can use, or None when torch is not installed.

    Importing torch takes seconds, so a host without an NVIDIA driver skips it (``[]``).
    """
    if importlib.util.find_spec("torch") is None:
        return None
    if not _nvidia_driver_present():
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        found = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append((str(props.name), int(props.total_memory)))
        return found
    except Exception as exc:  # a broken CUDA install must not stop the host
        log.warning("torch could not query CUDA: %s", exc)
        return []


def _cross_check(
    nvml: list[tuple[str, int]], torch_view: list[tuple[str, int]] | None
) -> list[str]:
    if torch_view is None or os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return []  # nothing to compare, or torch sees a deliberately restricted subset
    if len(torch_view) != len(nvml):
        return [
            f"NVML reports {len(nvml)} GPU(s) but torch.cuda sees {len(torch_view)}; "
            f"check the driver and CUDA versions"
        ]
    return [
        f"GPU {i}: NVML says {a!r}, torch.cuda says {b!r}"
        for i, ((a, _), (b, _)) in enumerate(zip(nvml, torch_view, strict=True))
        if a != b
    ]


def probe_inventory(simulate: Iterable[str] = ()) -> Inventory:
    """Find this host's devices. ``simulate`` holds ``MODEL:VRAM_GB`` specs to add."""
    simulated = [parse_simulated_gpu(spec) for spec in simulate]
    nvml = _probe_nvml()
    torch_view = _probe_torch()
    warnings: list[str] = []
    if nvml is not None:
        real = nvml
        warnings += _cross_check(nvml, torch_view)
    else:
        real = torch_view or []
    devices = [Device(i, model, vram) for i, (model, vram) in enumerate(real)]
    devices += [
        Device(len(real) + i, model, vram, simulated=True)
        for i, (model, vram) in enumerate(simulated)
    ]
    if not real:
        devices.append(Device(0, CPU_LABEL, 0, kind="cpu"))
    driver, cuda = _probe_versions() if real else (None, None)
    return Inventory(tuple(devices), tuple(warnings), driver, cuda)


def offer_groups(
    inventory: Inventory,
    *,
    price_of: Callable[[str], int],
    cpu_slots: int,
    benchmarks: Mapping[str, float] | None = None,
) -> list[OfferGroup]:
    """What the host publishes to a coordinator: one offer per GPU model.

    Real GPUs of one model form one group (their NVML indices, the smallest VRAM among them,
    the driver and CUDA versions, ``benchmarks[model]`` when measured); simulated GPUs form
    groups of their own, always ``simulated`` and never benchmarked. A host with no GPU at all,
    real or simulated, offers :data:`CPU_LABEL` instead: ``cpu_slots`` slots (indices are slot
    numbers, not devices; pass ``max_sessions``) with 0 bytes of VRAM and, when measured,
    ``benchmarks[CPU_LABEL]`` (a CPU figure). ``price_of(model)`` gives lamports per hour.

    Raises :class:`ConfigError` when a simulated model has the name of a real one (the
    marketplace could not tell them apart).
    """
    benchmarks = benchmarks or {}
    # Grouped as the marketplace compares names ("RTX 4090" and "rtx-4090" are one model).
    groups: dict[tuple[bool, str], list[Device]] = {}
    for device in inventory.devices:
        if device.kind == "gpu":
            groups.setdefault((device.simulated, normalise_gpu_name(device.model)), []).append(
                device
            )
    real_names = {name for simulated, name in groups if not simulated}
    offers = []
    for (simulated, name), devices in groups.items():
        model = devices[0].model
        if simulated and name in real_names:
            raise ConfigError(
                f"simulated GPU {model!r} has the name of a real GPU of this host; name it "
                f"differently (--simulate-gpu)"
            )
        offers.append(
            OfferGroup(
                gpu=model,
                vram_bytes=min(d.vram_bytes for d in devices),
                count=len(devices),
                gpu_indices=tuple(d.index for d in devices),
                price_lamports_per_hour=price_of(model),
                simulated=simulated,
                driver=None if simulated else inventory.driver,
                cuda=None if simulated else inventory.cuda,
                benchmark_tflops=None if simulated else benchmarks.get(model),
            )
        )
    if not offers:
        offers.append(
            OfferGroup(
                gpu=CPU_LABEL,
                vram_bytes=0,
                count=cpu_slots,
                gpu_indices=tuple(range(cpu_slots)),
                price_lamports_per_hour=price_of(CPU_LABEL),
                benchmark_tflops=benchmarks.get(CPU_LABEL),
            )
        )
    return offers


def render_inventory(inventory: Inventory) -> list[str]:
    """Human-readable lines, one per device, then one per warning."""
    lines = []
    for d in inventory.devices:
        if d.kind == "cpu":
            lines.append(f"  cpu: {d.model}, {os.cpu_count() or 1} cores")
        else:
            label = " (simulated)" if d.simulated else ""
            lines.append(f"  gpu {d.index}: {d.model}{label}, {d.vram_bytes / _GIB:.1f} GiB VRAM")
    lines += [f"  warning: {w}" for w in inventory.warnings]
    return lines
