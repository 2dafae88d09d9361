"""Deterministic UIDs for every object the node emits.

Every output UID (Series, SOP Instance, tracking UIDs the pipeline left
empty) is a pure function of

* the source Study Instance UID,
* a fingerprint of the input instances (by default the sha256 of the sorted
  source SOP Instance UIDs, see :func:`input_fingerprint`),
* the model bundle identity (name, version, Device UID), and
* the object kind plus a local index (e.g. ``("sc", 3)``).

The UID is ``2.25.<decimal integer of a UUID>`` (the "UUID derived" root of
PS3.5 B.2, ISO/IEC 9834-8), which needs no registered organisation root and
is at most 44 characters long (PS3.5 9.1 limits UIDs to 64).  The UUID is the
first 128 bits of the sha256 of those parts with the RFC 4122 variant and the
version 8 ("custom", RFC 9562 5.8, whose example is exactly a SHA-256 name
hash) bits set, so it is a well-formed UUID as B.2 requires.  Re-running the
same input through the same model therefore yields identical UIDs, so a retry
never creates duplicates in the PACS, while a changed input set or new model
weights (new Device UID) yields new ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from cad_node.results.findings import ModelIdentity

__all__ = ["UID_ROOT", "UidFactory", "input_fingerprint"]

#: PS3.5 B.2: UIDs derived from a 128-bit UUID-like integer live under 2.25.
UID_ROOT = "2.25."

#: Separator between hashed parts (a byte that never occurs in a UID or version).
_SEP = b"\x1f"


#: RFC 4122 / RFC 9562 field masks of a 128-bit UUID integer: version (bits
#: 76-79) and variant (bits 62-63, ``0b10``).
_VERSION_MASK = 0xF << 76
_VERSION_8 = 0x8 << 76
_VARIANT_MASK = 0b11 << 62
_VARIANT_RFC4122 = 0b10 << 62


def _as_uuid_v8(value: int) -> int:
    """Set the version (8) and variant (RFC 4122) fields of a 128-bit integer."""
    return (value & ~_VERSION_MASK & ~_VARIANT_MASK) | _VERSION_8 | _VARIANT_RFC4122


def input_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """Fingerprint of a set of input instances.

    Parameters
    ----------
    sop_instance_uids : iterable of str
        SOP Instance UIDs of the analysed source instances, in any order;
        duplicates are ignored.

    Returns
    -------
    str
        Hex sha256 of the sorted, de-duplicated UIDs joined by a separator.
    """
    h = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        h.update(uid.encode("ascii"))
        h.update(_SEP)
    return h.hexdigest()


class UidFactory:
    """Derive output UIDs from study, input fingerprint and model identity.

    Parameters
    ----------
    study_instance_uid : str
        Study Instance UID of the source study.
    fingerprint : str
        Input fingerprint (:func:`input_fingerprint` or one the caller keeps).
    model : cad_node.results.findings.ModelIdentity
        Model bundle that produced the result.
    """

    def __init__(self, study_instance_uid: str, fingerprint: str, model: ModelIdentity) -> None:
        if not study_instance_uid:
            raise ValueError("a Study Instance UID is needed to derive output UIDs")
        if not fingerprint:
            raise ValueError("an input fingerprint is needed to derive output UIDs")
        self._base: tuple[str, ...] = (
            "cad-node-results-v1",
            study_instance_uid,
            fingerprint,
            model.name,
            model.version,
            model.device_uid,
        )

    def uid(self, kind: str, *parts: str | int) -> str:
        """Return the UID for object ``kind`` and local ``parts``.

        Parameters
        ----------
        kind : str
            What the UID identifies, e.g. ``"seg.series"``, ``"sc.instance"``.
        *parts : str or int
            Further discriminators, e.g. an instance index or tracking id.

        Returns
        -------
        str
            A ``2.25.`` UID (PS3.5 B.2), at most 44 characters.
        """
        h = hashlib.sha256()
        items: Sequence[str] = (*self._base, kind, *(str(p) for p in parts))
        for item in items:
            h.update(item.encode("utf-8"))
            h.update(_SEP)
        return UID_ROOT + str(_as_uuid_v8(int.from_bytes(h.digest()[:16], "big")))
