"""The ``jupyter io`` command line: a traitlets application with one sub-command per job.

The commands here only parse options and call the module that does the work
(:mod:`jupyter_io.kernelspec`, :mod:`jupyter_io.demo`, :mod:`provider_host`). Sub-commands
are named by import string and imported only when run, so ``jupyter io kernelspec`` never
imports the provider's code (nor torch). To add one, add a line to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Float, Int, TraitError, Unicode

from . import __version__
from .demo import Demo
from .demo_cohort import CohortDemo
from .errors import JupyterIOError
from .identity import DEFAULT_KEYPAIR_PATH
from .options import flag_names
from .payments.amounts import DEFAULT_SESSION_HOURS

__all__ = [
    "SUBCOMMANDS",
    "DemoApp",
    "IOCommand",
    "InstallKernelspecApp",
    "JupyterIOApp",
    "KernelspecApp",
    "KeygenApp",
    "ListKernelspecsApp",
    "RemoveKernelspecApp",
    "main",
]

#: ``jupyter io NAME``: (the application class, as an import string; one line of help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "provider": (
        "provider_host.app.ProviderApp",
        "Run a provider host: serve kernels on this machine's GPUs (or CPU) over tunnels.",
    ),
    "kernelspec": (
        "jupyter_io.app.KernelspecApp",
        "Install, list or remove kernelspecs whose kernels run on a provider.",
    ),
    "demo": (
        "jupyter_io.app.DemoApp",
        "Run a coordinator, a provider joined to it, their kernelspecs and JupyterLab on this "
        "machine, all in one.",
    ),
    "coordinator": (
        "jupyter_io.coordinator.app.CoordinatorApp",
        "Run the marketplace coordinator: provider links, offers, leases, relay.",
    ),
    "ledger": (
        "jupyter_io.coordinator.ledger_app.LedgerApp",
        "Serve the embedded Solana ledger on its own, for coordinator replicas sharing it.",
    ),
    "wallet": (
        "jupyter_io.payments.wallet_app.WalletApp",
        "Your Solana wallet: address, balance, airdrop (on the embedded ledger).",
    ),
    "offers": (
        "jupyter_io.coordinator.app.OffersApp",
        "Show the GPUs on offer at a coordinator (--json for scripts).",
    ),
    "cohort": (
        "jupyter_io.cohort_app.CohortApp",
        "Classroom cohorts: create one, join with a code, quotas, roster, dashboard.",
    ),
    "files": (
        "jupyter_io.files_app.FilesApp",
        "A remote kernel's files: status, pull large ones back, push local edits now.",
    ),
    "keygen": (
        "jupyter_io.app.KeygenApp",
        "Create a Solana keypair file (the Solana CLI's format) and print its public key.",
    ),
}


class _CommandGroup(JupyterApp):
    """A command whose only job is to dispatch to its sub-commands."""

    version = __version__
    aliases: dict[str, Any] = {}
    flags: dict[str, Any] = {}

    def start(self) -> None:
        if self.subapp is None:
            print(f"No sub-command given. Use one of: {', '.join(self.subcommands)}\n")
            self.print_description()
            self.print_subcommands()
            self.exit(1)
        else:
            self.subapp.start()


class IOCommand(JupyterApp):
    """Base of the commands that do something: :meth:`run` does it; a
    :class:`~jupyter_io.errors.JupyterIOError` becomes its message and exit status 1."""

    version = __version__

    def run(self) -> int | None:
        """Do the command's work; return its exit status (None for 0)."""
        raise NotImplementedError

    def update_config(self, config: Any) -> None:
        # A bad value names the flag the user typed (--timeout), not the trait (timeout).
        try:
            super().update_config(config)
        except TraitError as exc:
            raise TraitError(flag_names(str(exc), self.aliases)) from None

    def start(self) -> None:
        try:
            status = self.run()
        except (JupyterIOError, TraitError) as exc:
            message = flag_names(str(exc), self.aliases) if isinstance(exc, TraitError) else exc
            print(f"{self.name}: error: {message}", file=sys.stderr)
            self.exit(1)
        if status:
            self.exit(status)


