"""Radiograph input: pixels for display, 2-D geometry, view/orientation, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from cad_node.config import SeriesMatch, chest_xr_rule
from cad_node.imaging import group_series, select_series
from cad_node.imaging.radiograph import (
    DX_FOR_PROCESSING_SOP_CLASS,
    RadiographRefusedError,
    display_pixels,
    load_radiograph,
    radiograph_geometry,
    radiograph_view,
)
from cad_node.scp.contexts import TRANSFER_SYNTAXES
from tests.conftest import require_data

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"


def _cr(rows: int = 300, cols: int = 280, bits: int = 12, **extra: object) -> Dataset:
    """A synthetic CR: a bright body with two dark lung-like ovals."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = 2000.0 + 1000.0 * np.exp(-(((xx - cols / 2) / (cols / 2.2)) ** 8))
    for cx in (0.3, 0.7):
        body -= 1500.0 * (((xx - cx * cols) / (cols * 0.15)) ** 2
                          + ((yy - rows * 0.45) / (rows * 0.3)) ** 2 < 1)
    pixels = np.clip(body, 0, (1 << bits) - 1).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_SOP_CLASS
    ds.SOPClassUID = CR_SOP_CLASS
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cr", str(rows), str(bits), str(extra)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _monochrome1_twin(ds: Dataset) -> Dataset:
    twin = copy.deepcopy(ds)
    top = (1 << int(ds.BitsStored)) - 1
    twin.PixelData = (top - ds.pixel_array.astype(np.int64)).astype(np.uint16).tobytes()
    twin.PhotometricInterpretation = "MONOCHROME1"
    return twin


@pytest.fixture(scope="module")
def siim() -> Dataset:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    return pydicom.dcmread(path)


# -- geometry -----------------------------------------------------------------------

def test_geometry_prefers_pixel_spacing() -> None:
    g = radiograph_geometry(_cr(PixelSpacing=[0.2, 0.25], ImagerPixelSpacing=[0.3, 0.3]))
    assert g.spacing_mm == (0.2, 0.25) and g.source == "PixelSpacing"
    assert g.area_cm2(100) == pytest.approx(100 * 0.2 * 0.25 / 100)
    assert g.width_mm(10) == pytest.approx(2.5)


def test_geometry_imager_spacing_with_magnification() -> None:
    g = radiograph_geometry(_cr(ImagerPixelSpacing=[0.3, 0.3],
                                EstimatedRadiographicMagnificationFactor=1.2))
    assert g.source == "ImagerPixelSpacing/ERMF"
    assert g.spacing_mm == pytest.approx((0.25, 0.25))


def test_geometry_imager_spacing_without_factor_says_so() -> None:
    g = radiograph_geometry(_cr(ImagerPixelSpacing=[0.3, 0.3]))
    assert g.spacing_mm == (0.3, 0.3) and "detector" in g.note


def test_no_spacing_means_no_mm() -> None:
    g = radiograph_geometry(_cr())
    assert not g.has_mm and g.area_cm2(100) is None and g.width_mm(5) is None
    assert "no mm" in g.note


# -- view and orientation -----------------------------------------------------------

@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "RAO"])
def test_lateral_views_refused(view: str) -> None:
    with pytest.raises(RadiographRefusedError, match="not a frontal"):
        radiograph_view(_cr(ViewPosition=view))


def test_lateral_patient_orientation_refused() -> None:
    with pytest.raises(RadiographRefusedError, match="lateral"):
        radiograph_view(_cr(ViewPosition="", PatientOrientation=["A", "F"]))


def test_rotated_image_refused() -> None:
    with pytest.raises(RadiographRefusedError, match="rotated"):
        radiograph_view(_cr(PatientOrientation=["F", "L"]))


def test_mirrored_image_is_flipped_back() -> None:
    plain = load_radiograph([_cr()])
    mirrored_ds = _cr(PatientOrientation=["R", "F"])
    mirrored_ds.PixelData = np.ascontiguousarray(
        _cr().pixel_array[:, ::-1]).tobytes()
    mirrored = load_radiograph([mirrored_ds])
    assert mirrored.view.flip_columns and not plain.view.flip_columns
    np.testing.assert_array_equal(mirrored.pixels, plain.pixels)
    assert any("mirrored" in n for n in mirrored.notes)
    # Mapping back to the stored grid undoes the flip.
    stored, _ = display_pixels(mirrored_ds)
    np.testing.assert_array_equal(mirrored.to_stored(mirrored.pixels), stored)
    assert mirrored.column_to_stored(10.0) == pytest.approx(280 - 10.0)


def test_upside_down_detected() -> None:
    v = radiograph_view(_cr(PatientOrientation=["L", "H"]))
    assert v.flip_rows and not v.flip_columns


def test_missing_view_is_noted() -> None:
    v = radiograph_view(_cr(ViewPosition=""))
    assert v.view_position is None and any("View Position absent" in n for n in v.notes)


# -- refusals -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"SOPClassUID": DX_FOR_PROCESSING_SOP_CLASS, "Modality": "DX"}, "For Processing"),
        ({"Modality": "DX", "PresentationIntentType": "FOR PROCESSING"}, "For Processing"),
        ({"BodyPartExamined": "HAND"}, "not a chest"),
        ({"Modality": "CT"}, "not a projection radiograph"),
    ],
)
def test_refusals_name_the_reason(extra: dict[str, object], reason: str) -> None:
    with pytest.raises(RadiographRefusedError, match=reason):
        load_radiograph([_cr(**extra)])


def test_tiny_image_refused() -> None:
    with pytest.raises(RadiographRefusedError, match="64x64 pixels is too small"):
        load_radiograph([_cr(rows=64, cols=64)])


