"""Which journal objects may be loaded into a kernel the previous provider did not run.

A journal object is written by the kernel on provider A and, after a failover, loaded by
the kernel on provider B (:func:`jupyter_io.journal.snapshot.load_object`). Unpickling runs
whatever callables the pickle names: a hostile provider A could forge an object whose
pickle calls ``os.system`` in the user's next kernel. The user's side therefore reads each
object *without unpickling it* (:mod:`pickletools` walks the opcodes) and lets through only
objects whose every imported name is a data constructor on :data:`ALLOWED_GLOBALS`:

* ``numpy`` objects (``np.save`` without pickles) always;
* ``torch`` objects (``torch.save``'s zip) whose ``data.pkl`` names only tensor rebuilders,
  storages and ``collections.OrderedDict``, and whose archive holds nothing else torch would
  read as code (no TorchScript, no second pickle);
* ``pickle`` objects whose ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` targets are all allowed:
  builtins' containers and scalars, ``collections``, ``datetime``, ``decimal``, ``fractions``,
  ``uuid``, numpy arrays, dtypes and scalars, pandas frames, series, indexes and their
  arrays (pandas 2 and 3 names). A ``STACK_GLOBAL`` whose two names are not constants just
  before it cannot be read statically and is refused; so are the extension registry
  (``EXT1/2/4``) and persistent ids outside torch's archive.

A tensor inside a container is pickled by torch with its storage as
``torch.storage._load_from_bytes(<a nested archive>)``: the loader is allowed only when called
on a bytes constant, which is then read the same way (:func:`_vet_storage`).

Anything else (a function or class defined in the notebook, which cloudpickle carries by
value; an object of any other library) is *not restored*: :func:`vet` says which name stopped it,
and the failover notice offers to re-run the cell that made it. Allowing a name is a promise
that calling it with any arguments, or setting any state on what it returns, runs no code
but that of allowed names; add names with that in mind.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import re
import zipfile
from typing import IO, Any

__all__ = ["ALLOWED_GLOBALS", "TORCH_GLOBALS", "pickle_globals", "vet"]

_BUILTINS = {
    f"builtins.{name}"
    for name in (
        "bool",
        "bytearray",
        "bytes",
        "complex",
        "dict",
        "Ellipsis",
        "float",
        "frozenset",
        "int",
        "list",
        "NotImplemented",
        "object",
        "range",
        "set",
        "slice",
        "str",
        "tuple",
    )
}
_STDLIB = {
    "collections.Counter",
    "collections.OrderedDict",
    "collections.defaultdict",
    "collections.deque",
    "copyreg._reconstructor",
    "datetime.date",
    "datetime.datetime",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal",
    "fractions.Fraction",
    "uuid.SafeUUID",
    "uuid.UUID",
}
_NUMPY = {
    f"{module}.{name}"
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    "numpy.core.numeric._frombuffer",
    "numpy._core.numeric._frombuffer",
    "numpy.dtype",
    "numpy.ndarray",
}
# Classes and the module-level reconstructors pandas pickles name (pandas 3 by their public
# names, pandas 2 by their modules). Each builds data from data.
_PANDAS_CLASSES = {
    "Categorical": "core.arrays.categorical",
    "CategoricalDtype": "core.dtypes.dtypes",
    "CategoricalIndex": "core.indexes.category",
    "DataFrame": "core.frame",
    "DatetimeIndex": "core.indexes.datetimes",
    "DatetimeTZDtype": "core.dtypes.dtypes",
    "Index": "core.indexes.base",
    "Int64Dtype": "core.arrays.integer",
    "Float64Dtype": "core.arrays.floating",
    "BooleanDtype": "core.arrays.boolean",
    "IntervalIndex": "core.indexes.interval",
    "MultiIndex": "core.indexes.multi",
    "PeriodDtype": "core.dtypes.dtypes",
    "PeriodIndex": "core.indexes.period",
    "RangeIndex": "core.indexes.range",
    "Series": "core.series",
    "StringDtype": "core.arrays.string_",
    "TimedeltaIndex": "core.indexes.timedeltas",
}
_PANDAS_ARRAYS = {
    "BooleanArray": "core.arrays.boolean",
    "DatetimeArray": "core.arrays.datetimes",
    "FloatingArray": "core.arrays.floating",
    "IntegerArray": "core.arrays.integer",
    "PeriodArray": "core.arrays.period",
    "StringArray": "core.arrays.string_",
    "TimedeltaArray": "core.arrays.timedeltas",
}
_PANDAS = (
    {f"pandas.{name}" for name in _PANDAS_CLASSES}
    | {f"pandas.{module}.{name}" for name, module in _PANDAS_CLASSES.items()}
    | {f"pandas.arrays.{name}" for name in _PANDAS_ARRAYS}
    | {f"pandas.{module}.{name}" for name, module in _PANDAS_ARRAYS.items()}
    | {
        "pandas.NA",
        "pandas._libs.missing.NA",
        "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
        "pandas._libs.internals._unpickle_block",
        "pandas._libs.tslibs.nattype._nat_unpickle",
        "pandas._libs.tslibs.nattype.__nat_unpickle",
        "pandas._libs.tslibs.timestamps._unpickle_timestamp",
        "pandas._libs.tslibs.timedeltas._timedelta_unpickle",
        "pandas.core.indexes.base._new_Index",
        "pandas.core.indexes.datetimes._new_DatetimeIndex",
        "pandas.core.indexes.interval._new_IntervalIndex",
        "pandas.core.internals.managers.BlockManager",
        "pandas.core.internals.managers.SingleBlockManager",
    }
    | {
        f"pandas._libs.tslibs.offsets.{name}"
        for name in (
            *("Day", "Hour", "Minute", "Second", "Milli", "Micro", "Nano"),
            *("MonthEnd", "MonthBegin", "YearEnd", "YearBegin", "Week", "BusinessDay"),
        )
    }
)
_TORCH_STORAGES = {
    f"torch.{kind}Storage"
    for kind in (
        "Float",
        "Double",
        "Half",
        "BFloat16",
        "Long",
        "Int",
        "Short",
        "Char",
        "Byte",
        "Bool",
        "ComplexFloat",
        "ComplexDouble",
        "Untyped",
    )
}
#: What ``torch.save``'s ``data.pkl`` may name (with ``collections.OrderedDict``).
TORCH_GLOBALS = frozenset(
    _TORCH_STORAGES
    | {
        "torch.Size",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch.serialization._get_layout",
        "collections.OrderedDict",
    }
)
#: The names a journal object's pickle may import without being held back (torch's storage
#: loader only as :func:`_scan` lets it be used: on a bytes constant read the same way).
ALLOWED_GLOBALS = frozenset(
    _BUILTINS | _STDLIB | _NUMPY | _PANDAS | TORCH_GLOBALS | {"torch.storage._load_from_bytes"}
)

_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE"} | {
    "BINUNICODE",
    "BINUNICODE8",
}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_STACK_EFFECT = {"PROTO", "FRAME", "STOP"}
_TORCH_RECORD = re.compile(
    r"(data\.pkl|data/\d+|version|\.format_version|\.storage_alignment|byteorder"
    r"|\.data/serialization_id|\.data/version)"
)


class _Refused(Exception):
    pass


def pickle_globals(data: bytes | IO[bytes], *, persistent_ids: bool = False) -> list[str]:
    """The ``module.name`` of every global ``data``'s pickle imports, in order, read from
    its opcodes (nothing is unpickled). Raises ValueError for what cannot be read
    statically: a ``STACK_GLOBAL`` whose names are not constants pushed just before it, the
    extension registry, persistent ids (unless ``persistent_ids``: torch's archive),
    ``torch.storage._load_from_bytes`` called other than on a bytes constant, or a
    malformed pickle. A file is read up to its pickle's ``STOP``."""
    return _scan(data, persistent_ids)[0]


class _Global:
    """A global the pickle pushed (kept to follow torch's storage loader)."""

    def __init__(self, name: str) -> None:
        self.name = name


_LOADER = "torch.storage._load_from_bytes"
_BYTES = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}


