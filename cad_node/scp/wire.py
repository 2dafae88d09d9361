"""Bytes on the wire: PDU framing limits, A-ABORT / A-ASSOCIATE-RJ, C-STORE commands.

Nothing here touches pynetdicom or a socket object; the one reader
(:func:`read_pdu`) takes a ``recv_into`` callable.  PS3.8 (upper layer) and
PS3.7 (DIMSE command sets, Implicit VR Little Endian) are the references.
"""

from __future__ import annotations

import enum
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DEADLINE_SLACK_S",
    "MAX_ASSOCIATE_PDU_BYTES",
    "MAX_COMMAND_SET_BYTES",
    "PDU_HEADER",
    "AbortReason",
    "PDUError",
    "PDUType",
    "StoreRequest",
    "command_has_data_set",
    "decode_c_store_rq",
    "encode_a_abort",
    "encode_a_associate_rj",
    "encode_c_store_rsp",
    "encode_c_store_rsp_raw",
    "read_pdu",
]

#: Bytes of the PDU header: type, reserved, 32-bit big-endian length (PS3.8 9.3.1).
PDU_HEADER = 6
#: Longest PDU (header included) accepted before an association is accepted:
#: an A-ASSOCIATE-RQ with hundreds of presentation contexts, user identity and
#: extended negotiation stays far below it.
MAX_ASSOCIATE_PDU_BYTES = 64 * 1024
#: Longest DIMSE command set accepted (a C-STORE-RQ is about 200 bytes).
MAX_COMMAND_SET_BYTES = 64 * 1024
#: First buffer of a PDU read; the buffer then doubles as bytes arrive.
_FIRST_CHUNK = 64 * 1024
#: How far one blocking read may run past a PDU's deadline (seconds), see :func:`read_pdu`.
DEADLINE_SLACK_S = 0.25
_MIN_TIMEOUT_S = 0.001


class PDUType(enum.IntEnum):
    """PDU types (PS3.8 9.3.1, Table 9-11)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortReason(enum.IntEnum):
    """A-ABORT reason/diag. when the source is the service provider (PS3.8 Table 9-26)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER_VALUE = 0x06


#: A-ABORT source: DICOM UL service-provider (PS3.8 Table 9-26).
ABORT_SOURCE_PROVIDER = 0x02


