"""Stage reporting and timing shared by the pipelines' ``run_detailed`` methods.

A pipeline's run is a sequence of named stages.  :class:`StageClock` forwards
``progress(stage, fraction)`` to the caller's callback (when there is one) and
records the wall time (and process CPU time) each stage took, so that the
pipelines' ``run_detailed`` results and the benchmarks read the same figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["StageClock"]


class StageClock:
    """Progress reporting plus per-stage wall and CPU seconds.

    Parameters
    ----------
    progress : callable, optional
        ``progress(stage, fraction)`` (the pipeline contract's callback,
        :data:`cad_node.pipelines.ProgressCallback`); ``None`` reports nothing.

    Attributes
    ----------
    timings_s : dict of str to float
        Wall seconds per stage, in the order the stages ended.
    cpu_s : dict of str to float
        Process CPU seconds (all threads) per stage, same keys.

    Notes
    -----
    The clock starts when the object is made; each :meth:`lap` closes the
    stage that ran since the previous lap (or since the start).
    """

    def __init__(self, progress: Callable[[str, float], None] | None = None) -> None:
        self._progress = progress
        self.timings_s: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def report(self, stage: str, fraction: float) -> None:
        """Pass ``(stage, fraction)`` to the callback; ``fraction`` is in ``[0, 1]``.

        Raises
        ------
        ValueError
            ``fraction`` outside ``[0, 1]`` (a programming error).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction {fraction!r} of stage {stage!r} "
                             "is outside [0, 1]")
        if self._progress is not None:
            self._progress(stage, fraction)

    def lap(self, stage: str) -> None:
        """Record the wall and CPU seconds since the previous lap as ``stage``."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings_s[stage] = wall - self._wall
        self.cpu_s[stage] = cpu - self._cpu
        self._wall, self._cpu = wall, cpu
