"""Ingest benchmark: a real CT series over C-STORE into cad-node, dcmtk storescp and Orthanc.

Sends the 133-slice LIDC-IDRI-0001 CT series (512x512, ~0.5 MB per instance)
with dcmtk ``storescu`` (``TCP_NODELAY=1`` in its environment, which dcmtk
reads) over one association and over 4 parallel associations, to

* cad-node (``cad-node serve`` subprocess; durable write: fsync file, rename,
  fsync directory, SQLite WAL commit before Success);
* dcmtk ``storescp`` (``TCP_NODELAY=1``; writes files, no fsync);
* Orthanc (generated JSON config with defaults, storage in a temp dir);

all in the same run, every round on a fresh, empty store (so no instance is a
duplicate).  Prints instances/s (median over rounds) and cad-node's ratios.

``--profile`` instead runs cad-node in-process with a cProfile per thread and
prints where the time goes for one association.

Usage::

    .venv/bin/python bench/ingest.py [--rounds 3] [--associations 1,4] [--series DIR]
                                     [--profile [--profile-storage /dev/shm]]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
CAD_NODE = str(Path(sys.executable).with_name("cad-node"))
#: dcmtk reads this variable and then sets TCP_NODELAY on its sockets.
DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
PDU = 131072  # the largest PDU dcmtk storescu sends (it announces Max Send PDV 131060)
TMPFS = "/dev/shm"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_series() -> Path:
    """The LIDC-IDRI-0001 CT series folder under the shared data."""
    root = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))
    hits = list((root / "lidc-idri-0001").rglob("069.xml"))
    if not hits:
        raise SystemExit(f"LIDC-IDRI-0001 not found under {root} (set CAD_NODE_TEST_DATA)")
    return hits[0].parent


def wait_echo(port: int, aec: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the SCP answers C-ECHO."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{aec} exited with {proc.returncode}")
        rc = subprocess.run([ECHOSCU, "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port)],
                            capture_output=True, env=DCMTK_ENV).returncode
        if rc == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aec} did not answer C-ECHO")


class Peer:
    """A storage SCP started on a fresh, empty store."""

    name = ""
    aec = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def start(self) -> None:
        cmd, env = self.command()
        log = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        wait_echo(self.port, self.aec, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(children.get(current, []))
    return total


#: The node counts as started once its process tree used less than this much
#: CPU over SETTLE_WINDOW_S seconds (the embedded worker child imports torch
#: for several CPU-seconds after the SCP already answers C-ECHO).
SETTLE_CPU_S = 0.05
SETTLE_WINDOW_S = 1.0


class NodePeer(Peer):
    """``cad-node serve`` with its default jobs runtime (embedded broker and worker).

    Sending starts once the node's process tree is idle, so the embedded
    worker's start-up does not overlap the measurement: the figure is that
    of a node that is up and waiting for studies.
    """

    name, aec = "cad-node", "CADNODE"

    def start(self) -> None:
        super().start()
        assert self.proc is not None
        deadline = time.monotonic() + 180
        before = tree_cpu_seconds(self.proc.pid)
        while time.monotonic() < deadline:
            time.sleep(SETTLE_WINDOW_S)
            after = tree_cpu_seconds(self.proc.pid)
            if after - before < SETTLE_CPU_S:
                return
            before = after
        raise RuntimeError("cad-node did not settle within 180 s")

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        cfg = self.workdir / "cad-node.yaml"
        cfg.write_text(
            f"node: {{ae_title: CADNODE, host: 127.0.0.1, port: {self.port}, "
            f"storage_dir: {self.workdir / 'storage'}, min_free_bytes: 0}}\n"
            "peers: [{ae_title: STORESCU, host: 127.0.0.1}]\n"
            "study: {series_quiet_s: 600, study_quiet_s: 600, force_complete_s: 3600}\n"
            "log_level: WARNING\n"
        )
        return [CAD_NODE, "serve", "--config", str(cfg)], None


class NodeTmpfsPeer(NodePeer):
    """cad-node with its storage on tmpfs (fsync is free): the SCP's own ceiling."""

    name = "cad-node-tmpfs"

    def start(self) -> None:
        self.shm = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=TMPFS))
        super().start()

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        cmd, env = super().command()
        cfg = self.workdir / "cad-node.yaml"
        cfg.write_text(cfg.read_text().replace(str(self.workdir / "storage"), str(self.shm)))
        return cmd, env

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.shm, ignore_errors=True)