class PDUError(Exception):
    """The peer broke PDU framing; ``reason`` goes into the A-ABORT."""

    def __init__(
        self, message: str, reason: AbortReason, *, peer_closed: bool = False,
        timed_out: bool = False, too_long: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        #: The peer closed its socket: no A-ABORT is owed.
        self.peer_closed = peer_closed
        #: The PDU was not complete by the reader's deadline.
        self.timed_out = timed_out
        #: The type of a PDU whose length field was over the limit (only its
        #: header was read), else None.
        self.too_long = too_long


def encode_a_abort(reason: AbortReason, source: int = ABORT_SOURCE_PROVIDER) -> bytes:
    """A-ABORT PDU (PS3.8 9.3.8, Table 9-26)."""
    return struct.pack(">BBIBBBB", PDUType.A_ABORT, 0, 4, 0, 0, source, int(reason))


def encode_a_associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ PDU (PS3.8 9.3.4, Table 9-21)."""
    return struct.pack(">BBIBBBB", PDUType.A_ASSOCIATE_RJ, 0, 4, 0, result, source, diagnostic)


def read_pdu(
    recv_into: Callable[[memoryview, int], int],
    max_length: Callable[[int], int],
    deadline: float | None = None,
    settimeout: Callable[[float], None] | None = None,
    timeout: float = math.inf,
) -> bytearray:
    """Read one PDU, growing the buffer only as bytes arrive.

    Parameters
    ----------
    recv_into : callable
        ``socket.recv_into``-like: fills a view, returns the byte count
        (0 when the peer closed).  Socket timeouts propagate as ``OSError``.
    max_length : callable
        ``pdu_type -> largest PDU length field accepted`` for the current
        association state.
    deadline : float, optional
        ``time.monotonic()`` instant by which the whole PDU must have arrived.
    settimeout : callable, optional
        ``socket.settimeout``-like for the socket behind ``recv_into``.  With
        a deadline it is called with the seconds left whenever the timeout in
        force (initially ``timeout``) would let one ``recv_into`` block more
        than :data:`DEADLINE_SLACK_S` past the deadline, so a stalled PDU
        ends by then; a PDU that arrives quickly never calls it.
    timeout : float
        The socket timeout in force when the call starts (seconds).

    Returns
    -------
    bytearray
        The whole PDU, header included.

    Raises
    ------
    PDUError
        Unknown PDU type, a length over ``max_length``, the peer closing
        mid-PDU (truncated PDU, ``peer_closed``) or the deadline passing
        (``timed_out``; checked before every ``recv_into``, see
        ``settimeout``).
    OSError
        From ``recv_into``.
    """
    header = bytearray(PDU_HEADER)
    got, timeout = _fill(recv_into, memoryview(header), 0, deadline, settimeout, timeout)
    if got == 0:
        raise PDUError("peer closed the connection", AbortReason.NOT_SPECIFIED, peer_closed=True)
    if got < PDU_HEADER:
        raise PDUError(f"truncated PDU header ({got} of 6 bytes)", AbortReason.NOT_SPECIFIED,
                       peer_closed=True)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if pdu_type not in PDUType._value2member_map_:
        raise PDUError(f"unknown PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU)
    limit = max_length(pdu_type)
    if length > limit:
        raise PDUError(
            f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than the {limit} "
            "accepted now", AbortReason.INVALID_PDU_PARAMETER_VALUE, too_long=pdu_type,
        )
    total = PDU_HEADER + length
    buf = bytearray(min(total, PDU_HEADER + _FIRST_CHUNK))
    buf[:PDU_HEADER] = header
    pos = PDU_HEADER
    while pos < total:
        if pos == len(buf):
            buf.extend(bytes(min(len(buf), total - len(buf))))
        view = memoryview(buf)
        try:
            n, timeout = _fill(recv_into, view, pos, deadline, settimeout, timeout)
        finally:
            view.release()
        if n == pos:
            raise PDUError(
                f"truncated PDU: peer closed after {pos} of {total} bytes",
                AbortReason.NOT_SPECIFIED, peer_closed=True,
            )
        pos = n
    return buf


def _fill(
    recv_into: Callable[[memoryview, int], int], view: memoryview, pos: int,
    deadline: float | None, settimeout: Callable[[float], None] | None, timeout: float,
) -> tuple[int, float]:
    """Receive into ``view[pos:]`` until it is full or the peer closes.

    Returns the new end and the socket timeout now in force (see :func:`read_pdu`).
    """
    end = len(view)
    lower_below = timeout - DEADLINE_SLACK_S if settimeout is not None else -math.inf
    while pos < end:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left < 0:
                raise PDUError("PDU not complete before the deadline",
                               AbortReason.NOT_SPECIFIED, timed_out=True)
            if left < lower_below and settimeout is not None:
                timeout = max(left, _MIN_TIMEOUT_S)
                lower_below = timeout - DEADLINE_SLACK_S
                settimeout(timeout)
        n = recv_into(view[pos:], end - pos)
        if not n:
            return pos, timeout
        pos += n
    return pos, timeout


# -- DIMSE command sets (PS3.7 Annex E, Implicit VR Little Endian) ----------------

#: C-STORE-RSP Command Field (PS3.7 E.1-1 / 9.3.1.2).
_C_STORE_RSP = 0x8001
#: C-STORE-RQ Command Field (PS3.7 E.1-1 / 9.3.1.1).
_C_STORE_RQ = 0x0001
#: Command Data Set Type "no data set present" (PS3.7 E.1-1).
_NO_DATA_SET = 0x0101
_COMMAND_ELEMENT = struct.Struct("<HHI")
_CMD_GROUP_LENGTH = 0x0000
_CMD_AFFECTED_SOP_CLASS_UID = 0x0002
_CMD_COMMAND_FIELD = 0x0100
_CMD_MESSAGE_ID = 0x0110
_CMD_PRIORITY = 0x0700
_CMD_DATA_SET_TYPE = 0x0800
_CMD_AFFECTED_SOP_INSTANCE_UID = 0x1000
_CMD_MOVE_ORIGINATOR_AE = 0x1030
_CMD_MOVE_ORIGINATOR_ID = 0x1031
#: Elements a C-STORE-RQ may carry (PS3.7 Table 9.3-1); any other makes the
#: fast path hand the message to pynetdicom.
_C_STORE_RQ_ELEMENTS = frozenset({
    _CMD_GROUP_LENGTH, _CMD_AFFECTED_SOP_CLASS_UID, _CMD_COMMAND_FIELD, _CMD_MESSAGE_ID,
    _CMD_PRIORITY, _CMD_DATA_SET_TYPE, _CMD_AFFECTED_SOP_INSTANCE_UID,
    _CMD_MOVE_ORIGINATOR_AE, _CMD_MOVE_ORIGINATOR_ID,
})


def _command_element(elem: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of command group 0000 (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _even(raw: bytes) -> bytes:
    """NULL-pad a UI value to even length (PS3.5 6.2)."""
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_c_store_rsp_raw(
    sop_class_uid: bytes, sop_instance_uid: bytes, message_id: int, status: int
) -> bytes:
    """:func:`encode_c_store_rsp` for UIDs given as the bytes the request carried."""
    body = b"".join((
        _command_element(0x0002, _even(sop_class_uid)),
        _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", status)),
        _command_element(0x1000, _even(sop_instance_uid)),
    ))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def encode_c_store_rsp(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int
) -> bytes:
    """Encode a C-STORE-RSP command set (PS3.7 9.3.1.2, Table 9.3-2).

    Implicit VR Little Endian, elements in ascending order: Command Group
    Length, Affected SOP Class UID, Command Field (8001H), Message ID Being
    Responded To, Command Data Set Type (0101H, none), Status, Affected SOP
    Instance UID.  UIDs are NULL-padded to even length (PS3.5 6.2).

    Raises
    ------
    UnicodeEncodeError
        A UID is not ASCII (the caller falls back to pynetdicom's encoder).
    """
    return encode_c_store_rsp_raw(
        sop_class_uid.encode("ascii"), sop_instance_uid.encode("ascii"), message_id, status
    )


@dataclass
class StoreRequest:
    """A C-STORE-RQ decoded without pydicom (PS3.7 9.3.1.1, Table 9.3-1).

    UIDs are kept as received (``*_raw``, possibly NULL-padded) so the
    response echoes them byte for byte; ``dataset`` is filled in as the data
    set fragments arrive.
    """

    message_id: int
    sop_class_raw: bytes
    sop_instance_raw: bytes
    dataset: bytes = b""

    @property
    def sop_class_uid(self) -> str:
        """Affected SOP Class UID (latin-1 decoded, padding kept)."""
        return self.sop_class_raw.decode("latin-1")

    @property
    def sop_instance_uid(self) -> str:
        """Affected SOP Instance UID (latin-1 decoded, padding kept)."""
        return self.sop_instance_raw.decode("latin-1")


def _walk(command: bytes) -> dict[int, bytes] | None:
    """Elements of an Implicit VR LE group-0000 command set, or ``None`` if malformed."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    unpack = _COMMAND_ELEMENT.unpack_from
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = unpack(command, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            return None
        values[elem] = command[pos : pos + length]
        pos += length
    return values


def command_has_data_set(command: bytes) -> bool | None:
    """Whether a command set announces a data set (Command Data Set Type, PS3.7 E.1-1).

    Returns ``None`` when the command set is not a well-formed sequence of
    group-0000 elements or carries no valid Command Data Set Type.
    """
    values = _walk(command)
    if values is None:
        return None
    data_set_type = values.get(_CMD_DATA_SET_TYPE)
    if data_set_type is None or len(data_set_type) != 2:
        return None
    return bool(struct.unpack("<H", data_set_type)[0] != _NO_DATA_SET)


def decode_c_store_rq(command: bytes) -> StoreRequest | None:
    """Decode a C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 6.3.1).

    Returns
    -------
    StoreRequest or None
        ``None`` when ``command`` is not a well-formed C-STORE-RQ with a data
        set (another command, a truncated or unexpected element, a missing
        Message ID or UID): the caller then lets pynetdicom decode it.
    """
    values = _walk(command)
    if values is None or not values.keys() <= _C_STORE_RQ_ELEMENTS:
        return None
    field = values.get(_CMD_COMMAND_FIELD)
    data_set_type = values.get(_CMD_DATA_SET_TYPE)
    message_id = values.get(_CMD_MESSAGE_ID)
    sop_class = values.get(_CMD_AFFECTED_SOP_CLASS_UID)
    sop_instance = values.get(_CMD_AFFECTED_SOP_INSTANCE_UID)
    if (
        field is None or len(field) != 2 or struct.unpack("<H", field)[0] != _C_STORE_RQ
        or data_set_type is None or len(data_set_type) != 2
        or struct.unpack("<H", data_set_type)[0] == _NO_DATA_SET
        or message_id is None or len(message_id) != 2
        or sop_class is None or sop_instance is None
    ):
        return None
    return StoreRequest(struct.unpack("<H", message_id)[0], sop_class, sop_instance)
