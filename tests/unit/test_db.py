"""The shared database module: transactions, read-only files, index schema versions."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from cad_node.storage.db import Database, DatabaseError, normalise_url, sqlite_url
from cad_node.storage.index import SCHEMA_VERSION, SpoolIndex


def test_urls() -> None:
    assert normalise_url("postgresql://u@h:5/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:////tmp/x.sqlite").get_backend_name() == "sqlite"
    with pytest.raises(DatabaseError, match="unsupported"):
        normalise_url("mysql://u@h/db")


def test_sqlite_pragmas_and_write_lock(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path / "a.sqlite"))
    with db.write() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    # write() takes the write lock up front (BEGIN IMMEDIATE): a second writer waits.
    order: list[str] = []

    def second() -> None:
        with db.write() as conn:
            order.append("second")
            conn.execute(sa.text("INSERT INTO t VALUES (2)"))

    with db.write() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]
    # A failing block rolls back.
    with pytest.raises(RuntimeError), db.write() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (3)"))
        raise RuntimeError("boom")
    with db.read() as conn:
        assert [r[0] for r in conn.execute(sa.text("SELECT x FROM t ORDER BY x"))] == [1, 2]
    ro = Database(sqlite_url(tmp_path / "a.sqlite", readonly=True), readonly=True)
    with pytest.raises(PermissionError):
        ro.write().__enter__()


#: An index of the first release: its tables and one instance.
_V1_INDEX = """
CREATE TABLE patient (id INTEGER PRIMARY KEY, patient_id TEXT NOT NULL UNIQUE);
CREATE TABLE study (id INTEGER PRIMARY KEY, study_instance_uid TEXT NOT NULL UNIQUE,
    patient_pk INTEGER NOT NULL REFERENCES patient(id), accession_number TEXT,
    first_received REAL NOT NULL, last_received REAL NOT NULL,
    opened_at REAL NOT NULL, revision INTEGER NOT NULL DEFAULT 0,
    handed_revision INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0, handed_fingerprint TEXT, handed_at REAL);
CREATE TABLE series (id INTEGER PRIMARY KEY,
    study_pk INTEGER NOT NULL REFERENCES study(id),
    series_instance_uid TEXT NOT NULL, modality TEXT, first_received REAL NOT NULL,
    last_received REAL NOT NULL, num_instances INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_pk, series_instance_uid));
CREATE TABLE instance (id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    series_pk INTEGER NOT NULL REFERENCES series(id),
    study_pk INTEGER NOT NULL REFERENCES study(id), sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL, modality TEXT, relpath TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, received_at REAL NOT NULL,
    calling_ae TEXT, peer_host TEXT);
INSERT INTO patient VALUES (1, 'P');
INSERT INTO study (id, study_instance_uid, patient_pk, first_received,
    last_received, opened_at, revision) VALUES (1, '1.2.3', 1, 1, 1, 1, 1);
INSERT INTO series VALUES (1, 1, '1.2.3.4', 'CT', 1, 1, 1);
INSERT INTO instance VALUES (7, '1.2.3.4.5', 1, 1, '1.2.840.10008.5.1.4.1.1.2',
    '1.2.840.10008.1.2.1', 'CT', '000000/0000000007.dcm', 10, 'ab', 1, 'X', '::1');
"""


def test_version_1_index_is_migrated(tmp_path: Path) -> None:
    """An index of the first release (PRAGMA user_version = 1, no own_result column)."""
    path = tmp_path / "index.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_V1_INDEX + "PRAGMA user_version = 1;")
    index = SpoolIndex(path, tmp_path / "objects")
    assert index.schema_version == SCHEMA_VERSION == 3
    assert index.db.schema_version("index") == 3
    assert index.counts() == {"patient": 1, "study": 1, "series": 1, "instance": 1}
    rows = index.instance_hashes(1)
    assert rows[0][2] is False  # own_result added with its default
    index.close()


def test_version_2_index_gets_the_uid_defect_column(tmp_path: Path) -> None:
    """An index at schema 2 (own_result, no uid_defects): migrated to 3, old rows unflagged."""
    from cad_node.storage.index import NewInstance

    path = tmp_path / "index.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_V1_INDEX + """
            ALTER TABLE instance ADD COLUMN own_result INTEGER NOT NULL DEFAULT 0;
            CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL,
                updated_at REAL NOT NULL);
            INSERT INTO schema_version VALUES ('index', 2, 1.0);
        """)
    index = SpoolIndex(path, tmp_path / "objects")
    assert index.schema_version == 3 and index.db.schema_version("index") == 3
    study = index.study("1.2.3")
    assert study is not None and study.num_instances == 1 and study.flagged_instances == 0
    assert index.uid_defects("1.2.3") == {}
    defect = "SOP Instance UID (0008,0018): component 6 has a leading zero"
    index.add_instance(NewInstance(8, "1.2.3.4.06", "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                   "1.2.3.4", "1.2.840.10008.1.2.1", "P", None, "CT",
                                   "000000/0000000008.dcm", 10, "", 2.0,
                                   uid_defects=(defect,)))
    study = index.study("1.2.3")
    assert study is not None and (study.num_instances, study.flagged_instances) == (2, 1)
    assert index.uid_defects("1.2.3") == {"1.2.3.4.06": defect}
    index.close()
    with sqlite3.connect(path) as db:  # the column itself, as an admin's SQL sees it
        rows = db.execute("SELECT id, uid_defects FROM instance ORDER BY id").fetchall()
    assert rows == [(7, None), (8, defect)]
