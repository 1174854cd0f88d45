"""GPU model names as providers report them and users ask for them, compared and shown alike.

NVML says ``"NVIDIA GeForce RTX 4090"``, a user types ``"rtx-4090"``: both mean the same card.
:func:`normalise_gpu_name` gives the key names are compared by (the provider host groups its
devices by it, the coordinator's scheduler matches requests with it), :func:`display_gpu_name`
the name people see, :func:`gpu_vram_hint` the VRAM a name asks for. Pure functions on the
stdlib: both sides import this module, and neither imports the other for it.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache

__all__ = ["CPU_OFFER", "display_gpu_name", "gpu_vram_hint", "normalise_gpu_name"]

# Words that name a vendor, a product line or a package rather than the GPU model: NVML says
# "NVIDIA GeForce RTX 4090", a user types "rtx-4090"; both mean the same card. Memory size
# tokens ("80GB") are dropped too: VRAM is matched on the bytes the provider reports, and a
# size in the requested name becomes a minimum (see gpu_vram_hint).
_NOISE_WORDS = frozenset(
    {
        "nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel",
        "pcie", "sxm", "sxm2", "sxm3", "sxm4", "sxm5", "nvl", "hbm", "hbm2", "hbm2e", "hbm3",
        "hbm3e", "gddr6", "gddr6x", "gddr7", "graphics", "generation", "gpu", "gb", "gib",
    }
)  # fmt: skip
_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:gb|gib|g)(?![a-z0-9])")
_WORD = re.compile(r"[a-z0-9]+")
_DISPLAY_WORDS = {
    "rtx": "RTX", "gtx": "GTX", "rx": "RX", "ti": "Ti", "super": "SUPER", "ada": "Ada",
    "xt": "XT", "xtx": "XTX", "titan": "TITAN", "arc": "Arc", "max": "Max",
}  # fmt: skip


# Split run-together spellings ("rtx4090ti") into words; only display names see the difference.
_LINE_PREFIX = re.compile(r"^(rtx|gtx|rx)(?=[a-z]?\d)")
_SUFFIX = re.compile(r"(?<=\d)(?=(?:ti|super|xtx|xt)$)")


# Remarks in parentheses are not part of a model name: "cpu (no GPU)" is the CPU.
_REMARK = re.compile(r"\([^)]*\)")
#: What a host without GPUs offers, and how it is always shown: never passed off as a GPU.
CPU_OFFER = "cpu (no GPU)"


@lru_cache(maxsize=4096)
def _model_words(name: str) -> tuple[str, ...]:
    text = _MEMORY_SIZE.sub(" ", _REMARK.sub(" ", name.lower()))
    words = (_SUFFIX.sub(" ", _LINE_PREFIX.sub(r"\1 ", w)).split() for w in _WORD.findall(text))
    return tuple(w for split in words for w in split if w not in _NOISE_WORDS)


def normalise_gpu_name(name: str) -> str:
    """The key GPU names are compared by: vendor, package and memory words dropped.

    ``"RTX 4090"``, ``"rtx-4090"``, ``"RTX4090"`` and ``"NVIDIA GeForce RTX 4090"`` all give
    ``"rtx4090"``; ``"NVIDIA A100-SXM4-80GB"`` and ``"A100 80GB PCIe"`` give ``"a100"``
    (ask for VRAM with ``min_vram_bytes`` or a size in the name). Returns ``""`` when nothing
    of a model name is left.
    """
    return "".join(_model_words(name))


def display_gpu_name(name: str) -> str:
    """A tidy name for people: ``"nvidia geforce rtx-4090 ti"`` → ``"RTX 4090 Ti"``.

    The CPU offer is always shown as ``"cpu (no GPU)"``.
    """
    if normalise_gpu_name(name) == "cpu":
        return CPU_OFFER
    return " ".join(
        _DISPLAY_WORDS.get(
            w, w.upper() if len(w) <= 3 or any(c.isdigit() for c in w) else w.title()
        )
        for w in _model_words(name)
    )


def gpu_vram_hint(name: str) -> int | None:
    """Bytes of VRAM a GPU name asks for (``"A100 80GB"`` → 80e9), or None.

    Decimal gigabytes on purpose: cards report slightly less than their marketing size in
    binary units (an RTX 4090 reports 24,564 MiB, under 24 GiB), and 10^9-byte gigabytes sit
    safely below what every card of that size reports.
    """
    sizes = _MEMORY_SIZE.findall(name.lower())
    if not sizes:
        return None
    return int(max(Decimal(s) for s in sizes) * 1_000_000_000)