class InstallKernelspecApp(IOCommand):
    """``jupyter io kernelspec install``"""

    name = "jupyter io kernelspec install"
    description = (
        "Install a kernelspec whose kernels run on a jupyter-io provider: one named provider "
        "(--provider-url), or a GPU leased through a coordinator (--coordinator, --gpu)."
    )
    examples = """jupyter io kernelspec install --name gpu-box \
    --provider-url ws://gpu-box:8765/tunnel --keypair ~/.config/solana/id.json --user
jupyter io kernelspec install --name rtx-4090 --coordinator http://127.0.0.1:8700 \
    --gpu "RTX 4090" --max-price 0.5 --budget 2 --user"""

    kernel_name = Unicode("jupyter-io", help="Name of the kernelspec.").tag(config=True)
    display_name = Unicode(
        "", help="Name shown in Jupyter's launcher (default: from the provider's address)."
    ).tag(config=True)
    provider_url = Unicode(
        "", help="The provider's tunnel URL, ws://HOST:PORT/tunnel or wss://..."
    ).tag(config=True)
    coordinator = Unicode(
        "", help="Lease through this coordinator, http(s)://HOST:PORT, instead of one provider."
    ).tag(config=True)
    gpu = Unicode("", help="With --coordinator: the GPU type to lease, e.g. 'RTX 4090'.").tag(
        config=True
    )
    max_price = Unicode(
        "", help="With --coordinator: the most to pay per GPU-hour, in SOL (e.g. 0.5)."
    ).tag(config=True)
    region = Unicode("", help="With --coordinator: lease only in this region.").tag(config=True)
    min_vram = Float(0.0, help="With --coordinator: the least GPU memory to lease, GiB.").tag(
        config=True
    )
    budget = Float(
        0.0,
        help="With --coordinator: the session budget, in hours of GPU time each session's "
        "escrow covers (deposit = price * hours; the coordinator stops the kernel when they "
        f"are spent). Default: {DEFAULT_SESSION_HOURS:g} h, the escrow hook's "
        "max_session_hours (as in Lab's Session budget setting).",
    ).tag(config=True)
    keypair_path = Unicode(
        DEFAULT_KEYPAIR_PATH,
        help="Your Solana keypair file; the provider must allow its public key.",
    ).tag(config=True)
    provider_pubkey = Unicode(
        "",
        help="With --provider-url: the provider's host key (base58; the provider prints it "
        "at start-up). Only a host proving it gets the session; empty accepts any host.",
    ).tag(config=True)
    user = Bool(False, help="Install for the current user only.").tag(config=True)
    prefix = Unicode(
        "", help="Install under PREFIX/share/jupyter/kernels (e.g. an environment)."
    ).tag(config=True)
    replace = Bool(
        False, help="Overwrite a kernelspec of the same name that is not a jupyter-io one."
    ).tag(config=True)

    aliases = {
        "name": "InstallKernelspecApp.kernel_name",
        "display-name": "InstallKernelspecApp.display_name",
        "provider-url": "InstallKernelspecApp.provider_url",
        "coordinator": "InstallKernelspecApp.coordinator",
        "coordinator-url": "InstallKernelspecApp.coordinator",
        "gpu": "InstallKernelspecApp.gpu",
        "max-price": "InstallKernelspecApp.max_price",
        "region": "InstallKernelspecApp.region",
        "min-vram": "InstallKernelspecApp.min_vram",
        "budget": "InstallKernelspecApp.budget",
        # The kernel.json and provisioner spelling of the same setting.
        "max-session-hours": "InstallKernelspecApp.budget",
        "keypair": "InstallKernelspecApp.keypair_path",
        "provider-pubkey": "InstallKernelspecApp.provider_pubkey",
        "prefix": "InstallKernelspecApp.prefix",
    }
    flags = {
        "user": ({"InstallKernelspecApp": {"user": True}}, "Install for the current user only."),
        "sys-prefix": (
            {"InstallKernelspecApp": {"prefix": sys.prefix}},
            "Install into this Python environment (sys.prefix).",
        ),
        "replace": (
            {"InstallKernelspecApp": {"replace": True}},
            "Overwrite a same-named kernelspec that is not a jupyter-io one.",
        ),
        "debug": base_flags["debug"],
    }

    def run(self) -> None:
        from .kernelspec import install_kernelspec, install_lease_kernelspec

        if self.provider_url and self.coordinator:
            raise JupyterIOError(
                "give --provider-url (one provider) or --coordinator (lease a GPU), not both"
            )
        if self.coordinator and self.provider_pubkey:
            raise JupyterIOError(
                "--provider-pubkey goes with --provider-url; with --coordinator the lease "
                "names the provider and its key"
            )
        if self.coordinator:
            path = install_lease_kernelspec(
                self.kernel_name,
                self.coordinator,
                self.keypair_path,
                gpu=self.gpu,
                max_price_per_hour=self.max_price,
                region=self.region,
                min_vram_gb=self.min_vram,
                max_session_hours=self.budget,
                display_name=self.display_name,
                user=self.user,
                prefix=self.prefix or None,
                replace=self.replace,
            )
        elif not self.provider_url:
            raise JupyterIOError(
                "--provider-url is required (the ws://HOST:PORT/tunnel URL a provider "
                "prints), or --coordinator (http://HOST:PORT, with --gpu) to lease a GPU"
            )
        elif self.gpu or self.max_price or self.region or self.min_vram or self.budget:
            raise JupyterIOError(
                "--gpu, --max-price, --region, --min-vram and --budget need --coordinator: a "
                "kernelspec with --provider-url always runs on that provider, unpaid"
            )
        else:
            path = install_kernelspec(
                self.kernel_name,
                self.provider_url,
                self.keypair_path,
                display_name=self.display_name,
                provider_pubkey=self.provider_pubkey,
                user=self.user,
                prefix=self.prefix or None,
                replace=self.replace,
            )
        print(f"Installed kernelspec {self.kernel_name.lower()} in {path}")
        if self.coordinator:
            hours = self.budget or DEFAULT_SESSION_HOURS
            default = "" if self.budget else ", the default; --budget HOURS to change"
            print(
                f"Each session escrows its price for {hours:g} h of GPU time "
                f"(its budget{default}) from the wallet of --keypair"
            )


