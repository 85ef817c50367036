"""The facade's methods, shared by ``Database`` and ``Transaction``.

One implementation of ``insert``, ``find_one``, ... ; only the executor differs: a
``Database`` runs each call as one autocommit statement on a pooled connection, a
``Transaction`` runs it on the connection it holds. Subclasses implement ``_run`` (one
cached statement, the hot path) and ``_call`` (anything else done with a cursor).
"""

from __future__ import annotations

import datetime
import decimal
import io
import logging
import math
import operator
import threading
import uuid
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from . import sql as q
from .errors import (
    DataError,
    InvalidQuery,
    SerializationFailure,
    UnknownColumn,
    UnknownTable,
    suggest,
)
from .retry import table_policy

__all__ = ["Operations", "Row"]

logger = logging.getLogger("pgaccess.database")

T = TypeVar("T")
Row = Dict[str, Any]
Params = Union[None, Sequence[Any], Mapping[str, Any]]

# Result modes of _run.
ONE, ROWS, SCALAR, ROWCOUNT = range(4)


def _names(cur: Any) -> List[str]:
    # d.name, not d[0]: psycopg2's Column.__getitem__ costs six times the attribute,
    # which on a 16-column row was most of the facade's overhead per call.
    return [d.name for d in cur.description]


def fetch_one(cur: Any) -> Optional[Row]:
    row = cur.fetchone()
    return None if row is None else dict(zip(_names(cur), row))


def fetch_rows(cur: Any) -> List[Row]:
    if cur.description is None:
        return []
    names = _names(cur)
    return [dict(zip(names, row)) for row in cur.fetchall()]


def fetch_scalar(cur: Any) -> Any:
    row = cur.fetchone()
    return None if row is None else row[0]


def fetch_rowcount(cur: Any) -> int:
    return int(cur.rowcount)


FETCH: Tuple[Callable[[Any], Any], ...] = (
    fetch_one,
    fetch_rows,
    fetch_scalar,
    fetch_rowcount,
)


