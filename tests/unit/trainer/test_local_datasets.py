"""A local folder becomes a dataset through the upload intake, and its images the run's training data.

Against the embedded backends (SQLite file, local object store), which `xrayq train` uses without a server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.trainer.data import load_examples
from services.trainer.local_datasets import dataset_from_path
from services.trainer.runs import examples_by_split
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import LocalObjectStore, make_object_store
from shared.db.bootstrap import prepare_backends
from shared.db.session import database_for
from shared.imaging.preprocess import PreprocessSpec
from shared.training.datasets import load_manifest
from tests.conftest import png_bytes
from tests.unit.trainer.test_data import gradient_image


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    prepare_backends(settings)
    return settings


def make_folder(root: Path, counts: dict[str, int], corrupt: int = 0) -> Path:
    seed = 0
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"person{i}_x_{i}.png").write_bytes(png_bytes(gradient_image(seed)))
            seed += 1
    for i in range(corrupt):
        whole = png_bytes(gradient_image(1000 + i))
        (root / next(iter(counts)) / f"broken{i}.png").write_bytes(whole[: len(whole) // 3])
    return root


def load_folder(settings: Settings, root: Path, spec: PreprocessSpec, max_per_class: int | None = None):
    """The folder as a dataset, then its training split as the run executor reads it."""
    store = make_object_store(settings)
    with database_for(settings).session() as session:
        dataset = dataset_from_path(session, store, settings, root, name="local", max_per_class=max_per_class)
        manifest = load_manifest(store, dataset)
        details = dict(dataset.details)
    examples = examples_by_split(store, manifest, manifest["classes"])
    assert set(examples) == {"train"}
    return load_examples(examples["train"], manifest["classes"], spec), details


def test_a_folder_is_read_like_an_upload(settings: Settings, tmp_path: Path) -> None:
    # Folders created out of alphabetical order; the class order must still be sorted.
    root = make_folder(tmp_path / "data", {"PNEUMONIA": 11, "NORMAL": 9}, corrupt=1)
    (root / "NORMAL" / "readme.txt").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "thumbs.png").write_bytes(b"hidden: never packed")

    data, details = load_folder(settings, root, PreprocessSpec(size=32))

    assert data.classes == ["NORMAL", "PNEUMONIA"]
    assert len(data) == 20  # the corrupt file and the text file are left out
    assert [s["path"] for s in details["skipped_unreadable"]] == ["PNEUMONIA/broken0.png"]
    assert details["ignored"] == ["NORMAL/readme.txt"]
    assert data.pixels.shape == (20, 1, 32, 32)
    assert data.pixels.dtype == torch.uint8
    assert data.labels.dtype == torch.long
    assert data.labels.tolist() == [0] * 9 + [1] * 11
    assert all(name.startswith("NORMAL/") for name in data.names[:9])
    assert all(name.startswith("PNEUMONIA/") for name in data.names[9:])
    assert data.names[:3] == ["NORMAL/person0_x_0.png", "NORMAL/person1_x_1.png", "NORMAL/person2_x_2.png"]
    assert data.groups[0] == "person0"  # by patient, not by folder: one patient never straddles the split
    # Real content, not blank tensors: the horizontal gradient survives preprocessing.
    assert data.pixels[:, :, :, -1].float().mean() > data.pixels[:, :, :, 0].float().mean() + 100


def test_files_are_stored_once_by_content(settings: Settings, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "b" / "copy.png").write_bytes((root / "b" / "person0_x_0.png").read_bytes())
    store = make_object_store(settings)
    assert isinstance(store, LocalObjectStore)
    with database_for(settings).session() as session:
        dataset = dataset_from_path(session, store, settings, root, name="local")
        assert dataset.files == 5
    blobs = [p for p in (store.root / "datasets" / "blobs").iterdir() if not p.name.startswith(".")]
    assert len(blobs) == 4


def test_rgb_spec_gives_three_channels(settings: Settings, tmp_path: Path) -> None:
    data, _ = load_folder(
        settings, make_folder(tmp_path / "data", {"a": 2, "b": 2}), PreprocessSpec(size=16, color="rgb")
    )
    assert data.pixels.shape == (4, 3, 16, 16)


def test_max_per_class_keeps_the_first_files_of_each_class(settings: Settings, tmp_path: Path) -> None:
    data, _ = load_folder(settings, make_folder(tmp_path / "data", {"a": 5, "b": 4}), PreprocessSpec(size=16), 2)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.names == ["a/person0_x_0.png", "a/person1_x_1.png", "b/person0_x_0.png", "b/person1_x_1.png"]


def test_many_unreadable_files_refuse_the_folder(settings: Settings, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3}, corrupt=2)
    with pytest.raises(XrayqError) as caught, database_for(settings).session() as session:
        dataset_from_path(session, make_object_store(settings), settings, root, name="local")
    assert caught.value.code == "dataset_unreadable_files"
    assert "a/broken0.png" in caught.value.detail


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda root: make_folder(root, {"only": 3}), "dataset_too_few_classes"),
        (lambda root: root / "nope", "dataset_not_found"),
        (lambda root: (root.mkdir(), root)[1], "dataset_empty"),
    ],
)
def test_folders_that_are_no_dataset_get_the_intakes_codes(settings: Settings, tmp_path: Path, make, code) -> None:
    root = make(tmp_path / "data")
    with pytest.raises(XrayqError) as caught, database_for(settings).session() as session:
        dataset_from_path(session, make_object_store(settings), settings, root, name="local")
    assert caught.value.code == code


def test_an_npz_file_keeps_its_splits(settings: Settings, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    path = tmp_path / "small.npz"
    np.savez(path, **arrays)
    with database_for(settings).session() as session:
        dataset = dataset_from_path(session, make_object_store(settings), settings, path, name="small")
        assert dataset.counts == {"train": {"0": 3, "1": 3}, "val": {"0": 1, "1": 1}, "test": {"0": 1, "1": 1}}
