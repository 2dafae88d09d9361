"""The one series-geometry module (cad_node.imaging.geometry): its messy-series policy.

Every row of the policy table in the module docstring is tested here once, on
small synthetic headers whose expected positions are set by the test.  The
last tests check that the volume loader and the result builders, which both
use the module, agree on order and on refusals.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from cad_node.imaging import load_series
from cad_node.imaging.geometry import (
    ImagePlane,
    SeriesError,
    VolumeGrid,
    patient_orientation_letters,
    regular_grid,
    sort_slices,
    unique_instances,
)
from cad_node.results._common import SourceSeries

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Rows run along +y, columns along -z: normal = y x (-z) = -x.
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def slices(n: int = 5, orientation: tuple[float, ...] = AXIAL, gap: float = 2.5) -> list[Dataset]:
    """``n`` 4x4 CT headers with pixels, ``gap`` mm apart along the normal."""
    iop = np.asarray(orientation)
    normal = np.cross(iop[:3], iop[3:])
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = f"2.25.{100 + k}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1", "2.25.2"
        ds.FrameOfReferenceUID = "2.25.3"
        ds.Modality = "CT"
        ds.InstanceNumber = n - k  # deliberately the reverse of the position order
        ds.ImageOrientationPatient = list(orientation)
        ipp = np.array([10.0, 20.0, 30.0]) + normal * gap * k
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.PixelSpacing = [0.5, 0.75]
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.full((4, 4), k, np.int16).tobytes()
        out.append(ds)
    return out


def planes(dss: list[Dataset]) -> list[ImagePlane]:
    out = [ImagePlane.from_dataset(ds) for ds in dss]
    assert all(p is not None for p in out)
    return out  # type: ignore[return-value]


# --- parsing one plane ---------------------------------------------------------


def test_pixel_to_patient_follows_ps33_c7_6_2_1_1() -> None:
    (ds,) = slices(1, SAGITTAL)
    plane = ImagePlane.from_dataset(ds)
    assert plane is not None
    # row 2, column 3: IPP + 3 * 0.75 mm along +y (row direction) + 2 * 0.5 mm along -z.
    np.testing.assert_allclose(plane.pixel_to_patient(2, 3), [10.0, 22.25, 29.0])
    np.testing.assert_allclose(plane.normal, [-1.0, 0.0, 0.0])
    assert plane.patient_to_pixel((10.0, 22.25, 29.0)) == pytest.approx((3.0, 2.0))
    # A point off the plane projects along the normal.
    assert plane.patient_to_pixel((-40.0, 22.25, 29.0)) == pytest.approx((3.0, 2.0))


def test_no_position_is_a_2d_image_and_a_bad_plane_names_the_instance() -> None:
    (ds,) = slices(1)
    flat = copy.deepcopy(ds)
    del flat.ImagePositionPatient
    assert ImagePlane.from_dataset(flat) is None
    bad = copy.deepcopy(ds)
    bad.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    with pytest.raises(SeriesError, match=r"2\.25\.100 .*no usable Image Orientation"):
        ImagePlane.from_dataset(bad)
    del bad.ImageOrientationPatient
    with pytest.raises(SeriesError, match="no usable Image Orientation"):
        ImagePlane.from_dataset(bad)
    nospace = copy.deepcopy(ds)
    nospace.PixelSpacing = [0.0, 0.5]
    with pytest.raises(SeriesError, match="no usable Pixel Spacing"):
        ImagePlane.from_dataset(nospace, "file x.dcm")
    short = copy.deepcopy(ds)
    short.ImagePositionPatient = [1.0, 2.0]
    with pytest.raises(SeriesError, match="invalid Image Position"):
        ImagePlane.from_dataset(short)


def test_patient_orientation_letters() -> None:
    assert patient_orientation_letters(AXIAL) == ("L", "P")
    assert patient_orientation_letters(SAGITTAL) == ("P", "F")
    assert patient_orientation_letters((-1, 0, 0, 0, 0.8, -0.6)) == ("R", "PF")


# --- repeated SOP Instance UIDs ---------------------------------------------------


def test_same_uid_same_plane_keeps_the_first_copy() -> None:
    dss = slices(3)
    again = copy.deepcopy(dss[1])
    again.ImagePositionPatient = [float(v) + 0.001 for v in again.ImagePositionPatient]
    keep, notes = unique_instances([*dss, again])
    assert keep == [0, 1, 2]
    assert notes == ["1 repeated instance(s) (same SOP Instance UID) ignored"]


def test_same_uid_different_plane_is_refused() -> None:
    dss = slices(3)
    moved = copy.deepcopy(dss[1])
    moved.ImagePositionPatient = [10.0, 20.0, 99.0]
    with pytest.raises(SeriesError, match=r"2\.25\.101 occurs twice with different positions"):
        unique_instances([*dss, moved])
    turned = copy.deepcopy(dss[1])
    turned.ImageOrientationPatient = list(SAGITTAL)
    with pytest.raises(SeriesError, match="occurs twice with different positions"):
        unique_instances([turned, *dss])
    flat = copy.deepcopy(dss[1])
    del flat.ImagePositionPatient
    with pytest.raises(SeriesError, match="occurs twice with different positions"):
        unique_instances([*dss, flat])


# --- sorting and consistency -------------------------------------------------------


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_sort_is_along_the_normal_never_by_file_or_instance_number(
    orientation: tuple[float, ...],
) -> None:
    dss = slices(6, orientation)
    shuffled = list(dss)
    random.Random(5).shuffle(shuffled)
    stack = sort_slices(planes(shuffled))
    assert [p.sop_instance_uid for p in stack.planes] == [d.SOPInstanceUID for d in dss]
    np.testing.assert_allclose(np.diff(stack.distances), 2.5)
    assert stack.nearest(dss[3].ImagePositionPatient) == 3


def test_equal_positions_sort_by_uid_and_group() -> None:
    dss = slices(4)
    twin = copy.deepcopy(dss[2])
    twin.SOPInstanceUID = "2.25.1000"  # sorts before 2.25.102 as a string
    for order in ([*dss, twin], [twin, *reversed(dss)]):
        stack = sort_slices(planes(order))
        assert [p.sop_instance_uid for p in stack.planes] == [
            "2.25.100", "2.25.101", "2.25.1000", "2.25.102", "2.25.103"
        ]
        assert stack.position_groups() == [[0], [1], [2, 3], [4]]


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("ImageOrientationPatient", list(SAGITTAL), r"mixed Image Orientation \(Patient\)"),
        ("PixelSpacing", [0.5, 0.8], "mixed Pixel Spacing"),
        ("Rows", 8, r"mixed image sizes in one series: 4x4 \(4 slices\), 8x4 \(1 slices\)"),
        ("FrameOfReferenceUID", "2.25.4", "mixed Frame of Reference UID"),
    ],
    ids=["orientation", "pixel-spacing", "size", "frame-of-reference"],
)
def test_mixed_geometry_is_refused_never_outvoted(
    attribute: str, value: object, message: str
) -> None:
    dss = slices(5)
    setattr(dss[3], attribute, value)  # one of five: a majority vote would keep it
    with pytest.raises(SeriesError, match=message):
        sort_slices(planes(dss))


# --- what a voxel grid needs -------------------------------------------------------


def test_regular_grid_geometry() -> None:
    dss = slices(5, SAGITTAL)
    grid = regular_grid(sort_slices(planes(dss)))
    np.testing.assert_allclose(grid.origin, [10.0, 20.0, 30.0])
    assert grid.spacing == pytest.approx((0.75, 0.5, 2.5))
    np.testing.assert_allclose(grid.direction, [[0, 0, -1], [1, 0, 0], [0, -1, 0]])
    # voxel (slice 2, row 1, column 3)
    np.testing.assert_allclose(grid.index_to_lps([2, 1, 3]), [5.0, 22.25, 29.5])
    np.testing.assert_allclose(grid.lps_to_index([5.0, 22.25, 29.5]), [2, 1, 3], atol=1e-12)


def _with_positions(dss: list[Dataset], z: list[float]) -> list[ImagePlane]:
    for ds, zk in zip(dss, z, strict=True):
        ds.ImagePositionPatient = [10.0, 20.0, zk]
    return planes(dss)


@pytest.mark.parametrize(
    ("z", "message"),
    [
        ([0.0], "single-slice series"),
        ([0.0, 2.5, 2.5, 5.0], "1 duplicate slice position"),
        ([0.0, 2.5, 5.0, 10.0, 12.5], r"missing slice\(s\): gap of 5\.000 mm"),
        ([0.0, 2.5, 5.0, 7.2, 9.7, 12.2], "varying slice spacing"),
    ],
    ids=["single", "duplicate-position", "missing", "varying"],
)
def test_irregular_stacks_sort_but_give_no_grid(z: list[float], message: str) -> None:
    stack = sort_slices(_with_positions(slices(len(z)), z))  # results may still use them
    assert len(stack.planes) == len(z)
    with pytest.raises(SeriesError, match=message):
        regular_grid(stack)


def test_sheared_stack_gives_no_grid() -> None:
    dss = slices(6)
    for k, ds in enumerate(dss):
        ds.ImagePositionPatient = [10.0, 20.0 + 0.5 * k, 30.0 + 2.5 * k]  # ~11 degrees
    with pytest.raises(SeriesError, match=r"gantry tilt.*GantryDetectorTilt=11"):
        regular_grid(sort_slices(planes(dss)), gantry_tilt=11)


def test_volume_grid_of_a_simpleitk_image() -> None:
    loaded = load_series(slices(5, SAGITTAL))
    grid = VolumeGrid.of_image(loaded.image)
    np.testing.assert_allclose(grid.index_to_lps([2, 1, 3]), [5.0, 22.25, 29.5])


# --- the volume and the results agree ------------------------------------------------


def test_volume_and_results_sort_the_same_way() -> None:
    dss = slices(6, SAGITTAL)
    shuffled = list(dss)
    random.Random(2).shuffle(shuffled)
    volume = load_series([copy.deepcopy(d) for d in shuffled])
    described = SourceSeries.from_datasets(shuffled)
    assert volume.sop_instance_uids == tuple(str(d.SOPInstanceUID) for d in described.images)
    assert volume.sop_instance_uids == tuple(d.SOPInstanceUID for d in dss)


@pytest.mark.parametrize("case", ["stray-orientation", "uid-twice-moved", "mixed-spacing"])
def test_volume_and_results_refuse_the_same_series(case: str) -> None:
    dss = slices(5)
    if case == "stray-orientation":
        dss[2].ImageOrientationPatient = list(SAGITTAL)
    elif case == "uid-twice-moved":
        moved = copy.deepcopy(dss[2])
        moved.ImagePositionPatient = [0.0, 0.0, 0.0]
        dss.append(moved)
    else:
        dss[4].PixelSpacing = [0.5, 0.5]
    with pytest.raises(SeriesError) as in_volume:
        load_series([copy.deepcopy(d) for d in dss])
    with pytest.raises(SeriesError) as in_results:
        SourceSeries.from_datasets(dss)
    # Same rule; the volume names files/instances as "instance <UID>".
    assert str(in_volume.value).replace("instance ", "") == str(in_results.value).replace(
        "source instance ", ""
    )


def test_results_refuse_a_series_half_with_and_half_without_positions() -> None:
    dss = slices(4)
    del dss[1].ImagePositionPatient
    with pytest.raises(SeriesError, match="1 of 4 source instances lack Image Position"):
        SourceSeries.from_datasets(dss)
