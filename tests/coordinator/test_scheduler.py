"""The scheduler: eligibility, scoring, the offer index, refusals, and a brute-force cross-check."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from jupyter_io.coordinator.scheduler import (
    DEFAULT_CANDIDATES,
    LeaseRequest,
    Offer,
    OfferIndex,
    Weights,
    _SortedKeys,
    is_eligible,
    schedule,
    score,
)
from jupyter_io.errors import LeaseError
from jupyter_io.gpu_names import display_gpu_name, gpu_vram_hint, normalise_gpu_name
from jupyter_io.payments.amounts import format_sol

GB = 10**9
SOL = 1_000_000_000  # lamports


def make(provider: str, gpu: str = "RTX 4090", **fields: Any) -> Offer:
    defaults: dict[str, Any] = {
        "vram_bytes": 24 * GB,
        "gpus_total": 1,
        "gpus_free": 1,
        "price_lamports_per_hour": SOL // 10,
        "region": "eu-west",
        "reliability": 1.0,
        "load": 0.0,
    }
    defaults.update(fields)
    return Offer(provider=provider, gpu=gpu, **defaults)


# -- names and amounts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "RTX 4090",
        "rtx-4090",
        "NVIDIA GeForce RTX 4090",
        "RTX4090",
        " rtx_4090 ",
        "GeForce RTX 4090",
    ],
)
def test_gpu_spellings_normalise_to_one_key(spelling: str) -> None:
    assert normalise_gpu_name(spelling) == "rtx4090"
    assert display_gpu_name(spelling) == "RTX 4090"


def test_gpu_names_keep_models_apart_and_drop_package_words() -> None:
    assert normalise_gpu_name("NVIDIA A100-SXM4-80GB") == normalise_gpu_name("A100 80GB PCIe")
    assert normalise_gpu_name("RTX 4090") != normalise_gpu_name("RTX 4090 Ti")
    assert normalise_gpu_name("RTX 4090") != normalise_gpu_name("RTX 4080")
    assert normalise_gpu_name("RTX A6000") != normalise_gpu_name("RTX 6000 Ada Generation")
    assert display_gpu_name("nvidia geforce rtx-3080ti") == "RTX 3080 Ti"
    assert display_gpu_name("AMD Instinct MI300X") == "MI300X"
    assert normalise_gpu_name("NVIDIA") == ""


def test_memory_size_in_a_name_is_a_vram_floor_in_decimal_gigabytes() -> None:
    assert gpu_vram_hint("A100 80GB") == 80 * GB
    assert gpu_vram_hint("NVIDIA A100-SXM4-40GB") == 40 * GB
    assert gpu_vram_hint("RTX 4090 24 GB") == 24 * GB
    assert gpu_vram_hint("RTX 4090") is None
    # An RTX 4090 reports 24,564 MiB: under 24 GiB, over 24 decimal GB.
    assert 24_564 * 1024**2 >= LeaseRequest(gpu="RTX 4090 24GB").vram_floor


def test_prices_in_messages_are_exact_sol() -> None:
    assert format_sol(120_000_000) == "0.12 SOL"
    assert format_sol(10 * SOL) == "10 SOL"
    assert format_sol(1) == "0.000000001 SOL"
    assert format_sol(0) == "0 SOL"


def test_offers_and_requests_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="gpus_free"):
        make("a", gpus_total=1, gpus_free=2)
    with pytest.raises(ValueError, match="does not name a GPU"):
        make("a", gpu="NVIDIA")
    with pytest.raises(ValueError, match="reliability"):
        make("a", reliability=1.5)
    with pytest.raises(ValueError, match="region"):
        make("a", region=" ")
    with pytest.raises(ValueError, match="at least one GPU"):
        LeaseRequest(gpu="RTX 4090", gpus=0)
    with pytest.raises(ValueError, match="negative"):
        Weights(price=-1)
    assert make("a").key == ("a", "rtx4090")


# -- scoring ---------------------------------------------------------------------------------


def test_score_follows_the_documented_formula() -> None:
    w = Weights()
    offer = make("a", price_lamports_per_hour=200, reliability=0.9, load=0.25, latency_ms=50.0)
    uncapped = LeaseRequest(gpu="RTX 4090")
    expected = 0.4 * (100 / 200) + 0.3 * 0.9 + 0.2 * (1 / (1 + 50 / 50)) + 0.1 * 0.75
    assert score(offer, uncapped, w, cheapest_price=100) == pytest.approx(expected)
    capped = LeaseRequest(gpu="RTX 4090", max_price_lamports_per_hour=400)
    expected_capped = expected - 0.4 * 0.5 + 0.4 * (1 - 200 / 400)
    assert score(offer, capped, w) == pytest.approx(expected_capped)
    # The requester's own measurement overrides the offer's; unknown counts as 100 ms.
    assert score(offer, capped, w, latency_ms=0.0) > score(offer, capped, w)
    unknown = replace(offer, latency_ms=None)
    assert score(unknown, capped, w) == pytest.approx(score(offer, capped, w, latency_ms=100.0))
    with pytest.raises(ValueError, match="cheapest_price"):
        score(offer, uncapped, w)


def test_reliability_beats_a_modestly_dearer_price_but_not_double() -> None:
    flaky = make("a-flaky", price_lamports_per_hour=100_000, reliability=0.5)
    for ratio, winner in ((1.5, "b-solid"), (2.0, "a-flaky")):
        solid = make("b-solid", price_lamports_per_hour=int(100_000 * ratio), reliability=1.0)
        chosen = schedule(OfferIndex([flaky, solid]), LeaseRequest(gpu="RTX 4090"))
        assert chosen.provider == winner, ratio


def test_latency_and_load_tip_the_choice_between_equal_prices() -> None:
    far = make("a-far", latency_ms=200.0)
    near = make("b-near", latency_ms=10.0)
    assert schedule(OfferIndex([far, near]), LeaseRequest(gpu="RTX 4090")).provider == "b-near"
    # The requester's measurements override what the offers carry.
    index = OfferIndex([far, near])
    request = LeaseRequest(gpu="RTX 4090")
    assert schedule(index, request, latencies={"a-far": 5.0}).provider == "a-far"
    busy = make("a-busy", load=0.9)
    idle = make("b-idle", load=0.1)
    assert schedule(OfferIndex([busy, idle]), LeaseRequest(gpu="RTX 4090")).provider == "b-idle"


def test_ties_go_to_the_cheaper_then_the_smaller_provider_key() -> None:
    index = OfferIndex([make(p) for p in ("ccc", "aaa", "bbb")])
    assert schedule(index, LeaseRequest(gpu="RTX 4090")).provider == "aaa"
    zero_price = Weights(price=0.0)  # price no longer counts: the order still breaks the tie
    index.upsert(make("zzz", price_lamports_per_hour=1))
    assert schedule(index, LeaseRequest(gpu="RTX 4090"), weights=zero_price).provider == "zzz"


def test_custom_weights_change_the_decision() -> None:
    cheap = make("a-cheap", price_lamports_per_hour=100, reliability=0.6)
    solid = make("b-solid", price_lamports_per_hour=300, reliability=1.0)
    index = OfferIndex([cheap, solid])
    request = LeaseRequest(gpu="RTX 4090")
    assert schedule(index, request).provider == "a-cheap"
    reliability_first = Weights(price=0.1, reliability=0.9)
    assert schedule(index, request, weights=reliability_first).provider == "b-solid"


# -- choosing the right offer ----------------------------------------------------------------


def two_provider_market() -> OfferIndex:
    return OfferIndex(
        [
            make("prov-4090", "NVIDIA GeForce RTX 4090", price_lamports_per_hour=120_000_000),
            make(
                "prov-a100",
                "NVIDIA A100-SXM4-80GB",
                vram_bytes=80 * 1024**3,
                price_lamports_per_hour=900_000_000,
                region="us-east",
            ),
        ]
    )


@pytest.mark.parametrize("spelling", ["RTX 4090", "rtx-4090", "NVIDIA GeForce RTX 4090"])
def test_a_lease_by_type_gets_that_type(spelling: str) -> None:
    index = two_provider_market()
    assert schedule(index, LeaseRequest(gpu=spelling)).provider == "prov-4090"
    assert schedule(index, LeaseRequest(gpu="a100")).provider == "prov-a100"


def test_unknown_type_lists_the_types_on_offer() -> None:
    with pytest.raises(LeaseError) as err:
        schedule(two_provider_market(), LeaseRequest(gpu="RTX 9090"))
    assert "'RTX 9090'" in str(err.value)
    assert "A100, RTX 4090" in str(err.value)


def test_an_empty_market_says_no_provider_is_connected() -> None:
    with pytest.raises(LeaseError, match="no provider is connected"):
        schedule(OfferIndex(), LeaseRequest(gpu="RTX 4090"))


def test_price_cap_is_respected_and_the_refusal_names_the_cheapest() -> None:
    index = two_provider_market()
    index.upsert(make("prov-4090-dear", price_lamports_per_hour=200_000_000))
    capped = LeaseRequest(gpu="RTX 4090", max_price_lamports_per_hour=150_000_000)
    assert schedule(index, capped).provider == "prov-4090"
    at_cap = LeaseRequest(gpu="RTX 4090", max_price_lamports_per_hour=120_000_000)
    assert schedule(index, at_cap).provider == "prov-4090"
    too_low = LeaseRequest(gpu="RTX 4090", max_price_lamports_per_hour=100_000_000)
    with pytest.raises(LeaseError) as err:
        schedule(index, too_low)
    message = str(err.value)
    assert "cheapest available RTX 4090 is 0.12 SOL/h" in message
    assert "0.1 SOL/h" in message
    assert "raise max_price_per_hour" in message


def test_the_cheapest_named_is_one_with_capacity() -> None:
    index = two_provider_market()
    index.upsert(make("full-but-cheap", price_lamports_per_hour=50_000_000, gpus_free=0))
    with pytest.raises(LeaseError, match=r"is 0\.12 SOL/h"):
        schedule(index, LeaseRequest(gpu="RTX 4090", max_price_lamports_per_hour=10))


def test_a_provider_at_capacity_is_never_chosen() -> None:
    index = OfferIndex(
        [
            make("a-full", gpus_total=4, gpus_free=0, price_lamports_per_hour=1),
            make("b-one-free", gpus_total=4, gpus_free=1, price_lamports_per_hour=2),
            make("c-three-free", gpus_total=4, gpus_free=3, price_lamports_per_hour=3),
        ]
    )
    assert schedule(index, LeaseRequest(gpu="RTX 4090")).provider == "b-one-free"
    assert schedule(index, LeaseRequest(gpu="RTX 4090", gpus=2)).provider == "c-three-free"
    assert schedule(index, LeaseRequest(gpu="RTX 4090", gpus=3)).provider == "c-three-free"
    with pytest.raises(LeaseError, match=r"all 3 RTX 4090 offers are at capacity.*4 GPUs free"):
        schedule(index, LeaseRequest(gpu="RTX 4090", gpus=4))


def test_all_at_capacity_says_so() -> None:
    index = OfferIndex([make("a", gpus_free=0), make("b", gpus_free=0)])
    with pytest.raises(LeaseError, match="all 2 RTX 4090 offers are at capacity"):
        schedule(index, LeaseRequest(gpu="RTX 4090"))


def test_capacity_down_to_zero_and_back() -> None:
    index = OfferIndex([make("a", gpus_total=2, gpus_free=2, price_lamports_per_hour=1), make("b")])
    request = LeaseRequest(gpu="RTX 4090")
    assert schedule(index, request).provider == "a"
    index.set_capacity("a", "rtx-4090", 0)
    assert schedule(index, request).provider == "b"
    index.set_capacity("b", "RTX 4090", 0)
    with pytest.raises(LeaseError, match="at capacity"):
        schedule(index, request)
    index.set_capacity("a", "RTX 4090", 1)
    assert schedule(index, request).provider == "a"
    index.set_capacity("a", "RTX 4090", 2)
    assert schedule(index, replace(request, gpus=2)).provider == "a"


def test_reserve_and_release_track_capacity_between_heartbeats() -> None:
    index = OfferIndex([make("a", gpus_total=2, gpus_free=2)])
    request = LeaseRequest(gpu="RTX 4090")
    offer = schedule(index, request)
    assert index.reserve(offer.provider, offer.gpu, 1).gpus_free == 1
    index.reserve("a", "RTX 4090", 1)
    with pytest.raises(LeaseError, match="at capacity"):
        schedule(index, request)
    with pytest.raises(LeaseError, match="has 0 RTX 4090 free"):
        index.reserve("a", "RTX 4090", 1)
    with pytest.raises(LeaseError, match="no longer offers"):
        index.reserve("gone", "RTX 4090", 1)
    assert index.release("a", "RTX 4090", 5).gpus_free == 2  # type: ignore[union-attr]
    assert index.release("gone", "RTX 4090", 1) is None


def test_updates_that_move_an_offer_reorder_it() -> None:
    index = OfferIndex([make("a", price_lamports_per_hour=1), make("b", price_lamports_per_hour=2)])
    request = LeaseRequest(gpu="RTX 4090")
    assert schedule(index, request).provider == "a"
    index.update("a", "RTX 4090", price_lamports_per_hour=10)
    assert schedule(index, request).provider == "b"
    index.update("b", "RTX 4090", region="us-east")
    assert schedule(index, replace(request, region="US-East")).provider == "b"
    assert index.remove("b", "rtx 4090") is not None
    assert index.remove("b", "rtx 4090") is None
    assert schedule(index, request).provider == "a"
    with pytest.raises(KeyError):
        index.update("nobody", "RTX 4090", load=0.5)
    with pytest.raises(ValueError, match="cannot turn offer"):
        index.update("a", "RTX 4090", gpu="RTX 4080")
    assert index.update("a", "RTX 4090", gpu="NVIDIA GeForce RTX 4090").gpu_key == "rtx4090"


def test_a_lost_provider_takes_all_its_offers_with_it() -> None:
    index = OfferIndex([make("a"), make("a", "A100", vram_bytes=80 * GB), make("b", "A100")])
    assert {o.gpu_key for o in index.offers_of("a")} == {"rtx4090", "a100"}
    assert len(index.remove_provider("a")) == 2
    assert index.offers_of("a") == []
    assert len(index) == 1
    assert index.gpu_types() == {"a100": "A100"}
    with pytest.raises(LeaseError, match="GPU types on offer: A100"):
        schedule(index, LeaseRequest(gpu="RTX 4090"))


def test_min_vram_considers_every_model_with_enough_memory() -> None:
    index = OfferIndex(
        [
            make("small", "RTX 4090", vram_bytes=24 * GB, price_lamports_per_hour=1),
            make("a100-40", "A100 40GB", vram_bytes=40 * 1024**3, price_lamports_per_hour=5),
            make("a6000", "RTX A6000", vram_bytes=48 * 1024**3, price_lamports_per_hour=3),
            make("a100-80", "A100 80GB", vram_bytes=80 * 1024**3, price_lamports_per_hour=9),
        ]
    )
    assert schedule(index, LeaseRequest(min_vram_bytes=40 * GB)).provider == "a6000"
    assert schedule(index, LeaseRequest(min_vram_bytes=60 * GB)).provider == "a100-80"
    assert schedule(index, LeaseRequest(gpu="A100")).provider == "a100-40"
    assert schedule(index, LeaseRequest(gpu="A100 80GB")).provider == "a100-80"
    assert schedule(index, LeaseRequest()).provider == "small"
    with pytest.raises(LeaseError, match=r"no GPU on offer has 100 GB.*largest is 85\.9 GB"):
        schedule(index, LeaseRequest(min_vram_bytes=100 * GB))
    with pytest.raises(LeaseError, match="no RTX 4090 on offer has 48 GB"):
        schedule(index, LeaseRequest(gpu="RTX 4090", min_vram_bytes=48 * GB))


def test_region_filter_and_its_refusal() -> None:
    index = OfferIndex(
        [
            make("eu", region="eu-west", price_lamports_per_hour=9),
            make("us", region="US-East", price_lamports_per_hour=1),
        ]
    )
    assert schedule(index, LeaseRequest(gpu="RTX 4090")).provider == "us"
    assert schedule(index, LeaseRequest(gpu="RTX 4090", region="EU-west")).provider == "eu"
    assert schedule(index, LeaseRequest(gpu="RTX 4090", region=" us-east ")).provider == "us"
    with pytest.raises(LeaseError, match="offered in: US-East, eu-west"):
        schedule(index, LeaseRequest(gpu="RTX 4090", region="ap-south"))


def test_max_latency_needs_a_measurement_within_it() -> None:
    index = OfferIndex(
        [
            make("a-cheap-unknown", price_lamports_per_hour=1),
            make("b-far", price_lamports_per_hour=2, latency_ms=120.0),
            make("c-near", price_lamports_per_hour=3, latency_ms=30.0),
        ]
    )
    request = LeaseRequest(gpu="RTX 4090", max_latency_ms=50.0)
    assert schedule(index, request).provider == "c-near"
    # The requester's own measurements override the offers' (either way).
    assert schedule(index, request, latencies={"a-cheap-unknown": 20.0}).provider == (
        "a-cheap-unknown"
    )
    with pytest.raises(LeaseError, match="within 50 ms"):
        schedule(index, request, latencies={"c-near": 80.0})
    index.update("b-far", "RTX 4090", latency_ms=40.0)
    assert schedule(index, request).provider == "b-far"
    with pytest.raises(
        LeaseError, match=r"cheapest available RTX 4090 within 50 ms is 0\.000000002 SOL/h"
    ):
        schedule(index, replace(request, max_price_lamports_per_hour=1))


def test_candidates_are_the_cheapest_eligible_in_order() -> None:
    rng = random.Random(7)
    offers = [make(f"p{i:04d}", price_lamports_per_hour=rng.randrange(1000)) for i in range(1500)]
    index = OfferIndex(offers)
    found = index.candidates(LeaseRequest(gpu="RTX 4090"))
    expected = sorted(offers, key=lambda o: (o.price_lamports_per_hour, o.provider))
    assert found == expected[:DEFAULT_CANDIDATES]
    assert index.candidates(LeaseRequest(gpu="RTX 4090"), limit=3) == expected[:3]
    assert index.candidates(LeaseRequest(gpu="RTX 4090"), limit=0) == []


# -- the offers API ---------------------------------------------------------------------------


def test_summary_aggregates_per_gpu_type() -> None:
    index = OfferIndex(
        [
            make("a", gpus_total=4, gpus_free=2, price_lamports_per_hour=300, reliability=0.5),
            make("b", "rtx-4090", price_lamports_per_hour=100, region="us-east"),
            make("c", gpus_free=0, price_lamports_per_hour=1, benchmark_tflops=150.0),
            make("d", price_lamports_per_hour=200, benchmark_tflops=160.0, simulated=True),
            make("e", "H100", vram_bytes=80 * GB, price_lamports_per_hour=5000),
        ]
    )
    h100, rtx = index.summary()
    assert rtx.gpu == "RTX 4090" and rtx.gpu_key == "rtx4090"
    assert (rtx.offers, rtx.gpus_total, rtx.gpus_available) == (4, 7, 4)
    assert rtx.price_min_lamports_per_hour == 100  # "c" is full: not a price anyone can get
    assert rtx.price_median_lamports_per_hour == 200
    assert rtx.regions == ("eu-west", "us-east")
    assert rtx.mean_reliability == pytest.approx(3.5 / 4)
    assert rtx.best_benchmark_tflops == 160.0
    assert rtx.simulated is True
    assert h100.gpu == "H100" and h100.simulated is False and h100.best_benchmark_tflops is None
    index.set_capacity("a", "RTX 4090", 0)
    index.update("d", "RTX 4090", benchmark_tflops=None, simulated=False)
    index.remove("b", "RTX 4090")
    (_, rtx) = index.summary()
    assert rtx.price_min_lamports_per_hour == rtx.price_median_lamports_per_hour == 200
    assert rtx.best_benchmark_tflops == 150.0
    assert rtx.simulated is False
    assert rtx.regions == ("eu-west",)
    index.set_capacity("d", "RTX 4090", 0)
    (_, rtx) = index.summary()
    assert rtx.gpus_available == 0 and rtx.price_min_lamports_per_hour is None


def test_median_of_an_even_count_rounds_down() -> None:
    index = OfferIndex([make("a", price_lamports_per_hour=1), make("b", price_lamports_per_hour=4)])
    assert index.summary()[0].price_median_lamports_per_hour == 2


# -- the sorted container and the brute-force cross-check -------------------------------------


def test_sorted_keys_match_a_sorted_list_through_splits_and_merges() -> None:
    rng = random.Random(3)
    keys = _SortedKeys()
    reference: list[int] = []
    for step in range(6000):
        if reference and (step > 4000 or rng.random() < 0.3):
            value = rng.choice(reference)
            reference.remove(value)
            keys.remove(value)
        else:
            value = rng.randrange(10**6)
            reference.append(value)
            keys.add(value)
        if step % 500 == 0:
            reference.sort()
            assert list(keys) == reference and len(keys) == len(reference)
            if reference:
                assert keys[0] == reference[0] and keys[-1] == reference[-1]
                middle = len(reference) // 2
                assert keys[middle] == reference[middle]
    with pytest.raises(KeyError):
        keys.remove(-1)
    with pytest.raises(IndexError):
        keys[len(reference)]


MODELS = [
    ("NVIDIA GeForce RTX 4090", (24 * GB,)),
    ("rtx-3090", (24 * GB,)),
    ("NVIDIA A100-SXM4-80GB", (40 * GB, 80 * GB)),
    ("H100", (80 * GB,)),
]
REGIONS = ["eu-west", "us-east", "ap-south"]
REQUEST_GPUS = [None, "RTX 4090", "rtx3090", "A100", "A100 80GB", "h100", "B200"]


def random_offer(rng: random.Random, provider: str) -> Offer:
    gpu, vrams = rng.choice(MODELS)
    total = rng.choice((1, 1, 2, 4, 8))
    return Offer(
        provider=provider,
        gpu=gpu,
        vram_bytes=rng.choice(vrams),
        gpus_total=total,
        gpus_free=rng.randint(0, total),
        price_lamports_per_hour=rng.choice((0, rng.randrange(50), rng.randrange(10**6))),
        region=rng.choice(REGIONS),
        reliability=rng.choice((0.5, 0.9, 1.0, rng.random())),
        reliability_measured=rng.random() < 0.8,
        load=rng.random(),
        latency_ms=rng.choice((None, rng.uniform(0, 300))),
        benchmark_tflops=rng.choice((None, 80.0, 165.0)),
        simulated=rng.random() < 0.1,
    )


def random_request(rng: random.Random) -> LeaseRequest:
    return LeaseRequest(
        gpu=rng.choice(REQUEST_GPUS),
        min_vram_bytes=rng.choice((None, None, 30 * GB, 60 * GB)),
        gpus=rng.choice((1, 1, 1, 2, 3, 4, 8, 9)),
        max_price_lamports_per_hour=rng.choice((None, 0, rng.randrange(10**6))),
        region=rng.choice((None, None, *REGIONS, "mars")),
        max_latency_ms=rng.choice((None, None, 10.0, 50.0, 150.0, 400.0)),
        min_reliability=rng.choice((None, None, 0.3, 0.8, 0.9, 0.93, 0.99, 1.0)),
    )


def brute_force(
    offers: list[Offer], request: LeaseRequest, latencies: dict[str, float] | None, k: int
) -> tuple[list[Offer], Offer | None]:
    """The documented rule, applied by scanning every offer."""
    eligible = [o for o in offers if is_eligible(o, request, latencies=latencies)]
    eligible.sort(key=lambda o: (o.price_lamports_per_hour, o.provider, o.gpu_key))
    found = eligible[:k]
    if not found:
        return found, None
    cheapest = found[0].price_lamports_per_hour
    best, best_score = found[0], -1.0
    for offer in found:
        latency = (latencies or {}).get(offer.provider, offer.latency_ms)
        value = score(offer, request, cheapest_price=cheapest, latency_ms=latency)
        if value > best_score:
            best, best_score = offer, value
    return found, best


@pytest.mark.parametrize("seed", range(6))
def test_indexed_decisions_equal_a_brute_force_scan(seed: int) -> None:
    rng = random.Random(seed)
    providers = [f"prov{i:03d}" for i in range(rng.choice((30, 300)))]
    index = OfferIndex()
    for provider in providers:
        index.upsert(random_offer(rng, provider))
    k = rng.choice((1, 4, DEFAULT_CANDIDATES))
    for _ in range(400):
        action = rng.random()
        offers = list(index)
        if action < 0.25 and offers:
            victim = rng.choice(offers)
            index.set_capacity(victim.provider, victim.gpu, rng.randint(0, victim.gpus_total))
        elif action < 0.35 and offers:
            victim = rng.choice(offers)
            changes = rng.choice(
                (
                    {"price_lamports_per_hour": rng.randrange(10**6)},
                    {"latency_ms": rng.choice((None, rng.uniform(0, 300)))},
                    {"reliability": rng.random(), "load": rng.random()},
                    {"reliability_measured": rng.random() < 0.5},
                    {"region": rng.choice(REGIONS).upper()},
                )
            )
            index.update(victim.provider, victim.gpu, **changes)
        elif action < 0.42:
            index.upsert(random_offer(rng, rng.choice(providers)))
        elif action < 0.45 and offers:
            index.remove_provider(rng.choice(offers).provider)
        request = random_request(rng)
        latencies = None
        if rng.random() < 0.3:
            latencies = {p: rng.uniform(0, 300) for p in rng.sample(providers, 10)}
        offers = list(index)
        expected_candidates, expected = brute_force(offers, request, latencies, k)
        assert index.candidates(request, limit=k, latencies=latencies) == expected_candidates
        if expected is None:
            with pytest.raises(LeaseError):
                schedule(index, request, candidates=k, latencies=latencies)
        else:
            chosen = schedule(index, request, candidates=k, latencies=latencies)
            assert chosen == expected
            assert chosen.gpus_free >= request.gpus


@pytest.mark.parametrize("seed", range(3))
def test_summary_equals_a_recount(seed: int) -> None:
    rng = random.Random(100 + seed)
    providers = [f"prov{i:03d}" for i in range(200)]
    index = OfferIndex(random_offer(rng, p) for p in providers)
    for _ in range(500):
        offers = list(index)
        victim = rng.choice(offers)
        if rng.random() < 0.7:
            index.set_capacity(victim.provider, victim.gpu, rng.randint(0, victim.gpus_total))
        elif rng.random() < 0.5:
            index.upsert(random_offer(rng, victim.provider))
        else:
            index.remove(victim.provider, victim.gpu)
    for row in index.summary():
        mine = [o for o in index if o.gpu_key == row.gpu_key]
        prices = sorted(o.price_lamports_per_hour for o in mine if o.gpus_free)
        assert row.offers == len(mine)
        assert row.gpus_total == sum(o.gpus_total for o in mine)
        assert row.gpus_available == sum(o.gpus_free for o in mine)
        assert row.price_min_lamports_per_hour == (prices[0] if prices else None)
        if prices:
            n = len(prices)
            median = (prices[(n - 1) // 2] + prices[n // 2]) // 2
            assert row.price_median_lamports_per_hour == median
        assert set(row.regions) == {o.region for o in mine}
        measured = [o.reliability for o in mine if o.reliability_measured]
        assert row.mean_reliability == (
            pytest.approx(sum(measured) / len(measured), abs=1e-6) if measured else None
        )
        benchmarks = [o.benchmark_tflops for o in mine if o.benchmark_tflops is not None]
        assert row.best_benchmark_tflops == (max(benchmarks) if benchmarks else None)
        assert row.simulated == any(o.simulated for o in mine)


def test_the_cpu_offer_is_named_as_such_never_as_a_gpu() -> None:
    from jupyter_io.gpu_names import CPU_OFFER, display_gpu_name, normalise_gpu_name

    assert normalise_gpu_name(CPU_OFFER) == normalise_gpu_name("CPU") == "cpu"
    assert display_gpu_name(CPU_OFFER) == display_gpu_name("cpu") == "cpu (no GPU)"
    assert normalise_gpu_name("RTX 4090 (simulated)") == "rtx4090"
