"""Copy a store's tables from one database to another (``cad-node db migrate``).

Contract
--------
* The target is opened (and its schema created at the current version) by the
  store itself; the source is read at its current version, which must be the
  current one too (open it once with this release first).
* The target's tables must be empty: nothing is merged or overwritten.
* Rows are copied table by table in foreign-key order, in one transaction
  per table, keeping their primary keys; PostgreSQL identity sequences are
  then moved past the copied keys.
* The result is checked by counting the rows of every table on both sides;
  a difference raises :class:`CopyMismatchError`.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from cad_node.storage.db import Database

__all__ = ["CopyMismatchError", "copy_tables", "count_rows"]

#: Rows per INSERT batch.
BATCH = 2000


class CopyMismatchError(RuntimeError):
    """Row counts differ between source and target after a copy."""


def count_rows(db: Database, metadata: sa.MetaData) -> dict[str, int]:
    """Rows per table of ``metadata`` in ``db``."""
    with db.read() as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                for t in metadata.sorted_tables}


def _batches(db: Database, table: sa.Table) -> Iterator[list[dict[str, object]]]:
    key = list(table.primary_key.columns)
    with db.read() as conn:
        rows = conn.execute(sa.select(table).order_by(*key)).mappings()
        batch: list[dict[str, object]] = []
        for row in rows:
            batch.append(dict(row))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def copy_tables(source: Database, target: Database, metadata: sa.MetaData) -> dict[str, int]:
    """Copy every table of ``metadata`` from ``source`` to ``target``; return the counts.

    Raises
    ------
    ValueError
        A target table is not empty.
    CopyMismatchError
        The counts differ afterwards.
    """
    before = count_rows(target, metadata)
    busy = {name: n for name, n in before.items() if n}
    if busy:
        raise ValueError(f"target tables are not empty: {busy}")
    for table in metadata.sorted_tables:
        for batch in _batches(source, table):
            with target.write() as conn:
                conn.execute(table.insert(), batch)
        if target.dialect == "postgresql":
            for col in table.primary_key.columns:
                if col.autoincrement is True or (
                        col.autoincrement == "auto" and isinstance(col.type, sa.Integer)
                        and len(table.primary_key.columns) == 1):
                    with target.write() as conn:
                        conn.execute(sa.text(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', "
                            f"'{col.name}'), COALESCE((SELECT MAX({col.name}) FROM "
                            f"{table.name}), 0) + 1, false) WHERE pg_get_serial_sequence("
                            f"'{table.name}', '{col.name}') IS NOT NULL"))
    expected = count_rows(source, metadata)
    got = count_rows(target, metadata)
    if expected != got:
        raise CopyMismatchError(f"row counts differ: source {expected}, target {got}")
    return got
