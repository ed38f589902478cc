from __future__ import annotations

import io

import pytest

from shared.core.storage import LocalObjectStore, ObjectNotFound, S3ObjectStore, make_object_store


@pytest.fixture(params=["s3", "local"])
def store(request, services_settings, tmp_path):
    if request.param == "s3":
        s3 = make_object_store(services_settings)
        assert isinstance(s3, S3ObjectStore)
        return s3
    return LocalObjectStore(tmp_path / "objects")


def test_put_get_exists_delete_round_trip(store) -> None:
    store.ping()
    key = "inputs/test/round-trip"
    assert not store.exists(key)
    store.put(key, b"\x89PNG bytes", "image/png")
    assert store.exists(key)
    assert store.get(key) == b"\x89PNG bytes"
    store.put(key, b"replaced")
    assert store.get(key) == b"replaced"
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.get(key)


def test_local_store_refuses_keys_that_escape_its_folder(tmp_path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        store.put("../outside", b"x")


@pytest.fixture(params=["s3", "local"])
def empty_store(request, services_settings, tmp_path):
    if request.param == "s3":
        import uuid

        s3 = S3ObjectStore(services_settings.model_copy(update={"s3_bucket": f"xrayq-listing-{uuid.uuid4().hex[:8]}"}))
        s3.ensure_bucket()
        return s3
    return LocalObjectStore(tmp_path / "objects")


def test_every_object_is_listed_in_key_order_and_streams_both_ways(empty_store, tmp_path) -> None:
    big = bytes(range(256)) * 40_000  # 10 MB: past boto3's multipart threshold
    empty_store.put("models/m/1/card.json", b"{}", "application/json")
    empty_store.put_stream("inputs/2026/a", io.BytesIO(big), "image/png")
    if isinstance(empty_store, LocalObjectStore):  # a write in progress is no object yet
        (empty_store.root / "inputs" / "2026" / ".tmp-unfinished").write_bytes(b"half")
    listed = list(empty_store.list_objects())
    assert [(item.key, item.size) for item in listed] == [("inputs/2026/a", len(big)), ("models/m/1/card.json", 2)]
    with empty_store.open_object("inputs/2026/a") as reader:
        assert reader.size == len(big)
        assert b"".join(iter(lambda: reader.body.read(1 << 20), b"")) == big
        if isinstance(empty_store, S3ObjectStore):
            assert reader.content_type == "image/png"
    with pytest.raises(ObjectNotFound), empty_store.open_object("inputs/2026/missing"):
        pass
