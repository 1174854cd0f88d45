"""Fixtures shared by every test package. Keep this file small: package-specific fixtures
belong in that package's own conftest.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

# The fuzz tests (tests/**/*_fuzz.py): a bounded share of CI (the whole set in ~30 s on 2
# shared cores), no deadline (a loaded machine is not a bug), and under CI the same examples
# every run, so a failure there reproduces. HYPOTHESIS_PROFILE=fuzz-long digs deeper locally.
settings.register_profile(
    "jupyter-io",
    max_examples=200,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    database=None,
    print_blob=True,
)
settings.register_profile("fuzz-long", settings.get_profile("jupyter-io"), max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "jupyter-io"))


@pytest.fixture
def jupyter_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point Jupyter's config, data, runtime and search paths at a fresh directory, for this
    process and the subprocesses it starts, so a test never reads or writes the user's.

    Returns a prefix whose ``share/jupyter`` is on ``JUPYTER_PATH``: install kernelspecs
    there (``prefix=``) and Jupyter finds them.
    """
    home = tmp_path / "jupyter-env"
    prefix = home / "prefix"
    for name, path in {
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "JUPYTER_PATH": prefix / "share" / "jupyter",
    }.items():
        path.mkdir(parents=True)
        monkeypatch.setenv(name, str(path))
    monkeypatch.delenv("JUPYTER_PREFER_ENV_PATH", raising=False)
    return prefix


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed TLS certificate for 127.0.0.1 (PEM) and its key, from Debian's openssl:
    what a coordinator or provider with a private CA serves, and what no default trust store
    knows."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key
