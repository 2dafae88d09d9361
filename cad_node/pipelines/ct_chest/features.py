# mypy: disallow-untyped-calls=False
"""Context features of nodule candidates, and the late fusion that uses them.

Three measurements per candidate, each saying how much a candidate looks like
part of the vessel tree rather than a nodule (:data:`CONTEXT_FEATURES`):

``vesselness``
    Frangi vesselness at the candidate's centre and scale
    (:func:`~.candidates.candidate_vesselness`): ~1 for a tube, ~0.1 for a
    sphere.
``mediastinum_mm``
    Distance (mm) from the candidate's centre to the mediastinum, the
    non-lung tissue lying between the two lungs (:func:`mediastinum_mask`).
    The hila, where the pulmonary vessels and bronchi leave the mediastinum,
    lie at small distances: that is where vessel bifurcations and
    bronchovascular bundles look most like nodules.
``vessel_branches``
    Connectivity to the vessel tree: the number of separate dense structures
    (> :data:`~.candidates.DENSE_HU`, inside the lung) that cross a shell
    around the candidate, from 1.5 radii out to 1.5 radii + :data:`BRANCH_REACH_MM`
    (:func:`vessel_branches`).  A vessel segment has 2, a bifurcation 3 or
    more, an isolated nodule 0, a juxtavascular nodule 1-2.

Late fusion (:class:`ContextFusion`): a logistic regression on the CNN
scorer's logit and these features, fitted by ``cad-train`` on data the CNN
did not train on and stored in the scorer bundle's manifest.  Without a
fusion in the bundle the pipeline never computes these features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - conventional alias
from scipy import ndimage as ndi

from cad_node.pipelines.ct_chest.candidates import (
    DENSE_HU,
    Candidate,
    candidate_vesselness,
    neighbourhood,
)

__all__ = [
    "BRANCH_REACH_MM",
    "CONTEXT_FEATURES",
    "MEDIASTINUM_GRID_MM",
    "ContextFusion",
    "context_features",
    "mediastinum_distance_mm",
    "mediastinum_mask",
    "vessel_branches",
]

#: Names of the columns of :func:`context_features`, in order.
CONTEXT_FEATURES: tuple[str, ...] = ("vesselness", "mediastinum_mm", "vessel_branches")
#: The mediastinum is found on a grid of about this spacing (mm).
MEDIASTINUM_GRID_MM = 3.0
#: Smallest mediastinum (ml): smaller gaps between lung voxels are not one.
MEDIASTINUM_MIN_ML = 20.0
#: Width (mm) of the shell in which :func:`vessel_branches` counts structures.
BRANCH_REACH_MM = 5.0


def mediastinum_mask(
    lung: npt.NDArray[np.bool_], step: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """The mediastinum on the grid ``lung[::step[0], ::step[1], ::step[2]]``.

    Non-lung voxels that lie, along their image row (the patient's left-right
    axis), between two lung voxels; the largest connected such region, if it
    holds at least :data:`MEDIASTINUM_MIN_ML` (checked by the caller's
    spacing: here only the largest region is kept).  Empty when the lungs
    are not both present.
    """
    sub = np.ascontiguousarray(lung[:: step[0], :: step[1], :: step[2]])
    seen_left = np.maximum.accumulate(sub, axis=2)
    seen_right = np.maximum.accumulate(sub[:, :, ::-1], axis=2)[:, :, ::-1]
    between = seen_left & seen_right & ~sub
    lab, n = ndi.label(between)
    if n == 0:
        return np.zeros_like(sub)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    out: npt.NDArray[np.bool_] = lab == int(np.argmax(sizes))
    return out


def mediastinum_distance_mm(
    lung: npt.NDArray[np.bool_],
    spacing_zyx: Sequence[float],
    centers_index: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Distance (mm) from each ``(z, y, x)`` source index to the mediastinum.

    0 inside it; a large value (1000 mm) when no mediastinum is found (a
    one-lung or non-chest volume).
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    step = tuple(max(1, round(MEDIASTINUM_GRID_MM / s)) for s in spacing)
    med = mediastinum_mask(lung, step)
    coarse = spacing * np.asarray(step)
    if centers_index.size == 0:
        return np.zeros(0)
    if med.sum() * float(np.prod(coarse)) < MEDIASTINUM_MIN_ML * 1000.0:
        return np.full(centers_index.shape[0], 1000.0)
    dist = ndi.distance_transform_edt(~med, sampling=coarse)
    idx = np.rint(np.asarray(centers_index, dtype=np.float64) / np.asarray(step)).astype(int)
    idx = np.clip(idx, 0, np.asarray(med.shape) - 1)
    out: npt.NDArray[np.float64] = np.asarray(dist[idx[:, 0], idx[:, 1], idx[:, 2]],
                                              dtype=np.float64)
    return out


def vessel_branches(
    image: sitk.Image, lung: npt.NDArray[np.bool_], candidates: Sequence[Candidate]
) -> npt.NDArray[np.float64]:
    """Dense in-lung structures crossing a shell around each candidate (see module doc).

    The shell runs from 1.5 radii to 1.5 radii + :data:`BRANCH_REACH_MM`; a
    structure counts when it is one connected piece of the dense in-lung
    voxels of the shell touching both its inner and its outer surface.
    """
    arr = sitk.GetArrayViewFromImage(image)
    spacing = np.array(image.GetSpacing()[::-1], dtype=np.float64)
    out = np.zeros(len(candidates))
    for n, cand in enumerate(candidates):
        r_in = 1.5 * max(cand.scale_mm / 2.0, 1.5)
        r_out = r_in + BRANCH_REACH_MM
        half = np.ceil(r_out / spacing).astype(int) + 1
        hood = neighbourhood(arr, spacing, cand.center_index, half)
        patch, dist, in_lung = hood.hu, hood.dist_mm, lung[hood.box]
        shell = (dist >= r_in) & (dist <= r_out)
        dense = (patch > DENSE_HU) & in_lung & shell
        lab, k = ndi.label(dense)
        if k == 0:
            continue
        tol = float(spacing.max())
        inner = np.unique(lab[dense & (dist < r_in + tol)])
        outer = np.unique(lab[dense & (dist > r_out - tol)])
        out[n] = float(len(np.intersect1d(inner[inner > 0], outer[outer > 0])))
    return out


def context_features(
    image: sitk.Image, lung: npt.NDArray[np.bool_], candidates: Sequence[Candidate]
) -> npt.NDArray[np.float64]:
    """``(N, 3)`` context features, columns :data:`CONTEXT_FEATURES`."""
    if not candidates:
        return np.zeros((0, len(CONTEXT_FEATURES)))
    cl = list(candidates)
    centers = np.asarray([c.center_index for c in cl], dtype=np.float64)
    spacing = image.GetSpacing()[::-1]
    return np.column_stack([
        candidate_vesselness(image, cl),
        mediastinum_distance_mm(lung, spacing, centers),
        vessel_branches(image, lung, cl),
    ])


#: Feature transforms of the fusion (so that a linear model suits them):
#: distances are capped at 60 mm and scaled to ~[0, 3], branch counts capped at 4.
def _design(logit: npt.NDArray[np.float64], feats: npt.NDArray[np.float64],
            used: Sequence[str]) -> npt.NDArray[np.float64]:
    cols = [np.clip(logit, -20.0, 20.0)]
    for name in used:
        v = feats[:, CONTEXT_FEATURES.index(name)]
        if name == "mediastinum_mm":
            v = np.minimum(v, 60.0) / 20.0
        elif name == "vessel_branches":
            v = np.minimum(v, 4.0)
        cols.append(v)
    return np.column_stack(cols)


@dataclass(frozen=True)
class ContextFusion:
    """Logistic late fusion: ``sigmoid(b + w0 * logit + sum_i w_i * f_i(feature_i))``.

    ``features`` names the used columns of :data:`CONTEXT_FEATURES` (their
    transforms: distance capped at 60 mm and divided by 20, branch count
    capped at 4, vesselness as is); ``weights`` has one entry for the CNN
    logit followed by one per feature.
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]
    intercept: float

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in CONTEXT_FEATURES]
        if unknown:
            raise ValueError(f"unknown context feature(s) {unknown}; known: {CONTEXT_FEATURES}")
        if len(self.weights) != 1 + len(self.features):
            raise ValueError(f"context fusion needs {1 + len(self.features)} weights "
                             f"(logit + features), got {len(self.weights)}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> ContextFusion:
        """From the manifest's ``output.context_fusion`` record."""
        try:
            feats = tuple(str(f) for f in m["features"])  # type: ignore[attr-defined]
            weights = tuple(float(w) for w in m["weights"])  # type: ignore[attr-defined]
            intercept = float(m["intercept"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid context_fusion record: {exc}") from None
        return cls(feats, weights, intercept)

    def to_mapping(self) -> dict[str, object]:
        """The manifest record (inverse of :meth:`from_mapping`)."""
        return {"features": list(self.features), "weights": list(self.weights),
                "intercept": self.intercept}

    def probability(
        self, logit: npt.NDArray[np.float64], feats: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """Fused probability from the CNN logits ``(N,)`` and :func:`context_features`."""
        z = _design(np.asarray(logit, dtype=np.float64), feats, self.features) @ np.asarray(
            self.weights) + self.intercept
        out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))
        return out

    @classmethod
    def fit(
        cls, logit: npt.NDArray[np.float64], feats: npt.NDArray[np.float64],
        labels: npt.NDArray[np.float64], features: Sequence[str], l2: float = 1e-2,
    ) -> ContextFusion:
        """Fit by L2-regularised maximum likelihood (classes weighted equally).

        ``l2`` penalises the feature weights (not the intercept, not the
        logit's weight), per sample.
        """
        from scipy.optimize import minimize

        x = _design(np.asarray(logit, dtype=np.float64), feats, features)
        y = np.asarray(labels, dtype=np.float64)
        n_pos, n_neg = max(float(y.sum()), 1.0), max(float((1 - y).sum()), 1.0)
        sw = np.where(y > 0.5, 0.5 / n_pos, 0.5 / n_neg)
        pen = np.r_[0.0, np.ones(x.shape[1] - 1)] * l2

        def nll(theta: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
            w, b = theta[:-1], theta[-1]
            z = x @ w + b
            p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
            loss = float(np.sum(sw * (np.logaddexp(0, z) - y * z)) + 0.5 * np.sum(pen * w**2))
            g = sw * (p - y)
            grad = np.r_[x.T @ g + pen * w, g.sum()]
            return loss, grad

        theta0 = np.r_[1.0, np.zeros(x.shape[1] - 1), 0.0]
        res = minimize(nll, theta0, jac=True, method="L-BFGS-B")
        w = res.x
        return cls(tuple(features), tuple(round(float(v), 6) for v in w[:-1]),
                   round(float(w[-1]), 6))
