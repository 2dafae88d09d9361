"""Unit tests of the cxr-abnormal patch geometry, box merging and evaluation (issue #12).

Every expected value below is worked out by hand in the comments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cad_node.pipelines.cxr.abnormal import box_iou, boxes_from_patches, merge_patches
from cad_node.pipelines.cxr.abnormal_net import (
    GRID,
    AbnormalNet,
    ImageLogit,
    TopPatchLogit,
    _patch_pool,
    kernel_cells,
    patch_boxes,
)
from cad_node.results.findings import FindingType
from trainer.cxr_abnormal_data import Item, kmeans_log_boxes, patch_labels
from trainer.cxr_abnormal_train import box_hit_rate, jsrt_froc, patch_loss


def test_kernel_cells_even_and_clamped() -> None:
    # side / 8 px cells rounded to an even count: 16 -> 2, 48 -> 6, 64 -> 8; 1 -> min 2; huge -> 32
    assert [kernel_cells(s) for s in (16, 48, 64, 1, 1000)] == [2, 6, 8, 2, 32]


def test_patch_boxes_centres_and_sizes() -> None:
    b = patch_boxes([(16, 16), (48, 32)])
    assert b.shape == (2, 16, 16, 4)
    # scale 0, node (0, 0): centre (8, 8), 16 px square
    assert b[0, 0, 0].tolist() == [0, 0, 16, 16]
    # scale 0, row i=1, column j=2: centre (x=40, y=24)
    assert b[0, 1, 2].tolist() == [32, 16, 48, 32]
    # scale 1: 48 high (6 cells), 32 wide (4 cells), centre (8, 8)
    assert b[1, 0, 0].tolist() == [-8, -16, 24, 32]


def test_patch_pool_mean_and_max_by_hand() -> None:
    g = torch.zeros(1, 1, 32, 32)
    g[0, 0, 5, 7] = 8.0
    ones = torch.ones(1, 1, 32, 32)
    mean, mx = _patch_pool(g, ones, 2, 2)
    assert mx is not None
    # kh = kw = 2: node (i, j) covers rows 2i..2i+1, columns 2j..2j+1; cell (5, 7) -> node (2, 3)
    assert mean[0, 0, 2, 3].item() == pytest.approx(2.0)  # 8 / 4 cells
    assert mx[0, 0, 2, 3].item() == 8.0
    assert mean.sum().item() == pytest.approx(2.0)
    # kh = kw = 4 at node (0, 0): rows/cols -1..2, of which 0..2 lie inside: 9 cells
    g2 = torch.zeros(1, 1, 32, 32)
    g2[0, 0, 0, 0] = 9.0
    mean2, _ = _patch_pool(g2, ones, 4, 4)
    assert mean2[0, 0, 0, 0].item() == pytest.approx(1.0)
    # a negative map: the max must not be the zero padding
    mx3 = _patch_pool(-torch.ones(1, 1, 32, 32), ones, 4, 4)[1]
    assert mx3 is not None and mx3.max().item() == -1.0


def test_box_iou_by_hand() -> None:
    # (0,0,10,10) vs (5,0,15,10): intersection 50, union 150
    assert box_iou([0, 0, 10, 10], [[5, 0, 15, 10], [20, 20, 30, 30]]).tolist() == pytest.approx(
        [1 / 3, 0.0])


def test_merge_patches_by_hand() -> None:
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [3, 3, 7, 7]]
    probs = [0.9, 0.6, 0.8, 0.2]
    # A seeds; B has IoU 81/119 = 0.68 with A -> merged, weights 0.6/0.4:
    # x0 = 0.4*1 = 0.4, x1 = 0.6*10 + 0.4*11 = 10.4.  D has IoU 16/100 < 0.3 (not merged)
    # but its centre (5, 5) is inside the merged box -> dropped.  C is the second box.
    out = merge_patches(boxes, probs)
    assert len(out) == 2
    assert out[0][0] == pytest.approx((0.4, 0.4, 10.4, 10.4))
    assert out[0][1] == 0.9
    assert out[1] == ((50.0, 50.0, 60.0, 60.0), 0.8)
    # below min_probability B and D are never used: A alone, then C
    out2 = merge_patches(boxes, probs, min_probability=0.7)
    assert [o[0] for o in out2] == [(0.0, 0.0, 10.0, 10.0), (50.0, 50.0, 60.0, 60.0)]
    assert len(merge_patches(boxes, probs, max_boxes=1)) == 1
    with pytest.raises(ValueError, match="4 boxes but 3"):
        merge_patches(boxes, probs[:3])


def test_boxes_from_patches_scales_and_clips() -> None:
    probs = np.zeros((1, 16, 16))
    probs[0, 0, 0] = 0.9  # patch (0, 0, 16, 16) in input pixels
    grid = np.zeros((16, 16), bool)
    grid[0, 0] = True
    # a 512-row, 300-column image: scale max(512, 300)/256 = 2 -> (0, 0, 32, 32);
    # clipped to the lung box (4, 6, 100, 20) -> (4, 6, 32, 20)
    out = boxes_from_patches(probs, grid, patch_boxes([(16, 16)]).numpy().astype(float),
                             (512, 300), (4.0, 6.0, 100.0, 20.0), FindingType.ABNORMAL)
    assert len(out) == 1
    b = out[0]
    assert (b.x0, b.y0, b.x1, b.y1, b.probability) == (4.0, 6.0, 32.0, 20.0, 0.9)
    assert b.finding_type is FindingType.ABNORMAL


def _item(**kw: object) -> Item:
    base: dict[str, object] = {"name": "x.png", "source": "jsrt", "path": Path("x.png"),
                               "label": 1}
    base.update(kw)
    return Item(**base)  # type: ignore[arg-type]


def test_patch_labels_nodule_by_hand() -> None:
    grid = np.ones((16, 16), bool)
    grid[15, 15] = False
    # stored 512 px, nodule centre (80, 80), diameter 20 -> input (40, 40), d = 10.
    # Scale 16x16: only the node with centre (40, 40), i = j = 2, has the centre in its
    # central half (|dx|, |dy| <= 4); every other patch is clear of the disc square
    # [35, 45]^2 -> 0; the non-lung cell -> -1.
    lab = patch_labels(_item(nodule=(80.0, 80.0, 20.0)), [(16, 16)], grid, (512, 512))
    assert lab.shape == (1, 16, 16)
    assert lab[0, 2, 2] == 1
    assert (lab == 1).sum() == 1
    assert lab[0, 15, 15] == -1
    assert (lab == 0).sum() == 254


def test_patch_labels_normal_and_nih_box() -> None:
    grid = np.ones((16, 16), bool)
    normal = patch_labels(_item(label=0, source="nih"), [(16, 16)], grid, (512, 512))
    assert (normal == 0).all()
    # box (0, 0, 32, 32) stored -> (0, 0, 16, 16) input: IoU 1 with node (0, 0), 0 elsewhere
    boxed = patch_labels(_item(source="nih", boxes=((0.0, 0.0, 32.0, 32.0),)), [(16, 16)],
                         grid, (512, 512))
    assert boxed[0, 0, 0] == 1
    assert (boxed == 1).sum() == 1
    assert (boxed == -1).sum() == 255  # other findings may be unboxed: ignored, not negative


def test_kmeans_two_clear_clusters() -> None:
    hw = np.array([[10, 10], [10, 10], [100, 50], [100, 50]], float)
    c = kmeans_log_boxes(hw, 2)
    assert c.ravel().tolist() == pytest.approx([10, 10, 100, 50])


def test_patch_loss_one_to_three_hardest() -> None:
    # one positive (logit 0) and negatives 5, 4, 3, 2, 1: with neg_per_pos 3 and a batch of
    # one image, the 3 hardest negatives (5, 4, 3) are used:
    # loss = mean(log(1+e^0), log(1+e^5), log(1+e^4), log(1+e^3))
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    labels = torch.tensor([1, 0, 0, 0, 0, 0])
    expected = float(np.mean(np.log1p(np.exp([0.0, 5.0, 4.0, 3.0]))))
    assert patch_loss(logits, labels, 3, 1).item() == pytest.approx(expected, rel=1e-5)


def test_jsrt_froc_by_hand() -> None:
    images = [
        # nodule found at 0.9; the 0.3 box also contains the centre: a double, not an FP
        ([((0, 0, 10, 10), 0.9), ((20, 20, 30, 30), 0.5), ((2, 2, 8, 8), 0.3)], (5.0, 5.0, 8.0)),
        ([((0, 0, 10, 10), 0.7), ((45, 45, 55, 55), 0.6)], (50.0, 50.0, 8.0)),
        ([((0, 0, 5, 5), 0.8)], None),
        ([], None),
    ]
    # ranked: .9 TP, .8 FP, .7 FP, .6 TP, .5 FP over 4 images:
    # (FP/image, sens): (0, .5) (.25, .5) (.5, .5) (.5, 1) (.75, 1)
    sens = jsrt_froc(images, rates=(0.25, 1.0, 4.0))
    assert sens.tolist() == pytest.approx([0.5, 1.0, 1.0])


def test_box_hit_rate_iobb_by_hand() -> None:
    gt = [(0.0, 0.0, 100.0, 100.0)]
    miss = ((50.0, 50.0, 150.0, 150.0), 0.9)  # IoBB 2500 / 10000 = 0.25
    hit = ((60.0, 0.0, 160.0, 100.0), 0.8)  # IoBB 40 * 100 / 10000 = 0.4
    assert box_hit_rate([([miss], gt), ([hit], gt)], top=1) == 0.5
    assert box_hit_rate([([miss, hit], gt)], top=1) == 0.0
    assert box_hit_rate([([miss, hit], gt)], top=3) == 1.0


SMALL_ENCODER = {"builder": "unet2d", "channels": [4, 8, 8, 16, 16], "strides": [2, 2, 2, 2],
                 "num_res_units": 2, "in_channels": 1, "out_channels": 3, "norm": "batch",
                 "dropout": 0.0}


def _small_net(patch_context: bool = True) -> AbnormalNet:
    torch.manual_seed(5)
    net = AbnormalNet([[16.0, 16.0], [48.0, 96.0], [300.0, 40.0]], SMALL_ENCODER, width=8,
                      projection=4, dropout=0.0, patch_context=patch_context)
    with torch.no_grad():  # non-trivial standardisation and scale embedding
        net.desc_mean.normal_()
        net.desc_std.uniform_(0.5, 2.0)
        net.scale_embedding.normal_()
    return net.eval()


@pytest.mark.parametrize("patch_context", [True, False])
def test_top_patch_logit_is_the_patch_logit_of_the_full_head(patch_context: bool) -> None:
    """Every patch of every scale (including ones clipped by the map edge, and a
    scale wider than the map): the one-patch head equals the all-patch head."""
    net = _small_net(patch_context)
    assert net.descriptor_size == 2 * 8 + (4 if patch_context else 0)
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    with torch.inference_mode():
        patches, _ = net.heads(*net.encode(x))
        for s in range(len(net.kernels)):
            for i in range(GRID):
                for j in (0, 1, 7, 14, 15):
                    got = float(TopPatchLogit(net, s, i, j)(x)[0])
                    assert got == pytest.approx(float(patches[0, s, i, j]), abs=1e-5)


def test_top_patch_is_the_max_patch_inside_the_lungs() -> None:
    net = _small_net()
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    grid = torch.zeros(1, GRID, GRID, dtype=torch.bool)
    grid[0, 3:9, 2:6] = True
    top = TopPatchLogit.of(net, x, grid)
    _, row, col = top.patch
    assert bool(grid[0, row, col])
    with torch.inference_mode():
        assert float(top(x)[0]) == pytest.approx(
            float(ImageLogit(net, "max")(x, grid)[0]), abs=1e-5)
        # no lung cell at all: every patch competes, as AbnormalNet.max_patch
        none = torch.zeros_like(grid)
        assert float(TopPatchLogit.of(net, x, none)(x)[0]) == pytest.approx(
            float(ImageLogit(net, "max")(x, none)[0]), abs=1e-5)
    with pytest.raises(ValueError, match="no patch"):
        TopPatchLogit(net, 3, 0, 0)


def test_layer_attribution_of_the_top_patch_stays_near_its_window() -> None:
    """Layer Integrated Gradients of one patch's logit at ``f8`` credits only cells
    the patch's descriptor can see: its window, widened by the reach of the
    bottleneck blocks (``f16_of``: at most 8 ``f8`` cells each side); every other
    cell is exactly 0 (it fails if the head reads any other cell)."""
    from cad_node.pipelines.cxr.attribution import layer_attribution

    net = _small_net()
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    top = TopPatchLogit(net, 0, 2, 3)  # 16 x 16 px: 2 x 2 cells, rows/cols 4-5 and 6-7
    rows, cols = top.window()
    assert (rows, cols) == (slice(4, 6), slice(6, 8))
    cells = layer_attribution(top, x, steps=4, baseline="zero").sum(dim=1)[0]
    assert float(cells[rows, cols].abs().sum()) > 0
    near = torch.zeros_like(cells, dtype=torch.bool)
    near[max(0, rows.start - 8):rows.stop + 8, max(0, cols.start - 8):cols.stop + 8] = True
    assert float(cells[~near].abs().max()) == 0.0


def test_without_patch_context_a_patch_reads_only_its_window() -> None:
    """With ``patch_context=False`` the patch descriptor is f8 inside the window only:
    the layer attribution is 0 on every other cell (no bottleneck halo)."""
    from cad_node.pipelines.cxr.attribution import layer_attribution

    net = _small_net(patch_context=False)
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    top = TopPatchLogit(net, 1, 6, 9)  # 48 x 96 px: 6 x 12 cells
    rows, cols = top.window()
    cells = layer_attribution(top, x, steps=4, baseline="zero").sum(dim=1)[0]
    inside = torch.zeros_like(cells, dtype=torch.bool)
    inside[rows, cols] = True
    assert float(cells[inside].abs().sum()) > 0
    assert float(cells[~inside].abs().max()) == 0.0
