"""Installing, listing and removing jupyter-io kernelspecs (jupyter_io.kernelspec)."""

from __future__ import annotations

import json
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
    remove_kernelspec,
    validate_provider_url,
)

URL = "ws://127.0.0.1:8765/tunnel"


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
        "Python 3 · jupyter-io (gpu.example:443)"
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
