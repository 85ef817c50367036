"""The facade's methods, written once on an executor: ``find_one`` ... ``execute_many``.

``Database`` and ``Transaction`` are this facade on different executors (see
``executor.py``): a ``Database`` runs each call as one autocommit statement on a
pooled connection, retried where its policy allows; a ``Transaction`` runs it on the
connection it holds. The facade builds each statement once per shape (``sql.py``),
and decides retries from data: the read policy, and the write policies of
``policies.py``. It never decides by a table's name.
"""

from __future__ import annotations

import logging
import operator
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import psycopg2.extras
from psycopg2 import sql

from . import sql as q
from .config import TRANSACTION_POOLER
from .copy import copy_buffer
from .errors import (
    CommitOutcomeUnknown,
    InvalidQuery,
    SerializationFailure,
    UniqueViolation,
    UnknownColumn,
    UnknownTable,
    suggest,
)
from .executor import ONE, ROWCOUNT, ROWS, SCALAR, Params, Retrying
from .policies import WritePolicies, WritePolicy
from .retry import RetryPolicy
from .streaming import RowStream, check_batch_size

__all__ = ["Facade", "Reads", "Row"]

logger = logging.getLogger("pgaccess.facade")

T = TypeVar("T")
Row = Dict[str, Any]


class Reads(Protocol):
    """What runs the facade's reads: a ``Retrying`` executor, or a router."""

    def run(
        self,
        st: q.Statement,
        params: Params,
        mode: int,
        write: bool,
        retry: Optional[RetryPolicy] = None,
    ) -> Any: ...


