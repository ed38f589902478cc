"""How archive paths become split and class labels, and which layouts are refused."""

from __future__ import annotations

import pytest

from shared.core.errors import XrayqError
from shared.training.dataset_layout import check_splits, parse_layout


def labels(paths: list[str]) -> list[tuple[str, str]]:
    return [(f.split, f.label) for f in parse_layout(paths).files]


def test_class_folders_are_training_data_and_a_wrapping_folder_is_dropped() -> None:
    assert labels(["NORMAL/a.png", "PNEUMONIA/sub/b.png"]) == [("train", "NORMAL"), ("train", "PNEUMONIA")]
    assert labels(["chest_xray/NORMAL/a.png", "chest_xray/PNEUMONIA/b.png"]) == [
        ("train", "NORMAL"),
        ("train", "PNEUMONIA"),
    ]


def test_split_folders_with_aliases() -> None:
    paths = ["data/train/A/1.png", "data/Validation/B/2.png", "data/test/A/3.png", "data/README.md"]
    layout = parse_layout(paths)
    assert [(f.split, f.label) for f in layout.files] == [("train", "A"), ("val", "B"), ("test", "A")]
    assert layout.ignored == ["data/README.md"] and layout.kind == "split_folders"


@pytest.mark.parametrize(
    ("paths", "code"),
    [
        (["train/A/1.png", "B/2.png"], "dataset_mixed_layout"),
        (["1.png", "A/2.png"], "dataset_invalid_layout"),
        (["train/1.png", "train/A/2.png"], "dataset_invalid_layout"),
        (["notes.txt"], "dataset_empty"),
        (["A/1.png", "-bad/2.png"], "dataset_invalid_class_name"),
    ],
)
def test_refused_layouts(paths: list[str], code: str) -> None:
    with pytest.raises(XrayqError) as caught:
        parse_layout(paths)
    assert caught.value.code == code


def test_splits_must_share_the_training_classes() -> None:
    assert check_splits({"train": {"A": 2, "B": 1}, "test": {"A": 1}}) == ["A", "B"]
    for counts, code in [
        ({"train": {"A": 3}}, "dataset_too_few_classes"),
        ({"test": {"A": 1, "B": 1}}, "dataset_empty"),
        ({"train": {"A": 1, "B": 1}, "val": {"C": 1}}, "dataset_split_mismatch"),
    ]:
        with pytest.raises(XrayqError) as caught:
            check_splits(counts)
        assert caught.value.code == code
