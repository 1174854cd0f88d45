"""One truth for a session's budget: what the preferences endpoint says, the budget the GPU
kernelspecs give the escrow, and the escrow hook's configured ``max_session_hours``."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_io.payments.amounts import DEFAULT_SESSION_HOURS
from jupyter_io.payments.hooks import SolanaEscrowHook

KERNEL = "jupyter-io-rtx-4090"


async def served_budget(fetch_json: Any) -> float | None:
    """The budget in the served GPU kernelspec (None: left to the escrow hook)."""
    await fetch_json("jupyter-io", "offers")  # what the background refresh does on a server
    status, body = await fetch_json("api", "kernelspecs")
    assert status == 200 and KERNEL in body["kernelspecs"], body
    config = body["kernelspecs"][KERNEL]["spec"]["metadata"]["kernel_provisioner"]["config"]
    return config.get("max_session_hours")  # type: ignore[no-any-return]


async def test_no_budget_chosen_is_the_hooks_default_everywhere(fetch_json: Any) -> None:
    assert SolanaEscrowHook().max_session_hours == DEFAULT_SESSION_HOURS
    _, prefs = await fetch_json("jupyter-io", "preferences")
    assert prefs["session_budget_hours"] == DEFAULT_SESSION_HOURS
    assert prefs["session_budget_is_default"] is True
    # Nothing in the kernelspec: its escrow hook takes that same default.
    assert await served_budget(fetch_json) is None
    _, prefs = await fetch_json(
        "jupyter-io", "preferences", method="PUT", body={"session_budget_hours": 2.5}
    )
    assert prefs["session_budget_hours"] == 2.5 and prefs["session_budget_is_default"] is False
    assert await served_budget(fetch_json) == 2.5


class TestConfiguredHookDefault:
    """The server configures ``c.SolanaEscrowHook.max_session_hours``: that is the default."""

    @pytest.fixture
    def jp_server_config(self, io_config: dict[str, Any]) -> dict[str, Any]:
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_io": True}},
            "JupyterIOExtension": io_config,
            "SolanaEscrowHook": {"max_session_hours": 3.0},
        }

    async def test_the_endpoint_shows_the_budget_the_kernels_hook_takes(
        self, fetch_json: Any, jp_serverapp: Any
    ) -> None:
        _, prefs = await fetch_json("jupyter-io", "preferences")
        assert prefs["session_budget_hours"] == prefs["session_budget_default_hours"] == 3.0
        assert prefs["session_budget_is_default"] is True
        assert await served_budget(fetch_json) is None
        # The hook a GPU kernel's provisioner makes, configured by this server, takes 3 h.
        from kernel_provisioner.provisioner import RemoteKernelProvisioner

        provisioner = RemoteKernelProvisioner(parent=jp_serverapp.kernel_manager)
        assert provisioner._new_hook().max_session_hours == 3.0  # type: ignore[attr-defined]