class Facade:
    """``insert``, ``find_one``, ``update``, ... on an executor.

    ``read_retry`` is how reads are retried (None: never); ``write_policies`` say
    which writes re-run safely (see ``policies.py``); ``reads`` runs the reads, when
    they go elsewhere than the writes (standbys: ``routing.ReadRouter``).
    """

    def __init__(
        self,
        executor: Retrying,
        write_policies: WritePolicies,
        read_retry: Optional[RetryPolicy],
        reads: Optional[Reads] = None,
    ) -> None:
        self._ex = executor
        self._reads: Reads = reads or executor
        self.write_policies = write_policies
        self._read_retry = read_retry

    def _read(self, st: q.Statement, params: Params, mode: int) -> Any:
        return self._reads.run(st, params, mode, False, self._read_retry)

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
        st = q.cached(key) or q.statement(
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
        st, params = _select_many(table, where, columns, order_by, limit, offset)
        try:
            return self._read(st, params, ROWS)  # type: ignore[no-any-return]
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(
                exc, table, _referenced(where, columns, order_by)
            ) from exc.__cause__

    def iter_many(
        self,
        table: str,
        where: Optional[Mapping[str, Any]] = None,
        *,
        columns: Optional[Sequence[str]] = None,
        order_by: q.OrderBy = None,
        batch_size: int = 1000,
    ) -> RowStream:
        """The rows of ``find_many`` as an iterator, ``batch_size`` rows per round trip.

        For results too large for memory: a server-side cursor in a transaction on one
        connection (that of the open transaction, if any), given back when the
        iterator is exhausted, closed, left or collected (see ``streaming.py``).
        Statement errors raise here; not retried.
        """
        batch_size = check_batch_size(batch_size)
        st, params = _select_many(table, where, columns, order_by, None, None)
        try:
            return self._stream(st, params, batch_size)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(
                exc, table, _referenced(where, columns, order_by)
            ) from exc.__cause__

    def stream(
        self,
        query: Union[str, sql.Composable],
        params: Params = None,
        batch_size: int = 1000,
    ) -> RowStream:
        """The rows of one SELECT (or VALUES) as an iterator; see ``iter_many``.

        Values go in ``params``, as for ``execute``. Not retried.
        """
        batch_size = check_batch_size(batch_size)
        q.check_params(params)
        return self._stream(_raw_statement(query), params, batch_size)

    def _stream(self, st: q.Statement, params: Params, batch_size: int) -> RowStream:
        ex = self._ex
        return RowStream(
            st, params, batch_size, ex.inner.record, pool=ex.pool,
            transaction=ex.transaction(),
        )  # fmt: skip

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
        st = q.cached(key) or q.statement(
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
        policy = self.write_policies.of(table)
        if policy is not None and policy.generated is not None:
            column, make = policy.generated
            if column not in data:  # before the first attempt, so a retry reuses it
                data = {**data, column: make()}
        cols = _data_columns(data)
        ret = _names_key(returning)
        key = ("insert", table, cols, ret)
        st = q.cached(key) or q.statement(
            key, lambda: _insert_sql(table, cols, returning)
        )
        params = list(data.values())
        mode = (
            ROWCOUNT if returning is None else (SCALAR if _single(returning) else ONE)
        )
        retry = again = None
        if policy is not None and all(k in data for k in policy.key):
            # Every further attempt is the idempotent form, whatever the first error
            # was: any of them may itself lose its reply after it landed.
            retry = policy.retry

            def again(first: BaseException) -> Any:
                return self._insert_again(policy, data, returning, st)

        try:
            result = self._ex.run(st, params, mode, True, retry, again)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, cols) from exc.__cause__
        return None if returning is None else result

    def _insert_again(
        self,
        policy: WritePolicy,
        data: Mapping[str, Any],
        returning: Any,
        st: q.Statement,
    ) -> Any:
        """Re-run an insert whose first outcome is unknown, without writing twice."""
        table, key = policy.table, policy.key
        row = self.upsert(table, data, conflict=key, update=())
        if not self._holds(table, key, data):
            raise UniqueViolation(
                f"a row with the same {', '.join(key)} already exists in {table} "
                "with other values; this call did not write it",
                sqlstate="23505",
                statement=st.text,
            )
        if returning is None or returning == "*":
            return None if returning is None else row
        if isinstance(returning, str):
            return row[returning]
        return {c: row[c] for c in returning}

    def _holds(self, table: str, key: Sequence[str], data: Mapping[str, Any]) -> bool:
        """Whether the row with ``data``'s key holds exactly ``data``'s values.

        Compared by the server, with the same casts the insert applied (a naive
        datetime into timestamptz, NaN, JSON), not by Python equality of what
        comes back.
        """
        cols = tuple(data)
        composed = sql.SQL(
            "SELECT ROW({}) IS NOT DISTINCT FROM ROW({}) FROM {} WHERE ({}) = ({})"
        ).format(
            sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in cols),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            q.table_identifier(table),
            sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in key),
            sql.SQL(", ").join(sql.Placeholder() * len(key)),
        )
        st = q.statement(("holds", table, cols, tuple(key)), lambda: composed)
        params = [*data.values(), *(data[c] for c in key)]
        return bool(self._ex.run(st, params, SCALAR, False))

    def _write_pinned(
        self, table: str, st: q.Statement, params: List[Any], shape: Tuple[Any, ...]
    ) -> int:
        """Run an update or delete; re-run it after a failure only where that is safe.

        The facade's updates set absolute values and deletes are idempotent, so
        running one twice leaves the same state, provided its WHERE matches the same
        rows both times: only a WHERE that pins one row by equality on a unique key
        of the table's write policy is re-run. Any other is raised as it failed.
        """
        policy = self.write_policies.of(table)
        if policy is None or not policy.pins_one_row(q.equal_columns(shape)):
            return int(self._ex.run(st, params, ROWCOUNT, True))
        unknown = False

        def again(first: BaseException) -> int:
            nonlocal unknown
            unknown = unknown or isinstance(first, CommitOutcomeUnknown)
            try:
                count = int(self._ex.run(st, params, ROWCOUNT, True))
            except CommitOutcomeUnknown:
                unknown = True
                raise
            if count == 0 and unknown:
                # An earlier attempt may have changed the row already: "0" would
                # tell the caller it changed nothing, which may be false.
                raise CommitOutcomeUnknown(
                    "the connection was lost while this write was in flight, and "
                    "running it again matched no rows: the first attempt may or "
                    "may not have applied it",
                    statement=st.text,
                ) from first
            return count

        return int(self._ex.run(st, params, ROWCOUNT, True, policy.retry, again))

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
            buffer = copy_buffer(
                [list(map(operator.itemgetter(c), rows)) for c in cols]
            )
            if buffer is not None:
                copy = sql.SQL("COPY {} ({}) FROM STDIN").format(target, col_sql)

                def run_copy(cur: Any) -> int:
                    cur.copy_expert(copy, buffer)
                    return int(cur.rowcount)

                try:
                    return self._ex.call(run_copy, f"COPY {table}", True)
                except (UnknownColumn, UnknownTable) as exc:
                    raise self._explain(exc, table, cols) from exc.__cause__
        ret = q.returning_sql(returning)
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES %s{}").format(target, col_sql, ret)
        pick = operator.itemgetter(*cols)
        values: List[Sequence[Any]] = (
            list(map(pick, rows)) if len(cols) > 1 else [(pick(r),) for r in rows]
        )

        def pages(cur: Any) -> Any:
            text = stmt.as_string(cur)
            out = psycopg2.extras.execute_values(
                cur, text, values, page_size=page_size, fetch=returning is not None
            )
            return [r[0] for r in out] if returning is not None else len(values)

        try:
            # More than one page: all of them in one transaction, all or none.
            return self._ex.call(
                pages,
                f"INSERT INTO {table} ... VALUES",
                True,
                atomic=len(values) > page_size,
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
        st = q.cached(key) or q.statement(
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
            return self._write_pinned(table, st, [*data.values(), *where_params], shape)
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
        st = q.cached(key) or q.statement(
            key,
            lambda: sql.SQL("DELETE FROM {}{}").format(
                q.table_identifier(table), q.compile_where(shape)
            ),
        )
        try:
            return self._write_pinned(table, st, params, shape)
        except (UnknownColumn, UnknownTable) as exc:
            raise self._explain(exc, table, _referenced(where)) from exc.__cause__

    def upsert(
        self,
        table: str,
        data: Mapping[str, Any],
        conflict: Optional[Sequence[str]] = None,
        update: Optional[Sequence[str]] = None,
    ) -> Row:
        """Insert, or on a ``conflict`` key clash update; return the row as a dict.

        ``conflict`` defaults to the idempotency key of the table's write policy;
        a table without one needs it (else ``InvalidQuery``). ``update`` names the
        columns to overwrite (default: every column of ``data`` not in
        ``conflict``); ``update=()`` means DO NOTHING, and the existing row is
        returned unchanged. One statement, so it is atomic and safe to retry.
        """
        cols = _data_columns(data)
        if conflict is None:
            policy = self.write_policies.of(table)
            if policy is None:
                raise InvalidQuery(
                    f"upsert into {table}: name the unique key to test with conflict= "
                    "(this table has no write policy that declares one)"
                )
            conflict = policy.key
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
        st = q.cached(key) or q.statement(
            key, lambda: _upsert_sql(table, cols, conflict, update)
        )
        params = list(data.values())
        if not update:
            params += [data[c] for c in conflict]
        try:
            row: Optional[Row] = self._ex.run(st, params, ONE, True)
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
        self,
        query: Union[str, sql.Composable],
        params: Params = None,
        *,
        retry: Optional[RetryPolicy] = None,
    ) -> List[Row]:
        """Run one SQL statement with bound ``params``; return its rows as dicts.

        Statements without rows (INSERT without RETURNING, DDL) return ``[]``. Values
        go in ``params`` (``%s`` or ``%(name)s`` placeholders), never into the text;
        params that do not fit the placeholders raise ``InvalidQuery`` before
        anything is sent. A SELECT is retried on transient errors outside
        transactions; other statements are not (their outcome may be unknown),
        unless ``retry`` says how: pass one only for a statement that is safe to run
        twice (say, ``INSERT ... ON CONFLICT DO NOTHING``). Never retried inside a
        transaction.
        """
        q.check_params(params)
        st = _raw_statement(query)
        if self._ex.pool.settings.pooler == TRANSACTION_POOLER:
            q.check_no_session_state(_text_of(st))
        if retry is None and _is_read(st.composed):
            return self._read(st, params, ROWS)  # type: ignore[no-any-return]
        return self._ex.run(st, params, ROWS, True, retry)  # type: ignore[no-any-return]

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
        for params in batch:
            q.check_params(params)
        st = _raw_statement(query)

        def many(cur: Any) -> int:
            text = st.render(cur)
            for params in batch:  # psycopg2 sends each as it goes: check all first
                try:
                    cur.mogrify(text, params)
                except (IndexError, KeyError, TypeError) as exc:
                    raise InvalidQuery(q.params_mismatch(text, params)) from exc
            cur.executemany(text, batch)
            return max(int(cur.rowcount), 0)

        return self._ex.call(many, _text_of(st), True, atomic=True)

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
                    self._ex.pool,
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = COALESCE(NULLIF(%s, ''), current_schema())",
                    (schema,),
                )
                hint = _did_you_mean(name, tables)
                message = f"table {table!r} does not exist{hint}"
            else:
                columns = _catalog_names(
                    self._ex.pool,
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


def _select_many(
    table: str,
    where: Optional[Mapping[str, Any]],
    columns: Optional[Sequence[str]],
    order_by: q.OrderBy,
    limit: Optional[int],
    offset: Optional[int],
) -> Tuple[q.Statement, List[Any]]:
    """The statement of ``find_many`` (and ``iter_many``) and its parameters."""
    shape, params = q.where_shape(where)
    limit = q.check_count(limit, "limit")
    offset = q.check_count(offset, "offset")
    cols = (
        columns if columns is None or isinstance(columns, str) else _names_key(columns)
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
    st = q.cached(key) or q.statement(
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
    return st, params


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
