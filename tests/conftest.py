"""The suite runs against a real PostgreSQL through pgaccess's own pytest plugin.

Markers are applied here, from what a test uses, so none is forgotten: a test that
uses the fault proxy (or a server of its own that it crashes) is ``faults``.
"""

from __future__ import annotations

from typing import List

import pytest

pytest_plugins = ["pgaccess.testing", "support.fixtures", "support.raw"]

#: Fixtures that inject network or server faults.
FAULT_FIXTURES = frozenset({"fault_proxy", "proxy_dsn", "proxy_db"})


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        if FAULT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.faults)
