"""Failover: a kernel whose provider is lost continues on another provider, same kernel id.

When the tunnel declares the provider lost (refused connections for ``refused_limit``
seconds, the relay saying it is gone, or the grace period run out), :class:`Failover`, with
the provisioner's ``failover`` trait on and a coordinator to lease from:

1. leases the same GPU class again (then each of ``fallback_gpus``), on the same terms (the
   price cap included), from any provider but the lost one;
2. funds the new lease as a start does (its own escrow) and winds the old one up in the
   background exactly as a restart after a loss does (``KernelLease.wind_up_lost``: the
   provider is paid up to the last acknowledged second, the user refunded the rest);
3. opens a tunnel session to the new provider *on the same local facade* (the ZMQ ports
   Jupyter's kernel manager and its clients talk to do not change, nor does the session key),
   starts the kernel there, pushes the notebook's directory again and restores the state
   journal (:func:`kernel_provisioner.journal.restore`);
4. tells the user: ``failover`` progress events (:mod:`kernel_provisioner.progress`) and one
   ``stream`` message (stderr) on the kernel's iopub naming the old and new provider, what
   came back, what did not and the cell that would recreate each.

While it runs the provisioner's ``poll()`` answers "running", so the kernel manager never sees
a dead kernel. When no other provider can be leased the kernel is declared dead and the old
lease refunded, as without failover. Requests a client sends meanwhile wait in the facade's
sockets and reach the new kernel once it is up (possibly before the journal is loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

from jupyter_io.errors import JupyterIOError
from jupyter_io.identity import load_keypair
from jupyter_io.latency import latencies
from jupyter_io.payments.amounts import format_sol
from jupyter_io.protocol import Channel

from .connection import LOST_EXIT_CODE, TunnelClient
from .journal import RestoreResult, restore
from .lease import KernelLease, LeaseRefused
from .progress import ProgressStep

__all__ = ["Failover", "FailoverImpossible", "notice_text"]

#: Seconds to ask the coordinator whether a lease whose session closed was ended on purpose.
_INFO_TIMEOUT = 10.0
#: Seconds between two lease requests while the coordinator still grants the lost provider.
_RETRY_S = 1.0


class FailoverImpossible(JupyterIOError):
    """No other provider could take the kernel over (the kernel is lost, as without
    failover)."""


class Failover:
    """The failover of one provisioner's kernel (see the module docstring)."""

    def __init__(self, provisioner: Any) -> None:
        """``provisioner``: the :class:`~kernel_provisioner.provisioner.RemoteKernelProvisioner`
        whose kernel this fails over (typed Any: importing it here would close an import
        circle; the failover drives its lease, session and report methods)."""
        self.prov = provisioner
        #: The failover under way (None: none).
        self.task: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        #: Sessions whose loss could not be failed over: they stay lost.
        self._given_up: set[int] = set()
        #: Sessions being watched for a loss.
        self._watched: set[int] = set()
        #: One dict per failover that finished (what :func:`notice_text` was given).
        self.done: list[dict[str, Any]] = []
        #: Set each time a failover finished, either way (``done`` grew, or it failed).
        self.finished = asyncio.Event()

    @property
    def enabled(self) -> bool:
        """Failover is on and there is a coordinator to lease from."""
        return bool(self.prov.failover and self.prov.coordinator_url)

    @property
    def running(self) -> bool:
        """A failover is under way: the kernel counts as running."""
        return self.task is not None and not self.task.done()

    def pending(self, client: TunnelClient) -> bool:
        """``client``'s lost session will be (or is being) failed over."""
        ident = id(client)
        if client.gone:  # the relay said the lease is over: ended on purpose, not lost
            return False
        return self.enabled and (
            self.running or (ident in self._watched and ident not in self._given_up)
        )

    def watch(self, client: TunnelClient) -> None:
        """Fail over when ``client``'s provider is lost (call once its kernel is ready)."""
        if not self.enabled:
            return
        self._watched.add(id(client))
        task = asyncio.ensure_future(self._watch(client))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def stop(self) -> None:
        """Cancel the watchers and a failover under way (the kernel is being shut down)."""
        tasks = [*self._watchers, *([self.task] if self.task is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.task = None

    async def _watch(self, client: TunnelClient) -> None:
        asking = asyncio.ensure_future(self._ask_coordinator(client))
        try:
            await client.wait_exited()
        finally:
            asking.cancel()
        if (
            client.dead_reason is None
            or client.ended
            or client.gone
            or client is not self.prov.tunnel
        ):
            return  # the kernel exited, or the session was closed or ended on purpose
        if await self._ended_at_the_coordinator():
            self._given_up.add(id(client))
            return  # its user, its budget or a class's time rules ended it: not a loss
        self.task = asyncio.ensure_future(self._run(client))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self.task)

    async def _ended_at_the_coordinator(self) -> bool:
        """Whether the coordinator ended the lease (``ended``, not ``failed``): the user did
        from elsewhere, the budget ran out, a class's idle, max-length or quota rule stopped
        it. The provider then closed the session on purpose, and leasing again would undo
        that. A coordinator that cannot say counts as not ended (a loss is failed over)."""
        lease = self.prov.lease
        if lease is None:
            return False
        try:
            info = await asyncio.wait_for(lease.info(), _INFO_TIMEOUT)
        except asyncio.TimeoutError:
            return False
        return info is not None and info.state == "ended"

    async def _ask_coordinator(self, client: TunnelClient) -> None:
        """While ``client``'s tunnel is down, ask the coordinator every
        ``failover_check_interval`` whether it failed the lease: a host that vanished
        without a word (no refused connection, resumes timing out) is then lost as soon as
        the coordinator misses its heartbeats, not after the whole grace period."""
        prov = self.prov
        lease = prov.lease
        interval = max(0.1, prov.failover_check_interval)
        while lease is not None and client.alive:
            await client.wait_for(lambda: not client.connected or not client.alive, None)
            await asyncio.sleep(interval)  # the coordinator's record changes on a timer
            if client.connected or not client.alive:
                continue
            info = await lease.info()
            if info is not None and info.state == "failed":
                grant = lease.grant
                client.declare_lost(
                    f"the coordinator failed lease {grant.lease if grant else '?'}: it lost "
                    f"the provider, and the tunnel is down"
                )
                return

    async def _run(self, old: TunnelClient) -> None:
        try:
            await self._fail_over(old)
            self.finished.set()
        except (JupyterIOError, OSError) as exc:
            self._given_up.add(id(old))
            prov = self.prov
            if prov.tunnel is not old:
                # It failed past the swap (the new provider did not start the kernel): no
                # session is left, and poll() reports the kernel lost.
                await prov._drop_session()
                prov._last_exit_code = LOST_EXIT_CODE
            prov._report(
                ProgressStep.FAILOVER,
                f"failover failed, the kernel is lost: {exc}",
                phase="failed",
                reason=str(exc),
            )
            self.finished.set()
        except asyncio.CancelledError:
            self._given_up.add(id(old))
            raise

    async def _fail_over(self, old: TunnelClient) -> None:
        prov = self.prov
        loop = asyncio.get_running_loop()
        started = loop.time()
        old_lease = prov.lease
        old_grant = old_lease.grant if old_lease is not None else None
        if old_lease is None or old_grant is None:
            raise FailoverImpossible("the kernel has no lease to replace")
        prov._report(
            ProgressStep.FAILOVER,
            f"provider {old_grant.provider} was lost ({old.dead_reason}); leasing "
            f"{old_grant.gpu} again",
            phase="lost",
            old_provider=old_grant.provider,
            old_lease=old_grant.lease,
            reason=old.dead_reason,
        )
        keypair = await asyncio.to_thread(load_keypair, prov.keypair_path)
        lease = await self._lease_again(keypair, old_grant.provider)
        grant = lease.grant
        assert grant is not None
        # From here the new lease is the kernel's; the old one is wound up as a restart
        # after a loss does it (refunded past the last acknowledged second).
        old_lease.stop_acknowledging()
        prov._lease = lease
        try:
            await prov._fund(lease)
        except BaseException:
            prov._lease = old_lease  # its cleanup refunds it as without failover
            raise
        prov._retire(old_lease)
        journal = prov.state_journal
        if journal is not None:
            await journal.close()  # re-attached to the new session below
        await old.close()
        assert prov._key is not None
        client = await prov._ensure_session(launch=(prov._key, prov._remote_env))
        files = prov.files
        if files is not None and files.enabled:
            files.start_sync()  # the notebook's directory, pushed as at a start
        prov._report(
            ProgressStep.LAUNCHING,
            f"starting the kernel on {prov._where()}",
            session=client.session_id,
        )
        answer = await client.launch(prov._key, prov._remote_env, prov.launch_timeout)
        if files is not None:
            await files.wait_synced(prov.files_timeout)
        lease.mark_ready()
        prov._acknowledge_while_connected(lease, client)
        prov._report(
            ProgressStep.READY,
            f"kernel ready on {prov._where()} (session {client.session_id}, generation "
            f"{answer.generation}, pid {answer.pid})",
            session=client.session_id,
            generation=answer.generation,
            pid=answer.pid,
        )
        self.watch(client)
        result, why = await self._restore()
        facts: dict[str, Any] = {
            "old_provider": old_grant.provider,
            "old_lease": old_grant.lease,
            "new_provider": grant.provider,
            "new_lease": grant.lease,
            "gpu": grant.gpu,
            "price_lamports_per_hour": grant.price_lamports_per_hour,
            "restored": result.restored if result is not None else [],
            "missing": result.missing if result is not None else [],
            "journal": why,
            "files": files is not None and files.enabled,
            "seconds": round(loop.time() - started, 3),
        }
        self.done.append(facts)
        text = notice_text(facts)
        prov._report(ProgressStep.FAILOVER, text, phase="done", **facts)
        await self._tell_clients(text)

    async def _lease_again(self, keypair: Any, lost: str) -> KernelLease:
        """A granted (not yet funded) lease of the same class, or of a fallback, from a
        provider other than ``lost``."""
        prov = self.prov
        loop = asyncio.get_running_loop()
        deadline = loop.time() + prov.failover_timeout
        terms = prov.lease_terms
        classes = [terms.gpu, *(g.strip() for g in prov.fallback_gpus if g.strip())]
        refusals: list[str] = []
        for gpu in dict.fromkeys(classes):
            wanted = dataclasses.replace(terms, gpu=gpu)
            while True:
                lease = prov._new_lease(keypair)
                try:
                    measured = await prov._measure_latency(lease, wanted)
                    grant = await lease.request(wanted, latencies(measured.values()))
                except LeaseRefused as exc:
                    await lease.close()
                    refusals.append(f"{gpu or 'any GPU'}: {exc}")
                    break
                except BaseException:
                    await lease.close()
                    raise
                if grant.provider != lost:
                    prov.latency = measured.get(grant.provider)
                    prov._report(
                        ProgressStep.LEASED,
                        f"leased {grant.gpu} from provider {grant.provider} at "
                        f"{format_sol(grant.price_lamports_per_hour)}/h"
                        f"{' through the relay' if grant.relay else ''} (lease {grant.lease}, "
                        f"failover)",
                        lease=grant.lease,
                        provider=grant.provider,
                        gpu=grant.gpu,
                        gpu_indices=list(grant.gpu_indices),
                        price_lamports_per_hour=grant.price_lamports_per_hour,
                        relay=grant.relay,
                        failover=True,
                    )
                    return lease
                # The coordinator has not noticed the loss yet: give it back, ask again.
                with contextlib.suppress(JupyterIOError):
                    await lease.release(prov.end_timeout)
                await lease.close()
                if loop.time() + _RETRY_S > deadline:
                    refusals.append(f"{gpu or 'any GPU'}: only the lost provider offers it")
                    break
                await asyncio.sleep(_RETRY_S)  # the coordinator's record changes on a timer
        raise FailoverImpossible("no other provider could take the kernel: " + "; ".join(refusals))

    async def _restore(self) -> tuple[RestoreResult | None, str]:
        """Load the journal into the new kernel; (result, what happened in words)."""
        prov = self.prov
        journal = prov.state_journal
        if journal is None:
            return None, "the state journal is off for this kernel"
        if journal.complete is None:
            return None, "no state journal had come back before the provider was lost"
        kc = AsyncKernelClient()
        kc.load_connection_info(prov.connection_info)
        kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
        try:
            result = await restore(journal, kc, timeout=prov.failover_timeout)
        except (JupyterIOError, OSError, asyncio.TimeoutError) as exc:
            prov.log.warning("jupyter-io: the state journal was not restored: %s", exc)
            return None, f"the state journal could not be restored: {exc}"
        finally:
            kc.stop_channels()
        return result, "restored"

    async def _tell_clients(self, text: str) -> None:
        """One stderr ``stream`` message on the kernel's iopub, signed with the session
        key, for every client of the kernel (the notebook, a console) to show."""
        facade = self.prov._facade
        if facade is None or facade.session is None or Channel.IOPUB not in facade.sockets:
            return
        session = facade.session
        msg = session.msg("stream", content={"name": "stderr", "text": text + "\n"})
        frames = session.serialize(msg, ident=b"stream.stderr")
        await facade.sockets[Channel.IOPUB].send_multipart(frames)


def notice_text(facts: dict[str, Any]) -> str:
    """The user's notice of one failover (``facts`` as :attr:`Failover.done` keeps them)."""
    lines = [
        f"jupyter-io: provider {facts['old_provider']} was lost; this kernel continues on "
        f"provider {facts['new_provider']} ({facts['gpu']}, "
        f"{format_sol(facts['price_lamports_per_hour'])}/h, lease {facts['new_lease']}) "
        f"after {facts['seconds']:.1f} s. The old lease {facts['old_lease']} is refunded "
        f"past its last acknowledged second.",
    ]
    if facts["journal"] != "restored":
        lines.append(f"Variables: none restored ({facts['journal']}).")
    else:
        restored = facts["restored"]
        lines.append(
            f"Restored from the state journal written by provider {facts['old_provider']}: "
            + (", ".join(restored) if restored else "nothing")
        )
    missing = facts["missing"]
    if missing:
        lines.append("Not restored; re-run the cell that made each:")
        for item in missing:
            cell = item.get("cell")
            source = str(item.get("source") or "").strip()
            where = f"cell [{cell}]" if cell is not None else "an unknown cell"
            lines.append(f"  {item['name']} ({item.get('why', 'not kept')}), {where}:")
            lines.extend(f"    {line}" for line in source.splitlines() or ["(no source)"])
    if facts.get("files"):
        lines.append("The notebook's files were pushed to the new provider again.")
    return "\n".join(lines)
