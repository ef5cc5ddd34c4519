"""Column types that keep chain values exact and normalised on both SQLite and PostgreSQL.

`Amount` is `Numeric(78, 0)` on PostgreSQL. SQLite's NUMERIC affinity turns integers above 2**63 into
floats, so there it is a 78-digit zero-padded string: equality and ordering still work in SQL; SQLite's own
sum() would turn them into floats, so sums are done in Python (`queries.py`), or in SQL by the exact
functions `sqlite_amount_functions` adds to each SQLite connection. Both read back as `int`. A sum of
amounts in SQL is `func.amount_total(column)`: sum() on PostgreSQL, `amount_sum` on SQLite.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, Numeric, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.types import TypeDecorator, TypeEngine

AMOUNT_DIGITS = 78
_ADDRESS = re.compile(r"^0x[0-9a-f]{40}$")
_HASH32 = re.compile(r"^0x[0-9a-f]{64}$")


class Amount(TypeDecorator[int]):
    """A uint256 as a Python int (never a float, never a Decimal)."""

    impl = Numeric(AMOUNT_DIGITS, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(AMOUNT_DIGITS))
        return dialect.type_descriptor(Numeric(AMOUNT_DIGITS, 0, asdecimal=True))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**AMOUNT_DIGITS:
            raise ValueError(f"amount must be a non-negative int below 10**78, got {value!r}")
        return f"{value:0{AMOUNT_DIGITS}d}" if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


class amount_total(GenericFunction[int]):  # lower case: it is called as func.amount_total
    """SQL `amount_total(x)`: the exact sum of an `Amount` column over rows, NULL over none. SQLite's own
    sum() raises "integer overflow" past 2**63 - 1 and turns floats when one amount is larger."""

    type = Amount()
    name = "amount_total"
    inherit_cache = True


@compiles(amount_total)
def _amount_total(element: amount_total, compiler: SQLCompiler, **kw: Any) -> str:
    return f"sum({compiler.process(element.clauses, **kw)})"


@compiles(amount_total, "sqlite")
def _amount_total_sqlite(element: amount_total, compiler: SQLCompiler, **kw: Any) -> str:
    return f"amount_sum({compiler.process(element.clauses, **kw)})"


def _padded(value: int) -> str:
    return f"{value:0{AMOUNT_DIGITS}d}"


class _AmountSum:
    """SQL `amount_sum(x)`: the exact sum of amounts (NULLs skipped), as an amount; NULL over no rows (the
    sqlite3 module answers NULL for an aggregate that saw none)."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, value: str | int | None) -> None:
        if value is not None:
            self.total += int(value)

    def finalize(self) -> str:
        return _padded(self.total)


class _OwedSum:
    """SQL `owed_sum(charged, collected, written_off)`: the sum over rows of max(charged - collected -
    written_off, 0), NULLs counted as 0, as an amount (a lane's uncollected charge, summed over lanes);
    NULL over no rows."""

    def __init__(self) -> None:
        self.total = 0

    def step(self, charged: str | int | None, collected: str | int | None, lost: str | int | None) -> None:
        self.total += max(int(charged or 0) - int(collected or 0) - int(lost or 0), 0)

    def finalize(self) -> str:
        return _padded(self.total)


def sqlite_amount_functions(dbapi_conn: Any) -> None:
    """Exact sums of `Amount` strings in SQL on a sqlite3 connection (Python ints: no float, no overflow)."""
    dbapi_conn.create_aggregate("amount_sum", 1, _AmountSum)
    dbapi_conn.create_aggregate("owed_sum", 3, _OwedSum)


class _HexString(TypeDecorator[str]):
    impl = String
    cache_ok = True
    _pattern: re.Pattern[str]
    _what: str

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        low = value.lower()
        if not self._pattern.match(low):
            raise ValueError(f"not a {self._what}: {value!r}")
        return low


class Address(_HexString):
    """An EVM address, stored lower-case 0x-hex (42 chars)."""

    _pattern = _ADDRESS
    _what = "0x-hex address"
    cache_ok = True

    def __init__(self, length: int = 42) -> None:
        super().__init__(length)


class Hash32(_HexString):
    """A 32-byte hash, stored lower-case 0x-hex (66 chars)."""

    _pattern = _HASH32
    _what = "0x-hex 32-byte hash"
    cache_ok = True

    def __init__(self, length: int = 66) -> None:
        super().__init__(length)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime (SQLite forgets the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)