def _scan(
    data: bytes | IO[bytes], persistent_ids: bool, frames: bool = True
) -> tuple[list[str], list[bytes]]:
    """``(globals imported, payloads torch's storage loader is called on)``. Without
    ``frames`` a ``FRAME`` is refused (in a file of several pickles an unpickler reads a
    whole frame, so a frame running past ``STOP`` would hide where the next pickle starts)."""
    names: list[str] = []
    payloads: list[bytes] = []
    proto = 0  # below 3 the unpickler renames Python 2 imports (fix_imports), as here
    memo: dict[int, Any] = {}
    # Values of the ops since the last one that did more than push one value: the stack's
    # top entries as far as they are known (a str, a _Global, bytes, or None for the rest).
    pushed: list[Any] = []
    # After the loader is pushed the only ops allowed are a bytes constant, TUPLE1, REDUCE:
    # it is called on those bytes, which are then read the same way (_vet_storage).
    expect: str | None = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "PROTO":
                proto = int(str(arg))
            elif name == "FRAME" and not frames:
                raise _Refused("a frame in a file of several pickles")
            if name in _NO_STACK_EFFECT:
                continue
            if name == "MEMOIZE" or name in _MEMO_PUTS:
                key = len(memo) if name == "MEMOIZE" else int(str(arg))
                memo[key] = pushed[-1] if pushed else None
                continue
            if expect is not None:
                if expect != name and not (expect == "BYTES" and name in _BYTES):
                    raise _Refused(f"{_LOADER} on anything but a bytes constant")
                if name in _BYTES:
                    payloads.append(bytes(arg))  # type: ignore[arg-type]
                expect = {"BYTES": "TUPLE1", "TUPLE1": "REDUCE"}.get(expect)
            if name in _STRINGS:
                pushed.append(str(arg))
            elif name in _MEMO_GETS:
                pushed.append(memo.get(int(str(arg))))
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                names.append(_imported(module, attr, proto))
                pushed = [*pushed, _Global(names[-1])] if name == "GLOBAL" else []
            elif name == "MARK":
                pushed = []  # the unpickler starts a new stack above the mark
            elif name == "STACK_GLOBAL":
                pair: list[Any] = pushed[-2:] if len(pushed) >= 2 else [None, None]
                if not isinstance(pair[0], str) or not isinstance(pair[1], str):
                    raise _Refused("an import whose name is computed")
                names.append(_imported(pair[0], pair[1], proto))
                pushed = [_Global(names[-1])]
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise _Refused("the pickle extension registry")
            elif name in ("PERSID", "BINPERSID") and not persistent_ids:
                raise _Refused("a persistent id")
            elif op.stack_before == [] and len(op.stack_after) == 1:
                pushed.append(None)  # a constant or an empty container
            else:
                pushed = []
            if pushed and isinstance(pushed[-1], _Global) and pushed[-1].name == _LOADER:
                expect = "BYTES"
        if expect is not None:
            raise _Refused(f"{_LOADER} left uncalled")
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # genops: truncated or unknown opcodes
        raise ValueError(f"not a readable pickle ({exc})") from None
    return names, payloads


