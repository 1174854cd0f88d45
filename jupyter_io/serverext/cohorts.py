"""Classroom cohorts as JupyterLab sees them: the coordinator's cohort REST, signed with the
user's key, and one kernelspec per GPU type a cohort of the user's pays for.

The coordinator is the authority (``docs/coordinator-contract.md``, cohorts); this module
only asks it, with the keypair the GPU kernels lease with, and shapes what the Lab extension
draws:

- the cohorts the user has a role in (:meth:`CohortDesk.cohorts_json`), a student's with
  their week's usage (``me``) and the kernelspecs that start a kernel paid by the cohort;
- joining one with a code or a join link (:meth:`CohortDesk.join`);
- an instructor's dashboard, as JSON or CSV, and the instructor's actions on it (remove a
  student, top the pool up).

A cohort's kernelspec is named ``jupyter-io-cohort-{hex of the cohort id}-{gpu key}``: Jupyter
lower-cases kernelspec names, and a cohort id is case-sensitive, so the id travels as hex.
Its provisioner config carries ``cohort`` beside ``gpu``: the lease asks for the cohort's
pool, which pays (no price cap or budget of the user's applies; the cohort's do, on the
coordinator).

Errors reach the handlers as :class:`CohortError` with the HTTP status to answer: the
coordinator's own 4xx (not a member, code expired, not an instructor...) pass through with
its message, 502 when it cannot be reached, 503 when none is configured, 501 for an action
this installation cannot do (topping up without the cohort pool's payments code).
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..coordinator_client import CoordinatorClient
from ..errors import (
    AuthError,
    ConfigError,
    InsufficientFunds,
    JupyterIOError,
    LeaseError,
    PaymentError,
)
from ..identity import load_keypair
from ..kernelspec import lease_kernel_json
from .kernelspecs import SPEC_PREFIX

__all__ = [
    "COHORT_PREFIX",
    "CohortDesk",
    "CohortError",
    "cohort_kernelspecs",
    "cohort_spec_name",
    "parse_cohort_spec_name",
]

#: Every cohort kernelspec's name starts with this.
COHORT_PREFIX = SPEC_PREFIX + "cohort-"
_NOT_KEY = re.compile(r"[^a-z0-9]+")
_HEX = re.compile(r"^[0-9a-f]+$")
#: The cohorts list is reused this long (every open Lab polls it).
LIST_TTL_SECONDS = 2.0


class CohortError(JupyterIOError):
    """A cohort request that failed; :attr:`status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def cohort_spec_name(cohort_id: str, gpu: str) -> str:
    """``("c_AbC...", "rtx4090")`` → ``"jupyter-io-cohort-635f416243...-rtx4090"``."""
    slug = _NOT_KEY.sub("-", gpu.lower()).strip("-") or "gpu"
    return f"{COHORT_PREFIX}{cohort_id.encode().hex()}-{slug}"


def parse_cohort_spec_name(name: str) -> tuple[str, str] | None:
    """The cohort id and GPU slug a cohort kernelspec's name holds, or None for another name."""
    if not name.startswith(COHORT_PREFIX):
        return None
    encoded, _, gpu = name[len(COHORT_PREFIX) :].partition("-")
    if not encoded or not gpu or len(encoded) % 2 or not _HEX.match(encoded):
        return None
    try:
        return bytes.fromhex(encoded).decode("ascii"), gpu
    except UnicodeDecodeError:
        return None


def _display(row: Mapping[str, Any]) -> str:
    return str(row.get("display")).lower()


def _gpu_rows(
    cohort: Mapping[str, Any], types: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The offers' rows of the GPU types ``cohort`` pays for (by key or name); a type the
    cohort names but no provider offers now is listed with nothing free."""
    rows = []
    for gpu in (str(g) for g in cohort.get("gpu_types") or []):
        key = gpu.lower()
        row = next((t for t in types if key in (str(t.get("gpu")).lower(), _display(t))), None)
        if row is None:
            rows.append({"gpu": gpu, "display": gpu, "available": 0, "total": 0, "offered": False})
        else:
            rows.append({**row, "offered": True})
    return rows


def cohort_kernelspecs(
    cohorts: Sequence[Mapping[str, Any]],
    types: Sequence[Mapping[str, Any]],
    *,
    coordinator_url: str,
    keypair_path: str,
) -> dict[str, dict[str, Any]]:
    """One lease-mode kernel.json per (student cohort, GPU type it pays for), by name; each
    one's provisioner config names the cohort, and ``metadata.jupyter_io`` says which."""
    specs: dict[str, dict[str, Any]] = {}
    for cohort in cohorts:
        if cohort.get("role") != "student" or cohort.get("state", "active") != "active":
            continue
        for row in _gpu_rows(cohort, types):
            gpu = str(row["gpu"])
            name = cohort_spec_name(str(cohort["id"]), gpu)
            specs[name] = cohort_kernel_json(
                str(cohort["id"]),
                str(cohort.get("name") or cohort["id"]),
                gpu,
                str(row.get("display") or gpu),
                coordinator_url=coordinator_url,
                keypair_path=keypair_path,
            )
    return specs


def cohort_kernel_json(
    cohort_id: str,
    cohort_name: str,
    gpu: str,
    gpu_display: str,
    *,
    coordinator_url: str,
    keypair_path: str,
) -> dict[str, Any]:
    """The kernel.json of a kernel on ``gpu`` paid by cohort ``cohort_id``."""
    spec = lease_kernel_json(
        coordinator_url, keypair_path, f"{gpu_display} · {cohort_name}", gpu=gpu
    )
    spec["metadata"]["kernel_provisioner"]["config"]["cohort"] = cohort_id
    spec["metadata"]["jupyter_io"] = {
        "gpu": gpu,
        "display": gpu_display,
        "cohort": cohort_id,
        "cohort_name": cohort_name,
        "coordinator_url": coordinator_url,
    }
    return spec


class CohortDesk:
    """The cohort side of the server extension for the keypair at ``keypair_path``.

    ``client_factory(url, keypair, timeout=...)`` makes the coordinator's cohort client
    (:class:`jupyter_io.cohort_client.CohortClient` by default). Call :meth:`close` when done.
    """

    def __init__(
        self,
        coordinator_url: str,
        keypair_path: str,
        *,
        timeout: float = 10.0,
        client_factory: Callable[..., Any] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordinator_url = coordinator_url.rstrip("/")
        self.keypair_path = str(Path(keypair_path).expanduser())
        self.timeout = timeout
        self._factory = client_factory
        self._client: Any = None
        self._monotonic = monotonic
        #: The last good list of the user's cohorts (what the cohort kernelspecs come from).
        self.latest: list[dict[str, Any]] = []
        self._listed_at = float("-inf")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def invalidate(self) -> None:
        """Ask the coordinator afresh at the next :meth:`cohorts_json`."""
        self._listed_at = float("-inf")

    # -- what the handlers serve -----------------------------------------------------------

    async def cohorts_json(self, types: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``{"coordinator_url", "cohorts": [...], "now"}``: each cohort the user has a role
        in, with ``role``; a student's also with ``me`` (their week: ``gpu_seconds_week``,
        ``quota_left_gpu_seconds``, ...) and ``gpus``, the offers' rows of the GPU types it
        pays for, each with the ``kernel_name`` that starts a kernel on it."""
        if self._monotonic() - self._listed_at >= LIST_TTL_SECONDS:
            client = self._connect()
            listed = await self._ask(client.cohorts())
            cohorts = []
            for view in listed:
                row = view.to_json()
                if row.get("role") == "student" and not row.get("me"):
                    detail = (await self._ask(client.get(view.id))).to_json()
                    row.update({k: v for k, v in detail.items() if k != "role"})
                cohorts.append(row)
            self.latest = cohorts
            self._listed_at = self._monotonic()
        body = []
        for cohort in self.latest:
            row = dict(cohort)
            if row.get("role") == "student":
                row["gpus"] = [
                    {**gpu, "kernel_name": cohort_spec_name(str(row["id"]), str(gpu["gpu"]))}
                    for gpu in _gpu_rows(row, types)
                ]
            body.append(row)
        return {"coordinator_url": self.coordinator_url, "cohorts": body, "now": time.time()}

    async def join(self, text: str) -> dict[str, Any]:
        """Join with a code or a join link (``jupyter-io:join?coordinator=...&code=...``);
        a link for another coordinator than this server's is refused (400) with both URLs."""
        from ..cohorts import CohortRequestError, parse_join_target

        try:
            target = parse_join_target(text)
        except CohortRequestError as exc:
            raise CohortError(str(exc), 400) from None
        coordinator, code = target.coordinator, target.code
        # Any of the coordinator's replicas' URLs names this coordinator.
        if coordinator and coordinator.rstrip("/") not in self.coordinator_url.split(","):
            raise CohortError(
                f"this join link is for the coordinator at {coordinator}, but this Jupyter "
                f"server leases from {self.coordinator_url}; ask the instructor for a code of "
                f"this coordinator, or point the server at the other one "
                f"(--JupyterIOExtension.coordinator_url)",
                400,
            )
        view = await self._ask(self._connect().join(code))
        self.invalidate()
        return {"cohort": view.to_json(), "role": "student"}

    async def cohort_json(self, cohort_id: str) -> dict[str, Any]:
        return dict((await self._ask(self._connect().get(cohort_id))).to_json())

    async def dashboard(self, cohort_id: str) -> dict[str, Any]:
        """The instructor's dashboard (see the coordinator's ``GET .../dashboard``)."""
        return dict(await self._ask(self._connect().dashboard(cohort_id)))

    async def dashboard_csv(self, cohort_id: str) -> str:
        return str(await self._ask(self._connect().dashboard_csv(cohort_id)))

    async def remove_student(self, cohort_id: str, student: str) -> dict[str, Any]:
        """Remove ``student`` from the cohort (their live kernels end, their queue tickets
        are dropped)."""
        ended = await self._ask(self._connect().remove_student(cohort_id, student))
        self.invalidate()
        return {"student": student, "removed": True, "leases_ended": int(ended)}

    async def top_up(self, cohort_id: str, student: str | None, lamports: int) -> dict[str, Any]:
        """Add ``lamports`` to ``student``'s allowance (every student's with None) from the
        instructor's wallet, and approve the delegate for all it then holds: the cohort
        pool's funding (:mod:`jupyter_io.payments.cohort_pool`), transactions only the
        instructor's key signs. Only the cohort's creator can: the allowances are theirs.

        Answers ``{"students", "lamports", "signatures", "fee_lamports"}``. 402 when the
        wallet cannot pay (nothing sent), 409 when an allowance is not as agreed."""
        try:
            pool: Any = importlib.import_module("jupyter_io.payments.cohort_pool")
        except ModuleNotFoundError:
            pool = None
        if getattr(pool, "CohortPoolClient", None) is None:
            raise CohortError(
                "topping up a cohort's pool needs the cohort pool's funding "
                "(jupyter_io.payments.cohort_pool), which this installation does not have; "
                "nothing was moved",
                501,
            )
        from solders.pubkey import Pubkey

        board = await self.dashboard(cohort_id)  # 403 unless the caller teaches it
        keypair = load_keypair(self.keypair_path)
        if board.get("cohort", {}).get("instructor") != str(keypair.pubkey()):
            raise CohortError(
                "only the instructor who created the cohort can fund its allowances (they "
                "are that instructor's accounts); ask them to top up",
                403,
            )
        enrolled = [str(row["student"]) for row in board.get("students") or []]
        if student is not None and student not in enrolled:
            raise CohortError(f"{student} is not a student of cohort {cohort_id}", 404)
        students = enrolled if student is None else [student]
        if not students:
            raise CohortError("the cohort has no students to fund yet", 409)
        async with CoordinatorClient(self.coordinator_url, timeout=self.timeout) as info:
            payments = await self._ask(info.payments())
        if not payments.solana_url or not payments.arbiter:
            raise CohortError(
                f"the coordinator at {self.coordinator_url} takes no escrow payments, so "
                f"there is no pool to fund",
                409,
            )
        arbiter = Pubkey.from_string(payments.arbiter)
        ledger = pool.CohortPoolClient.connect(payments.solana_url)
        try:
            targets = []
            for key in students:
                terms = pool.AllowanceTerms(
                    keypair.pubkey(), Pubkey.from_string(key), arbiter, cohort_id
                )
                state = await self._ask(ledger.allowance_state(terms))
                targets.append((terms, (state.amount if state is not None else 0) + lamports))
            grants = await self._ask(ledger.plan_grants(targets))
            receipts = await self._ask(ledger.fund(keypair, grants))
        finally:
            await ledger.close()
        return {
            "students": students,
            "lamports": lamports * len(students),
            "signatures": [str(r.signature) for r in receipts],
            "fee_lamports": sum(r.fee for r in receipts),
        }

    # -- plumbing --------------------------------------------------------------------------

    def _connect(self) -> Any:
        if not self.coordinator_url:
            raise CohortError(
                "no coordinator is configured, so there are no cohorts "
                "(--JupyterIOExtension.coordinator_url=http://HOST:8700)",
                503,
            )
        if self._client is None:
            try:
                keypair = load_keypair(self.keypair_path)
            except ConfigError as exc:
                raise CohortError(str(exc), 409) from None
            factory = self._factory
            if factory is None:
                from ..cohort_client import CohortClient

                factory = CohortClient
            self._client = factory(self.coordinator_url, keypair, timeout=self.timeout)
        return self._client

    async def _ask(self, call: Any) -> Any:
        """Await ``call``, turning the coordinator's refusals into :class:`CohortError`."""
        try:
            return await call
        except CohortError:
            raise
        except JupyterIOError as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int) and 400 <= status < 500:
                raise CohortError(str(exc), status) from None  # the coordinator's own
            raise self._mapped(exc) from None

    @staticmethod
    def _mapped(exc: JupyterIOError) -> CohortError:
        for kind, status in _STATUSES:
            if isinstance(exc, kind):
                return CohortError(str(exc), status)
        return CohortError(str(exc), 502)


#: The HTTP status of an error without one of its own, by its kind (first match).
_STATUSES: tuple[tuple[type[JupyterIOError], int], ...] = (
    (AuthError, 403),
    (InsufficientFunds, 402),
    (PaymentError, 409),
    (LeaseError, 409),
    (ConfigError, 400),
)
