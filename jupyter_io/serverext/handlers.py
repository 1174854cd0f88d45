"""The REST API of the server extension, under ``{base_url}/jupyter-io/``.

======================================  ==================================================
``GET  offers``                         GPU types and provider offers (coordinator, cached)
``GET  preferences`` / ``PUT``          price cap, region, session budget
``GET  wallet``                         address, balance (when a Solana RPC is configured)
``POST wallet/airdrop``                 test SOL from the ledger (local ledger, devnet)
``GET  sessions``                       remote kernels: GPU, elapsed, cost, escrow left,
                                        and a ``version`` that moves with offers/wallet
``POST sessions/{kernel_id}/topup``     add to a kernel's escrow from the wallet
``GET  progress[?since=T]``             recent kernel starts, step by step
``GET  progress/{kernel_id}``           one kernel's start
``GET  cohorts``                        the user's classes (a student's with quota left)
``POST cohorts/join``                   join a class with a code or join link
``GET  cohorts/{id}``                   one class, with the user's week if a student
``GET  cohorts/{id}/dashboard``         instructors: per-student week, pool, queue
                                        (``?format=csv``: one row per student)
``DELETE cohorts/{id}/members/{key}``   instructors: remove a student
``POST cohorts/{id}/topup``             instructors: add to the pool (cohort funding)
======================================  ==================================================

Every handler needs a logged-in user (``@web.authenticated``) allowed to act on the
``jupyter_io`` resource (``@authorized``). Errors are Jupyter's JSON errors
(``{"message", "reason"}``) with a message that says what to do: 502 when the coordinator
cannot be reached, 503 when none is configured, 409 when the wallet has no keypair or
ledger to act with (or an escrow cannot be topped up), 402 when the wallet is short, 400
for invalid input. The handlers only
translate HTTP; the work is done by the services on the extension
(:class:`~jupyter_io.serverext.app.JupyterIOExtension`), which they know only as
:class:`ExtensionServices`: the app imports this module, and this module does not import it.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import ConfigError, InsufficientFunds, JupyterIOError, PaymentError
from .cohorts import CohortDesk, CohortError
from .offers import CoordinatorUnavailable, NoCoordinator
from .preferences import Preferences, PreferencesError
from .progress import ProgressBoard
from .wallet import Wallet, WalletError

__all__ = ["AUTH_RESOURCE", "URL_PREFIX", "ExtensionServices", "handlers"]

#: The resource name authorizers see for every jupyter-io endpoint.
AUTH_RESOURCE = "jupyter_io"
#: Where the endpoints live, below the server's base URL.
URL_PREFIX = "jupyter-io"
#: The most an airdrop may ask for (1 SOL); ledgers cap airdrops themselves too.
MAX_AIRDROP_LAMPORTS = 1_000_000_000
#: A cohort id in a route ("c_" and url-safe characters; "join" is a route of its own).
_COHORT = r"(?P<cohort_id>c_[\w-]+)"


class ExtensionServices(Protocol):
    """What the handlers ask of the extension app (:class:`~.app.JupyterIOExtension`)."""

    preferences: Preferences
    wallet: Wallet
    progress: ProgressBoard
    cohorts: CohortDesk

    async def offers_json(self) -> dict[str, Any]: ...
    def set_preferences(self, body: Any) -> Preferences: ...
    async def wallet_json(self) -> dict[str, Any]: ...
    async def airdrop(self, lamports: int) -> str: ...
    async def sessions_json(self) -> dict[str, Any]: ...
    async def top_up(self, kernel_id: str, lamports: int) -> dict[str, Any]: ...
    def progress_json(self, since: float | None) -> dict[str, Any]: ...
    async def cohorts_json(self) -> dict[str, Any]: ...
    def cohorts_changed(self) -> None: ...


class _Handler(ExtensionHandlerMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def io(self) -> ExtensionServices:
        return cast(ExtensionServices, self.extensionapp)

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))

    def json_body(self) -> Any:
        try:
            return json.loads(self.request.body or b"null")
        except ValueError:
            raise web.HTTPError(400, "the request body is not JSON") from None


class OffersHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """``{"coordinator_url", "fetched_at", "types": [... + "kernel_name",
        "display_name", "within_cap"], "providers": [...], "preferences": {...}}``."""
        try:
            body = await self.io.offers_json()
        except NoCoordinator as exc:
            raise web.HTTPError(503, str(exc)) from None
        except CoordinatorUnavailable as exc:
            raise web.HTTPError(502, str(exc)) from None
        self.reply(body)


class PreferencesHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(self.io.preferences.to_json())

    @web.authenticated
    @authorized
    async def put(self) -> None:
        """Change the fields sent (``null`` clears one); answers the stored preferences."""
        try:
            preferences = self.io.set_preferences(self.json_body())
        except PreferencesError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.reply(preferences.to_json())


class WalletHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.io.wallet_json())


class AirdropHandler(_Handler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Body ``{"lamports": N}`` (default 1 SOL); answers the wallet after the airdrop."""
        body = self.json_body() or {}
        lamports = body.get("lamports", MAX_AIRDROP_LAMPORTS) if isinstance(body, dict) else None
        if (
            isinstance(lamports, bool)
            or not isinstance(lamports, int)
            or not 0 < lamports <= MAX_AIRDROP_LAMPORTS
        ):
            raise web.HTTPError(400, f'send {{"lamports": N}} with 0 < N <= {MAX_AIRDROP_LAMPORTS}')
        try:
            signature = await self.io.airdrop(lamports)
        except ConfigError as exc:
            raise web.HTTPError(409, str(exc)) from None
        except WalletError as exc:
            raise web.HTTPError(502, str(exc)) from None
        self.reply({**(await self.io.wallet.info()), "signature": signature})


class SessionsHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """``{"sessions": [...], "stopped": [...], "billing_error", "now": T}`` (see
        :func:`~.sessions.session_json` and :func:`~.sessions.stopped_json`)."""
        self.reply(await self.io.sessions_json())


class TopUpHandler(_Handler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        """Body ``{"lamports": N}``: add N from the wallet to the kernel's escrow; answers
        the kernel's session row with the coordinator's new deposit."""
        body = self.json_body()
        lamports = body.get("lamports") if isinstance(body, dict) else None
        if isinstance(lamports, bool) or not isinstance(lamports, int) or lamports <= 0:
            raise web.HTTPError(400, 'send {"lamports": N} with N > 0')
        try:
            row = await self.io.top_up(kernel_id, lamports)
        except KeyError:
            raise web.HTTPError(
                404, f"kernel {kernel_id} is not a running jupyter-io kernel with a lease"
            ) from None
        except InsufficientFunds as exc:
            raise web.HTTPError(402, str(exc)) from None
        except PaymentError as exc:
            raise web.HTTPError(409, str(exc)) from None
        except JupyterIOError as exc:
            raise web.HTTPError(502, str(exc)) from None
        self.reply(row)


class ProgressListHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """``{"launches": [...], "now": T}``; ``?since=T`` keeps those updated after T."""
        since_text = self.get_query_argument("since", None)
        since = None
        if since_text:
            try:
                since = float(since_text)
            except ValueError:
                raise web.HTTPError(400, "since must be Unix seconds, e.g. 1700000000.5") from None
        self.reply(self.io.progress_json(since))


class ProgressHandler(_Handler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        launch = self.io.progress.launch(kernel_id)
        if launch is None:
            raise web.HTTPError(
                404,
                f"no start of kernel {kernel_id} was seen (it is not a jupyter-io kernel, or "
                f"it started before this server)",
            )
        self.reply(launch)


class _CohortHandler(_Handler):
    async def answer(self, call: Any, *, changed: bool = False) -> None:
        """Reply with what ``call`` gives, or the coordinator's refusal with its status."""
        try:
            body = await call
        except CohortError as exc:
            raise web.HTTPError(exc.status, str(exc)) from None
        if changed:
            self.io.cohorts_changed()  # the cohort kernelspecs follow
        self.reply(body)


class CohortsHandler(_CohortHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """``{"coordinator_url", "cohorts": [... + "role", a student's + "me", "gpus"], "now"}``."""
        await self.answer(self.io.cohorts_json())


class CohortJoinHandler(_CohortHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Body ``{"code": "..."}``: a join code or a join link."""
        body = self.json_body()
        code = body.get("code") if isinstance(body, dict) else None
        if not isinstance(code, str) or not code.strip() or len(code) > 2000:
            raise web.HTTPError(
                400, 'send {"code": "..."} with the class\'s join code or its jupyter-io:join link'
            )
        await self.answer(self.io.cohorts.join(code.strip()), changed=True)


class CohortHandler(_CohortHandler):
    @web.authenticated
    @authorized
    async def get(self, cohort_id: str) -> None:
        await self.answer(self.io.cohorts.cohort_json(cohort_id))


class CohortDashboardHandler(_CohortHandler):
    @web.authenticated
    @authorized
    async def get(self, cohort_id: str) -> None:
        """The instructor's dashboard; ``?format=csv``: a CSV download, a row per student."""
        if self.get_query_argument("format", "json") != "csv":
            await self.answer(self.io.cohorts.dashboard(cohort_id))
            return
        try:
            text = await self.io.cohorts.dashboard_csv(cohort_id)
        except CohortError as exc:
            raise web.HTTPError(exc.status, str(exc)) from None
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header(
            "Content-Disposition", f'attachment; filename="cohort-{cohort_id}-week.csv"'
        )
        # APIHandler.finish would call it JSON.
        super(APIHandler, self).finish(text)


class CohortMemberHandler(_CohortHandler):
    @web.authenticated
    @authorized
    async def delete(self, cohort_id: str, student: str) -> None:
        await self.answer(self.io.cohorts.remove_student(cohort_id, student), changed=True)


class CohortTopUpHandler(_CohortHandler):
    @web.authenticated
    @authorized
    async def post(self, cohort_id: str) -> None:
        """Body ``{"lamports": N, "student": KEY|null}`` (null: every student)."""
        body = self.json_body()
        lamports = body.get("lamports") if isinstance(body, dict) else None
        student = body.get("student") if isinstance(body, dict) else None
        if isinstance(lamports, bool) or not isinstance(lamports, int) or lamports <= 0:
            raise web.HTTPError(400, 'send {"lamports": N} with N > 0')
        if student is not None and not isinstance(student, str):
            raise web.HTTPError(400, '"student" is a base58 public key, or null for every student')
        await self.answer(self.io.cohorts.top_up(cohort_id, student, lamports), changed=True)


def handlers() -> list[tuple[str, type[_Handler]]]:
    """The routes, relative to the base URL (the extension app prefixes it)."""
    routes: list[tuple[tuple[str, ...], type[_Handler]]] = [
        (("offers",), OffersHandler),
        (("preferences",), PreferencesHandler),
        (("wallet",), WalletHandler),
        (("wallet", "airdrop"), AirdropHandler),
        (("sessions",), SessionsHandler),
        (("sessions", r"(?P<kernel_id>[\w-]+)", "topup"), TopUpHandler),
        (("progress",), ProgressListHandler),
        (("progress", r"(?P<kernel_id>[\w-]+)"), ProgressHandler),
        (("cohorts",), CohortsHandler),
        (("cohorts", "join"), CohortJoinHandler),
        (("cohorts", _COHORT), CohortHandler),
        (("cohorts", _COHORT, "dashboard"), CohortDashboardHandler),
        (("cohorts", _COHORT, "members", r"(?P<student>\w+)"), CohortMemberHandler),
        (("cohorts", _COHORT, "topup"), CohortTopUpHandler),
    ]
    return [(url_path_join("/", URL_PREFIX, *parts), handler) for parts, handler in routes]
