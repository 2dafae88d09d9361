"""The REST API and the status page (FastAPI).

Reading (every ``GET``) needs no token.  Every write (``POST``) needs
``Authorization: Bearer <token>`` with a token of ``web.tokens`` or the one in
the environment variable ``web.token_env``; the token's name is the actor of
the audit event.  Without any token configured, writes are refused (403).

Endpoints
---------
``GET /``                        the status page (static HTML + JS, no build step, no CDN)
``GET /api/overview``            everything the page shows, in one document
``GET /api/studies``             studies with their per-stage timeline and UID-flagged instances
``GET /api/studies/{uid}/uid-defects``  a study's instances stored with a tolerated UID defect
``GET /api/jobs/{id}``           one job with its events and acknowledged objects
``GET /api/models``              installed model bundles with their cards
``POST /api/jobs/{id}/retry``    run a failed/dead job again
``POST /api/jobs/{id}/resend``   send a job's results again
``POST /api/dead-letter/replay`` queue every dead job again
``POST /api/destinations/{name}/echo``  live C-ECHO
``POST /api/reload``             reload peers, destinations and routing

Job and study data are read through :class:`cad_node.jobs.store.JobStore` and
:class:`cad_node.storage.index.SpoolIndex`, never with SQL of their tables.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cad_node.config import Settings
from cad_node.jobs.routing import NOT_ROUTED, not_routed_reason
from cad_node.jobs.runner import ANALYSIS_FAILED
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job, JobNotFoundError, JobStore
from cad_node.storage.index import SpoolIndex

__all__ = ["STAGES", "WebContext", "create_app", "study_timeline"]

#: The stages of a study's timeline, in order.
STAGES = ("received", "complete", "routed", "analysed", "built", "validated", "sent")
#: A worker whose last heartbeat is older than this is shown as not alive (seconds).
WORKER_STALE_S = 20.0
_STATIC = ("index.html", "app.js", "style.css")


@dataclass
class WebContext:
    """What the web app reads and acts on.

    Attributes
    ----------
    settings : callable
        Returns the configuration in force (it changes on reload).
    store : JobStore
        The job table.
    index : callable
        Returns the spool index (None while unavailable).
    reload : callable, optional
        ``reload(actor) -> dict``; None when the app runs outside ``serve``.
    environ : mapping
        Where ``web.token_env`` is read.
    """

    settings: Callable[[], Settings]
    store: JobStore
    index: Callable[[], SpoolIndex | None]
    reload: Callable[[str], dict[str, Any]] | None = None
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    started_at: float = field(default_factory=time.time)


def _tokens(ctx: WebContext) -> dict[str, str]:
    web = ctx.settings().web
    tokens = {t.token: t.name for t in web.tokens}
    env_token = ctx.environ.get(web.token_env, "")
    if len(env_token) >= 16:
        tokens.setdefault(env_token, "env")
    return tokens


def _timings(settings: Settings, job: Job) -> dict[str, float]:
    from cad_node.jobs.runner import TIMINGS_NAME

    path = Path(settings.node.storage_dir) / "results" / job.node_name / TIMINGS_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def study_timeline(job: Job, store: JobStore, settings: Settings) -> list[dict[str, Any]]:
    """The per-stage timeline of a job (:data:`STAGES` order): ``{stage, at, duration_s, error}``.

    ``at`` is when the stage ended (epoch seconds, None when not reached),
    ``duration_s`` how long it took after the previous stage.  ``routed``
    includes the time queued; ``analysed`` is loading plus inference; an
    error is attached to the stage that failed.
    """
    events = store.events(job.job_id)
    first: dict[JobState, float] = {}
    last: dict[JobState, float] = {}
    for ev in events:
        first.setdefault(ev.state, ev.at)
        last[ev.state] = ev.at
    t = _timings(settings, job)
    at: dict[str, float | None] = dict.fromkeys(STAGES)
    at["received"] = first.get(JobState.RECEIVED, job.received_at)
    at["complete"] = first.get(JobState.COMPLETE, job.completed_at)
    running = last.get(JobState.RUNNING)
    ready = last.get(JobState.RESULTS_READY) if JobState.RESULTS_READY in first else None
    if running is not None and t:
        routed = running + t.get("route", 0.0)
        analysed = routed + t.get("load", 0.0) + t.get("inference", 0.0)
        built = analysed + t.get("build", 0.0)
        validated = built + t.get("validate", 0.0)
        if ready is not None:
            validated = max(validated, first[JobState.RESULTS_READY])
        at.update(routed=routed, analysed=analysed, built=built, validated=validated)
    if job.state is JobState.SENT or job.sent_at is not None:
        at["sent"] = job.sent_at
    errors: dict[str, str] = {}
    if job.error:
        reason = not_routed_reason(job.error)
        if reason is not None:
            errors["routed"] = f"{NOT_ROUTED}: {reason}"
        elif (job.state is JobState.FAILED and at["validated"] is None) or (
                job.error.startswith(ANALYSIS_FAILED)):  # e.g. a refused radiograph
            errors["analysed"] = job.error
        else:
            errors["sent"] = job.error
    out: list[dict[str, Any]] = []
    previous: float | None = None
    for stage in STAGES:
        when = at[stage]
        duration = None if when is None or previous is None else max(0.0, when - previous)
        out.append({"stage": stage, "at": when, "duration_s": duration,
                    "error": errors.get(stage)})
        if when is not None:
            previous = when
    return out


def _job_view(job: Job) -> dict[str, Any]:
    reason = not_routed_reason(job.error)
    return {
        "job_id": job.job_id, "study_instance_uid": job.study_instance_uid,
        "generation": job.generation,
        "state": NOT_ROUTED if reason is not None else job.state.value,
        "job_state": job.state.value, "error": job.error, "not_routed_reason": reason,
        "attempts": job.attempts, "instances": len(job.instances),
        "turnaround_s": job.turnaround_s, "superseded_by": job.superseded_by,
        "next_attempt_at": job.next_attempt_at,
    }


def _studies(ctx: WebContext, limit: int) -> list[dict[str, Any]]:
    settings = ctx.settings()
    index = ctx.index()
    jobs_by_study: dict[str, list[Job]] = {}
    for job in ctx.store.list_jobs(limit=max(limit * 4, 200)):
        jobs_by_study.setdefault(job.study_instance_uid, []).append(job)
    studies = index.studies() if index is not None else []
    studies = sorted(studies, key=lambda s: s.last_received, reverse=True)[:limit]
    out: list[dict[str, Any]] = []
    for st in studies:
        jobs = sorted(jobs_by_study.get(st.study_instance_uid, []), key=lambda j: j.job_id)
        current = jobs[-1] if jobs else None
        view: dict[str, Any] = {
            "study_instance_uid": st.study_instance_uid, "patient_id": st.patient_id,
            "instances": st.num_instances, "uid_flagged": st.flagged_instances,
            "first_received": st.first_received,
            "last_received": st.last_received, "generation": st.generation,
            "state": "receiving" if st.pending else "handed on",
            "job": None, "timeline": [], "jobs": [j.job_id for j in jobs],
        }
        if current is not None:
            view["job"] = _job_view(current)
            view["state"] = view["job"]["state"]
            view["timeline"] = study_timeline(current, ctx.store, settings)
        out.append(view)
    return out


def _workers(ctx: WebContext) -> list[dict[str, Any]]:
    now = time.time()
    running = ctx.store.list_jobs(states=[JobState.RUNNING, JobState.RESULTS_READY], limit=100)
    current: dict[str, int] = {}
    for job in running:
        for ev in reversed(ctx.store.events(job.job_id)):
            if ev.state is JobState.RUNNING and ev.detail and " on " in ev.detail:
                host = ev.detail.split(" on ", 1)[1].split(",", 1)[0]
                current.setdefault(host, job.job_id)
                break
    out = []
    for w in ctx.store.workers():
        out.append({"hostname": w["hostname"], "pid": w["pid"], "queues": w["queues"],
                    "device": w["device"], "last_seen": w["last_seen"],
                    "alive": now - float(w["last_seen"]) < WORKER_STALE_S,
                    "current_job": current.get(str(w["hostname"]))})
    return out


def _models(settings: Settings) -> list[dict[str, Any]]:
    from cad_node.models.bundle import MODEL_CARD_FILE, default_models_dir, read_manifest

    base = Path(settings.models.dir) if "dir" in settings.models.model_fields_set \
        else default_models_dir()
    out: list[dict[str, Any]] = []
    if not base.is_dir():
        return out
    for manifest_path in sorted(base.glob("*/*/manifest.json")):
        try:
            m = read_manifest(manifest_path)
        except Exception as exc:
            out.append({"path": manifest_path.parent.name, "error": str(exc)})
            continue
        card = manifest_path.parent / MODEL_CARD_FILE
        out.append({
            "name": m.name, "version": m.version, "task": m.task,
            "intended_use": m.intended_use, "license": m.license, "metrics": m.metrics,
            "training_data": m.training_data, "device_uid": m.device_uid,
            "card": card.read_text(encoding="utf-8", errors="replace") if card.is_file()
            else None,
        })
    return out


def _overview(ctx: WebContext, limit: int) -> dict[str, Any]:
    from cad_node.cli.status import queue_lengths
    from cad_node.storage.spool import free_bytes

    settings = ctx.settings()
    node = settings.node
    try:
        free: int | None = free_bytes(node.storage_dir)
    except OSError:
        free = None
    counts = {s.value: n for s, n in ctx.store.count_by_state().items()}
    counts[NOT_ROUTED] = sum(1 for j in ctx.store.list_jobs(states=[JobState.FAILED],
                                                            limit=None)
                             if not_routed_reason(j.error) is not None and j.superseded_by is None)
    from cad_node.live import read_generation

    return {
        "time": time.time(),
        "node": {"ae_title": node.ae_title, "host": node.host, "port": node.port,
                 "storage_dir": node.storage_dir, "accept_any": node.accept_any,
                 "config_generation": read_generation(node.storage_dir),
                 "started_at": ctx.started_at},
        "disk": {"free_bytes": free, "watermark_bytes": node.min_free_bytes,
                 "ok": free is not None and free >= node.min_free_bytes},
        "queues": queue_lengths(settings),
        "workers": _workers(ctx),
        "jobs": counts,
        "studies": _studies(ctx, limit),
        "peers": [{"ae_title": p.ae_title, "host": p.host} for p in settings.peers],
        "destinations": [{"name": d.name, "ae_title": d.ae_title, "host": d.host,
                          "port": d.port, "objects": list(d.objects)}
                         for d in settings.destinations],
        "routing": [{"name": r.name, "pipeline": r.pipeline} for r in settings.routing.rules],
        "warnings": settings.warnings(),
        "refresh_s": settings.web.refresh_s,
        "writes_enabled": bool(_tokens(ctx)),
    }


def create_app(ctx: WebContext) -> FastAPI:
    """Build the FastAPI application for one node (see the module docstring)."""
    app = FastAPI(title="cad-node", docs_url=None, redoc_url=None, openapi_url=None)

    def actor(authorization: Annotated[str | None, Header()] = None) -> str:
        tokens = _tokens(ctx)
        if not tokens:
            raise HTTPException(403, "write actions are disabled: no web token configured")
        if authorization is None or not authorization.startswith("Bearer "):
            raise HTTPException(401, "bearer token required",
                                headers={"WWW-Authenticate": "Bearer"})
        given = authorization[len("Bearer "):].strip().encode()
        for token, name in tokens.items():
            if hmac.compare_digest(given, token.encode()):
                return name
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> Response:
        return _static("index.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, "not found")
        return _static(name)

    @app.get("/api/overview")
    def overview(limit: int = 50) -> dict[str, Any]:
        return _overview(ctx, max(1, min(limit, 500)))

    @app.get("/api/studies")
    def studies(limit: int = 50) -> list[dict[str, Any]]:
        return _studies(ctx, max(1, min(limit, 500)))

    @app.get("/api/studies/{study_instance_uid}/uid-defects")
    def uid_defects(study_instance_uid: str) -> dict[str, str]:
        index = ctx.index()
        if index is None or index.study(study_instance_uid) is None:
            raise HTTPException(404, "no such study")
        return index.uid_defects(study_instance_uid)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        try:
            j = ctx.store.get(job_id)
        except JobNotFoundError:
            raise HTTPException(404, f"no job {job_id}") from None
        return {**_job_view(j),
                "timeline": study_timeline(j, ctx.store, ctx.settings()),
                "events": [{"state": e.state.value, "at": e.at, "attempt": e.attempt,
                            "error": e.error, "detail": e.detail}
                           for e in ctx.store.events(job_id)],
                "destinations": {name: {"state": d.state.value, "attempts": d.attempts,
                                        "error": d.error, "acknowledged_at": d.acknowledged_at}
                                 for name, d in ctx.store.destinations(job_id).items()},
                "sent": [{"destination": o.destination, "sop_instance_uid": o.sop_instance_uid,
                          "kind": o.kind, "status": o.status, "sent_at": o.sent_at}
                         for o in ctx.store.sent_objects(job_id)]}

    @app.get("/api/models")
    def models() -> list[dict[str, Any]]:
        return _models(ctx.settings())

    def _job_action(fn: Callable[..., Job], job_id: int, who: str) -> dict[str, Any]:
        from cad_node.jobs.store import InvalidTransitionError

        try:
            j = fn(ctx.settings(), ctx.store, job_id, actor=who)
        except JobNotFoundError:
            raise HTTPException(404, f"no job {job_id}") from None
        except InvalidTransitionError as exc:
            raise HTTPException(409, str(exc)) from None
        return _job_view(j)

    @app.post("/api/jobs/{job_id}/retry")
    def retry(job_id: int, who: str = Depends(actor)) -> dict[str, Any]:
        from cad_node.jobs.actions import retry_job

        return _job_action(retry_job, job_id, who)

    @app.post("/api/jobs/{job_id}/resend")
    def resend(job_id: int, who: str = Depends(actor)) -> dict[str, Any]:
        from cad_node.jobs.actions import resend_job

        return _job_action(resend_job, job_id, who)

    @app.post("/api/dead-letter/replay")
    def replay(who: str = Depends(actor)) -> dict[str, Any]:
        from cad_node.jobs.actions import replay_dead

        return {"replayed": replay_dead(ctx.settings(), ctx.store, actor=who)}

    @app.post("/api/destinations/{name}/echo")
    def echo(name: str, who: str = Depends(actor)) -> dict[str, Any]:
        from cad_node.audit import AuditEvent, AuditLog, Outcome
        from cad_node.export.sender import echo as c_echo

        settings = ctx.settings()
        try:
            dest = settings.destination(name)
        except KeyError:
            raise HTTPException(404, f"no destination named {name!r}") from None
        result = c_echo(dest, calling_ae=settings.node.ae_title)
        AuditLog.for_settings(settings).record(
            AuditEvent.ADMIN_ACTION, actor=who, action="c-echo", destination=name,
            outcome=Outcome.SUCCESS if result.ok else Outcome.MINOR_FAILURE,
            status=result.status, error=result.error)
        return {"destination": name, "ok": result.ok, "status": result.status,
                "error": result.error, "elapsed_ms": round(result.elapsed_s * 1000, 1)}

    @app.post("/api/reload")
    def reload(who: str = Depends(actor)) -> JSONResponse:
        if ctx.reload is None:
            raise HTTPException(503, "reload is only available inside cad-node serve")
        result = ctx.reload(who)
        return JSONResponse(result, status_code=200 if result.get("ok") else 422)

    @app.exception_handler(ValueError)
    def _bad_value(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app


_MEDIA = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8"}


def _static(name: str) -> Response:
    data = resources.files("cad_node.web").joinpath("static", name).read_bytes()
    return Response(data, media_type=_MEDIA[name.rsplit(".", 1)[1]],
                    headers={"Cache-Control": "no-cache",
                             "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"})
