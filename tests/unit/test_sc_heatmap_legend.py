"""Placement of the attribution heatmap legend on the SC key image (by hand).

Image 400 x 300 (cols x rows), legend block 100 x 50, disclaimer from row 280:
the corners are (4, 4), (296, 4), (4, 226) and (296, 226).
"""

from __future__ import annotations

from cad_node.results.sc import _legend_corner

SIZE = (400, 300)
BLOCK = (100.0, 50.0)
FOOT = 280.0


def test_top_left_when_clear() -> None:
    assert _legend_corner(BLOCK, SIZE, FOOT, [(150, 100, 250, 200)]) == (4, 4)


def test_moves_to_the_first_clear_corner() -> None:
    # a box under the top-left block (x 4-104, y 4-54): top right is clear
    assert _legend_corner(BLOCK, SIZE, FOOT, [(50, 30, 120, 90)]) == (296, 4)
    # both top corners covered: bottom left
    assert _legend_corner(BLOCK, SIZE, FOOT, [(50, 30, 120, 90), (300, 0, 320, 20)]) == (4, 226)


def test_least_covered_when_none_is_clear() -> None:
    boxes = [(0, 0, 400, 10),      # 10 rows of each top corner: 100 x 6 = 600 px each
             (0, 270, 50, 300),    # bottom left: x 4-50, y 270-276 -> 46 x 6 = 276 px
             (350, 200, 400, 300)]  # bottom right: x 350-396, y 226-276 -> 46 x 50
    assert _legend_corner(BLOCK, SIZE, FOOT, boxes) == (4, 226)
