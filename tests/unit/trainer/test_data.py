"""Training data: patient groups, the grouped stratified split and colour detection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.trainer.data import LabelledImages, detect_color_of, patient_group, split_by_group
from tests.conftest import jpeg_bytes, png_bytes

# --- patient_group -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "group"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1_virus_6.jpeg", "person1"),
        ("person1000_bacteria_2932.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0115-0002.jpeg", "IM-0115"),
        ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
        ("scan_42.png", "scan_42"),
        ("patient.v2.final.png", "patient.v2.final"),
        ("personA_bacteria_1.jpeg", "personA_bacteria_1"),
        ("xperson12_virus_3.jpeg", "xperson12_virus_3"),
        ("IM-abc-0001.jpeg", "IM-abc-0001"),
    ],
)
def test_patient_group(filename: str, group: str) -> None:
    assert patient_group(filename) == group


def test_normal2_and_plain_im_are_different_patients() -> None:
    assert patient_group("NORMAL2-IM-0123-0001.jpeg") != patient_group("IM-0123-0001.jpeg")


# --- split_by_group ------------------------------------------------------------------------------------


def grouped_dataset(groups_per_class: tuple[int, ...] = (60, 40), seed: int = 0) -> LabelledImages:
    """Groups of 1 to 3 images, each group in one class, ids unique across classes."""
    rng = np.random.default_rng(seed)
    labels: list[int] = []
    groups: list[str] = []
    for label, n_groups in enumerate(groups_per_class):
        for g in range(n_groups):
            for _ in range(int(rng.integers(1, 4))):
                labels.append(label)
                groups.append(f"class{label}-patient{g}")
    n = len(labels)
    return LabelledImages(
        pixels=torch.zeros((n, 1, 8, 8), dtype=torch.uint8),
        labels=torch.tensor(labels, dtype=torch.long),
        classes=[f"c{i}" for i in range(len(groups_per_class))],
        groups=groups,
        names=[f"img{i}.png" for i in range(n)],
    )


def test_split_is_a_partition_of_all_indices() -> None:
    data = grouped_dataset()
    train, val = split_by_group(data, 0.2, seed=7)
    assert len(train) > 0 and len(val) > 0
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(data)))
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42])
def test_no_group_is_on_both_sides(seed: int) -> None:
    data = grouped_dataset(seed=seed)
    train, val = split_by_group(data, 0.25, seed=seed)
    train_groups = {data.groups[i] for i in train}
    val_groups = {data.groups[i] for i in val}
    assert train_groups and val_groups
    assert train_groups.isdisjoint(val_groups)


def test_a_group_with_images_in_two_classes_stays_on_one_side() -> None:
    # One patient, two images labelled 0 and one labelled 1 (say a follow-up scan read differently).
    data = LabelledImages(
        pixels=torch.zeros((3, 1, 8, 8), dtype=torch.uint8),
        labels=torch.tensor([0, 0, 1]),
        classes=["NORMAL", "PNEUMONIA"],
        groups=["person7", "person7", "person7"],
    )
    train, val = split_by_group(data, 0.5, seed=0)
    assert len(train) == 0 or len(val) == 0, f"train={train.tolist()} val={val.tolist()}"


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_split_is_stratified_per_class(fraction: float) -> None:
    data = grouped_dataset(groups_per_class=(90, 45, 30), seed=3)
    _, val = split_by_group(data, fraction, seed=11)
    totals = Counter(data.labels.tolist())
    in_val = Counter(data.labels[torch.as_tensor(val)].tolist())
    for label, total in totals.items():
        # Whole groups are taken until the target is reached: it overshoots by less than one group (<= 3).
        target = round(fraction * total)
        assert target <= in_val[label] < target + 3, (label, in_val[label], target)
        assert abs(in_val[label] / total - fraction) < 0.05


def test_split_is_stable_for_a_seed_and_changes_with_another() -> None:
    data = grouped_dataset()
    first = split_by_group(data, 0.2, seed=5)
    second = split_by_group(data, 0.2, seed=5)
    other = split_by_group(data, 0.2, seed=6)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_split_does_not_depend_on_the_order_of_examples() -> None:
    data = grouped_dataset()
    permutation = np.random.default_rng(0).permutation(len(data))
    shuffled = data.subset(permutation)
    _, val = split_by_group(data, 0.2, seed=5)
    _, val_shuffled = split_by_group(shuffled, 0.2, seed=5)
    assert sorted(data.names[i] for i in val) == sorted(shuffled.names[i] for i in val_shuffled)


def test_subset_and_class_counts() -> None:
    data = grouped_dataset(groups_per_class=(3, 2))
    train, val = split_by_group(data, 0.5, seed=1)
    part = data.subset(val)
    assert len(part) == len(val)
    assert part.groups == [data.groups[i] for i in val]
    assert part.names == [data.names[i] for i in val]
    assert part.pixels.shape == (len(val), 1, 8, 8)
    counts = data.class_counts()
    assert counts == {"c0": int((data.labels == 0).sum()), "c1": int((data.labels == 1).sum())}
    assert sum(data.subset(train).class_counts().values()) + sum(part.class_counts().values()) == len(data)


# --- detect_color_of -----------------------------------------------------------------------------------


def gradient_image(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(0, 255, size), (size, 1))
    return np.clip(base + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)


def detect_color(root: Path) -> str:
    """detect_color_of over a folder's images, in the order a dataset of it lists them."""
    return detect_color_of([path.read_bytes for path in sorted(p for p in root.rglob("*") if p.is_file())])


def save_rgb(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="RGB").save(path, format=fmt)


def test_detect_color_grey_images_stored_as_rgb(tmp_path: Path) -> None:
    for i in range(6):
        grey = gradient_image(i)
        rgb = np.stack([grey, grey, grey], axis=2)
        save_rgb(tmp_path / ("a" if i % 2 else "b") / f"{i}.png", rgb)
    (tmp_path / "b" / "j.jpeg").write_bytes(jpeg_bytes(np.stack([gradient_image(9)] * 3, axis=2)))
    assert Image.open(tmp_path / "a" / "1.png").mode == "RGB"
    assert detect_color(tmp_path) == "grayscale"


def test_detect_color_coloured_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        save_rgb(
            tmp_path / ("a" if i % 2 else "b") / f"{i}.png", rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        )
    assert detect_color(tmp_path) == "rgb"


def test_detect_color_one_coloured_image_among_grey_ones_is_rgb(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(png_bytes(gradient_image(i)))
    tinted = np.stack([gradient_image(7)] * 3, axis=2)
    tinted[..., 0] = 255  # a red channel pinned high: clearly colour
    save_rgb(tmp_path / "b" / "tinted.png", tinted)
    assert detect_color(tmp_path) == "rgb"
