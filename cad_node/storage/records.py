"""Value objects shared by the spool, the study assembler and the job pipeline.

They are re-exported from :mod:`cad_node.study`; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StoredInstance", "StudyComplete"]


@dataclass(frozen=True)
class StoredInstance:
    """One durably stored instance, as recorded in the spool index.

    Attributes
    ----------
    instance_id : int
        The node's own id (index primary key); the file is named after it.
    study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid : str
        UIDs from the data set (validated, PS3.5 9.1).
    transfer_syntax_uid : str
        Transfer syntax the bytes are encoded in (as received).
    path : Path
        Absolute path of the stored DICOM Part-10 file in the spool.  The file
        is immutable once indexed; readers must not modify or delete it.
    modality : str or None
        Modality (0008,0060) captured at ingest, for routing.
    received_at : float
        Wall-clock time (``time.time()``) the instance was indexed.
    """

    instance_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    modality: str | None
    received_at: float


@dataclass(frozen=True)
class StudyComplete:
    """Hand-off event: "study X is complete with these instances".

    Attributes
    ----------
    study_id : int
        The node's own id of the study (index primary key).
    study_instance_uid : str
        Study Instance UID.
    generation : int
        1 on the first hand-off; +1 each time the study reopened (new
        instances arrived after a hand-off) and completed again.  A later
        generation supersedes earlier ones.
    instances : tuple of StoredInstance
        *Every* instance of the study stored so far (not only the new ones),
        ordered by series then instance id.
    fingerprint : str
        Hex SHA-256 over the sorted ``(SOP Instance UID, file SHA-256)`` pairs;
        see :func:`cad_node.study.study_fingerprint`.  Delivery is
        at-least-once: consumers de-duplicate on
        ``(study_instance_uid, fingerprint)``.
    """

    study_id: int
    study_instance_uid: str
    generation: int
    instances: tuple[StoredInstance, ...]
    fingerprint: str
