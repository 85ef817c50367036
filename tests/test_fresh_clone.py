"""The README's first commands from a fresh copy of the checkout in a ``mktemp -d``.

``make test`` (on one small file, so the suite does not run itself twice) and
``make demo`` (a few jobs) in a new 0700 folder, with a clean environment: as root,
and as an ordinary user (made for the test when the suite runs as root). Each
creates its own virtualenv and pip-installs, so this takes a minute or more; the
``fresh_clone`` marker lets a run leave it out. The copy is the tracked files as
they are in this working tree (``git ls-files``), so it tests the change at hand.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from test_embedded import IS_ROOT, folder_modes

from pgaccess.embedded import EmbeddedServer, project_datadir

pytestmark = [pytest.mark.fresh_clone, pytest.mark.xdist_group("fresh_clone")]

REPO = Path(__file__).resolve().parent.parent
# Without the suite's virtualenv or pyenv's shims: what a new shell has.
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NESTED_TEST = "PYTEST_ARGS=-n 1 tests/test_db_pool.py"
NESTED_DEMO = "DEMO_ARGS=--jobs 50 --workers 2"
COMMAND_TIMEOUT = 900


def tracked_files() -> List[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): nothing to copy")
    return [name for name in out.decode().split("\0") if name]


def copy_checkout(dest: Path) -> None:
    for name in tracked_files():
        src = REPO / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def run(
    args: List[str], cwd: Path, user: Optional[str], home: str
) -> Tuple[int, str, float]:
    env: Dict[str, str] = {"PATH": CLEAN_PATH, "HOME": home, "LANG": "C.UTF-8"}
    # The machine's pip settings (an index, a certificate), nothing else.
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    t0 = time.monotonic()
    proc = subprocess.run(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    return proc.returncode, proc.stdout, time.monotonic() - t0


def check_make_test_and_demo(
    clone: Path, user: Optional[str], home: str, datadir: Path
) -> None:
    before = folder_modes(clone)
    rc, out, took = run(["make", "test", NESTED_TEST], clone, user, home)
    print(f"make test as {user or 'root'}: {took:.0f} s")
    assert rc == 0, out[-5000:]
    assert re.search(r"=+ \d+ passed", out), out[-3000:]
    rc, out, took = run(["make", "demo", NESTED_DEMO], clone, user, home)
    print(f"make demo as {user or 'root'}: {took:.0f} s")
    assert rc == 0, out[-5000:]
    assert "pgaccess demo summary" in out, out[-3000:]
    assert f"embedded PostgreSQL in {datadir}" in out, out[-3000:]
    assert not EmbeddedServer(datadir).is_running()
    assert folder_modes(clone) == before


@pytest.fixture
def clone() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgaccess-clone-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="needs root: runs the commands as root")
def test_make_test_and_demo_as_root_from_a_fresh_clone_in_a_0700_folder(
    clone: Path,
) -> None:
    copy_checkout(clone)
    datadir = project_datadir(clone)
    try:
        check_make_test_and_demo(clone, None, pwd.getpwuid(0).pw_dir, datadir)
    finally:
        EmbeddedServer(datadir).destroy()
        shutil.rmtree(datadir.parent, ignore_errors=True)


@pytest.fixture
def ordinary_user() -> Iterator[Optional[str]]:
    """A throwaway user when running as root (removed after); None otherwise."""
    if not IS_ROOT:
        yield None
        return
    name = f"pgaccess-{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    uid = pwd.getpwnam(name).pw_uid
    try:
        yield name
    finally:
        # Zombies excepted: a stopped server's postmaster is reparented to PID 1,
        # which in a container may never reap it; it holds nothing.
        left = [
            line
            for line in subprocess.run(
                ["ps", "-u", str(uid), "-o", "pid=,stat=,args="],
                capture_output=True,
                text=True,
            ).stdout.splitlines()
            if not line.split()[1].startswith("Z")
        ]
        for line in left:  # only this test's user: whatever it left is ours to end
            subprocess.run(["kill", "-9", line.split()[0]], capture_output=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        subprocess.run(
            ["find", tempfile.gettempdir(), "-maxdepth", "1", "-uid", str(uid),
             "-exec", "rm", "-rf", "{}", "+"],
            capture_output=True,
        )  # fmt: skip
        assert not left, f"processes of {name} outlived the commands: {left}"


def test_make_test_and_demo_as_an_ordinary_user_from_a_fresh_clone_in_a_0700_folder(
    clone: Path, ordinary_user: Optional[str]
) -> None:
    if ordinary_user is not None:
        shutil.chown(clone, user=ordinary_user)  # made by this test
    copy_checkout(clone)
    home = os.path.expanduser("~")
    if ordinary_user is not None:
        home = pwd.getpwnam(ordinary_user).pw_dir
        subprocess.run(["chown", "-R", f"{ordinary_user}:", str(clone)], check=True)
    # Run by an ordinary user, the data is in the project, the server runs as it.
    datadir = clone / ".pgaccess" / "pgdata"
    check_make_test_and_demo(clone, ordinary_user, home, datadir)
