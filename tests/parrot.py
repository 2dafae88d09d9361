"""A raw-PDU "parrot" peer: a socket client that writes hand-built PDUs (PS3.8 9.3).

After pynetdicom's ``tests/parrot.py``: the bytes on the wire are exactly the
ones built here, so a test can send what no well-behaved SCU would - a header
announcing 4 GiB, a data set before its command, a PDU type that does not
exist - and observe what the node answers.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.9999.1"


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A whole PDU: type, reserved, 32-bit big-endian length, body."""
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def presentation_context(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    """Presentation context item (PS3.8 9.3.2.2)."""
    sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)


def user_identity(primary: bytes, secondary: bytes = b"", kind: int = 2) -> bytes:
    """User identity negotiation sub-item (PS3.7 D.3.3.7)."""
    body = struct.pack(">BBH", kind, 0, len(primary)) + primary
    body += struct.pack(">H", len(secondary)) + secondary
    return item(0x58, body)


def extended_negotiation(sop_class: str, info: bytes) -> bytes:
    """SOP class extended negotiation sub-item (PS3.7 D.3.3.5)."""
    raw = sop_class.encode()
    return item(0x56, struct.pack(">H", len(raw)) + raw + info)


def associate_rq(
    calling: str = "PARROT",
    called: str = "CADNODE",
    contexts: list[bytes] | None = None,
    max_pdu: int = 16384,
    user_items: bytes = b"",
    trailing: bytes = b"",
) -> bytes:
    """A-ASSOCIATE-RQ PDU (PS3.8 9.3.2); by default one Verification context (ID 1).

    ``user_items`` go into the user information item (at most 64 KiB in all:
    its length field has 16 bits); ``trailing`` bytes follow it unchanged.
    """
    if contexts is None:
        contexts = [presentation_context(1, VERIFICATION, [IMPLICIT_VR_LE])]
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, IMPLEMENTATION_UID.encode())
    body = struct.pack(">HH", 1, 0)
    body += called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
    body += item(0x10, APPLICATION_CONTEXT.encode()) + b"".join(contexts)
    body += item(0x50, user + user_items) + trailing
    return pdu(0x01, body)


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """P-DATA-TF PDU of ``(context id, message control header, fragment)`` PDVs."""
    body = b"".join(
        struct.pack(">IB", len(data) + 2, ctx) + bytes([header]) + data
        for ctx, header, data in pdvs
    )
    return pdu(0x04, body)


def release_rq() -> bytes:
    """A-RELEASE-RQ PDU (PS3.8 9.3.6)."""
    return pdu(0x05, b"\x00" * 4)


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def command(*elements: tuple[int, bytes]) -> bytes:
    """An Implicit VR LE group-0000 command set with its group length first."""
    body = b"".join(_element(e, v) for e, v in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    """C-ECHO-RQ command set (PS3.7 9.3.5)."""
    return command(
        (0x0002, _uid(VERIFICATION)), (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101)),
    )


def c_store_rq(
    sop_class: str, sop_instance: str, message_id: int = 1, extra: bytes = b""
) -> bytes:
    """C-STORE-RQ command set (PS3.7 9.3.1.1); ``extra`` elements are appended."""
    body = command(
        (0x0002, _uid(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)), (0x1000, _uid(sop_instance)),
    )
    if not extra:
        return body
    rest = body[12:] + extra
    return _element(0x0000, struct.pack("<I", len(rest))) + rest


@dataclass
class Reply:
    """A PDU received from the node (``type`` 0 when the node closed the socket)."""

    type: int
    body: bytes

    @property
    def status(self) -> int | None:
        """Status (0000,0900) of a DIMSE response carried in a P-DATA-TF."""
        if self.type != 0x04:
            return None
        pos = 0
        while pos + 6 <= len(self.body):
            length = struct.unpack(">I", self.body[pos : pos + 4])[0]
            data = self.body[pos + 6 : pos + 4 + length]
            i = 0
            while i + 8 <= len(data):
                _, elem, n = struct.unpack("<HHI", data[i : i + 8])
                if elem == 0x0900:
                    return int(struct.unpack("<H", data[i + 8 : i + 10])[0])
                i += 8 + n
            pos += 4 + length
        return None


class Parrot:
    """A raw TCP client of the node."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect((host, port))

    def send(self, data: bytes) -> bool:
        """Send ``data``; ``False`` if the node has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return buf
            if not chunk:
                return buf
            buf += chunk
        return buf

    def receive(self, timeout: float = 5.0) -> Reply:
        """Next PDU from the node; ``Reply(0, b"")`` when it closed the socket.

        Raises
        ------
        TimeoutError
            Nothing arrived and the socket stayed open for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        header = self._recv_exact(6, deadline)
        if len(header) < 6:
            return Reply(0, b"")
        pdu_type, _, length = struct.unpack(">BBI", header)
        body = self._recv_exact(length, deadline)
        return Reply(pdu_type, body)

    def closed_by_node(self, timeout: float = 5.0) -> list[int]:
        """Read until the node closes the socket; the PDU types received on the way.

        Raises
        ------
        TimeoutError
            The socket is still open after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        types: list[int] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the node did not close the connection")
            reply = self.receive(remaining)
            if reply.type == 0:
                return types
            types.append(reply.type)

    def associate(self, rq: bytes | None = None, timeout: float = 5.0) -> Reply:
        """Send an A-ASSOCIATE-RQ (default: Verification) and return the answer."""
        self.send(rq if rq is not None else associate_rq())
        return self.receive(timeout)

    def close(self) -> None:
        """Close the client socket."""
        try:
            self.sock.close()
        except OSError:
            pass
