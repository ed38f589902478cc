"""DICOM instances for study intake (REST `/v1/studies`, STOW-RS, C-STORE): the checks every file gets,
plus what grouping by study needs -- DICOM only, and a StudyInstanceUID."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import pydicom

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.imaging import dicom
from shared.imaging.decode import sniff_media_type
from shared.intake import refusals
from shared.intake.images import inspect
from shared.intake.sop_classes import sop_class_of
from shared.intake.upload import Upload
from shared.intake.uploads import SubmittedFile, check_file_count, clean_filename, within_limit

T = TypeVar("T")


@dataclass
class Refused:
    """An instance that joined no study, and why (STOW-RS and DIMSE report it per instance)."""

    filename: str
    error: XrayqError
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


def check_instance(filename: str, data: bytes, settings: Settings) -> Upload:
    """A usable DICOM image with a study to join, with its identifying tags; else its XrayqError."""
    within_limit(data, settings.max_file_bytes, filename)
    if data and sniff_media_type(data) != "application/dicom":  # an empty file is `empty_file`, as anywhere
        raise refusals.dicom_required()
    inspected = inspect(filename, data, settings)
    assert inspected.header is not None  # a DICOM file that passed `inspect`
    check_report_attributes(inspected.header)
    return Upload(filename, data, "application/dicom", dicom=inspected.dicom or {})


# The UIDs a study's report references its instances by, and grouping by study needs (the SR's evidence
# and source images: PS3.3 C.17.2). Each must be in the data set itself, not only in the meta header.
REPORT_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Study batches keep the AccessionNumber in a column (and in the key of the open study) of this width.
MAX_ACCESSION_LENGTH = 64


def check_report_attributes(header: pydicom.Dataset) -> None:
    """Refuse now what would make the study's report fail later: a UID missing, too long or malformed."""
    for keyword in REPORT_UIDS:
        value = str(header.get(keyword, "") or "").strip()
        if not value:
            raise refusals.missing_study_uid() if keyword == "StudyInstanceUID" else refusals.missing_uid(keyword)
        problem = dicom.uid_problem(value)
        if problem is not None:
            raise refusals.invalid_uid(keyword, problem)
    accession = str(header.get("AccessionNumber", "") or "")
    if len(accession) > MAX_ACCESSION_LENGTH:
        raise refusals.invalid_attribute("AccessionNumber", f"is longer than {MAX_ACCESSION_LENGTH} characters")


def refusal(filename: str, data: bytes, error: XrayqError) -> Refused:
    """A refusal with whatever UIDs can still be read, so the sender can tell which instance it was."""
    sop_class = sop_instance = None
    if sniff_media_type(data) == "application/dicom":
        try:
            header = dicom.read_header(data)
        except XrayqError:
            header = None
        if header is not None:
            sop_class = sop_class_of(header) or None
            sop_instance = str(header.get("SOPInstanceUID", "")) or None
    return Refused(filename, error, sop_class, sop_instance)


def accepted_instances(
    named: Iterable[tuple[str, bytes]], settings: Settings, refused: list[Refused]
) -> Iterator[Upload]:
    """The usable instances of (filename, bytes) pairs, checked one at a time as they are taken; the
    others are appended to `refused` (with their UIDs, not their bytes), in order."""
    for filename, data in named:
        try:
            yield check_instance(filename, data, settings)
        except XrayqError as error:
            # Without its traceback: its frames would keep the refused instance's bytes alive.
            refused.append(refusal(filename, data, error.with_traceback(None)))


def nonempty(items: Iterator[T]) -> Iterator[T] | None:
    """`items` unchanged if it yields anything, None if it yields nothing: whether any instance is
    usable is known before anything is made of them (only the first is taken ahead)."""
    first = next(items, _NOTHING)
    if first is _NOTHING:
        return None
    return itertools.chain((cast(T, first),), items)


_NOTHING = object()


def study_files(files: Sequence[SubmittedFile], settings: Settings) -> Iterator[tuple[str, bytes]]:
    """A `/v1/studies` request's files, named, each read (up to one byte past the file limit) when taken."""
    check_file_count(len(files), settings)
    return (
        (clean_filename(file.filename, f"file-{index}"), file.file.read(settings.max_file_bytes + 1))
        for index, file in enumerate(files)
    )
