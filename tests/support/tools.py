"""Tests that need a program the machine may lack (nft, pgbouncer, etcd, chromium).

Where the program cannot be had (a user's machine without root), such a test skips and
says why. Under ``.ci/run``, which installs these programs and sets ``PGACCESS_CI=1``, a
missing program is a failure instead: CI never skips them silently.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest

__all__ = ["in_ci", "skip_unless_available"]


def in_ci() -> bool:
    """True under .ci/run, where every program the tests use must be there."""
    return os.environ.get("PGACCESS_CI") == "1"


def skip_unless_available(reason: Optional[str]) -> None:
    """Skip the calling test with ``reason`` (None: go on); fail instead under CI."""
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"{reason}; .ci/run installs it, so CI must have it")
    pytest.skip(reason)
