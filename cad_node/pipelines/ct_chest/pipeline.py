# mypy: disallow-untyped-calls=False
"""The ``ct-chest`` pipeline: lungs, nodule candidates, scoring, characterisation.

Stages (each reported through ``progress``):

1. input checks (CT, axial volume, enough slices) -> FAILED with a reason;
   then, when the scorer bundle's input spec has ``harmonise_slice_thickness_mm``
   and the scan's slices are thinner, slice-profile harmonisation along z
   (:mod:`~.harmonise`); the smoothed volume feeds every later stage;
2. :func:`~.lungs.segment_lungs` (FAILED "not a chest CT" when no lungs);
3. :func:`~.candidates.generate_candidates`;
4. scoring: a documented classical score from blob shape features
   (:func:`classical_probability`), combined (geometric mean) with the
   ``ct-nodule-scorer`` CNN bundle when it is installed; the operating
   threshold is then the geometric mean of the two operating thresholds;
5. characterisation of the best :data:`CHARACTERISE_TOP` candidates, an
   elongation penalty, distance NMS, ranking;
6. Brock (McWilliams 2013) per finding and the study's Lung-RADS v2022
   category from the findings at or above the operating threshold.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - conventional alias
from pydicom.dataset import Dataset

from cad_node.imaging import LoadedSeries
from cad_node.imaging.volume import index_to_lps
from cad_node.pipelines import ProgressCallback, register_pipeline
from cad_node.pipelines._ct_input import axial_problem, ct_problem, failed_result
from cad_node.pipelines._stages import StageClock
from cad_node.pipelines.ct_chest.brock import BrockInputs, brock_probability
from cad_node.pipelines.ct_chest.candidates import (
    Candidate,
    candidate_features,
    classical_probability,
    generate_candidates,
)
from cad_node.pipelines.ct_chest.characterise import NoduleMeasurement, characterise_nodule
from cad_node.pipelines.ct_chest.harmonise import harmonise_series
from cad_node.pipelines.ct_chest.lungrads import NoduleForRads, lung_rads_category
from cad_node.pipelines.ct_chest.lungs import (
    LungSegmentation,
    LungSegmentationError,
    segment_lungs,
)
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ImageMask,
    ModelIdentity,
)

__all__ = [
    "CHARACTERISE_TOP",
    "CLASSICAL_OPERATING_THRESHOLD",
    "MAX_FINDINGS",
    "SCORER_BUNDLE",
    "CtChestPipeline",
    "CtChestRun",
    "classical_probability",
    "parse_age",
]

if TYPE_CHECKING:  # torch is imported only when a scorer bundle is installed
    from cad_node.models.scorer import CandidateScorer
    from cad_node.pipelines.ct_chest.features import ContextFusion

log = logging.getLogger(__name__)

PIPELINE_NAME = "ct-chest"
#: Name of the candidate-scorer bundle (``cad_node.models``).
SCORER_BUNDLE = "ct-nodule-scorer"
#: Operating threshold of the classical score alone: findings at or above it are
#: "nodules" (Lung-RADS, Brock nodule count).  The classical score is not
#: calibrated; this point was chosen by inspecting ONE case (LIDC-IDRI-0001:
#: vessel branchings with blobness < ~0.35 fall below it) and is not validated.
#: With the CNN scorer the threshold is the bundle's ``operating_threshold`` (chosen
#: by ``cad-train`` from a stated rule) or, for bundles without one,
#: sqrt(this x the bundle's threshold).
CLASSICAL_OPERATING_THRESHOLD = 0.9
#: At most this many findings are reported, most probable first.
MAX_FINDINGS = 10
#: Findings below this probability are not reported at all.
MIN_REPORT_PROBABILITY = 0.05
#: Candidates characterised (segmented, measured) after scoring.
CHARACTERISE_TOP = 30
#: Fewest slices and smallest z extent (mm) of a usable chest CT.
MIN_SLICES = 20
MIN_Z_EXTENT_MM = 80.0

_AGE_RE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_age(ds: Dataset) -> float | None:
    """Patient age in years from Patient's Age (0010,1010, VR AS ``nnnY``, PS3.5 6.2),
    else from Patient's Birth Date and Study Date; None when unknown."""
    m = _AGE_RE.match(str(ds.get("PatientAge", "") or "").strip())
    if m:
        return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]
    birth, study = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    try:
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        s = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    except ValueError:
        return None
    years = (s - b).days / 365.25
    return years if 0 <= years < 130 else None