class StorescpPeer(Peer):
    name, aec = "storescp", "STORESCP"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        out = self.workdir / "storescp"
        out.mkdir()
        return ([STORESCP, "-aet", "STORESCP", "--max-pdu", str(PDU), "-od", str(out),
                 str(self.port)], DCMTK_ENV)


class OrthancPeer(Peer):
    name, aec = "orthanc", "ORTHANC"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        storage = self.workdir / "orthanc-db"
        storage.mkdir()
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": "ORTHANC", "DicomPort": self.port, "HttpPort": free_port(),
            "RemoteAccessAllowed": False, "Plugins": [],
        }))
        return [ORTHANC, "--logdir=" + str(self.workdir), str(cfg)], None


def send(port: int, aec: str, files: list[str], parallel: int) -> float:
    """Send ``files`` over ``parallel`` storescu associations; return seconds."""
    groups = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", aec, "127.0.0.1", str(port), *g],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=DCMTK_ENV)
             for g in groups]
    outs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - start
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aec} failed: {out.decode()[-2000:]}")
    return elapsed


def durable_ceiling(files: list[str], workdir: Path) -> float:
    """Instances/s of the bare durable write alone (no network, no parsing).

    Per file: write to a temp file, fsync, rename, fsync the directory - the
    two fsyncs cad-node pays per instance.  Measured on the same filesystem
    as the stores above; it is the ceiling for one association.
    """
    directory = workdir / "ceiling"
    directory.mkdir()
    blobs = [Path(f).read_bytes() for f in files]
    start = time.perf_counter()
    for i, blob in enumerate(blobs):
        tmp, final = directory / f".{i}.tmp", directory / f"{i}.dcm"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, blob)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    return len(blobs) / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(series: Path, rounds: int, associations: tuple[int, ...] = (1, 4)
        ) -> dict[tuple[str, int], list[float]]:
    files = sorted(str(p) for p in series.glob("*.dcm"))
    for f in files:  # page cache
        Path(f).read_bytes()
    rates: dict[tuple[str, int], list[float]] = {}
    peers: list[type[Peer]] = [NodePeer, StorescpPeer, OrthancPeer]
    if os.access(TMPFS, os.W_OK):
        peers.append(NodeTmpfsPeer)
    for rnd in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            rate = durable_ceiling(files, Path(tmp))
        rates.setdefault(("fsync-ceiling", 1), []).append(rate)
        print(f"round {rnd + 1}: bare write+fsync+rename+fsync(dir): {rate:7.1f} files/s",
              flush=True)
        for parallel in associations:
            for cls in peers:
                with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
                    peer = cls(Path(tmp))
                    peer.start()
                    try:
                        assert peer.proc is not None
                        cpu0 = cpu_seconds(peer.proc.pid)
                        seconds = send(peer.port, peer.aec, files, parallel)
                        cpu = cpu_seconds(peer.proc.pid) - cpu0
                    finally:
                        peer.stop()
                rate = len(files) / seconds
                rates.setdefault((cls.name, parallel), []).append(rate)
                rates.setdefault((cls.name + " cpu-ms", parallel), []).append(
                    1000 * cpu / len(files))
                print(f"round {rnd + 1}: {cls.name:14s} x{parallel}: {rate:7.1f} instances/s, "
                      f"{1000 * cpu / len(files):5.2f} ms CPU per instance in the SCP process",
                      flush=True)
    return rates


