"""Exponential backoff with jitter over a bounded horizon."""

from __future__ import annotations

import random
from dataclasses import dataclass

from cad_node.config import RetryConfig

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a retryable send failure, and when to give up.

    The ``n``-th retry (``n >= 1``) waits
    ``min(initial * multiplier**(n-1), max_interval)`` seconds, scaled by a
    uniform random factor in ``[1 - jitter, 1 + jitter]``.  Retries stop (the
    job is ``dead``) once ``horizon`` seconds have passed since the first
    failure; a retry that would fall after the horizon is moved onto it, so
    the last attempt happens at the horizon.
    """

    initial_s: float
    max_interval_s: float
    multiplier: float
    jitter: float
    horizon_s: float

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        """Build the policy from ``jobs.retry``."""
        return cls(cfg.initial_s, cfg.max_interval_s, cfg.multiplier, cfg.jitter, cfg.horizon_s)

    def base_delay(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based), without jitter."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, not {attempt}")
        exponent = min(attempt - 1, 64)  # avoid float overflow on absurd counts
        return float(min(self.initial_s * self.multiplier**exponent, self.max_interval_s))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` with jitter applied."""
        r = rng if rng is not None else random.Random()
        factor = 1.0 + self.jitter * (2.0 * r.random() - 1.0)
        return max(0.0, self.base_delay(attempt) * factor)

    def next_retry(
        self, attempt: int, first_failure_at: float, now: float, rng: random.Random | None = None
    ) -> float | None:
        """Time of the next retry, or None when the horizon is exhausted.

        Parameters
        ----------
        attempt : int
            Number of failed attempts so far (>= 1).
        first_failure_at : float
            Epoch seconds of the first failure of this send.
        now : float
            Current epoch seconds.
        rng : random.Random, optional
            Source of jitter.

        Returns
        -------
        float or None
            Epoch seconds at which to retry, None to give up.
        """
        deadline = first_failure_at + self.horizon_s
        if now >= deadline:
            return None
        return min(now + self.delay(attempt, rng), deadline)