def _imported(module: str, attr: str, proto: int) -> str:
    """What the unpickler imports for ``module`` and ``attr``: Python 2's names mapped as
    ``pickle.loads`` maps them (``__builtin__`` is ``builtins``), a dotted ``attr`` kept
    whole (never on the allowlist: an attribute path is not a data constructor)."""
    if proto < 3:
        if (module, attr) in _compat_pickle.NAME_MAPPING:
            module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{attr}" if "." not in attr else f"{module}:{attr}"


def _first_refused(names: list[str], allowed: frozenset[str]) -> str | None:
    for name in names:
        if name not in allowed:
            return name
    return None


def _vet_pickled(
    data: bytes | IO[bytes],
    allowed: frozenset[str],
    *,
    persistent_ids: bool = False,
    frames: bool = True,
    depth: int = 0,
) -> str | None:
    try:
        names, payloads = _scan(data, persistent_ids, frames)
    except ValueError as exc:
        return f"the previous provider's pickle uses {exc}"
    refused = _first_refused(names, allowed)
    if refused is not None:
        return f"the previous provider's pickle references {refused}"
    for payload in payloads:
        why = _vet_storage(payload, depth + 1)
        if why is not None:
            return why
    return None


def _vet_storage(payload: bytes, depth: int) -> str | None:
    """What ``torch.storage._load_from_bytes`` loads (``torch.load`` of the bytes, not
    weights-only): a torch archive, or the legacy format: five pickles in a row (magic
    number, protocol, system information, the storage with its persistent id, the storage
    keys), then raw data. How torch pickles a tensor inside a container."""
    if depth > 1:
        return f"the previous provider's pickle nests {_LOADER}"
    if payload.startswith(b"PK\x03\x04"):
        return _vet_torch(payload, depth)
    stream = io.BytesIO(payload)
    for index in range(5):
        why = _vet_pickled(
            stream, TORCH_GLOBALS, persistent_ids=index == 3, frames=False, depth=depth
        )
        if why is not None:
            return why
    return None


def _vet_torch(data: bytes, depth: int = 0) -> str | None:
    if not data.startswith(b"PK\x03\x04"):  # torch.load reads anything else as legacy pickles
        return "the previous provider's tensor is not a torch archive"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.namelist()
            if len(set(records)) != len(records):
                return "the previous provider's tensor archive names a file twice"
            prefix = records[0].split("/", 1)[0] if records else ""
            for record in records:
                head, _, rest = record.partition("/")
                if head != prefix or not _TORCH_RECORD.fullmatch(rest):
                    return f"the previous provider's tensor archive holds {record!r}"
            pickled = archive.read(f"{prefix}/data.pkl")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        return f"the previous provider's tensor is not a torch archive ({exc})"
    return _vet_pickled(pickled, TORCH_GLOBALS, persistent_ids=True, depth=depth)


def vet(kind: str, data: bytes) -> str | None:
    """None when a journal object of ``kind`` (``torch``, ``numpy``, ``pickle``) may be
    loaded in a kernel that did not write it; else why not, in words for the user (``the
    previous provider's pickle references os.system``)."""
    if kind == "numpy":
        if data.startswith(b"\x93NUMPY"):
            return None  # np.load(allow_pickle=False) reads arrays of plain dtypes only
        return "the previous provider's array is not a .npy array"
    if kind == "torch":
        return _vet_torch(data)
    if kind == "pickle":
        return _vet_pickled(data, ALLOWED_GLOBALS)
    return f"the previous provider's object is of an unknown kind {kind!r}"
