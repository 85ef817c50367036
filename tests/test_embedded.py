"""The embedded server: who may log in, and that it changes no folder it did not make.

Each test starts a server of its own (not the session's), in a folder made for it.
The tests that need a second OS user run ``runuser`` and need root; they skip with
the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import psycopg2
import psycopg2.extensions
import pytest

from pgaccess.embedded import (
    EmbeddedServer,
    EmbeddedUnavailable,
    _bin_dir,
    _server_user,
    _system_bin_dir,
    project_datadir,
    scratch_dir,
)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: switches to another OS user with runuser"
)


def folder_modes(*paths: Path) -> Dict[str, int]:
    """The mode of each path and of every folder above it."""
    modes = {}
    for path in paths:
        for p in (path, *path.parents):
            if p.exists():
                modes[str(p)] = p.stat().st_mode
    return modes


@pytest.fixture
def private_folder() -> Iterator[Path]:
    """A new 0700 folder, as ``mktemp -d`` makes (and as root's home is)."""
    path = Path(tempfile.mkdtemp(prefix="pgaccess-private-"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tcp_server() -> Iterator[EmbeddedServer]:
    root = scratch_dir("pgaccess-auth-")
    server = EmbeddedServer(root / "data", durable=False, tcp=True).start()
    yield server
    server.destroy()
    shutil.rmtree(root, ignore_errors=True)


def connect_error(dsn: str) -> str:
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(dsn, connect_timeout=10).close()
    return str(info.value)


def test_server_for_a_project_in_a_0700_folder_starts_and_changes_no_folder(
    private_folder: Path,
) -> None:
    datadir = project_datadir(private_folder)
    watched = [private_folder, _bin_dir()]
    before = folder_modes(*watched)
    server = EmbeddedServer(datadir, durable=False)
    try:
        with server.running():
            with server.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT current_user")
                assert cur.fetchone() == ("postgres",)
            assert server.is_running()
        assert not server.is_running()
        assert folder_modes(*watched) == before
        if IS_ROOT:
            # The server's user reaches nothing of the project: its data, and the
            # binaries it runs, are in pgaccess's own folder.
            assert not datadir.is_relative_to(private_folder)
            assert str(server._bin).startswith("/var/lib/pgaccess/")
    finally:
        server.destroy()
        if IS_ROOT:
            shutil.rmtree(datadir.parent, ignore_errors=True)


@needs_root
def test_a_data_directory_its_user_cannot_reach_is_refused_before_anything_starts(
    private_folder: Path,
) -> None:
    before = folder_modes(private_folder)
    server = EmbeddedServer(private_folder / "sub" / "data", durable=False)
    with pytest.raises(EmbeddedUnavailable, match="cannot enter") as info:
        server.start()
    assert str(private_folder) in str(info.value)
    assert "does not loosen" in str(info.value)
    assert list(private_folder.iterdir()) == []  # no initdb, no lock, no folder
    assert folder_modes(private_folder) == before


def test_logins_need_the_clusters_password(tcp_server: EmbeddedServer) -> None:
    params = psycopg2.extensions.parse_dsn(tcp_server.tcp_dsn())
    passfile = Path(params["passfile"])
    st = passfile.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid())
    assert "password" not in params  # the DSN names the file, never the password

    bare = {k: v for k, v in params.items() if k != "passfile"}
    no_password = psycopg2.extensions.make_dsn(**bare)
    assert "no password supplied" in connect_error(no_password)
    wrong = psycopg2.extensions.make_dsn(no_password, password="guess")
    assert 'password authentication failed for user "postgres"' in connect_error(wrong)
    # The same over the Unix socket: no "trust" for local logins either.
    local = psycopg2.extensions.make_dsn(wrong, host=str(tcp_server.socket_dir))
    assert 'password authentication failed for user "postgres"' in connect_error(local)
    # With the password file, both ways work.
    for dsn in (tcp_server.tcp_dsn(), tcp_server.dsn()):
        psycopg2.connect(dsn).close()


def test_socket_only_unless_tcp_is_asked_for() -> None:
    root = scratch_dir("pgaccess-socket-")
    server = EmbeddedServer(root / "data", durable=False)
    try:
        server.start()
        assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
        assert not server.listens_on_tcp()
        with pytest.raises(EmbeddedUnavailable, match="without tcp=True"):
            server.tcp_dsn()
        tcp = psycopg2.extensions.make_dsn(server.dsn(), host="127.0.0.1")
        assert "Connection refused" in connect_error(tcp)
        psycopg2.connect(server.dsn()).close()
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


def run_as_nobody(args: List[str], **env: str) -> subprocess.CompletedProcess[str]:
    assignments = [f"{k}={v}" for k, v in env.items()]
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "-i", *assignments, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


@needs_root
def test_another_os_user_is_refused_over_tcp_and_the_socket(
    tcp_server: EmbeddedServer,
) -> None:
    # psql from the copy of the binaries the server's user runs: readable by all,
    # unlike the suite's virtualenv, which may sit in a folder nobody cannot enter.
    psql = str(_system_bin_dir() / "psql")
    port = str(tcp_server.port)

    def psql_as_nobody(host: str, **env: str) -> str:
        dsn = f"host={host} port={port} user=postgres dbname=postgres"
        proc = run_as_nobody([psql, "-X", "-w", dsn, "-c", "SELECT 1"], **env)
        assert proc.returncode != 0, proc.stdout
        return proc.stderr

    assert "no password supplied" in psql_as_nobody("127.0.0.1")
    assert 'password authentication failed for user "postgres"' in psql_as_nobody(
        "127.0.0.1", PGPASSWORD="postgres"
    )
    # The socket is in a folder only the server's user may enter: nobody cannot
    # even reach the server there, with or without a password.
    assert "Permission denied" in psql_as_nobody(
        str(tcp_server.socket_dir), PGPASSWORD="postgres"
    )
    # Nor read the password.
    proc = run_as_nobody(["cat", str(tcp_server.passfile)])
    assert proc.returncode != 0 and "Permission denied" in proc.stderr
    assert _server_user() == "embedded_postgres"
