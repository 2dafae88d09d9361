"""Structural check and cheap header extraction of a received, encoded data set.

The C-STORE handler never decodes pixel data.  It does, however, have to
refuse a data set that is empty, truncated or garbage before it answers
Success, because an acknowledged instance must be usable later.  pydicom reads
a truncated Pixel Data value without complaint, so this module walks the
encoding itself (PS3.5 7.1 data elements, 7.5 nesting of sequences and items,
A.4 encapsulation):

* every top-level data element header is complete and its value fits in the
  buffer;
* every undefined-length sequence, item and encapsulated Pixel Data ends with
  its delimiter (PS3.5 7.5.2, A.4);
* the walk ends exactly at the end of the buffer;
* a Deflated Explicit VR Little Endian stream (PS3.5 A.5) inflates completely
  and then satisfies the rules above.

While walking, the values of a few top-level attributes are captured (UIDs,
Modality, Manufacturer, Patient ID, Accession Number) so the index can be filled without a
second parse.  The module depends on nothing but the standard library.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from cad_node.uids import InvalidUIDError, lenient_uid

__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "MAX_INFLATED_BYTES",
    "DatasetError",
    "DatasetHeader",
    "MalformedDatasetError",
    "MissingAttributeError",
    "inspect_dataset",
    "split_part10",
]

#: Implicit VR Little Endian, the default transfer syntax (PS3.5 A.1).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: Explicit VR Little Endian (PS3.5 A.2).
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: Deflated Explicit VR Little Endian (PS3.5 A.5).
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
#: Explicit VR Big Endian (retired, PS3.5 A.3).
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: Largest inflated size accepted for a deflated data set (guards against
#: decompression bombs).
MAX_INFLATED_BYTES = 2 * 1024**3
#: Deepest nesting of sequences accepted.
MAX_DEPTH = 32

_UNDEFINED_LENGTH = 0xFFFFFFFF  # PS3.5 7.1.1
_ITEM = 0xFFFEE000  # PS3.5 7.5
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010

#: VRs whose explicit-VR header has two reserved bytes and a 32-bit length
#: (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: VRs with a 16-bit length (PS3.5 Table 7.1-2).
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
     b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_ACCESSION_NUMBER = 0x00080050
_MODALITY = 0x00080060
_MANUFACTURER = 0x00080070
_PATIENT_ID = 0x00100020
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_WANTED = frozenset(
    {_SOP_CLASS_UID, _SOP_INSTANCE_UID, _ACCESSION_NUMBER, _MODALITY, _MANUFACTURER,
     _PATIENT_ID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID}
)


class DatasetError(ValueError):
    """A received data set cannot be accepted."""


class MalformedDatasetError(DatasetError):
    """The encoding is empty, truncated or not a DICOM data set."""


class MissingAttributeError(DatasetError):
    """A Type 1 attribute the node needs is absent, empty or invalid."""


@dataclass(frozen=True)
class DatasetHeader:
    """Top-level attributes captured from a data set during the structural walk.

    UIDs are normalized (padding removed) and valid per PS3.5 9.1.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    patient_id: str
    accession_number: str | None
    manufacturer: str | None = None
    #: Tolerated UID defects (e.g. a leading-zero component, see
    #: :func:`cad_node.uids.lenient_uid`): the instance is stored and flagged.
    uid_defects: tuple[str, ...] = ()


