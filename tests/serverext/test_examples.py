"""The configuration example for a real Solana cluster (``examples/solana_cluster/``): each
file loads, names only traits that exist, with values they accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from traitlets.config import Config, Configurable
from traitlets.config.loader import PyFileConfigLoader

from jupyter_io.coordinator.config import CoordinatorConfig
from jupyter_io.payments.hooks import SolanaEscrowHook
from jupyter_io.serverext.app import JupyterIOExtension
from provider_host.config import ProviderConfig

EXAMPLE = Path(__file__).parents[2] / "examples" / "solana_cluster"


def load(name: str) -> Config:
    return PyFileConfigLoader(name, path=str(EXAMPLE)).load_config()


def check(config: Config, *classes: type[Configurable]) -> None:
    """Every section is one of ``classes``, every key one of its config traits, and the
    class accepts the values (traitlets validates them on construction)."""
    known = {cls.__name__: cls for cls in classes}
    assert set(config) <= set(known), set(config) - set(known)
    for section, values in config.items():
        traits = known[section].class_traits(config=True)
        assert set(values) <= set(traits), (section, set(values) - set(traits))
        known[section](config=config)


def test_the_coordinator_pays_through_escrows_on_the_cluster() -> None:
    config = load("jupyter_io_coordinator_config.py")
    check(config, CoordinatorConfig)
    assert config.CoordinatorConfig.payments == "escrow"
    assert config.CoordinatorConfig.solana_url.startswith("https://")


def test_the_provider_joins_the_coordinator() -> None:
    check(load("jupyter_io_provider_config.py"), ProviderConfig)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_users_jupyter_points_at_the_coordinator_and_the_cluster() -> None:
    config = load("jupyter_server_config.py")
    check(config, JupyterIOExtension, SolanaEscrowHook)
    extension = JupyterIOExtension(config=config)
    assert extension.direct_providers[0]["name"] == "jupyter-io-direct-gpu-box"
