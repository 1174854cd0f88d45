"""The user's side reads a journal object's pickle without unpickling it and lets through
only data constructors (:mod:`jupyter_io.journal.vetting`): forged pickles that would run
code, in every protocol and every way of naming an import, are held back; what the journal
writes for plain data passes."""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import io
import os
import pickle
import uuid
import zipfile
from typing import Any

import pytest

from jupyter_io.journal.snapshot import serialise
from jupyter_io.journal.vetting import pickle_globals, vet

np = pytest.importorskip("numpy")


class _Call:
    def __init__(self, target: Any, *args: Any) -> None:
        self.target, self.args = target, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.target, self.args)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize(
    ("target", "args"),
    [
        (os.system, ("true",)),
        (eval, ("1",)),
        (exec, ("pass",)),
        (getattr, (1, "real")),
        (__import__, ("os",)),
    ],
)
def test_a_pickle_that_calls_code_is_held_back_in_every_protocol(
    protocol: int, target: Any, args: tuple[Any, ...]
) -> None:
    data = pickle.dumps({"x": [1, _Call(target, *args)]}, protocol=protocol)
    why = vet("pickle", data)
    assert why == f"the previous provider's pickle references {target.__module__}.{target.__name__}"


def test_imports_whose_names_are_not_plain_constants_are_held_back() -> None:
    # STACK_GLOBAL's names from the memo are read through it...
    memo = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94h\x00h\x01\x93."
    assert pickle_globals(memo) == ["posix.system"]
    # ...but names that are built (here 'posix' + '' by a REDUCE) cannot be, and are refused.
    built = b"\x80\x04\x8c\x08builtins\x8c\x03str\x93\x8c\x05posix\x85R\x8c\x06system\x93."
    assert "computed" in (vet("pickle", built) or "")
    # The extension registry and persistent ids are not data either.
    assert "extension registry" in (vet("pickle", b"\x80\x02\x82\x01)R.") or "")
    assert "persistent id" in (vet("pickle", b"\x80\x02K\x01Q.") or "")
    assert "not a readable pickle" in (vet("pickle", b"\x80\x04\x95\xff") or "")


def test_plain_data_passes() -> None:
    values = [
        {"a": [1, 2, 3], "b": ("x", 2.5, None, True)},
        {1, 2},
        frozenset({3}),
        1 + 2j,
        b"bytes",
        bytearray(b"x"),
        range(3),
        slice(1, 2),
        collections.OrderedDict(a=1),
        collections.defaultdict(list, {1: [2]}),
        collections.Counter("aab"),
        collections.deque([1]),
        datetime.datetime.now(datetime.timezone.utc),
        datetime.date(2026, 12, 6),
        datetime.timedelta(seconds=3),
        decimal.Decimal("1.25"),
        fractions.Fraction(1, 3),
        uuid.uuid4(),
        np.arange(5),
        np.array([1, "a"], dtype=object),
        np.float32(1.5),
        np.dtype("f4"),
        {"arrays": [np.zeros(3), np.ones((2, 2))]},
    ]
    for value in values:
        saved = serialise(value)
        assert vet(saved.kind, saved.data) is None, (value, saved.kind)


def test_pandas_frames_and_series_pass() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {"a": [1, 2], "b": ["x", "y"], "c": pd.to_datetime(["2020-01-01", "2021-06-01"])}
    )
    for value in (frame, frame.set_index("b"), pd.Series([1.5, 2.5], name="s")):
        saved = serialise(value)
        assert vet(saved.kind, saved.data) is None


def test_code_defined_in_the_notebook_is_named() -> None:
    pytest.importorskip("cloudpickle")
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def f(x):\n    return x + 1\nclass P:\n    pass\np = P()", namespace)
    for name in ("f", "P", "p"):
        saved = serialise(namespace[name])
        assert "references cloudpickle.cloudpickle._make_" in (vet(saved.kind, saved.data) or "")


def _torch_archive(records: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return buf.getvalue()


def test_tensors_in_the_journals_format_pass_and_forged_archives_do_not() -> None:
    torch = pytest.importorskip("torch")
    for tensor in (torch.randn(3, 4), torch.nn.Parameter(torch.ones(2)), torch.eye(2).to_sparse()):
        saved = serialise(tensor)
        assert saved.kind == "torch" and vet("torch", saved.data) is None
    evil = pickle.dumps(_Call(os.system, "true"), protocol=2)
    assert vet("torch", _torch_archive({"archive/data.pkl": evil})) == (
        f"the previous provider's pickle references {os.system.__module__}.system"
    )
    # TorchScript and second pickles are refused by name; so is a legacy (non-zip) file.
    good = serialise(torch.ones(1)).data
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    prefix = next(iter(records)).split("/")[0]
    for extra in ("constants.pkl", "code/__torch__.py"):
        forged = _torch_archive({**records, f"{prefix}/{extra}": b""})
        assert f"holds '{prefix}/{extra}'" in (vet("torch", forged) or "")
    assert "not a torch archive" in (vet("torch", evil) or "")
    # A tensor inside a container is pickled with its storage as a nested legacy archive
    # (torch.storage._load_from_bytes on bytes): read the same way, it passes...
    saved = serialise({"w": torch.ones(2), "b": [torch.arange(3)[1:]]})
    assert saved.kind == "pickle" and vet(saved.kind, saved.data) is None
    # ...and a forged one is held back, as is the loader called on anything but a constant.
    legacy = b"".join(
        pickle.dumps(part, protocol=2) for part in (1, 1001, {}, _Call(os.system, "true"), [])
    )
    nested = pickle.dumps({"w": _Call(torch.storage._load_from_bytes, legacy)}, protocol=5)
    assert vet("pickle", nested) == (
        f"the previous provider's pickle references {os.system.__module__}.system"
    )
    built = pickle.dumps(_Call(torch.storage._load_from_bytes, bytearray(legacy)), protocol=5)
    assert "on anything but a bytes constant" in (vet("pickle", built) or "")


def test_numpy_objects_must_be_npy_arrays() -> None:
    assert vet("numpy", serialise(np.arange(3)).data) is None
    assert "not a .npy array" in (vet("numpy", pickle.dumps(np.arange(3))) or "")
    assert "unknown kind" in (vet("exe", b"") or "")
