"""The durable spool: received bytes -> fsynced file -> index row -> Success.

Layout below ``<node.storage_dir>/spool/``::

    lock                    exclusive flock held by the one writing process
    index.sqlite3           SpoolIndex (WAL mode; -wal and -shm next to it)
    objects/NNNNNN/IIIIIIIIII.dcm   DICOM Part-10 files, I = instance id,
                                    N = instance id // FILES_PER_DIR

Names are built only from the node's own integer ids, never from a UID, an AE
title or any other peer-supplied string.

Order of operations in :meth:`Spool.store` (the durability contract)
---------------------------------------------------------------------
1. Validate the command UIDs (PS3.5 9.1) and walk the encoded data set
   (:func:`cad_node.storage.parse.inspect_dataset`); the data set's SOP Class
   and Instance UIDs must equal the command's.  Nothing is written on failure.
2. Duplicate check: an already indexed SOP Instance UID is *not* written
   again.  Policy: keep the first copy, answer Success, log it (a warning when
   the bytes differ, comparing SHA-256 of the file the duplicate would have
   been and of the stored first copy).  Duplicates never reopen a study.
3. Free-space check: if storing would leave less than ``min_free_bytes`` free
   on the spool filesystem, refuse (-> 0xA700).  Stored data is never deleted
   to make room.
4. Write File Meta Information + the received bytes (pixel data never
   decoded) to ``.<id>.tmp`` in the final directory (same filesystem),
   ``fsync`` it, ``rename`` it to ``<id>.dcm``, ``fsync`` the directory.
5. Insert the index row (one SQLite transaction in WAL mode): committed and
   visible to every reader before Success.  The row's SHA-256 is left
   pending: nothing before Success needs it, and the stored file is
   immutable, so :class:`~cad_node.storage.index.SpoolIndex` hashes it when
   a reader first asks (the study fingerprint at completion, a duplicate's
   comparison), also after a crash.
6. Only then does :meth:`store` return; the caller answers Success.

Why the index commit is not fsynced (``synchronous=NORMAL``)
-------------------------------------------------------------
The fsynced file is the durable record; the index is derived from it.  A
commit survives a process crash (``kill -9``) either way; only a power loss
can drop the last WAL commits, and then :meth:`Spool.open` finds the files
that have no index row and indexes them again before the node accepts
associations.  This saves one of three fsyncs per instance (a third of the
durable-write cost) without weakening "acknowledged => durable".

On any failure in 4-5 the temp/final file is removed and the error raised, so
a failure status never leaves a file behind.  After a crash, :meth:`Spool.open`
removes leftover ``.tmp`` files and indexes ("adopts") complete files that
were renamed but not yet indexed when the process died (their sender never got
Success and will resend; the resend is then a duplicate).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cad_node import __version__ as _node_version
from cad_node.storage.durable import fsync_dir as _fsync_dir
from cad_node.storage.index import (
    SHA256_PENDING,
    DuplicateInstanceError,
    NewInstance,
    SpoolIndex,
)
from cad_node.storage.parse import DatasetHeader, inspect_dataset, split_part10
from cad_node.uids import lenient_uid, validate_uid

__all__ = [
    "FILES_PER_DIR",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "InsufficientStorageError",
    "Spool",
    "SpoolLockedError",
    "SpoolOutcome",
    "StoreResult",
    "UIDMismatchError",
    "encode_file_meta",
    "free_bytes",
]

log = logging.getLogger(__name__)

#: Files per objects/ sub-directory.
FILES_PER_DIR = 4096
#: Implementation Class UID written in File Meta Information (PS3.7 D.3.3.2).
#: Derived from the UUID-based root 2.25 (PS3.5 B.2), fixed for cad-node.
IMPLEMENTATION_CLASS_UID = "2.25.255744136925125683125095893925127862811"
#: Implementation Version Name (PS3.7 D.3.3.2.2, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"CADNODE_{_node_version}"[:16]

_PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1
_TMP_SUFFIX = ".tmp"
_FILE_SUFFIX = ".dcm"


class UIDMismatchError(ValueError):
    """The data set's SOP Class or Instance UID differs from the command's."""

    def __init__(self, message: str, *, sop_class: bool) -> None:
        super().__init__(message)
        #: True when the SOP Class UIDs differ (else the SOP Instance UIDs).
        self.sop_class = sop_class


class InsufficientStorageError(OSError):
    """Storing would cross the free-disk watermark, or the disk is full."""


class SpoolLockedError(RuntimeError):
    """Another process already writes to this spool."""


class SpoolOutcome(Enum):
    """What :meth:`Spool.store` did with an instance (both mean: answer Success).

    Not a DIMSE status (those are :class:`cad_node.dimse.Status`).
    """

    #: Newly written and indexed.
    STORED = "stored"
    #: SOP Instance UID already indexed; the first copy was kept, nothing written.
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class StoreResult:
    """What :meth:`Spool.store` did."""

    status: SpoolOutcome
    instance_id: int
    header: DatasetHeader
    size: int


def free_bytes(path: str | Path) -> int:
    """Bytes available to an unprivileged user on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Encode the preamble, prefix and File Meta Information (PS3.10 7.1).

    Parameters
    ----------
    sop_class_uid, sop_instance_uid, transfer_syntax_uid : str
        Valid UIDs for (0002,0002), (0002,0003) and (0002,0010).

    Returns
    -------
    bytes
        128-byte preamble, ``DICM``, then group 0002 in Explicit VR Little
        Endian: group length, version, the three UIDs above, Implementation
        Class UID and Implementation Version Name.

    Notes
    -----
    The meta depends only on these UIDs, so the same data set always yields
    the same file bytes (and SHA-256), whoever sends it; the calling AE is
    kept in the index instead.  Hand-encoded: pydicom's writer costs about
    half a millisecond per instance.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body


