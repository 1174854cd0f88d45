"""Installing, listing and removing jupyter-io kernelspecs (jupyter_io.kernelspec), in
provider mode (one provider's tunnel URL) and lease mode (a GPU type leased through a
coordinator), through the functions and through ``jupyter io kernelspec install``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from solders.keypair import Keypair

from jupyter_io.errors import ConfigError
from jupyter_io.identity import write_keypair
from jupyter_io.kernelspec import (
    KERNEL_ARGV,
    find_kernelspecs,
    install_kernelspec,
    install_lease_kernelspec,
    remove_kernelspec,
    validate_coordinator_url,
    validate_provider_url,
)

URL = "ws://127.0.0.1:8765/tunnel"
COORDINATOR = "http://127.0.0.1:8700"
JUPYTER = str(Path(sys.executable).with_name("jupyter"))


@pytest.fixture
def keypair(tmp_path: Path) -> Path:
    return write_keypair(Keypair(), tmp_path / "id.json")


def test_install_writes_a_kernel_json_for_the_io_remote_provisioner(
    jupyter_env: Path, keypair: Path
) -> None:
    path = install_kernelspec(
        "GPU-Box", URL, keypair, display_name="Python 3 · gpu box", prefix=str(jupyter_env)
    )

    assert Path(path) == jupyter_env / "share" / "jupyter" / "kernels" / "gpu-box"
    assert json.loads(Path(path, "kernel.json").read_text()) == {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 · gpu box",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "io-remote",
                "config": {"provider_url": URL, "keypair_path": str(keypair)},
            }
        },
    }
    # Jupyter itself finds it and reads the provisioner config from it.
    spec = KernelSpecManager().get_kernel_spec("gpu-box")
    assert spec.argv == KERNEL_ARGV
    assert spec.metadata["kernel_provisioner"]["config"]["provider_url"] == URL


def test_keypair_path_is_stored_absolute(
    jupyter_env: Path, keypair: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(keypair.parent)
    path = install_kernelspec("rel", URL, keypair.name, prefix=str(jupyter_env))
    config = json.loads(Path(path, "kernel.json").read_text())["metadata"]["kernel_provisioner"]
    assert config["config"]["keypair_path"] == str(keypair)


def test_default_display_name_names_the_provider(jupyter_env: Path, keypair: Path) -> None:
    path = install_kernelspec(
        "box", "wss://gpu.example:443/tunnel", keypair, prefix=str(jupyter_env)
    )
    assert json.loads(Path(path, "kernel.json").read_text())["display_name"] == (
        "jupyter-io · gpu.example:443"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8765/tunnel", "must start with ws:// or wss://"),
        ("127.0.0.1:8765", "must start with ws:// or wss://"),
        ("ws:///tunnel", "needs a host"),
        ("ws://127.0.0.1:99999/tunnel", "valid port"),
        ("ws://127.0.0.1:0/tunnel", "valid port"),
    ],
)
def test_bad_provider_url_is_refused_before_anything_is_written(
    jupyter_env: Path, keypair: Path, url: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        install_kernelspec("box", url, keypair, prefix=str(jupyter_env))
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "box").exists()


def test_provider_pubkey_pins_the_host_and_must_be_a_key(jupyter_env: Path, keypair: Path) -> None:
    host = str(Keypair().pubkey())
    path = install_kernelspec("pinned", URL, keypair, provider_pubkey=host, prefix=str(jupyter_env))
    config = json.loads(Path(path, "kernel.json").read_text())["metadata"]["kernel_provisioner"]
    assert config["config"]["provider_pubkey"] == host
    with pytest.raises(ConfigError, match="not a base58 Solana public key"):
        install_kernelspec("bad", URL, keypair, provider_pubkey="nope", prefix=str(jupyter_env))
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "bad").exists()


def test_good_provider_urls_pass() -> None:
    for url in (URL, "wss://gpu.example/tunnel", "ws://[::1]:9000/tunnel"):
        assert validate_provider_url(url) == url


def test_missing_or_broken_keypair_is_refused(jupyter_env: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        install_kernelspec("box", URL, tmp_path / "nope.json", prefix=str(jupyter_env))
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="not a Solana keypair file"):
        install_kernelspec("box", URL, broken, prefix=str(jupyter_env))
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "box").exists()


def test_invalid_kernel_name_is_a_config_error(jupyter_env: Path, keypair: Path) -> None:
    with pytest.raises(ConfigError, match="Invalid kernel name"):
        install_kernelspec("no spaces allowed", URL, keypair, prefix=str(jupyter_env))


def test_reinstall_replaces_our_own_but_not_a_foreign_kernelspec(
    jupyter_env: Path, keypair: Path
) -> None:
    install_kernelspec("box", URL, keypair, prefix=str(jupyter_env))
    path = install_kernelspec("box", "ws://127.0.0.1:9999/tunnel", keypair, prefix=str(jupyter_env))
    assert "9999" in Path(path, "kernel.json").read_text()

    foreign = jupyter_env / "share" / "jupyter" / "kernels" / "local"
    foreign.mkdir()
    (foreign / "kernel.json").write_text(json.dumps({"argv": ["python"], "display_name": "L"}))
    with pytest.raises(ConfigError, match="not a jupyter-io one"):
        install_kernelspec("local", URL, keypair, prefix=str(jupyter_env))
    assert json.loads((foreign / "kernel.json").read_text())["display_name"] == "L"
    install_kernelspec("local", URL, keypair, prefix=str(jupyter_env), replace=True)
    assert "io-remote" in (foreign / "kernel.json").read_text()


def test_user_and_prefix_together_are_refused(jupyter_env: Path, keypair: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        install_kernelspec("box", URL, keypair, user=True, prefix=str(jupyter_env))


def test_list_and_remove_touch_only_jupyter_io_kernelspecs(
    jupyter_env: Path, keypair: Path
) -> None:
    install_kernelspec("box-a", URL, keypair, display_name="A", prefix=str(jupyter_env))
    install_kernelspec("box-b", URL, keypair, display_name="B", prefix=str(jupyter_env))
    foreign = jupyter_env / "share" / "jupyter" / "kernels" / "local"
    foreign.mkdir()
    (foreign / "kernel.json").write_text(json.dumps({"argv": ["python"], "display_name": "L"}))

    found = find_kernelspecs()
    assert [(k.name, k.display_name, k.provider_url) for k in found] == [
        ("box-a", "A", URL),
        ("box-b", "B", URL),
    ]
    assert found[0].keypair_path == str(keypair)

    removed = remove_kernelspec("box-a")
    assert not Path(removed).exists()
    assert [k.name for k in find_kernelspecs()] == ["box-b"]
    with pytest.raises(ConfigError, match="not a jupyter-io kernelspec"):
        remove_kernelspec("local")
    assert foreign.exists()
    with pytest.raises(ConfigError, match="no kernelspec named 'box-a'"):
        remove_kernelspec("box-a")


# -- lease mode ------------------------------------------------------------------------------


def provisioner_config(path: str) -> dict[str, object]:
    spec = json.loads(Path(path, "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "io-remote"
    return spec["metadata"]["kernel_provisioner"]["config"]  # type: ignore[no-any-return]


def test_lease_kernelspec_names_the_coordinator_and_what_to_lease(
    jupyter_env: Path, keypair: Path
) -> None:
    path = install_lease_kernelspec(
        "RTX-4090",
        COORDINATOR + "/",
        keypair,
        gpu=" RTX 4090 ",
        max_price_per_hour="0.5",
        region="eu-west",
        min_vram_gb=20,
        prefix=str(jupyter_env),
    )
    assert Path(path) == jupyter_env / "share" / "jupyter" / "kernels" / "rtx-4090"
    # The price stays text, exactly as given: the provisioner turns it into lamports.
    assert provisioner_config(path) == {
        "coordinator_url": COORDINATOR,
        "keypair_path": str(keypair),
        "gpu": "RTX 4090",
        "max_price_per_hour": "0.5",
        "region": "eu-west",
        "min_vram_gb": 20,
    }
    spec = KernelSpecManager().get_kernel_spec("rtx-4090")
    assert spec.display_name == "RTX 4090 · ≤ 0.5 SOL/h · jupyter-io"  # fits a launcher tile
    assert spec.argv == KERNEL_ARGV


def test_lease_kernelspec_leaves_out_what_was_not_asked_for(
    jupyter_env: Path, keypair: Path
) -> None:
    path = install_lease_kernelspec("any-gpu", COORDINATOR, keypair, prefix=str(jupyter_env))
    assert provisioner_config(path) == {
        "coordinator_url": COORDINATOR,
        "keypair_path": str(keypair),
    }
    assert json.loads(Path(path, "kernel.json").read_text())["display_name"] == (
        "any GPU · jupyter-io"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coordinator_url": "ws://127.0.0.1:8700"}, "must start with http:// or https://"),
        ({"coordinator_url": "http:///api"}, "needs a host"),
        ({"max_price_per_hour": "0.0000000001"}, "more than 9 decimals"),
        ({"max_price_per_hour": "cheap"}, "not an amount of SOL"),
        ({"max_price_per_hour": "-1"}, "not a non-negative amount"),
        ({"min_vram_gb": -1}, "must not be negative"),
    ],
)
def test_bad_lease_options_are_refused_before_anything_is_written(
    jupyter_env: Path, keypair: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"coordinator_url": COORDINATOR, "gpu": "RTX 4090", **kwargs}
    url = str(args.pop("coordinator_url"))
    with pytest.raises(ConfigError, match=message):
        install_lease_kernelspec("box", url, keypair, prefix=str(jupyter_env), **args)  # type: ignore[arg-type]
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "box").exists()


def test_good_coordinator_urls_pass() -> None:
    assert validate_coordinator_url("https://coord.example/") == "https://coord.example"
    assert validate_coordinator_url("http://[::1]:8700") == "http://[::1]:8700"


def test_list_shows_both_modes(jupyter_env: Path, keypair: Path) -> None:
    install_kernelspec("box", URL, keypair, prefix=str(jupyter_env))
    install_lease_kernelspec(
        "leased", COORDINATOR, keypair, gpu="A100", max_price_per_hour="1.25",
        prefix=str(jupyter_env),
    )  # fmt: skip
    box, leased = find_kernelspecs()
    assert (box.target, box.coordinator_url) == (URL, "")
    assert (leased.coordinator_url, leased.gpu, leased.max_price_per_hour) == (
        COORDINATOR,
        "A100",
        "1.25",
    )
    assert leased.provider_url == ""
    assert leased.target == f"A100 ≤ 1.25 SOL/h via {COORDINATOR}"


def jupyter_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JUPYTER, "io", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_installs_a_lease_kernelspec_and_lists_it(jupyter_env: Path, keypair: Path) -> None:
    result = jupyter_io(
        "kernelspec", "install", "--name", "rtx", "--coordinator", COORDINATOR,
        "--gpu", "RTX 4090", "--max-price", "0.5", "--region", "eu-west",
        "--keypair", str(keypair), f"--prefix={jupyter_env}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = jupyter_env / "share" / "jupyter" / "kernels" / "rtx"
    assert f"Installed kernelspec rtx in {path}" in result.stdout
    assert provisioner_config(str(path)) == {
        "coordinator_url": COORDINATOR,
        "keypair_path": str(keypair),
        "gpu": "RTX 4090",
        "max_price_per_hour": "0.5",
        "region": "eu-west",
    }
    listed = jupyter_io("kernelspec", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"rtx\t{json.loads(path.joinpath('kernel.json').read_text())['display_name']}\t" \
        f"RTX 4090 ≤ 0.5 SOL/h via {COORDINATOR}\t" in listed.stdout  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--coordinator", COORDINATOR, "--provider-url", URL], "not both"),
        (["--provider-url", URL, "--gpu", "A100"], "need --coordinator"),
        (["--coordinator", COORDINATOR, "--max-price", "lots"], "not an amount of SOL"),
    ],
)
def test_cli_refuses_mixed_or_bad_lease_options(
    jupyter_env: Path, keypair: Path, args: list[str], message: str
) -> None:
    result = jupyter_io("kernelspec", "install", "--keypair", str(keypair), *args,
                        f"--prefix={jupyter_env}")  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (jupyter_env / "share" / "jupyter" / "kernels" / "jupyter-io").exists()
