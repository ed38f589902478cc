"""One constructor per intake refusal, so every path says the same thing with the same code.

The codes and their HTTP statuses are part of the API (see `shared.core.errors.ERROR_STATUS`); the
checks that decode images (`image_*`, `dicom_*` below the header) raise theirs in `shared.imaging`.
"""

from __future__ import annotations

from shared.core.errors import XrayqError


def file_too_large(filename: str, limit: int) -> XrayqError:
    return XrayqError("file_too_large", f"{filename!r} is larger than {limit} bytes.")


def missing_file() -> XrayqError:
    return XrayqError("missing_file", "Send at least one file in the `files` field.")


def too_many_files(count: int, limit: int) -> XrayqError:
    return XrayqError("too_many_files", f"{count} files; the limit is {limit}.")


def nested_archive() -> XrayqError:
    return XrayqError("nested_archive", "Archives inside an archive or a batch are not unpacked; send images.")


def archive_unreadable(detail: str) -> XrayqError:
    return XrayqError("archive_unreadable", detail)


def archive_unsafe_path(name: str) -> XrayqError:
    return XrayqError("archive_unsafe_path", f"Entry {name!r} escapes the archive.")


def archive_too_large(expanded: int, limit: int) -> XrayqError:
    return XrayqError("archive_too_large", f"The archive expands to {expanded} bytes; the limit is {limit}.")


def dicom_required(detail: str = "Study intake takes DICOM Part-10 instances only.") -> XrayqError:
    return XrayqError("dicom_required", detail)


def sop_class_not_supported(name: str) -> XrayqError:
    return XrayqError(
        "dicom_sop_class_not_supported",
        f"SOP class {name} is not an image xrayq reads (CR, DX, MG, IO radiographs or secondary captures).",
    )


def missing_study_uid() -> XrayqError:
    return XrayqError("dicom_missing_study_uid", "The instance has no StudyInstanceUID to group it by.")


def missing_uid(keyword: str) -> XrayqError:
    return XrayqError("dicom_missing_uid", f"The instance has no {keyword}; its result could not be filed.")


def invalid_uid(keyword: str, problem: str) -> XrayqError:
    return XrayqError("dicom_invalid_uid", f"The instance's {keyword} {problem} (PS3.5 9.1).")


def invalid_attribute(keyword: str, problem: str) -> XrayqError:
    return XrayqError("dicom_invalid_attribute", f"The instance's {keyword} {problem}.")
