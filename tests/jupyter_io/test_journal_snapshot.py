"""The state journal's kernel side (jupyter_io.journal) in a real IPython shell: which
variables are kept and how, what is recorded as missing with its cell, dedup, unchanged cells,
exclusions, and a restore into another shell."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell

from jupyter_io.journal import kernel_ext
from jupyter_io.journal.kernel_ext import Journal
from jupyter_io.journal.snapshot import JOURNAL_DIR, Manifest, is_user_variable, serialise


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    sh.reset(new_session=True)
    yield sh
    sh.reset(new_session=True)


@pytest.fixture
def journal(shell: InteractiveShell, tmp_path: Path) -> Iterator[Journal]:
    j = Journal(shell, str(tmp_path))
    shell.events.register("post_run_cell", j.post_run_cell)
    yield j
    shell.events.unregister("post_run_cell", j.post_run_cell)
    j.close()


def run(shell: InteractiveShell, journal: Journal, source: str) -> Any:
    result = shell.run_cell(source, store_history=True)
    assert result.success, result.error_in_exec
    assert journal.flush(30)
    return result


def manifest(root: Path) -> Manifest:
    return Manifest.parse((root / JOURNAL_DIR / "manifest.json").read_text())


def objects(root: Path) -> list[str]:
    return sorted(os.listdir(root / JOURNAL_DIR / "objects"))


def test_variables_of_each_kind_are_kept_and_the_unpicklable_recorded_with_their_cell(
    shell: InteractiveShell, journal: Journal, tmp_path: Path
) -> None:
    run(shell, journal, "import numpy as np, torch, os\nn = 42\nd = {'a': [1, 2], 'b': 'x'}")
    run(shell, journal, "a = np.arange(1000, dtype=np.float32)\nt = torch.randn(64, 64)")
    run(shell, journal, "class Point:\n    def __init__(self, x): self.x = x\np = Point(3)")
    gen_cell = "gen = (i for i in range(3))"
    run(shell, journal, gen_cell)
    run(shell, journal, f"fh = open({str(tmp_path / 'log.txt')!r}, 'w')")  # a file being written
    m = manifest(tmp_path)
    assert set(m.vars) == {"n", "d", "a", "t", "p", "Point"}
    assert {m.vars[k]["kind"] for k in ("a", "t", "n")} == {"numpy", "torch", "pickle"}
    assert m.missing["gen"]["source"] == gen_cell and m.missing["gen"]["cell"] == 4
    assert "generator" in m.missing["gen"]["why"]
    assert m.missing["fh"]["cell"] == 5
    for name in ("np", "torch", "os", "In", "Out", "_", "__builtins__"):
        assert name not in m.vars and name not in m.missing
    assert set(objects(tmp_path)) == m.objects()

    # Restored into a fresh shell (the class travels by value: no re-run of its cell).
    shell.run_cell("fh.close()")
    saved = {k: shell.user_ns[k] for k in ("n", "d", "a", "t")}
    shell.reset(new_session=True)
    other = Journal(shell, str(tmp_path))
    try:
        answer = other.restore()
    finally:
        other.close()
    assert answer["restored"] == ["Point", "a", "d", "n", "p", "t"]
    assert {x["name"] for x in answer["missing"]} == {"gen", "fh"}
    ns = shell.user_ns
    assert ns["n"] == saved["n"] and ns["d"] == saved["d"]
    assert np.array_equal(ns["a"], saved["a"]) and torch.equal(ns["t"], saved["t"])
    assert ns["p"].x == 3 and type(ns["p"]).__name__ == "Point"


def test_the_same_tensor_under_two_names_is_stored_once(
    shell: InteractiveShell, journal: Journal, tmp_path: Path
) -> None:
    run(shell, journal, "import torch\nbig = torch.randn(256, 1024)\nalias = big")
    m = manifest(tmp_path)
    assert m.vars["big"]["sha256"] == m.vars["alias"]["sha256"]
    assert len(objects(tmp_path)) == 1
    assert m.total == m.vars["big"]["size"] > 256 * 1024 * 4


def test_a_cell_that_changes_nothing_writes_nothing_and_in_place_writes_are_seen(
    shell: InteractiveShell, journal: Journal, tmp_path: Path
) -> None:
    run(shell, journal, "import torch\nt = torch.zeros(100)\nxs = [1]")
    seq = manifest(tmp_path).seq
    run(shell, journal, "1 + 1")
    assert manifest(tmp_path).seq == seq  # nothing queued, nothing written
    old = manifest(tmp_path).vars["t"]["sha256"]
    run(shell, journal, "t.add_(1)")  # in place: the version counter moved
    run(shell, journal, "xs.append(2)")  # in place: the cell names it
    m = manifest(tmp_path)
    assert m.vars["t"]["sha256"] != old and m.vars["t"]["cell"] == 3
    assert m.vars["xs"]["cell"] == 4
    assert objects(tmp_path) == sorted(m.objects())  # the replaced tensor's object is gone


def test_excluded_names_and_journal_off_are_honoured(
    shell: InteractiveShell, journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_ext, "_journal", journal)

    def jj(line: str) -> None:
        print(kernel_ext.journal_magic(line.split()))

    shell.register_magic_function(jj, "line", "jj")  # type: ignore[arg-type]
    run(shell, journal, "secret = 'x' * 100\nkept = 1")
    assert "secret" in manifest(tmp_path).vars
    run(shell, journal, "%jj exclude secret")
    assert "secret" not in manifest(tmp_path).vars
    run(shell, journal, "secret = 'y'\nkept = 2")
    m = manifest(tmp_path)
    assert "secret" not in m.vars and "secret" not in m.missing
    assert m.vars["kept"]["cell"] == 3
    run(shell, journal, "%jj off")
    seq = m.seq
    run(shell, journal, "later = 5")
    assert manifest(tmp_path).seq == seq and "later" not in manifest(tmp_path).vars


def test_a_variable_over_the_cap_is_recorded_missing(
    shell: InteractiveShell, tmp_path: Path
) -> None:
    j = Journal(shell, str(tmp_path), max_bytes=64 * 1024)
    shell.events.register("post_run_cell", j.post_run_cell)
    try:
        run(shell, j, "import numpy as np\nsmall = 1\nhuge = np.zeros(100_000)")
    finally:
        shell.events.unregister("post_run_cell", j.post_run_cell)
        j.close()
    m = manifest(tmp_path)
    assert "small" in m.vars and "cap" in m.missing["huge"]["why"]


def test_what_is_a_user_variable() -> None:
    assert not is_user_variable("json", json)
    assert not is_user_variable("dumps", json.dumps)
    assert not is_user_variable("_i3", "x") and not is_user_variable("__", 1)

    def mine() -> None: ...

    mine.__module__ = "__main__"
    assert is_user_variable("mine", mine) and is_user_variable("x", 1)
    assert serialise(torch.ones(3)).kind == "torch"
    assert serialise(np.ones(3)).kind == "numpy"


class _Planted:
    """What a hostile provider could write as a "torch" journal object: torch.save pickles
    any object, and this one's unpickling runs code (it would create ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_torch_object_is_loaded_without_running_pickled_code(tmp_path: Path) -> None:
    import io

    from jupyter_io.journal.snapshot import load_object

    weights = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    kept = serialise(weights)
    back = load_object(kept.kind, kept.data)
    assert torch.equal(back, weights) and isinstance(back, torch.nn.Parameter)

    marker = tmp_path / "ran"
    forged = io.BytesIO()
    torch.save(_Planted(marker), forged)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        load_object("torch", forged.getvalue())
    assert not marker.exists()
