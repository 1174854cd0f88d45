"""The host's pure parts: listen parsing, config errors, environment, limits, inventory, GPUs."""

from __future__ import annotations

import os
import resource
import ssl

import pytest
from traitlets import TraitError

from jupyter_io.errors import ConfigError
from provider_host.allocation import GpuPool
from provider_host.config import ProviderConfig, parse_listen
from provider_host.inventory import (
    CPU_LABEL,
    Device,
    Inventory,
    _cross_check,
    _nvidia_driver_present,
    parse_simulated_gpu,
    probe_inventory,
    render_inventory,
)
from provider_host.isolation import ResourceLimits, client_env_refused, kernel_env

GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("8765", ("127.0.0.1", 8765)),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "localhost", ":80", "host:port", "1.2.3.4:70000", "[::1]"])
def test_parse_listen_rejects(text):
    with pytest.raises(ConfigError):
        parse_listen(text)


def test_config_defaults_listen_on_loopback_only():
    config = ProviderConfig()
    assert config.listen_address() == ("127.0.0.1", 8765)
    assert config.grace_period == 120.0
    assert (config.ping_interval, config.ping_timeout) == (10.0, 10.0)
    assert config.workspace_root.endswith(os.path.join("io", "provider"))
    with pytest.raises(TraitError):
        ProviderConfig(listen="nowhere")
    with pytest.raises(TraitError):
        ProviderConfig(max_sessions=0)


def test_config_errors_name_what_to_fix(tmp_path):
    missing = tmp_path / "id.json"
    with pytest.raises(ConfigError, match="solana-keygen") as info:
        ProviderConfig(keypair_path=str(missing)).load_keypair()
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="certfile"):
        ProviderConfig(keyfile="key.pem").ssl_context()
    with pytest.raises(ConfigError, match="cannot load TLS"):
        ProviderConfig(certfile=str(tmp_path / "cert.pem")).ssl_context()
    with pytest.raises(ConfigError, match="not a base58"):
        ProviderConfig(allow=["not-a-key"]).load_allowlist()
    assert ProviderConfig().ssl_context() is None
    assert not isinstance(ProviderConfig().ssl_context(), ssl.SSLContext)


