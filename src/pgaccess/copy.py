"""COPY text encoding for ``insert_many``: rows in, a COPY FROM STDIN buffer out.

Only values whose text form is exact and unambiguous are encoded (numbers, strings,
booleans, dates and times, UUIDs, decimals, None); for anything else ``copy_buffer``
returns None and the caller falls back to multi-row INSERTs, where psycopg2's own
adapters apply.
"""

from __future__ import annotations

import datetime
import decimal
import io
import math
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import DataError

__all__ = ["copy_buffer"]

_COPY_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_FLOAT_WORDS = {float("inf"): "Infinity", float("-inf"): "-Infinity"}


def _copy_str(v: str) -> str:
    if "\x00" in v:
        raise DataError(
            "a string value contains a NUL (0x00) byte, which text cannot hold"
        )
    return v.translate(_COPY_ESCAPE)


def _copy_float(v: float) -> str:
    if v != v:
        return "NaN"
    return _FLOAT_WORDS.get(v) or repr(v)


# Types whose COPY text form is exact and unambiguous; anything else (lists, dicts,
# bytes, custom adapters) goes through execute_values and psycopg2's own adaptation.
_COPY_FORMAT: Dict[type, Callable[[Any], str]] = {
    str: _copy_str,
    int: str,
    bool: lambda v: "t" if v else "f",
    float: _copy_float,
    decimal.Decimal: str,
    uuid.UUID: str,
    datetime.datetime: datetime.datetime.isoformat,
    datetime.date: datetime.date.isoformat,
    datetime.time: datetime.time.isoformat,
}


_NoneType = type(None)
_COPY_SPECIAL = ("\\", "\t", "\n", "\r", "\x00")


def _copy_column(values: Sequence[Any]) -> Optional[List[str]]:
    """One column of rows in COPY text form, or None if a value has no exact one.

    Column by column, so that the common case (every value of one type) is a ``map``
    over the column in C, not a dictionary lookup and a call per value.
    """
    types = set(map(type, values))
    nulls = _NoneType in types
    types.discard(_NoneType)
    if not types:
        return ["\\N"] * len(values)
    if len(types) > 1:
        return _copy_values(values)  # mixed, e.g. int and Decimal: value by value
    if nulls:  # encode the others as a column, then put the NULLs back
        present = _copy_column([v for v in values if v is not None])
        if present is None:
            return None
        encoded = iter(present)
        return ["\\N" if v is None else next(encoded) for v in values]
    kind = types.pop()
    if kind is str:
        text = "".join(values)
        if any(c in text for c in _COPY_SPECIAL):  # rare: escape (and check NUL)
            return [_copy_str(v) for v in values]
        return list(values)
    if kind is float:
        if all(map(math.isfinite, values)):
            return list(map(repr, values))
        return [_copy_float(v) for v in values]
    conv = _COPY_FORMAT.get(kind)
    if conv is None:
        return None
    return list(map(conv, values))


def _copy_values(values: Sequence[Any]) -> Optional[List[str]]:
    fmt = _COPY_FORMAT
    out = []
    for v in values:
        if v is None:
            out.append("\\N")
            continue
        conv = fmt.get(type(v))
        if conv is None:
            return None
        out.append(conv(v))
    return out


def copy_buffer(columns: Sequence[Sequence[Any]]) -> Optional[io.StringIO]:
    """Rows, given as their columns, in COPY text format; None if a value has no
    exact text form."""
    encoded = []
    for values in columns:
        column = _copy_column(values)
        if column is None:
            return None
        encoded.append(column)
    lines = list(map("\t".join, zip(*encoded)))
    lines.append("")
    return io.StringIO("\n".join(lines))
