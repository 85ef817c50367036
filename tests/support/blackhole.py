"""A real network blackhole on loopback: every packet to or from one TCP port dropped.

``FaultProxy.stall()`` stops forwarding, but the proxy's kernel still acknowledges
what the client sends, so the client's TCP sees a healthy peer. A dead path (a
firewall that drops, a pulled cable, a host gone without a RST) acknowledges nothing:
that is what TCP keepalives and ``tcp_user_timeout`` detect, and what this module
makes, with an nftables table of its own that drops packets on one port of
127.0.0.1 and nothing else.

It needs the ``nft`` command and CAP_NET_ADMIN (root). ``.ci/run`` installs
Debian's ``nftables`` when it is missing; elsewhere ``unavailable()`` gives the reason
to skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from typing import Iterator, Optional

__all__ = ["blackhole", "unavailable"]


def _nft(*args: str, script: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nft", *args],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )


@functools.cache
def unavailable() -> Optional[str]:
    """Why a blackhole cannot be made here, or None when it can."""
    if shutil.which("nft") is None:
        return "needs the nft command (Debian's nftables; .ci/run installs it)"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for nftables"
    probe = _nft("list", "tables")
    if probe.returncode != 0:
        return f"nftables refused: {probe.stderr.strip()}"
    return None


@contextlib.contextmanager
def blackhole(port: int) -> Iterator[None]:
    """Drop every TCP packet to or from ``127.0.0.1:port`` while the block runs.

    Connections through the port stay open at both ends and nothing is sent back:
    no ACK, no RST, no ICMP. Other ports, and so other tests, are untouched.
    """
    table = f"pgaccess_blackhole_{port}"
    _nft("delete", "table", "inet", table)  # a leftover of a killed run, if any
    made = _nft(
        "-f",
        "-",
        script=(
            f"table inet {table} {{\n"
            "  chain output {\n"
            "    type filter hook output priority 0; policy accept;\n"
            f"    ip daddr 127.0.0.1 tcp dport {port} drop\n"
            f"    ip saddr 127.0.0.1 tcp sport {port} drop\n"
            "  }\n"
            "}\n"
        ),
    )
    if made.returncode != 0:
        raise RuntimeError(f"nft could not make the blackhole: {made.stderr.strip()}")
    try:
        yield
    finally:
        gone = _nft("delete", "table", "inet", table)
        if gone.returncode != 0:
            raise RuntimeError(f"nft could not remove {table}: {gone.stderr.strip()}")
