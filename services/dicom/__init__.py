"""The DICOM receiver (`xrayq dicom`): C-ECHO and C-STORE SCP feeding the same intake as the HTTP API."""
