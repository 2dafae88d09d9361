"""Candidate scoring (false-positive reduction) with a bundle's 3-D CNN.

Contract
--------
* :meth:`CandidateScorer.score` takes a HU image and ``(N, 3)`` patient LPS
  centres and returns ``(N,)`` probabilities in ``[0, 1]``, in input order.
* Patches are sampled around each centre at the bundle's input spacing
  (never resampling the whole volume), windowed, and batched with the
  manifest's batch size.
* The result is deterministic for a given image, centres, bundle and device:
  the network runs in eval mode under :func:`torch.inference_mode`.
* The scorer leaves global torch settings as it found them (``threads``
  applies only while :meth:`CandidateScorer.score` runs).
* A bundle whose input spec has ``tta_flips: 8`` is scored with test-time
  augmentation: each patch in its 8 axis flips, the 8 logits averaged
  (:func:`flip_averaged_logits`); a bundle without the field is scored in one
  pass, exactly as before the field existed.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
import torch

from cad_node.models.bundle import InputSpec, ModelBundle
from cad_node.models.device import torch_device
from cad_node.models.patches import extract_patches

if TYPE_CHECKING:  # pragma: no cover
    from cad_node.results.findings import ModelIdentity

__all__ = ["CandidateScorer", "flip_averaged_logits"]

#: Patch axes ``(z, y, x)`` of an ``(N, C, D, H, W)`` batch.
_SPATIAL_DIMS = (2, 3, 4)


def flip_averaged_logits(network: torch.nn.Module, x: torch.Tensor,
                         flips: int | None) -> torch.Tensor:
    """The network's logits on ``x``, averaged over axis flips when ``flips`` asks.

    Parameters
    ----------
    network : torch.nn.Module
        A scorer in eval mode mapping ``(N, 1, D, H, W)`` to ``(N,)`` logits.
    x : torch.Tensor
        A batch of patches ``(N, 1, D, H, W)``, centred on the candidates
        (the patch grid is symmetric about its centre, so a flip keeps the centre).
    flips : int or None
        ``None`` (or 1): one pass, ``network(x)``.  ``8``: the mean of the logits of
        the 8 patches with z, y and x each flipped or not (the identity included).

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 logits.

    Raises
    ------
    ValueError
        ``flips`` is neither None, 1 nor 8, or ``x`` is not 5-D.
    """
    if x.ndim != 5:
        raise ValueError(f"x must have shape (N, C, D, H, W), got {tuple(x.shape)}")
    if flips is None or flips == 1:
        plain: torch.Tensor = network(x).float()
        return plain
    if flips != 8:
        raise ValueError(f"tta_flips must be None, 1 or 8, not {flips!r}")
    total: torch.Tensor | None = None
    for r in range(len(_SPATIAL_DIMS) + 1):
        for dims in itertools.combinations(_SPATIAL_DIMS, r):
            view = torch.flip(x, dims) if dims else x
            y: torch.Tensor = network(view).float()
            total = y if total is None else total + y
    assert total is not None  # 8 passes ran
    return total / 8.0


class CandidateScorer:
    """Score nodule candidates with a model bundle.

    Parameters
    ----------
    bundle : ModelBundle
        A verified bundle (:func:`cad_node.models.load_bundle`).
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    threads : int, optional
        torch intra-op threads to use *during* :meth:`score` on CPU (restored
        afterwards).  ``None`` leaves torch's setting alone.  On a shared,
        loaded machine 1 thread can be several times faster than 2 (see
        ``docs/benchmarks.md``).
    """

    def __init__(
        self, bundle: ModelBundle, device: str = "cpu", threads: int | None = None
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.bundle = bundle
        self.threads = threads
        self.device = torch_device(device)
        spec = bundle.manifest.input
        if not isinstance(spec, InputSpec):
            raise ValueError(f"bundle {bundle.name} {bundle.version} is not a CT patch scorer")
        self.spec = spec
        self.network = bundle.build_network(self.device)

    @property
    def identity(self) -> ModelIdentity:
        """Identity of the bundle that produces the scores."""
        return self.bundle.identity

    @property
    def threshold(self) -> float:
        """The bundle's suggested operating threshold on the probability."""
        return self.bundle.manifest.output.threshold

    @property
    def operating_threshold(self) -> float | None:
        """The pipeline operating threshold chosen by the bundle's rule, if it has one."""
        return self.bundle.manifest.output.operating_threshold

    @property
    def context_fusion(self) -> dict[str, Any] | None:
        """The bundle's late-fusion record (context features), if it has one."""
        return self.bundle.manifest.output.context_fusion

    def patches(self, image: sitk.Image, centers_mm: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Normalised input patches ``(N, 1, D, H, W)`` for ``centers_mm``."""
        p = extract_patches(
            image,
            centers_mm,
            self.spec.patch_size,
            self.spec.spacing_mm,
            hu_window=self.spec.hu_window,
            outside_hu=self.spec.outside_hu,
        )
        return p[:, None]

    def score(self, image: sitk.Image, centers_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Probability that each centre is a nodule: ``sigmoid`` of :meth:`logits`.

        Parameters
        ----------
        image : SimpleITK.Image
            3-D CT in HU.
        centers_mm : array-like, shape (N, 3)
            Candidate centres, patient LPS ``(x, y, z)`` mm.

        Returns
        -------
        numpy.ndarray
            ``(N,)`` float64 probabilities in ``[0, 1]``.
        """
        logits = self.logits(image, centers_mm)
        return np.clip(1.0 / (1.0 + np.exp(-logits)), 0.0, 1.0)

    def logits(self, image: sitk.Image, centers_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The network's logit at each centre (same contract as :meth:`score`)."""
        centers = np.asarray(centers_mm, dtype=np.float64)
        if centers.size == 0:
            return np.zeros((0,), dtype=np.float64)
        if centers.ndim != 2 or centers.shape[1] != 3:
            raise ValueError(f"centers_mm must have shape (N, 3), got {centers.shape}")
        bs = self.spec.batch_size
        out = np.empty((centers.shape[0],), dtype=np.float64)
        previous = torch.get_num_threads()
        scoped = self.threads is not None and self.device.type == "cpu"
        if scoped:
            torch.set_num_threads(int(self.threads))  # type: ignore[arg-type]
        try:
            with torch.inference_mode():
                for start in range(0, centers.shape[0], bs):
                    batch = self.patches(image, centers[start : start + bs])
                    x = torch.from_numpy(batch).to(self.device)
                    out[start : start + bs] = flip_averaged_logits(
                        self.network, x, self.spec.tta_flips).cpu().numpy()
        finally:
            if scoped:
                torch.set_num_threads(previous)
        return out
