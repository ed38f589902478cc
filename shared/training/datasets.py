"""Datasets: uploads of labelled images become immutable dataset versions with a manifest.

Every file is stored once, by content (`datasets/blobs/<sha256>`); a version's manifest lists its files
with label, split and sha256. An archive is read twice from its spooled file: once to check every
entry (nothing is stored if one fails), once to store them as they are read (at most 4 MiB in
flight). The manifest and the row come last, so a crash mid-way leaves no dataset behind (at most
blobs nothing refers to), and a version that extends another simply lists the other's files too.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import zipfile
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.parallel_puts import STREAM_IN_FLIGHT_BYTES, ParallelPuts
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import Dataset, new_id
from shared.imaging.decode import sniff_media_type
from shared.imaging.deidentify import deidentify
from shared.intake import refusals
from shared.intake.archives import checked_entries, open_zip, read_entry
from shared.intake.images import check_dataset_member
from shared.models.names import MODEL_NAME
from shared.training.dataset_layout import SPLITS, check_splits, parse_layout
from shared.training.manifest import ManifestEntry, NewDataset, blob_key
from shared.training.npz_upload import read_npz

MANIFEST_FORMAT = "xrayq-dataset/1"
# How many unreadable files a refusal lists by name.
_LISTED = 50


def check_dataset_name(name: str) -> str:
    if not MODEL_NAME.match(name):  # a dataset's name is the default name of its model
        raise XrayqError(
            "invalid_parameter", f"A dataset name is 1-64 lower-case letters, digits, '.', '_' or '-'; not {name!r}."
        )
    return name


# --- reading uploads ------------------------------------------------------------------------------


def read_upload(
    stream: IO[bytes], settings: Settings, *, skip_unreadable: bool, classes: list[str] | None
) -> NewDataset:
    """A ZIP of (split/)class folders or a MedMNIST-style .npz, validated; nothing is stored yet."""
    head = stream.read(8)
    stream.seek(0)
    if sniff_media_type(head + b"\0" * 124) != "application/zip":
        raise XrayqError("unsupported_media_type", "Upload a ZIP of class folders or a MedMNIST-style .npz.")
    archive = open_zip(stream)
    names = [info.filename for info in archive.infolist()]
    if names and all(name.endswith(".npy") for name in names):
        _dataset_entries(archive, settings)  # an .npz is a ZIP: the same bomb checks apply
        return read_npz(archive, settings, classes)
    return _read_class_folders(archive, settings, skip_unreadable=skip_unreadable)


def _read_class_folders(archive: zipfile.ZipFile, settings: Settings, *, skip_unreadable: bool) -> NewDataset:
    entries = _dataset_entries(archive, settings)
    layout = parse_layout([info.filename for info in entries])
    by_path = {info.filename: info for info in entries}
    # Keyed pseudonyms: one key per deployment keeps a patient's studies together across uploads.
    key = settings.deidentification_key or secrets.token_hex(32)
    sources: dict[str, zipfile.ZipInfo] = {}  # sha256 -> the entry that gives those bytes
    manifest: list[ManifestEntry] = []
    unreadable: list[dict[str, str]] = []
    for labelled in layout.files:
        info = by_path[labelled.path]
        try:
            data, media_type, record = _prepared(archive, info, settings, key)
        except XrayqError as error:
            unreadable.append({"path": labelled.path, "code": error.code, "detail": error.detail})
            continue
        sha256 = hashlib.sha256(data).hexdigest()
        sources.setdefault(sha256, info)
        manifest.append(
            ManifestEntry(labelled.path, labelled.split, labelled.label, sha256, len(data), media_type, record)
        )
    if unreadable and not skip_unreadable:
        raise XrayqError(
            "dataset_unreadable_files",
            f"{len(unreadable)} files are not readable images, e.g. {[u['path'] for u in unreadable[:5]]}; "
            "fix or remove them, or upload again with skip_unreadable=true to leave them out.",
            files=unreadable[:_LISTED],
        )
    details = {
        "source": "zip",
        "deidentified_dicom": sum(entry.deidentification is not None for entry in manifest),
        "layout": layout.kind,
        "ignored": layout.ignored[:_LISTED],
        "skipped_unreadable": unreadable[:_LISTED],
        "skipped_unreadable_count": len(unreadable),
    }

    def files() -> Iterator[tuple[str, bytes]]:
        for sha256, info in sources.items():
            data, _, _ = _prepared(archive, info, settings, key)
            if hashlib.sha256(data).hexdigest() != sha256:  # de-identification is deterministic per key
                raise refusals.archive_unreadable(f"{info.filename!r} changed while it was read.")
            yield sha256, data

    return NewDataset(manifest, details, files)


def _prepared(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, settings: Settings, key: str
) -> tuple[bytes, str, dict[str, Any] | None]:
    """An entry's bytes as they will be stored, its media type, and its de-identification record."""
    data = read_entry(archive, info, settings.max_file_bytes)
    media_type = check_dataset_member(info.filename, data, settings)
    if media_type != "application/dicom":
        return data, media_type, None
    # Training data keeps no patient identity: only the de-identified copy is stored.
    data, record = deidentify(data, key)
    return data, media_type, record.as_manifest()


