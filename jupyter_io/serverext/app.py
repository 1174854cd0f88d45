"""The jupyter-io server extension: GPU offers, preferences, wallet, sessions, progress.

Enabled by the shipped ``jupyter_server_config.d/jupyter_io.json``; configured with
``c.JupyterIOExtension.*`` (or ``--JupyterIOExtension.coordinator_url=...`` on the
command line of ``jupyter lab``). What it does, by hook:

- **initialize**: puts :class:`~jupyter_io.serverext.kernelspecs.GPUKernelSpecManager` in
  place of the server's plain kernelspec manager (unless another manager class is
  configured: then it logs why and leaves it), creates the services (offers catalog,
  preferences store, wallet, progress board), hooks the progress log filter onto the
  server's logger, adds the REST handlers (:mod:`jupyter_io.serverext.handlers`);
- **start**: refreshes the offers in the background so the GPU kernelspecs follow the market;
- **stop**: undoes all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Float, List, TraitError, Unicode, default, validate

from kernel_provisioner.provisioner import RemoteKernelProvisioner

from .. import __version__
from ..coordinator_client import CoordinatorClient, LeaseInfo
from ..errors import ConfigError, JupyterIOError
from ..identity import DEFAULT_KEYPAIR_PATH
from ..kernelspec import lease_kernel_json, validate_coordinator_url
from ..latency import shared_prober
from ..payments.hooks import SolanaEscrowHook
from .billing import LeaseBook
from .cohorts import CohortDesk, cohort_kernel_json, cohort_kernelspecs, parse_cohort_spec_name
from .files import file_handlers
from .handlers import ExtensionServices, handlers
from .kernelspecs import (
    DIRECT_PREFIX,
    SPEC_PREFIX,
    GPUKernelSpecManager,
    adopt_kernel_spec_manager,
    direct_kernelspecs,
    direct_provider,
    gpu_kernelspecs,
    with_price_max,
)
from .latency import LatencyBoard
from .offers import CoordinatorUnavailable, OffersCatalog
from .preferences import Preferences, PreferencesError, PreferencesStore
from .progress import ProgressBoard, ProgressLogFilter
from .sessions import list_sessions, stopped_json
from .wallet import Wallet

__all__ = ["JupyterIOExtension"]

#: While a lease of ours settles (its kernel gone, its escrow not closed yet), its billing is
#: asked for this often, so the wallet shows the refund within a second or two of it.
SETTLE_POLL_SECONDS = 0.5
#: ... for at most this long after its kernel went away (a settlement retried for longer,
#: a provider lost, is left to the normal polls).
SETTLE_WATCH_SECONDS = 60.0


def _settled(info: LeaseInfo) -> bool:
    """Whether nothing more will move for lease ``info``: it ended and its escrow, if it
    had one, was settled or refunded (or failed to be)."""
    if info.live:
        return False
    settlement = info.billing.settlement if info.billing is not None else None
    escrowed = info.escrow is not None and info.escrow.required
    return not escrowed or (settlement is not None and settlement.state in ("done", "failed"))


def _settlement_state(info: LeaseInfo) -> tuple[str, str, int]:
    """What of a lease moves the wallet or what is free: its state, its settlement's, its
    deposit (a top-up)."""
    billing = info.billing
    settlement = billing.settlement if billing is not None else None
    return (
        info.state,
        settlement.state if settlement is not None else "",
        billing.deposit_lamports if billing is not None else 0,
    )


class JupyterIOExtension(ExtensionApp):
    """GPU kernels in JupyterLab: see the module docstring."""

    name = "jupyter_io"
    description = "jupyter-io: remote GPU kernels, their offers, cost and launch progress"
    version = __version__
    load_other_extensions = True

    coordinator_url = Unicode(
        "",
        config=True,
        help="The marketplace coordinator, http(s)://HOST:PORT. GPU kernelspecs and the "
        "picker's offers come from it; empty: no GPU kernelspecs.",
    )
    keypair_path = Unicode(
        DEFAULT_KEYPAIR_PATH,
        config=True,
        help="Solana keypair file GPU kernels lease with (and whose address the wallet shows).",
    )
    offers_cache_seconds = Float(
        3.0, config=True, help="Seconds the coordinator's offers are reused before asking again."
    )
    offers_refresh_seconds = Float(
        15.0,
        config=True,
        help="Seconds between background refreshes of the offers (the GPU kernelspecs follow "
        "them); 0: refresh only when the picker asks.",
    )
    coordinator_timeout = Float(
        10.0, config=True, help="Seconds allowed for one request to the coordinator."
    )
    billing_cache_seconds = Float(
        2.0,
        config=True,
        help="Seconds the coordinator's billing of the user's leases (escrow left, warnings) "
        "is reused before asking again.",
    )
    solana_rpc_url = Unicode(
        "",
        config=True,
        help="Solana JSON-RPC URL the wallet's balance is read from (a cluster, a local "
        "validator, or the demo's embedded ledger); empty: balance unknown.",
    )
    preferences_path = Unicode(
        config=True,
        help="JSON file holding the user's GPU preferences (price cap, region, budget); "
        "default JUPYTER_DATA_DIR/io/preferences.json.",
    )
    gpu_kernelspecs = Bool(
        True,
        config=True,
        help="Offer one kernelspec per GPU type on offer (installs GPUKernelSpecManager).",
    )
    direct_providers = List(
        Dict(),
        config=True,
        help="Provider hosts to offer as kernels of their own, reached directly (no "
        "coordinator, no lease; the host admits the keypair by its allow-list): a list of "
        '{"name": "gpu-box", "url": "wss://gpu-box:8765/tunnel", "display_name": "...", '
        '"pubkey": "<host key, base58>"} (display_name and pubkey optional). Each becomes '
        "the kernelspec jupyter-io-direct-NAME.",
    )
    pending_kernels = Bool(
        True,
        config=True,
        help="Let clients connect to a kernel while it starts (the server's "
        "MappingKernelManager.use_pending_kernels, unless that is configured): a remote "
        "kernel's start takes seconds (a lease, a tunnel, the provider's own start), and "
        "without it JupyterLab drops a cell run before the start is over instead of queueing it.",
    )

    @validate("direct_providers")
    def _check_direct_providers(self, proposal: Any) -> list[dict[str, str]]:
        checked = []
        for entry in proposal["value"]:
            try:
                checked.append(direct_provider(entry))
            except ConfigError as exc:
                raise TraitError(f"JupyterIOExtension.direct_providers: {exc}") from None
        names = [p["name"] for p in checked]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise TraitError(
                f"JupyterIOExtension.direct_providers: two providers named {', '.join(twice)}"
            )
        return checked

    @default("preferences_path")
    def _preferences_path_default(self) -> str:
        return str(Path(jupyter_data_dir(), "io", "preferences.json"))

    @validate("coordinator_url")
    def _check_coordinator_url(self, proposal: Any) -> str:
        url = str(proposal["value"]).strip()
        if not url:
            return ""
        try:
            return validate_coordinator_url(url)
        except ConfigError as exc:
            raise TraitError(f"JupyterIOExtension.coordinator_url: {exc}") from None

    # -- hooks -----------------------------------------------------------------------------

    def initialize_settings(self) -> None:
        self.catalog = OffersCatalog(
            self.coordinator_url, ttl=self.offers_cache_seconds, timeout=self.coordinator_timeout
        )
        #: Round trips from here for the picker (the provisioner's cache: the same figures).
        self.latency_board = LatencyBoard(shared_prober(), on_measured=self._latency_measured)
        # An unchosen budget is the one the kernels' escrow hook takes: its configured
        # max_session_hours (DEFAULT_SESSION_HOURS unless c.SolanaEscrowHook sets it).
        assert self.serverapp is not None
        hook_budget = SolanaEscrowHook(config=self.serverapp.config).max_session_hours
        self.preferences_store = PreferencesStore(self.preferences_path, hook_budget)
        try:
            self.preferences = self.preferences_store.load()
        except PreferencesError as exc:
            self.log.warning("jupyter-io: %s; using no preferences until they are saved", exc)
            self.preferences = self.preferences_store.defaults()
        self.wallet = Wallet(self.keypair_path, self.solana_rpc_url)
        self.lease_book = LeaseBook(
            self.coordinator_url,
            self.keypair_path,
            ttl=self.billing_cache_seconds,
            timeout=self.coordinator_timeout,
        )
        #: kernel id → the leases its sessions held (so a lease the coordinator ended for
        #: its budget can be told to the kernel's page).
        self._kernel_leases: dict[str, set[str]] = {}
        self.cohorts = CohortDesk(
            self.coordinator_url, self.keypair_path, timeout=self.coordinator_timeout
        )
        self.progress = ProgressBoard()
        self.progress.listeners.append(lambda _event: self.changed())
        #: Bumped whenever what the picker shows may have changed (see :meth:`changed`).
        self.changes = 0
        self._fingerprint: tuple[Any, ...] = ((), ())  # no kernel, no lease
        #: lease id → time.monotonic() its kernel was last listed, until it is settled.
        self._unsettled: dict[str, float] = {}
        self._progress_filter = ProgressLogFilter(self.progress)
        # The provisioner logs through its kernel manager, whose logger is the server's.
        assert self.serverapp is not None
        self._progress_logger = self.serverapp.log
        self._progress_logger.addFilter(self._progress_filter)
        self._remembered: dict[str, dict[str, Any]] = {}
        if self.pending_kernels:
            self._use_pending_kernels()
        self._refresher: asyncio.Task[None] | None = None
        self.kernel_spec_manager: GPUKernelSpecManager | None = None
        if self.gpu_kernelspecs:
            self.kernel_spec_manager = adopt_kernel_spec_manager(self.serverapp, self.settings)
            if self.kernel_spec_manager is not None:
                self.kernel_spec_manager.gpu_specs = self
        if self.coordinator_url:
            self.log.info(
                "jupyter-io: GPU offers from the coordinator at %s, leased with the keypair %s",
                self.coordinator_url,
                self.keypair_path,
            )
        else:
            self.log.info(
                "jupyter-io: no coordinator configured, so no GPU kernelspecs "
                "(--JupyterIOExtension.coordinator_url=http://HOST:8700)"
            )

    def _use_pending_kernels(self) -> None:
        """Turn on pending kernels unless the user configured them either way.

        ``POST /api/kernels`` (and ``/api/sessions``) then answers at once with a kernel in
        state ``starting``; its websocket opens when the kernel is ready (Jupyter Server
        awaits the kernel manager's ``ready``), and JupyterLab queues what is sent meanwhile,
        as it does during a local kernel's second of start.
        """
        assert self.serverapp is not None
        manager = self.serverapp.kernel_manager
        if not manager.has_trait("use_pending_kernels"):
            return
        config = self.serverapp.config
        for section in ("MappingKernelManager", "AsyncMultiKernelManager", "MultiKernelManager"):
            if section in config and "use_pending_kernels" in config[section]:
                return
        manager.use_pending_kernels = True  # type: ignore[attr-defined]

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())
        self.handlers.extend(file_handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        self._stop_gracefully_on_sigint(serverapp)
        if self.catalog.configured and self.gpu_kernelspecs:
            self._refresher = asyncio.create_task(self._refresh_offers())

    def _stop_gracefully_on_sigint(self, serverapp: Any) -> None:
        """Without a terminal, Jupyter Server leaves SIGINT to Python: a KeyboardInterrupt
        that exits without shutting kernels down. A remote kernel's lease would then run on
        until the provider's grace period, unsettled; so SIGINT stops the server as SIGTERM
        does (kernels shut down, leases ended and settled), as JupyterHub configures it. With
        a terminal, the server's own Ctrl-C confirmation stays. Not undone at stop: a second
        SIGINT during the shutdown must not cut it short."""
        stop = getattr(serverapp, "_signal_stop", None)
        if stop is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, stop)

    async def stop_extension(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        self._progress_logger.removeFilter(self._progress_filter)
        self.progress.close()
        self.catalog.close()
        self.latency_board.close()
        self.lease_book.close()
        self.cohorts.close()
        self.wallet.close()

    async def _refresh_offers(self) -> None:
        """Keep the offers (and so the GPU kernelspecs) fresh; log the coordinator going
        away and coming back once each, not every time."""
        failing = False
        while True:
            try:
                await self.catalog.get(max_age=self.offers_refresh_seconds / 2)
            except CoordinatorUnavailable as exc:
                if not failing:
                    self.log.warning(
                        "jupyter-io: %s; the GPU kernelspecs stay as they were until it answers",
                        exc,
                    )
                failing = True
            else:
                if failing:
                    self.log.info("jupyter-io: the coordinator at %s answers again",
                                  self.coordinator_url)  # fmt: skip
                failing = False
            if self.offers_refresh_seconds <= 0:
                return
            await asyncio.sleep(self.offers_refresh_seconds)

    # -- GPU kernelspecs (the source GPUKernelSpecManager reads) ---------------------------

    def specs(self) -> dict[str, dict[str, Any]]:
        """The kernelspecs to list: one per configured direct provider, and one per GPU type
        in the latest offers."""
        keypair = str(Path(self.keypair_path).expanduser().absolute())
        found = direct_kernelspecs(self.direct_providers, keypair_path=keypair)
        snapshot = self.catalog.latest
        if snapshot is None or not self.coordinator_url:
            return found
        current = gpu_kernelspecs(
            with_price_max(snapshot.types, snapshot.providers),
            coordinator_url=self.coordinator_url,
            keypair_path=keypair,
            preferences=self.preferences,
        )
        current.update(
            cohort_kernelspecs(
                self.cohorts.latest,
                snapshot.types,
                coordinator_url=self.coordinator_url,
                keypair_path=keypair,
            )
        )
        self._remembered.update(current)
        return {**current, **found}

    def spec(self, name: str) -> dict[str, Any] | None:
        """The GPU kernelspec ``name`` to start a kernel with: on offer now, seen earlier in
        this server's life, or (any ``jupyter-io-*`` name) made from the name, so a
        notebook saved with a GPU type that is gone still starts, and the coordinator
        answers with what is on offer instead of Jupyter's bare "no such kernel"."""
        current = self.specs()
        if name in current:
            return current[name]
        if not self.coordinator_url or name.startswith(DIRECT_PREFIX):
            return None
        if name in self._remembered:
            return self._remembered[name]
        cohort = parse_cohort_spec_name(name)
        if cohort is not None:
            # A notebook saved with a class's kernel, opened before the cohorts were listed:
            # the coordinator says whether the user may still lease for that class.
            cohort_id, gpu = cohort
            return cohort_kernel_json(
                cohort_id,
                cohort_id,
                gpu,
                gpu,
                coordinator_url=self.coordinator_url,
                keypair_path=str(Path(self.keypair_path).expanduser().absolute()),
            )
        if not name.startswith(SPEC_PREFIX) or len(name) == len(SPEC_PREFIX):
            return None
        gpu = name[len(SPEC_PREFIX) :]
        spec = lease_kernel_json(
            self.coordinator_url,
            str(Path(self.keypair_path).expanduser().absolute()),
            f"{gpu} · jupyter-io",
            gpu=gpu,
            max_price_per_hour=self.preferences.max_price_per_hour,
            region=self.preferences.region,
            max_latency_ms=self.preferences.max_latency_ms or 0,
            min_reliability=self.preferences.min_reliability or 0,
        )
        if self.preferences.chosen_budget_hours is not None:
            config = spec["metadata"]["kernel_provisioner"]["config"]
            config["max_session_hours"] = self.preferences.session_budget_hours
        return spec

    # -- what the handlers serve -----------------------------------------------------------

    async def offers_json(self) -> dict[str, Any]:
        """The body of ``GET /jupyter-io/offers``: the coordinator's offers, each GPU type
        with the kernelspec that starts a kernel on it and whether it is within the cap."""
        snapshot = await self.catalog.get()
        names = {
            spec["metadata"]["jupyter_io"]["gpu"]: (name, spec["display_name"])
            for name, spec in self.specs().items()
            if "gpu" in spec["metadata"]["jupyter_io"]
        }
        cap = self.preferences.max_price_lamports_per_hour
        types = []
        for row in with_price_max(snapshot.types, snapshot.providers):
            name, display = names.get(row.get("gpu"), (None, None))
            price = row.get("price_min")
            types.append(
                {
                    **row,
                    "kernel_name": name,
                    "display_name": display,
                    # None free means no price to compare: not "above the cap".
                    "within_cap": cap is None or price is None or price <= cap,
                }
            )
        types, providers = self.latency_board.annotate(types, snapshot.providers)
        return {
            "coordinator_url": snapshot.coordinator_url,
            "fetched_at": snapshot.fetched_at,
            "types": types,
            "providers": providers,
            "preferences": self.preferences.to_json(),
            "gpu_kernelspecs": self.kernel_spec_manager is not None,
        }

    async def wallet_json(self) -> dict[str, Any]:
        """The body of ``GET /jupyter-io/wallet``; the ledger is the coordinator's (its
        ``solana_url``, the embedded one at ``{coordinator}/solana`` by default) unless
        ``solana_rpc_url`` names another."""
        await self._find_ledger()
        return await self.wallet.info()

    async def airdrop(self, lamports: int) -> str:
        await self._find_ledger()
        signature = await self.wallet.airdrop(lamports)
        self.changed()
        return signature

    async def _find_ledger(self) -> None:
        if self.wallet.rpc_url or self.solana_rpc_url or not self.coordinator_url:
            return
        client = CoordinatorClient(self.coordinator_url, timeout=self.coordinator_timeout)
        try:
            payments = await client.payments()
        except JupyterIOError as exc:
            self.log.debug("jupyter-io: cannot ask the coordinator for its ledger: %s", exc)
            return  # asked again next time
        finally:
            client.close()
        if payments.solana_url:
            self.wallet.rpc_url = payments.solana_url
            self.log.info(
                "jupyter-io: the wallet's ledger is the coordinator's, %s", payments.solana_url
            )

    async def top_up(self, kernel_id: str, lamports: int) -> dict[str, Any]:
        """Add ``lamports`` from the wallet to the escrow of kernel ``kernel_id``'s lease
        (one transaction the user signs) and have the coordinator count it; returns the
        kernel's session row. Raises KeyError for a kernel that is not a running remote one,
        :class:`~jupyter_io.errors.PaymentError` (:class:`InsufficientFunds` when the wallet
        is short) when the escrow cannot be topped up."""
        assert self.serverapp is not None
        manager = self.serverapp.kernel_manager
        km = manager.get_kernel(kernel_id) if kernel_id in manager else None
        provisioner = getattr(km, "provisioner", None)
        if not isinstance(provisioner, RemoteKernelProvisioner) or provisioner.lease is None:
            raise KeyError(kernel_id)
        # Through the provisioner: it runs the lease on the tunnel's own loop where it has one.
        await provisioner.top_up(lamports)
        self.changed()
        body = await self.sessions_json()
        for row in body["sessions"]:
            if row["kernel_id"] == kernel_id:
                return dict(row)
        raise KeyError(kernel_id)

    def set_preferences(self, body: Any) -> Preferences:
        """Validate, store and apply new preferences (the GPU kernelspecs follow at once)."""
        preferences = self.preferences.updated(body)
        try:
            self.preferences_store.save(preferences)
        except OSError as exc:
            raise PreferencesError(
                f"cannot save the preferences to {self.preferences_store.path}: {exc}"
            ) from None
        self.preferences = preferences
        self.changed()  # the cap moves which offers are within it
        return preferences

    def _latency_measured(self) -> None:
        """New round trips are in: the browser fetches the offers again (``version``)."""
        self.changes += 1

    def changed(self) -> None:
        """Something that moves offers, wallet or sessions happened (a start's step, a
        kernel's end, a settlement, a top-up, an airdrop): bump :attr:`changes`, which
        ``GET sessions`` carries as ``version``, so the browser fetches the offers and the
        wallet again; the next fetches of offers and billing ask the coordinator afresh."""
        self.changes += 1
        self.catalog.invalidate()
        self.lease_book.invalidate()

    def _billing_age(
        self, rows: list[dict[str, Any]], leases: dict[str, LeaseInfo]
    ) -> float | None:
        """How old the billing of our leases may be for this answer; None: no need to ask
        (no remote kernel, no lease of ours still settling), so an idle Lab costs the
        coordinator nothing however often it polls."""
        now = time.monotonic()
        for row in rows:
            if row["lease"]:
                self._unsettled[row["lease"]] = now
        listed = {row["lease"] for row in rows}
        # A coordinator that just failed to answer is asked again no sooner than usual.
        soonest = 0.0 if self.lease_book.error is None else self.lease_book.ttl
        if any(lease and lease not in leases for lease in listed):
            return soonest  # a lease newer than the cached billing: ask rather than show none
        settling = False
        for lease, seen in list(self._unsettled.items()):
            info = leases.get(lease)
            if info is not None and _settled(info):
                del self._unsettled[lease]
            elif lease not in listed:
                if now - seen > SETTLE_WATCH_SECONDS:
                    del self._unsettled[lease]  # left to the wallet's own polls
                else:
                    settling = True
        if settling:
            return max(soonest, SETTLE_POLL_SECONDS)
        return self.lease_book.ttl if rows else None

    async def sessions_json(self) -> dict[str, Any]:
        """The body of ``GET /jupyter-io/sessions``: the remote kernels with their cost and
        escrow (``sessions``), the leases the coordinator ended because their deposit was
        spent (``stopped``, with what to do), why the billing is missing, if it is, and
        ``version``, which changes when offers or the wallet may have (see :meth:`changed`).

        Cheap enough to poll every second: it asks the coordinator only while a remote
        kernel runs (at most every ``billing_cache_seconds``) or one of ours settles."""
        assert self.serverapp is not None
        manager = self.serverapp.kernel_manager
        leases = self.lease_book.leases
        sessions = list_sessions(manager, self.preferences, leases=leases)
        max_age = self._billing_age(sessions, leases)
        if max_age is not None:
            leases = await self.lease_book.get(max_age=max_age)
            sessions = list_sessions(manager, self.preferences, leases=leases)
        for row in sessions:
            if row["lease"]:
                self._kernel_leases.setdefault(row["kernel_id"], set()).add(row["lease"])
        fingerprint = (
            tuple((row["kernel_id"], row["state"], row["lease"]) for row in sessions),
            tuple(sorted((lease, *_settlement_state(info)) for lease, info in leases.items())),
        )
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self.changed()
        stopped = []
        for kernel_id, lease_ids in self._kernel_leases.items():
            for lease_id in lease_ids:
                info = leases.get(lease_id)
                if info is not None and info.budget_exhausted:
                    stopped.append(stopped_json(kernel_id, info))
        return {
            "sessions": sessions,
            "stopped": stopped,
            "billing_error": self.lease_book.error,
            "version": self.changes,
            "now": time.time(),
        }

    def progress_json(self, since: float | None) -> dict[str, Any]:
        return {"launches": self.progress.launches(since), "now": time.time()}

    async def cohorts_json(self) -> dict[str, Any]:
        """The body of ``GET /jupyter-io/cohorts`` (:meth:`.CohortDesk.cohorts_json`), each
        student cohort's GPU types joined with the latest offers (what is free now)."""
        try:
            types = with_price_max(*(await self._offer_rows()))
        except (CoordinatorUnavailable, ConfigError):
            types = []
        return await self.cohorts.cohorts_json(types)

    async def _offer_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        snapshot = await self.catalog.get()
        return list(snapshot.types), list(snapshot.providers)

    def cohorts_changed(self) -> None:
        """A join, a removal, a top-up: list the cohorts (and their kernelspecs) afresh."""
        self.cohorts.invalidate()
        self.changed()


# The handlers know the app only as the services they call; mypy holds the app to them.
_SERVICES: type[ExtensionServices] = JupyterIOExtension
