"""``cad-node serve``: run the receiving node (C-ECHO/C-STORE SCP + study assembly).

The node runs until SIGINT/SIGTERM.  A bad configuration exits with status 2
before any port is bound.  Completed studies are handed to
:class:`cad_node.jobs.service.JobsRuntime`, which records a job, runs the
embedded worker (unless ``--no-worker`` or ``jobs.embedded_worker: false``) and
serves the Prometheus metrics.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH, Settings

#: Exit status for an invalid configuration (nothing bound yet).
EXIT_CONFIG_ERROR = EXIT_USAGE
#: Exit status when the node cannot start (port in use, spool locked...).
EXIT_START_FAILED = 1


def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")] = (
        DEFAULT_CONFIG_PATH),
    no_worker: Annotated[bool, typer.Option(
        "--no-worker", help="Do not run the embedded worker (workers run elsewhere).")] = False,
) -> None:
    """Receive studies: DICOM SCP, durable spool, study assembly and jobs."""
    err = Console(stderr=True)
    settings = load_settings_or_exit(config)
    from cad_node.logs import setup_logging
    from cad_node.scp import NodeServer

    setup_logging(settings.log_level)
    import logging

    for warning in settings.warnings():
        logging.getLogger("cad_node.serve").warning("configuration %s: %s", config, warning)
        err.print(f"warning: {warning}", markup=False, highlight=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from cad_node.jobs.service import JobsRuntime

    # Jobs: the durable hand-off, the embedded worker (supervised child) and metrics.
    jobs = JobsRuntime(settings, config,
                       worker=settings.jobs.embedded_worker and not no_worker)
    from cad_node.audit import AuditLog, SCPAuditObserver

    audit = SCPAuditObserver(AuditLog.for_settings(settings))
    server = NodeServer(settings, on_study_complete=jobs.on_study_complete,
                        admission_observers=[audit], on_association_end=audit.ended)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        err.print(f"cannot start the node: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_START_FAILED) from None
    ops = _start_operations(config, settings, server, jobs, err)
    jobs.start(server)
    err.print(
        f"cad-node {settings.node.ae_title} listening on {settings.node.host}:{server.port}, "
        f"storage {settings.node.storage_dir}",
        highlight=False,
    )
    try:
        stop.wait()
    finally:
        for stopper in ops:
            stopper()
        server.stop()
        jobs.stop()


def _start_operations(config: Path, settings: Settings, server: Any, jobs: Any,
                      err: Console) -> list[Callable[[], None]]:
    """Live reload (SIGHUP), the web API and the retention sweep; return their stoppers."""
    from cad_node.live import LiveConfig

    live = LiveConfig(config, settings, server)
    live.write_pid()

    def _on_hup(*_: object) -> None:
        threading.Thread(target=live.reload, args=("SIGHUP",), name="reload",
                         daemon=True).start()

    signal.signal(signal.SIGHUP, _on_hup)
    stoppers: list[Callable[[], None]] = []
    if settings.web.enabled:
        from cad_node.web import WebContext, WebServer

        ctx = WebContext(settings=lambda: live.settings, store=jobs.service.store,
                         index=lambda: server.spool.index if server.spool else None,
                         reload=lambda who: live.reload(who).as_dict())
        web = WebServer(ctx, settings.web.host, settings.web.port)
        try:
            web.start()
        except RuntimeError as exc:
            err.print(f"web API not started on {settings.web.host}:{settings.web.port}: {exc}",
                      markup=False, highlight=False)
        else:
            err.print(f"status page http://{settings.web.host}:{web.port}/", highlight=False)
            stoppers.append(web.stop)
    if settings.retention.days is not None:
        from cad_node.storage.retention import RetentionSweeper

        sweeper = RetentionSweeper(lambda: live.settings, jobs.service.store, server)
        sweeper.start()
        stoppers.append(sweeper.stop)
    return stoppers


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""
    app.command("serve")(serve)
