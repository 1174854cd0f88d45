"""The provider link: the messages a provider host and the coordinator exchange.

A provider opens ``GET /api/v1/providers/connect`` (a websocket of JSON text messages,
``docs/coordinator-contract.md`` section 1) and keeps it open. This module is the contract
both ends import, as :mod:`jupyter_io.protocol` is the tunnel's: the messages, as frozen
dataclasses with ``parse()`` (from the decoded JSON object, checked field by field;
:class:`~jupyter_io.errors.ProtocolError` on anything malformed) and ``to_json()``;
:func:`parse_message` dispatches on ``type``; the link's version, close codes and size bounds.
No I/O: the coordinator's end of a connection is :mod:`jupyter_io.coordinator.links`, the
provider's :mod:`provider_host.coordinator_link`; signatures are in :mod:`jupyter_io.signing`.

A bad hello signature is answered with an ``error`` message (``code: "auth"``) and close 1008
before anything is stored; a malformed message with ``code: "protocol"`` and close 1002.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ProtocolError

__all__ = [
    "CLOSE_BAD_SIGNATURE",
    "CLOSE_PROTOCOL",
    "LINK_VERSION",
    "MAX_DRIVER_INFORMATION",
    "MAX_HELLO_SIZE",
    "MAX_INT",
    "MAX_LEASE_ID_LENGTH",
    "MAX_MESSAGE_SIZE",
    "MAX_OFFERS",
    "MAX_REQUIREMENTS_SIZE",
    "MAX_SESSIONS",
    "MAX_SETTLEMENT_MESSAGE",
    "Challenge",
    "Dial",
    "End",
    "Environment",
    "EnvironmentRefused",
    "ErrorMessage",
    "GetEnvironment",
    "GpuChallenge",
    "GpuCommitment",
    "GpuOpening",
    "GpuRefused",
    "GpuReply",
    "GpuReveal",
    "Heartbeat",
    "Hello",
    "Inventory",
    "LinkMessage",
    "OfferGroup",
    "SessionEvent",
    "SettlementRefused",
    "SettlementReply",
    "SettlementSignature",
    "SignSettlement",
    "Usage",
    "Welcome",
    "environment_sha256",
    "parse_message",
]

#: Version of the provider link, carried in ``challenge`` and ``hello``.
LINK_VERSION = 1
#: Close codes of the link (RFC 6455).
CLOSE_BAD_SIGNATURE = 1008
CLOSE_PROTOCOL = 1002
#: Bounds on what a provider may send (hostile input costs bounded work).
MAX_OFFERS = 64
MAX_SESSIONS = 10_000
MAX_LEASE_ID_LENGTH = 64
#: Largest provider-link message (an inventory is a few KiB).
MAX_MESSAGE_SIZE = 1 << 20
#: Largest message before the hello is verified: a stranger costs no more. A hello is a few
#: KiB; this holds the full 64 offers and about a thousand hosted lease ids.
MAX_HELLO_SIZE = 64 * 1024
#: Largest integer a link message may carry: the store's columns are signed 64-bit.
MAX_INT = (1 << 63) - 1
#: Largest requirements text of a course environment (bytes of UTF-8).
MAX_REQUIREMENTS_SIZE = 64 * 1024
_MAX_TEXT = 2048
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_FLOAT = sys.float_info.max


# --------------------------------------------------------------------------------------------
# Field checks


def _fail(what: str) -> ProtocolError:
    return ProtocolError(f"provider link: {what}")


def _str(body: Mapping[str, Any], name: str, *, optional: bool = False, limit: int = _MAX_TEXT
         ) -> Any:  # fmt: skip
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(f"{name!r} must be a string of at most {limit} characters, not {value!r:.60}")
    return value


def _int(body: Mapping[str, Any], name: str, *, minimum: int = 0) -> int:
    value = body.get(name)
    if type(value) is not int or not minimum <= value <= MAX_INT:
        raise _fail(f"{name!r} must be an integer in {minimum}..2**63-1, not {value!r:.60}")
    return value


def _float(body: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    value: Any = body.get(name)
    if value is None and optional:
        return None
    # An int beyond a float's range passes isfinite's type check but not its conversion.
    if type(value) not in (int, float) or not -_MAX_FLOAT <= value <= _MAX_FLOAT:
        raise _fail(f"{name!r} must be a finite number, not {value!r:.60}")
    return float(value)


def _lease_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_LEASE_ID_LENGTH:
        raise _fail(f"{where} must be a lease id (1..{MAX_LEASE_ID_LENGTH} characters)")
    return value


def _lease_ids(body: Mapping[str, Any], name: str) -> frozenset[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_SESSIONS:
        raise _fail(f"{name!r} must be a list of at most {MAX_SESSIONS} lease ids")
    return frozenset(_lease_id(item, f"each of {name!r}") for item in value)


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class OfferGroup:
    """One group of identical GPUs in an inventory (one per GPU model)."""

    gpu: str
    vram_bytes: int
    count: int
    gpu_indices: tuple[int, ...]
    price_lamports_per_hour: int
    simulated: bool = False
    driver: str | None = None
    cuda: str | None = None
    benchmark_tflops: float | None = None

    @classmethod
    def parse(cls, body: Any) -> OfferGroup:
        if not isinstance(body, dict):
            raise _fail("each inventory offer must be an object")
        indices = body.get("gpu_indices")
        count = _int(body, "count", minimum=1)
        if (
            not isinstance(indices, list)
            or len(indices) != count
            or not all(type(i) is int and i >= 0 for i in indices)
            or len(set(indices)) != count
        ):
            raise _fail(f"'gpu_indices' must list {count} distinct device indices")
        simulated = body.get("simulated", False)
        if type(simulated) is not bool:
            raise _fail("'simulated' must be true or false")
        return cls(
            gpu=_str(body, "gpu", limit=128),
            vram_bytes=_int(body, "vram_bytes"),
            count=count,
            gpu_indices=tuple(indices),
            price_lamports_per_hour=_int(body, "price_lamports_per_hour"),
            simulated=simulated,
            driver=_str(body, "driver", optional=True, limit=64),
            cuda=_str(body, "cuda", optional=True, limit=32),
            benchmark_tflops=_float(body, "benchmark_tflops", optional=True),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "vram_bytes": self.vram_bytes,
            "count": self.count,
            "gpu_indices": list(self.gpu_indices),
            "price_lamports_per_hour": self.price_lamports_per_hour,
            "simulated": self.simulated,
            "driver": self.driver,
            "cuda": self.cuda,
            "benchmark_tflops": self.benchmark_tflops,
        }


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a provider offers (the hello's ``inventory``)."""

    name: str
    region: str
    reachable_url: str | None
    max_kernels: int
    offers: tuple[OfferGroup, ...]

    @classmethod
    def parse(cls, body: Any) -> Inventory:
        if not isinstance(body, dict):
            raise _fail("'inventory' must be an object")
        offers = body.get("offers")
        if not isinstance(offers, list) or not 1 <= len(offers) <= MAX_OFFERS:
            raise _fail(f"'inventory.offers' must list 1..{MAX_OFFERS} offers")
        url = _str(body, "reachable_url", optional=True)
        if url is not None and not url.startswith(("ws://", "wss://")):
            raise _fail(f"'reachable_url' must be a ws:// or wss:// URL, not {url!r:.60}")
        return cls(
            name=_str(body, "name", limit=200),
            region=_str(body, "region", limit=64),
            reachable_url=url,
            max_kernels=_int(body, "max_kernels", minimum=1),
            offers=tuple(OfferGroup.parse(offer) for offer in offers),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region": self.region,
            "reachable_url": self.reachable_url,
            "max_kernels": self.max_kernels,
            "offers": [offer.to_dict() for offer in self.offers],
        }