def report(rates: dict[tuple[str, int], list[float]], n_files: int,
           associations: tuple[int, ...] = (1, 4)) -> str:
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"{n_files} CT instances (512x512), median of {len(next(iter(rates.values())))} "
             "rounds, instances/s:", "",
             "| associations | cad-node | dcmtk storescp | Orthanc "
             "| node/storescp | node/Orthanc |",
             "|---|---|---|---|---|---|"]
    for parallel in associations:
        node, scp, orth = (med[(n, parallel)] for n in ("cad-node", "storescp", "orthanc"))
        lines.append(f"| {parallel} | {node:.0f} | {scp:.0f} | {orth:.0f} | "
                     f"{node / scp:.2f} | {node / orth:.1f} |")
    if ("cad-node-tmpfs", associations[0]) in med:
        lines += ["", "cad-node with its storage on tmpfs (fsync free; the SCP's own ceiling): "
                  + ", ".join(f"{med[('cad-node-tmpfs', p)]:.0f} instances/s over {p}"
                              for p in associations) + "."]
    lines += ["", "CPU per instance in the SCP process (ms, user+system, /proc/PID/stat): "
              + "; ".join(f"{name} x{p}: {med[(name + ' cpu-ms', p)]:.2f}"
                          for p in associations
                          for name in ("cad-node", "cad-node-tmpfs", "storescp", "orthanc")
                          if (name + " cpu-ms", p) in med) + "."]
    ceiling = med[("fsync-ceiling", 1)]
    lines += ["", f"Bare durable write (write, fsync, rename, fsync dir; no network) on the same "
              f"filesystem: {ceiling:.0f} files/s; cad-node over 1 association reaches "
              f"{med[('cad-node', 1)] / ceiling:.2f} of it."]
    return "\n".join(lines)


def profile(series: Path, storage_root: str | None = None) -> None:
    """Run cad-node in-process, cProfile every thread, send one association.

    ``storage_root`` (e.g. ``/dev/shm``) puts the spool elsewhere, to profile
    the SCP without the cost of fsync.
    """
    from cad_node.config import NodeConfig, PeerConfig, Settings, StudyConfig
    from cad_node.scp import NodeServer

    profiles: list[cProfile.Profile] = []

    def start_profiler(*_: Any) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()

    files = sorted(str(p) for p in series.glob("*.dcm"))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=storage_root) as tmp:
        settings = Settings(
            node=NodeConfig(host="127.0.0.1", port=free_port(), storage_dir=tmp,
                            min_free_bytes=0),
            peers=[PeerConfig(ae_title="STORESCU", host="127.0.0.1")],
            study=StudyConfig(study_quiet_s=600, series_quiet_s=600, force_complete_s=3600),
        )
        server = NodeServer(settings)
        server.start()
        try:
            threading.setprofile(start_profiler)
            seconds = send(server.port, "CADNODE", files, 1)
            threading.setprofile(None)  # type: ignore[arg-type]
        finally:
            server.stop()
    print(f"profiled run: {len(files) / seconds:.1f} instances/s (profiling slows it down)")
    stats = pstats.Stats(*profiles)  # type: ignore[arg-type]
    stats.sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=None, help="folder of a CT series")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile cad-node instead")
    parser.add_argument("--associations", default="1,4",
                        help="comma-separated numbers of parallel associations (default 1,4)")
    parser.add_argument("--profile-storage", default=None,
                        help="spool location for --profile (e.g. /dev/shm: no fsync cost)")
    args = parser.parse_args(argv)
    for exe in (STORESCU, ECHOSCU, STORESCP, ORTHANC):
        if not os.access(exe, os.X_OK):
            raise SystemExit(f"{exe} is missing (make peers)")
    series = args.series or default_series()
    if args.profile:
        profile(series, args.profile_storage)
        return
    associations = tuple(int(n) for n in args.associations.split(","))
    rates = run(series, args.rounds, associations)
    print()
    print(report(rates, len(list(series.glob("*.dcm"))), associations))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"\nOrthanc: {subprocess.run([ORTHANC, '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")  # noqa: E501
    shutil.rmtree(REPO / "bench" / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
