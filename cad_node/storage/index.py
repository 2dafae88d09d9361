"""The spool index: patient / study / series / instance tables in SQLite (WAL).

Why SQLite in WAL mode
----------------------
* A commit is atomic and, with ``synchronous=FULL`` (the default here), one
  ``fsync`` of the write-ahead log.  The spool opens it with
  ``synchronous=NORMAL`` because it can rebuild lost rows from its fsynced
  files (see :mod:`cad_node.storage.spool`).
* Readers in other processes (the job worker) see a consistent snapshot while
  the SCP writes, without blocking it (PS: WAL readers never block the writer).
* It ships with Python; nothing to run or administer.

Contract
--------
* Exactly one process writes (the SCP that holds the spool lock, see
  :class:`cad_node.storage.spool.Spool`); any number of processes may read
  through ``SpoolIndex(path, readonly=True)``.
* A row in ``instance`` exists only for a file that was fsynced, renamed and
  whose directory was fsynced.  Files are immutable once indexed.
* ``instance.sha256`` is the hex SHA-256 of the file, or :data:`SHA256_PENDING`
  (empty) when the spool has not hashed it yet: hashing is off the C-STORE
  critical path.  Readers that need it (:meth:`SpoolIndex.instance_hashes`,
  :meth:`SpoolIndex.file_sha256`) hash the immutable file on demand, and a
  writable index records the result; a crash leaves pending rows pending,
  which changes nothing since the file, not the row, is the truth.
* ``study.revision`` counts the new (non-duplicate) instances of a study,
  except the node's own result objects echoed back by a PACS (``own_result``);
  ``study.handed_revision`` is the revision included in the last hand-off.
  A study is *pending* (needs a hand-off) while ``revision > handed_revision``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cad_node.storage.records import StoredInstance

__all__ = [
    "SCHEMA_VERSION",
    "SHA256_PENDING",
    "DuplicateInstanceError",
    "NewInstance",
    "SeriesState",
    "SpoolIndex",
    "StudyState",
]

#: Version of the schema below, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 2
#: ``instance.sha256`` of a file not hashed yet (see the module docstring).
SHA256_PENDING = ""
#: Read size when hashing a stored file.
_HASH_CHUNK = 1024**2
#: How long a connection waits for a lock held by another one (ms).
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patient (
    id INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS study (
    id INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL UNIQUE,
    patient_pk INTEGER NOT NULL REFERENCES patient(id),
    accession_number TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    opened_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    handed_revision INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    handed_fingerprint TEXT,
    handed_at REAL
);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    study_pk INTEGER NOT NULL REFERENCES study(id),
    series_instance_uid TEXT NOT NULL,
    modality TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    num_instances INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_pk, series_instance_uid)
);
CREATE TABLE IF NOT EXISTS instance (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    series_pk INTEGER NOT NULL REFERENCES series(id),
    study_pk INTEGER NOT NULL REFERENCES study(id),
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    modality TEXT,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT,
    peer_host TEXT,
    own_result INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instance_study ON instance(study_pk);
CREATE INDEX IF NOT EXISTS series_study ON series(study_pk);
CREATE INDEX IF NOT EXISTS study_pending ON study(revision, handed_revision);
"""


class DuplicateInstanceError(Exception):
    """The SOP Instance UID is already in the index (first copy is kept)."""


