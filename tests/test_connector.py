"""The connector: libpq parameters merged once, and the outage backoff. No server."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from pgaccess import InvalidQuery
from pgaccess.config import Settings
from pgaccess.connector import (
    ANY,
    CONNECT_DEFAULTS,
    PREFER_STANDBY,
    PRIMARY,
    STANDBY,
    Backoff,
    Connector,
    check_libpq,
)


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


def test_arguments_override_and_no_startup_options_are_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction-mode PgBouncer refuses a startup ``options`` parameter: the
    statement timeout travels as SET LOCAL instead (tests/test_statement_timeout.py)."""
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    c = connector("host=h", statement_timeout=500, keepalives_idle=1)
    assert c.kwargs["keepalives_idle"] == 1
    assert "options" not in c.kwargs
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


@pytest.mark.parametrize(
    ("target", "role"),
    [
        ("", ANY),
        ("any", ANY),
        ("read-write", PRIMARY),
        ("primary", PRIMARY),
        ("standby", STANDBY),
        ("read-only", STANDBY),
        ("prefer-standby", PREFER_STANDBY),
    ],
)
def test_the_role_comes_from_target_session_attrs(target: str, role: str) -> None:
    dsn = "host=a,b port=5432,5433" + (
        f" target_session_attrs={target}" if target else ""
    )
    c = connector(dsn)
    assert c.role == role
    # With a role, the connector tries the hosts itself, in the DSN's order.
    expected = [{"host": "a", "port": "5432"}, {"host": "b", "port": "5433"}]
    assert c.hosts == (expected if role != ANY else [])


def test_one_port_serves_every_host_and_load_balancing_shuffles() -> None:
    c = connector("host=a,b,c port=6432 target_session_attrs=read-write")
    assert [h["port"] for h in c.hosts] == ["6432"] * 3 and not c.shuffle
    c = connector("host=a,b target_session_attrs=any load_balance_hosts=random")
    assert c.shuffle and c.role == ANY and c.hosts == []


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(InvalidQuery, match="role must be one of"):
        Connector(
            Settings.resolve("host=a", environ={}),
            max_lifetime=60.0,
            connect_timeout=None,
            watch_tcp=False,
            connect_kwargs={},
            role="leader",
        )


def test_a_libpq_too_old_for_an_option_is_named() -> None:
    check_libpq({"load_balance_hosts": "random"}, version=170000)  # new enough
    with pytest.raises(InvalidQuery, match=r"load_balance_hosts needs libpq 16"):
        check_libpq({"load_balance_hosts": "random"}, version=150004)
    with pytest.raises(
        InvalidQuery, match="target_session_attrs=standby needs libpq 14"
    ):
        check_libpq({"target_session_attrs": "standby"}, version=130000)
    check_libpq({"target_session_attrs": "read-write"}, version=130000)