# ------------------------------------------------------------ statistics
class QueryStats:
    """Per statement shape: calls, total and max milliseconds, errors (all threads)."""

    __slots__ = ("calls", "errors", "max_ms", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0


_stats: Dict[str, QueryStats] = {}
_stats_lock = threading.Lock()


def record(text: str, elapsed: float, failed: bool, slow_ms: Optional[float]) -> None:
    """Count one execution of ``text`` (seconds ``elapsed``); log it if slow."""
    ms = elapsed * 1000.0
    with _stats_lock:
        st = _stats.get(text)
        if st is None:
            if len(_stats) >= q.CACHE_SIZE:
                _stats.clear()
            st = _stats[text] = QueryStats()
        st.calls += 1
        st.total_ms += ms
        if ms > st.max_ms:
            st.max_ms = ms
        if failed:
            st.errors += 1
    if slow_ms is not None and ms >= slow_ms:
        logger.warning("slow query: %.1f ms: %s", ms, " ".join(text.split())[:500])


def query_stats(top: Optional[int] = 20) -> List[Dict[str, Any]]:
    """The ``top`` statements by total time (all of them for None), with counts."""
    with _stats_lock:
        items = [
            {
                "statement": " ".join(text.split()),
                "calls": st.calls,
                "total_ms": round(st.total_ms, 3),
                "mean_ms": round(st.total_ms / st.calls, 3) if st.calls else 0.0,
                "max_ms": round(st.max_ms, 3),
                "errors": st.errors,
            }
            for text, st in _stats.items()
        ]
    items.sort(key=lambda s: s["total_ms"], reverse=True)  # type: ignore[arg-type,return-value]
    return items if top is None else items[:top]


# ------------------------------------------------------------------ COPY
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


def _copy_buffer(columns: Sequence[Sequence[Any]]) -> Optional[io.StringIO]:
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


# -------------------------------------------------------------- the facade
class Operations:
    """The facade's methods; a subclass supplies the executor (``_run``, ``_call``)."""

    def _run(self, st: q.Statement, params: Params, mode: int, write: bool) -> Any:
        raise NotImplementedError

    def _read(self, st: q.Statement, params: Params, mode: int) -> Any:
        return self._run(st, params, mode, False)

    def _call(self, fn: Callable[[Any], T], text: str, write: bool) -> T:
        raise NotImplementedError

    def _atomic(self, fn: Callable[[Operations], T]) -> T:
        """Run ``fn`` with an executor inside one transaction (joined if open)."""
        raise NotImplementedError

    # ----------------------------------------------------------- reads
    def find_one(
        self,
        table: str,
        where: Optional[Mapping[str, Any]] = None,
        *,
        columns: Optional[Sequence[str]] = None,
        order_by: q.OrderBy = None,
    ) -> Optional[Row]:
        """The first row matching ``where`` (ordered by ``order_by``), or None."""
        shape, params = q.where_shape(where)
        cols = (
            columns
            if columns is None or isinstance(columns, str)
            else _names_key(columns)
        )
        key = ("one", table, shape, cols, q.order_key(order_by))
        st = q._cache.get(key) or q.statement(
            key,
            lambda: sql.SQL("SELECT {} FROM {}{}{} LIMIT 1").format(
                q.columns_sql(columns),
                q.table_identifier(table),
                q.compile_where(shape),
                q.compile_order_by(order_by),
            ),
        )
        try:
            return self._read(st, params, ONE)  # type: ignore[no-any-return]
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(
                exc, table, _referenced(where, columns, order_by)
            ) from exc.__cause__

    def find_many(
        self,
        table: str,
        where: Optional[Mapping[str, Any]] = None,
        *,
        columns: Optional[Sequence[str]] = None,
        order_by: q.OrderBy = None,
        limit: Optional[int] = None,
        offset: Optional[int] = None,
    ) -> List[Row]:
        """Every row matching ``where``, ordered, limited and offset as asked."""
        shape, params = q.where_shape(where)
        limit = q.check_count(limit, "limit")
        offset = q.check_count(offset, "offset")
        cols = (
            columns
            if columns is None or isinstance(columns, str)
            else _names_key(columns)
        )
        key = (
            "many",
            table,
            shape,
            cols,
            q.order_key(order_by),
            limit is None,
            offset is None,
        )
        st = q._cache.get(key) or q.statement(
            key,
            lambda: sql.SQL("SELECT {} FROM {}{}{}{}{}").format(
                q.columns_sql(columns),
                q.table_identifier(table),
                q.compile_where(shape),
                q.compile_order_by(order_by),
                sql.SQL(" LIMIT %s" if limit is not None else ""),
                sql.SQL(" OFFSET %s" if offset is not None else ""),
            ),
        )
        if limit is not None:
            params.append(limit)
        if offset is not None:
            params.append(offset)
        try:
            return self._read(st, params, ROWS)  # type: ignore[no-any-return]
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(
                exc, table, _referenced(where, columns, order_by)
            ) from exc.__cause__

    def count(self, table: str, where: Optional[Mapping[str, Any]] = None) -> int:
        """How many rows match ``where``."""
        return int(self._scalar("SELECT count(*) FROM {}{}", table, where))

    def exists(self, table: str, where: Optional[Mapping[str, Any]] = None) -> bool:
        """Whether any row matches ``where``."""
        return bool(self._scalar("SELECT EXISTS (SELECT 1 FROM {}{})", table, where))

    def _scalar(
        self, template: str, table: str, where: Optional[Mapping[str, Any]]
    ) -> Any:
        """The one value of a read over ``table`` filtered by ``where``."""
        shape, params = q.where_shape(where)
        key = (template, table, shape)
        st = q._cache.get(key) or q.statement(
            key,
            lambda: sql.SQL(template).format(
                q.table_identifier(table), q.compile_where(shape)
            ),
        )
        try:
            return self._read(st, params, SCALAR)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, _referenced(where)) from exc.__cause__

    # ---------------------------------------------------------- writes
    def insert(
        self,
        table: str,
        data: Mapping[str, Any],
        *,
        returning: Union[str, Sequence[str], None] = "id",
    ) -> Any:
        """Insert one row; return its ``id`` (or the ``returning`` column).

        ``returning="*"`` returns the row as a dict, a list of columns a dict of them,
        None returns None. Raises ``UniqueViolation`` and the other ``IntegrityError``
        subclasses when a constraint rejects the row.
        """
        policy = table_policy(table)
        if policy is not None and policy.generated is not None:
            column, make = policy.generated
            if column not in data:  # before the first attempt, so a retry reuses it
                data = {**data, column: make()}
        cols = _data_columns(data)
        ret = _names_key(returning)
        key = ("insert", table, cols, ret)
        st = q._cache.get(key) or q.statement(
            key, lambda: _insert_sql(table, cols, returning)
        )
        params = list(data.values())
        mode = (
            ROWCOUNT if returning is None else (SCALAR if _single(returning) else ONE)
        )
        try:
            result = self._write(table, st, params, mode, data, returning)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, cols) from exc.__cause__
        return None if returning is None else result

    def _write(
        self,
        table: str,
        st: q.Statement,
        params: List[Any],
        mode: int,
        data: Mapping[str, Any],
        returning: Any,
    ) -> Any:
        """Run an insert; ``Database`` adds the per-table retry policy."""
        return self._run(st, params, mode, True)

    def _idempotent_write(self, table: str, st: q.Statement, params: List[Any]) -> int:
        """Run an update or delete; ``Database`` adds the per-table retry policy."""
        return int(self._run(st, params, ROWCOUNT, True))

    def insert_many(
        self,
        table: str,
        rows: Iterable[Mapping[str, Any]],
        *,
        returning: Optional[str] = None,
        page_size: int = 1000,
    ) -> Any:
        """Insert many rows, all or none; return how many (or their ids, in order).

        Every row must have the same keys. Uses COPY when every value has an exact
        text form (numbers, strings, booleans, dates, UUIDs, decimals, None), else
        multi-row INSERTs of ``page_size`` rows in one transaction. With ``returning``
        (a column name) it returns that column of each row, in input order.
        """
        rows = list(rows)
        if not rows:
            return [] if returning is not None else 0
        cols = _data_columns(rows[0])
        if not cols:
            raise InvalidQuery(
                "insert_many: row 0 has no columns (insert(table, {}) inserts a row "
                "of defaults)"
            )
        keys = rows[0].keys()
        for i, row in enumerate(rows):
            # Key views compare as sets, in C for dicts: one check per row.
            if type(row) is not dict and not isinstance(row, Mapping):
                raise InvalidQuery(f"insert_many: row {i} is not a dict")
            if row.keys() != keys:
                raise InvalidQuery(
                    f"insert_many: row {i} has columns {sorted(row)}, "
                    f"row 0 has {sorted(cols)}; every row needs the same columns"
                )
        target = q.table_identifier(table)
        col_sql = sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in cols)
        if returning is None:
            buffer = _copy_buffer(
                [list(map(operator.itemgetter(c), rows)) for c in cols]
            )
            if buffer is not None:
                copy = sql.SQL("COPY {} ({}) FROM STDIN").format(target, col_sql)

                def run_copy(cur: Any) -> int:
                    cur.copy_expert(copy, buffer)
                    return int(cur.rowcount)

                try:
                    return self._call(run_copy, f"COPY {table}", True)
                except (UnknownColumn, UnknownTable) as exc:
                    raise self._explain(exc, table, cols) from exc.__cause__
        ret = q.returning_sql(returning)
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES %s{}").format(target, col_sql, ret)
        pick = operator.itemgetter(*cols)
        values: List[Sequence[Any]] = (
            list(map(pick, rows)) if len(cols) > 1 else [(pick(r),) for r in rows]
        )

        def run_pages(ops: Operations) -> Any:
            def pages(cur: Any) -> Any:
                text = stmt.as_string(cur)
                out = psycopg2.extras.execute_values(
                    cur, text, values, page_size=page_size, fetch=returning is not None
                )
                return [r[0] for r in out] if returning is not None else len(values)

            return ops._call(pages, f"INSERT INTO {table} ... VALUES", True)

        try:
            return (
                self._atomic(run_pages) if len(values) > page_size else run_pages(self)
            )
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, cols) from exc.__cause__

    def update(
        self,
        table: str,
        data: Mapping[str, Any],
        where: Optional[Mapping[str, Any]] = None,
        *,
        all_rows: bool = False,
    ) -> int:
        """Set ``data`` on the rows matching ``where``; return how many changed.

        An empty or missing ``where`` raises ``InvalidQuery`` unless ``all_rows=True``.
        """
        cols = _data_columns(data)
        if not cols:
            raise InvalidQuery("update: data must set at least one column")
        shape, where_params = q.where_shape(where)
        _guard_all_rows("update", shape, all_rows)
        key = ("update", table, cols, shape)
        st = q._cache.get(key) or q.statement(
            key,
            lambda: sql.SQL("UPDATE {} SET {}{}").format(
                q.table_identifier(table),
                sql.SQL(", ").join(
                    sql.SQL("{} = %s").format(sql.Identifier(q.identifier(c)))
                    for c in cols
                ),
                q.compile_where(shape),
            ),
        )
        try:
            return self._idempotent_write(table, st, [*data.values(), *where_params])
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(
                exc, table, (*cols, *_referenced(where))
            ) from exc.__cause__

    def delete(
        self,
        table: str,
        where: Optional[Mapping[str, Any]] = None,
        *,
        all_rows: bool = False,
    ) -> int:
        """Delete the rows matching ``where``; return how many.

        An empty or missing ``where`` raises ``InvalidQuery`` unless ``all_rows=True``.
        """
        shape, params = q.where_shape(where)
        _guard_all_rows("delete", shape, all_rows)
        key = ("delete", table, shape)
        st = q._cache.get(key) or q.statement(
            key,
            lambda: sql.SQL("DELETE FROM {}{}").format(
                q.table_identifier(table), q.compile_where(shape)
            ),
        )
        try:
            return self._idempotent_write(table, st, params)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, _referenced(where)) from exc.__cause__

    def upsert(
        self,
        table: str,
        data: Mapping[str, Any],
        conflict: Sequence[str] = ("src_hash",),
        update: Optional[Sequence[str]] = None,
    ) -> Row:
        """Insert, or on a ``conflict`` key clash update; return the row as a dict.

        ``update`` names the columns to overwrite (default: every column of ``data``
        not in ``conflict``); ``update=()`` means DO NOTHING, and the existing row is
        returned unchanged. One statement, so it is atomic and safe to retry.
        """
        cols = _data_columns(data)
        if isinstance(conflict, str):
            conflict = (conflict,)
        conflict = tuple(conflict)
        if not conflict or any(c not in data for c in conflict):
            raise InvalidQuery(
                f"upsert: every conflict column {list(conflict)} must be in data"
            )
        if update is None:
            update = tuple(c for c in cols if c not in conflict)
        elif isinstance(update, str):
            update = (update,)
        update = tuple(update)
        if any(c not in data for c in update):
            raise InvalidQuery(f"upsert: update columns {list(update)} must be in data")
        key = ("upsert", table, cols, conflict, update)
        st = q._cache.get(key) or q.statement(
            key, lambda: _upsert_sql(table, cols, conflict, update)
        )
        params = list(data.values())
        if not update:
            params += [data[c] for c in conflict]
        try:
            row: Optional[Row] = self._run(st, params, ONE, True)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, (*cols, *conflict)) from exc.__cause__
        if row is None:
            # DO NOTHING met a row committed by another session after this statement's
            # snapshot was taken (READ COMMITTED): a new statement sees it.
            row = self.find_one(table, {c: data[c] for c in conflict})
            if row is None:
                raise SerializationFailure(
                    f"upsert into {table}: the conflicting row was deleted by another "
                    "session before it could be read; running it again will insert",
                    sqlstate="40001",
                    statement=st.text,
                )
        return row

    # ------------------------------------------------------------- raw
    def execute(
        self, query: Union[str, sql.Composable], params: Params = None
    ) -> List[Row]:
        """Run one SQL statement with bound ``params``; return its rows as dicts.

        Statements without rows (INSERT without RETURNING, DDL) return ``[]``. Values
        go in ``params`` (``%s`` or ``%(name)s`` placeholders), never into the text.
        A SELECT is retried on transient errors outside transactions; other
        statements are not (their outcome may be unknown).
        """
        st = _raw_statement(query)
        if _is_read(st.composed):
            return self._read(st, params, ROWS)  # type: ignore[no-any-return]
        return self._run(st, params, ROWS, True)  # type: ignore[no-any-return]

    def execute_many(
        self, query: Union[str, sql.Composable], seq_of_params: Iterable[Params]
    ) -> int:
        """Run one statement once per parameter set, all or none; return rows affected.

        Runs in one transaction (joined if one is open). For bulk inserts
        ``insert_many`` is much faster: it uses COPY.
        """
        batch = list(seq_of_params)
        if not batch:
            return 0
        st = _raw_statement(query)

        def run(ops: Operations) -> int:
            def many(cur: Any) -> int:
                cur.executemany(st.render(cur), batch)
                return max(int(cur.rowcount), 0)

            return ops._call(many, _text_of(st), True)

        return self._atomic(run)

    # ----------------------------------------------------------- errors
    def _explain(
        self, exc: Union[UnknownColumn, UnknownTable], table: str, names: Iterable[str]
    ) -> Exception:
        """Add what exists and "did you mean ...?" to an unknown table/column error.

        Runs only when the error has happened, so the success path pays nothing.
        """
        try:
            schema, _, name = table.rpartition(".")
            if isinstance(exc, UnknownTable):
                tables = _catalog_names(
                    self._catalog_pool(),
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = COALESCE(NULLIF(%s, ''), current_schema())",
                    (schema,),
                )
                hint = _did_you_mean(name, tables)
                message = f"table {table!r} does not exist{hint}"
            else:
                columns = _catalog_names(
                    self._catalog_pool(),
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = COALESCE(NULLIF(%s, ''), current_schema()) "
                    "AND table_name = %s",
                    (schema, name),
                )
                missing = [n for n in dict.fromkeys(names) if n not in columns]
                if not columns or not missing:
                    return exc
                parts = [
                    f"column {m!r} does not exist in {table}{_did_you_mean(m, columns)}"
                    for m in missing
                ]
                message = "; ".join(parts)
        except Exception:  # the explanation is a courtesy; never hide the error
            logger.debug("could not explain %r", exc, exc_info=True)
            return exc
        better = type(exc)(message, sqlstate=exc.sqlstate, statement=exc.statement)
        better.__cause__ = exc.__cause__
        return better

    def _catalog_pool(self) -> Any:
        raise NotImplementedError


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = suggest(name, candidates)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = sorted(candidates)
    return f" (it has: {', '.join(shown[:20])})" if shown else ""


