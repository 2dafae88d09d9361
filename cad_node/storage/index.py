"""The spool index: patient / study / series / instance tables (SQLAlchemy Core).

SQLite in WAL mode by default (one file in the spool); PostgreSQL when
``storage.database_url`` names one (scale-out, see docs/deployment.md).  The
connection, pragma, transaction and schema-version rules are those of
:mod:`cad_node.storage.db`.

Why SQLite in WAL mode for the embedded node
--------------------------------------------
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
* Schema versions: component ``index`` in ``schema_version``; an index
  written before that table existed carries its version in SQLite's
  ``PRAGMA user_version`` (1 or 2) and is migrated from there.
* A row in ``instance`` exists only for a file that was fsynced, renamed and
  whose directory was fsynced.  Files are immutable once indexed.
* ``instance.sha256`` is the hex SHA-256 of the file, or :data:`SHA256_PENDING`
  (empty) when the spool has not hashed it yet: hashing is off the C-STORE
  critical path.  Readers that need it (:meth:`SpoolIndex.instance_hashes`,
  :meth:`SpoolIndex.file_sha256`) hash the immutable file on demand, and a
  writable index records the result; a crash leaves pending rows pending,
  which changes nothing since the file, not the row, is the truth.
* ``instance.uid_defects`` lists the tolerated UID defects of an instance
  stored under the SCP's lenient UID policy ("; "-separated, NULL when it
  conforms); ``StudyState.flagged_instances`` counts them per study.
* ``study.revision`` counts the new (non-duplicate) instances of a study,
  except the node's own result objects echoed back by a PACS (``own_result``);
  ``study.handed_revision`` is the revision included in the last hand-off.
  A study is *pending* (needs a hand-off) while ``revision > handed_revision``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cad_node.storage.db import Database, Migration, sqlite_url
from cad_node.storage.records import StoredInstance

__all__ = [
    "COMPONENT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SHA256_PENDING",
    "DuplicateInstanceError",
    "NewInstance",
    "SeriesState",
    "SpoolIndex",
    "StudyState",
]

#: Component name of the index in ``schema_version``.
COMPONENT = "index"
#: ``instance.sha256`` of a file not hashed yet (see the module docstring).
SHA256_PENDING = ""
#: Read size when hashing a stored file.
_HASH_CHUNK = 1024**2

METADATA = sa.MetaData()
PATIENT = sa.Table(
    "patient", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("patient_id", sa.Text, nullable=False, unique=True),
)
STUDY = sa.Table(
    "study", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_instance_uid", sa.Text, nullable=False, unique=True),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patient.id"), nullable=False),
    sa.Column("accession_number", sa.Text),
    sa.Column("first_received", sa.Float, nullable=False),
    sa.Column("last_received", sa.Float, nullable=False),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("handed_revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.Column("handed_fingerprint", sa.Text),
    sa.Column("handed_at", sa.Float),
    sa.Index("study_pending", "revision", "handed_revision"),
)
SERIES = sa.Table(
    "series", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_pk", sa.Integer, sa.ForeignKey("study.id"), nullable=False),
    sa.Column("series_instance_uid", sa.Text, nullable=False),
    sa.Column("modality", sa.Text),
    sa.Column("first_received", sa.Float, nullable=False),
    sa.Column("last_received", sa.Float, nullable=False),
    sa.Column("num_instances", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("study_pk", "series_instance_uid"),
    sa.Index("series_study", "study_pk"),
)
INSTANCE = sa.Table(
    "instance", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sop_instance_uid", sa.Text, nullable=False, unique=True),
    sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
    sa.Column("study_pk", sa.Integer, sa.ForeignKey("study.id"), nullable=False),
    sa.Column("sop_class_uid", sa.Text, nullable=False),
    sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
    sa.Column("modality", sa.Text),
    sa.Column("relpath", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("calling_ae", sa.Text),
    sa.Column("peer_host", sa.Text),
    sa.Column("own_result", sa.Integer, nullable=False, server_default="0"),
    #: Tolerated UID defects ("; "-separated), NULL for a conformant instance.
    sa.Column("uid_defects", sa.Text),
    sa.Index("instance_study", "study_pk"),
)


def _v2(conn: Connection, dialect: str) -> None:
    conn.execute(sa.text(
        "ALTER TABLE instance ADD COLUMN own_result INTEGER NOT NULL DEFAULT 0"))


def _v3(conn: Connection, dialect: str) -> None:
    conn.execute(sa.text("ALTER TABLE instance ADD COLUMN uid_defects TEXT"))


#: Schema steps of the index (version 1: the first released schema).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "instance.own_result (the node's own results echoed back)", _v2),
    Migration(3, "instance.uid_defects (stored with a tolerated UID defect)", _v3),
)
#: Current schema version of the index.
SCHEMA_VERSION = MIGRATIONS[-1].version


def _legacy_version(conn: Connection) -> int | None:
    """Version of an index written before ``schema_version`` (``PRAGMA user_version``)."""
    if not sa.inspect(conn).has_table("instance"):
        return None
    if conn.dialect.name == "sqlite":
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 1)
    return 1


def _upserts(greatest: str) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause, sa.TextClause]:
    """The four statements of :meth:`SpoolIndex.add_instance` (SQLite and PostgreSQL).

    ``INSERT ... ON CONFLICT ... DO UPDATE ... RETURNING`` (SQLite >= 3.35,
    PostgreSQL >= 9.5) creates or updates the patient, study and series rows
    and returns their keys in one statement each.  In ``DO UPDATE``, a column
    named by its table is the row's old value.
    """
    patient = sa.text(
        "INSERT INTO patient (patient_id) VALUES (:patient_id) "
        "ON CONFLICT (patient_id) DO UPDATE SET patient_id = excluded.patient_id RETURNING id")
    # A new instance (inc = 1) increments the revision and, when the study
    # had been handed on completely, restarts opened_at; the node's own
    # results echoed back (inc = 0) change nothing.
    study = sa.text(
        "INSERT INTO study (study_instance_uid, patient_pk, accession_number, first_received, "
        "last_received, opened_at, revision) VALUES (:study_uid, :patient_pk, :accession, :t, "
        ":t, :t, :inc) ON CONFLICT (study_instance_uid) DO UPDATE SET "
        "revision = study.revision + :inc, "
        f"last_received = CASE WHEN :inc = 1 THEN {greatest}(study.last_received, :t) "
        "ELSE study.last_received END, "
        "opened_at = CASE WHEN :inc = 1 AND study.revision = study.handed_revision THEN :t "
        "ELSE study.opened_at END RETURNING id")
    series = sa.text(
        "INSERT INTO series (study_pk, series_instance_uid, modality, first_received, "
        "last_received, num_instances) VALUES (:study_pk, :series_uid, :modality, :t, :t, 1) "
        "ON CONFLICT (study_pk, series_instance_uid) DO UPDATE SET "
        "num_instances = series.num_instances + 1, "
        f"last_received = {greatest}(series.last_received, :t) RETURNING id")
    instance = sa.text(
        "INSERT INTO instance (id, sop_instance_uid, series_pk, study_pk, sop_class_uid, "
        "transfer_syntax_uid, modality, relpath, size, sha256, received_at, calling_ae, "
        "peer_host, own_result, uid_defects) VALUES (:id, :sop_uid, :series_pk, :study_pk, "
        ":sop_class, :ts, :modality, :relpath, :size, :sha256, :t, :calling_ae, :peer_host, "
        ":own, :uid_defects)")
    return patient, study, series, instance


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
    #: Tolerated UID defects (:attr:`cad_node.storage.parse.DatasetHeader.uid_defects`).
    uid_defects: tuple[str, ...] = ()


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
    #: Instances stored with a tolerated UID defect (``instance.uid_defects``).
    flagged_instances: int = 0

    @property
    def pending(self) -> bool:
        """True when instances arrived that were not handed on yet."""
        return self.revision > self.handed_revision


_STUDY_COLUMNS = (
    "s.id, s.study_instance_uid, p.patient_id, s.first_received, s.last_received, s.opened_at, "
    "s.revision, s.handed_revision, s.generation, s.handed_fingerprint, "
    "(SELECT COUNT(*) FROM instance i WHERE i.study_pk = s.id), "
    "(SELECT COUNT(*) FROM instance i WHERE i.study_pk = s.id AND i.uid_defects IS NOT NULL)"
)
_INSTANCE_COLUMNS = (
    "i.id, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, i.sop_class_uid, "
    "i.transfer_syntax_uid, i.relpath, i.modality, i.received_at"
)
_INSTANCE_FROM = (
    "FROM instance i JOIN series se ON se.id = i.series_pk JOIN study st ON st.id = i.study_pk"
)


class SpoolIndex:
    """The index of the spool (SQLite file by default, or a database URL).

    Parameters
    ----------
    db_path : path-like or str
        The SQLite database file, or a database URL (``postgresql://...``,
        ``sqlite:///...``; see :mod:`cad_node.storage.db`).
    objects_dir : path-like
        Directory that ``instance.relpath`` is relative to; used to build
        absolute :attr:`StoredInstance.path` values.
    readonly : bool, optional
        Open for reading only (another process, e.g. the worker).  The
        database must already exist.
    synchronous : {"FULL", "NORMAL"}
        SQLite's ``synchronous`` pragma (see the module docstring).

    Notes
    -----
    Thread-safe: every call takes a pooled connection for one transaction.
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
        self.objects_dir = Path(objects_dir).resolve()
        self.readonly = readonly
        text = str(db_path)
        if isinstance(db_path, Path) or "://" not in text:
            self.db_path: Path | None = Path(db_path)
            if readonly and not self.db_path.exists():
                raise FileNotFoundError(f"spool index {self.db_path} does not exist")
            url = sqlite_url(self.db_path, readonly=readonly)
        else:
            self.db_path = None
            url = text
        self.db = Database(url, synchronous=synchronous, readonly=readonly)
        self.schema_version = self.db.migrate(COMPONENT, METADATA, MIGRATIONS,
                                              legacy_version=_legacy_version)
        greatest = "MAX" if self.db.dialect == "sqlite" else "GREATEST"
        self._sql_patient, self._sql_study, self._sql_series, self._sql_instance = (
            self.db.prepare(s) for s in _upserts(greatest))
        dbapi = self.db.engine.dialect.dbapi
        self._integrity_errors: tuple[type[Exception], ...] = (
            (IntegrityError,) if dbapi is None else (IntegrityError, dbapi.IntegrityError))
        self._sql_find = self.db.prepare(sa.select(INSTANCE.c.id).where(
            INSTANCE.c.sop_instance_uid == sa.bindparam("uid")))

    # -- life cycle ---------------------------------------------------------
    def close(self) -> None:
        """Close the pooled connections."""
        self.db.dispose()

    def __enter__(self) -> SpoolIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        t = rec.received_at
        # On the C-STORE path: prepared statements on the driver cursor
        # (Database.raw_write), four statements, one transaction.
        try:
            with self.db.raw_write() as cur:
                p = self._sql_patient
                cur.execute(p.sql, p.params({"patient_id": rec.patient_id}))
                patient_pk = cur.fetchone()[0]
                p = self._sql_study
                cur.execute(p.sql, p.params({
                    "study_uid": rec.study_instance_uid, "patient_pk": patient_pk,
                    "accession": rec.accession_number, "t": t,
                    "inc": 0 if rec.own_result else 1}))
                study_pk = cur.fetchone()[0]
                p = self._sql_series
                cur.execute(p.sql, p.params({
                    "study_pk": study_pk, "series_uid": rec.series_instance_uid,
                    "modality": rec.modality, "t": t}))
                series_pk = cur.fetchone()[0]
                p = self._sql_instance
                cur.execute(p.sql, p.params({
                    "id": rec.instance_id, "sop_uid": rec.sop_instance_uid,
                    "series_pk": series_pk, "study_pk": study_pk,
                    "sop_class": rec.sop_class_uid, "ts": rec.transfer_syntax_uid,
                    "modality": rec.modality, "relpath": rec.relpath, "size": rec.size,
                    "sha256": rec.sha256, "t": t, "calling_ae": rec.calling_ae,
                    "peer_host": rec.peer_host, "own": int(rec.own_result),
                    "uid_defects": "; ".join(rec.uid_defects) or None}))
        except self._integrity_errors as exc:
            if "sop_instance_uid" in str(exc):
                raise DuplicateInstanceError(rec.sop_instance_uid) from None
            raise

    def mark_handed(
        self, study_id: int, generation: int, fingerprint: str, revision: int, now: float
    ) -> None:
        """Record that ``revision`` of a study was handed on as ``generation``.

        Instances that arrived after the snapshot keep the study pending.
        """
        handed = sa.case((STUDY.c.handed_revision > revision, STUDY.c.handed_revision),
                         else_=revision)
        with self.db.write() as db:
            db.execute(sa.update(STUDY).where(STUDY.c.id == study_id).values(
                generation=generation, handed_fingerprint=fingerprint,
                handed_revision=handed, handed_at=now))

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
        with self.db.write() as db:
            row = db.execute(sa.select(STUDY.c.id, STUDY.c.revision).where(
                STUDY.c.study_instance_uid == study_instance_uid)).first()
            if row is None or int(row.revision) != revision:
                return False
            db.execute(sa.delete(INSTANCE).where(INSTANCE.c.study_pk == row.id))
            db.execute(sa.delete(SERIES).where(SERIES.c.study_pk == row.id))
            db.execute(sa.delete(STUDY).where(STUDY.c.id == row.id))
            return True

    # -- reads (any process) ------------------------------------------------
    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run a read; ``?`` placeholders (numbered here, so any dialect binds them)."""
        parts = sql.split("?")
        text = parts[0] + "".join(f":p{i}{part}" for i, part in enumerate(parts[1:]))
        with self.db.read() as conn:
            rows = conn.execute(sa.text(text), {f"p{i}": a for i, a in enumerate(args)})
            return [tuple(r) for r in rows]

    def find_instance(self, sop_instance_uid: str) -> int | None:
        """Return the instance id of an indexed SOP Instance UID, or None."""
        with self.db.raw_read() as cur:  # on the C-STORE path too
            cur.execute(self._sql_find.sql, self._sql_find.params({"uid": sop_instance_uid}))
            row = cur.fetchone()
        return int(row[0]) if row else None

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
            with self.db.write() as db:
                db.execute(
                    sa.text("UPDATE instance SET sha256 = :sha "
                            "WHERE id = :id AND sha256 = :pending"),
                    [{"sha": sha, "id": instance_id, "pending": SHA256_PENDING}
                     for instance_id, sha in hashes.items()],
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
            flagged_instances=int(row[11]),  # type: ignore[call-overload]
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

    def uid_defects(self, study_instance_uid: str) -> dict[str, str]:
        """SOP Instance UID -> its tolerated UID defects, for a study's flagged instances.

        Empty when the study is unknown or every instance is conformant
        (see :func:`cad_node.uids.lenient_uid` for what is tolerated).
        """
        rows = self._query(
            f"SELECT i.sop_instance_uid, i.uid_defects {_INSTANCE_FROM} "
            "WHERE st.study_instance_uid = ? AND i.uid_defects IS NOT NULL ORDER BY i.id",
            (study_instance_uid,),
        )
        return {str(r[0]): str(r[1]) for r in rows}

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

    def table_counts(self) -> dict[str, int]:
        """Rows per table (``cad-node db migrate`` checks these)."""
        with self.db.read() as conn:
            return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t))
                                .scalar_one())
                    for t in METADATA.sorted_tables}

    def counts(self) -> dict[str, int]:
        """Numbers of patients, studies, series and instances."""
        out: dict[str, int] = {}
        for table in ("patient", "study", "series", "instance"):
            out[table] = int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])  # type: ignore[call-overload]
        return out