class _Message:
    """What every link message has: a ``type`` and ``to_json()``."""

    __slots__ = ()
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        """The JSON text to send."""
        return _dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Challenge(_Message):
    """coordinator → provider, first: sign ``nonce`` (with the coordinator's key)."""

    type: ClassVar[str] = "challenge"
    nonce: bytes
    coordinator: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Challenge:
        if body.get("version") != LINK_VERSION:
            raise _fail(f"link version {body.get('version')!r}, expected {LINK_VERSION}")
        try:
            nonce = bytes.fromhex(_str(body, "nonce", limit=64))
        except ValueError:
            raise _fail("'nonce' must be 32 bytes of hex") from None
        if len(nonce) != 32:
            raise _fail("'nonce' must be 32 bytes of hex")
        return cls(nonce=nonce, coordinator=_str(body, "coordinator", limit=44))

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "version": LINK_VERSION,
            "nonce": self.nonce.hex(),
            "coordinator": self.coordinator,
        }


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """provider → coordinator, answering the challenge: who it is, what it offers, which
    leases it still hosts."""

    type: ClassVar[str] = "hello"
    pubkey: str
    signature: str
    inventory: Inventory
    sessions: frozenset[str] = frozenset()
    #: The provider's own challenge: the coordinator signs it in the welcome.
    nonce: bytes | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Hello:
        if body.get("version") != LINK_VERSION:
            raise _fail(f"link version {body.get('version')!r}, expected {LINK_VERSION}")
        nonce = None
        if body.get("nonce") is not None:
            try:
                nonce = bytes.fromhex(_str(body, "nonce", limit=64))
            except ValueError:
                raise _fail("'nonce' must be 32 bytes of hex") from None
            if len(nonce) != 32:
                raise _fail("'nonce' must be 32 bytes of hex")
        return cls(
            pubkey=_str(body, "pubkey", limit=44),
            signature=_str(body, "signature", limit=100),
            inventory=Inventory.parse(body.get("inventory")),
            sessions=_lease_ids(body, "sessions"),
            nonce=nonce,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "version": LINK_VERSION,
            "pubkey": self.pubkey,
            "signature": self.signature,
            "inventory": self.inventory.to_dict(),
            "sessions": sorted(self.sessions),
            **({"nonce": self.nonce.hex()} if self.nonce is not None else {}),
        }


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    """coordinator → provider: linked; heartbeat every ``heartbeat_interval`` seconds."""

    type: ClassVar[str] = "welcome"
    heartbeat_interval: float
    coordinator: str
    #: The coordinator's signature over the hello's nonce (present when the hello had one).
    signature: str | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Welcome:
        return cls(
            _float(body, "heartbeat_interval"),
            _str(body, "coordinator", limit=44),
            _str(body, "signature", optional=True, limit=100),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "heartbeat_interval": self.heartbeat_interval,
            "coordinator": self.coordinator,
            **({"signature": self.signature} if self.signature is not None else {}),
        }


