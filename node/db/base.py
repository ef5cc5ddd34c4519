"""The declarative base: one MetaData with a naming convention, so constraint names are the same
on SQLite and PostgreSQL and migrations can drop them by name."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import BigInteger, Boolean, Index, Integer, MetaData, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An auto-incrementing 64-bit id that SQLite also auto-increments (only INTEGER PRIMARY KEY does).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ChainRow:
    """Columns of every row the indexer derives from logs.

    `block_number` is the block of the event that created the row, `updated_block` the block of the
    last event that changed it: a rollback to block B rebuilds every row whose `updated_block > B`.
    `is_final` is set once `updated_block` is at or below the finalized block.
    """

    block_number: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    is_final: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Any, ...]:
        # the finaliser's `UPDATE ... WHERE NOT is_final AND updated_block <= :final` reads this
        return (Index(None, "is_final", "updated_block"),)


def table_of(model: type[Base]) -> Table:
    """A mapped class's Table, typed as one."""
    return cast(Table, model.__table__)
