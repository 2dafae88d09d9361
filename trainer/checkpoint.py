"""Checkpoints of ``cad-train train``: ``last.pt`` (exact resume) and ``final.pt`` (export).

* ``last.pt``, written atomically after every epoch by rank 0: network,
  optimiser, scheduler and GradScaler states, the epoch, the loss history and
  the torch RNG state.  :func:`load_last` restores all of them, so an AMP run
  that resumes continues with the same loss scale as an uninterrupted one.
* ``final.pt``: weights and plain-Python metadata only (bundle identity,
  training data, metrics, provenance, history), loadable with
  ``torch.load(weights_only=True)`` by :mod:`trainer.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily (fast CLI start-up)
    from trainer.loop import TrainState

__all__ = ["bundle_meta", "load_last", "plain", "save_last", "write_final"]


def plain(value: Any) -> Any:
    """JSON round-trip: numpy scalars become floats/ints, tuples lists."""

    def default(o: Any) -> Any:
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.loads(json.dumps(value, default=default))


def bundle_meta(cfg: TrainConfig, operating: dict[str, Any] | None = None,
                context_fusion: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle identity recorded in ``final.pt``.

    ``operating``: the ``operating_point`` metrics of :mod:`trainer.operating_point`,
    whose threshold and rule become the bundle's ``operating_threshold`` and
    ``operating_rule``; ``context_fusion``: the fitted fusion record
    (:mod:`trainer.context`), the bundle's ``context_fusion``.
    """
    output: dict[str, Any] = {
        "kind": "logit",
        "positive_class": "nodule",
        "threshold": cfg.bundle.threshold,
    }
    if operating and "threshold" in operating:
        output["operating_threshold"] = operating["threshold"]
        output["operating_rule"] = operating.get("rule")
    if context_fusion is not None:
        output["context_fusion"] = dict(context_fusion)
    return {
        "name": cfg.bundle.name,
        "version": cfg.bundle.version,
        "task": cfg.bundle.task,
        "architecture": dict(cfg.architecture),
        "input": cfg.input.model_dump(mode="json", exclude_none=True),
        "output": output,
    }


def save_last(path: Path, state: TrainState, epoch: int, cfg: TrainConfig) -> None:
    """Write ``last.pt`` atomically (a ``.tmp`` beside it, then a rename)."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": state.net.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
            "epoch": epoch,
            "history": state.history,
            "torch_rng": torch.get_rng_state(),
            "config": cfg.model_dump(mode="json"),
        },
        tmp,
    )
    tmp.replace(path)


def load_last(path: Path, state: TrainState) -> None:
    """Restore ``state`` from ``last.pt``: weights, optimiser, scheduler, scaler, RNG.

    Sets ``state.start_epoch`` to the epoch after the saved one.  A
    checkpoint written before the GradScaler was saved leaves the scaler as
    constructed (exact only when AMP was off, as it always is on CPU).
    """
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=False)
    state.net.load_state_dict(ck["model"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.scheduler.load_state_dict(ck["scheduler"])
    if "scaler" in ck:
        state.scaler.load_state_dict(ck["scaler"])
    state.start_epoch = int(ck["epoch"]) + 1
    state.history = list(ck["history"])
    torch.set_rng_state(ck["torch_rng"])


def write_final(
    out_dir: Path,
    state: TrainState,
    cfg: TrainConfig,
    *,
    training_data: dict[str, Any],
    metrics: dict[str, Any],
    provenance: dict[str, Any],
) -> Path:
    """Write ``final.pt``, ``metrics.json`` and ``MODEL_CARD.md``; return ``final.pt``."""
    import torch

    from trainer.export import render_model_card

    metrics = plain(metrics)
    training_data = plain(training_data)
    provenance = plain(provenance)
    final = out_dir / "final.pt"
    # Plain Python types only, so export can load it with weights_only=True.
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in state.net.state_dict().items()},
            "bundle": plain(bundle_meta(cfg, metrics.get("operating_point"),
                                        (metrics.get("context_fusion") or {}).get("record"))),
            "training_data": training_data,
            "metrics": metrics,
            "provenance": provenance,
            "history": plain(state.history),
        },
        final,
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out_dir / "MODEL_CARD.md").write_text(
        render_model_card(cfg, training_data, metrics, provenance), encoding="utf-8"
    )
    return final
