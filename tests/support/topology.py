"""A primary and a streaming standby for the scale-out tests.

``replicated`` (a fixture) gives a :class:`Replicated`: a primary and a standby that
streams from it (``EmbeddedServer.replica``), both on TCP 127.0.0.1 as well as the
socket, and a database of the test's own (with the pipeline's schema), already
replayed on the standby. It unpacks as ``primary, standby = replicated``.
``replicated_sync`` is the same with a synchronous standby: the primary's commits wait
for it, so no acknowledged write is lost when the primary dies.

The pair is kept for a test module (starting one costs 2-3 s) and checked before each
test. A test may promote the standby and rejoin the old primary: the next test gets
whichever node is the primary then as ``primary``. A pair that is no longer "one
primary, one standby streaming from it" (a node stopped, two primaries) is destroyed
and made again (``replicated_nodes`` and ``replicated_sync_nodes`` are those kept
pairs). A test that wants a pair of its own uses ``replicated_pair()``.

``pgbouncer`` (a PgBouncer in transaction mode in front of the session's server, kept
for a module) and ``pgbouncer_dsn`` (this worker's database through it) run the
facade, transactions and the queue through a transaction pooler.

A test module that uses these fixtures says so: ``pytest_plugins =
["support.topology"]`` (not an import: pytest rewrites a plugin's asserts only if it
loads it first).

``synchronous_commit`` is on in both (``durable=False`` turns only fsync off): with it
off a stopped primary may lose acknowledged commits by the server's choice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from pgaccess import schema
from pgaccess.embedded import EmbeddedServer, scratch_dir
from support.pgbouncer import PgBouncer, running_pgbouncer

__all__ = [
    "Replicated",
    "multi_host_dsn",
    "pgbouncer",
    "pgbouncer_dsn",
    "replicated",
    "replicated_nodes",
    "replicated_pair",
    "replicated_sync",
    "replicated_sync_nodes",
]


def multi_host_dsn(
    servers: Sequence[EmbeddedServer], dbname: str = "postgres", **params: Any
) -> str:
    """One libpq DSN naming every server over TCP (``host=a,b port=p,q``), in order.

    ``params`` are added as they are, e.g. ``target_session_attrs="read-write"``.
    """
    first = parse_dsn(servers[0].tcp_dsn(dbname))
    first["host"] = ",".join("127.0.0.1" for _ in servers)
    first["port"] = ",".join(str(s.settings["port"]) for s in servers)
    first.update(params)
    return str(make_dsn(**first))


class Replicated:
    """A primary and its standby, and the test's database on them.

    ``nodes`` keeps the order in which they were made (the first was the first
    primary), whatever their roles now; ``primary`` and ``standby`` are the roles.
    """

    def __init__(
        self,
        nodes: List[EmbeddedServer],
        root: Path,
        synchronous: bool,
        dbname: str = "postgres",
    ) -> None:
        self.nodes = nodes
        self.root = root
        self.synchronous = synchronous
        self.dbname = dbname
        self.primary = nodes[0]
        self.standby = nodes[1]

    def __iter__(self) -> Iterator[EmbeddedServer]:
        return iter((self.primary, self.standby))

    def __repr__(self) -> str:
        return f"<Replicated primary={self.primary!r} standby={self.standby!r}>"

    def dsn(self, server: EmbeddedServer, **params: Any) -> str:
        """``server``'s TCP DSN for the test's database."""
        return str(make_dsn(server.tcp_dsn(self.dbname), **params))

    def multi_host_dsn(self, **params: Any) -> str:
        """Both nodes in one DSN (``nodes`` order), for the test's database."""
        return multi_host_dsn(self.nodes, self.dbname, **params)

    def catch_up(self, timeout: float = 30.0) -> None:
        """Wait until the standby has replayed all the primary wrote so far."""
        self.standby.wait_for_replay(self.primary, timeout)

    def query(
        self, server: EmbeddedServer, statement: Any, params: Any = None
    ) -> List[Any]:
        """One statement on ``server`` in the test's database; its rows (or [])."""
        return server.query(statement, params, self.dbname)

    def switchover(self) -> None:
        """Swap the roles cleanly: stop the primary, promote the standby, rejoin."""
        old, new = self.primary, self.standby
        self.catch_up()
        old.stop()
        new.promote()
        old.rejoin(new, synchronous=self.synchronous)
        self.primary, self.standby = new, old

    def healthy(self) -> bool:
        """One primary, one standby streaming from it (synchronously if asked)."""
        try:
            roles = {node.in_recovery(): node for node in self.nodes}
            if set(roles) != {False, True}:
                return False
            primary, standby = roles[False], roles[True]
            state = "sync" if self.synchronous else "async"
            rows = primary.query(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = %s "
                "AND state = 'streaming' AND sync_state = %s",
                (standby.name, state),
            )
        except psycopg2.Error:
            return False
        if not rows:
            return False
        self.primary, self.standby = primary, standby
        return True

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()
        shutil.rmtree(self.root, ignore_errors=True)


