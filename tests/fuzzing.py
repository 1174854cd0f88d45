"""Hypothesis strategies the fuzz tests (``tests/**/*_fuzz.py``) share: JSON as a hostile
peer writes it. Import it relatively (``from ..fuzzing import JSON, hostile_json``).

Random bytes seldom reach past a JSON parser's first check, and never reach its limits, so
these aim at them: nesting deeper than Python's recursion limit, integers longer than the
4300 digits ``int()`` converts, numbers past a float's range or a 64-bit column's, and
ordinary JSON values for the fields a parser does read.
"""

from __future__ import annotations

import json
import sys

from hypothesis import strategies as st

__all__ = ["EDGE_NUMBERS", "JSON", "hostile_json", "json_values"]

#: Numbers at the limits: 64-bit columns, a float's range, int()'s digit limit.
EDGE_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**63 - 1, 2**63, 2**64, 10**308, 10**309, 10**400, -(10**400),
     sys.float_info.max, -sys.float_info.max, 5e-324, -0.0]
)  # fmt: skip


def json_values(max_leaves: int = 10) -> st.SearchStrategy[object]:
    """Any JSON value (NaN and infinities included, as Python's json writes them)."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | EDGE_NUMBERS
        | st.floats()
        | st.text(max_size=16),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


JSON = json_values()


def hostile_json() -> st.SearchStrategy[bytes]:
    """Bytes a JSON parser must refuse or survive: deep nesting, very long integers, and
    JSON values (as bytes) for the parser's ordinary paths."""
    deep = st.builds(
        lambda opener, depth, tail: opener * depth + tail,
        st.sampled_from([b"[", b'{"a":', b'{"type":[']),
        st.integers(900, 5_000),
        st.sampled_from([b"", b"1", b"]" * 10]),
    )
    digits = st.builds(
        lambda sign, n, wrap: wrap.replace(b"N", sign + b"9" * n),
        st.sampled_from([b"", b"-"]),
        st.integers(4_000, 6_000),
        st.sampled_from([b"N", b"[N]", b'{"type":N}', b'{"a":N}']),
    )
    values = JSON.map(lambda value: json.dumps(value).encode())
    return st.one_of(deep, digits, values, st.binary(max_size=64))
