"""Images and DICOM: decoding, DICOM tags and networking (DIMSE), preprocessing, de-identification, SR."""
