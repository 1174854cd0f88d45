"""The provider reads the requests a kernel leaves for ``%io pull``/``%io push``: a tenant
writes that file, so its paths are checked and a link in its place is not followed."""

from __future__ import annotations

import json
from pathlib import Path

from provider_host.files import take_requests


def test_requests_are_checked_and_consumed(tmp_path: Path) -> None:
    (tmp_path / ".jupyter-io").mkdir()
    lines = [
        {"op": "pull", "path": "../../etc/passwd"},
        {"op": "push", "path": "/etc/shadow"},
        {"op": "pull", "path": "out/model.pt"},
        {"op": "pull", "path": "out/model.pt"},
        {"op": "push", "path": "data.csv"},
        {"op": "delete", "path": "data.csv"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    (tmp_path / ".jupyter-io" / "requests.jsonl").write_text(text)
    assert take_requests(str(tmp_path)) == (["out/model.pt"], ["data.csv"])
    assert not (tmp_path / ".jupyter-io" / "requests.jsonl").exists()
    assert take_requests(str(tmp_path)) == ([], [])


def test_a_linked_requests_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jsonl"
    target.write_text(json.dumps({"op": "pull", "path": "x"}) + "\n")
    workspace = tmp_path / "ws"
    (workspace / ".jupyter-io").mkdir(parents=True)
    (workspace / ".jupyter-io" / "requests.jsonl").symlink_to(target)
    assert take_requests(str(workspace)) == ([], [])
    assert target.exists()