def _classical_parameters() -> dict[str, object]:
    """Every upper-case numeric constant of the ct-chest modules (the "weights")."""
    import sys

    from cad_node.pipelines.ct_chest import candidates, characterise, grid, lungs

    params: dict[str, object] = {}
    for mod in (candidates, characterise, grid, lungs, sys.modules[__name__]):
        for key, value in vars(mod).items():
            if key.isupper() and isinstance(value, int | float | tuple | dict):
                params[f"{mod.__name__.rsplit('.', 1)[-1]}.{key}"] = value
    return params


def _classical_identity() -> ModelIdentity:
    """Identity of the classical detector: changes whenever one of its parameters does."""
    from cad_node.models import device_uid_from_sha256

    desc = repr(sorted(_classical_parameters().items())).encode()
    sha = hashlib.sha256(desc).hexdigest()
    return ModelIdentity(name="ct-chest-classical", version="1.0.0",
                         device_uid=device_uid_from_sha256(sha), weights_sha256=sha)


@dataclass
class CtChestRun:
    """A run's result plus the intermediate products (for tests and benchmarks)."""

    result: AnalysisResult
    lungs: LungSegmentation | None = None
    candidates: list[Candidate] = field(default_factory=list)
    probabilities: npt.NDArray[np.float64] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Process CPU seconds per stage (all threads), next to the wall times above.
    cpu_s: dict[str, float] = field(default_factory=dict)


class _FailedError(Exception):
    pass


