"""Checks that a pgaccess error survives pickling (multiprocessing sends them)."""

from __future__ import annotations

import pickle

from pgaccess import (
    DatabaseError,
)


def check_pickle(err: DatabaseError) -> None:
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err)
    assert again.args == err.args
    assert again.sqlstate == err.sqlstate
    assert again.statement == err.statement
    assert str(again) == str(err)
