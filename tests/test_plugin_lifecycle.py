"""The pytest plugin's embedded server ends with its session, however it ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLEEPER = """
import time

def test_sleeps(pgaccess_server):
    print("DATADIR", pgaccess_server.embedded.datadir, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_session_server_is_gone_after_the_session_is_stopped(
    tmp_path: Path, signum: int
) -> None:
    (tmp_path / "test_sleeper.py").write_text(SLEEPER)
    env = dict(os.environ)
    env.pop("PGACCESS_TEST_DSN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "pgaccess.testing", "-s", "-q",
         "-p", "no:cacheprovider", "test_sleeper.py"],
        cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        for line in proc.stdout:
            seen += line
            if line.startswith("DATADIR"):
                break
        match = re.search(r"^DATADIR (\S+)", seen, re.MULTILINE)
        assert match, seen
        datadir = Path(match.group(1))
        assert (datadir / "postmaster.pid").exists()
        proc.send_signal(signum)
        # Seconds usually (pytest's Ctrl-C path, then pg_ctl stop); a loaded
        # 2-core machine once took over 60.
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    # pytest_unconfigure on SIGINT; the reaper process on SIGTERM and SIGKILL.
    deadline = time.monotonic() + 30
    while datadir.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not datadir.parent.exists()
