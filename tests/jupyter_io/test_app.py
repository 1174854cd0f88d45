"""The ``jupyter io`` command line (jupyter_io.app), run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from jupyter_io.app import SUBCOMMANDS, DemoApp, _split_argv
from jupyter_io.identity import write_keypair

JUPYTER = str(Path(sys.executable).with_name("jupyter"))


def jupyter_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JUPYTER, "io", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_the_sub_commands() -> None:
    result = jupyter_io("--help")
    assert result.returncode == 0, result.stderr
    for command in SUBCOMMANDS:
        assert f"\n{command}\n" in result.stdout


def test_no_sub_command_says_which_exist_and_fails() -> None:
    result = jupyter_io()
    assert result.returncode == 1
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("No sub-command given")]
    assert set(line.split(": ", 1)[1].split(", ")) == set(SUBCOMMANDS)
    assert {"provider", "kernelspec", "demo"} <= set(SUBCOMMANDS)


def test_client_commands_do_not_import_the_provider() -> None:
    code = (
        "import sys\n"
        "from jupyter_io.app import main\n"
        "try:\n    main(['kernelspec', 'install', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('provider_host', 'torch')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_provider_sub_command_reaches_the_provider_app() -> None:
    pytest.importorskip("provider_host.app", reason="provider_host.app is not there yet")
    result = jupyter_io("provider", "--help")
    assert result.returncode == 0, result.stderr
    assert "--listen" in result.stdout


def test_kernelspec_install_list_remove(jupyter_env: Path, tmp_path: Path) -> None:
    key = write_keypair(Keypair(), tmp_path / "id.json")
    result = jupyter_io(
        "kernelspec", "install", "--name", "gpu-box", "--display-name", "Python 3 · box",
        "--provider-url", "ws://127.0.0.1:8765/tunnel", "--keypair", str(key),
        "--prefix", str(jupyter_env),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kernel_dir = jupyter_env / "share" / "jupyter" / "kernels" / "gpu-box"
    assert f"Installed kernelspec gpu-box in {kernel_dir}" in result.stdout
    spec = json.loads((kernel_dir / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 · box"
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "io-remote",
        "config": {"provider_url": "ws://127.0.0.1:8765/tunnel", "keypair_path": str(key)},
    }

    listed = jupyter_io("kernelspec", "list")
    assert listed.returncode == 0, listed.stderr
    assert "gpu-box\tPython 3 · box\tws://127.0.0.1:8765/tunnel" in listed.stdout
    # Jupyter's own listing finds it too.
    jupyter_list = subprocess.run(
        [JUPYTER, "kernelspec", "list", "--json"], capture_output=True, text=True, timeout=60
    )
    assert "gpu-box" in json.loads(jupyter_list.stdout)["kernelspecs"]

    removed = jupyter_io("kernelspec", "remove", "gpu-box")
    assert removed.returncode == 0, removed.stderr
    assert not kernel_dir.exists()


def test_kernelspec_install_provider_pubkey(jupyter_env: Path, tmp_path: Path) -> None:
    key = write_keypair(Keypair(), tmp_path / "id.json")
    host = str(Keypair().pubkey())
    common = ["kernelspec", "install", "--keypair", str(key), "--prefix", str(jupyter_env)]
    result = jupyter_io(
        *common, "--provider-url", "ws://h:1/tunnel", "--provider-pubkey", host, "--name", "p"
    )
    assert result.returncode == 0, result.stderr
    kernel_json = jupyter_env / "share" / "jupyter" / "kernels" / "p" / "kernel.json"
    config = json.loads(kernel_json.read_text())["metadata"]["kernel_provisioner"]["config"]
    assert config["provider_pubkey"] == host

    leased = jupyter_io(*common, "--coordinator", "http://h:8700", "--provider-pubkey", host)
    assert leased.returncode == 1
    assert "--provider-pubkey goes with --provider-url" in leased.stderr


def test_kernelspec_install_user_goes_to_the_user_data_dir(
    jupyter_env: Path, tmp_path: Path
) -> None:
    key = write_keypair(Keypair(), tmp_path / "id.json")
    result = jupyter_io(
        "kernelspec",
        "install",
        "--user",
        "--provider-url",
        "ws://h:1/tunnel",
        "--keypair",
        str(key),
    )
    assert result.returncode == 0, result.stderr
    data_dir = jupyter_env.parent / "data"
    assert (data_dir / "kernels" / "jupyter-io" / "kernel.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--provider-url", "http://127.0.0.1:8765/tunnel"], "must start with ws:// or wss://"),
        (["--provider-url", "ws://127.0.0.1:8765/tunnel", "--keypair", "/nonexistent/id.json"],
         "keypair file /nonexistent/id.json does not exist"),
        ([], "--provider-url is required"),
    ],
)  # fmt: skip
def test_kernelspec_install_refuses_bad_input_with_a_clear_message(
    jupyter_env: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    key = write_keypair(Keypair(), tmp_path / "id.json")
    if "--keypair" not in args:
        args = [*args, "--keypair", str(key)]
    result = jupyter_io("kernelspec", "install", "--prefix", str(jupyter_env), *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (jupyter_env / "share" / "jupyter" / "kernels").exists()


def test_demo_passes_unknown_options_on_to_jupyterlab() -> None:
    ours, lab = _split_argv(
        ["--no-lab", "--port", "9999", "--no-browser", "--data-dir=/d", "--Demo.stop_timeout=3",
         "--ServerApp.token=abc", "--", "--port", "1"],
        DemoApp.aliases,
        DemoApp.flags,
    )  # fmt: skip
    assert ours == ["--no-lab", "--port", "9999", "--data-dir=/d", "--Demo.stop_timeout=3"]
    assert lab == ["--no-browser", "--ServerApp.token=abc", "--port", "1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["provider", "--max-sessions", "0"], "--max-sessions must be positive"),
        (["provider", "--coordinator", "gpu-box"], "--coordinator 'gpu-box' must look like"),
        (["coordinator", "--token-ttl", "0"], "--token-ttl must be positive"),
        (["demo", "--port", "abc"], "--port expected an int"),
        (["wallet", "--timeout", "abc"], "--timeout expected a float"),
        (["kernelspec", "install", "--min-vram", "x"], "--min-vram expected a float"),
    ],
)
def test_a_bad_option_is_named_as_typed_without_a_traceback(argv: list[str], message: str) -> None:
    result = jupyter_io(*argv)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert " trait of " not in result.stderr
    trait = {"--max-sessions": "max_sessions", "--coordinator": "coordinator_url"}
    assert not any(name in result.stderr for name in trait.values())


def test_kernelspec_install_budget_sets_what_the_escrow_covers(
    jupyter_env: Path, tmp_path: Path
) -> None:
    from jupyter_io.payments.amounts import DEFAULT_SESSION_HOURS
    from kernel_provisioner.provisioner import RemoteKernelProvisioner

    key = write_keypair(Keypair(), tmp_path / "id.json")
    common = ["kernelspec", "install", "--keypair", str(key), "--prefix", str(jupyter_env),
              "--coordinator", "http://127.0.0.1:8700", "--gpu", "RTX 4090"]  # fmt: skip
    kernels = jupyter_env / "share" / "jupyter" / "kernels"

    def hook_budget(name: str) -> float:
        config = json.loads((kernels / name / "kernel.json").read_text())["metadata"][
            "kernel_provisioner"
        ]["config"]
        # The provisioner Jupyter builds from this kernel.json, and the escrow hook it pays with.
        return RemoteKernelProvisioner(**config)._new_hook().max_session_hours  # type: ignore[attr-defined, no-any-return]

    result = jupyter_io(*common, "--name", "two-hours", "--budget", "2.5")
    assert result.returncode == 0, result.stderr
    assert "escrows its price for 2.5 h of GPU time" in result.stdout
    assert hook_budget("two-hours") == 2.5
    # The provisioner's own spelling of the option works too.
    result = jupyter_io(*common, "--name", "spelled", "--max-session-hours", "0.5")
    assert result.returncode == 0, result.stderr
    assert hook_budget("spelled") == 0.5
    # Without --budget: the default, said as it is, and the one the escrow takes.
    result = jupyter_io(*common, "--name", "default")
    assert result.returncode == 0, result.stderr
    assert f"for {DEFAULT_SESSION_HOURS:g} h of GPU time (its budget, the default" in result.stdout
    assert hook_budget("default") == DEFAULT_SESSION_HOURS

    for bad, words in (
        (["--budget", "-1"], "--budget must be more than 0"),
        (["--budget", "10000"], "--budget must be more than 0"),
    ):
        result = jupyter_io(*common, "--name", "bad", *bad)
        assert result.returncode == 1 and words in result.stderr, result.stderr
    result = jupyter_io(
        "kernelspec", "install", "--keypair", str(key), "--prefix", str(jupyter_env),
        "--provider-url", "ws://h:1/tunnel", "--budget", "2",
    )  # fmt: skip
    assert result.returncode == 1 and "--budget need --coordinator" in result.stderr
    assert not (kernels / "bad").exists()


#: One spelling per setting across `jupyter io` commands: (the traits that hold it, the
#: flags every command with one of those traits accepts for it).
SPELLINGS = [
    ({"coordinator", "coordinator_url"}, {"--coordinator", "--coordinator-url"}),
    ({"keypair_path"}, {"--keypair"}),
    ({"data_dir"}, {"--data-dir"}),
    ({"solana_url"}, {"--solana-url"}),
    ({"listen"}, {"--listen"}),
    ({"public_url"}, {"--public-url"}),
    ({"certfile"}, {"--certfile"}),
    ({"keyfile"}, {"--keyfile"}),
    ({"region"}, {"--region"}),
    ({"simulate_gpu", "simulate_gpus"}, {"--simulate-gpu"}),
    ({"price"}, {"--price"}),
    ({"payments"}, {"--payments"}),
    ({"timeout"}, {"--timeout"}),
    ({"json_output"}, {"--json"}),
]


def _commands() -> dict[str, Any]:
    from traitlets.utils.importstring import import_item

    from jupyter_io.app import InstallKernelspecApp

    commands = {name: import_item(path) for name, (path, _) in SUBCOMMANDS.items()}
    del commands["kernelspec"]  # a group: its install command below
    commands["kernelspec install"] = InstallKernelspecApp
    return commands


def test_options_are_spelled_the_same_in_every_command() -> None:
    pytest.importorskip("provider_host.app")
    for name, app in _commands().items():
        traits = set(app.class_trait_names(config=True))
        for cls in app.classes:
            traits |= set(cls.class_trait_names(config=True))
        flags: dict[str, set[str]] = {}
        for alias, target in app.aliases.items():
            flags.setdefault(target.rsplit(".", 1)[-1], set()).add(f"--{alias}")
        for switch, (config, _) in app.flags.items():
            for values in config.values():
                for trait in values:
                    flags.setdefault(trait, set()).add(f"--{switch}")
        for names, spelled in SPELLINGS:
            held = names & traits
            for trait in held:
                assert spelled <= flags.get(trait, set()), (name, trait, flags.get(trait))


def test_the_demo_takes_the_providers_and_coordinators_spellings() -> None:
    ours, rest = _split_argv(
        ["--simulate-gpu", "A100:80", "--price=0.5", "--payments", "free", "--no-browser"],
        DemoApp.aliases,
        DemoApp.flags,
    )
    assert rest == ["--no-browser"]
    app = DemoApp()
    app.parse_command_line(ours)
    demo = app.config.Demo
    assert (demo.simulate_gpus, demo.price, demo.payments) == (["A100:80"], "0.5", "free")
