"""The connector: libpq parameters merged once, and the outage backoff. No server."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from pgaccess.config import Settings
from pgaccess.connector import CONNECT_DEFAULTS, Backoff, Connector


def connector(
    dsn: str,
    statement_timeout: Optional[int] = None,
    connect_timeout: Optional[int] = None,
    **kwargs: Any,
) -> Connector:
    return Connector(
        Settings.resolve(dsn, environ={}, statement_timeout=statement_timeout),
        max_lifetime=60.0,
        connect_timeout=connect_timeout,
        watch_tcp=False,
        connect_kwargs=kwargs,
    )


def test_defaults_fill_only_what_the_dsn_leaves_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGAPPNAME", raising=False)
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    c = connector("host=h keepalives_idle=30 connect_timeout=3")
    assert "keepalives_idle" not in c.kwargs  # the DSN's own 30 stands
    assert c.kwargs["tcp_user_timeout"] == CONNECT_DEFAULTS["tcp_user_timeout"]
    assert c.kwargs["application_name"] == "pgaccess"
    assert c.connect_timeout == 3
    monkeypatch.setenv("PGAPPNAME", "mine")
    assert "application_name" not in connector("host=h").kwargs  # libpq reads it


def test_arguments_override_and_statement_timeout_is_a_startup_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    c = connector("host=h", statement_timeout=500, keepalives_idle=1)
    assert c.kwargs["keepalives_idle"] == 1
    assert c.kwargs["options"] == "-c statement_timeout=500"
    assert c.connect_timeout == 7
    monkeypatch.delenv("PGCONNECT_TIMEOUT")
    assert connector("host=h").connect_timeout == 10


def test_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    b = Backoff()
    assert not b.in_outage and b.due(0.0)
    now = 100.0
    delays = []
    for _ in range(6):
        before = b.delay
        b.update_delay(now)
        assert b.next_at == now + before and b.in_outage
        assert not b.due(now + before / 2) and b.due(now + before)
        delays.append(before)
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]  # INITIAL_DELAY .. MAX_DELAY
    b.failures = 6
    b.reset()
    assert not b.in_outage and b.delay == Backoff.INITIAL_DELAY and b.failures == 0
