"""A local folder or file made into a dataset through the same intake as `POST /v1/datasets`.

A folder of CLASS/ (or SPLIT/CLASS/) subfolders is packed into a temporary ZIP, uncompressed, in
sorted order, and read by `read_upload` as if uploaded; a .npz or .zip file is read as it is. So the
starter model and `xrayq train DATA` get the same layout rules, image checks, de-identification and
content-addressed storage as an API upload, and their runs read the dataset the way a queued run does.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import Dataset
from shared.training.dataset_layout import parse_layout
from shared.training.datasets import NewDataset, create_dataset, read_upload

# A few unreadable files in a local folder are left out (and listed in the dataset's details), as
# training always did; more than this share of them refuses the folder.
MAX_UNREADABLE = 0.05


def dataset_from_path(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    path: Path,
    *,
    name: str,
    max_per_class: int | None = None,
    organisation: str | None = None,
) -> Dataset:
    """A new version of dataset `name` from `path` (flushed; the caller commits).

    `max_per_class` keeps the first N files of each class (and split) of a folder, in sorted order:
    quick runs then do not store images they would not train on.
    """
    path = Path(path).resolve()
    if path.is_dir():
        with tempfile.TemporaryFile(prefix="xrayq-dataset-", suffix=".zip") as archive:
            pack_folder(path, archive, max_per_class)
            archive.seek(0)
            upload = read_upload(archive, settings, skip_unreadable=True, classes=None)
            _check_unreadable_share(upload, path)
            return create_dataset(session, store, upload, name=name, organisation=organisation)
    if path.is_file():  # a .npz or a ZIP: read_upload refuses anything else
        with path.open("rb") as stream:
            upload = read_upload(stream, settings, skip_unreadable=False, classes=None)
            return create_dataset(session, store, upload, name=name, organisation=organisation)
    raise XrayqError("dataset_not_found", f"{path} is neither a folder of class subfolders nor a .npz or .zip file.")


def pack_folder(root: Path, archive: IO[bytes], max_per_class: int | None = None) -> int:
    """Write the folder's files (hidden ones left out) into `archive` as a stored ZIP; returns how many."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    names = [p.relative_to(root).as_posix() for p in files]
    if not names:
        raise XrayqError("dataset_empty", f"{root} holds no files.")
    if max_per_class is not None:
        names = _first_per_class(names, max_per_class)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as packed:
        for name in names:
            packed.write(root / name, name)
    return len(names)


def _first_per_class(names: list[str], cap: int) -> list[str]:
    """The first `cap` files of each (split, class), by the intake's own reading of the layout."""
    labelled = {entry.path: (entry.split, entry.label) for entry in parse_layout(names).files}
    taken: Counter[tuple[str, str]] = Counter()
    kept = []
    for name in names:
        key = labelled.get(name)
        if key is None:  # a document beside the data: the intake lists it as ignored
            kept.append(name)
        elif taken[key] < cap:
            taken[key] += 1
            kept.append(name)
    return kept


def _check_unreadable_share(upload: NewDataset, root: Path) -> None:
    skipped = upload.details["skipped_unreadable"]
    count = upload.details["skipped_unreadable_count"]
    if count > MAX_UNREADABLE * (count + len(upload.entries)):
        raise XrayqError(
            "dataset_unreadable_files",
            f"{count} of {count + len(upload.entries)} files in {root} are not readable images, "
            f"e.g. {[s['path'] for s in skipped[:5]]}; fix or remove them.",
            files=skipped,
        )
