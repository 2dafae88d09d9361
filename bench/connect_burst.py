"""A burst of TCP connects, then a listed peer's C-ECHO: how long does it wait? (issue 9)

Runs the SCP in this process (as ``tests/integration/test_scp_hostile.py``
does) with the test's limits.  Each round opens ``--connections``
non-blocking TCP connections from the listed peer's address, holds them
``--hold`` seconds, closes them, waits until every admission slot is free and
times dcmtk ``echoscu`` (the listed peer ``ECHOSCU``).  ``--heap-objects``
keeps that many small dicts alive first, so the process's heap is the size of
a whole test session's (the stall this measures grew with the heap).

It also reports, per round, the time the accept thread spent in the server's
``service_actions`` hook (pynetdicom ran a full ``gc.collect()`` there every
60 turns of the accept loop) and in ``process_request``.

Usage::

    .venv/bin/python bench/connect_burst.py [--rounds 5] [--heap-objects 1500000] [--before]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynetdicom.transport import AssociationServer

from cad_node.config import NodeConfig, PeerConfig, Settings, StudyConfig
from cad_node.scp import NodeServer, _fastpath

ECHOSCU = shutil.which("echoscu") or "/usr/bin/echoscu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Timed:
    """Seconds the accept thread spends in two hooks of the node's server class."""

    def __init__(self) -> None:
        self.service = 0.0
        self.process = 0.0
        server = _fastpath._Server
        service, process = server.service_actions, server.process_request
        timed = self

        def service_actions(self: Any) -> None:
            t = time.perf_counter()
            service(self)
            timed.service += time.perf_counter() - t

        def process_request(self: Any, request: Any, address: Any) -> None:
            t = time.perf_counter()
            process(self, request, address)
            timed.process += time.perf_counter() - t

        server.service_actions = service_actions  # type: ignore[method-assign]
        server.process_request = process_request  # type: ignore[method-assign]


def _echo(port: int) -> tuple[float, int]:
    start = time.monotonic()
    proc = subprocess.run([ECHOSCU, "-aet", "ECHOSCU", "-aec", "CADNODE", "-to", "2",
                           "127.0.0.1", str(port)], capture_output=True, timeout=60)
    return time.monotonic() - start, proc.returncode


def main() -> None:
    """Run the rounds and print one line each, then the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--hold", type=float, default=0.5)
    parser.add_argument("--heap-objects", type=int, default=0)
    parser.add_argument("--before", action="store_true",
                        help="the accept loop as before the fix: pynetdicom's service_actions "
                             "(gc.collect() every 60 turns), no drop of closed connections")
    args = parser.parse_args()
    if args.before:
        _fastpath._Server.service_actions = (  # type: ignore[method-assign]
            AssociationServer.service_actions)
        _fastpath._peer_gone = lambda sock: False
    ballast = [{"k": [i, str(i)]} for i in range(args.heap_objects)]
    timed = _Timed()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            node=NodeConfig(host="127.0.0.1", port=_free_port(), storage_dir=tmp,
                            min_free_bytes=0, association_request_timeout_s=1.5),
            peers=[PeerConfig(ae_title="PARROT", host="127.0.0.1"),
                   PeerConfig(ae_title="ECHOSCU", host="127.0.0.1")],
            study=StudyConfig(series_quiet_s=30, study_quiet_s=60, force_complete_s=120),
        )
        node = NodeServer(settings)
        node.start()
        try:
            latencies: list[float] = []
            failures = 0
            for r in range(args.rounds):
                timed.service = timed.process = 0.0
                socks = []
                for _ in range(args.connections):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", node.port))
                    socks.append(s)
                time.sleep(args.hold)
                for s in socks:
                    s.close()
                t = time.monotonic()
                while node.admission.in_use:
                    time.sleep(0.01)
                free = time.monotonic() - t
                elapsed, rc = _echo(node.port)
                latencies.append(elapsed)
                failures += rc != 0
                print(f"round {r}: slots free after {free:.2f} s; echoscu {elapsed:.3f} s "
                      f"(rc {rc}); accept thread: service_actions {timed.service:.3f} s, "
                      f"process_request {timed.process:.3f} s", flush=True)
                time.sleep(0.5)
        finally:
            node.stop()
    print(f"{'before' if args.before else 'node'}: "
          f"echoscu after {args.connections} connects, {args.rounds} rounds, heap "
          f"{len(ballast)} extra dicts: median {statistics.median(latencies):.3f} s, "
          f"max {max(latencies):.3f} s, failed {failures}; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
