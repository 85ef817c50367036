"""The process-wide psycopg2 adapters pgaccess installs, leaving the application's.

psycopg2's adapters are per process, so these apply to all its users: infinite
Decimals are written as infinities, and ``uuid.UUID`` values (which psycopg2 cannot
adapt until ``register_uuid()``) as ``uuid`` literals; reading is unchanged (a uuid
column still comes back as ``str``). An adapter the application registered itself is
left alone.
"""

from __future__ import annotations

import decimal
import uuid
from typing import Any

import psycopg2.extensions as ext
import psycopg2.extras

__all__ = ["register_adapters"]

_psycopg2_decimal = ext.adapters[(decimal.Decimal, ext.ISQLQuote)]


def _adapt_decimal(value: decimal.Decimal) -> Any:
    """A Decimal as SQL; psycopg2's own adapter writes every non-finite Decimal as
    ``'NaN'::numeric``, so an infinity would be stored as NaN. Infinities are written
    as numeric infinities (PostgreSQL 14+; an older server rejects them with an error
    rather than storing NaN)."""
    if value.is_infinite():
        return ext.AsIs(
            "'-Infinity'::numeric" if value.is_signed() else "'Infinity'::numeric"
        )
    return _psycopg2_decimal(value)


def register_adapters() -> None:
    """Install pgaccess's value adapters where psycopg2's own are still in place.

    Idempotent and cheap (two dictionary look-ups); every pool calls it when made.
    """
    if ext.adapters.get((decimal.Decimal, ext.ISQLQuote)) is _psycopg2_decimal:
        ext.register_adapter(decimal.Decimal, _adapt_decimal)
    if (uuid.UUID, ext.ISQLQuote) not in ext.adapters:
        ext.register_adapter(uuid.UUID, psycopg2.extras.UUID_adapter)
