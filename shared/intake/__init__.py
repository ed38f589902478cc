"""Every check on submitted bytes: single images, batch files, ZIP entries, DICOM instances (REST,
STOW-RS, C-STORE) and dataset members, so the same file gets the same answer on every path.

- `images.inspect`: the one check of one file (size, type, header, pixels, completeness, SOP class);
- `uploads`: reading files within their limits, names, a batch's files and its ZIP;
- `archives`: the one ZIP reader (path escapes, bombs, entry limits), for batches and datasets;
- `instances`: study intake's extra needs (DICOM only, a StudyInstanceUID) and its refusals;
- `sop_classes`: which DICOM storage classes are taken, also at C-STORE negotiation;
- `refusals`: one constructor per intake error code.
"""
