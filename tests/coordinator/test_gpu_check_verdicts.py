"""How the coordinator judges a GPU challenge's commitment before opening any row: a real
GPU's offer needs a real answer, NVML naming the offered model, and a driver listing that
agrees; no card answers faster than its model's top speed."""

from __future__ import annotations

from jupyter_io.coordinator.challenges import GpuChallenges
from jupyter_io.provider_link import GpuCommitment

LISTING = "Model: NVIDIA GeForce RTX 4090\nGPU UUID: GPU-1234\nBus Location: 0000:01:00.0\n"


def commitment(**changes: object) -> GpuCommitment:
    fields: dict[str, object] = {
        "id": "ab" * 16,
        "root": b"\x00" * 32,
        "device": "cuda:0",
        "simulated": False,
        "nvml_name": "NVIDIA GeForce RTX 4090",
        "nvml_uuid": "GPU-1234",
        "nvml_pci_bus_id": "00000000:01:00.0",
        "driver_information": LISTING,
    }
    fields.update(changes)
    return GpuCommitment(**fields)  # type: ignore[arg-type]


def judge(answer: GpuCommitment, *, simulated: bool = False, seconds: float = 1.0) -> str | None:
    return GpuChallenges._judge_commitment(answer, "RTX 4090", simulated, seconds, 0.5, 4096)


def test_an_honest_real_gpu_commitment_passes_to_the_reveal() -> None:
    assert judge(commitment()) is None


def test_a_real_offer_answered_from_a_simulation_fails() -> None:
    assert "ran simulated" in (judge(commitment(simulated=True)) or "")


def test_nvml_must_name_the_offered_model_and_agree_with_the_driver() -> None:
    assert "NVML names the device" in (judge(commitment(nvml_name="NVIDIA H100 PCIe")) or "")
    assert "no NVML identity" in (judge(commitment(nvml_name=None)) or "")
    assert "no kernel driver listing" in (judge(commitment(driver_information=None)) or "")
    other = LISTING.replace("GPU-1234", "GPU-9999")
    assert "UUID" in (judge(commitment(driver_information=other)) or "")


def test_an_answer_faster_than_the_models_top_speed_fails() -> None:
    assert "faster than any RTX 4090" in (judge(commitment(), seconds=0.1) or "")


def test_a_simulated_offer_is_not_identity_checked() -> None:
    answer = commitment(simulated=True, nvml_name=None, driver_information=None, device="cpu")
    assert judge(answer, simulated=True) is None