#: Run by the reaper: wait for the end of the pipe, then destroy every node.
_REAP = (
    "import shutil, sys\n"
    "from pgaccess.embedded import EmbeddedServer\n"
    "sys.stdin.buffer.read()\n"
    "for datadir in sys.argv[2:]:\n"
    "    EmbeddedServer(datadir).destroy()\n"
    "shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
)


@contextlib.contextmanager
def _reaped(root: Path, *datadirs: Path) -> Iterator[None]:
    """Destroy the servers in ``datadirs`` when this process exits, however it exits.

    As the test plugin does for the session's server: a process of its own waits
    for the end of a pipe that only this process holds, which the kernel closes on
    any exit (SIGKILL too). A block that ends normally destroys them itself first.
    """
    read_end, write_end = os.pipe()
    try:
        reaper = subprocess.Popen(
            [sys.executable, "-c", _REAP, str(root), *map(str, datadirs)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(read_end)
    try:
        yield
    finally:
        os.close(write_end)
        reaper.wait(60)


@contextlib.contextmanager
def replicated_pair(
    *, synchronous: bool = False, settings: Optional[Dict[str, Any]] = None
) -> Iterator[Replicated]:
    """Start a primary and a standby (``node1``, ``node2``); destroy both afterwards.

    Also when pytest is killed: a reaper process destroys them then.
    """
    conf: Dict[str, Any] = {"synchronous_commit": "on"}
    conf.update(settings or {})
    root = scratch_dir("pgaccess-replicated-")
    primary = EmbeddedServer(
        root / "node1", durable=False, tcp=True, replication=True, settings=conf
    )
    nodes = [primary]
    with _reaped(root, root / "node1", root / "node2"):
        try:
            primary.start()
            nodes.append(primary.replica(root / "node2", synchronous=synchronous))
            yield Replicated(nodes, root, synchronous)
        finally:
            for node in nodes:
                node.destroy()
            shutil.rmtree(root, ignore_errors=True)


class _Kept:
    """The pair a module keeps, remade when a test left it broken."""

    def __init__(self, synchronous: bool) -> None:
        self.synchronous = synchronous
        self.pair: Optional[Replicated] = None
        self._stack = contextlib.ExitStack()
        #: Seconds each start of a pair took (read by the topology self-tests).
        self.start_times: List[float] = []

    def get(self) -> Replicated:
        if self.pair is not None and not self.pair.healthy():
            self.close()
        if self.pair is None:
            t0 = time.monotonic()
            self.pair = self._stack.enter_context(
                replicated_pair(synchronous=self.synchronous)
            )
            self.start_times.append(time.monotonic() - t0)
        return self.pair

    def close(self) -> None:
        self.pair = None
        self._stack.close()


def _with_database(kept: _Kept) -> Iterator[Replicated]:
    pair = kept.get()
    name = f"t_{uuid.uuid4().hex[:10]}"
    pair.primary.create_database(name)
    pair.dbname = name
    try:
        schema.apply(pair.dsn(pair.primary))
        pair.catch_up()
        yield pair
    finally:
        pair.dbname = "postgres"
        if pair.healthy():
            pair.primary.query(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )
        else:
            kept.close()


def _keep(synchronous: bool) -> Iterator[_Kept]:
    kept = _Kept(synchronous)
    try:
        yield kept
    finally:
        kept.close()


@pytest.fixture(scope="module")
def replicated_nodes() -> Iterator[_Kept]:
    """The asynchronous pair a module keeps."""
    yield from _keep(synchronous=False)


@pytest.fixture(scope="module")
def replicated_sync_nodes() -> Iterator[_Kept]:
    """The synchronous pair a module keeps."""
    yield from _keep(synchronous=True)


@pytest.fixture
def replicated(replicated_nodes: _Kept) -> Iterator[Replicated]:
    """A primary, an asynchronous standby, and the test's database on both."""
    yield from _with_database(replicated_nodes)


@pytest.fixture
def replicated_sync(replicated_sync_nodes: _Kept) -> Iterator[Replicated]:
    """A primary, a synchronous standby, and the test's database on both."""
    yield from _with_database(replicated_sync_nodes)


@pytest.fixture(scope="module")
def pgbouncer(pgaccess_dsn: str) -> Iterator[PgBouncer]:
    """PgBouncer, transaction mode, in front of the session's server (for a module).

    Skips (fails under ``.ci/run``) where PgBouncer cannot run.
    """
    with running_pgbouncer(pgaccess_dsn) as bouncer:
        yield bouncer


@pytest.fixture
def pgbouncer_dsn(pgbouncer: PgBouncer, pgaccess_dsn: str) -> str:
    """This worker's database (the pipeline's schema) through ``pgbouncer``."""
    return pgbouncer.dsn(parse_dsn(pgaccess_dsn)["dbname"])
