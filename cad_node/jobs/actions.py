"""Operator actions on jobs: retry, resend, dead-letter replay.

Shared by ``cad-node jobs retry|resend`` and the REST API.  Each action
changes the job table first and then publishes the message (the job-table
contract of :mod:`cad_node.jobs.tasks`), and is recorded in the audit trail
as an ``admin-action`` naming the actor.
"""

from __future__ import annotations

from cad_node.audit import AuditEvent, AuditLog, Outcome
from cad_node.config import Settings
from cad_node.jobs.states import JobState
from cad_node.jobs.store import InvalidTransitionError, Job, JobStore

__all__ = ["replay_dead", "resend_job", "retry_job"]


def _audit(settings: Settings, actor: str, action: str, job: Job | None, ok: bool,
           detail: str) -> None:
    AuditLog.for_settings(settings).record(
        AuditEvent.ADMIN_ACTION, outcome=Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
        actor=actor, action=action, job_id=job.job_id if job else None,
        study_instance_uid=job.study_instance_uid if job else None, detail=detail)


def retry_job(settings: Settings, store: JobStore, job_id: int, *, actor: str) -> Job:
    """Run a ``failed`` or ``dead`` job again from the start.

    Raises
    ------
    JobNotFoundError
        No such job.
    InvalidTransitionError
        The job is not failed or dead (nothing is changed).
    """
    from cad_node.jobs.celery_app import configure_app
    from cad_node.jobs.runner import JobRunner
    from cad_node.jobs.tasks import publish_analyse

    job = store.get(job_id)
    if job.state not in (JobState.FAILED, JobState.DEAD):
        _audit(settings, actor, "retry", job, False, f"refused: job is {job.state.value}")
        raise InvalidTransitionError(
            f"job {job_id} is {job.state.value}; retry applies to failed/dead jobs")
    configure_app(settings)
    JobRunner(settings, store, device="cpu").discard_results(job)
    publish_analyse(store, job_id, reset_attempts=True, detail=f"retry by {actor}")
    _audit(settings, actor, "retry", job, True, "analyse queued")
    return store.get(job_id)


def resend_job(settings: Settings, store: JobStore, job_id: int, *, actor: str) -> Job:
    """Send a job's stored results again to every destination.

    Raises
    ------
    JobNotFoundError
        No such job.
    InvalidTransitionError
        The job is still in progress or has no results (nothing is changed).
    """
    from cad_node.jobs.celery_app import configure_app
    from cad_node.jobs.runner import JobRunner
    from cad_node.jobs.tasks import publish_send

    job = store.get(job_id)
    runner = JobRunner(settings, store, device="cpu")
    if job.state not in (JobState.SENT, JobState.FAILED, JobState.DEAD):
        _audit(settings, actor, "resend", job, False, f"refused: job is {job.state.value}")
        raise InvalidTransitionError(f"job {job_id} is {job.state.value}")
    if not runner.manifest(job):
        _audit(settings, actor, "resend", job, False, "refused: no results")
        raise InvalidTransitionError(f"job {job_id} has no results to send; use retry")
    configure_app(settings)
    forgotten = store.forget_sent(job_id)
    publish_send(store, job_id, reset_attempts=True,
                 detail=f"resend by {actor} ({forgotten} acknowledgement(s) forgotten)")
    _audit(settings, actor, "resend", job, True, f"{forgotten} acknowledgement(s) forgotten")
    return store.get(job_id)


def replay_dead(settings: Settings, store: JobStore, *, actor: str) -> list[int]:
    """Dead-letter replay: send again every ``dead`` job that has results, retry the others.

    Returns
    -------
    list of int
        The ids of the jobs queued again.
    """
    from cad_node.jobs.runner import JobRunner

    runner = JobRunner(settings, store, device="cpu")
    done: list[int] = []
    for job in store.list_jobs(states=[JobState.DEAD], limit=None):
        if job.superseded_by is not None:
            continue
        if runner.manifest(job):
            resend_job(settings, store, job.job_id, actor=actor)
        else:
            retry_job(settings, store, job.job_id, actor=actor)
        done.append(job.job_id)
    _audit(settings, actor, "dead-letter-replay", None, True, f"jobs {done}")
    return done