class ListKernelspecsApp(IOCommand):
    """``jupyter io kernelspec list``"""

    name = "jupyter io kernelspec list"
    description = "List the installed kernelspecs whose kernels run on a jupyter-io provider."
    aliases: dict[str, Any] = {}
    flags = {"debug": base_flags["debug"]}

    def run(self) -> None:
        from .kernelspec import find_kernelspecs

        specs = find_kernelspecs()
        if not specs:
            print(
                "No jupyter-io kernelspecs installed; add one with `jupyter io kernelspec install`."
            )
        for spec in specs:
            print(f"{spec.name}\t{spec.display_name}\t{spec.target}\t{spec.resource_dir}")


class RemoveKernelspecApp(IOCommand):
    """``jupyter io kernelspec remove NAME...``"""

    name = "jupyter io kernelspec remove"
    description = "Remove jupyter-io kernelspecs by name (others are left alone)."
    examples = "jupyter io kernelspec remove gpu-box"
    aliases: dict[str, Any] = {}
    flags = {"debug": base_flags["debug"]}

    def run(self) -> int | None:
        from .kernelspec import remove_kernelspec

        if not self.extra_args:
            raise JupyterIOError("name the kernelspec(s) to remove; `jupyter io kernelspec list`")
        for name in self.extra_args:
            print(f"Removed {remove_kernelspec(name)}")
        return None


class KernelspecApp(_CommandGroup):
    """``jupyter io kernelspec``"""

    name = "jupyter io kernelspec"
    description = "Manage kernelspecs whose kernels run on a jupyter-io provider."
    subcommands = {
        "install": (InstallKernelspecApp, InstallKernelspecApp.description),
        "list": (ListKernelspecsApp, ListKernelspecsApp.description),
        "remove": (RemoveKernelspecApp, RemoveKernelspecApp.description),
    }


class KeygenApp(IOCommand):
    """``jupyter io keygen PATH``"""

    name = "jupyter io keygen"
    description = (
        "Create a new Solana keypair in the file PATH, in the Solana CLI's format (a JSON array "
        "of 64 numbers, as `solana-keygen new -o PATH` writes), readable by you only; print its "
        "public key on stdout. An existing file is never overwritten. Use it for --keypair: "
        "your wallet (`jupyter io wallet`, kernelspecs) or a provider host's identity."
    )
    examples = """jupyter io keygen ~/.config/solana/id.json
jupyter io keygen provider-keypair.json"""
    aliases: dict[str, Any] = {}
    flags = {"debug": base_flags["debug"]}

    def run(self) -> None:
        from .identity import create_keypair_file

        if len(self.extra_args) != 1:
            raise JupyterIOError(
                "usage: jupyter io keygen PATH (the keypair file to create, e.g. "
                f"{DEFAULT_KEYPAIR_PATH})"
            )
        keypair, path = create_keypair_file(self.extra_args[0])
        print(f"Wrote a new keypair to {path} (mode 0600; keep it secret)", file=sys.stderr)
        print(keypair.pubkey())


