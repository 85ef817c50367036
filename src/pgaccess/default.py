"""The lazy default pool (``db_pool``), and the fork handling for every module lock.

Importing pgaccess never connects: ``db_pool`` stands for the process-wide pool and
creates it from the environment on first use.

After ``os.fork()`` the child has one thread, but its copies of every lock are in the
state the parent's threads left them: a lock another thread held at the fork stays
held forever in the child, and the child's first use of it deadlocks. One at-fork hook,
registered here, repairs the child before anything else of pgaccess runs in it: this
module's lock, then every pool (``ConnectionPool.after_fork``: fresh lock, the
parent's connections left alone), then the functions registered with
:func:`reinit_after_fork`, in registration order. A module above this one that owns a
lock registers, next to the lock::

    _lock = threading.Lock()

    def _new_lock() -> None:
        global _lock
        _lock = threading.Lock()

    reinit_after_fork(_new_lock)

and reads the module global at each use (never a copy taken before the fork).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, List, Optional

from .pool import ConnectionPool, live_pools

__all__ = ["db_pool", "default_pool", "reinit_after_fork", "reset_default_pool"]

logger = logging.getLogger("pgaccess.default")

_default: Optional[ConnectionPool] = None
_lock = threading.Lock()
_after_fork: List[Callable[[], None]] = []


def default_pool() -> ConnectionPool:
    """The process-wide pool, created from the environment on first use.

    Thread-safe; raises ``ValueError`` when a ``PGACCESS_*`` variable is malformed.
    """
    pool = _default
    if pool is None:
        pool = _create()
    return pool


def _create() -> ConnectionPool:
    global _default
    with _lock:
        if _default is None:
            _default = ConnectionPool(name="default")
        return _default


def reset_default_pool() -> None:
    """Close and forget the default pool; the next use makes a new one.

    For tests that change the environment; a connection still lent by the old pool
    is closed when it comes back.
    """
    global _default
    with _lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()


def reinit_after_fork(fn: Callable[[], None]) -> None:
    """Call ``fn()`` in every child forked from now on, before pgaccess runs there.

    For a module that owns a lock or condition: ``fn`` replaces it (see the module
    docstring). ``fn`` must not block or take another lock; its exceptions are logged
    and the next function still runs.
    """
    _after_fork.append(fn)


def _in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for pool in live_pools():
        _run_quietly(pool.after_fork)
    for fn in _after_fork:
        _run_quietly(fn)


def _run_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # one broken hook must not leave the others' locks held
        logger.exception("an after-fork hook failed: %r", fn)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)


class _DefaultPool(ConnectionPool):
    """Stands for the default pool wherever a ``ConnectionPool`` goes.

    Every attribute is the default pool's, created on first use. It is a subclass so
    that ``isinstance`` checks accept it, and it forwards ``with`` (which looks the
    methods up on the class, past ``__getattribute__``), equality and hashing, so that
    it and ``default_pool()`` are one pool as a dictionary key as well. ``with
    db_pool:`` closes the default pool at the end of the block, as ``with pool:``
    does; the next use of ``db_pool`` creates a new one.
    """

    def __init__(self) -> None:  # nothing to set up: every attribute is forwarded
        pass

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__"):  # __class__, __dict__, ...: this object's own, so
            return object.__getattribute__(self, name)  # introspection never connects
        return getattr(default_pool(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(default_pool(), name, value)  # a tunable set here is the pool's

    def __enter__(self) -> ConnectionPool:
        return default_pool()

    def __exit__(self, *exc: object) -> None:
        reset_default_pool()  # closed as ``with pool:`` does; a later use makes anew

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _DefaultPool) or other is default_pool()

    def __hash__(self) -> int:
        return hash(default_pool())

    def __repr__(self) -> str:
        pool = _default
        return repr(pool) if pool is not None else "<default pool, not created>"


#: The default pool of the usage guide: ``with db_pool.get_connection() as conn``.
db_pool: ConnectionPool = _DefaultPool()
