"""``cad-node worker``: a Celery worker for the ``inference`` and/or ``io`` queues.

Examples
--------
``cad-node worker --queues inference --device cuda:0`` on a GPU host;
``cad-node worker`` (both queues, device from the config) on a single box.
A worker asked for a CUDA device on a host without CUDA falls back to CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH, Settings

#: Seconds between checks that the owning ``serve`` is still alive (embedded worker).
PARENT_POLL_S = 1.0
_QUEUES = ("inference", "io")


def _heartbeat(settings: Settings, hostname: str, queues: list[str], device: str) -> None:
    """Heartbeat to the job table, and re-publish jobs of workers that stopped beating."""
    from cad_node.jobs.store import JobStore
    from cad_node.jobs.tasks import reap

    store = JobStore.from_settings(settings)
    started = time.time()
    pid = os.getpid()
    while True:
        try:
            store.heartbeat(hostname, pid, queues, device, started)
            reap(store, settings.jobs.claim_lease_s)
        except Exception:  # a locked or unreachable table must not kill the worker
            pass
        time.sleep(settings.jobs.heartbeat_s)


def _watch_parent(parent_pid: int) -> None:
    """Warm-shut this worker down when the ``serve`` that started it is gone."""
    while True:
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(PARENT_POLL_S)


def worker(
    config: Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")] = (
        DEFAULT_CONFIG_PATH),
    queues: Annotated[str, typer.Option(help="Comma-separated queues: inference, io.")] = (
        "inference,io"),
    device: Annotated[str | None, typer.Option(
        help="Torch device (auto, cpu, cuda, cuda:N); default jobs.device.")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="Worker processes; default jobs.concurrency.")] = None,
    hostname: Annotated[str | None, typer.Option(help="Worker node name.")] = None,
) -> None:
    """Run a worker consuming QUEUES with the configured broker."""
    err = Console(stderr=True)
    settings = load_settings_or_exit(config)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in _QUEUES]
    if not wanted or unknown:
        err.print(f"--queues: unknown queue(s) {unknown}; use {', '.join(_QUEUES)}")
        raise typer.Exit(EXIT_USAGE)
    from cad_node.logs import setup_logging

    setup_logging(settings.log_level)
    from cad_node.jobs.celery_app import configure_app
    from cad_node.jobs.tasks import CONFIG_ENV, configure_worker

    os.environ[CONFIG_ENV] = str(config)
    runner = configure_worker(settings, device=device)
    app = configure_app(settings)
    name = (hostname or f"cad-node-{os.getpid()}@%h").replace("%h", socket.gethostname())
    consume = list(wanted)
    if settings.storage.fetch_url is not None and "io" in wanted:
        # No shared storage: sends (and retries) of the results this worker
        # holds come to its own queue (cad_node.jobs.tasks.results_queue).
        import shutil

        from cad_node.jobs.tasks import results_queue

        consume.append(results_queue(name))
        # Studies fetched by an earlier life of this worker (killed mid-job) are scratch.
        shutil.rmtree(Path(settings.node.storage_dir) / "fetch", ignore_errors=True)
    threading.Thread(target=_heartbeat, args=(settings, name, wanted,
                                              runner.device), daemon=True).start()
    from cad_node.jobs.service import PARENT_PID_ENV

    parent = os.environ.get(PARENT_PID_ENV)
    if parent and parent.isdigit():
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    err.print(f"worker {name}: queues {','.join(wanted)}, device {runner.device}, "
              f"broker {app.conf.broker_url.split('@')[-1]}", highlight=False)
    app.worker_main([
        "worker", "--queues", ",".join(consume),
        "--concurrency", str(concurrency or settings.jobs.concurrency),
        "--pool", "prefork", "--hostname", name, "--loglevel", settings.log_level,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])


def register(app: typer.Typer) -> None:
    """Add the ``worker`` command to ``app``."""
    app.command("worker")(worker)
