"""Object storage for bytes (inputs, model weights, cards): S3/MinIO through boto3, or a local folder.

Both backends have the same small interface, so no caller knows which mode it runs in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

import boto3
from botocore.client import Config
from botocore.exceptions import ClientError

from shared.core.durable import STORE_PARTIAL_PREFIX, make_folders, sync_directory, sync_file
from shared.core.settings import Settings


class ObjectNotFound(KeyError):
    pass


DEFAULT_CONTENT_TYPE = "application/octet-stream"
# Name prefix of a local object still being written: never listed, never a key of its own.
_PARTIAL_PREFIX = STORE_PARTIAL_PREFIX


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing names it."""

    key: str
    size: int
    modified: datetime | None = None  # when it was last written (UTC), where the store says


@dataclass(frozen=True)
class ObjectReader:
    """An object opened for reading in pieces: backups copy objects of any size without holding one whole."""

    body: BinaryIO
    size: int
    content_type: str


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def ping(self) -> None: ...
    # Whole-store access (backup and restore): every object in key order, and streamed reads and writes.
    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]: ...
    def open_object(self, key: str) -> contextlib.AbstractContextManager[ObjectReader]: ...
    def put_stream(self, key: str, stream: BinaryIO, content_type: str = DEFAULT_CONTENT_TYPE) -> None: ...


class LocalObjectStore:
    """Objects as files under one folder; writes are atomic (temp file + rename) and durable (synced)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._prefix = os.path.join(self.root, "")

    def _path(self, key: str) -> Path:
        # Lexical, not Path.resolve(): no symlink walk per object (the store creates every path in it).
        path = os.path.normpath(os.path.join(self.root, key))
        if not path.startswith(self._prefix):
            raise ValueError(f"object key escapes the store: {key!r}")
        return Path(path)

    def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        with self._atomic_file(key) as handle:
            handle.write(data)

    def put_stream(self, key: str, stream: BinaryIO, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        with self._atomic_file(key) as handle:
            shutil.copyfileobj(stream, handle, 1024 * 1024)

    @contextlib.contextmanager
    def _atomic_file(self, key: str) -> Iterator[BinaryIO]:
        """A temporary file beside the object's path, renamed onto it once written: readers see all or nothing."""
        path = self._path(key)
        make_folders(path.parent, self.root)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_PARTIAL_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                sync_file(handle)  # the bytes on disk before the name points at them
            os.replace(tmp, path)
            sync_directory(path.parent)  # and the name itself: an accepted job's input survives a power loss
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def ping(self) -> None:
        if not self.root.is_dir():
            raise OSError(f"object store folder {self.root} is missing")

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        found = []
        # The folder the prefix names (prefixes here end at a folder: "inputs/2026/12/06/").
        top = self._path(prefix) if prefix else self.root
        for folder, _dirs, files in os.walk(top):
            for name in files:
                if name.startswith(_PARTIAL_PREFIX):
                    continue
                path = Path(folder, name)
                stat = path.stat()
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(StoredObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        yield from sorted(found, key=lambda item: item.key)

    @contextlib.contextmanager
    def open_object(self, key: str) -> Iterator[ObjectReader]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        with handle:
            yield ObjectReader(handle, os.fstat(handle.fileno()).st_size, DEFAULT_CONTENT_TYPE)


class S3ObjectStore:
    """Objects in one S3 bucket (MinIO in compose, moto's server in tests)."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            aws_access_key_id=settings.s3_access_key or None,
            aws_secret_access_key=settings.s3_secret_key or None,
            region_name=settings.s3_region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                max_pool_connections=32,
            ),
        )

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def put_stream(self, key: str, stream: BinaryIO, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        # Multipart above boto3's threshold (8 MiB), so an object of any size is sent in bounded pieces.
        self.client.upload_fileobj(stream, self.bucket, key, ExtraArgs={"ContentType": content_type})

    def get(self, key: str) -> bytes:
        return self._get_object(key)["Body"].read()

    def _get_object(self, key: str) -> dict:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from None
            raise

    def list_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        # S3 lists keys in UTF-8 binary order, a page of at most 1000 at a time.
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield StoredObject(item["Key"], item["Size"], item.get("LastModified"))

    @contextlib.contextmanager
    def open_object(self, key: str) -> Iterator[ObjectReader]:
        response = self._get_object(key)
        body = response["Body"]
        try:
            yield ObjectReader(body, response["ContentLength"], response.get("ContentType") or DEFAULT_CONTENT_TYPE)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError:
            return False

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_object_store(settings: Settings) -> ObjectStore:
    if settings.uses_s3:
        return S3ObjectStore(settings)
    assert settings.storage_dir is not None
    return LocalObjectStore(settings.storage_dir)
