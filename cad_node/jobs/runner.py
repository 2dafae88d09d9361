"""The work of a job, stage by stage, independent of Celery.

Stages
------
``analyse`` (queue ``inference``)
    Route the study's series (:mod:`cad_node.jobs.routing`), load each
    selected series, run its pipeline, build the result objects for the union
    of the destinations' output profiles, pass each through the conformance
    gate (:func:`cad_node.results.validate`), write the objects that pass to
    ``<storage_dir>/results/job-NNNNNNNN/`` and quarantine the others in
    ``<storage_dir>/quarantine/job-NNNNNNNN/`` with the reason.  Ends in
    ``results-ready`` (or ``failed``).
``send`` (queue ``io``)
    C-STORE the stored objects to every destination, each receiving the kinds
    of its profile.  Objects already acknowledged are never sent again.
    Each destination's outcome is kept per ``(job, destination)``
    (:class:`cad_node.jobs.store.DestinationStatus`): ``acknowledged``,
    ``retrying`` (a retry time from :class:`cad_node.export.retry.RetryPolicy`),
    ``failed`` (a permanent status) or ``exhausted`` (retry horizon reached).

    Several destinations: a permanent failure at one never stops delivery to
    the others.  The job stays ``results-ready`` while any destination is
    still retrying, and only settled destinations are skipped on the retry.
    When every destination has settled, the job is ``sent`` if all of them
    acknowledged, ``failed`` if any failed permanently, else ``dead``.  A
    fresh send sequence (the first send, or an operator's ``jobs retry`` /
    ``jobs resend``, which reset the attempts) tries failed and exhausted
    destinations again.

Files below ``storage_dir`` are named from node ids and object kinds only,
never from UIDs or other peer-supplied strings.  Result objects are
deterministic (same input and model give the same UIDs), so running the
``analyse`` stage again after a crash rewrites the very same objects.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from cad_node.config import DEFAULT_OBJECT_KINDS, DestinationConfig, ObjectKind, Settings
from cad_node.export.retry import RetryPolicy
from cad_node.export.sender import ObjectResult, OutboundObject, SendReport, send_objects
from cad_node.jobs.routing import NOT_ROUTED, RouteStep, plan_routes
from cad_node.jobs.states import JobState
from cad_node.jobs.store import DestinationStatus, Job, JobStore
from cad_node.logs import job_logger
from cad_node.models.device import resolve_device
from cad_node.storage.durable import atomic_write_bytes as _atomic_write_bytes

__all__ = [
    "ANALYSIS_FAILED",
    "MANIFEST_NAME",
    "JobRunner",
    "PipelineFailedError",
    "SendStep",
    "StageTimings",
    "resolve_device",
]

LOG = logging.getLogger(__name__)

#: Name of the manifest listing a job's result files (written last, atomically).
MANIFEST_NAME = "manifest.json"
#: Seconds per analyse stage (route, load, inference, build, validate), for the web timeline.
TIMINGS_NAME = "timings.json"
#: File holding the reasons an object was quarantined.
QUARANTINE_REASON_NAME = "reasons.txt"


@dataclass
class StageTimings:
    """Seconds spent per stage (for the benchmark and the logs)."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        """Accumulate ``seconds`` under ``name``."""
        self.stages[name] = self.stages.get(name, 0.0) + seconds


#: Prefix of the error of a job whose analysis failed but whose failure SR and
#: summary page were built (and sent): ``"analysis failed (<pipeline>): <reason>"``.
ANALYSIS_FAILED = "analysis failed"


class PipelineFailedError(RuntimeError):
    """A pipeline failed in a way that leaves nothing to report as DICOM."""


class SendStep(enum.Enum):
    """What the send stage concluded."""

    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    DEAD = "dead"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class SendDecision:
    """Outcome of :meth:`JobRunner.send`."""

    step: SendStep
    retry_at: float | None = None
    error: str | None = None


def _encode(ds: pydicom.Dataset) -> bytes:
    import io

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class JobRunner:
    """Runs the stages of jobs for one node configuration.

    Parameters
    ----------
    settings : Settings
        The node configuration.
    store : JobStore, optional
        The job table (default: the one below ``settings.node.storage_dir``).
    device : str, optional
        Torch device for pipelines (default: resolved ``settings.jobs.device``).
    """

    def __init__(self, settings: Settings, store: JobStore | None = None,
                 device: str | None = None) -> None:
        self.settings = settings
        self.storage = Path(settings.node.storage_dir).resolve()
        self.store = store if store is not None else JobStore.from_settings(settings)
        self.device = resolve_device(device or settings.jobs.device)
        self.retry_policy = RetryPolicy.from_config(settings.jobs.retry)
        self.timings: dict[int, StageTimings] = {}

    # -- paths ------------------------------------------------------------
    def results_dir(self, job: Job) -> Path:
        """Directory of a job's result files."""
        return self.storage / "results" / job.node_name

    def quarantine_dir(self, job: Job) -> Path:
        """Directory of a job's quarantined objects."""
        return self.storage / "quarantine" / job.node_name

    def _kinds(self, below_operating_point: bool = False) -> list[ObjectKind]:
        """Kinds wanted by the destinations of one variant (default: at the operating point)."""
        kinds: list[ObjectKind] = []
        for dest in self.settings.destinations:
            if dest.below_operating_point != below_operating_point:
                continue
            for k in dest.objects:
                if k not in kinds:
                    kinds.append(k)
        if not kinds and not below_operating_point:
            return list(DEFAULT_OBJECT_KINDS)
        return kinds

    def _variants(self) -> list[bool]:
        """Object variants to build: at the operating point, and with sub-threshold
        candidates when a destination's profile asks for them."""
        out = [False] if self._kinds(False) else []
        if any(d.below_operating_point for d in self.settings.destinations):
            out.append(True)
        return out or [False]

    # -- analyse ------------------------------------------------------------
    def fetch_dir(self, job: Job) -> Path:
        """Where a worker without shared storage puts the study it fetched."""
        return self.storage / "fetch" / job.node_name

    def _study_paths(self, job: Job) -> list[str]:
        """The study's files: the spool's own paths, or fetched from the receiver."""
        base = self.settings.storage.fetch_url
        if base is None:
            return [str(i["path"]) for i in job.instances]
        from cad_node.storage.wado import fetch_study

        paths = fetch_study(base, job.fetch_token or "", job.instances, self.fetch_dir(job))
        return [str(p) for p in paths]

    def analyse(self, job_id: int, worker: str | None = None) -> Job:
        """Run the ``analyse`` stage; the job must be ``running``.

        ``worker`` names the worker running it: with ``storage.fetch_url``
        (a worker that does not share the receiver's storage) the study is
        fetched from the receiver first, and the job records that this
        worker holds the results files (its own ``io`` queue sends them).

        Returns
        -------
        Job
            The job in ``results-ready`` or ``failed``.
        """
        job = self.store.get(job_id)
        timings = self.timings.setdefault(job_id, StageTimings())
        if job.superseded_by is not None:
            return self.store.transition(job_id, JobState.FAILED,
                                         error=f"superseded by job {job.superseded_by}")
        t0 = time.monotonic()
        paths = self._study_paths(job)
        timings.add("fetch", time.monotonic() - t0)
        try:
            return self._analyse_files(job, paths, worker, timings)
        finally:
            if self.settings.storage.fetch_url is not None:
                shutil.rmtree(self.fetch_dir(job), ignore_errors=True)

    def _analyse_files(self, job: Job, paths: list[str], worker: str | None,
                       timings: StageTimings) -> Job:
        job_id = job.job_id
        log = job_logger(LOG, job)
        t0 = time.monotonic()
        plan = plan_routes(paths, self.settings.routing)
        timings.add("route", time.monotonic() - t0)
        for path, reason in plan.unreadable.items():
            log.warning("unusable instance %s: %s", path, reason)
        if not plan.steps:
            if not self.settings.routing.rules:
                reasons = "routing.rules is empty (the configuration analyses nothing)"
            else:
                reasons = "no routing rule matched: " + (
                    "; ".join(r for rs in plan.reasons.values() for r in rs) or "no series")
            log.warning("%s: %s", NOT_ROUTED, reasons)
            return self.store.transition(job_id, JobState.FAILED,
                                         error=f"{NOT_ROUTED}: {reasons}"[:2000])
        out_dir = self.results_dir(job)
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest: list[dict[str, Any]] = []
        quarantined: list[str] = []
        failures: list[str] = []
        # Several pipelines may analyse one series (e.g. ct-chest and ct-lesion).
        # A pipeline with a ``reconcile`` method runs after the others on its
        # series and sees their results, so one finding is never reported twice.
        earlier: dict[str, list[Any]] = {}
        steps = sorted(plan.steps, key=lambda s: _reconciles(s.pipeline))
        for n, step in enumerate(steps, start=1):
            entries, bad, failure = self._analyse_step(
                job, n, step, out_dir, timings,
                earlier.setdefault(step.series.series_instance_uid, []))
            manifest.extend(entries)
            quarantined.extend(bad)
            if failure is not None:
                failures.append(failure)
        _atomic_write_bytes(out_dir / TIMINGS_NAME, json.dumps(timings.stages).encode())
        _atomic_write_bytes(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        superseded = self.store.get(job_id).superseded_by
        if superseded is not None:  # the study reopened while this job ran
            log.info("superseded by job %d while running: results not sent", superseded)
            return self.store.transition(job_id, JobState.FAILED,
                                         error=f"superseded by job {superseded} while running")
        detail = f"{len(manifest)} object(s) built in {sum(timings.stages.values()):.1f} s " + \
            ", ".join(f"{k} {v:.2f}s" for k, v in timings.stages.items())
        if not manifest:
            return self.store.transition(
                job_id, JobState.FAILED,
                error="every result object failed the conformance gate: " + "; ".join(quarantined),
            )
        log.info("results ready: %s", detail)
        if self.settings.storage.fetch_url is not None and worker is not None:
            self.store.set_results_host(job_id, worker)  # the files are on this host only
        # A failed analysis still yields objects that report the failure (SR +
        # summary page); the job records the reason so operators see it.
        return self.store.transition(job_id, JobState.RESULTS_READY, detail=detail,
                                     error="; ".join([*failures, *quarantined]) or None)

    def _analyse_step(
        self, job: Job, n: int, step: RouteStep, out_dir: Path, timings: StageTimings,
        earlier: list[Any] | None = None,
    ) -> tuple[list[dict[str, Any]], list[str], str | None]:
        from cad_node.pipelines import load_input
        from cad_node.results import build_results
        from cad_node.results.findings import AnalysisStatus

        t0 = time.monotonic()
        loaded = load_input(step.pipeline, step.paths)
        timings.add("load", time.monotonic() - t0)
        t0 = time.monotonic()
        result = run_pipeline(step.pipeline, loaded, device=self.device,
                              earlier=earlier or ())
        if earlier is not None:
            earlier.append(result)
        timings.add("inference", time.monotonic() - t0)
        if getattr(result, "model", None) is None:
            # Without a model identity no conformant result object can be built
            # (IHE AIR); a failed analysis is then reported in the job table only.
            reason = getattr(result, "failure_reason", None) or "result names no model"
            raise PipelineFailedError(f"pipeline {step.pipeline} failed: {reason}")
        t0 = time.monotonic()
        sources = [pydicom.dcmread(p) for p in step.paths]
        timings.add("build", time.monotonic() - t0)
        # Result UIDs derive from this: the analysed instances *and* the study
        # generation's content fingerprint, so a re-run of the same job (crash,
        # redelivery) rebuilds identical objects while a reopened study whose
        # files changed gets new ones.
        fingerprint = hashlib.sha256(
            "\n".join([job.fingerprint, *sorted(loaded.sop_instance_uids)]).encode()
        ).hexdigest()
        entries: list[dict[str, Any]] = []
        bad: list[str] = []
        for below in self._variants():
            t0 = time.monotonic()
            objects = build_results(result, sources, settings=self.settings.results,
                                    objects=self._kinds(below), input_fingerprint=fingerprint,
                                    below_operating_point=below)
            timings.add("build", time.monotonic() - t0)
            t0 = time.monotonic()
            got, failed = self.gate_and_store(job, n, step.pipeline, objects, sources, out_dir,
                                              below_operating_point=below)
            entries += got
            bad += failed
            timings.add("validate", time.monotonic() - t0)
        failure = None
        if result.status is AnalysisStatus.FAILED:
            failure = f"{ANALYSIS_FAILED} ({step.pipeline}): {result.failure_reason}"
            log_failed = job_logger(LOG, job)
            log_failed.warning("%s; reporting the failure to the destinations", failure)
        return entries, bad, failure

    def gate_and_store(
        self, job: Job, n: int, pipeline: str, objects: Sequence[Any],
        sources: Sequence[pydicom.Dataset], out_dir: Path, below_operating_point: bool = False,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Pass each object through the conformance gate; store or quarantine it.

        Parameters
        ----------
        job : Job
            The job (names the directories).
        n : int
            Routing step number (file-name prefix ``stepNN_``).
        pipeline : str
            Pipeline that produced the objects (recorded in the manifest).
        objects : sequence of ResultObject
            Objects built for this step.
        sources : sequence of pydicom.Dataset
            The analysed source instances.
        out_dir : Path
            The job's results directory.
        below_operating_point : bool
            The objects are the variant with sub-threshold candidates (file
            names ``stepNN_below_op_...``; sent only to destinations asking for it).

        Returns
        -------
        (list of dict, list of str)
            Manifest entries of the stored objects, and one line per
            quarantined object.
        """
        from cad_node.results import validate

        log = job_logger(LOG, job)
        entries: list[dict[str, Any]] = []
        bad: list[str] = []
        for obj in objects:
            name = f"step{n:02d}_{'below_op_' if below_operating_point else ''}{obj.filename}"
            report = validate(obj, sources, others=objects,
                              use_dciodvfy=self.settings.results.use_dciodvfy)
            if not report.ok:
                qdir = self.quarantine_dir(job)
                qdir.mkdir(parents=True, exist_ok=True)
                try:
                    _atomic_write_bytes(qdir / name, _encode(obj.dataset))
                except Exception as exc:  # an object may not even encode
                    log.error("quarantined %s could not be written: %s", name, exc)
                with open(qdir / QUARANTINE_REASON_NAME, "a", encoding="utf-8") as fh:
                    fh.write(f"{name}: " + " | ".join(report.errors) + "\n")
                log.error("quarantined %s (%s): %s", name, obj.kind, "; ".join(report.errors))
                bad.append(f"{name} quarantined: {report.errors[0] if report.errors else '?'}")
                continue
            _atomic_write_bytes(out_dir / name, _encode(obj.dataset))
            entries.append({
                "file": name, "kind": obj.kind, "step": n, "pipeline": pipeline,
                "sop_class_uid": str(obj.dataset.SOPClassUID),
                "sop_instance_uid": str(obj.dataset.SOPInstanceUID),
                "transfer_syntax_uid": str(obj.dataset.file_meta.TransferSyntaxUID),
                "role": obj.role,
                "dciodvfy_ran": report.dciodvfy_ran,
                "below_operating_point": below_operating_point,
            })
        return entries, bad

    def manifest(self, job: Job) -> list[dict[str, Any]]:
        """The job's result files (empty when the analyse stage has not finished)."""
        path = self.results_dir(job) / MANIFEST_NAME
        if not path.exists():
            return []
        data: list[dict[str, Any]] = json.loads(path.read_text())
        return data

    # -- send -----------------------------------------------------------------
    def send(self, job_id: int, now: float | None = None) -> SendDecision:
        """Run the ``send`` stage once and record its outcome in the job table."""
        job = self.store.get(job_id)
        log = job_logger(LOG, job)
        if job.state is not JobState.RESULTS_READY:
            return SendDecision(SendStep.SKIPPED)
        if job.superseded_by is not None:
            self.store.transition(job_id, JobState.FAILED,
                                  error=f"superseded by job {job.superseded_by} before sending")
            return SendDecision(SendStep.SKIPPED)
        entries = self.manifest(job)
        out_dir = self.results_dir(job)
        now = time.time() if now is None else now
        t0 = time.monotonic()
        prior = self.store.destinations(job_id)
        outcome: dict[str, DestinationStatus] = {}
        errors: dict[str, str] = {}
        total = 0
        for dest in self.settings.destinations:
            before = prior.get(dest.name)
            if before is not None and (
                    before.state is DestinationStatus.ACKNOWLEDGED
                    or (job.attempts > 0 and before.state in (DestinationStatus.FAILED,
                                                             DestinationStatus.EXHAUSTED))):
                outcome[dest.name] = before.state  # settled earlier in this send sequence
                if before.error:
                    errors[dest.name] = before.error
                continue
            objs = [OutboundObject(e["kind"], out_dir / e["file"], e["sop_class_uid"],
                                   e["sop_instance_uid"], e["transfer_syntax_uid"])
                    for e in entries if e["kind"] in dest.objects
                    and bool(e.get("below_operating_point", False)) == dest.below_operating_point]
            rep = self._send_to(job, dest, objs)
            total += len(rep.stored)
            if rep.permanent:
                state = DestinationStatus.FAILED
                errors[dest.name] = "; ".join(
                    f"{r.obj.kind} {r.error}" for r in rep.permanent)[:1000]
            elif rep.retryable:
                state = DestinationStatus.RETRYING
                errors[dest.name] = "; ".join(sorted({str(r.error) for r in rep.retryable}))[:1000]
            else:
                state = DestinationStatus.ACKNOWLEDGED
            outcome[dest.name] = state
            self.store.record_destination(job_id, dest.name, state, error=errors.get(dest.name),
                                          count_attempt=state is not DestinationStatus.ACKNOWLEDGED,
                                          now=now)
        self.timings.setdefault(job_id, StageTimings()).add("send", time.monotonic() - t0)
        error = "; ".join(f"{d}: {e}" for d, e in errors.items())[:2000] or None
        retrying = [d for d, s in outcome.items() if s is DestinationStatus.RETRYING]
        if retrying:
            first = job.first_failure_at if job.first_failure_at is not None else now
            retry_at = self.retry_policy.next_retry(job.attempts + 1, first, now)
            if retry_at is not None:
                log.warning("send failed (attempt %d), retry in %.1f s: %s", job.attempts + 1,
                            retry_at - now, error)
                self.store.transition(job_id, JobState.RESULTS_READY, error=error,
                                      count_attempt=True, next_attempt_at=retry_at, now=now)
                return SendDecision(SendStep.RETRY, retry_at=retry_at, error=error)
            for d in retrying:
                outcome[d] = DestinationStatus.EXHAUSTED
                self.store.record_destination(job_id, d, DestinationStatus.EXHAUSTED,
                                              error=errors.get(d), now=now)
            log.error("retries exhausted after %d attempt(s): %s", job.attempts + 1, error)
        if any(s is DestinationStatus.FAILED for s in outcome.values()):
            log.error("permanent send failure: %s", error)
            self.store.transition(job_id, JobState.FAILED, error=error, count_attempt=True)
            return SendDecision(SendStep.FAILED, error=error)
        if any(s is DestinationStatus.EXHAUSTED for s in outcome.values()):
            self.store.transition(job_id, JobState.DEAD, count_attempt=True,
                                  error=f"retry horizon exhausted: {error}")
            return SendDecision(SendStep.DEAD, error=error)
        # A failed analysis was sent as its failure SR + summary page: the sent
        # job keeps the reason, so the status page still shows it.
        analysis_error = next(
            (e.error for e in reversed(self.store.events(job_id))
             if e.state is JobState.RESULTS_READY and e.error
             and e.error.startswith(ANALYSIS_FAILED)), None)
        job = self.store.transition(job_id, JobState.SENT, error=analysis_error,
                                    detail=f"{total} object(s) acknowledged")
        log.info("sent; turnaround %.1f s", job.turnaround_s or 0.0)
        return SendDecision(SendStep.SENT)

    def _send_to(self, job: Job, dest: DestinationConfig,
                 objs: Sequence[OutboundObject]) -> SendReport:
        done = {o.sop_instance_uid for o in self.store.sent_objects(job.job_id, dest.name)}

        def _acked(result: ObjectResult) -> None:
            self.store.record_sent(job.job_id, dest.name, result.obj.sop_instance_uid,
                                   result.obj.sop_class_uid, result.obj.kind,
                                   int(result.status or 0))

        report = send_objects(dest, objs, calling_ae=self.settings.node.ae_title,
                              max_pdu=self.settings.node.max_pdu or 0, skip=done,
                              on_stored=_acked)
        self._audit_sent(job, dest, report)
        job_logger(LOG, job).info(
            "destination %s: %d stored, %d retryable, %d permanent, %d already sent",
            dest.name, len(report.stored), len(report.retryable), len(report.permanent),
            len(done & {o.sop_instance_uid for o in objs}))
        return report

    def _audit_sent(self, job: Job, dest: DestinationConfig, report: SendReport) -> None:
        """Record one ``results-sent`` event per destination and send attempt."""
        from cad_node.audit import AuditEvent, AuditLog, Outcome

        if not report.results:
            return
        failed = [r for r in report.results if r not in report.stored]
        outcome = Outcome.SUCCESS if not failed else (
            Outcome.MAJOR_FAILURE if report.permanent else Outcome.MINOR_FAILURE)
        AuditLog.for_settings(self.settings).record(
            AuditEvent.RESULTS_SENT, outcome=outcome, actor=self.settings.node.ae_title,
            job_id=job.job_id, study_instance_uid=job.study_instance_uid,
            destination={"name": dest.name, "ae_title": dest.ae_title, "host": dest.host,
                         "port": dest.port},
            instances=[{"sop_instance_uid": r.obj.sop_instance_uid, "kind": r.obj.kind,
                        "status": r.status, "error": r.error} for r in report.results],
        )

    # -- maintenance ------------------------------------------------------------
    def discard_results(self, job: Job) -> None:
        """Remove a job's result files (before it is analysed again)."""
        shutil.rmtree(self.results_dir(job), ignore_errors=True)


def _reconciles(name: str) -> bool:
    """Whether pipeline ``name`` reconciles its result with earlier ones (runs last)."""
    from cad_node.pipelines import get_pipeline

    try:
        return callable(getattr(get_pipeline(name), "reconcile", None))
    except KeyError:
        return False


def run_pipeline(name: str, series: Any, *, device: str, earlier: Sequence[Any] = ()) -> Any:
    """Run the registered pipeline ``name`` (:func:`cad_node.pipelines.get_pipeline`).

    When the pipeline has a ``reconcile(result, others, series)`` method, it
    is applied with the ``earlier`` results of other pipelines on the same
    series (e.g. ct-lesion leaves lung findings to ct-chest).

    Raises
    ------
    KeyError
        No such pipeline.
    """
    from cad_node.pipelines import get_pipeline

    pipeline = get_pipeline(name)
    result = pipeline.run(series, device=device)
    reconcile = getattr(pipeline, "reconcile", None)
    if callable(reconcile) and earlier:
        result = reconcile(result, list(earlier), series)
    return result