class _Walker:
    """Walk one encoded data set; see the module docstring for the rules."""

    def __init__(self, buf: bytes, explicit: bool, little: bool) -> None:
        self.buf = buf
        self.explicit = explicit
        self.prefix = "<" if little else ">"
        self.tag_len = struct.Struct(self.prefix + "HHI")
        self.tag_vr = struct.Struct(self.prefix + "HH2s")
        #: explicit VR header with a 16-bit length (PS3.5 Table 7.1-2)
        self.tag_vr_len = struct.Struct(self.prefix + "HH2sH")
        self.u16 = struct.Struct(self.prefix + "H")
        self.u32 = struct.Struct(self.prefix + "I")
        self.values: dict[int, bytes] = {}

    def _fail(self, pos: int, why: str) -> MalformedDatasetError:
        return MalformedDatasetError(f"{why} at byte {pos} of {len(self.buf)}")

    def dataset(self, pos: int, end: int, depth: int, in_item: bool, explicit: bool) -> int:
        """Parse elements from ``pos``; return the position after the data set."""
        buf = self.buf
        # bound methods and constants as locals: this loop runs once per element
        tag_len = self.tag_len.unpack_from
        tag_vr_len = self.tag_vr_len.unpack_from
        u32 = self.u32.unpack_from
        long_vrs, short_vrs, wanted = _LONG_VRS, _SHORT_VRS, _WANTED
        top = depth == 0
        values = self.values
        while pos < end:
            if pos + 8 > end:
                raise self._fail(pos, "truncated data element header")
            if explicit:
                group, elem, vr, length = tag_vr_len(buf, pos)
            else:
                group, elem, length = tag_len(buf, pos)
                vr = b""
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if tag == _ITEM_DELIMITER:
                    if not in_item:
                        raise self._fail(pos, "item delimiter outside an item")
                    return pos + 8
                raise self._fail(pos, f"unexpected delimiter tag ({group:04X},{elem:04X})")
            if explicit:
                if vr in long_vrs:
                    if pos + 12 > end:
                        raise self._fail(pos, "truncated data element header")
                    length = u32(buf, pos + 8)[0]
                    pos += 12
                elif vr in short_vrs:
                    pos += 8
                else:
                    raise self._fail(pos, f"invalid VR {vr!r} for ({group:04X},{elem:04X})")
            else:
                pos += 8
            if length == _UNDEFINED_LENGTH:
                if explicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise self._fail(pos, f"undefined length with VR {vr!r}")
                if depth >= MAX_DEPTH:
                    raise self._fail(pos, "sequences nested too deeply")
                # UN of undefined length is encoded as Implicit VR LE (PS3.5 6.2.2).
                nested_explicit = explicit and vr != b"UN"
                encapsulated = tag == _PIXEL_DATA and top
                pos = self.sequence(pos, end, depth + 1, nested_explicit, encapsulated)
            else:
                if pos + length > end:
                    raise self._fail(pos, f"value of ({group:04X},{elem:04X}) is truncated")
                if top and tag in wanted:
                    values[tag] = buf[pos : pos + length]
                pos += length
        if in_item:
            raise self._fail(pos, "item without item delimiter")
        return pos

    def sequence(
        self, pos: int, end: int, depth: int, explicit: bool, encapsulated: bool
    ) -> int:
        """Parse items of an undefined-length sequence up to its delimiter."""
        buf = self.buf
        while True:
            if pos + 8 > end:
                raise self._fail(pos, "sequence without sequence delimiter")
            group, elem, length = self.tag_len.unpack_from(buf, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQUENCE_DELIMITER:
                return pos
            if tag != _ITEM:
                raise self._fail(pos - 8, f"expected an item, found ({group:04X},{elem:04X})")
            if length == _UNDEFINED_LENGTH:
                if encapsulated:
                    raise self._fail(pos, "encapsulated fragment of undefined length")
                pos = self.dataset(pos, end, depth, True, explicit)
            else:
                if pos + length > end:
                    raise self._fail(pos, "item is truncated")
                pos += length


def _inflate(raw: bytes) -> bytes:
    decomp = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = decomp.decompress(raw, MAX_INFLATED_BYTES)
        if decomp.unconsumed_tail:
            raise MalformedDatasetError(
                f"deflated data set inflates to more than {MAX_INFLATED_BYTES} bytes"
            )
        out += decomp.flush()
    except zlib.error as exc:
        raise MalformedDatasetError(f"deflated data set is corrupt: {exc}") from None
    if not decomp.eof:
        raise MalformedDatasetError("deflated data set is truncated")
    return out


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    text = value.decode("latin-1").rstrip("\x00 ").lstrip(" ")
    return text or None


def _uid(values: dict[int, bytes], tag: int, name: str, defects: list[str]) -> str:
    raw = values.get(tag)
    if raw is None or not raw.rstrip(b"\x00 "):
        raise MissingAttributeError(f"{name} is missing or empty")
    try:
        uid, defect = lenient_uid(raw.decode("latin-1"), name)
    except InvalidUIDError as exc:
        raise MissingAttributeError(str(exc)) from None
    if defect is not None:
        defects.append(defect)
    return uid


def inspect_dataset(raw: bytes, transfer_syntax_uid: str) -> DatasetHeader:
    """Check the structure of an encoded data set and return its key attributes.

    Parameters
    ----------
    raw : bytes
        The data set exactly as received (no File Meta Information).
    transfer_syntax_uid : str
        Transfer syntax of the presentation context it arrived on.  Every
        syntax other than the three uncompressed ones and Deflated is encoded
        as Explicit VR Little Endian with encapsulated Pixel Data (PS3.5 A.4).

    Returns
    -------
    DatasetHeader
        SOP Class/Instance, Study and Series Instance UIDs (valid, or with a
        tolerated defect listed in ``uid_defects``), and Modality, Patient ID
        and Accession Number when present.

    Raises
    ------
    MalformedDatasetError
        The data set is empty, truncated or structurally not DICOM.
    MissingAttributeError
        SOP Class UID, SOP Instance UID, Study Instance UID or Series Instance
        UID is missing, empty or refused by :func:`cad_node.uids.lenient_uid`.
    """
    if not raw:
        raise MalformedDatasetError("data set is empty (zero length)")
    explicit, little = True, True
    if transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN:
        explicit = False
    elif transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN:
        little = False
    elif transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        raw = _inflate(raw)
        if not raw:
            raise MalformedDatasetError("deflated data set is empty")
    walker = _Walker(raw, explicit, little)
    end = walker.dataset(0, len(raw), 0, False, explicit)
    if end != len(raw):  # pragma: no cover - dataset() only returns at the end
        raise MalformedDatasetError(f"trailing bytes after data set at {end}")
    values = walker.values
    defects: list[str] = []
    return DatasetHeader(
        sop_class_uid=_uid(values, _SOP_CLASS_UID, "SOP Class UID (0008,0016)", defects),
        sop_instance_uid=_uid(
            values, _SOP_INSTANCE_UID, "SOP Instance UID (0008,0018)", defects
        ),
        study_instance_uid=_uid(
            values, _STUDY_INSTANCE_UID, "Study Instance UID (0020,000D)", defects
        ),
        series_instance_uid=_uid(
            values, _SERIES_INSTANCE_UID, "Series Instance UID (0020,000E)", defects
        ),
        modality=_text(values.get(_MODALITY)),
        patient_id=_text(values.get(_PATIENT_ID)) or "",
        accession_number=_text(values.get(_ACCESSION_NUMBER)),
        manufacturer=_text(values.get(_MANUFACTURER)),
        uid_defects=tuple(defects),
    )


_PART10_PREFIX_END = 132  # 128-byte preamble + "DICM" (PS3.10 7.1)
_TRANSFER_SYNTAX_UID = 0x00020010


def split_part10(raw: bytes) -> tuple[str, int]:
    """Locate the data set in a DICOM Part-10 file (PS3.10 7.1).

    Parameters
    ----------
    raw : bytes
        Whole file contents.

    Returns
    -------
    tuple of (str, int)
        The Transfer Syntax UID (0002,0010) and the offset of the first byte
        after the File Meta Information (always Explicit VR Little Endian).

    Raises
    ------
    MalformedDatasetError
        No ``DICM`` prefix, a truncated meta group or no Transfer Syntax UID.
    """
    if len(raw) < _PART10_PREFIX_END or raw[128:132] != b"DICM":
        raise MalformedDatasetError("not a DICOM Part-10 file (no DICM prefix)")
    walker = _Walker(raw, explicit=True, little=True)
    pos = _PART10_PREFIX_END
    transfer_syntax: str | None = None
    while pos + 8 <= len(raw) and struct.unpack_from("<H", raw, pos)[0] == 0x0002:
        elem = struct.unpack_from("<H", raw, pos + 2)[0]
        vr = raw[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length = walker.u32.unpack_from(raw, pos + 8)[0]
            pos += 12
        elif vr in _SHORT_VRS:
            length = walker.u16.unpack_from(raw, pos + 6)[0]
            pos += 8
        else:
            raise MalformedDatasetError(f"invalid VR {vr!r} in File Meta Information")
        if pos + length > len(raw):
            raise MalformedDatasetError("File Meta Information is truncated")
        if (0x0002 << 16 | elem) == _TRANSFER_SYNTAX_UID:
            transfer_syntax = raw[pos : pos + length].decode("latin-1").rstrip("\x00 ")
        pos += length
    if not transfer_syntax:
        raise MalformedDatasetError("File Meta Information has no Transfer Syntax UID")
    return transfer_syntax, pos