class DemoApp(IOCommand):
    """``jupyter io demo``"""

    name = "jupyter io demo"
    description = (
        "Run the marketplace coordinator and a provider host joined to it on loopback (the "
        "provider offers simulated GPUs and is reached through the coordinator's relay), "
        "install one kernelspec per GPU type on offer, each leasing through the coordinator, "
        "and start JupyterLab; Ctrl-C stops them all in reverse order and removes the "
        "kernelspecs. Options this command does not know (e.g. --no-browser) are passed on to "
        "JupyterLab, and so is everything after --."
    )
    examples = """jupyter io demo
jupyter io demo --no-browser --port 8890
jupyter io demo --no-lab --data-dir /tmp/io-demo
jupyter io demo --cohort --cohort-students 5"""

    aliases = {
        **base_aliases,
        "data-dir": "Demo.data_dir",
        "port": "Demo.port",
        "coordinator-port": "Demo.coordinator_port",
        "provider-port": "Demo.provider_port",
        # Spelled as `jupyter io provider` and `jupyter io coordinator` spell them.
        "simulate-gpu": "Demo.simulate_gpus",
        "price": "Demo.price",
        "payments": "Demo.payments",
        "cohort-students": "DemoApp.cohort_students",
    }
    flags = {
        "cohort": (
            {"DemoApp": {"cohort": True}},
            "Also make a class (cohort) taught by the demo user, with simulated students who "
            "have keys of their own and one a JupyterLab of its own (c.CohortDemo.*).",
        ),
        "no-lab": (
            {"Demo": {"lab": False}},
            "Run only the coordinator, the provider and the kernelspecs.",
        ),
        "debug": base_flags["debug"],
    }

    # Not CohortDemo: with a subclass of Demo listed, traitlets would move every Demo alias
    # (--port, --price...) onto CohortDemo, and a plain demo would not see them.
    classes = [Demo]

    cohort = Bool(
        False, config=True, help="Run the demo with a class (jupyter_io.demo_cohort.CohortDemo)."
    )
    cohort_students = Int(
        None,
        allow_none=True,
        config=True,
        help="With --cohort: how many simulated students (default c.CohortDemo.students, 3).",
    )

    def parse_command_line(self, argv: Any = None) -> None:
        ours, self.lab_args = _split_argv(
            list(sys.argv[1:] if argv is None else argv), self.aliases, self.flags
        )
        super().parse_command_line(ours)

    def run(self) -> int:
        demo = Demo(parent=self)
        if self.cohort:
            demo = CohortDemo(parent=self)
            if self.cohort_students is not None:
                demo.students = self.cohort_students
        demo.lab_args = [*demo.lab_args, *self.lab_args]
        return asyncio.run(demo.run())


class JupyterIOApp(_CommandGroup):
    """``jupyter io``"""

    name = "jupyter-io"
    description = (
        "jupyter-io: remote GPU kernels for Jupyter, rented from GPU providers. "
        "Run `jupyter io COMMAND --help` for a command's options."
    )
    examples = """jupyter io demo
jupyter io provider --listen 0.0.0.0:8765 --allow USER_PUBKEY --keypair provider.json
jupyter io kernelspec install --provider-url ws://HOST:8765/tunnel --user"""
    subcommands = dict(SUBCOMMANDS)


#: The classes whose ``--Class.trait=value`` options the demo takes (the rest go to Lab).
_CONFIGURED = ("Demo", "CohortDemo", "DemoApp", "Application")


def _split_argv(
    argv: list[str], aliases: dict[str, Any], flags: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Split ``argv`` into the options a command knows and the rest (for a child program).

    Known: our aliases (``--port 1`` or ``--port=1``), flags, help and version switches, and
    ``--Demo.trait=value`` style config. Anything else, and all after ``--``, is the rest.
    """
    known = {"help", "help-all", "version", "h"} | set(flags)
    ours: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest.extend(args)
            break
        name, has_value, _ = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            rest.append(arg)
        elif name in aliases:
            ours.append(arg)
            if not has_value:
                ours.append(next(args, ""))
        elif name in known or name.split(".")[0] in _CONFIGURED:
            ours.append(arg)
        else:
            rest.append(arg)
    return ours, rest


main = launch_new_instance = JupyterIOApp.launch_instance
