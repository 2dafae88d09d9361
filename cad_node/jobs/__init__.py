"""Jobs: from a complete study to results acknowledged by every destination.

Modules
-------
:mod:`~cad_node.jobs.store`
    The durable job table (SQLAlchemy Core: SQLite in WAL mode embedded,
    PostgreSQL at scale, see :mod:`cad_node.storage.db`): states with
    timestamps, attempts and errors, the per-study timeline, delivery tokens
    and claims, per-destination outcomes, acknowledged objects.
:mod:`~cad_node.jobs.states`
    ``received, complete, queued, running, results-ready, sent, failed, dead``.
:mod:`~cad_node.jobs.routing`
    Routing rules (:class:`cad_node.config.RoutingRule`) applied to the series
    of a study.
:mod:`~cad_node.jobs.runner`
    The stages (``analyse``: route, load, pipeline, build, conformance gate,
    quarantine; ``send``: C-STORE with retries) independent of Celery.
:mod:`~cad_node.jobs.celery_app`, :mod:`~cad_node.jobs.tasks`
    The Celery app (queues ``inference`` and ``io``) and its tasks.
:mod:`~cad_node.jobs.service`
    The ingest hand-off (``on_study_complete``) and the embedded worker that
    ``cad-node serve`` runs.

Guarantees
----------
Nothing handed off is lost (the job row is committed before the hand-off
returns; lost messages are re-published from the table); nothing is sent
twice (acknowledged objects are recorded; result UIDs are deterministic); a
study handed on twice unchanged gives one job; a reopened study gives a new
job that supersedes the old one.
"""

from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job, JobEvent, JobStore

__all__ = ["Job", "JobEvent", "JobState", "JobStore"]
