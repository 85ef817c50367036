"""Statement building: checked identifiers, WHERE and ORDER BY, the statement cache.

No user-supplied string is ever formatted into SQL. Names are checked strictly (ASCII
letters, digits and underscore, not starting with a digit, at most 63 bytes; a table
may be ``schema.name``) and then quoted with ``psycopg2.sql.Identifier``. The check is
stricter than quoting alone because, with psycopg2, ``Identifier`` silently cuts a name
at a NUL byte, a ``%`` in a name breaks parameter substitution (psycopg2 issue 825), and
the server truncates names longer than 63 bytes, so two different keys could collide.

Statements are built once per *shape* (the table, the where keys and operators, the
columns, the order, whether there is a limit) and their rendered text is cached; the
values always travel separately as bound parameters.
"""

from __future__ import annotations

import re
import threading
from typing import (
    Any,
    Callable,
    Dict,
    Hashable,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from psycopg2 import sql

from .default import reinit_after_fork
from .errors import InvalidQuery

__all__ = [
    "Statement",
    "cached",
    "check_params",
    "compile_order_by",
    "compile_where",
    "equal_columns",
    "identifier",
    "params_mismatch",
    "statement",
    "table_identifier",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_IN_TYPES = (list, set, frozenset)
_SPECIAL = (list, set, frozenset, tuple)

# Operator conditions: {"score": (">", 0.5)}. The SQL on the right is fixed text.
_OPERATORS: Dict[str, str] = {
    "=": "{} = %s",
    "!=": "{} <> %s",
    "<>": "{} <> %s",
    "<": "{} < %s",
    "<=": "{} <= %s",
    ">": "{} > %s",
    ">=": "{} >= %s",
    "like": "{} LIKE %s",
    "ilike": "{} ILIKE %s",
    "not like": "{} NOT LIKE %s",
    "in": "{} = ANY(%s)",
    "not in": "{} <> ALL(%s)",
}
_IS_NULL = "{} IS NULL"
_IS_NOT_NULL = "{} IS NOT NULL"
# Marks a condition item of a where shape, ``(col, op, _COND)``; a bare item is an
# equality on that key. A caller's own tuple key, such as ("status", "null"), can
# never pass for a condition: it reaches ``identifier`` and is rejected as a name.
_COND = object()


def identifier(name: Any, what: str = "column") -> str:
    """``name`` if it is a valid plain identifier, else ``InvalidQuery``."""
    if not isinstance(name, str):
        raise InvalidQuery(f"{what} name must be a string, got {type(name).__name__}")
    if _NAME.fullmatch(name) is None:
        reason = (
            "longer than 63 bytes"
            if len(name.encode("utf-8", "replace")) > 63
            else "only ASCII letters, digits and _, not starting with a digit"
        )
        raise InvalidQuery(f"invalid {what} name {_show(name)}: {reason}")
    return name


def table_identifier(table: Any) -> sql.Identifier:
    """The quoted identifier of ``table`` or ``schema.table``, after validation."""
    if isinstance(table, str) and table.count(".") == 1:
        schema, name = table.split(".")
        return sql.Identifier(identifier(schema, "schema"), identifier(name, "table"))
    return sql.Identifier(identifier(table, "table"))


def _show(name: str) -> str:
    shown = repr(name)
    return shown if len(shown) <= 80 else shown[:77] + "..."


# ------------------------------------------------------------------ WHERE
def where_shape(
    where: Optional[Mapping[str, Any]],
) -> Tuple[Tuple[Any, ...], List[Any]]:
    """The shape key of a where dict, and its parameter values in order.

    ``{"col": v}`` is equality; ``None`` is IS NULL; a list, set or frozenset is
    membership (empty matches nothing); ``(op, value)`` with op from a fixed set is an
    operator condition. Runs on every call, so it only classifies; names are checked
    once per shape in :func:`compile_where`.
    """
    if not where:
        return (), []
    if type(where) is dict:
        # The common case, plain equality: the shape is the tuple of keys.
        values = list(where.values())
        for value in values:
            if value is None or isinstance(value, _SPECIAL):
                break
        else:
            return tuple(where), values
    elif not isinstance(where, Mapping):
        raise InvalidQuery(f"where must be a dict, got {type(where).__name__}")
    shape: List[Any] = []
    params: List[Any] = []
    for col, value in where.items():
        if value is None:
            shape.append((col, "null", _COND))
        elif (
            isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[0], str)
            and value[0] in _OPERATORS
        ):
            op, operand = value
            if operand is None and op in ("=", "!=", "<>"):
                shape.append((col, "null" if op == "=" else "notnull", _COND))
                continue
            if op in ("in", "not in"):
                operand = _as_list(col, operand)
            elif operand is None:
                raise InvalidQuery(f"where[{col!r}]: {op!r} cannot compare with None")
            shape.append((col, op, _COND))
            params.append(operand)
        elif isinstance(value, _SPECIAL):
            shape.append((col, "in", _COND))
            params.append(_as_list(col, value))
        else:
            shape.append(col)
            params.append(value)
    return tuple(shape), params


def equal_columns(shape: Tuple[Any, ...]) -> List[Any]:
    """The columns a where shape compares by plain equality to one value."""
    return [
        item[0] if type(item) is tuple else item
        for item in shape
        if type(item) is not tuple or (len(item) == 3 and item[1:] == ("=", _COND))
    ]


def _as_list(col: str, value: Any) -> List[Any]:
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        if any(v is None for v in items):
            raise InvalidQuery(
                f"where[{col!r}]: None in a membership list never matches; "
                f"use {{{col!r}: None}} for IS NULL"
            )
        return items
    raise InvalidQuery(f"where[{col!r}]: 'in' needs a list, got {type(value).__name__}")


def compile_where(shape: Tuple[Any, ...]) -> sql.Composable:
    """The WHERE clause (with the keyword) for a shape from :func:`where_shape`."""
    if not shape:
        return sql.SQL("")
    parts = []
    for item in shape:
        if type(item) is tuple and len(item) == 3 and item[2] is _COND:
            col, op = item[0], item[1]
        else:  # an equality; identifier() rejects a key that is not a name
            col, op = item, "="
        if op == "null":
            template = _IS_NULL
        elif op == "notnull":
            template = _IS_NOT_NULL
        else:
            template = _OPERATORS[op]
        parts.append(sql.SQL(template).format(sql.Identifier(identifier(col))))
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts)


