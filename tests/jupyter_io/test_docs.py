"""The documents say what the code does: every REST route of the server extension and every
field of its preferences, and the lease token's claims and signing prefix."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from jupyter_io.leases import TOKEN_DOMAIN, LeaseClaims
from jupyter_io.serverext.handlers import handlers
from jupyter_io.serverext.preferences import Preferences

DOCS = Path(__file__).parents[2] / "docs"
README = Path(__file__).parents[2] / "README.md"


def test_every_server_extension_route_and_preference_is_documented() -> None:
    text = (DOCS / "server-extension-api.md").read_text()
    for route, handler in handlers():
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", route).lstrip("/").split("/", 1)[1]
        methods = [m for m in ("get", "put", "post", "delete") if m in vars(handler)]
        assert methods, handler
        for method in methods:
            assert f"`{method.upper()} {path}" in text or (
                f"{method.upper()} /jupyter-io/{path}" in text
            ), (method, path)
    for key in Preferences().to_json():
        assert f"`{key}`" in text, key
    assert "(server-extension-api.md)" in README.read_text().replace("docs/", "")


def test_the_lease_token_format_is_documented() -> None:
    text = (DOCS / "coordinator-contract.md").read_text()
    section = text[text.index("### The lease token") :]
    for name in ["v", *(f.name for f in fields(LeaseClaims))]:
        assert f"`{name}`" in section, name
    assert TOKEN_DOMAIN.decode().replace("\n", "\\n") in section
    assert f"the {len(TOKEN_DOMAIN)} bytes" in section
