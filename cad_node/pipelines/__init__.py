"""Analysis pipelines and their registry.

Contract
--------
A pipeline is an object with a ``name`` and a ``run`` method::

    result = get_pipeline("ct-chest").run(series, device="cpu", progress=cb)

* ``series`` is a :class:`cad_node.imaging.LoadedSeries` (already geometry-checked).
* ``run`` never raises for bad *input*: it returns
  ``AnalysisResult(status=FAILED, failure_reason=...)`` with a clear reason
  (wrong modality, not a chest CT, ...).  Programming errors still raise.
* Findings are ranked (most probable first); masks are
  :class:`cad_node.results.findings.ImageMask` aligned by SOP Instance UID.
* ``progress(stage, fraction)`` is called with ``fraction`` in ``[0, 1]``.

A new pipeline is one module that decorates its class with
:func:`register_pipeline`; add the module to :data:`PIPELINE_MODULES` so
:func:`get_pipeline` can import it lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from cad_node.imaging import LoadedSeries
from cad_node.results.findings import AnalysisResult

__all__ = [
    "PIPELINE_MODULES",
    "Pipeline",
    "ProgressCallback",
    "available_pipelines",
    "get_pipeline",
    "load_input",
    "register_pipeline",
]

#: ``progress(stage, fraction)``
ProgressCallback = Callable[[str, float], None]

#: Modules that register pipelines when imported.
PIPELINE_MODULES: list[str] = [
    "cad_node.pipelines.ct_chest.pipeline",
    "cad_node.pipelines.cxr.pipeline",
    "cad_node.pipelines.ct_lesion.pipeline",
]


@runtime_checkable
class Pipeline(Protocol):
    """What the job runner and the CLI may call."""

    name: str

    def run(
        self,
        series: LoadedSeries,
        *,
        device: str = "cpu",
        progress: ProgressCallback | None = None,
    ) -> AnalysisResult:
        """Analyse one series.

        Called by the job runner (:meth:`cad_node.jobs.runner.JobRunner.analyse`)
        and ``cad-node analyze`` once per series a routing rule selected.

        Parameters
        ----------
        series : LoadedSeries
            Loaded by :func:`cad_node.imaging.load_series`, so its geometry has
            passed :mod:`cad_node.imaging.geometry` (one orientation, regular
            slice grid, ``sop_instance_uids[k]`` is slice ``k``).  The pipeline
            may read ``series.image`` (rescaled values, LPS geometry),
            ``series.array``, ``series.sop_instance_uids``, ``series.datasets``
            (headers without pixel data, in slice order), ``series.modality``
            and ``series.notes``; it must not modify them.
        device : str
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (already resolved from
            ``auto`` by the caller).
        progress : callable, optional
            ``progress(stage, fraction)`` with ``fraction`` in ``[0, 1]``;
            called from the pipeline's thread.

        Returns
        -------
        AnalysisResult
            ``series_instance_uid`` is ``series.series_instance_uid``.

            * ``status=COMPLETED``: findings ranked (most probable first), each
              mask an :class:`~cad_node.results.findings.ImageMask` aligned with
              ``series`` by SOP Instance UID; ``model`` names the bundle (the
              result builders refuse a result without it).
            * ``status=FAILED`` with ``failure_reason`` for input the pipeline
              cannot analyse (wrong modality, not a chest CT, too few slices,
              ...): no findings; ``model`` still set so the failure can be
              reported in an SR.

        Raises
        ------
        Exception
            Never for bad *input* (that is ``FAILED``); only for programming
            errors or a broken installation (e.g. a missing model bundle), which
            the job runner records as a job failure.
        """
        ...


_REGISTRY: dict[str, Callable[[], Pipeline]] = {}
_T = TypeVar("_T")


def register_pipeline(name: str) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: register a pipeline class (constructed without arguments) as ``name``."""

    def deco(cls: type[_T]) -> type[_T]:
        if name in _REGISTRY:
            raise ValueError(f"pipeline {name!r} is already registered")
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def _load_modules() -> None:
    for module in PIPELINE_MODULES:
        importlib.import_module(module)


def available_pipelines() -> list[str]:
    """Names of all registered pipelines, sorted."""
    _load_modules()
    return sorted(_REGISTRY)


def get_pipeline(name: str) -> Pipeline:
    """A new instance of the pipeline registered as ``name``.

    Raises
    ------
    KeyError
        No such pipeline; the message lists the available ones.
    """
    _load_modules()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no pipeline named {name!r}; available: {sorted(_REGISTRY)}") from None
    return factory()


def load_input(name: str, series: Any) -> Any:
    """Load a routed series the way pipeline ``name`` reads it.

    A pipeline class with a ``load_input(series)`` static method (e.g. ``cxr``,
    which reads one radiograph and returns a refusal rather than raising)
    loads its own input; every other pipeline gets
    :func:`cad_node.imaging.load_series` (which raises
    :class:`cad_node.imaging.SeriesError` for an unusable series).

    Parameters
    ----------
    name : str
        Registered pipeline name.
    series : SeriesInfo or sequence of path-like
        The routed series.
    """
    _load_modules()
    loader = getattr(_REGISTRY.get(name), "load_input", None)
    if loader is not None:
        return loader(series)
    from cad_node.imaging import load_series

    return load_series(series)
