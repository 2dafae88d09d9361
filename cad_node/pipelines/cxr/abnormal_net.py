"""The ``cxr-abnormal`` network: multi-scale patch scoring plus a whole-image branch.

Architecture (builder ``cxr-abnormal`` in :mod:`cad_node.models.network`)
-------------------------------------------------------------------------
* **Encoder**: the down path of the ``cxr-lungs`` MONAI residual U-Net (same
  blocks, weights copied from that bundle by the trainer and kept frozen):
  ``f8`` (64 channels, stride 8, 32x32 cells on a 256-pixel input) and
  ``f16`` (the bottleneck, 256 channels, stride 16, 16x16).
* **Patch descriptors** (fixed): for every scale ``(h, w)`` (input pixels,
  derived by the trainer from the lesion boxes and nodule sizes of the
  training data) a patch centred on each node of a 16x16 grid (centres at
  ``16 i + 8`` pixels) is described by the mean and the maximum of ``f8`` and
  the mean of a fixed 1x1 projection of ``f16`` (principal components) inside
  it, standardised with stored training statistics.
* **Patch branch** (trained): a shared two-layer head (plus a learned
  per-scale embedding) gives one logit per patch: ``(batch, scales, 16, 16)``.
  Training is cheap because the descriptors of the frozen encoder can be
  cached: only the heads learn.
* **Whole-image branch** (trained): global mean and max of ``f8`` and ``f16``,
  standardised, one linear logit.
* **Image logit** (``image_rule``): ``max`` (the largest patch logit inside
  the lungs), ``whole`` (the whole-image logit) or ``fusion`` (a learned
  linear combination of the two).

Patches are kept only where ``lung_grid`` (``(batch, 16, 16)`` booleans: the
patch centre lies in a lung) is true; an image with no lung cell keeps all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "GRID",
    "INPUT_SIZE",
    "AbnormalNet",
    "ImageLogit",
    "TopPatchLogit",
    "down_path",
    "kernel_cells",
    "patch_boxes",
]

#: Side of the square network input, pixels (the ``cxr-lungs`` input).
INPUT_SIZE = 256
#: Patch centres per side (16 x 16 grid, as the reference system).
GRID = 16
#: Pixels per cell of the ``f8`` feature grid.
CELL = 8
#: Encoder blocks up to ``f8`` (three stride-2 blocks of the ``cxr-lungs`` down path).
F8_BLOCKS = 3
IMAGE_RULES = ("max", "whole", "fusion")


def kernel_cells(side_px: float, cells: int = INPUT_SIZE // CELL) -> int:
    """Patch side in ``f8`` cells: even (so the patch is centred on a grid node), 2..``cells``."""
    k = 2 * round(float(side_px) / (2 * CELL))
    return int(min(cells, max(2, k)))


def patch_boxes(scales: Sequence[Sequence[float]]) -> torch.Tensor:
    """Boxes ``(scales, 16, 16, 4)`` as ``(x0, y0, x1, y1)`` in input pixels (may leave the image).

    The patch of scale ``s`` at grid node ``(i, j)`` is centred on pixel
    ``(16 j + 8, 16 i + 8)`` and is ``kernel_cells`` cells of 8 pixels high/wide.
    """
    step = INPUT_SIZE // GRID
    centres = torch.arange(GRID, dtype=torch.float32) * step + step / 2
    out = torch.zeros(len(scales), GRID, GRID, 4)
    for s, (h, w) in enumerate(scales):
        hh, ww = kernel_cells(h) * CELL / 2, kernel_cells(w) * CELL / 2
        out[s, :, :, 0] = centres[None, :] - ww
        out[s, :, :, 2] = centres[None, :] + ww
        out[s, :, :, 1] = centres[:, None] - hh
        out[s, :, :, 3] = centres[:, None] + hh
    return out


def _patch_pool(g: torch.Tensor, ones: torch.Tensor, kh: int, kw: int, *, with_max: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean (and max) of ``g`` (``(b, c, 32, 32)``) over each grid patch ``(b, c, 16, 16)``.

    The patch at grid node ``(i, j)`` covers cells ``[2i + 1 - kh/2, 2i + 1 + kh/2)``
    (rows) and likewise for columns; cells outside the map do not count (the
    patch's centre cell is always inside).  Both pools are separable (rows,
    then columns) with stride 2.
    """
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    gp = nn.functional.pad(g, pad)[..., 1:, 1:]
    op = nn.functional.pad(ones, pad)[..., 1:, 1:]

    def box_sum(t: torch.Tensor) -> torch.Tensor:
        t = nn.functional.avg_pool2d(t, (kh, 1), stride=(2, 1)) * kh
        return nn.functional.avg_pool2d(t, (1, kw), stride=(1, 2)) * kw

    mean = box_sum(gp) / box_sum(op)
    if not with_max:
        return mean, None
    gm = nn.functional.pad(g, pad, value=float("-inf"))[..., 1:, 1:]
    mx = nn.functional.max_pool2d(gm, (kh, 1), stride=(2, 1))
    mx = nn.functional.max_pool2d(mx, (1, kw), stride=(1, 2))
    return mean, mx


