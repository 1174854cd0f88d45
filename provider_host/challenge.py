"""The provider's side of the GPU challenge: multiply on the claimed device, commit, open rows.

The coordinator sends ``gpu_challenge`` (a seed, a size ``n``, a device index); the host's
:class:`ChallengeResponder` generates ``A`` and ``B`` from the seed *on that device* (torch,
:func:`jupyter_io.gpu_challenge.matrix_rows`), multiplies them in float32 (exact: see
:mod:`jupyter_io.gpu_challenge`), hashes the product's rows into a Merkle tree and sends the
root (``gpu_commitment``) with what NVML and the kernel driver say of the device. When the
coordinator then names rows (``gpu_reveal``) it sends each with its Merkle path
(``gpu_opening``). A device a lease holds is never challenged (``gpu_refused``, ``busy``);
nor is one while another challenge runs.

Real GPUs run on ``cuda:<index>`` with torch (NVML's order: set
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` where CUDA's default order differs). Simulated GPUs and the
``cpu (no GPU)`` offer run the same protocol with numpy on the CPU and say ``simulated``;
their identity is not checked.

The work never runs on the host's event loop: every product, hash and opened row is computed
in the responder's own worker thread (numpy's and torch's kernels release the GIL), and what
the work imports (numpy; torch where the host offers a real GPU) is imported once, in that
thread, when the host starts (:meth:`ChallengeResponder.warm_up`, awaited before the host
links to the coordinator). Importing torch holds the GIL for up to seconds while its shared
libraries load: done at the first challenge, on a linked host, it held up the heartbeats.
Only the link messages (commitment, openings, refusals) are sent from the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import time
from collections.abc import Callable, Iterable
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
    "warm_up",
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
    """``A @ B`` for ``seed`` and ``n``, generated and multiplied on ``device``: a float32
    numpy array for ``"cpu"``, a float32 torch tensor there for a CUDA device. Blocking:
    run it in a thread."""
    if device == "cpu":
        return _multiply_numpy(seed, n)
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


def _multiply_numpy(seed: bytes, n: int) -> Any:
    import numpy as np

    cols = np.arange(n, dtype=np.int64)[None, :]
    step = max(1, (1 << 22) // n)

    def generate(which: str) -> Any:
        out = np.empty((n, n), dtype=np.float32)
        for start in range(0, n, step):
            rows = np.arange(start, min(n, start + step), dtype=np.int64)[:, None]
            out[start : start + len(rows)] = matrix_rows(seed, which, n, rows, cols)
        return out

    a = generate("A")
    b = generate("B")
    return a @ b


def _int32_rows(block: Any) -> Any:
    """Rows of a product (numpy array or torch tensor, any device) as a little-endian int32
    numpy array."""
    if hasattr(block, "cpu"):  # a torch tensor
        import torch

        block = block.to(torch.int32).cpu().numpy()
    return block.astype("<i4")


def product_of(matrix: Any, seconds: float = 0.0) -> Product:
    """The :class:`Product` of a computed matrix (numpy array or torch tensor): its rows
    hashed into a Merkle tree."""
    n = int(matrix.shape[0])
    step = max(1, (1 << 22) // n)
    leaves: list[bytes] = []
    for start in range(0, n, step):
        block = _int32_rows(matrix[start : start + step])
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
    return bytes(_int32_rows(product.matrix[index : index + 1]).tobytes())


def warm_up(devices: Iterable[str]) -> None:
    """Import what computing on ``devices`` needs (numpy; torch, and CUDA's context, for a
    CUDA device), so that no challenge pays for it. Blocking: run it in the worker thread.
    A missing library is left for the challenge to report (``unable``)."""
    importlib.import_module("numpy")
    cuda = sorted({d for d in devices if d.startswith("cuda")})
    if cuda:
        try:
            torch = importlib.import_module("torch")
            for device in cuda:
                torch.zeros(1, device=device)  # creates the device's CUDA context
        except Exception:  # no torch, no CUDA: each challenge says why
            return


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
        #: The one thread all the work runs in (never the event loop's).
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gpu-challenge")
        self._warm: asyncio.Future[None] | None = None

    def warm_up(self, devices: Iterable[str]) -> asyncio.Future[None]:
        """Start importing, in the worker thread, what challenges on ``devices`` (torch
        device names) need (:func:`warm_up`); returns a future to await before linking.
        Every challenge waits for it before its work starts."""
        if self._warm is None:
            loop = asyncio.get_running_loop()
            self._warm = loop.run_in_executor(self._worker, warm_up, tuple(devices))
        return self._warm

    async def _in_worker(self, call: Callable[..., Any], *args: Any) -> Any:
        if self._warm is not None:
            await asyncio.shield(self._warm)  # no import of its own mid-challenge
        return await asyncio.get_running_loop().run_in_executor(self._worker, call, *args)

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
        self._worker.shutdown(wait=False, cancel_futures=True)

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
            product = await self._in_worker(
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
        identity, listing = None, None
        if not device.simulated:
            identity, listing = await self._in_worker(self.identify, device.index)
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
            values = await self._in_worker(self.row, product, index)
            self.send(GpuOpening(reveal.id, index, values, tuple(self.proof(product, index))))

    # The work itself, one method each (a test double of a lying provider overrides them).

    def compute(self, seed: bytes, n: int, device: str) -> Product:
        """The product and its tree (blocking; called in the worker thread)."""
        return commit_product(seed, n, device)

    def identify(self, index: int) -> tuple[GpuIdentity | None, str | None]:
        """What NVML and the kernel driver say of device ``index`` (blocking)."""
        identity = nvml_identity(index)
        listing = None if identity is None else driver_information(identity.pci_bus_id)
        return identity, listing

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
