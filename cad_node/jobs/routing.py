"""Routing: which pipelines run on which series of a complete study.

Every rule of :class:`cad_node.config.RoutingConfig` is evaluated in order on
the series of the study (headers only, :func:`cad_node.imaging.group_series`);
each series the rule selects (:func:`cad_node.imaging.select_series`) becomes
one :class:`RouteStep`.  A study no rule matches yields an empty plan whose
``reasons`` say, per series, why it was not used; the job then ends in
``failed`` with the error ``"not routed: <reasons>"`` (:data:`NOT_ROUTED`, see
:mod:`cad_node.jobs.runner`), shown as "not routed" by ``cad-node status``,
the web page and the ``cad_node_jobs_not_routed`` metric.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from cad_node.config import RoutingConfig
from cad_node.imaging import SeriesInfo, group_series, select_series

__all__ = ["NOT_ROUTED", "RouteStep", "RoutingPlan", "not_routed_reason", "plan_routes"]

#: Prefix of the error of a job no routing rule matched (status, web page, metrics).
NOT_ROUTED = "not routed"


def not_routed_reason(error: str | None) -> str | None:
    """The reason a job was not routed, or None when its ``error`` says something else."""
    prefix = NOT_ROUTED + ": "
    if error is not None and error.startswith(prefix):
        return error[len(prefix):]
    return None


@dataclass(frozen=True)
class RouteStep:
    """Run ``pipeline`` (by rule ``rule``) on one series."""

    rule: str
    pipeline: str
    series: SeriesInfo

    @property
    def paths(self) -> list[Path]:
        """The series' instance files."""
        return [Path(os.fspath(s)) for s in self.series.sources if not isinstance(s, Dataset)]


@dataclass
class RoutingPlan:
    """The steps of a job and why other series were not used."""

    steps: list[RouteStep] = field(default_factory=list)
    #: Series Instance UID -> list of reasons (one per rule that rejected it).
    reasons: dict[str, list[str]] = field(default_factory=dict)
    #: Files that are not usable image instances, with the reason.
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def pipelines(self) -> list[str]:
        """Pipeline names, in rule order, one per step."""
        return [s.pipeline for s in self.steps]


def plan_routes(paths: Iterable[str | os.PathLike[str]], routing: RoutingConfig) -> RoutingPlan:
    """Apply the routing rules to the instances of one study.

    Parameters
    ----------
    paths : iterable of path-like
        The study's stored instance files.
    routing : RoutingConfig
        Rules, evaluated in order; every selected series of every rule is a step.

    Returns
    -------
    RoutingPlan
        Steps in rule order; ``reasons`` explains every series left out.
    """
    plan = RoutingPlan()

    def _bad(source: object, reason: str) -> None:
        plan.unreadable[str(source)] = reason

    series = group_series([Path(p) for p in paths], on_error=_bad)
    chosen: set[tuple[str, str]] = set()
    for rule in routing.rules:
        selection = select_series(series, rule)
        for info in selection:
            key = (rule.pipeline, info.series_instance_uid)
            if key in chosen:
                continue
            chosen.add(key)
            plan.steps.append(RouteStep(rule.name, rule.pipeline, info))
        for uid, reason in selection.rejected.items():
            plan.reasons.setdefault(uid, []).append(reason)
    return plan
