"""CPU of the spool index's C-STORE path: ``find_instance`` + ``add_instance`` per instance.

Runs in-process on tmpfs (no fsync), so it isolates the database-access code
from the disk.  ``--tree DIR`` measures another checkout (e.g. ``git archive``
of an older commit) in the same run, for before/after figures.

Usage::

    .venv/bin/python bench/index_write.py [--n 2000] [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_CHILD = """
import sys, time, tempfile, os
sys.path.insert(0, sys.argv[1])
from cad_node.storage.index import SpoolIndex, NewInstance
d = tempfile.mkdtemp(dir=sys.argv[3])
idx = SpoolIndex(os.path.join(d, "i.sqlite3"), d, synchronous="NORMAL")
n = int(sys.argv[2])
t0 = time.process_time()
for i in range(1, n + 1):
    idx.find_instance(f"1.2.3.{i}")
    idx.add_instance(NewInstance(i, f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                 "1.2.3.9", "1.2.840.10008.1.2.1", "P", None, "CT",
                                 f"x/{i}.dcm", 100, "", time.time()))
print(f"{(time.process_time() - t0) / n * 1e3:.3f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--tree", type=Path, action="append", default=[])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    print(f"load average {os.getloadavg()}")
    for tree in [REPO, *args.tree]:
        runs = [float(subprocess.run([sys.executable, "-c", _CHILD, str(tree), str(args.n), tmp],
                                     capture_output=True, text=True, check=True).stdout)
                for _ in range(args.repeat)]
        print(f"{tree}: {min(runs):.3f} ms CPU per instance (best of {args.repeat}: "
              f"{', '.join(f'{r:.3f}' for r in runs)})")


if __name__ == "__main__":
    main()
