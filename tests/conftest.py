"""Fixtures shared by every test package. Keep this file small: package-specific fixtures
belong in that package's own conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest


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