# --------------------------------------------------------------- ORDER BY
_ORDER_TERM = re.compile(
    r"\s*(-)?\s*([^\s]+)(?:\s+(asc|desc))?(?:\s+nulls\s+(first|last))?\s*",
    re.IGNORECASE,
)

OrderBy = Union[None, str, Sequence[str]]


def compile_order_by(order_by: OrderBy) -> sql.Composable:
    """ORDER BY from ``"col"``, ``"-col"``, ``"col desc"``, ``"col asc nulls last"``.

    A list of these orders by each in turn. Anything else raises ``InvalidQuery``;
    nothing of the input reaches the SQL but validated, quoted names and fixed words.
    """
    if order_by is None:
        return sql.SQL("")
    terms = [order_by] if isinstance(order_by, str) else order_by
    if not isinstance(terms, (list, tuple)) or not terms:
        raise InvalidQuery(
            f"order_by must be a string or a list of strings: {order_by!r}"
        )
    parts = []
    for term in terms:
        if not isinstance(term, str):
            raise InvalidQuery(f"order_by terms must be strings, got {term!r}")
        m = _ORDER_TERM.fullmatch(term)
        if m is None:
            raise InvalidQuery(f"invalid order_by term {_show(term)}")
        minus, col, direction, nulls = m.groups()
        if minus and direction:
            raise InvalidQuery(f"order_by term {term!r} has both '-' and a direction")
        text = "{} DESC" if minus else "{} " + (direction or "asc").upper()
        if nulls:
            text += " NULLS " + nulls.upper()
        parts.append(sql.SQL(text).format(sql.Identifier(identifier(col))))
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(parts)


def order_key(order_by: OrderBy) -> Hashable:
    """A hashable stand-in for ``order_by`` in a cache key."""
    if order_by is None or isinstance(order_by, str):
        return order_by
    if isinstance(order_by, (list, tuple)):
        return tuple(order_by)
    raise InvalidQuery(f"order_by must be a string or a list of strings: {order_by!r}")


def columns_sql(columns: Optional[Iterable[str]]) -> sql.Composable:
    """``*`` or a quoted, validated column list."""
    if columns is None:
        return sql.SQL("*")
    if isinstance(columns, str):
        columns = [columns]
    elif not hasattr(columns, "__iter__"):  # 5, True: not a name, not a list
        raise InvalidQuery(f"columns must be a name or a list of names: {columns!r}")
    cols = [sql.Identifier(identifier(c)) for c in columns]
    if not cols:
        raise InvalidQuery("columns must name at least one column")
    return sql.SQL(", ").join(cols)


def returning_sql(returning: Union[str, Sequence[str], None]) -> sql.Composable:
    """`` RETURNING ...`` for ``"*"``, a column, or columns; empty for None."""
    if returning is None:
        return sql.SQL("")
    if returning == "*":
        return sql.SQL(" RETURNING *")
    return sql.SQL(" RETURNING ") + columns_sql(returning)


_BIGINT_MAX = 2**63 - 1