def test_kernel_env_keeps_only_harmless_host_variables():
    host = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "TZ": "UTC",
        "AWS_SECRET_ACCESS_KEY": "s1",
        "JUPYTER_IO_SECRET": "s2",
        "SSH_AUTH_SOCK": "/tmp/agent",
        "HOME": "/root",
        "LD_LIBRARY_PATH": "/opt/cuda/lib",
    }
    env, refused = kernel_env(host_env=host, client_env={}, gpus=(), workspace="/w/s1")
    assert refused == []
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "TZ": "UTC",
        "HOME": "/w/s1",
        "PWD": "/w/s1",
        "TMPDIR": "/w/s1/.tmp",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env, _ = kernel_env(
        host_env=host, client_env={}, gpus=(1, 3), workspace="/w", keep=["LD_LIBRARY_PATH"]
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert env["LD_LIBRARY_PATH"] == "/opt/cuda/lib"


def test_kernel_env_filters_the_client_request():
    env, refused = kernel_env(
        host_env={"PATH": "/usr/bin"},
        client_env={
            "MPLBACKEND": "agg",
            "PYTHONHASHSEED": "0",
            "JPY_SESSION_NAME": "nb.ipynb",
            "LD_PRELOAD": "x",
            "ld_audit": "x",
            "PYTHONSTARTUP": "x",
            "CUDA_VISIBLE_DEVICES": "0,1",
            "HOME": "/root",
            "BAD-NAME": "x",
            "NUMBER": 3,
        },
        gpus=(0,),
        workspace="/w",
    )
    assert refused == sorted(
        [
            "LD_PRELOAD",
            "ld_audit",
            "PYTHONSTARTUP",
            "CUDA_VISIBLE_DEVICES",
            "HOME",
            "BAD-NAME",
            "NUMBER",
        ]
    )
    assert env["MPLBACKEND"] == "agg"
    assert env["PYTHONHASHSEED"] == "0"
    assert env["JPY_SESSION_NAME"] == "nb.ipynb"
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["HOME"] == "/w"
    assert env["PATH"] == "/usr/bin"


@pytest.mark.parametrize(
    "name",
    [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "DYLD_INSERT_LIBRARIES",
        "PYTHONPATH",
        "PYTHONHOME",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "GCONV_PATH",
        "JPY_PARENT_PID",
        "JUPYTER_IO_TOKEN",
        "MALLOC_CONF",
        "BASH_ENV",
        "1ABC",
        "",
    ],
)
def test_client_may_not_set(name):
    assert client_env_refused(name)


def test_resource_limits_always_disable_core_dumps():
    assert ResourceLimits().rlimits() == [(resource.RLIMIT_CORE, 0)]
    pairs = dict(ResourceLimits(address_space=GIB, open_files=256).rlimits())
    assert pairs == {resource.RLIMIT_CORE: 0, resource.RLIMIT_AS: GIB, resource.RLIMIT_NOFILE: 256}


def test_simulated_gpus_are_labelled_and_a_gpu_less_host_offers_its_cpu():
    if _nvidia_driver_present():
        pytest.skip("this machine has an NVIDIA driver; the CPU fallback does not apply")
    inventory = probe_inventory(["A100:80", "RTX 4090:24"])
    assert inventory.gpu_indices == ()  # simulated GPUs are never pinned
    simulated = [d for d in inventory.devices if d.simulated]
    assert [(d.model, d.vram_bytes, d.kind) for d in simulated] == [
        ("A100", 80 * GIB, "gpu"),
        ("RTX 4090", 24 * GIB, "gpu"),
    ]
    cpu = [d for d in inventory.devices if d.kind == "cpu"]
    assert [d.model for d in cpu] == [CPU_LABEL] == ["cpu (no GPU)"]
    assert cpu[0].simulated is False
    lines = render_inventory(inventory)
    assert any("A100 (simulated), 80.0 GiB VRAM" in line for line in lines)
    assert any("cpu (no GPU)" in line for line in lines)
    assert all("simulated" not in line for line in lines if "cpu" in line)
    assert inventory.devices[0].to_json() == {
        "index": 0,
        "model": "A100",
        "vram_bytes": 80 * GIB,
        "simulated": True,
        "kind": "gpu",
    }


def test_real_gpus_render_without_the_simulated_label():
    inventory = Inventory((Device(0, "NVIDIA H100 80GB HBM3", 80 * GIB),), ("a warning",))
    assert inventory.gpu_indices == (0,)
    assert render_inventory(inventory) == [
        "  gpu 0: NVIDIA H100 80GB HBM3, 80.0 GiB VRAM",
        "  warning: a warning",
    ]


@pytest.mark.parametrize("spec", ["A100", "A100:", ":80", "A100:zero", "A100:-1"])
def test_bad_simulated_gpu_specs(spec):
    with pytest.raises(ConfigError, match="MODEL:VRAM_GB"):
        parse_simulated_gpu(spec)


def test_nvml_and_torch_disagreements_are_reported(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = [("H100", 80 * GIB), ("H100", 80 * GIB)]
    assert _cross_check(nvml, None) == []
    assert _cross_check(nvml, list(nvml)) == []
    assert "torch.cuda sees 0" in _cross_check(nvml, [])[0]
    assert "GPU 1" in _cross_check(nvml, [("H100", 80 * GIB), ("A10", 24 * GIB)])[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert _cross_check(nvml, []) == []  # torch sees a deliberate subset


def test_gpu_pool_hands_out_each_gpu_to_one_session():
    pool = GpuPool([0, 1])
    assert pool.acquire("a") == (0,)
    assert pool.acquire("b") == (1,)
    assert not pool.available()
    assert pool.acquire("c") is None
    pool.release("a")
    pool.release("a")
    assert pool.acquire("c") == (0,)
    cpu_only = GpuPool([])
    assert [cpu_only.acquire(str(i)) for i in range(3)] == [(), (), ()]
    assert cpu_only.available()


def test_cli_flags_fill_the_config(tmp_path):
    from provider_host.app import ProviderApp

    app = ProviderApp()
    app.initialize(
        [
            "--listen",
            "127.0.0.1:0",
            "--allow",
            "A",
            "--allow",
            "B",
            "--allow-file",
            "keys.txt",
            "--keypair",
            "id.json",
            "--certfile",
            "cert.pem",
            "--keyfile",
            "key.pem",
            "--workspace",
            str(tmp_path),
            "--grace-period",
            "5",
            "--max-sessions",
            "3",
            "--mem-limit",
            "1024",
            "--simulate-gpu",
            "A100:80",
            "--simulate-gpu",
            "L4:24",
        ]
    )
    config = ProviderConfig(parent=app)
    assert config.listen == "127.0.0.1:0"
    assert config.allow == ["A", "B"]
    assert config.allow_file == ["keys.txt"]
    assert config.keypair_path == "id.json"
    assert (config.certfile, config.keyfile) == ("cert.pem", "key.pem")
    assert config.workspace_root == str(tmp_path)
    assert config.grace_period == 5.0
    assert config.max_sessions == 3
    assert config.resource_limits().address_space == 1024
    assert config.simulate_gpu == ["A100:80", "L4:24"]