def _catalog_names(pool: Any, query: str, params: Tuple[Any, ...]) -> List[str]:
    with pool.connection(timeout=1.0) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return [r[0] for r in cur.fetchall()]


def _single(returning: Any) -> bool:
    return isinstance(returning, str) and returning != "*"


def _data_columns(data: Any) -> Tuple[str, ...]:
    if not isinstance(data, Mapping):
        raise InvalidQuery(
            f"data must be a dict of column -> value, got {type(data).__name__}"
        )
    return tuple(data)


def _guard_all_rows(what: str, shape: Tuple[Any, ...], all_rows: bool) -> None:
    if not shape and not all_rows:
        raise InvalidQuery(
            f"{what} without a where clause would touch every row; "
            "pass all_rows=True if that is what you mean"
        )


def _referenced(
    where: Optional[Mapping[str, Any]],
    columns: Optional[Sequence[str]] = None,
    order_by: q.OrderBy = None,
) -> List[str]:
    names = list(where or ())
    if columns is not None:
        names += [columns] if isinstance(columns, str) else list(columns)
    if order_by is not None:
        terms = [order_by] if isinstance(order_by, str) else list(order_by)
        for t in terms:
            names.append(t.strip().lstrip("-").split()[0])
    return names


def _insert_sql(
    table: str, cols: Tuple[str, ...], returning: Union[str, Sequence[str], None]
) -> sql.Composable:
    target = q.table_identifier(table)
    if not cols:
        return sql.SQL("INSERT INTO {} DEFAULT VALUES{}").format(
            target, q.returning_sql(returning)
        )
    return sql.SQL("INSERT INTO {} ({}) VALUES ({}){}").format(
        target,
        sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in cols),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)),
        q.returning_sql(returning),
    )


