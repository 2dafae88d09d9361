"""Soak test of the receiving node: many concurrent senders for a long time (issue 9).

Starts ``cad-node serve`` **with its embedded worker** (routing: the default
chest-CT rule, so every complete study becomes a ct-chest job), then runs
``--senders`` threads (default 20) on loopback for ``--duration`` seconds
(default 600).  Each sender loops, bounded by the deadline and
``--max-rounds``: one association per round, ``--slices`` consecutive slices
of LIDC-IDRI-0001 sent as a new study (fresh Study/Series/SOP Instance UIDs of
the original lengths, substituted in the encoded bytes), C-STORE by C-STORE
over raw PDUs (:mod:`tests.parrot`, so the sender costs almost no CPU).

Records: instances/s, p50/p99 time from the first byte of a C-STORE to its
response, the peak RSS of the serve process and of its worker children
(/proc, sampled every 0.2 s), job states at the end, and checks that **every
acknowledged instance is in the index and its file is on disk**.

Usage::

    .venv/bin/python bench/soak.py [--senders 20] [--duration 600] [--slices 40]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import parrot  # noqa: E402  (the raw-PDU peer of the test-suite)

CAD_NODE = str(Path(sys.executable).with_name("cad-node"))
ECHOSCU = "/usr/bin/echoscu"
DATA = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(pid: int) -> tuple[int, int]:
    """(RSS of ``pid``, RSS of its descendants) in bytes."""
    def rss(p: int) -> int:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    children: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        for k in kids:
            children.append(int(k))
            frontier.append(int(k))
    return rss(pid), sum(rss(c) for c in children)


class Template:
    """The encoded slices with the positions of the UIDs to replace."""

    def __init__(self, files: list[Path]) -> None:
        from pydicom import dcmread

        from cad_node.storage.parse import split_part10

        self.sop_class = ""
        self.slices: list[tuple[str, bytes]] = []
        first = dcmread(files[0], stop_before_pixels=True)
        self.study = str(first.StudyInstanceUID)
        self.series = str(first.SeriesInstanceUID)
        self.sop_class = str(first.SOPClassUID)
        self.syntax = str(first.file_meta.TransferSyntaxUID)
        ordered = []
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            ordered.append((float(ds.ImagePositionPatient[2]), str(ds.SOPInstanceUID), f))
        # consecutive slices along z: every study sent is a gap-free chunk
        for _, sop, f in sorted(ordered):
            raw = f.read_bytes()
            _, offset = split_part10(raw)
            self.slices.append((sop, raw[offset:]))

    @staticmethod
    def uid_like(template: str, serial: int) -> str:
        """A fresh UID of exactly ``len(template)`` characters (2.25 root)."""
        digits = f"{serial:d}{time.time_ns():d}"
        uid = "2.25." + ("9" + digits).ljust(len(template) - 5, "1")
        return uid[: len(template)]


def sender(index: int, port: int, template: Template, slices: int, deadline: float,
           max_rounds: int, acks: list[tuple[str, float]], errors: list[str],
           lock: threading.Lock) -> None:
    """One sender: rounds of one new study over one association each."""
    contexts = [parrot.presentation_context(1, template.sop_class, [template.syntax])]
    serial = index * 1_000_000
    rounds = 0
    start = (index * 7) % max(1, len(template.slices) - slices)
    while time.monotonic() < deadline and rounds < max_rounds:
        rounds += 1
        serial += 1000
        study = Template.uid_like(template.study, serial)
        series = Template.uid_like(template.series, serial + 1)
        try:
            p = parrot.Parrot(port)
            reply = p.associate(parrot.associate_rq(calling="SOAK", contexts=contexts,
                                                    max_pdu=65536))
            if reply.type != 0x02:
                errors.append(f"sender {index}: association answered 0x{reply.type:02X}")
                p.close()
                time.sleep(0.5)
                continue
            for k, (sop, body) in enumerate(template.slices[start : start + slices]):
                if time.monotonic() >= deadline:
                    break
                uid = Template.uid_like(sop, serial + 2 + k)
                data = (body.replace(template.study.encode(), study.encode())
                        .replace(template.series.encode(), series.encode())
                        .replace(sop.encode(), uid.encode()))
                command = parrot.c_store_rq(template.sop_class, uid, k + 1)
                t0 = time.monotonic()
                p.send(parrot.p_data((1, 0x03, command)))
                step = 4 * 1024 * 1024 - 64
                for pos in range(0, len(data), step):
                    last = pos + step >= len(data)
                    p.send(parrot.p_data((1, 0x02 if last else 0x00, data[pos : pos + step])))
                rsp = p.receive(120)
                elapsed = time.monotonic() - t0
                if rsp.status == 0:
                    with lock:
                        acks.append((uid, elapsed))
                else:
                    errors.append(f"sender {index}: status {rsp.status} type {rsp.type}")
                    break
            p.send(parrot.release_rq())
            p.receive(30)
            p.close()
        except (OSError, TimeoutError) as exc:
            errors.append(f"sender {index}: {exc!r}")


def main() -> None:
    """Run the soak and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--max-rounds", type=int, default=10_000)
    args = parser.parse_args()
    files = sorted((DATA / "lidc-idri-0001").rglob("*.dcm"))
    if len(files) < args.slices:
        raise SystemExit(f"need LIDC-IDRI-0001 under {DATA}")
    template = Template(files)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp) / "var"
        cfg = Path(tmp) / "cad-node.yaml"
        cfg.write_text(
            f"node: {{ae_title: CADNODE, host: 127.0.0.1, port: {port}, storage_dir: {storage},"
            f" min_free_bytes: 0, max_associations: {args.senders + 4},"
            f" max_associations_per_peer: {args.senders + 4}}}\n"
            "peers: [{ae_title: SOAK, host: 127.0.0.1}, {ae_title: ECHOSCU, host: 127.0.0.1}]\n"
            "study: {series_quiet_s: 3, study_quiet_s: 5, force_complete_s: 600,"
            " poll_interval_s: 1}\n"
            f"models: {{dir: {REPO / 'models'}}}\n"
            f"metrics: {{enabled: true, port: {free_port()}}}\n"
            "routing: {rules: [{name: chest-ct, pipeline: ct-chest, series: best,"
            " match: {modality: [CT], min_instances: 40}}]}\n"
            "log_level: WARNING\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        log = open(Path(tmp) / "serve.log", "wb")
        proc = subprocess.Popen([CAD_NODE, "serve", "--config", str(cfg)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            while subprocess.run([ECHOSCU, "-aet", "ECHOSCU", "-aec", "CADNODE", "127.0.0.1",
                                  str(port)], capture_output=True).returncode != 0:
                if proc.poll() is not None or time.monotonic() - started > 120:
                    raise SystemExit("cad-node serve did not start; see serve.log")
                time.sleep(0.5)
            peak = [0, 0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    own, kids = tree_rss(proc.pid)
                    peak[0], peak[1] = max(peak[0], own), max(peak[1], kids)
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            acks: list[tuple[str, float]] = []
            errors: list[str] = []
            lock = threading.Lock()
            t0 = time.monotonic()
            deadline = t0 + args.duration
            threads = [threading.Thread(target=sender, args=(
                i, port, template, args.slices, deadline, args.max_rounds, acks, errors, lock))
                for i in range(args.senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            time.sleep(8)  # let the assembler hand the last studies off
            stop.set()
            sampler.join()
            db = sqlite3.connect(f"file:{storage}/spool/index.sqlite3?mode=ro", uri=True)
            missing_row = missing_file = 0
            for uid, _ in acks:
                row = db.execute("SELECT relpath FROM instance WHERE sop_instance_uid = ?",
                                 (uid,)).fetchone()
                if row is None:
                    missing_row += 1
                elif not (storage / "spool" / "objects" / row[0]).is_file():
                    missing_file += 1
            jobs: dict[str, int] = {}
            try:
                jdb = sqlite3.connect(f"file:{storage}/jobs.sqlite?mode=ro", uri=True)
                jobs = dict(jdb.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
                failure = jdb.execute("SELECT error FROM jobs WHERE state IN ('failed', 'dead')"
                                      " AND error IS NOT NULL LIMIT 1").fetchone()
                if failure:
                    print(f"first job failure: {str(failure[0])[:300]}")
            except sqlite3.Error as exc:
                jobs = {f"unreadable: {exc}": 0}
            times = sorted(t for _, t in acks)
            p50 = statistics.median(times) * 1000 if times else float("nan")
            p99 = times[int(0.99 * (len(times) - 1))] * 1000 if times else float("nan")
            print(f"senders {args.senders}, duration {wall:.0f} s, {args.slices} slices/study")
            print(f"acknowledged {len(acks)} instances: {len(acks) / wall:.1f} instances/s; "
                  f"ack time p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            print(f"peak RSS: serve {peak[0] / 1e6:.0f} MB, worker children {peak[1] / 1e6:.0f} MB")
            print(f"acknowledged but missing: {missing_row} index rows, {missing_file} files")
            print(f"jobs by state: {jobs}")
            print(f"sender errors: {len(errors)} {errors[:5]}")
            print(f"load average: {os.getloadavg()}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


if __name__ == "__main__":
    main()