@dataclass(frozen=True)
class NewInstance:
    """What the spool records for a freshly stored file."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    accession_number: str | None
    modality: str | None
    relpath: str
    size: int
    sha256: str
    received_at: float
    calling_ae: str | None = None
    peer_host: str | None = None
    #: One of the node's own result objects echoed back (does not reopen the study).
    own_result: bool = False


@dataclass(frozen=True)
class SeriesState:
    """A series of a study, for the completeness timers and for readers."""

    series_id: int
    series_instance_uid: str
    modality: str | None
    first_received: float
    last_received: float
    num_instances: int


@dataclass(frozen=True)
class StudyState:
    """Completeness state of one study."""

    study_id: int
    study_instance_uid: str
    patient_id: str
    first_received: float
    last_received: float
    opened_at: float
    revision: int
    handed_revision: int
    generation: int
    handed_fingerprint: str | None
    num_instances: int

    @property
    def pending(self) -> bool:
        """True when instances arrived that were not handed on yet."""
        return self.revision > self.handed_revision


_STUDY_COLUMNS = (
    "s.id, s.study_instance_uid, p.patient_id, s.first_received, s.last_received, s.opened_at, "
    "s.revision, s.handed_revision, s.generation, s.handed_fingerprint, "
    "(SELECT COUNT(*) FROM instance i WHERE i.study_pk = s.id)"
)
_INSTANCE_COLUMNS = (
    "i.id, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid, "
    "i.transfer_syntax_uid, i.relpath, i.modality, i.received_at"
)
_INSTANCE_FROM = (
    "FROM instance i JOIN series se ON se.id = i.series_pk JOIN study st ON st.id = i.study_pk"
)


class SpoolIndex:
    """SQLite index of the spool.

    Parameters
    ----------
    db_path : path-like
        The SQLite database file.
    objects_dir : path-like
        Directory that ``instance.relpath`` is relative to; used to build
        absolute :attr:`StoredInstance.path` values.
    readonly : bool, optional
        Open for reading only (another process, e.g. the worker).  The
        database must already exist.

    Notes
    -----
    Thread-safe: one connection guarded by a lock.
    """

    def __init__(
        self,
        db_path: str | Path,
        objects_dir: str | Path,
        *,
        readonly: bool = False,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.synchronous = synchronous
        self.db_path = Path(db_path)
        self.objects_dir = Path(objects_dir).resolve()
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.db_path.exists():
                raise FileNotFoundError(f"spool index {self.db_path} does not exist")
            uri = f"file:{self.db_path.resolve()}?mode=ro"
            self._db = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        else:
            self._db = sqlite3.connect(
                str(self.db_path), isolation_level=None, check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise RuntimeError(
                    f"spool index {self.db_path} has schema {version}, expected {SCHEMA_VERSION}"
                )
            if version == 1:  # 1 -> 2: own_result column
                self._db.execute(
                    "ALTER TABLE instance ADD COLUMN own_result INTEGER NOT NULL DEFAULT 0"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    # -- life cycle ---------------------------------------------------------
    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SpoolIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError("spool index opened read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- writes (SCP process only) -----------------------------------------
    def add_instance(self, rec: NewInstance) -> None:
        """Record a stored file (one durable transaction).

        Creates the patient, study and series rows when needed, increments
        the study revision and, if the study had been handed on, reopens it
        (``opened_at`` restarts the forced-completion timer).

        Raises
        ------
        DuplicateInstanceError
            The SOP Instance UID is already indexed; nothing is changed.
        """
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO patient(patient_id) VALUES (?) ON CONFLICT DO NOTHING",
                    (rec.patient_id,),
                )
                patient_pk = db.execute(
                    "SELECT id FROM patient WHERE patient_id = ?", (rec.patient_id,)
                ).fetchone()[0]
                db.execute(
                    "INSERT INTO study(study_instance_uid, patient_pk, accession_number, "
                    "first_received, last_received, opened_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (rec.study_instance_uid, patient_pk, rec.accession_number,
                     rec.received_at, rec.received_at, rec.received_at),
                )
                study_pk = db.execute(
                    "SELECT id FROM study WHERE study_instance_uid = ?",
                    (rec.study_instance_uid,),
                ).fetchone()[0]
                # opened_at restarts when the study was fully handed on before
                # this instance (SET expressions see the old row values).  The
                # node's own results echoed back never reopen a study.
                if not rec.own_result:
                    db.execute(
                        "UPDATE study SET revision = revision + 1, "
                        "last_received = MAX(last_received, ?), "
                        "opened_at = CASE WHEN revision = handed_revision THEN ? "
                        "ELSE opened_at END WHERE id = ?",
                        (rec.received_at, rec.received_at, study_pk),
                    )
                db.execute(
                    "INSERT INTO series(study_pk, series_instance_uid, modality, first_received, "
                    "last_received) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (study_pk, rec.series_instance_uid, rec.modality, rec.received_at,
                     rec.received_at),
                )
                series_pk = db.execute(
                    "SELECT id FROM series WHERE study_pk = ? AND series_instance_uid = ?",
                    (study_pk, rec.series_instance_uid),
                ).fetchone()[0]
                db.execute(
                    "UPDATE series SET num_instances = num_instances + 1, "
                    "last_received = MAX(last_received, ?) WHERE id = ?",
                    (rec.received_at, series_pk),
                )
                db.execute(
                    "INSERT INTO instance(id, sop_instance_uid, series_pk, study_pk, "
                    "sop_class_uid, transfer_syntax_uid, modality, relpath, size, sha256, "
                    "received_at, calling_ae, peer_host, own_result) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.instance_id, rec.sop_instance_uid, series_pk, study_pk,
                     rec.sop_class_uid, rec.transfer_syntax_uid, rec.modality, rec.relpath,
                     rec.size, rec.sha256, rec.received_at, rec.calling_ae, rec.peer_host,
                     int(rec.own_result)),
                )
        except sqlite3.IntegrityError as exc:
            if "instance.sop_instance_uid" in str(exc):
                raise DuplicateInstanceError(rec.sop_instance_uid) from None
            raise

    def mark_handed(
        self, study_id: int, generation: int, fingerprint: str, revision: int, now: float
    ) -> None:
        """Record that ``revision`` of a study was handed on as ``generation``.

        Instances that arrived after the snapshot keep the study pending.
        """
        with self._write() as db:
            db.execute(
                "UPDATE study SET generation = ?, handed_fingerprint = ?, "
                "handed_revision = MAX(handed_revision, ?), handed_at = ? WHERE id = ?",
                (generation, fingerprint, revision, now, study_id),
            )

    def remove_study(self, study_instance_uid: str, *, revision: int) -> bool:
        """Delete a study's instance, series and study rows (retention).

        Parameters
        ----------
        study_instance_uid : str
            The study.
        revision : int
            The revision the caller decided on; when an instance arrived since
            (the revision moved) nothing is deleted.

        Returns
        -------
        bool
            True when the rows were deleted, False when the study is unknown
            or its revision changed.
        """
        with self._write() as db:
            row = db.execute("SELECT id, revision FROM study WHERE study_instance_uid = ?",
                             (study_instance_uid,)).fetchone()
            if row is None or int(row[1]) != revision:
                return False
            db.execute("DELETE FROM instance WHERE study_pk = ?", (row[0],))
            db.execute("DELETE FROM series WHERE study_pk = ?", (row[0],))
            db.execute("DELETE FROM study WHERE id = ?", (row[0],))
            return True

    # -- reads (any process) ------------------------------------------------
    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def find_instance(self, sop_instance_uid: str) -> int | None:
        """Return the instance id of an indexed SOP Instance UID, or None."""
        rows = self._query(
            "SELECT id FROM instance WHERE sop_instance_uid = ?", (sop_instance_uid,)
        )
        return int(rows[0][0]) if rows else None  # type: ignore[call-overload]

    def _hash_file(self, relpath: str) -> str:
        digest = hashlib.sha256()
        with open(self.objects_dir / relpath, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _complete_hashes(self, pending: dict[int, str]) -> dict[int, str]:
        """Hash the files of ``{instance_id: relpath}``; record them when writable."""
        hashes = {instance_id: self._hash_file(relpath) for instance_id, relpath in pending.items()}
        if hashes and not self.readonly:
            with self._write() as db:
                db.executemany(
                    "UPDATE instance SET sha256 = ? WHERE id = ? AND sha256 = ?",
                    [(sha, instance_id, SHA256_PENDING) for instance_id, sha in hashes.items()],
                )
        return hashes

    def file_sha256(self, instance_id: int) -> str:
        """Hex SHA-256 of an indexed instance's file (hashed now if still pending).

        Raises
        ------
        KeyError
            ``instance_id`` is not indexed.
        """
        rows = self._query("SELECT sha256, relpath FROM instance WHERE id = ?", (instance_id,))
        if not rows:
            raise KeyError(instance_id)
        sha, relpath = str(rows[0][0]), str(rows[0][1])
        if sha != SHA256_PENDING:
            return sha
        return self._complete_hashes({instance_id: relpath})[instance_id]

    def max_instance_id(self) -> int:
        """Largest instance id in the index (0 when empty)."""
        value = self._query("SELECT COALESCE(MAX(id), 0) FROM instance")[0][0]
        return int(value)  # type: ignore[call-overload,no-any-return]

    def instance_ids_between(self, low: int, high: int) -> set[int]:
        """Indexed instance ids in ``[low, high]``."""
        rows = self._query("SELECT id FROM instance WHERE id BETWEEN ? AND ?", (low, high))
        return {int(r[0]) for r in rows}  # type: ignore[call-overload]

    def has_instance_id(self, instance_id: int) -> bool:
        """True when ``instance_id`` is indexed."""
        return bool(self._query("SELECT 1 FROM instance WHERE id = ?", (instance_id,)))

    def _to_instance(self, row: tuple[object, ...]) -> StoredInstance:
        return StoredInstance(
            instance_id=int(row[0]),  # type: ignore[call-overload]
            study_instance_uid=str(row[1]),
            series_instance_uid=str(row[2]),
            sop_instance_uid=str(row[3]),
            sop_class_uid=str(row[4]),
            transfer_syntax_uid=str(row[5]),
            path=self.objects_dir / str(row[6]),
            modality=None if row[7] is None else str(row[7]),
            received_at=float(row[8]),  # type: ignore[arg-type]
        )

    def instance(self, instance_id: int) -> StoredInstance | None:
        """The instance with the node's id ``instance_id``, or None."""
        rows = self._query(f"SELECT {_INSTANCE_COLUMNS} {_INSTANCE_FROM} WHERE i.id = ?",
                           (instance_id,))
        return self._to_instance(rows[0]) if rows else None

    def instances_for_study(self, study_instance_uid: str) -> list[StoredInstance]:
        """All stored instances of a study, ordered by series id then instance id.

        Parameters
        ----------
        study_instance_uid : str
            Study Instance UID.

        Returns
        -------
        list of StoredInstance
            Empty when the study is unknown.
        """
        rows = self._query(
            f"SELECT {_INSTANCE_COLUMNS} {_INSTANCE_FROM} WHERE st.study_instance_uid = ? "
            "ORDER BY i.series_pk, i.id",
            (study_instance_uid,),
        )
        return [self._to_instance(r) for r in rows]

    def instance_hashes(self, study_id: int) -> list[tuple[StoredInstance, str, bool]]:
        """``(instance, file sha256, own result)`` for every instance of a study (by node id).

        Files whose hash is still pending are hashed now (and the hashes
        recorded when the index is writable).
        """
        rows = self._query(
            f"SELECT {_INSTANCE_COLUMNS}, i.sha256, i.own_result, i.relpath {_INSTANCE_FROM} "
            "WHERE i.study_pk = ? ORDER BY i.series_pk, i.id",
            (study_id,),
        )
        hashes = self._complete_hashes({
            int(r[0]): str(r[11]) for r in rows if r[9] == SHA256_PENDING  # type: ignore[call-overload]
        })
        return [
            (self._to_instance(r), hashes.get(int(r[0]), str(r[9])), bool(r[10]))  # type: ignore[call-overload]
            for r in rows
        ]

    def _to_study(self, row: tuple[object, ...]) -> StudyState:
        return StudyState(
            study_id=int(row[0]),  # type: ignore[call-overload]
            study_instance_uid=str(row[1]),
            patient_id=str(row[2]),
            first_received=float(row[3]),  # type: ignore[arg-type]
            last_received=float(row[4]),  # type: ignore[arg-type]
            opened_at=float(row[5]),  # type: ignore[arg-type]
            revision=int(row[6]),  # type: ignore[call-overload]
            handed_revision=int(row[7]),  # type: ignore[call-overload]
            generation=int(row[8]),  # type: ignore[call-overload]
            handed_fingerprint=None if row[9] is None else str(row[9]),
            num_instances=int(row[10]),  # type: ignore[call-overload]
        )

    def study(self, study_instance_uid: str) -> StudyState | None:
        """State of one study, or None when unknown."""
        rows = self._query(
            f"SELECT {_STUDY_COLUMNS} FROM study s JOIN patient p ON p.id = s.patient_pk "
            "WHERE s.study_instance_uid = ?",
            (study_instance_uid,),
        )
        return self._to_study(rows[0]) if rows else None

    def studies(self, *, pending_only: bool = False) -> list[StudyState]:
        """All studies (or only those with instances not yet handed on), by id."""
        where = "WHERE s.revision > s.handed_revision" if pending_only else ""
        rows = self._query(
            f"SELECT {_STUDY_COLUMNS} FROM study s JOIN patient p ON p.id = s.patient_pk "
            f"{where} ORDER BY s.id"
        )
        return [self._to_study(r) for r in rows]

    def series_for_study(self, study_id: int) -> list[SeriesState]:
        """The series of a study (by node id), ordered by id."""
        rows = self._query(
            "SELECT id, series_instance_uid, modality, first_received, last_received, "
            "num_instances FROM series WHERE study_pk = ? ORDER BY id",
            (study_id,),
        )
        return [
            SeriesState(int(r[0]), str(r[1]), None if r[2] is None else str(r[2]),  # type: ignore[call-overload]
                        float(r[3]), float(r[4]), int(r[5]))  # type: ignore[arg-type,call-overload]
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        """Numbers of patients, studies, series and instances."""
        out: dict[str, int] = {}
        for table in ("patient", "study", "series", "instance"):
            out[table] = int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])  # type: ignore[call-overload]
        return out
