"""Celery tasks of a job and the functions that publish them.

Contract of each task
---------------------
* It may assume only what its message says: ``(job_id, token)``; everything
  else comes from the job table and the spool.
* It first calls :meth:`~cad_node.jobs.store.JobStore.begin_delivery`; a stale
  token, a finished or superseded job, or too many deliveries drop the
  message without doing anything.
* It records every outcome in the job table before it returns, and never lets
  an exception escape (a failure is the job's ``failed`` state, not a Celery
  error).  A worker killed mid-task leaves the job ``running``; the redelivered
  message (same token) runs the stage again, which is safe because result
  objects are deterministic and acknowledged objects are never resent.
* The job table is always written *before* a message is published; a crash
  between the two is repaired by :func:`reconcile`.
* Time limits: a soft limit ends the job ``failed`` from inside the task; a
  hard limit kills the pool process and :class:`JobTask` records ``failed``
  from the worker's main process.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import time
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from cad_node.config import Settings, load_config
from cad_node.jobs.celery_app import QUEUE_INFERENCE, QUEUE_IO, TASK_ANALYSE, TASK_SEND, app
from cad_node.jobs.runner import JobRunner, PipelineFailedError, SendStep
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Delivery, JobStore
from cad_node.logs import job_logger

__all__ = [
    "CONFIG_ENV",
    "analyse_task",
    "configure_worker",
    "publish_analyse",
    "publish_send",
    "reap",
    "reconcile",
    "results_queue",
    "send_task",
    "warm_imports",
]

LOG = logging.getLogger(__name__)

#: Environment variable naming the configuration file a worker loads.
CONFIG_ENV = "CAD_NODE_CONFIG"

_runtime: dict[str, Any] = {}
#: A queued job whose message is not marked published after this long is re-published.
UNPUBLISHED_GRACE_S = 10.0


#: Packages a worker imports whole before it takes a job (:func:`warm_imports`).
WARM_PACKAGES: tuple[str, ...] = ("cad_node.pipelines", "cad_node.results",
                                  "cad_node.imaging", "cad_node.export", "cad_node.models")


def warm_imports() -> list[str]:
    """Import every module a job can reach, before any job's time limit runs.

    Contract: a job never imports a module for the first time.  Two reasons:
    a cold import (a fresh install compiles bytecode) can take longer than a
    short soft time limit; and a ``SoftTimeLimitExceeded`` raised inside an
    import is caught by libraries that guard their optional imports with
    ``except Exception`` (MONAI's ``optional_import``), which leaves a half
    initialised module behind, so the job, and every later job of that pool
    process, fails with an ``ImportError`` instead of the time limit.  Called
    in the worker's main process, so the prefork pool's processes inherit
    the modules.

    Returns
    -------
    list of str
        The modules imported, in order.
    """
    names: list[str] = []
    for package in WARM_PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            importlib.import_module(info.name)
            names.append(info.name)
    from cad_node.pipelines import available_pipelines

    available_pipelines()  # and any module a deployment added to PIPELINE_MODULES
    return names


def configure_worker(settings: Settings, device: str | None = None) -> JobRunner:
    """Set the configuration the tasks of this process use; return its runner.

    An explicit ``models.dir`` (made absolute against the configuration file
    by :func:`cad_node.config.load_config`) is where pipelines look for bundles.
    Every module a job can reach is imported here (:func:`warm_imports`).
    """
    t0 = time.monotonic()
    modules = warm_imports()
    LOG.info("worker: %d modules imported in %.1f s", len(modules), time.monotonic() - t0)
    if "dir" in settings.models.model_fields_set:
        os.environ["CAD_NODE_MODELS__DIR"] = settings.models.dir
    runner = JobRunner(settings, device=device)
    _runtime["runner"] = runner
    from cad_node.live import worker_baseline

    worker_baseline(settings)
    return runner


def _runner() -> JobRunner:
    runner = _runtime.get("runner")
    if runner is None:  # a worker started by plain `celery -A`: read the config file
        runner = configure_worker(load_config(os.environ.get(CONFIG_ENV)))
    from cad_node.live import worker_settings

    reloaded = worker_settings(runner.settings, os.environ.get(CONFIG_ENV))
    if reloaded is not None:  # `serve` reloaded peers/destinations/routing (SIGHUP)
        runner.settings = reloaded
    return runner


# -- publishing -------------------------------------------------------------
def _limits() -> dict[str, Any]:
    """The configured time limits, stated in each message.

    The limits travel in the message, and Celery's ``send_task`` copies them
    from a task registered in the publishing process, as they were when that
    process first bound its tasks; stating them explicitly makes every
    message carry the configuration in force (``jobs.*_time_limit_s``).
    """
    return {"soft_time_limit": app.conf.task_soft_time_limit,
            "time_limit": app.conf.task_time_limit}


def results_queue(worker: str) -> str:
    """The ``io`` queue of one worker: sends of the results it holds go there."""
    return f"{QUEUE_IO}.{worker}"


def publish_analyse(store: JobStore, job_id: int, *, reset_deliveries: bool = True,
                    detail: str | None = None, reset_attempts: bool = False) -> str:
    """Queue the ``analyse`` stage of a job (job table first, then the message)."""
    _, token = store.enqueue(job_id, state=JobState.QUEUED, detail=detail,
                             reset_deliveries=reset_deliveries, reset_attempts=reset_attempts)
    app.send_task(TASK_ANALYSE, args=(job_id, token), queue=QUEUE_INFERENCE, **_limits())
    store.mark_published(job_id, token)
    return token


def publish_send(store: JobStore, job_id: int, *, countdown: float = 0.0,
                 reset_deliveries: bool = True, detail: str | None = None,
                 reset_attempts: bool = False) -> str:
    """Queue the ``send`` stage of a job, optionally delayed by ``countdown`` seconds.

    The message goes to ``io``, or, when a worker without shared storage
    holds the results files (``job.results_host``), to that worker's own
    queue (:func:`results_queue`).
    """
    job, token = store.enqueue(job_id, state=JobState.RESULTS_READY, detail=detail,
                               reset_deliveries=reset_deliveries, reset_attempts=reset_attempts)
    queue = results_queue(job.results_host) if job.results_host else QUEUE_IO
    app.send_task(TASK_SEND, args=(job_id, token), queue=queue,
                  countdown=max(0.0, countdown) or None, **_limits())
    store.mark_published(job_id, token)
    return token


def reconcile(store: JobStore, *, include_in_flight: bool,
              grace_s: float | None = None) -> list[int]:
    """Re-publish jobs whose message may be lost; return their ids.

    Parameters
    ----------
    store : JobStore
        The job table.
    include_in_flight : bool
        Also re-publish ``queued``, ``running`` and ``results-ready`` jobs.
        True when no worker can be holding them -- the embedded worker is
        (re)started by this process, and the embedded broker loses messages a
        killed worker had taken.  Otherwise only jobs whose message never
        reached the broker are re-published: ``complete`` ones and those
        enqueued more than :data:`UNPUBLISHED_GRACE_S` ago whose token was
        never marked published (broker down at publish time, or a crash
        between the table and the broker); the broker redelivers the rest.

    Notes
    -----
    Re-publishing gives the job a new token, so a surviving old message is
    dropped as stale; the delivery count is kept.
    """
    now = time.time()
    if include_in_flight:
        states = [JobState.COMPLETE, JobState.QUEUED, JobState.RUNNING, JobState.RESULTS_READY]
        todo = sorted(store.list_jobs(states=states, limit=None), key=lambda j: j.job_id)
    else:
        todo = store.unpublished(UNPUBLISHED_GRACE_S if grace_s is None else grace_s, now=now)
    done: list[int] = []
    for job in todo:
        if job.superseded_by is not None and job.state is not JobState.RESULTS_READY:
            store.transition(job.job_id, JobState.FAILED,
                             error=f"superseded by job {job.superseded_by}")
            continue
        if job.state is JobState.RESULTS_READY:
            wait = (job.next_attempt_at or now) - now
            publish_send(store, job.job_id, countdown=wait, reset_deliveries=False)
        else:
            publish_analyse(store, job.job_id, reset_deliveries=False,
                            detail="re-published after restart")
        done.append(job.job_id)
    return done


def reap(store: JobStore, lease_s: float) -> list[int]:
    """Re-publish jobs whose worker stopped heart-beating (killed, host lost).

    Any worker (and the receiver) may call this periodically: the expired
    claims are taken ``FOR UPDATE SKIP LOCKED``
    (:meth:`~cad_node.jobs.store.JobStore.expired_claims`), so each job is
    re-published by exactly one caller.  The new message has a new token:
    the dead worker's message, if the broker ever redelivers it, is stale.
    The delivery count is kept (a job that kills every worker still ends
    ``dead`` after ``max_deliveries``).
    """
    done: list[int] = []
    for job_id in store.expired_claims(lease_s):
        job = store.get(job_id)
        log = job_logger(LOG, job)
        detail = "its worker stopped heart-beating: re-published"
        try:
            if job.state is JobState.RESULTS_READY and job.results_host is None:
                publish_send(store, job_id, reset_deliveries=False, detail=detail)
            else:
                publish_analyse(store, job_id, reset_deliveries=False, detail=detail)
        except Exception as exc:  # broker down: reconcile() at the next restart
            log.error("could not re-publish after an expired claim: %s", exc)
            continue
        log.warning("%s", detail)
        done.append(job_id)
    return done


# -- tasks ------------------------------------------------------------------
class JobTask(Task):  # type: ignore[misc]
    """Base class of job tasks: a hard time limit ends the job in ``failed``.

    A task killed by the hard time limit never returns, so the job row would
    stay ``running``; Celery calls :meth:`on_failure` in the worker's main
    process instead, and it records the failure (only if the killed message
    still holds the job's current token).
    """

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """Record a hard time limit (or another uncaught failure) in the job table."""
        if not isinstance(exc, TimeLimitExceeded) or len(args) != 2:
            return
        job_id, token = int(args[0]), str(args[1])
        try:
            store = _runner().store
            job = store.get(job_id)
            if job.token == token and job.state in (JobState.QUEUED, JobState.RUNNING,
                                                    JobState.RESULTS_READY):
                store.transition(job_id, JobState.FAILED,
                                 error=f"hard time limit exceeded ({exc})")
                job_logger(LOG, job).error("hard time limit exceeded: job failed")
        except Exception:  # the worker must survive whatever happens here
            LOG.exception("could not record the time limit of job %s", job_id)


def _begin(runner: JobRunner, job_id: int, token: str, worker: str | None) -> bool:
    jobs = runner.settings.jobs
    decision, job = runner.store.begin_delivery(job_id, token, jobs.max_deliveries,
                                                worker=worker, lease_s=jobs.claim_lease_s)
    log = job_logger(LOG, job)
    if decision is Delivery.STALE:
        log.info("dropping stale message (state %s)", job.state.value)
        return False
    if decision is Delivery.DEAD:
        log.error("job dead: %s", job.error)
        return False
    return True


@app.task(name=TASK_ANALYSE, bind=True, acks_late=True,  # type: ignore[untyped-decorator]
          reject_on_worker_lost=True, ignore_result=True, base=JobTask)
def analyse_task(self: Any, job_id: int, token: str) -> None:
    """Route, run pipelines, build and gate results; then queue the send stage."""
    runner = _runner()
    if not _begin(runner, job_id, token, self.request.hostname):
        return
    job = runner.store.get(job_id)
    log = job_logger(LOG, job)
    detail = f"delivery {job.deliveries} on {self.request.hostname}, device {runner.device}"
    runner.store.transition(job_id, JobState.RUNNING, detail=detail)
    try:
        job = runner.analyse(job_id, worker=self.request.hostname)
    except SoftTimeLimitExceeded:
        log.error("soft time limit exceeded")
        runner.store.transition(job_id, JobState.FAILED, error="soft time limit exceeded")
        return
    except PipelineFailedError as exc:
        log.error("%s", exc)
        runner.store.transition(job_id, JobState.FAILED, error=str(exc)[:2000])
        return
    except Exception as exc:
        log.exception("analysis failed")
        runner.store.transition(job_id, JobState.FAILED,
                                error=f"{type(exc).__name__}: {exc}"[:2000])
        return
    if job.state is JobState.RESULTS_READY:
        publish_send(runner.store, job_id)


@app.task(name=TASK_SEND, bind=True, acks_late=True,  # type: ignore[untyped-decorator]
          reject_on_worker_lost=True, ignore_result=True, base=JobTask)
def send_task(self: Any, job_id: int, token: str) -> None:
    """Send a job's results; on a retryable failure queue a delayed retry."""
    runner = _runner()
    if not _begin(runner, job_id, token, self.request.hostname):
        return
    job = runner.store.get(job_id)
    try:
        decision = runner.send(job_id)
    except SoftTimeLimitExceeded:
        runner.store.transition(job_id, JobState.FAILED, error="soft time limit exceeded")
        return
    except Exception as exc:
        job_logger(LOG, job).exception("send failed unexpectedly")
        runner.store.transition(job_id, JobState.FAILED,
                                error=f"{type(exc).__name__}: {exc}"[:2000])
        return
    if decision.step is SendStep.RETRY and decision.retry_at is not None:
        publish_send(runner.store, job_id, countdown=decision.retry_at - time.time())