def _upsert_sql(
    table: str,
    cols: Tuple[str, ...],
    conflict: Tuple[str, ...],
    update: Tuple[str, ...],
) -> sql.Composable:
    target = q.table_identifier(table)
    insert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({})").format(
        target,
        sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in cols),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)),
        sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in conflict),
    )
    if update:
        return insert + sql.SQL(" DO UPDATE SET {} RETURNING *").format(
            sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(q.identifier(c)))
                for c in update
            )
        )
    # DO NOTHING returns no row on a conflict; the second branch reads the existing
    # one. Under READ COMMITTED a row committed after the statement's snapshot makes
    # the insert do nothing yet stays invisible to the SELECT: upsert() then reads
    # it with a new statement.
    return sql.SQL(
        "WITH ins AS ({} DO NOTHING RETURNING *) "
        "SELECT * FROM ins UNION ALL SELECT * FROM {} WHERE ({}) = ({}) LIMIT 1"
    ).format(
        insert,
        target,
        sql.SQL(", ").join(sql.Identifier(c) for c in conflict),
        sql.SQL(", ").join(sql.Placeholder() * len(conflict)),
    )


def _raw_statement(query: Union[str, sql.Composable]) -> q.Statement:
    if isinstance(query, str):
        return q.statement(("raw", query), lambda: sql.SQL(query))
    if isinstance(query, sql.Composable):
        return q.Statement(query)
    raise InvalidQuery(
        f"query must be a string or psycopg2.sql object, got {type(query).__name__}"
    )


def _names_key(names: Any) -> Any:
    """Names (None, one, or a list) as a hashable cache-key part, or InvalidQuery."""
    if names is None or isinstance(names, str):
        return names
    if not isinstance(names, (list, tuple)):
        raise InvalidQuery(f"expected a column name or a list of them, got {names!r}")
    return tuple(names)


def _is_read(composed: sql.Composable) -> bool:
    # Only statements that cannot write: a WITH may hold an INSERT, UPDATE or DELETE,
    # and re-running one of those after a lost reply would write twice.
    if isinstance(composed, sql.SQL):
        head = composed.string.lstrip().split(None, 1)
        return bool(head) and head[0].upper() in (
            "SELECT",
            "VALUES",
            "SHOW",
            "TABLE",
        )
    return False


def _text_of(st: q.Statement) -> str:
    if st.text is not None:
        return st.text
    composed = st.composed
    return composed.string if isinstance(composed, sql.SQL) else repr(composed)
