"""The Celery application: two queues, at-least-once delivery, JSON payloads only.

Settings and why
----------------
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is
  acknowledged only after its task returned; a worker process that dies
  mid-task makes the broker deliver the message again.  The number of
  deliveries is bounded by the job table (``jobs.max_deliveries``,
  :meth:`cad_node.jobs.store.JobStore.begin_delivery`), not by the broker.
* ``worker_prefetch_multiplier = 1``: a worker holds one job at a time, so a
  long inference never blocks jobs another worker could take.
* JSON only (``task_serializer``, ``accept_content``): messages carry a job id
  and a delivery token, never pixel data.
* ``task_soft_time_limit``/``task_time_limit`` from ``jobs.*_time_limit_s``;
  the broker's ``visibility_timeout`` (``jobs.visibility_timeout_s``) is
  larger than the hard limit, so a running job is never handed to a second
  worker while the first is still allowed to run.
* Broker: ``jobs.broker_url`` or, when it is null, the durable embedded broker
  ``sqla+sqlite:///<storage_dir>/broker.sqlite`` (kombu's SQLAlchemy
  transport): queued messages are rows in a SQLite file and survive restarts.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu.entity import Exchange, Queue

from cad_node.config import Settings

__all__ = [
    "BROKER_FILENAME",
    "QUEUE_INFERENCE",
    "QUEUE_IO",
    "TASK_ANALYSE",
    "TASK_SEND",
    "app",
    "broker_url_for",
    "configure_app",
]

#: GPU-heavy work: routing, loading, pipelines, building results.
QUEUE_INFERENCE = "inference"
#: Network work: sending results (and retries).
QUEUE_IO = "io"
#: Task names (stable: they are stored in queued messages).
TASK_ANALYSE = "cad_node.jobs.analyse"
TASK_SEND = "cad_node.jobs.send"
#: File name of the embedded broker below ``storage_dir``.
BROKER_FILENAME = "broker.sqlite"
#: How often the embedded broker's queue table is polled (seconds).
EMBEDDED_POLLING_INTERVAL_S = 0.5

app = Celery("cad_node", set_as_current=False)


def broker_url_for(settings: Settings) -> str:
    """The broker URL: ``jobs.broker_url`` or the embedded SQLite broker."""
    if settings.jobs.broker_url:
        return settings.jobs.broker_url
    path = (Path(settings.node.storage_dir) / BROKER_FILENAME).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqla+sqlite:///{path}"


def _queue(name: str) -> Queue:
    """A durable queue bound to its own direct exchange with routing key ``name``."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


def configure_app(settings: Settings) -> Celery:
    """Configure the module's Celery app for ``settings`` and return it."""
    url = broker_url_for(settings)
    jobs = settings.jobs
    transport_options: dict[str, object]
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its transport options to
        # create_engine(); there the only option is SQLite's busy timeout.
        # A message it delivered is invisible until acknowledged (no
        # visibility timeout): messages lost with a killed worker are
        # re-published from the job table (cad_node.jobs.tasks.reconcile).
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = EMBEDDED_POLLING_INTERVAL_S
        transport_options = {"connect_args": {"timeout": 30.0}}
    else:
        transport_options = {"visibility_timeout": jobs.visibility_timeout_s}
    # Drop connection and producer pools made for an earlier configuration, so
    # a process that configures the app again publishes to the new broker.
    if app.conf.broker_url not in (None, url):
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool = None
        producers = app.amqp._producer_pool
        if producers is not None:
            producers.force_close_all()
        app.amqp._producer_pool = None
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=jobs.soft_time_limit_s,
        task_time_limit=jobs.hard_time_limit_s,
        # Each queue has its own direct exchange and routing key, so where a
        # task lands never depends on Celery's default-exchange rules (GPU
        # workers listen on ``inference`` alone; tested on both brokers).
        task_queues=(_queue(QUEUE_INFERENCE), _queue(QUEUE_IO)),
        task_default_queue=QUEUE_IO,
        task_routes={TASK_ANALYSE: {"queue": QUEUE_INFERENCE}, TASK_SEND: {"queue": QUEUE_IO}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