# -- pixels -------------------------------------------------------------------------

def test_monochrome1_is_inverted_exactly() -> None:
    ds = _cr()
    a, _ = display_pixels(ds)
    b, note = display_pixels(_monochrome1_twin(ds))
    assert "MONOCHROME1 inverted" in note
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_window_applied_linear() -> None:
    ds = _cr(WindowCenter=2000, WindowWidth=1001)
    out, note = display_pixels(ds)
    stored = ds.pixel_array.astype(float)
    expected = np.clip((stored - 1999.5) / 1000.0 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert "window" in note


def test_voi_lut_sequence_applied() -> None:
    ds = _cr(bits=8)
    ds.PixelData = (ds.pixel_array.astype(np.uint16) % 256).tobytes()
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))  # an inverting LUT
    ds.VOILUTSequence = [item]
    out, note = display_pixels(ds)
    np.testing.assert_allclose(out, (255 - ds.pixel_array) / 255.0, atol=1e-6)
    assert note.startswith("VOI LUT")


def test_rescale_and_signed_16_bit() -> None:
    ds = _cr(bits=16, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=3900,
             WindowWidth=2001)
    signed = (ds.pixel_array.astype(np.int32) - 3000).astype(np.int16)
    ds.PixelRepresentation = 1
    ds.PixelData = signed.tobytes()
    out, _ = display_pixels(ds)
    values = signed.astype(float) * 2 - 100
    np.testing.assert_allclose(out, np.clip((values - 3899.5) / 2000 + 0.5, 0, 1), atol=1e-6)


def test_robust_window_without_voi() -> None:
    out, note = display_pixels(_cr())
    assert 0.0 <= out.min() and out.max() <= 1.0 and "robust window" in note


# -- every transfer syntax the SCP accepts ---------------------------------------

def _encode(ds: Dataset, uid: str, tmp: Path) -> Dataset:
    """``ds`` re-encoded in ``uid`` (pydicom encoders, else GDCM), read back from a file."""
    out = copy.deepcopy(ds)
    path = tmp / f"{uid}.dcm"
    if uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
               ExplicitVRBigEndian):
        out.file_meta.TransferSyntaxUID = uid
        if uid == ExplicitVRBigEndian:
            out.preamble = b"\0" * 128
            pydicom.dcmwrite(path, out, implicit_vr=False, little_endian=False,
                             force_encoding=True)
        else:
            out.save_as(path, enforce_file_format=True)
    elif uid in (RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless):
        out.compress(uid)
        out.save_as(path, enforce_file_format=True)
    elif uid == JPEG2000:
        out.compress(uid, j2k_cr=[5])
        out.save_as(path, enforce_file_format=True)
    else:  # the JPEG 10918 lossless and extended processes: GDCM encodes them
        import gdcm

        src = tmp / "src.dcm"
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(uid)))
        change.SetInput(reader.GetImage())
        assert change.Change(), uid
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == uid
    return back


LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}


@pytest.mark.parametrize("uid", TRANSFER_SYNTAXES)
def test_every_accepted_transfer_syntax_decodes(uid: str, siim: Dataset, tmp_path: Path) -> None:
    base = copy.deepcopy(siim)
    base.decompress()
    # A 512-pixel crop keeps the test fast; 8 bits stored, as the real CR.
    crop = np.ascontiguousarray(base.pixel_array[256:768, 256:768])
    base.Rows, base.Columns = crop.shape
    base.PixelData = crop.tobytes()
    reference, _ = display_pixels(base)
    if uid == JPEGBaseline8Bit:
        encoded = siim  # the real file is JPEG baseline
        out, _ = display_pixels(encoded)
        assert out.shape == (1024, 1024)
        return
    encoded = _encode(base, uid, tmp_path)
    out, _ = display_pixels(encoded)
    tolerance = 0.05 if uid in LOSSY else 1e-6
    assert np.abs(out - reference).mean() <= tolerance, uid


# -- routing ------------------------------------------------------------------------

def test_chest_xr_rule_routes_every_radiograph_the_pipeline_then_refuses() -> None:
    """Every CR/DX series reaches the pipeline (laterals, other body parts, mixed sizes),
    so a refusal reaches the PACS as a failure SR; a CT does not."""
    rule = chest_xr_rule()
    assert rule.name == "chest-xr" and rule.pipeline == "cxr" and rule.series == "all"
    frontal = _cr()
    unset = _cr(ViewPosition="", BodyPartExamined="")
    unset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.5"
    lateral = _cr(ViewPosition="LL")
    lateral.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    hand = _cr(BodyPartExamined="HAND")
    hand.Modality = "DX"
    hand.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4"
    # a PA and a lateral of other sizes in one series: analysed image by image
    pa2, lat2 = _cr(rows=320, cols=300), _cr(rows=300, cols=320, ViewPosition="LL")
    for ds in (pa2, lat2):
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.6"
    ct = _cr(Modality="CT")
    ct.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    series = group_series([frontal, unset, lateral, hand, pa2, lat2, ct])
    selection = select_series(series, rule)
    chosen = {s.series_instance_uid for s in selection}
    assert chosen == {frontal.SeriesInstanceUID, unset.SeriesInstanceUID,
                      lateral.SeriesInstanceUID, hand.SeriesInstanceUID, pa2.SeriesInstanceUID}
    assert "Modality CT" in selection.rejected[ct.SeriesInstanceUID]
    assert isinstance(rule.match, SeriesMatch)
    # the pipeline's refusals of the two that must not be analysed
    for ds, words in ((lateral, "View Position LL"), (hand, "Body Part Examined HAND")):
        with pytest.raises(RadiographRefusedError, match=words):
            load_radiograph([ds])
