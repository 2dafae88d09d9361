"""The training loop of ``cad-train train``: seeding, DDP sharding, augmentation, epochs.

An engine in the manner of MONAI's ``engines/``: :class:`TrainState` holds
what one run updates (network, optimiser, scheduler, GradScaler, history);
:func:`run_epoch` does one epoch over a rank's shard; checkpointing
(:mod:`trainer.checkpoint`) and evaluation (:mod:`trainer.heldout`) are
separate parts that the orchestration in :mod:`trainer.train` calls between
epochs and at the end.

Equal steps on every rank
-------------------------
:func:`shard_indices` splits each epoch's permutation the way
``torch.utils.data.DistributedSampler(drop_last=True)`` does: the tail that
does not divide by the world size is dropped, then rank ``r`` takes every
``world``-th index from ``r``.  Every rank therefore holds the same number of
samples, runs the same number of batches of the same sizes, and skips the
same (too small) last batch, so the DDP all-reduces always pair up.  With one
process nothing is dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from rich.progress import Progress

from trainer.config import AugmentConfig

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily (fast CLI start-up)
    import torch

__all__ = [
    "EpochResult",
    "TrainState",
    "augmenter",
    "distributed",
    "run_epoch",
    "seed_all",
    "shard_indices",
    "steps_per_epoch",
]

#: Batches smaller than this are skipped (BatchNorm needs two samples).
MIN_BATCH = 2


@contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """Initialise torch.distributed when launched by torchrun (``WORLD_SIZE > 1``).

    Yields ``(rank, world_size)``; ``gloo`` on CPU, ``nccl`` on CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """Seed torch, numpy and MONAI (:func:`monai.utils.set_determinism`)."""
    import torch
    from monai.utils.misc import set_determinism

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def augmenter(cfg: AugmentConfig, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """MONAI augmentation of a ``(B, 1, z, y, x)`` batch, seeded (one per rank and epoch)."""
    import torch
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.array import (
        RandGaussianNoise,
        RandGaussianSharpen,
        RandGaussianSmooth,
        RandScaleIntensity,
        RandShiftIntensity,
    )
    from monai.transforms.spatial.array import RandAxisFlip, RandRotate90, RandZoom

    steps: list[Any] = [
        RandAxisFlip(prob=cfg.flip_prob),
        RandRotate90(prob=cfg.rot90_prob, max_k=3, spatial_axes=(1, 2)),
        RandScaleIntensity(factors=cfg.intensity_scale, prob=cfg.intensity_prob),
        RandShiftIntensity(offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
    ]
    # Scanner appearance (kernel, noise, voxel size); appended only when on, so
    # a config without them draws exactly the random numbers it always did.
    if cfg.blur_prob > 0:
        steps.append(RandGaussianSmooth(sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma,
                                        sigma_z=cfg.blur_sigma, prob=cfg.blur_prob))
    if cfg.sharpen_prob > 0:
        steps.append(RandGaussianSharpen(sigma1_x=(0.4, 0.8), sigma1_y=(0.4, 0.8),
                                         sigma1_z=(0.4, 0.8), sigma2_x=0.5, sigma2_y=0.5,
                                         sigma2_z=0.5, alpha=(0.5, 2.0), prob=cfg.sharpen_prob))
    if cfg.zoom_prob > 0:
        steps.append(RandZoom(prob=cfg.zoom_prob, min_zoom=cfg.zoom_range[0],
                              max_zoom=cfg.zoom_range[1], mode="trilinear",
                              padding_mode="edge", keep_size=True))
    if cfg.noise_prob > 0:
        steps.append(RandGaussianNoise(prob=cfg.noise_prob, std=cfg.noise_std))
    tf = Compose(steps)
    tf.set_random_state(seed=seed)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(tf(sample)) for sample in batch])

    return apply


def shard_indices(n: int, seed: int, rank: int, world: int) -> npt.NDArray[np.int64]:
    """This rank's indices of an epoch: ``DistributedSampler(drop_last=True)`` semantics.

    The permutation comes from ``numpy.random.default_rng(seed)``; with
    ``world == 1`` it is returned whole.
    """
    order = np.random.default_rng(seed).permutation(n)
    per_rank = n // world
    out: npt.NDArray[np.int64] = order[: per_rank * world][rank::world]
    return out


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Batches per rank and epoch (the last one may be partial)."""
    return max(1, math.ceil((n // world) / batch_size))


@dataclass
class TrainState:
    """What one training run updates, and what a checkpoint restores."""

    net: torch.nn.Module
    model: torch.nn.Module  # ``net``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    use_amp: bool
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    #: Optimizer steps run by this process in this invocation.
    steps: int = 0


@dataclass(frozen=True)
class EpochResult:
    """One epoch on one rank."""

    mean_loss: float
    steps: int
    samples: int


def run_epoch(
    state: TrainState,
    x_all: npt.NDArray[Any],
    y_all: npt.NDArray[np.float32],
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    augment: AugmentConfig,
    rank: int,
    world: int,
    dev: torch.device,
    progress: Progress | None = None,
) -> EpochResult:
    """Train one epoch on this rank's shard; the same number of steps on every rank.

    Data order and augmentation are seeded from ``seed`` and ``epoch`` (and
    the rank), so a resumed run repeats exactly what an uninterrupted one did.
    """
    import torch

    n = x_all.shape[0]
    aug = augmenter(augment, seed + 7919 * rank + 104729 * epoch)
    order = shard_indices(n, seed + 1000 * epoch, rank, world)
    n_steps = steps_per_epoch(n, world, batch_size)
    state.model.train()
    total, batches, seen = 0.0, 0, 0
    task = progress.add_task(f"epoch {epoch + 1}", total=n_steps) if progress else None
    for b in range(n_steps):
        idx = np.sort(order[b * batch_size : (b + 1) * batch_size])
        if idx.size >= MIN_BATCH:
            xb = aug(torch.from_numpy(x_all[idx].astype(np.float32))[:, None]).to(dev)
            yb = torch.from_numpy(y_all[idx]).to(dev)
            state.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, enabled=state.use_amp):
                loss = state.loss_fn(state.model(xb).float(), yb)
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.scheduler.step()
            total += float(loss.detach())
            batches += 1
            seen += int(idx.size)
        if progress is not None and task is not None:
            progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
    state.steps += batches
    return EpochResult(mean_loss=total / max(batches, 1), steps=batches, samples=seen)
