"""The ``ct-lesion`` pipeline: universal lesion detection on CT (DeepLesion-style).

Modules: :mod:`.slices` (2.5-D input), :mod:`.network` (anchor-free detector
from MONAI blocks), :mod:`.detect` (decoding, NMS within and across slices),
:mod:`.recist` (per-lesion mask and RECIST axes), :mod:`.pipeline`.
"""