def _dataset_entries(archive: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    return checked_entries(
        archive,
        max_files=settings.max_dataset_files,
        max_expanded_bytes=settings.max_dataset_expanded_bytes,
        empty_code="dataset_empty",
    )


# --- storing and describing -----------------------------------------------------------------------


def create_dataset(
    session: Session,
    store: ObjectStore,
    upload: NewDataset,
    *,
    name: str,
    parent: Dataset | None = None,
    organisation: str | None = None,
) -> Dataset:
    """Store the new files, then the manifest, then the row (flushed; the caller commits)."""
    check_dataset_name(name)
    entries = upload.entries
    details = dict(upload.details)
    if parent is not None:
        inherited = load_manifest(store, parent)["files"]
        entries = _merge(inherited, entries)
        details["extends"] = {"id": parent.id, "name": parent.name, "version": parent.version}
    counts = _counts(entries)
    classes = check_splits(counts)
    latest = session.scalar(select(func.max(Dataset.version)).where(Dataset.name == name))
    dataset = Dataset(id=new_id(), name=name, version=(latest or 0) + 1, parent_id=parent.id if parent else None)
    _put_files(store, upload.files())
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": dataset.id,
        "name": dataset.name,
        "version": dataset.version,
        "parent": parent.id if parent else None,
        "classes": classes,
        "files": [vars(entry) for entry in entries],
    }
    encoded = json.dumps(manifest, separators=(",", ":")).encode()
    dataset.manifest_key = f"datasets/{dataset.id}/manifest.json"
    dataset.manifest_sha256 = hashlib.sha256(encoded).hexdigest()
    store.put(dataset.manifest_key, encoded, "application/json")
    dataset.classes = classes
    dataset.counts = counts
    dataset.files = len(entries)
    dataset.size_bytes = sum(entry.bytes for entry in entries)
    dataset.details = details
    dataset.organisation = organisation
    session.add(dataset)
    session.flush()
    return dataset


def _merge(inherited: list[dict[str, Any]], new: list[ManifestEntry]) -> list[ManifestEntry]:
    """The parent's files plus the new ones; a file already there under another label is a conflict."""
    merged = [ManifestEntry(**entry) for entry in inherited]
    known = {entry.sha256: entry for entry in merged}
    for entry in new:
        existing = known.get(entry.sha256)
        if existing is None:
            merged.append(entry)
            known[entry.sha256] = entry
        elif existing.label != entry.label:
            raise XrayqError(
                "dataset_label_conflict",
                f"{entry.path!r} is already in the dataset as {existing.path!r} with label {existing.label!r}.",
            )
    return merged


def _counts(entries: list[ManifestEntry]) -> dict[str, dict[str, int]]:
    counter = Counter((entry.split, entry.label) for entry in entries)
    return {
        split: dict(sorted((label, n) for (s, label), n in counter.items() if s == split))
        for split in SPLITS
        if any(s == split for s, _ in counter)
    }


def _put_files(store: ObjectStore, files: Iterator[tuple[str, bytes]]) -> None:
    """Store files as they are read: in parallel, with a bounded amount of them in memory at once."""
    with ParallelPuts(store, STREAM_IN_FLIGHT_BYTES) as puts:
        for sha256, data in files:
            puts.put(blob_key(sha256), data)
        puts.wait()


def load_manifest(store: ObjectStore, dataset: Dataset) -> dict[str, Any]:
    data = store.get(dataset.manifest_key)
    if hashlib.sha256(data).hexdigest() != dataset.manifest_sha256:
        raise XrayqError("dataset_corrupt", f"The manifest of dataset {dataset.id} does not match its sha256.")
    manifest: dict[str, Any] = json.loads(data)
    return manifest


def find_dataset(session: Session, ref: str, organisation: str | None = None) -> Dataset:
    """By id, `name` (latest version) or `name@version`; other organisations' datasets do not exist."""
    query = select(Dataset)
    if organisation is not None:
        query = query.where(Dataset.organisation == organisation)
    name, _, version = ref.partition("@")
    row = session.scalars(query.where(Dataset.id == ref)).first()
    if row is None and version.isdigit():
        row = session.scalars(query.where(Dataset.name == name, Dataset.version == int(version))).first()
    elif row is None and not version:
        row = session.scalars(query.where(Dataset.name == name).order_by(Dataset.version.desc())).first()
    if row is None:
        raise XrayqError("dataset_not_found", f"No dataset {ref!r}.")
    return row
