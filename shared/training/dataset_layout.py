"""Where a labelled file sits in an uploaded archive says its split and class.

Accepted layouts (after one optional wrapping folder, e.g. `chest_xray/`):
- `CLASS/…/file`: every file is training data; a validation split is carved out at training time;
- `SPLIT/CLASS/…/file` with SPLIT one of train, val (validation), test.
Mixing the two is refused: the archive probably holds something other than the user thinks.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.core.errors import XrayqError
from shared.models.names import CLASS_NAME

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"} | {
    "test": "test",
    "testing": "test",
}
# Files that travel with datasets (README, label lists) but are not examples.
_DOCUMENT_SUFFIXES = (".txt", ".md", ".csv", ".json", ".yaml", ".yml", ".pdf", ".html")


@dataclass(frozen=True)
class LabelledPath:
    path: str  # the entry's path in the archive
    split: str
    label: str


@dataclass
class Layout:
    files: list[LabelledPath]
    ignored: list[str]  # documents beside the data, not examples
    kind: str  # "class_folders" or "split_folders"


def parse_layout(paths: list[str]) -> Layout:
    """Label every path by its folders; refuse layouts that are ambiguous or mixed."""
    ignored = [p for p in paths if p.lower().endswith(_DOCUMENT_SUFFIXES)]
    data_paths = [p for p in paths if not p.lower().endswith(_DOCUMENT_SUFFIXES)]
    if not data_paths:
        raise XrayqError("dataset_empty", "The upload holds no images.")
    parts = [p.split("/") for p in data_paths]
    parts = _strip_wrapping_folder(parts)
    is_split = [len(p) > 1 and p[0].lower() in _SPLIT_ALIASES for p in parts]
    if any(is_split) and not all(is_split):
        outside = [data_paths[i] for i, flag in enumerate(is_split) if not flag][:10]
        raise XrayqError(
            "dataset_mixed_layout",
            "Some files are in train/val/test folders and others are not, e.g. "
            f"{outside}. Put every file under SPLIT/CLASS/ or every file under CLASS/.",
            files=outside,
        )
    split_layout = bool(is_split) and all(is_split)
    depth = 3 if split_layout else 2
    misplaced = [data_paths[i] for i, p in enumerate(parts) if len(p) < depth][:10]
    if misplaced:
        where = "SPLIT/CLASS/" if split_layout else "CLASS/"
        raise XrayqError(
            "dataset_invalid_layout",
            f"Files must sit in {where} folders; these do not: {misplaced}.",
            files=misplaced,
        )
    files = []
    for original, p in zip(data_paths, parts, strict=True):
        split, label = (_SPLIT_ALIASES[p[0].lower()], p[1]) if split_layout else ("train", p[0])
        files.append(LabelledPath(original, split, label))
    check_class_names(sorted({f.label for f in files}))
    return Layout(files=files, ignored=ignored, kind="split_folders" if split_layout else "class_folders")


def check_class_names(classes: list[str]) -> None:
    bad = [name for name in classes if not CLASS_NAME.match(name)]
    if bad:
        raise XrayqError(
            "dataset_invalid_class_name",
            f"Class names are 1-64 letters, digits, spaces or _.+-() starting with a letter or digit: {bad[:10]}.",
        )


def check_splits(counts: dict[str, dict[str, int]]) -> list[str]:
    """The classes, from the training split; every other split must use only those classes."""
    train = counts.get("train", {})
    classes = sorted(label for label, n in train.items() if n > 0)
    if not classes:
        raise XrayqError("dataset_empty", "The training split holds no images.")
    if len(classes) < 2:
        raise XrayqError(
            "dataset_too_few_classes", f"A classifier needs at least two classes; this dataset has {classes}."
        )
    for split, per_class in counts.items():
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise XrayqError(
                "dataset_split_mismatch",
                f"Split {split!r} has classes the training split lacks: {unknown}.",
            )
    return classes


def _strip_wrapping_folder(parts: list[list[str]]) -> list[list[str]]:
    """Drop folders every path shares (zipping `chest_xray/` wraps everything in it).

    A shared folder that is a split name is kept (it is the layout), and so is one that would leave a
    file without a class folder.
    """
    while (
        len({p[0] for p in parts}) == 1 and parts[0][0].lower() not in _SPLIT_ALIASES and all(len(p) > 2 for p in parts)
    ):
        parts = [p[1:] for p in parts]
    return parts