def down_path(unet: nn.Module) -> list[nn.Module]:
    """The encoder blocks of a MONAI ``UNet`` (top to bottom), then its bottleneck."""
    mods: list[nn.Module] = []
    m: Any = unet.model
    while isinstance(m, nn.Sequential) and len(m) == 3:
        mods.append(m[0])
        m = m[1].submodule
    mods.append(m)
    return mods


class AbnormalNet(nn.Module):
    """Abnormal-vs-normal chest radiograph scorer (see the module docstring).

    Parameters
    ----------
    scales : sequence of (h, w)
        Patch sizes, input pixels.
    encoder : dict
        Arguments of the ``cxr-lungs`` U-Net whose down path is the encoder.
    width : int
        Hidden units of the patch head.
    projection : int
        Channels of the fixed projection of ``f16`` (the trainer sets it to
        the principal components of the training features).
    image_rule : str
        ``max``, ``whole`` or ``fusion``.
    patch_context : bool
        Whether a patch descriptor includes the projected ``f16`` (the
        bottleneck, whose cells see far beyond the patch); without it, a patch
        is described by ``f8`` inside it only.
    """

    def __init__(self, scales: Sequence[Sequence[float]], encoder: dict[str, Any],
                 width: int = 16, projection: int = 64, image_rule: str = "max",
                 dropout: float = 0.2, patch_context: bool = True) -> None:
        super().__init__()
        from cad_node.models.network import build_unet2d

        if image_rule not in IMAGE_RULES:
            raise ValueError(f"image_rule must be one of {IMAGE_RULES}, not {image_rule!r}")
        if not scales:
            raise ValueError("at least one patch scale is needed")
        self.scales = [(float(h), float(w)) for h, w in scales]
        self.kernels = [(kernel_cells(h), kernel_cells(w)) for h, w in self.scales]
        self.image_rule = image_rule
        unet = build_unet2d(encoder)
        self.encoder = nn.ModuleList(down_path(unet))
        ch = list(encoder["channels"])
        c8, c16 = ch[2], ch[-1]
        #: Fixed (not trained) 1x1 projection of f16 before patch pooling.
        self.project16 = nn.Conv2d(c16, projection, 1)
        self.patch_context = bool(patch_context)
        self.descriptor_size = 2 * c8 + (projection if self.patch_context else 0)
        self.whole_size = 2 * c8 + 2 * c16
        self.desc_mean: torch.Tensor
        self.desc_std: torch.Tensor
        self.whole_mean: torch.Tensor
        self.whole_std: torch.Tensor
        self.register_buffer("desc_mean", torch.zeros(self.descriptor_size))
        self.register_buffer("desc_std", torch.ones(self.descriptor_size))
        self.register_buffer("whole_mean", torch.zeros(self.whole_size))
        self.register_buffer("whole_std", torch.ones(self.whole_size))
        self.patch_in = nn.Linear(self.descriptor_size, width)
        self.scale_embedding = nn.Parameter(torch.zeros(len(self.scales), width))
        self.patch_out = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 1))
        self.whole_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.whole_size, 1))
        self.fusion = nn.Linear(2, 1)
        with torch.no_grad():
            self.fusion.weight.copy_(torch.tensor([[0.5, 0.5]]))
            self.fusion.bias.zero_()

    # -- parts ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f8, f16)`` of a ``(batch, 1, 256, 256)`` input."""
        f8 = self.encode_f8(x)
        return f8, self.f16_of(f8)

    def encode_f8(self, x: torch.Tensor) -> torch.Tensor:
        """``f8`` (stride 8) of a ``(batch, 1, 256, 256)`` input: the first encoder blocks."""
        f = x
        for block in self.encoder[:F8_BLOCKS]:
            f = block(f)
        return f

    def f16_of(self, f8: torch.Tensor) -> torch.Tensor:
        """``f16`` (the bottleneck, stride 16) of ``f8``: the remaining encoder blocks."""
        f = f8
        for block in self.encoder[F8_BLOCKS:]:
            f = block(f)
        return f

    def descriptors(self, f8: torch.Tensor, f16: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch descriptors ``(batch, scales, 16, 16, D)`` and whole-image ones ``(batch, W)``.

        Per patch: mean and max of ``f8`` and (with :attr:`patch_context`) mean
        of the projected ``f16`` inside it (raw, not standardised).
        """
        p16 = (nn.functional.interpolate(self.project16(f16), size=f8.shape[-2:],
                                         mode="nearest") if self.patch_context else None)
        ones = torch.ones_like(f8[:1, :1])
        per_scale = []
        for kh, kw in self.kernels:
            avg8, mx8 = _patch_pool(f8, ones, kh, kw)
            assert mx8 is not None
            parts = [avg8, mx8]
            if p16 is not None:
                parts.append(_patch_pool(p16, ones, kh, kw, with_max=False)[0])
            per_scale.append(torch.cat(parts, dim=1))
        desc = torch.stack(per_scale, dim=1).permute(0, 1, 3, 4, 2)
        whole = torch.cat([f8.mean(dim=(2, 3)), f8.amax(dim=(2, 3)),
                           f16.mean(dim=(2, 3)), f16.amax(dim=(2, 3))], dim=1)
        return desc, whole

    def patch_logits_of(self, desc: torch.Tensor, scale_index: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Logits of raw descriptors ``(..., scales, D)`` (or ``(..., D)`` with ``scale_index``)."""
        z = self.patch_in((desc - self.desc_mean) / self.desc_std)
        if scale_index is None:
            z = z + self.scale_embedding
        else:
            z = z + self.scale_embedding[scale_index]
        out: torch.Tensor = self.patch_out(z)[..., 0]
        return out

    def whole_logits_of(self, whole: torch.Tensor) -> torch.Tensor:
        """Whole-image logits ``(batch,)`` of raw whole-image descriptors."""
        out: torch.Tensor = self.whole_head((whole - self.whole_mean) / self.whole_std)[:, 0]
        return out

    def heads(self, f8: torch.Tensor, f16: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch logits ``(batch, scales, 16, 16)`` and whole-image logits ``(batch,)``."""
        desc, whole = self.descriptors(f8, f16)
        # (b, s, 16, 16, D) -> (b, 16, 16, s, D) so the scale embedding broadcasts
        logits = self.patch_logits_of(desc.permute(0, 2, 3, 1, 4)).permute(0, 3, 1, 2)
        return logits, self.whole_logits_of(whole)

    @staticmethod
    def max_patch(patch_logits: torch.Tensor, lung_grid: torch.Tensor | None) -> torch.Tensor:
        """Largest patch logit per image, over patches centred in the lungs."""
        flat = patch_logits.flatten(2)  # (b, s, 256)
        if lung_grid is not None:
            keep = lung_grid.flatten(1).bool()
            keep = keep | ~keep.any(dim=1, keepdim=True)  # no lung cell: keep all
            flat = flat.masked_fill(~keep[:, None, :], float("-inf"))
        return flat.amax(dim=(1, 2))

    def fuse(self, max_logit: torch.Tensor, whole_logit: torch.Tensor) -> torch.Tensor:
        """The learned fusion of the two image logits ``(batch,)``."""
        out: torch.Tensor = self.fusion(torch.stack([max_logit, whole_logit], dim=1))[:, 0]
        return out

    def image_logits(self, patch_logits: torch.Tensor, whole: torch.Tensor,
                     lung_grid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The three image-level logits ``max``, ``whole``, ``fusion`` (each ``(batch,)``)."""
        mx = self.max_patch(patch_logits, lung_grid)
        return {"max": mx, "whole": whole, "fusion": self.fuse(mx, whole)}

    def forward(self, x: torch.Tensor, lung_grid: torch.Tensor | None = None) -> torch.Tensor:
        """Image logit ``(batch,)`` by :attr:`image_rule` (differentiable: captum runs on it)."""
        f8, f16 = self.encode(x)
        patches, whole = self.heads(f8, f16)
        return self.image_logits(patches, whole, lung_grid)[self.image_rule]


class ImageLogit(nn.Module):
    """One image-level logit of an :class:`AbnormalNet`, whatever its bundle's rule.

    Attributing the fused logit put the heatmap maximum inside the top box in 1 of
    116 JSRT nodule cases, the max-patch logit (``ImageLogit(net, "max")``) in 25 of
    116; the pipeline now explains the top finding's own patch logit instead
    (:class:`TopPatchLogit`; docs/benchmarks.md, "Chest X-ray attribution").  The
    wrapper shares ``net``'s parameters and never changes ``net.image_rule``, so
    concurrent inference is unaffected.

    Parameters
    ----------
    net : AbnormalNet
        The network.
    rule : str
        ``max``, ``whole`` or ``fusion``.
    """

    def __init__(self, net: AbnormalNet, rule: str) -> None:
        super().__init__()
        if rule not in IMAGE_RULES:
            raise ValueError(f"image rule {rule!r} is not one of {IMAGE_RULES}")
        self.net = net
        self.rule = rule

    def forward(self, x: torch.Tensor, lung_grid: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen image logit ``(batch,)``."""
        return self.head(self.stem(x), lung_grid)

    # -- the layer split of :mod:`.attribution` (layer Integrated Gradients on f8) ----------
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The attributed layer: ``f8`` (64 channels, stride 8) of the input ``x``."""
        return self.net.encode_f8(x)

    def head(self, f8: torch.Tensor, lung_grid: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen image logit ``(batch,)`` of ``f8``; ``forward(x) == head(stem(x))``."""
        patches, whole = self.net.heads(f8, self.net.f16_of(f8))
        return self.net.image_logits(patches, whole, lung_grid)[self.rule]


class TopPatchLogit(nn.Module):
    """The logit of one patch of an :class:`AbnormalNet`: the top finding's own score.

    :meth:`of` picks the patch the max-patch logit comes from (the largest patch
    logit centred in the lungs, the patch the top box is merged around), and the
    module then computes that patch's logit only, at a fixed ``(scale, row, col)``:
    its value at the input is the max-patch logit, but along an attribution path
    the explained patch does not jump from one place to another, as the maximum
    over patches does.  As a :class:`~.attribution.LayerSplit`, :meth:`stem` is
    ``f8`` and :meth:`head` pools ``f8`` (and the projected ``f16`` of
    :meth:`AbnormalNet.f16_of`) over that patch's window only, so one step costs
    the bottleneck blocks and one descriptor instead of every scale's.

    Parameters
    ----------
    net : AbnormalNet
        The network (shared, never changed).
    scale, row, col : int
        The patch: scale index and grid node.

    Raises
    ------
    ValueError
        The patch is not one of ``net``'s.
    """

    def __init__(self, net: AbnormalNet, scale: int, row: int, col: int) -> None:
        super().__init__()
        if not (0 <= scale < len(net.kernels) and 0 <= row < GRID and 0 <= col < GRID):
            raise ValueError(f"no patch (scale {scale}, row {row}, col {col}) in a "
                             f"{len(net.kernels)}-scale {GRID}x{GRID} grid")
        self.net = net
        self.patch = (scale, row, col)

    @classmethod
    def of(cls, net: AbnormalNet, x: torch.Tensor, lung_grid: torch.Tensor | None = None
           ) -> TopPatchLogit:
        """The top patch of one input ``x`` (one sample), as :meth:`AbnormalNet.max_patch`."""
        with torch.inference_mode():
            f8, f16 = net.encode(x)
            patches, _ = net.heads(f8, f16)
            flat = patches[0].flatten(1)  # (s, 256)
            if lung_grid is not None:
                keep = lung_grid[0].flatten().bool()
                if bool(keep.any()):
                    flat = flat.masked_fill(~keep[None, :], float("-inf"))
            index = int(torch.argmax(flat))
        scale, node = divmod(index, GRID * GRID)
        return cls(net, scale, *divmod(node, GRID))

    def window(self, cells: int = INPUT_SIZE // CELL) -> tuple[slice, slice]:
        """The patch's ``f8`` cells (rows, cols), clipped to the map (``_patch_pool``'s)."""
        scale, row, col = self.patch
        kh, kw = self.net.kernels[scale]
        r0, c0 = 2 * row + 1 - kh // 2, 2 * col + 1 - kw // 2
        return (slice(max(0, r0), min(cells, r0 + kh)), slice(max(0, c0), min(cells, c0 + kw)))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The attributed layer: ``f8`` of the input ``x``."""
        return self.net.encode_f8(x)

    def head(self, f8: torch.Tensor, *extra: object) -> torch.Tensor:
        """The patch's logit ``(batch,)`` of ``f8`` (``extra`` is ignored: the patch is fixed)."""
        rows, cols = self.window(int(f8.shape[-1]))
        w8 = f8[..., rows, cols]
        parts = [w8.mean(dim=(2, 3)), w8.amax(dim=(2, 3))]
        if self.net.patch_context:
            p16 = nn.functional.interpolate(self.net.project16(self.net.f16_of(f8)),
                                            size=f8.shape[-2:], mode="nearest")
            parts.append(p16[..., rows, cols].mean(dim=(2, 3)))
        desc = torch.cat(parts, dim=1)
        index = torch.full((desc.shape[0],), self.patch[0], dtype=torch.long,
                           device=desc.device)
        return self.net.patch_logits_of(desc, scale_index=index)

    def forward(self, x: torch.Tensor, *extra: object) -> torch.Tensor:
        """The patch's logit ``(batch,)`` of the input ``x``."""
        return self.head(self.stem(x))
