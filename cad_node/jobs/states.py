"""Job states and the transitions allowed between them.

A job is one analysis of one *generation* of a study (the set of instances
the ingest side handed on as "study complete").  Its life::

    received -> complete -> queued -> running -> results-ready -> sent
                                 \\          \\            \\
                                  +-> failed  +-> failed    +-> failed / dead

``received`` is the arrival of the study's first instance (taken from the
instances' ``received_at``), ``complete`` the ingest hand-off.  A send that
fails with a retryable status keeps the job in ``results-ready`` with an
error, an attempt count and ``next_attempt_at``; when the retry horizon is
exhausted, or the job was delivered more than ``max_deliveries`` times, it is
``dead``.  ``failed`` is a permanent failure (pipeline error, permanent DIMSE
status, superseded before it was sent); ``cad-node jobs retry`` requeues
``failed`` and ``dead`` jobs.
"""

from __future__ import annotations

import enum

__all__ = ["ACTIVE_STATES", "TERMINAL_STATES", "JobState", "can_transition"]


class JobState(enum.StrEnum):
    """State of a job in the job table."""

    RECEIVED = "received"
    COMPLETE = "complete"
    QUEUED = "queued"
    RUNNING = "running"
    RESULTS_READY = "results-ready"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"



#: States a job leaves only by an operator action (``jobs retry``/``resend``).
TERMINAL_STATES = frozenset({JobState.SENT, JobState.FAILED, JobState.DEAD})
#: States in which a job still has work to do.
ACTIVE_STATES = frozenset(
    {JobState.COMPLETE, JobState.QUEUED, JobState.RUNNING, JobState.RESULTS_READY}
)

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.COMPLETE}),
    JobState.COMPLETE: frozenset({JobState.QUEUED, JobState.FAILED, JobState.DEAD}),
    # queued -> queued: re-enqueued after a lost delivery.
    JobState.QUEUED: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.DEAD}
    ),
    # running -> running: redelivered after a worker died mid-job.
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.RESULTS_READY, JobState.FAILED,
         JobState.DEAD}
    ),
    # results-ready -> results-ready: a retryable send failure, retry scheduled.
    JobState.RESULTS_READY: frozenset(
        {JobState.QUEUED, JobState.RESULTS_READY, JobState.SENT, JobState.FAILED,
         JobState.DEAD}
    ),
    # Operator actions: resend (-> results-ready) and retry (-> queued).
    JobState.SENT: frozenset({JobState.RESULTS_READY, JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RESULTS_READY}),
    JobState.DEAD: frozenset({JobState.QUEUED, JobState.RESULTS_READY}),
}


def can_transition(old: JobState, new: JobState) -> bool:
    """Return whether a job may go from ``old`` to ``new``.

    Parameters
    ----------
    old, new : JobState
        Current and requested state.

    Returns
    -------
    bool
        True when the transition is part of the state machine above.
    """
    return new in _ALLOWED[old]
