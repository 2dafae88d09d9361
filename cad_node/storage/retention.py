"""Retention: delete spooled studies N days after every destination acknowledged them.

Policy (:meth:`RetentionPolicy.decide`), per study of the spool index:

* a study with instances not yet handed on is kept;
* its current job (newest, not superseded) must be ``sent`` and have
  results (a manifest);
* every destination *configured now* must have acknowledged every result
  object of its output profile (``JobStore.sent_objects``), and its recorded
  send outcome (``JobStore.destinations``), when there is one, must be
  ``acknowledged``; a destination
  added later, a resend in progress or an unacknowledged object keeps the
  study;
* only then is it deleted, ``retention.days`` after the last of those
  acknowledgements, by the injected clock.

Deletion (:func:`purge_study`) moves the study's files out of the object
tree into ``spool/purging/`` (so crash recovery cannot re-adopt them),
deletes the index rows in one transaction that first checks the study's
revision is still the one decided on (an instance that arrived meanwhile
moves the files back and keeps the study), then removes the moved files and
the job's result files.  Job rows stay (history, audit).  Only the process
holding the spool lock deletes: ``cad-node serve`` (the sweeper below) or
``cad-node spool purge`` while the node is stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cad_node.config import Settings
from cad_node.jobs.states import JobState
from cad_node.jobs.store import DestinationStatus, Job, JobStore
from cad_node.storage.index import SpoolIndex, StudyState

__all__ = ["Decision", "RetentionPolicy", "RetentionSweeper", "purge_study"]

LOG = logging.getLogger(__name__)

_DAY_S = 86400.0
_PURGING_DIRNAME = "purging"


@dataclass(frozen=True)
class Decision:
    """What the policy says about one study."""

    study_instance_uid: str
    purge: bool
    reason: str
    revision: int
    instances: int
    job_id: int | None = None
    #: When the last destination acknowledged the last result (epoch seconds).
    acknowledged_at: float | None = None
    #: When the study may be deleted (epoch seconds).
    due_at: float | None = None


class RetentionPolicy:
    """Decides which studies may be deleted.

    Parameters
    ----------
    days : float
        Days to keep a study after its results were acknowledged everywhere.
    clock : callable
        Returns the current time in epoch seconds (``time.time``; tests inject their own).
    """

    def __init__(self, days: float, clock: Callable[[], float] = time.time) -> None:
        if days < 0:
            raise ValueError("retention days must be >= 0")
        self.days = days
        self.clock = clock

    def _acknowledged_at(self, settings: Settings, store: JobStore,
                         job: Job) -> tuple[float | None, str]:
        from cad_node.jobs.runner import JobRunner

        manifest = JobRunner(settings, store, device="cpu").manifest(job)
        if not manifest:
            return None, f"job {job.job_id} has no results"
        if not settings.destinations:
            return None, "no destination is configured"
        latest = 0.0
        recorded = store.destinations(job.job_id)
        for dest in settings.destinations:
            outcome = recorded.get(dest.name)
            if outcome is not None and outcome.state is not DestinationStatus.ACKNOWLEDGED:
                return None, f"destination {dest.name} is {outcome.state.value}"
            # the objects this destination was sent: its kinds, of its variant
            # (with or without the candidates below the operating point)
            expected = {e["sop_instance_uid"] for e in manifest if e["kind"] in dest.objects
                        and bool(e.get("below_operating_point", False))
                        == dest.below_operating_point}
            acked = {o.sop_instance_uid: o.sent_at
                     for o in store.sent_objects(job.job_id, dest.name)}
            missing = expected - set(acked)
            if missing:
                return None, (f"destination {dest.name} has not acknowledged {len(missing)} "
                              f"of {len(expected)} result(s)")
            latest = max([latest, *(acked[u] for u in expected)])
        return latest, "acknowledged by every destination"

    def decide(self, settings: Settings, index: SpoolIndex, store: JobStore,
               study: StudyState) -> Decision:
        """The decision for one study (see the module docstring)."""
        uid = study.study_instance_uid

        def keep(reason: str, job: Job | None = None, acked: float | None = None,
                 due: float | None = None) -> Decision:
            return Decision(uid, False, reason, study.revision, study.num_instances,
                            job.job_id if job else None, acked, due)

        if study.pending:
            return keep("instances not handed on yet")
        jobs = store.list_jobs(study_instance_uid=uid, limit=None)
        current = [j for j in jobs if j.superseded_by is None]
        if not current:
            return keep("no job")
        job = max(current, key=lambda j: j.job_id)
        if job.state is not JobState.SENT:
            return keep(f"job {job.job_id} is {job.state.value}", job)
        acked, why = self._acknowledged_at(settings, store, job)
        if acked is None:
            return keep(why, job)
        due = acked + self.days * _DAY_S
        if self.clock() < due:
            return keep(f"{why}; kept until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(due))}"
                        " UTC", job, acked, due)
        return Decision(uid, True, why, study.revision, study.num_instances, job.job_id, acked,
                        due)

    def plan(self, settings: Settings, index: SpoolIndex, store: JobStore) -> list[Decision]:
        """Decisions for every study of the index, oldest study first."""
        return [self.decide(settings, index, store, st) for st in index.studies()]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def purge_study(index: SpoolIndex, spool_root: Path, decision: Decision,
                results_dirs: list[Path]) -> bool:
    """Delete one study decided on by :class:`RetentionPolicy` (see the module docstring).

    Parameters
    ----------
    index : SpoolIndex
        The writable index (the process holds the spool lock).
    spool_root : Path
        ``<storage_dir>/spool``.
    decision : Decision
        A ``purge`` decision.
    results_dirs : list of Path
        Result directories of the study's jobs, removed after the rows.

    Returns
    -------
    bool
        True when the study was deleted; False when it changed meanwhile.
    """
    if not decision.purge:
        raise ValueError(f"study {decision.study_instance_uid} is not to be purged")
    staging = spool_root / _PURGING_DIRNAME
    staging.mkdir(exist_ok=True)
    moved: list[tuple[Path, Path]] = []
    for inst in index.instances_for_study(decision.study_instance_uid):
        target = staging / f"{inst.instance_id}.dcm"
        try:
            os.rename(inst.path, target)
        except FileNotFoundError:  # an earlier purge was interrupted
            continue
        moved.append((inst.path, target))
    for parent in {src.parent for src, _ in moved}:
        _fsync_dir(parent)
    _fsync_dir(staging)
    if not index.remove_study(decision.study_instance_uid, revision=decision.revision):
        for src, target in moved:
            os.rename(target, src)
        LOG.warning("study=%s changed while being purged: kept", decision.study_instance_uid)
        return False
    for _, target in moved:
        target.unlink(missing_ok=True)
    for directory in results_dirs:
        shutil.rmtree(directory, ignore_errors=True)
    LOG.info("study=%s job=%s purged by retention: %d file(s)", decision.study_instance_uid,
             decision.job_id, len(moved))
    return True


def apply(policy: RetentionPolicy, settings: Settings, index: SpoolIndex, store: JobStore,
          spool_root: Path, *, actor: str) -> list[Decision]:
    """Plan and purge; return the decisions that were carried out."""
    from cad_node.audit import AuditEvent, AuditLog

    done: list[Decision] = []
    storage = Path(settings.node.storage_dir)
    for decision in policy.plan(settings, index, store):
        if not decision.purge:
            continue
        dirs = [storage / "results" / j.node_name for j in
                store.list_jobs(study_instance_uid=decision.study_instance_uid, limit=None)]
        if purge_study(index, spool_root, decision, dirs):
            done.append(decision)
            AuditLog.for_settings(settings).record(
                AuditEvent.ADMIN_ACTION, actor=actor, action="retention-purge",
                study_instance_uid=decision.study_instance_uid, job_id=decision.job_id,
                instances=decision.instances, acknowledged_at=decision.acknowledged_at,
                days=policy.days)
    return done


class RetentionSweeper:
    """Applies the retention policy every ``retention.interval_s`` inside ``cad-node serve``.

    Parameters
    ----------
    settings : callable
        Returns the configuration in force.
    store : JobStore
        The job table.
    server : object
        The running :class:`cad_node.scp.NodeServer` (its spool holds the lock).
    """

    def __init__(self, settings: Callable[[], Settings], store: JobStore, server: Any) -> None:
        self.settings = settings
        self.store = store
        self.server = server
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[Decision]:
        """One pass (nothing when retention is off or the spool is closed)."""
        settings = self.settings()
        spool = getattr(self.server, "spool", None)
        if settings.retention.days is None or spool is None:
            return []
        return apply(RetentionPolicy(settings.retention.days), settings, spool.index,
                     self.store, Path(spool.root), actor="retention")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                LOG.exception("retention sweep failed")
            self._stop.wait(self.settings().retention.interval_s)

    def start(self) -> None:
        """Start the sweeping thread."""
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sweeping thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