def check_count(value: Any, what: str) -> Optional[int]:
    """A LIMIT or OFFSET value: None or an int from 0 to 2**63 - 1 (the server's
    bigint); bools, strings and floats are rejected."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidQuery(f"{what} must be a non-negative integer, got {value!r}")
    if value > _BIGINT_MAX:
        raise InvalidQuery(f"{what} must be at most 2**63 - 1, got {value}")
    return value


_PLACEHOLDER = re.compile(r"%%|%\((?P<name>[^)]*)\)s|%s")


def params_mismatch(text: str, params: Any) -> str:
    """Why ``params`` does not fit the placeholders of ``text`` (for InvalidQuery)."""
    names: List[str] = []
    positional = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.group(0) == "%%":
            continue
        if m.group("name") is not None:
            names.append(m.group("name"))
        else:
            positional += 1
    if isinstance(params, Mapping):
        if positional:
            return (
                f"the statement has {_count(positional, 'positional placeholder')} "
                "(%s), which take a sequence of parameters, not a dict"
            )
        missing = sorted({n for n in names if n not in params})
        return (
            f"no parameter for the placeholders {missing}: the dict has "
            f"{sorted(map(str, params))}"
        )
    if names:
        return (
            f"the statement has named placeholders {sorted(set(names))}, which take "
            f"a dict of parameters, not {type(params).__name__}"
        )
    try:
        given = len(params)
    except TypeError:
        return (
            "params must be a sequence or a mapping, "
            f"not {type(params).__name__}: did you mean ({params!r},)?"
        )
    return (
        f"{_count(positional, 'placeholder')}, {_count(given, 'parameter')}: every "
        "%s takes one value (write %% for a literal %)"
    )


# What a transaction-mode pooler cannot give: state that outlives the transaction on
# one server connection, which the next transaction (maybe another client's) gets.
_SESSION_FEATURES = (
    (re.compile(r"^\s*(LISTEN|UNLISTEN)\b", re.I), "LISTEN (use the Worker's "
     "listen_dsn=, or Database(session_dsn=...))"),
    (re.compile(r"\bpg_(try_)?advisory_(un)?lock(_shared)?\s*\(", re.I),
     "a session advisory lock (use pg_advisory_xact_lock in a transaction)"),
    (re.compile(r"^\s*(SET|RESET)\s+(?!LOCAL\b)(?!TRANSACTION\b)", re.I),
     "a session SET (use SET LOCAL in a transaction)"),
    (re.compile(r"^\s*(PREPARE|DEALLOCATE)\b", re.I), "a prepared statement"),
    (re.compile(r"\bWITH\s+HOLD\b", re.I), "a WITH HOLD cursor"),
    (re.compile(r"^\s*CREATE\s+(GLOBAL\s+|LOCAL\s+)?TEMP(ORARY)?\s+TABLE\b"
                r"(?!.*\bON\s+COMMIT\s+DROP\b)", re.I | re.S),
     "a temporary table that outlives the transaction (add ON COMMIT DROP)"),
)  # fmt: skip


def check_no_session_state(text: str) -> None:
    """Refuse, with ``InvalidQuery``, a statement that needs a session of its own:
    behind a transaction-mode pooler its state would reach other clients."""
    for pattern, what in _SESSION_FEATURES:
        if pattern.search(text):
            raise InvalidQuery(
                f"{what} needs a session, which a transaction-mode pooler does not "
                "keep: the state would stay on a server connection other clients "
                "get next (this pool was made with pooler='transaction')"
            )


def check_params(params: Any) -> None:
    """Reject a string as raw ``params``: psycopg2 would take it as a sequence of
    characters."""
    if isinstance(params, (str, bytes)):
        raise InvalidQuery(
            f"params must be a sequence or a mapping, not {type(params).__name__}: "
            f"did you mean ({params!r},)?"
        )


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


# --------------------------------------------------------------- the cache
class Statement:
    """A statement built for one shape; rendered to text once, on first use."""

    __slots__ = ("composed", "text")

    def __init__(self, composed: sql.Composable) -> None:
        self.composed = composed
        self.text: Optional[str] = None

    def render(self, context: Any) -> str:
        """The SQL text (rendered with a connection or cursor on the first call)."""
        text = self.text
        if text is None:
            text = self.text = self.composed.as_string(context)
        return text


_cache: Dict[Hashable, Statement] = {}
_cache_lock = threading.Lock()
CACHE_SIZE = 4096
#: The cached statement for a key, or None (the facade's first look, in C).
cached = _cache.get


def _new_lock_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such
    # thread, so the copied lock would stay held for ever.
    global _cache_lock
    _cache_lock = threading.Lock()


reinit_after_fork(_new_lock_in_child)


def statement(key: Hashable, build: Callable[[], sql.Composable]) -> Statement:
    """The cached statement for ``key``, built (and its names validated) on a miss."""
    st = _cache.get(key)
    if st is None:
        st = Statement(build())
        with _cache_lock:
            if len(_cache) >= CACHE_SIZE:
                # Shapes come from code, not data, so a full cache means a program that
                # builds shapes dynamically; starting over keeps memory bounded.
                _cache.clear()
            _cache[key] = st
    return st
