"""The provider's side of the GPU challenge: multiply on the claimed device, commit, open rows.

The coordinator sends ``gpu_challenge`` (a seed, a size ``n``, a device index); the host's
:class:`ChallengeResponder` generates ``A`` and ``B`` from the seed *on that device* (torch,
:func:`jupyter_io.gpu_challenge.matrix_rows`), multiplies them in float32 (exact: see
:mod:`jupyter_io.gpu_challenge`), hashes the product's rows into a Merkle tree and sends the
root (``gpu_commitment``) with what NVML and the kernel driver say of the device. When the
coordinator then names rows (``gpu_reveal``) it sends each with its Merkle path
(``gpu_opening``). A device a lease holds is never challenged (``gpu_refused``, ``busy``);
nor is one while another challenge runs.

Real GPUs run on ``cuda:<index>`` (NVML's order: set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` where
CUDA's default order differs). Simulated GPUs and the ``cpu (no GPU)`` offer run the same
protocol on torch's CPU and say ``simulated``; their identity is not checked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jupyter_io.gpu_challenge import (
    GpuIdentity,
    matrix_rows,
    merkle_levels,
    merkle_proof,
    row_leaf,
)
from jupyter_io.provider_link import (
    GpuChallenge,
    GpuCommitment,
    GpuOpening,
    GpuRefused,
    GpuReveal,
    LinkMessage,
)

__all__ = [
    "CPU_MAX_N",
    "KEEP_SECONDS",
    "ChallengeDevice",
    "ChallengeResponder",
    "Product",
    "commit_product",
    "driver_information",
    "multiply",
    "nvml_identity",
    "open_row",
    "product_of",
]

#: Seconds a product is kept for the coordinator's reveal.
KEEP_SECONDS = 120.0
#: Largest n a CPU-run challenge (simulated GPUs, the CPU offer) accepts.
CPU_MAX_N = 8192
_DRIVER_DIR = "/proc/driver/nvidia/gpus"


@dataclass(frozen=True, slots=True)
class ChallengeDevice:
    """A device the host offers, as the challenge sees it: where torch computes on it
    (``"cuda:0"``, ``"cpu"``), whether it is simulated (or the CPU offer), and the largest
    ``n`` the host accepts for it."""

    index: int
    torch_device: str
    simulated: bool
    max_n: int


@dataclass(slots=True)
class Product:
    """A computed product, kept until its rows are opened: the Merkle tree over its rows
    (:func:`~jupyter_io.gpu_challenge.merkle_levels`) and the product (a torch tensor on the
    device)."""

    n: int
    levels: list[list[bytes]]
    matrix: Any
    seconds: float


def multiply(seed: bytes, n: int, device: str) -> Any:
    """``A @ B`` for ``seed`` and ``n``, generated and multiplied on ``device`` (a float32
    torch tensor there). Blocking: run it in a thread."""
    import torch

    dev = torch.device(device)
    cols = torch.arange(n, dtype=torch.int64, device=dev)[None, :]
    step = max(1, (1 << 22) // n)

    def generate(which: str) -> Any:
        out = torch.empty((n, n), dtype=torch.float32, device=dev)
        for start in range(0, n, step):
            rows = torch.arange(start, min(n, start + step), dtype=torch.int64, device=dev)
            out[start : start + len(rows)] = matrix_rows(seed, which, n, rows[:, None], cols).to(
                torch.float32
            )
        return out

    a = generate("A")
    b = generate("B")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # exact on these integers, and fastest
    return a @ b


def product_of(matrix: Any, seconds: float = 0.0) -> Product:
    """The :class:`Product` of a computed matrix: its rows hashed into a Merkle tree."""
    import torch

    n = int(matrix.shape[0])
    step = max(1, (1 << 22) // n)
    leaves: list[bytes] = []
    for start in range(0, n, step):
        block = matrix[start : start + step].to(torch.int32).cpu().numpy().astype("<i4")
        leaves.extend(row_leaf(start + i, row.tobytes()) for i, row in enumerate(block))
    return Product(n, merkle_levels(leaves), matrix, seconds)


def commit_product(seed: bytes, n: int, device: str) -> Product:
    """Generate ``A``, ``B`` from ``seed`` on ``device``, multiply them there, hash the rows
    (:func:`multiply`, :func:`product_of`). Blocking: run it in a thread."""
    started = time.perf_counter()
    product = product_of(multiply(seed, n, device))
    product.seconds = time.perf_counter() - started
    return product


def open_row(product: Product, index: int) -> bytes:
    """Row ``index`` of the product as int32 little-endian bytes."""
    import torch

    row = product.matrix[index].to(torch.int32).cpu().numpy().astype("<i4")
    return bytes(row.tobytes())


def nvml_identity(index: int) -> GpuIdentity | None:
    """What NVML says of device ``index`` (None without NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            bus = pynvml.nvmlDeviceGetPciInfo(handle).busId
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return GpuIdentity(text(name), text(uuid), text(bus))


def driver_information(pci_bus_id: str | None, root: str = _DRIVER_DIR) -> str | None:
    """The kernel driver's own listing of the device at ``pci_bus_id`` (its ``information``
    file, at most 4 KiB), or None when the driver lists no such device."""
    if not pci_bus_id:
        return None
    wanted = pci_bus_id.lower().split(":", 1)[-1]  # NVML pads the domain to 8 digits
    try:
        names = os.listdir(root)
    except OSError:
        return None
    for name in names:
        if name.lower().split(":", 1)[-1] == wanted:
            try:
                with open(os.path.join(root, name, "information"), encoding="utf-8") as f:
                    return f.read(4096)
            except OSError:
                return None
    return None


class ChallengeResponder:
    """Answers the coordinator's GPU challenges (see the module docstring).

    ``send`` queues a link message; ``device_of(index)`` names the device (None: not one
    this host offers); ``busy(index)`` is true while a lease holds it. Call :meth:`handle`
    with each ``gpu_challenge`` and ``gpu_reveal``; :meth:`close` at shutdown.
    """

    def __init__(
        self,
        send: Callable[[LinkMessage], None],
        *,
        device_of: Callable[[int], ChallengeDevice | None],
        busy: Callable[[int], bool],
        keep_seconds: float = KEEP_SECONDS,
        log: logging.Logger | None = None,
    ) -> None:
        self.send = send
        self.device_of = device_of
        self.busy = busy
        self.keep_seconds = keep_seconds
        self.log = log or logging.getLogger("provider_host")
        #: Challenges answered (commitments sent).
        self.committed = 0
        self._running = False
        self._kept: dict[str, tuple[float, Product]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, message: GpuChallenge | GpuReveal) -> None:
        """Start answering ``message`` in the background."""
        coroutine = (
            self._answer(message) if isinstance(message, GpuChallenge) else (self._open(message))
        )
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every challenge and reveal being answered is answered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop answering; drop every kept product."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._kept.clear()

    async def _answer(self, challenge: GpuChallenge) -> None:
        device = self.device_of(challenge.gpu_index)
        if device is None:
            self.send(GpuRefused(challenge.id, "unable", f"no device {challenge.gpu_index} here"))
            return
        if challenge.n > device.max_n:
            self.send(
                GpuRefused(
                    challenge.id,
                    "unable",
                    f"n = {challenge.n} exceeds what device {device.index} holds "
                    f"(at most {device.max_n})",
                )
            )
            return
        if self._running or self.busy(device.index):
            self.send(GpuRefused(challenge.id, "busy", f"device {device.index} is in use"))
            return
        self._running = True
        try:
            product = await asyncio.to_thread(
                self.compute, challenge.seed, challenge.n, device.torch_device
            )
        except Exception as exc:
            self.log.warning("GPU challenge on device %d failed: %s", device.index, exc)
            self.send(GpuRefused(challenge.id, "unable", f"{type(exc).__name__}: {exc}"[:500]))
            return
        finally:
            self._running = False
        self._forget_stale()
        self._kept[challenge.id] = (time.monotonic(), product)
        identity = None if device.simulated else nvml_identity(device.index)
        listing = None if identity is None else driver_information(identity.pci_bus_id)
        self.committed += 1
        self.send(self.commitment(challenge.id, product, device, identity, listing))
        self.log.info(
            "GPU challenge on device %d (n = %d) committed in %.2f s",
            device.index,
            challenge.n,
            product.seconds,
        )

    @staticmethod
    def commitment(
        challenge_id: str,
        product: Product,
        device: ChallengeDevice,
        identity: GpuIdentity | None,
        listing: str | None,
    ) -> GpuCommitment:
        """The ``gpu_commitment`` for ``product``."""
        return GpuCommitment(
            challenge_id,
            product.levels[-1][0],
            device.torch_device,
            device.simulated,
            identity.name if identity else None,
            identity.uuid if identity else None,
            identity.pci_bus_id if identity else None,
            listing[:4096] if listing else None,
        )

    async def _open(self, reveal: GpuReveal) -> None:
        kept = self._kept.pop(reveal.id, None)
        if kept is None:
            self.log.warning("a GPU reveal for an unknown or expired challenge %s", reveal.id)
            return
        product = kept[1]
        for index in reveal.rows:
            if not 0 <= index < product.n:
                continue
            values = await asyncio.to_thread(self.row, product, index)
            self.send(GpuOpening(reveal.id, index, values, tuple(self.proof(product, index))))

    # The work itself, one method each (a test double of a lying provider overrides them).

    def compute(self, seed: bytes, n: int, device: str) -> Product:
        """The product and its tree (blocking; called in a worker thread)."""
        return commit_product(seed, n, device)

    def row(self, product: Product, index: int) -> bytes:
        """Row ``index`` of the product, int32 little-endian (blocking)."""
        return open_row(product, index)

    def proof(self, product: Product, index: int) -> list[bytes]:
        """Row ``index``'s Merkle path."""
        return merkle_proof(product.levels, index)

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for key in [k for k, (at, _) in self._kept.items() if now - at > self.keep_seconds]:
            del self._kept[key]
