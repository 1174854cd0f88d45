"""The GPU challenge's contract (jupyter_io.gpu_challenge): both sides generate the same
matrices, float32 computes the product exactly, the commitment binds the rows, Freivalds
catches a wrong row at O(k n**2) cost, and NVML's identity is compared with the driver's."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jupyter_io.gpu_challenge import (
    CPU_BAND,
    GpuIdentity,
    Verifier,
    challenge_size,
    entry_bound,
    identity_mismatch,
    matrix_rows,
    merkle_levels,
    merkle_proof,
    merkle_root,
    merkle_verify,
    parse_driver_information,
    row_leaf,
    tflops_band,
    time_window,
)
from jupyter_io.provider_link import (
    GpuChallenge,
    GpuCommitment,
    GpuOpening,
    GpuReveal,
    parse_message,
)

torch = pytest.importorskip("torch")

SEED = bytes(range(32))


def full(which: str, n: int, seed: bytes = SEED) -> np.ndarray:
    return matrix_rows(
        seed, which, n, np.arange(n, dtype=np.int64)[:, None], np.arange(n, dtype=np.int64)[None, :]
    )


def test_numpy_and_torch_generate_the_same_matrices_and_float32_multiplies_them_exactly() -> None:
    n = 192
    a, b = full("A", n), full("B", n)
    rows = torch.arange(n, dtype=torch.int64)[:, None]
    cols = torch.arange(n, dtype=torch.int64)[None, :]
    assert np.array_equal(matrix_rows(SEED, "A", n, rows, cols).numpy(), a)
    assert a.min() == -7 and a.max() == 7 and not np.array_equal(a, b)
    assert not np.array_equal(a, full("A", n, seed=os.urandom(32)))  # the seed matters
    exact = a @ b
    product = (torch.from_numpy(a).float() @ torch.from_numpy(b).float()).numpy()
    assert np.array_equal(product.astype(np.int64), exact)
    assert np.abs(exact).max() <= entry_bound(n)
    # Any block on its own is the same block of the whole.
    block = matrix_rows(SEED, "B", n, np.arange(5, 9)[:, None], np.arange(n)[None, :])
    assert np.array_equal(block, b[5:9])


def test_the_merkle_commitment_opens_each_row_and_nothing_else() -> None:
    rows = [np.arange(i, i + 8, dtype="<i4").tobytes() for i in range(11)]
    leaves = [row_leaf(i, row) for i, row in enumerate(rows)]
    levels = merkle_levels(leaves)
    root = merkle_root(leaves)
    assert levels[-1][0] == root
    for i in range(11):
        assert merkle_verify(root, leaves[i], i, merkle_proof(levels, i), 11)
    proof = merkle_proof(levels, 3)
    assert not merkle_verify(root, row_leaf(3, rows[4]), 3, proof, 11)  # another row's data
    assert not merkle_verify(root, leaves[3], 4, proof, 11)  # at another index
    assert not merkle_verify(root, leaves[3], 3, proof[:-1], 11)  # a short path


def test_freivalds_passes_the_true_rows_and_catches_one_wrong_entry() -> None:
    n = 128
    exact = full("A", n) @ full("B", n)
    vectors = np.random.default_rng(7).integers(0, 2, size=(n, 16), dtype=np.uint8)
    verifier = Verifier(SEED, n, vectors)
    verifier.prepare()
    for i in (0, 5, n - 1):
        assert verifier.check_row(i, exact[i].astype("<i4").tobytes()) is None
    wrong = exact[5].copy()
    wrong[17] += 1
    assert "not row 5 of A @ B" in (verifier.check_row(5, wrong.astype("<i4").tobytes()) or "")
    assert "entries" in (verifier.check_row(5, exact[5, :-1].astype("<i4").tobytes()) or "")
    huge = exact[5].copy()
    huge[0] = entry_bound(n) + 1
    assert "no product" in (verifier.check_row(5, huge.astype("<i4").tobytes()) or "")


def test_the_coordinators_check_costs_o_n_squared_not_a_product() -> None:
    k, opened = 16, 8
    counts = {}
    for n in (256, 512, 1024):
        vectors = np.zeros((n, k), dtype=np.uint8)
        verifier = Verifier(SEED, n, vectors)
        verifier.prepare()
        row = np.zeros(n, dtype="<i4").tobytes()
        for i in range(opened):
            verifier.check_row(i, row)
        counts[n] = verifier.ops
        # B once (n**2 entries) plus the opened rows of A; k multiply-adds per entry of B.
        assert verifier.ops.generated == n * n + opened * n
        assert verifier.ops.multiply_adds == k * n * n + 2 * opened * n * k
    # Doubling n multiplies the work by ~4 (a product would be 8).
    ratio = counts[1024].multiply_adds / counts[512].multiply_adds
    assert 3.9 < ratio < 4.1


def test_sizes_fill_the_vram_and_windows_follow_the_band() -> None:
    n = challenge_size(24 * 10**9)  # an RTX 4090's worth: three float32 matrices in 80 %
    assert 12 * n * n <= 0.8 * 24 * 10**9 < 12 * (n + 64) ** 2 and n % 64 == 0
    assert challenge_size(80 * 10**9, max_n=16384) == 16384
    assert tflops_band("cpu (no GPU)", simulated=False) == CPU_BAND
    assert tflops_band("RTX 4090", simulated=True) == CPU_BAND  # simulated: judged as a CPU
    assert tflops_band("NVIDIA GeForce RTX 4090", simulated=False) == (30.0, 100.0)
    assert tflops_band("Mystery 9000", simulated=False) is None
    earliest, latest = time_window(32768, (30.0, 100.0), overhead=1.0)
    assert earliest == pytest.approx(2 * 32768**3 / 100e12)
    assert latest > 2 * 32768**3 / 30e12 + 1.0


DRIVER_4090 = """Model: \t\t NVIDIA GeForce RTX 4090
IRQ:   \t\t 180
GPU UUID: \t\t GPU-5f0c3b5e-1d2a-4c1e-9e1f-0a1b2c3d4e5f
Video BIOS: \t\t 95.02.18.80.87
Bus Type: \t\t PCIe
DMA Size: \t\t 47 bits
DMA Mask: \t\t 0x7fffffffffff
Bus Location: \t\t 0000:01:00.0
Device Minor: \t\t 0
GPU Excluded:\t\t No
"""


def test_nvml_identity_must_match_the_kernel_drivers_listing() -> None:
    fields = parse_driver_information(DRIVER_4090)
    assert fields["model"] == "NVIDIA GeForce RTX 4090"
    assert fields["bus location"] == "0000:01:00.0"
    honest = GpuIdentity(
        "NVIDIA GeForce RTX 4090", "GPU-5f0c3b5e-1d2a-4c1e-9e1f-0a1b2c3d4e5f", "00000000:01:00.0"
    )
    assert identity_mismatch(honest, DRIVER_4090) is None
    spoofed = GpuIdentity("NVIDIA H100 80GB HBM3", honest.uuid, honest.pci_bus_id)
    assert "kernel driver lists 'NVIDIA GeForce RTX 4090'" in (
        identity_mismatch(spoofed, DRIVER_4090) or ""
    )
    other_card = GpuIdentity(honest.name, "GPU-00000000-0000-0000-0000-000000000000", None)
    assert "UUID" in (identity_mismatch(other_card, DRIVER_4090) or "")
    other_slot = GpuIdentity(honest.name, None, "00000000:02:00.0")
    assert "PCI bus id" in (identity_mismatch(other_slot, DRIVER_4090) or "")
    assert "no model" in (identity_mismatch(honest, "") or "")


def test_the_challenge_messages_round_trip_and_refuse_nonsense() -> None:
    challenge = GpuChallenge("ab" * 16, 1, SEED, 1024)
    assert parse_message(challenge.to_json()) == challenge
    commitment = GpuCommitment(
        "ab" * 16, b"\x01" * 32, "cuda:1", False, "RTX 4090", None, None, "Model: RTX 4090"
    )
    assert parse_message(commitment.to_json()) == commitment
    reveal = GpuReveal("ab" * 16, (3, 9))
    assert parse_message(reveal.to_json()) == reveal
    opening = GpuOpening("ab" * 16, 3, b"\x00" * 16, (b"\x02" * 32,))
    assert parse_message(opening.to_json()) == opening
    from jupyter_io.errors import ProtocolError

    for bad in (
        '{"type":"gpu_challenge","id":"zz","gpu_index":0,"seed":"' + "00" * 32 + '","n":4}',
        '{"type":"gpu_challenge","id":"' + "ab" * 16 + '","gpu_index":0,"seed":"00","n":4}',
        '{"type":"gpu_challenge","id":"'
        + "ab" * 16
        + '","gpu_index":0,"seed":"'
        + "00" * 32
        + '","n":10000000}',
        '{"type":"gpu_reveal","id":"' + "ab" * 16 + '","rows":[]}',
        '{"type":"gpu_opening","id":"' + "ab" * 16 + '","row":0,"values":"!!","proof":[]}',
    ):
        with pytest.raises(ProtocolError):
            parse_message(bad)