@register_pipeline(PIPELINE_NAME)
class CtChestPipeline:
    """Chest CT lung-nodule CAD (see module docstring).

    Parameters
    ----------
    models_dir : Path, optional
        Where to look for the ``ct-nodule-scorer`` bundle (default: the
        repository's ``models/``).  Without a bundle the classical score is used.
    use_scorer : bool
        False forces the classical score only.
    """

    name = PIPELINE_NAME

    def __init__(self, models_dir: Path | None = None, use_scorer: bool = True,
                 max_findings: int = MAX_FINDINGS) -> None:
        self.models_dir = models_dir
        self.use_scorer = use_scorer
        #: Findings reported at most (``cad-train``'s operating-point run asks for more).
        self.max_findings = max_findings

    def run(self, series: LoadedSeries, *, device: str = "cpu",
               progress: ProgressCallback | None = None) -> AnalysisResult:
        """Analyse one chest CT series; bad input gives a FAILED result, never an exception."""
        return self.run_detailed(series, device=device, progress=progress).result

    def _fail(self, series: LoadedSeries, reason: str) -> AnalysisResult:
        return failed_result(self.name, series, reason, _classical_identity(), log)

    def _check_input(self, series: LoadedSeries) -> None:
        ds0 = series.datasets[0]
        problem = ct_problem(series, self.name)
        if problem is not None:
            raise _FailedError(problem)
        itype = [str(v).upper() for v in (ds0.get("ImageType") or [])]
        if "LOCALIZER" in itype:
            raise _FailedError("localizer/scout image, not a tomographic volume")
        nz = series.shape[0]
        extent = (nz - 1) * series.image.GetSpacing()[2]
        if nz < MIN_SLICES or extent < MIN_Z_EXTENT_MM:
            raise _FailedError(f"{nz} slices covering {extent:.0f} mm: a chest CT needs at least "
                          f"{MIN_SLICES} slices and {MIN_Z_EXTENT_MM:.0f} mm")
        problem = axial_problem(series)
        if problem is not None:
            raise _FailedError(problem)

    def _scorer(self, device: str, notes: list[str]) -> CandidateScorer | None:
        if not self.use_scorer:
            return None
        try:
            from cad_node.models import load_bundle
        except ImportError as exc:  # models package not installed
            notes.append(f"candidate scorer unavailable ({exc}): classical score only")
            return None
        try:
            bundle = load_bundle(SCORER_BUNDLE, self.models_dir)
        except FileNotFoundError:
            notes.append(f"model bundle {SCORER_BUNDLE!r} not installed: classical score only")
            return None
        from cad_node.models.scorer import CandidateScorer  # imports torch: only when needed

        # One intra-op thread on CPU: scoring ~300 patches takes ~0.3 s on one
        # thread, while two threads competing with the SCP and the other stages
        # on a 2-core host measured 5-10x slower (docs/benchmarks.md, Training).
        return CandidateScorer(bundle, device=device, threads=1 if device == "cpu" else None)

    @staticmethod
    def _harmonised(series: LoadedSeries, scorer: CandidateScorer | None,
                    notes: list[str]) -> LoadedSeries:
        """``series`` harmonised to the scorer's training slice profile (if it asks)."""
        train_mm = None if scorer is None else scorer.spec.harmonise_slice_thickness_mm
        out, plan = harmonise_series(series, train_mm)
        if plan.note is not None:
            notes.append(plan.note)
            log.info("series %s: %s", series.series_instance_uid, plan.note)
        return out

    def run_detailed(self, series: LoadedSeries, *, device: str = "cpu",
                        progress: ProgressCallback | None = None) -> CtChestRun:
        """Like :meth:`run`, also returning lungs, candidates and stage timings."""
        clock = StageClock(progress)
        report, lap = clock.report, clock.lap
        notes: list[str] = []
        try:
            report("checking input", 0.0)
            self._check_input(series)
            scorer = self._scorer(device, notes)
            lap("scorer load")
            series = self._harmonised(series, scorer, notes)
            lap("harmonisation")
            report("segmenting lungs", 0.05)
            try:
                lungs = segment_lungs(series.image)
            except LungSegmentationError as exc:
                raise _FailedError(f"lung segmentation failed: {exc}") from None
            notes += lungs.notes
            lap("lungs")
            report("finding candidates", 0.35)
            lung_mask = lungs.lungs
            cands = generate_candidates(series.image, lung_mask, work_hu=lungs.work_hu,
                                        work_lung=lungs.work_lungs)
            lap("candidates")
        except _FailedError as exc:
            return CtChestRun(result=self._fail(series, str(exc)), timings_s=clock.timings_s,
                              cpu_s=clock.cpu_s)

        report("scoring candidates", 0.55)
        diam = np.array([c.scale_mm for c in cands])
        feats = candidate_features(series.image, lung_mask, cands)
        prob = classical_probability(feats, diam) if cands else np.zeros(0)
        identity = _classical_identity()
        threshold = CLASSICAL_OPERATING_THRESHOLD
        if scorer is not None:
            identity = scorer.identity
            if scorer.operating_threshold is not None:
                # chosen by cad-train from the rule stated in the bundle's model card
                threshold = float(scorer.operating_threshold)
            else:
                # a candidate exactly at both operating points lands exactly on this one
                threshold = float(np.sqrt(CLASSICAL_OPERATING_THRESHOLD * float(scorer.threshold)))
            if cands:
                cnn = self._cnn_probability(scorer, series.image, lung_mask, cands)
                prob = np.sqrt(prob * np.clip(cnn, 0.0, 1.0))
        notes.append(f"operating threshold {threshold:g} "
                     f"({'classical x CNN' if scorer is not None else 'classical score'})")
        lap("scoring")

        report("characterising nodules", 0.75)
        findings, _ = self._characterise(series, lungs, cands, feats, diam, prob)
        lap("characterisation")
        report("risk scores", 0.95)
        result = self._assemble(series, lungs, findings, threshold, identity, notes)
        lap("assembly")
        report("done", 1.0)
        return CtChestRun(result=result, lungs=lungs, candidates=cands, probabilities=prob,
                          timings_s=clock.timings_s, cpu_s=clock.cpu_s)

    @staticmethod
    def _cnn_probability(scorer: CandidateScorer, image: sitk.Image,
                         lung_mask: npt.NDArray[np.bool_],
                         cands: list[Candidate]) -> npt.NDArray[np.float64]:
        """The scorer's probability, fused with the context features when the bundle says so.

        A bundle with ``output.context_fusion`` gets
        :class:`~.features.ContextFusion` of its logits and
        :func:`~.features.context_features`; any other bundle its sigmoid.
        """
        centers = np.array([c.center_mm for c in cands])
        record = scorer.context_fusion
        if record is None:
            return scorer.score(image, centers)
        from cad_node.pipelines.ct_chest.features import ContextFusion, context_features

        fusion = ContextFusion.from_mapping(record)
        return fusion.probability(scorer.logits(image, centers),
                                  context_features(image, lung_mask, cands))

    def run_variants(
        self, series: LoadedSeries, fusions: Sequence[ContextFusion | None], *,
        device: str = "cpu",
    ) -> list[AnalysisResult]:
        """One result per late fusion of the scorer, sharing every other stage.

        Lungs, candidates, the classical score, the CNN logits and (when any
        fusion is given) the context features are computed once; then for each
        entry of ``fusions`` (``None``: the CNN's sigmoid) the scorer's
        probability, characterisation and assembly run as in :meth:`run`,
        whatever the installed bundle's own fusion is.  ``cad-train`` uses it
        to measure fusion variants on the same scans (the ablation).

        Raises
        ------
        ValueError
            No scorer bundle is installed.
        """
        from cad_node.pipelines.ct_chest.features import context_features

        notes: list[str] = []
        try:
            self._check_input(series)
            scorer = self._scorer(device, notes)
            series = self._harmonised(series, scorer, notes)
            try:
                lungs = segment_lungs(series.image)
            except LungSegmentationError as exc:
                raise _FailedError(f"lung segmentation failed: {exc}") from None
            cands = generate_candidates(series.image, lungs.lungs, work_hu=lungs.work_hu,
                                        work_lung=lungs.work_lungs)
        except _FailedError as exc:
            return [self._fail(series, str(exc)) for _ in fusions]
        if scorer is None:
            raise ValueError(f"run_variants needs a {SCORER_BUNDLE!r} bundle")
        diam = np.array([c.scale_mm for c in cands])
        feats = candidate_features(series.image, lungs.lungs, cands)
        classical = classical_probability(feats, diam) if cands else np.zeros(0)
        centers = np.array([c.center_mm for c in cands]).reshape(-1, 3)
        logits = scorer.logits(series.image, centers)
        ctx = (context_features(series.image, lungs.lungs, cands)
               if any(f is not None for f in fusions) else np.zeros((len(cands), 0)))
        threshold = (float(scorer.operating_threshold) if scorer.operating_threshold is not None
                     else float(np.sqrt(CLASSICAL_OPERATING_THRESHOLD * scorer.threshold)))
        out: list[AnalysisResult] = []
        for fusion in fusions:
            cnn = (1.0 / (1.0 + np.exp(-logits)) if fusion is None
                   else fusion.probability(logits, ctx))
            prob = np.sqrt(classical * np.clip(cnn, 0.0, 1.0)) if cands else np.zeros(0)
            findings, _ = self._characterise(series, lungs, cands, feats, diam, prob)
            out.append(self._assemble(series, lungs, findings, threshold, scorer.identity,
                                      list(notes)))
        return out

    def _characterise(
        self, series: LoadedSeries, lungs: LungSegmentation, cands: list[Candidate],
        feats: npt.NDArray[np.float64], diam: npt.NDArray[np.float64],
        prob: npt.NDArray[np.float64],
    ) -> tuple[list[tuple[float, Candidate, NoduleMeasurement]], int]:
        arr = sitk.GetArrayViewFromImage(series.image)
        spacing = tuple(float(s) for s in series.image.GetSpacing()[::-1])
        both = lungs.lungs
        order = np.argsort(-prob, kind="stable")[:CHARACTERISE_TOP]
        scored: list[tuple[float, Candidate, NoduleMeasurement]] = []
        for i in order:
            if prob[i] < MIN_REPORT_PROBABILITY:
                break
            m = characterise_nodule(arr, both, cands[i].center_index, cands[i].scale_mm,
                                    spacing)  # type: ignore[arg-type]
            if m is None:
                continue
            elong = np.array([m.long_axis_mm / max(m.short_axis_mm, 1e-3)])
            p = float(prob[i] * classical_probability(feats[i:i + 1], diam[i:i + 1], elong)[0]
                      / classical_probability(feats[i:i + 1], diam[i:i + 1])[0])
            scored.append((p, cands[i], m))
        scored.sort(key=lambda s: -s[0])
        kept: list[tuple[float, Candidate, NoduleMeasurement]] = []
        for p, c, m in scored:
            centre = index_to_lps(series.image, m.center_index)
            clash = any(
                np.linalg.norm(centre - index_to_lps(series.image, km.center_index))
                < max(m.long_axis_mm, km.long_axis_mm) / 2.0
                for _, _, km in kept
            )
            if not clash and p >= MIN_REPORT_PROBABILITY:
                kept.append((p, c, m))
            if len(kept) >= self.max_findings:
                break
        return kept, len(scored)

    def _assemble(
        self, series: LoadedSeries, lungs: LungSegmentation,
        kept: list[tuple[float, Candidate, NoduleMeasurement]], threshold: float,
        identity: ModelIdentity, notes: list[str],
    ) -> AnalysisResult:
        uids = series.sop_instance_uids
        rows, cols = series.shape[1:]
        ds0 = series.datasets[0]
        age = parse_age(ds0)
        sex = str(ds0.get("PatientSex", "") or "").upper()
        female = True if sex == "F" else False if sex == "M" else None
        n_nodules = max(1, sum(1 for p, _, _ in kept if p >= threshold))
        findings: list[Finding] = []
        missing: set[str] = set()
        rads_inputs: list[NoduleForRads] = []
        for rank, (p, _c, m) in enumerate(kept, start=1):
            centre = index_to_lps(series.image, m.center_index)
            ci = tuple(round(v) for v in m.center_index)
            if lungs.left[ci] != lungs.right[ci]:
                site = FindingSite.LEFT_LUNG if lungs.left[ci] else FindingSite.RIGHT_LUNG
            else:
                lx = index_to_lps(series.image, np.argwhere(lungs.work_left).mean(0)
                                  * lungs.grid.factors)[0]
                rx = index_to_lps(series.image, np.argwhere(lungs.work_right).mean(0)
                                  * lungs.grid.factors)[0]
                site = (FindingSite.LEFT_LUNG if abs(centre[0] - lx) < abs(centre[0] - rx)
                        else FindingSite.RIGHT_LUNG)
            brock = brock_probability(BrockInputs(
                size_mm=m.long_axis_mm, nodule_type=m.nodule_type, nodule_count=n_nodules,
                age_years=age, female=female))
            missing.update(brock.missing)
            full = np.zeros((m.mask.shape[0], rows, cols), dtype=bool)
            z0, y0, x0 = m.offset
            full[:, y0:y0 + m.mask.shape[1], x0:x0 + m.mask.shape[2]] = m.mask
            findings.append(Finding(
                tracking_id=f"Nodule {rank}",
                finding_type=FindingType.NODULE,
                site=site,
                center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                long_axis_mm=round(m.long_axis_mm, 1),
                short_axis_mm=round(m.short_axis_mm, 1),
                volume_mm3=round(m.volume_mm3, 1),
                mean_hu=round(m.mean_hu, 1),
                probability=round(min(max(p, 0.0), 1.0), 4),
                nodule_type=m.nodule_type,
                malignancy_probability=round(brock.probability, 4),
                mask=ImageMask(full, tuple(uids[z0:z0 + m.mask.shape[0]])),
            ))
            if p >= threshold:
                rads_inputs.append(NoduleForRads(m.mean_diameter_mm, m.nodule_type,
                                                 m.solid_mean_diameter_mm))
        if findings:
            notes.append(
                "Brock (McWilliams 2013 full model) computed without: "
                + ", ".join(sorted(missing)) + " (unknown inputs set to reference values)"
            )
            if "patient age" in missing:
                notes.append("patient age missing: Brock computed without age")
            if "patient sex" in missing:
                notes.append("patient sex missing: Brock computed without sex")
        notes.append("lobes not segmented: findings located by lung side only")
        measurements = dict(lungs.volumes_ml)
        measurements["nodule_count"] = float(len(rads_inputs))
        measurements["operating_threshold"] = threshold
        return AnalysisResult(
            pipeline=self.name,
            status=AnalysisStatus.COMPLETED,
            series_instance_uid=series.series_instance_uid,
            findings=findings,
            organ_masks={
                FindingSite.LEFT_LUNG: ImageMask(lungs.left, uids),
                FindingSite.RIGHT_LUNG: ImageMask(lungs.right, uids),
            },
            measurements=measurements,
            qualitative={"lung_rads": lung_rads_category(rads_inputs).value},
            notes=notes,
            model=identity,
        )
