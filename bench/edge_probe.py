"""Hostile-peer probe against ``cad-node serve``: resident memory and slots (issue 9).

Starts ``cad-node serve --no-worker`` with the default limits (peers:
``ECHOSCU@127.0.0.1``), measures its idle RSS, then:

1. memory: N connections (default 3) each send only the 6-byte header of an
   A-ASSOCIATE-RQ announcing 1 GiB, and one announcing 0xFFFFFFFF; the serve
   process's RSS is sampled for 3 s (peak from /proc VmRSS), and whether the
   node closed each connection is recorded;
2. slots: 40 idle TCP connections from 127.0.0.2 (not a peer) stay open while
   dcmtk ``echoscu`` from the listed peer runs; then they are closed and
   echoscu runs again.

Usage::

    .venv/bin/python bench/edge_probe.py [--connections 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAD_NODE = str(Path(sys.executable).with_name("cad-node"))
ECHOSCU = "/usr/bin/echoscu"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def echo(port: int) -> tuple[bool, float]:
    """Run dcmtk echoscu as the listed peer; (success, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([ECHOSCU, "-aet", "ECHOSCU", "-aec", "CADNODE", "-to", "5",
                           "127.0.0.1", str(port)], capture_output=True, timeout=30)
    return proc.returncode == 0, time.monotonic() - start


def closed_by_node(sock: socket.socket, timeout: float) -> bool:
    """True when the node closes ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def main() -> None:
    """Run the probe and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cad-node.yaml"
        cfg.write_text(
            f"node: {{ae_title: CADNODE, host: 127.0.0.1, port: {port}, storage_dir: {tmp}/var,"
            f" min_free_bytes: 0}}\n"
            "peers: [{ae_title: ECHOSCU, host: 127.0.0.1}]\n"
            f"metrics: {{enabled: true, port: {free_port()}}}\n"
            "log_level: ERROR\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([CAD_NODE, "serve", "--config", str(cfg), "--no-worker"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not echo(port)[0]:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("cad-node serve did not start")
                time.sleep(0.5)
            time.sleep(2)
            idle = rss(proc.pid)
            socks = []
            for length in [1 << 30] * args.connections + [0xFFFFFFFF]:
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(struct.pack(">BBI", 0x01, 0, length))
                socks.append(s)
            peak = idle
            end = time.monotonic() + 3
            while time.monotonic() < end:
                peak = max(peak, rss(proc.pid))
                time.sleep(0.05)
            closed = sum(closed_by_node(s, 1.0) for s in socks)
            for s in socks:
                s.close()
            print(f"memory probe: {args.connections} x 1 GiB + 1 x 0xFFFFFFFF announced; "
                  f"idle RSS {idle / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB "
                  f"(+{(peak - idle) / 1e6:.1f} MB); closed by the node: "
                  f"{closed}/{len(socks)}")
            strangers = []
            for _ in range(40):
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.connect(("127.0.0.1", port))
                strangers.append(s)
            ok, secs = echo(port)
            print(f"40 idle connections from 127.0.0.2 open: listed peer's C-ECHO "
                  f"{'succeeded' if ok else 'FAILED'} in {secs:.2f} s")
            closed = sum(closed_by_node(s, 1.0) for s in strangers)
            for s in strangers:
                s.close()
            ok, secs = echo(port)
            print(f"strangers closed by the node: {closed}/40; after closing them C-ECHO "
                  f"{'succeeded' if ok else 'FAILED'} in {secs:.2f} s")
            print(f"load average: {os.getloadavg()[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
