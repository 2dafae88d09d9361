"""The receiver side of jobs: the ingest hand-off and the embedded worker.

:class:`JobService` is what ``cad-node serve`` plugs into the study assembler
(``NodeServer(settings, on_study_complete=service.on_study_complete)``).

Contract of :meth:`JobService.on_study_complete`
------------------------------------------------
* Called at least once per study generation, from any thread.
* Before it returns, the job row is committed (state ``complete``); then the
  ``analyse`` message is published (state ``queued``, token marked
  published).  If publishing fails (broker down) the job's token stays
  unpublished and :func:`~cad_node.jobs.tasks.reconcile` publishes it later
  (at start-up and every :data:`RECONCILE_INTERVAL_S` while serving); the
  hand-off itself never fails because of the broker.
* The same ``(study_instance_uid, fingerprint)`` twice yields one job; a
  reopened study yields a new job superseding the old one.

:class:`EmbeddedWorker` runs ``cad-node worker`` as a supervised child
process (its own process group) for single-machine installs.  When the
child dies it re-publishes in-flight jobs (messages a dead worker had taken
are lost by the SQLite transport) and starts a new one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cad_node.config import Settings
from cad_node.jobs.celery_app import QUEUE_INFERENCE, QUEUE_IO, configure_app
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job, JobStore
from cad_node.jobs.tasks import publish_analyse, reconcile
from cad_node.logs import job_logger
from cad_node.storage.records import StudyComplete

__all__ = ["EmbeddedWorker", "JobService"]

LOG = logging.getLogger(__name__)

#: Seconds between checks of the embedded worker child.
_SUPERVISE_INTERVAL_S = 0.5
#: Do not restart a crashing worker more often than this (seconds).
_RESTART_BACKOFF_S = 2.0
#: While serving, jobs whose message never reached the broker are re-published this often.
RECONCILE_INTERVAL_S = 15.0


#: Environment variable telling a worker child the pid of the ``serve`` that owns it.
PARENT_PID_ENV = "CAD_NODE_PARENT_PID"
#: ``prctl`` option: signal to receive when the parent dies (Linux, prctl(2)).
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM (warm shutdown) when ``serve`` dies.

    Without it a ``kill -9`` of ``serve`` would leave the worker, which runs in
    its own session, orphaned.  ``cad-node worker`` also polls its parent pid
    (:data:`PARENT_PID_ENV`) where prctl is not available.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class JobService:
    """Creates and publishes jobs for complete studies.

    Parameters
    ----------
    settings : Settings
        Node configuration (storage dir, broker, jobs).
    store : JobStore, optional
        The job table (default: below ``storage_dir``).
    """

    def __init__(self, settings: Settings, store: JobStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else JobStore.from_settings(settings)
        configure_app(settings)
        self.tokens = None
        if settings.storage.wado_host is not None:  # remote workers fetch from us
            from cad_node.storage.wado import StudyTokens, load_or_create_key

            key_file = settings.storage.token_key_file or (
                Path(settings.node.storage_dir) / "wado.key")
            self.tokens = StudyTokens(load_or_create_key(key_file))

    def on_study_complete(self, event: StudyComplete) -> Job:
        """Record and publish a job for one study generation: the ingest hand-off.

        Called by the study assembler (``NodeServer(on_study_complete=...)``)
        at least once per study generation, from any thread.

        Parameters
        ----------
        event : StudyComplete
            The handler may read:

            * ``event.study_id`` - the node's own study id (index primary key);
            * ``event.study_instance_uid`` - Study Instance UID (validated);
            * ``event.generation`` - 1, then +1 per reopening; a later
              generation supersedes the job of an earlier one;
            * ``event.instances`` - every :class:`~cad_node.storage.records.StoredInstance`
              of the study so far (paths inside the spool; never modify them);
            * ``event.fingerprint`` - with ``study_instance_uid`` the
              idempotency key.

        Returns
        -------
        Job
            The job of ``(study_instance_uid, fingerprint)``, as stored after the
            call: ``queued`` once published; ``complete`` when the broker could
            not be reached (:meth:`reconcile` publishes it later); the existing
            job, in whatever state, when the same key was handed on before.

        Guarantees
        ----------
        * The job row is committed before the message is published, and before
          this returns: an acknowledged study is never lost.
        * The same key twice yields one job (delivery is at-least-once).

        Raises
        ------
        Exception
            Only what the job table raises (e.g. :class:`sqlite3.Error` on a
            broken database); a broker failure never propagates.
        """
        job, created = self.store.record_study_complete(
            study_id=str(event.study_id), study_instance_uid=event.study_instance_uid,
            generation=int(event.generation), fingerprint=event.fingerprint,
            instances=event.instances,
            fetch_token=(self.tokens.mint(event.study_instance_uid)
                         if self.tokens is not None else None),
        )
        log = job_logger(LOG, job)
        if not created and job.state is not JobState.COMPLETE:
            log.info("study handed on again unchanged: no new job (job is %s)", job.state.value)
            return job
        if job.supersedes is not None:
            log.info("study reopened (generation %d): supersedes job %d", job.generation,
                     job.supersedes)
        try:
            self._metrics_received(event)
            publish_analyse(self.store, job.job_id)
        except Exception as exc:  # broker unreachable: reconcile() publishes later
            log.error("could not publish job (reconcile publishes it later): %s", exc)
            return self.store.get(job.job_id)
        log.info("job queued for %d instance(s)", len(job.instances))
        return self.store.get(job.job_id)

    @staticmethod
    def _metrics_received(event: StudyComplete) -> None:
        from cad_node import metrics

        metrics.JOBS_CREATED.inc()

    def reconcile(self, *, include_in_flight: bool, grace_s: float | None = None) -> list[int]:
        """Re-publish jobs whose messages may be lost (:func:`cad_node.jobs.tasks.reconcile`)."""
        try:
            return reconcile(self.store, include_in_flight=include_in_flight, grace_s=grace_s)
        except Exception as exc:
            LOG.error("reconcile failed (broker unreachable?): %s", exc)
            return []


class EmbeddedWorker:
    """A supervised ``cad-node worker`` child process.

    Parameters
    ----------
    settings : Settings
        Node configuration.
    config_path : Path, optional
        Configuration file the child loads (``CAD_NODE_*`` variables pass through).
    service : JobService
        Used to re-publish in-flight jobs before each (re)start.
    """

    def __init__(self, settings: Settings, config_path: Path | None, service: JobService) -> None:
        self.settings = settings
        self.config_path = config_path
        self.service = service
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        """The child's command line."""
        cmd = [sys.executable, "-c", "from cad_node.cli import main; main()", "worker",
               "--queues", f"{QUEUE_INFERENCE},{QUEUE_IO}",
               "--concurrency", str(self.settings.jobs.concurrency),
               "--hostname", f"embedded-{os.getpid()}@%h"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def _spawn(self) -> None:
        ids = self.service.reconcile(include_in_flight=True)
        if ids:
            LOG.info("re-published in-flight job(s) %s before starting the worker", ids)
        env = dict(os.environ, **{PARENT_PID_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(self.command(), start_new_session=True, env=env,
                                     preexec_fn=_die_with_parent)
        LOG.info("embedded worker started (pid %d)", self.proc.pid)

    def start(self) -> None:
        """Start the child and the supervisor thread."""
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="embedded-worker",
                                        daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(_SUPERVISE_INTERVAL_S):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            LOG.error("embedded worker (pid %d) exited with %s; restarting", proc.pid,
                      proc.returncode)
            self._kill_group(proc)
            if self._stop.wait(_RESTART_BACKOFF_S):
                return
            self.restarts += 1
            self._spawn()

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover pool children of a dead worker
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """Warm-shut the child (SIGTERM: finish the current task), then kill it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("embedded worker did not stop in %.0f s: killing it", timeout)
        self._kill_group(proc)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    @property
    def pid(self) -> int | None:
        """Pid of the current child."""
        return self.proc.pid if self.proc is not None else None

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until the child sent its first heartbeat to the job table."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid
            if pid is not None and any(w["pid"] == pid for w in self.service.store.workers()):
                return True
            time.sleep(0.2)
        return False


class JobsRuntime:
    """Everything ``cad-node serve`` runs for jobs: hand-off, embedded worker, metrics.

    Parameters
    ----------
    settings : Settings
        Node configuration.
    config_path : Path, optional
        Configuration file, passed to the embedded worker.
    worker : bool
        Run the embedded worker (``jobs.embedded_worker`` and not ``--no-worker``).

    Notes
    -----
    :meth:`start` re-publishes jobs whose messages may have been lost while
    the node was down: every unfinished job when this process runs the
    (only) worker, only never-published (``complete``) jobs otherwise.
    """

    def __init__(self, settings: Settings, config_path: Path | None, *, worker: bool) -> None:
        self.settings = settings
        self.service = JobService(settings)
        self.worker = EmbeddedWorker(settings, config_path, self.service) if worker else None
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self.wado: Any = None

    def _reconcile_loop(self) -> None:
        """Heal broker outages while serving: publish what never reached the broker."""
        while not self._stop.wait(RECONCILE_INTERVAL_S):
            ids = self.service.reconcile(include_in_flight=False)
            if ids:
                LOG.info("published job(s) %s that had not reached the broker", ids)

    def on_study_complete(self, event: StudyComplete) -> None:
        """The ``on_study_complete`` callback for :class:`cad_node.scp.NodeServer`.

        Same contract as :meth:`JobService.on_study_complete`; returns nothing.
        """
        self.service.on_study_complete(event)

    def start(self, server: Any = None) -> None:
        """Start the metrics endpoint and the embedded worker (or reconcile only).

        ``server`` is the running :class:`cad_node.scp.NodeServer`; its spool
        index provides the instances-received metric.
        """
        if self.settings.metrics.enabled:
            from cad_node.metrics import start_metrics_server

            index = getattr(getattr(server, "spool", None), "index", None)

            def _instances() -> int:
                return int(index.counts()["instance"]) if index is not None else 0

            try:
                start_metrics_server(self.service.store, self.settings.metrics.host,
                                     self.settings.metrics.port,
                                     instances=_instances if index is not None else None)
            except OSError as exc:
                LOG.error("metrics endpoint %s:%d not started: %s", self.settings.metrics.host,
                          self.settings.metrics.port, exc)
        storage = self.settings.storage
        index = getattr(getattr(server, "spool", None), "index", None)
        if storage.wado_host is not None and index is not None and self.service.tokens:
            from cad_node.storage.wado import WadoServer, create_app

            self.wado = WadoServer(create_app(index, self.service.tokens), storage.wado_host,
                                   storage.wado_port)
            self.wado.start()
        if self.worker is not None:
            self.worker.start()  # reconciles every unfinished job first
        else:
            ids = self.service.reconcile(include_in_flight=False)
            if ids:
                LOG.info("published job(s) %s that were handed off but never queued", ids)
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="reconcile",
                                            daemon=True)
        self._reconciler.start()

    def stop(self) -> None:
        """Stop the reconcile loop and the embedded worker (warm shutdown)."""
        self._stop.set()
        if self.wado is not None:
            self.wado.stop()
        if self.worker is not None:
            self.worker.stop()
