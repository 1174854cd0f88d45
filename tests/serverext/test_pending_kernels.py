"""Pending kernels: the extension turns them on, so Lab can queue a cell run while a remote
kernel starts, unless the server's configuration says otherwise."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def jp_server_config(io_config: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_io": True}},
        "JupyterIOExtension": io_config,
        **getattr(request, "param", {}),
    }


async def test_pending_kernels_are_on_with_the_extension(jp_serverapp: Any) -> None:
    assert jp_serverapp.kernel_manager.use_pending_kernels is True


@pytest.mark.parametrize(
    "jp_server_config",
    [{"MappingKernelManager": {"use_pending_kernels": False}}],
    indirect=True,
)
async def test_a_configured_choice_is_left_alone(jp_serverapp: Any) -> None:
    assert jp_serverapp.kernel_manager.use_pending_kernels is False


@pytest.mark.parametrize("io_config", [{"pending_kernels": False}], indirect=True)
async def test_the_extension_can_be_told_not_to(jp_serverapp: Any) -> None:
    assert jp_serverapp.kernel_manager.use_pending_kernels is False