class Spool:
    """Durable store of received instances plus its :class:`SpoolIndex`.

    Use :meth:`open`; one process at a time (an exclusive ``flock``).

    Parameters
    ----------
    root : Path
        The spool directory (``<storage_dir>/spool``).
    min_free_bytes : int
        Free-disk watermark: a store that would leave less free space fails
        with :class:`InsufficientStorageError`.
    own_manufacturers : frozenset of str
        Manufacturer (0008,0070) values of the node's own result objects.  A
        PACS that auto-routes a study back to the node also sends our SR/SEG/
        SC results; they are stored and listed like any instance but do not
        reopen the study, which would otherwise re-run the analysis on every
        round trip (a feedback loop).
    """

    def __init__(
        self,
        root: Path,
        min_free_bytes: int,
        lock_fd: int,
        own_manufacturers: frozenset[str] = frozenset(),
        database_url: str | None = None,
    ) -> None:
        self.root = root
        self.own_manufacturers = own_manufacturers
        self.objects_dir = root / "objects"
        self.min_free_bytes = min_free_bytes
        self._lock_fd = lock_fd
        self.index = SpoolIndex(database_url or root / "index.sqlite3", self.objects_dir,
                                synchronous="NORMAL")
        self._id_lock = threading.Lock()
        self._next_id = 1
        self._known_dirs: set[Path] = set()

    # -- life cycle ---------------------------------------------------------
    @classmethod
    def open(
        cls,
        storage_dir: str | Path,
        min_free_bytes: int = 0,
        own_manufacturers: frozenset[str] = frozenset(),
        database_url: str | None = None,
    ) -> Spool:
        """Open (creating if needed) the spool below ``storage_dir`` and recover.

        ``database_url`` puts the index in that database (``storage.database_url``,
        e.g. PostgreSQL) instead of ``spool/index.sqlite3``; the files stay below
        ``storage_dir`` and remain the record of every acknowledged instance.

        Raises
        ------
        SpoolLockedError
            Another process holds the spool lock.
        """
        root = Path(storage_dir).resolve() / "spool"
        (root / "objects").mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolLockedError(f"spool {root} is in use by another process") from None
        spool = cls(root, min_free_bytes, lock_fd, own_manufacturers, database_url)
        try:
            spool._recover()
        except BaseException:
            spool.close()
            raise
        return spool

    def close(self) -> None:
        """Close the index and release the lock."""
        self.index.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def index_path(storage_dir: str | Path) -> Path:
        """Where the index of the spool below ``storage_dir`` lives."""
        return Path(storage_dir).resolve() / "spool" / "index.sqlite3"

    @staticmethod
    def open_index_readonly(storage_dir: str | Path) -> SpoolIndex:
        """Open the index of ``storage_dir`` for reading from another process."""
        root = Path(storage_dir).resolve() / "spool"
        return SpoolIndex(root / "index.sqlite3", root / "objects", readonly=True)

    def _recover(self) -> None:
        """Remove temp files; adopt renamed-but-unindexed files; set the id counter."""
        max_id = self.index.max_instance_id()
        for sub in sorted(p for p in self.objects_dir.iterdir() if p.is_dir()):
            if not sub.name.isdigit():
                continue
            base = int(sub.name) * FILES_PER_DIR
            indexed = self.index.instance_ids_between(base, base + FILES_PER_DIR - 1)
            changed = False
            for entry in os.scandir(sub):
                if entry.name.endswith(_TMP_SUFFIX):
                    log.warning("spool recovery: removing unfinished temp file %s", entry.path)
                    os.unlink(entry.path)
                    changed = True
                    continue
                stem = entry.name.removesuffix(_FILE_SUFFIX)
                if not (entry.name.endswith(_FILE_SUFFIX) and stem.isdigit()):
                    continue
                instance_id = int(stem)
                max_id = max(max_id, instance_id)
                if instance_id not in indexed:
                    self._adopt(Path(entry.path), instance_id)
                    changed = True
            if changed:
                _fsync_dir(sub)
        self._next_id = max_id + 1

    def _adopt(self, path: Path, instance_id: int) -> None:
        """Index a complete file that was renamed but not indexed before a crash."""
        try:
            raw = path.read_bytes()
            transfer_syntax_uid, offset = split_part10(raw)
            header = inspect_dataset(raw[offset:], transfer_syntax_uid)
            self.index.add_instance(
                NewInstance(
                    instance_id=instance_id,
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    patient_id=header.patient_id,
                    accession_number=header.accession_number,
                    modality=header.modality,
                    relpath=str(path.relative_to(self.objects_dir)),
                    size=len(raw),
                    sha256=hashlib.sha256(raw).hexdigest(),
                    received_at=path.stat().st_mtime,
                    own_result=header.manufacturer in self.own_manufacturers,
                    uid_defects=header.uid_defects,
                )
            )
            log.warning("spool recovery: indexed complete but unindexed file %s", path)
        except DuplicateInstanceError:
            log.warning("spool recovery: %s duplicates an indexed instance; removing it", path)
            path.unlink()
        except (OSError, ValueError) as exc:
            log.error("spool recovery: cannot adopt %s (%s); moving it aside", path, exc)
            aside = self.root / "unreadable"
            aside.mkdir(exist_ok=True)
            os.rename(path, aside / path.name)

    # -- storing ------------------------------------------------------------
    def _allocate(self) -> int:
        with self._id_lock:
            instance_id = self._next_id
            self._next_id += 1
            return instance_id

    def _directory_for(self, instance_id: int) -> Path:
        directory = self.objects_dir / f"{instance_id // FILES_PER_DIR:06d}"
        if directory not in self._known_dirs:
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                _fsync_dir(self.objects_dir)
            self._known_dirs.add(directory)
        return directory

    def check_free_space(self, incoming: int) -> None:
        """Raise :class:`InsufficientStorageError` below the watermark."""
        free = free_bytes(self.objects_dir)
        if free - incoming < self.min_free_bytes:
            raise InsufficientStorageError(
                errno.ENOSPC,
                f"storing {incoming} bytes would leave {free - incoming} bytes free, "
                f"below the watermark of {self.min_free_bytes}",
            )

    def store(
        self,
        dataset: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str | None = None,
        peer_host: str | None = None,
    ) -> StoreResult:
        """Store one received data set durably (see the module docstring).

        Parameters
        ----------
        dataset : bytes
            The data set as received, in ``transfer_syntax_uid``, without
            File Meta Information.
        sop_class_uid, sop_instance_uid : str
            Affected SOP Class/Instance UID of the C-STORE request.
        transfer_syntax_uid : str
            Transfer syntax of the accepted presentation context.
        calling_ae, peer_host : str, optional
            Recorded in the index for audit (never used in a path).

        Returns
        -------
        StoreResult
            ``STORED`` or ``DUPLICATE``; either way the caller answers Success.

        Raises
        ------
        cad_node.uids.InvalidUIDError
            A command UID is invalid.
        cad_node.storage.parse.DatasetError
            The data set is empty, truncated, garbage or lacks a required UID.
        UIDMismatchError
            Data set and command disagree on the SOP Class or Instance UID.
        InsufficientStorageError
            Below the free-disk watermark, or the disk is full.
        OSError
            Any other write failure.  No file is left behind in every case.
        """
        # the SCP's UID policy: leading-zero components tolerated (and flagged
        # in the header's uid_defects), anything unsafe refused
        sop_class_uid, _ = lenient_uid(sop_class_uid, "Affected SOP Class UID")
        sop_instance_uid, _ = lenient_uid(sop_instance_uid, "Affected SOP Instance UID")
        transfer_syntax_uid = validate_uid(transfer_syntax_uid, "Transfer Syntax UID")
        header = inspect_dataset(dataset, transfer_syntax_uid)
        if header.sop_class_uid != sop_class_uid:
            raise UIDMismatchError(
                f"data set SOP Class UID {header.sop_class_uid} differs from the command's "
                f"{sop_class_uid}",
                sop_class=True,
            )
        if header.sop_instance_uid != sop_instance_uid:
            raise UIDMismatchError(
                f"data set SOP Instance UID {header.sop_instance_uid} differs from the "
                f"command's {sop_instance_uid}",
                sop_class=False,
            )
        meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        size = len(meta) + len(dataset)

        existing = self.index.find_instance(sop_instance_uid)
        if existing is not None:
            return self._duplicate(existing, meta, dataset, header, size, calling_ae)

        self.check_free_space(size)
        instance_id = self._allocate()
        directory = self._directory_for(instance_id)
        final = directory / f"{instance_id:010d}{_FILE_SUFFIX}"
        tmp = directory / f".{instance_id:010d}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                written = os.writev(fd, [meta, dataset])
                if written < size:  # short write: finish the rest
                    rest = memoryview(meta + dataset)
                    while written < size:
                        written += os.write(fd, rest[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorageError(exc.errno, f"disk full: {exc}") from exc
            raise
        try:
            self.index.add_instance(
                NewInstance(
                    instance_id=instance_id,
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    patient_id=header.patient_id,
                    accession_number=header.accession_number,
                    modality=header.modality,
                    relpath=str(final.relative_to(self.objects_dir)),
                    size=size,
                    sha256=SHA256_PENDING,
                    received_at=time.time(),
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                    own_result=header.manufacturer in self.own_manufacturers,
                    uid_defects=header.uid_defects,
                )
            )
        except DuplicateInstanceError:
            # Lost a race with a concurrent association storing the same UID:
            # our copy was never acknowledged, the first one is kept.
            final.unlink(missing_ok=True)
            existing = self.index.find_instance(sop_instance_uid)
            if existing is None:  # pragma: no cover - UNIQUE violation implies a row
                raise
            return self._duplicate(existing, meta, dataset, header, size, calling_ae)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        log.debug(
            "stored instance %d sop=%s study=%s (%d bytes)",
            instance_id, sop_instance_uid, header.study_instance_uid, size,
        )
        return StoreResult(SpoolOutcome.STORED, instance_id, header, size)

    def _duplicate(
        self,
        instance_id: int,
        meta: bytes,
        dataset: bytes,
        header: DatasetHeader,
        size: int,
        calling_ae: str | None,
    ) -> StoreResult:
        digest = hashlib.sha256(meta)
        digest.update(dataset)
        if self.index.file_sha256(instance_id) == digest.hexdigest():
            log.info(
                "duplicate instance sop=%s study=%s from %s: identical to instance %d, kept first",
                header.sop_instance_uid, header.study_instance_uid, calling_ae, instance_id,
            )
        else:
            log.warning(
                "duplicate instance sop=%s study=%s from %s: DIFFERENT bytes than instance %d; "
                "kept the first copy (policy keep-first)",
                header.sop_instance_uid, header.study_instance_uid, calling_ae, instance_id,
            )
        return StoreResult(SpoolOutcome.DUPLICATE, instance_id, header, size)