@dataclass(frozen=True, slots=True)
class ErrorMessage(_Message):
    """coordinator → provider, just before closing the link: why."""

    type: ClassVar[str] = "error"
    code: str
    message: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> ErrorMessage:
        return cls(_str(body, "code", limit=64), _str(body, "message"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    """provider → coordinator, every ``heartbeat_interval``: load (0..1), hosted leases."""

    type: ClassVar[str] = "heartbeat"
    load: float = 0.0
    sessions: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Heartbeat:
        load = body.get("load", 0.0)
        if type(load) not in (int, float) or not 0.0 <= load <= 1.0:
            raise _fail(f"heartbeat 'load' must be a number in 0..1, not {load!r:.40}")
        sessions = body.get("sessions")
        if not sessions:  # the common case: nothing to build
            return cls(float(load))
        return cls(float(load), _lease_ids(body, "sessions"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "load": self.load, "sessions": sorted(self.sessions)}


@dataclass(frozen=True, slots=True)
class Usage(_Message):
    """provider → coordinator: signed seconds delivered on a lease so far (cumulative).

    ``idle_seconds`` (optional, signed like the rest): seconds since the lease's kernel last
    executed anything; a cohort's idle timeout counts it (``docs/cohorts.md``, "Time rules").
    ``raw`` is the object as received, which the signature covers (see
    :func:`~jupyter_io.signing.verify_usage`); build outgoing reports with
    :func:`~jupyter_io.signing.sign_usage` instead.
    """

    type: ClassVar[str] = "usage"
    lease: str
    seq: int
    seconds: int
    gpu_utilisation: float | None
    at: float
    signature: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    idle_seconds: int | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Usage:
        utilisation = _float(body, "gpu_utilisation", optional=True)
        idle = _int(body, "idle_seconds") if body.get("idle_seconds") is not None else None
        return cls(
            lease=_lease_id(body.get("lease"), "'lease'"),
            seq=_int(body, "seq"),
            seconds=_int(body, "seconds"),
            gpu_utilisation=utilisation,
            at=_float(body, "at"),
            signature=_str(body, "signature", limit=100),
            raw=dict(body),
            idle_seconds=idle,
        )

    def to_dict(self) -> dict[str, Any]:
        body = {
            "type": self.type,
            "lease": self.lease,
            "seq": self.seq,
            "seconds": self.seconds,
            "gpu_utilisation": self.gpu_utilisation,
            "at": self.at,
            "signature": self.signature,
        }
        if self.idle_seconds is not None:
            body["idle_seconds"] = self.idle_seconds
        return body


@dataclass(frozen=True, slots=True)
class SessionEvent(_Message):
    """provider → coordinator: a lease's tunnel session attached its kernel, or ended."""

    type: ClassVar[str] = "session"
    lease: str
    state: str
    at: float

    STATES: ClassVar[frozenset[str]] = frozenset({"active", "ended"})

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> SessionEvent:
        state = body.get("state")
        if not isinstance(state, str) or state not in cls.STATES:
            raise _fail(f"session 'state' must be 'active' or 'ended', not {state!r:.40}")
        return cls(_lease_id(body.get("lease"), "'lease'"), str(state), _float(body, "at"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "lease": self.lease, "state": self.state, "at": self.at}


@dataclass(frozen=True, slots=True)
class Dial(_Message):
    """coordinator → provider: open a websocket to ``url`` and serve a tunnel on it."""

    type: ClassVar[str] = "dial"
    lease: str
    url: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Dial:
        return cls(_lease_id(body.get("lease"), "'lease'"), _str(body, "url"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "lease": self.lease, "url": self.url}


@dataclass(frozen=True, slots=True)
class End(_Message):
    """coordinator → provider: the lease is over; stop its session."""

    type: ClassVar[str] = "end"
    lease: str
    reason: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> End:
        return cls(_lease_id(body.get("lease"), "'lease'"), _str(body, "reason"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "lease": self.lease, "reason": self.reason}


#: Largest settlement message, base64 (a settlement transaction's message is < 1232 bytes).
MAX_SETTLEMENT_MESSAGE = 4096


@dataclass(frozen=True, slots=True)
class SignSettlement(_Message):
    """coordinator → provider: co-sign the settlement of a lease that is over
    (``docs/payments-contract.md`` section 4). ``message`` is ``bytes(MessageV0)`` of
    :func:`~jupyter_io.payments.escrow.settlement_message` paying the provider ``amount``
    lamports; answer with :class:`SettlementSignature` or :class:`SettlementRefused`."""

    type: ClassVar[str] = "sign_settlement"
    lease: str
    amount: int
    message: bytes

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> SignSettlement:
        text = _str(body, "message", limit=MAX_SETTLEMENT_MESSAGE)
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise _fail("'message' must be base64 of a transaction message") from None
        if not raw:
            raise _fail("'message' must not be empty")
        return cls(_lease_id(body.get("lease"), "'lease'"), _int(body, "amount"), raw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "lease": self.lease,
            "amount": self.amount,
            "message": base64.b64encode(self.message).decode(),
        }


@dataclass(frozen=True, slots=True)
class SettlementSignature(_Message):
    """provider → coordinator: the provider's signature (base58) over the settlement message
    it was asked to sign for ``lease``."""

    type: ClassVar[str] = "settlement_signature"
    lease: str
    signature: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> SettlementSignature:
        return cls(_lease_id(body.get("lease"), "'lease'"), _str(body, "signature", limit=100))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "lease": self.lease, "signature": self.signature}


@dataclass(frozen=True, slots=True)
class SettlementRefused(_Message):
    """provider → coordinator: the provider will not sign that settlement, and why (it
    sends its latest usage report first, so the next request can pay what it delivered)."""

    type: ClassVar[str] = "settlement_refused"
    lease: str
    reason: str
    #: ``"refused"`` (the message or amount is wrong) or ``"unknown_lease"`` (the provider
    #: has no record of the lease: it cannot ever co-sign, so the lease is refunded).
    code: str = "refused"

    CODES: ClassVar[frozenset[str]] = frozenset({"refused", "unknown_lease"})

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> SettlementRefused:
        code = body.get("code", "refused")
        if not isinstance(code, str) or code not in cls.CODES:
            raise _fail(f"settlement_refused 'code' must be one of {sorted(cls.CODES)}")
        return cls(_lease_id(body.get("lease"), "'lease'"), _str(body, "reason"), str(code))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "lease": self.lease, "reason": self.reason, "code": self.code}


def environment_sha256(requirements: str) -> str:
    """The hex sha256 naming a course environment: of its requirements text's UTF-8 bytes,
    exactly as stored (the coordinator stores the normalised text, so both ends hash the
    same bytes)."""
    return hashlib.sha256(requirements.encode("utf-8")).hexdigest()


def _sha256(body: Mapping[str, Any]) -> str:
    value = body.get("sha256")
    if not isinstance(value, str) or _SHA256_HEX.fullmatch(value) is None:
        raise _fail(f"'sha256' must be 64 lowercase hex digits, not {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True)
class GetEnvironment(_Message):
    """provider → coordinator: the requirements text of the course environment ``sha256``
    (named by a lease token's ``env`` claim). Answered with :class:`Environment` or
    :class:`EnvironmentRefused`."""

    type: ClassVar[str] = "get_environment"
    sha256: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GetEnvironment:
        return cls(_sha256(body))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Environment(_Message):
    """coordinator → provider: the requirements text of environment ``sha256`` (at most
    :data:`MAX_REQUIREMENTS_SIZE` bytes). The receiver checks
    ``environment_sha256(requirements) == sha256`` (:meth:`matches`) before using it."""

    type: ClassVar[str] = "environment"
    sha256: str
    requirements: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Environment:
        text = _str(body, "requirements", limit=MAX_REQUIREMENTS_SIZE)
        if len(text.encode("utf-8", errors="surrogatepass")) > MAX_REQUIREMENTS_SIZE:
            raise _fail(f"'requirements' must be at most {MAX_REQUIREMENTS_SIZE} bytes")
        return cls(_sha256(body), text)

    def matches(self) -> bool:
        """True when the text is the one its hash names."""
        try:
            return environment_sha256(self.requirements) == self.sha256
        except UnicodeEncodeError:  # a lone surrogate: no stored text is that
            return False

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "sha256": self.sha256, "requirements": self.requirements}


@dataclass(frozen=True, slots=True)
class EnvironmentRefused(_Message):
    """coordinator → provider: no environment ``sha256`` for this provider, and why (unknown
    hash, or no lease of this provider names it)."""

    type: ClassVar[str] = "environment_refused"
    sha256: str
    reason: str

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> EnvironmentRefused:
        return cls(_sha256(body), _str(body, "reason"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "sha256": self.sha256, "reason": self.reason}


# --------------------------------------------------------------------------------------------
# The GPU challenge (docs/gpu-verification.md; the arithmetic is jupyter_io.gpu_challenge)

_CHALLENGE_ID = re.compile(r"[0-9a-f]{32}")
_HASH_HEX = re.compile(r"[0-9a-f]{64}")
#: Largest driver listing a commitment may carry (the real file is about 600 bytes).
MAX_DRIVER_INFORMATION = 4096


def _challenge_id(body: Mapping[str, Any]) -> str:
    value = body.get("id")
    if not isinstance(value, str) or _CHALLENGE_ID.fullmatch(value) is None:
        raise _fail(f"a GPU challenge 'id' must be 32 lowercase hex digits, not {value!r:.40}")
    return value


def _hash_hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or _HASH_HEX.fullmatch(value) is None:
        raise _fail(f"{what} must be 64 lowercase hex digits")
    return bytes.fromhex(value)


@dataclass(frozen=True, slots=True)
class GpuChallenge(_Message):
    """coordinator → provider: multiply the matrices of ``seed`` (size ``n``) on device
    ``gpu_index`` and commit to the product (:mod:`jupyter_io.gpu_challenge`). Answer with
    :class:`GpuCommitment` or :class:`GpuRefused`."""

    type: ClassVar[str] = "gpu_challenge"
    id: str
    gpu_index: int
    seed: bytes
    n: int

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GpuChallenge:
        from .gpu_challenge import MAX_N, SEED_BYTES

        seed = _hash_hex(body.get("seed"), "'seed'")
        n = _int(body, "n", minimum=1)
        if n > MAX_N or len(seed) != SEED_BYTES:
            raise _fail(f"a GPU challenge's 'n' must be at most {MAX_N}")
        return cls(_challenge_id(body), _int(body, "gpu_index"), seed, n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "id": self.id,
            "gpu_index": self.gpu_index,
            "seed": self.seed.hex(),
            "n": self.n,
        }


@dataclass(frozen=True, slots=True)
class GpuCommitment(_Message):
    """provider → coordinator: the Merkle root over the product's rows, the device that
    computed it, and (real GPUs) what NVML and the kernel driver say of that device."""

    type: ClassVar[str] = "gpu_commitment"
    id: str
    root: bytes
    device: str
    simulated: bool
    nvml_name: str | None = None
    nvml_uuid: str | None = None
    nvml_pci_bus_id: str | None = None
    driver_information: str | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GpuCommitment:
        simulated = body.get("simulated")
        if type(simulated) is not bool:
            raise _fail("'simulated' must be true or false")
        return cls(
            _challenge_id(body),
            _hash_hex(body.get("root"), "'root'"),
            _str(body, "device", limit=64),
            simulated,
            _str(body, "nvml_name", optional=True, limit=128),
            _str(body, "nvml_uuid", optional=True, limit=128),
            _str(body, "nvml_pci_bus_id", optional=True, limit=64),
            _str(body, "driver_information", optional=True, limit=MAX_DRIVER_INFORMATION),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "id": self.id,
            "root": self.root.hex(),
            "device": self.device,
            "simulated": self.simulated,
            "nvml_name": self.nvml_name,
            "nvml_uuid": self.nvml_uuid,
            "nvml_pci_bus_id": self.nvml_pci_bus_id,
            "driver_information": self.driver_information,
        }


@dataclass(frozen=True, slots=True)
class GpuRefused(_Message):
    """provider → coordinator: the challenge was not run, and why. ``code`` ``"busy"`` (a
    lease holds the device: not a failure, asked again later) or ``"unable"``."""

    type: ClassVar[str] = "gpu_refused"
    id: str
    code: str
    reason: str

    CODES: ClassVar[frozenset[str]] = frozenset({"busy", "unable"})

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GpuRefused:
        code = body.get("code")
        if not isinstance(code, str) or code not in cls.CODES:
            raise _fail(f"gpu_refused 'code' must be one of {sorted(cls.CODES)}")
        return cls(_challenge_id(body), str(code), _str(body, "reason"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "code": self.code, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class GpuReveal(_Message):
    """coordinator → provider, after the commitment: open these rows of the product."""

    type: ClassVar[str] = "gpu_reveal"
    id: str
    rows: tuple[int, ...]

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GpuReveal:
        from .gpu_challenge import MAX_N, MAX_OPEN_ROWS

        rows = body.get("rows")
        if (
            not isinstance(rows, list)
            or not 1 <= len(rows) <= MAX_OPEN_ROWS
            or not all(type(i) is int and 0 <= i < MAX_N for i in rows)
        ):
            raise _fail(f"'rows' must list 1..{MAX_OPEN_ROWS} row indices")
        return cls(_challenge_id(body), tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "rows": list(self.rows)}


@dataclass(frozen=True, slots=True)
class GpuOpening(_Message):
    """provider → coordinator: one opened row of the product (int32 little-endian, base64)
    and its Merkle path (sibling hashes, leaf to root)."""

    type: ClassVar[str] = "gpu_opening"
    id: str
    row: int
    values: bytes
    proof: tuple[bytes, ...]

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> GpuOpening:
        text = _str(body, "values", limit=MAX_MESSAGE_SIZE)
        try:
            values = base64.b64decode(text, validate=True)
        except ValueError:
            raise _fail("'values' must be base64 of int32 little-endian entries") from None
        proof = body.get("proof")
        if not isinstance(proof, list) or len(proof) > 32:
            raise _fail("'proof' must list at most 32 sibling hashes")
        return cls(
            _challenge_id(body),
            _int(body, "row"),
            values,
            tuple(_hash_hex(item, "each of 'proof'") for item in proof),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "id": self.id,
            "row": self.row,
            "values": base64.b64encode(self.values).decode(),
            "proof": [item.hex() for item in self.proof],
        }


#: A provider's answer to :class:`SignSettlement`.
SettlementReply = SettlementSignature | SettlementRefused
#: A provider's messages in a GPU challenge.
GpuReply = GpuCommitment | GpuRefused | GpuOpening

LinkMessage = (
    Challenge
    | Hello
    | Welcome
    | ErrorMessage
    | Heartbeat
    | Usage
    | SessionEvent
    | Dial
    | End
    | SignSettlement
    | SettlementSignature
    | SettlementRefused
    | GetEnvironment
    | Environment
    | EnvironmentRefused
    | GpuChallenge
    | GpuCommitment
    | GpuRefused
    | GpuReveal
    | GpuOpening
)

_PARSERS: dict[str, Callable[[Mapping[str, Any]], LinkMessage]] = {
    cls.type: cls.parse
    for cls in (
        Challenge,
        Hello,
        Welcome,
        ErrorMessage,
        Heartbeat,
        Usage,
        SessionEvent,
        Dial,
        End,
        SignSettlement,
        SettlementSignature,
        SettlementRefused,
        GetEnvironment,
        Environment,
        EnvironmentRefused,
        GpuChallenge,
        GpuCommitment,
        GpuRefused,
        GpuReveal,
        GpuOpening,
    )
}


def parse_message(text: str | bytes) -> LinkMessage:
    """Decode one link message; :class:`ProtocolError` if it is not one."""
    if isinstance(text, bytes):
        raise _fail("binary message; the link speaks JSON text")
    try:
        body = json.loads(text)
    except ValueError:  # also an integer of more than 4300 digits
        raise _fail("a message is not JSON") from None
    except RecursionError:
        raise _fail("a message nests too deeply") from None
    if not isinstance(body, dict):
        raise _fail("a message must be a JSON object")
    kind = body.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise _fail(f"unknown message type {body.get('type')!r:.40}")
    return parser(body)
