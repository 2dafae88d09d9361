"""Compute-device selection: the one place that maps ``auto``/``cpu``/``cuda[:N]``.

Used by the job runner (``jobs.device``), the candidate scorer and the
trainer (``cad-train train --device``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily
    import torch

__all__ = ["resolve_device", "torch_device"]

LOG = logging.getLogger(__name__)


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken CUDA runtime
        return False


def resolve_device(device: str, *, fallback: bool = True) -> str:
    """Resolve a device name: ``auto`` -> ``cuda`` when available, else ``cpu``.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    fallback : bool
        A CUDA device asked for on a host without CUDA falls back to ``cpu``
        with a warning (so a worker always starts); with ``False`` it raises.

    Raises
    ------
    ValueError
        CUDA requested, not available and ``fallback`` is false.
    """
    has_cuda = _has_cuda()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        if not fallback:
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        LOG.warning("device %s requested but CUDA is not available: using cpu", device)
        return "cpu"
    return device


def torch_device(device: str, *, fallback: bool = False) -> torch.device:
    """:func:`resolve_device` as a ``torch.device`` (no fallback by default).

    Raises
    ------
    ValueError
        CUDA requested but not available (unless ``fallback``).
    """
    import torch

    return torch.device(resolve_device(device, fallback=fallback))
