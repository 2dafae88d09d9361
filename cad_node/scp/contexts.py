"""Presentation contexts the SCP accepts: SOP classes x transfer syntaxes.

Storage SOP classes are those a chest CT / chest X-ray workflow sends (PS3.4
Annex B.5, Table B.5-1), plus SR, Segmentation, Presentation State and Key
Object Selection so a PACS can echo results back to the node (they are stored
and indexed like images; the routing rules decide whether anything runs on
them).  dcmtk ``storescu`` proposes SR/SEG only with ``-R``.

Transfer syntaxes: every common one (PS3.5 Annex A).  The received bytes are
stored as-is; all of them decode later with pydicom + pylibjpeg (libjpeg,
openjpeg, rle plugins) or python-gdcm.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES", "VERIFICATION_SOP_CLASS"]

#: Verification SOP Class (C-ECHO, PS3.4 Annex A).
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: Transfer syntaxes accepted for every storage SOP class (PS3.5 Annex A),
#: in the order the node prefers them.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,  # A.2
    ImplicitVRLittleEndian,  # A.1
    DeflatedExplicitVRLittleEndian,  # A.5
    ExplicitVRBigEndian,  # A.3 (retired, still sent by old devices)
    JPEGBaseline8Bit,  # A.4.1 process 1
    JPEGExtended12Bit,  # A.4.1 processes 2 & 4
    JPEGLossless,  # A.4.1 process 14
    JPEGLosslessSV1,  # A.4.1 process 14, selection value 1
    JPEGLSLossless,  # A.4.3
    JPEGLSNearLossless,  # A.4.3
    JPEG2000Lossless,  # A.4.4
    JPEG2000,  # A.4.4 (lossy or lossless)
    RLELossless,  # A.4.2
)

#: Storage SOP classes accepted (name -> UID, PS3.4 Table B.5-1).
STORAGE_SOP_CLASSES: dict[str, str] = {
    # CT
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "LegacyConvertedEnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.2",
    # Projection radiography (chest X-ray)
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DigitalXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "XRayAngiographicImageStorage": "1.2.840.10008.5.1.4.1.1.12.1",
    # Secondary capture (all variants)
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameSingleBitSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.1",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.2",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.3",
    "MultiFrameTrueColorSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.4",
    # MR (not needed for chest; harmless)
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    # Results echoed back by a PACS
    "SegmentationStorage": "1.2.840.10008.5.1.4.1.1.66.4",
    "BasicTextSRStorage": "1.2.840.10008.5.1.4.1.1.88.11",
    "EnhancedSRStorage": "1.2.840.10008.5.1.4.1.1.88.22",
    "ComprehensiveSRStorage": "1.2.840.10008.5.1.4.1.1.88.33",
    "Comprehensive3DSRStorage": "1.2.840.10008.5.1.4.1.1.88.34",
    "KeyObjectSelectionDocumentStorage": "1.2.840.10008.5.1.4.1.1.88.59",
    "GrayscaleSoftcopyPresentationStateStorage": "1.2.840.10008.5.1.4.1.1.11.1",
}
