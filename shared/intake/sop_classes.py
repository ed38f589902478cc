"""Which DICOM storage SOP classes xrayq takes: the image classes its decoder reads as one picture.

One table for every path -- `POST /v1/jobs`, batches and their ZIPs, `/v1/studies`, STOW-RS, the
C-STORE receiver's presentation contexts, dataset members -- so an instance is taken or refused alike
wherever it arrives. Projection radiographs are what the models are made for; a Secondary Capture is
how digitised films and several public chest X-ray collections are stored. Whether the content suits
a model is the job of the suitability warnings (Modality, BodyPartExamined against the model card),
not of this table. Cross-sectional and video classes (CT, MR, US...) are refused: a slice or a clip is
not a picture the models can read.
"""

from __future__ import annotations

import pydicom

from shared.intake import refusals

RADIOGRAPH_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
}
# The multi-frame classes are taken with one frame (that is how converters write a single film);
# an instance of several frames is refused as `dicom_multiframe`, on every path.
SECONDARY_CAPTURE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}
ACCEPTED_SOP_CLASSES = RADIOGRAPH_STORAGE_CLASSES | SECONDARY_CAPTURE_CLASSES


def sop_class_of(header: pydicom.Dataset) -> str:
    """The data set's SOPClassUID, or its meta header's when the data set lacks one."""
    sop_class = str(header.get("SOPClassUID", "")).strip()
    if not sop_class and getattr(header, "file_meta", None) is not None:
        sop_class = str(header.file_meta.get("MediaStorageSOPClassUID", "")).strip()
    return sop_class


def check_sop_class(header: pydicom.Dataset) -> None:
    sop_class = sop_class_of(header)
    if sop_class not in ACCEPTED_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "(none)"
        raise refusals.sop_class_not_supported(name)
