"""cad_node.scp.wire.read_pdu: the per-PDU deadline and the socket timeout it lowers."""

from __future__ import annotations

import itertools
import struct
import time

import pytest

from cad_node.scp.wire import DEADLINE_SLACK_S, PDUError, PDUType, read_pdu

PDU = struct.pack(">BBI", PDUType.P_DATA_TF, 0, 100) + b"\x01" * 100


def _source(data: bytes, per_call: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
    pos = 0

    def recv_into(view: memoryview, size: int) -> int:
        nonlocal pos
        time.sleep(pause)
        n = min(size, per_call, len(data) - pos)
        view[:n] = data[pos:pos + n]
        pos += n
        return n

    return recv_into


def test_a_quick_pdu_never_touches_the_timeout() -> None:
    calls: list[float] = []
    got = read_pdu(_source(PDU, 40), lambda t: 1 << 20, time.monotonic() + 5.0,
                   calls.append, 5.0)
    assert bytes(got) == PDU and calls == []


def test_a_dribble_is_cut_at_the_deadline_and_the_timeout_follows_it() -> None:
    calls: list[float] = []
    start = time.monotonic()
    with pytest.raises(PDUError) as info:
        read_pdu(_source(PDU, 1, pause=0.05), lambda t: 1 << 20, start + 0.5,
                 calls.append, 30.0)
    elapsed = time.monotonic() - start
    assert info.value.timed_out and not info.value.peer_closed
    assert 0.5 <= elapsed < 0.5 + 0.2
    # lowered once from 30 s to what was left, then again only in steps of the slack
    assert calls and calls[0] <= 0.5
    assert all(b < a - DEADLINE_SLACK_S + 1e-9 for a, b in itertools.pairwise(calls))


def test_an_over_long_header_is_reported_with_its_type() -> None:
    rq = struct.pack(">BBI", PDUType.A_ASSOCIATE_RQ, 0, 1 << 30)
    with pytest.raises(PDUError) as info:
        read_pdu(_source(rq, 6), lambda t: 65536 - 6)
    assert info.value.too_long == PDUType.A_ASSOCIATE_RQ
