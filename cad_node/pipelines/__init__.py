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
from typing import Protocol, TypeVar, runtime_checkable

from cad_node.imaging import LoadedSeries
from cad_node.results.findings import AnalysisResult

__all__ = [
    "PIPELINE_MODULES",
    "Pipeline",
    "ProgressCallback",
    "available_pipelines",
    "get_pipeline",
    "register_pipeline",
]

#: ``progress(stage, fraction)``
ProgressCallback = Callable[[str, float], None]

#: Modules that register pipelines when imported.
PIPELINE_MODULES: list[str] = [
    "cad_node.pipelines.ct_chest.pipeline",
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
        """Analyse one series."""
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
