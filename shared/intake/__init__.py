"""Every check on submitted bytes: single images, batch files, archives, DICOM instances, dataset members."""
