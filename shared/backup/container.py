"""Where a backup lives: a folder, or one uncompressed .tar file (X-rays, weights and dumps are compressed
already). Either is written under a temporary name and renamed once its manifest is in, so a backup that
was cut short never looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from shared.backup.manifest import MANIFEST_NAME, StoredFile
from shared.core.errors import XrayqError

CHUNK = 1024 * 1024


class HashingReader:
    """Counts and hashes what a consumer reads through it (tarfile, a copy loop, boto3's upload)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def is_tar(path: Path) -> bool:
    return path.suffix == ".tar"


class BackupWriter(Protocol):
    def add(self, name: str, stream: BinaryIO, size: int) -> StoredFile: ...
    def finish(self, manifest: bytes) -> None: ...
    def abandon(self) -> None: ...


class FolderWriter:
    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.partial = destination.with_name(f".{destination.name}.partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)

    def add(self, name: str, stream: BinaryIO, size: int) -> StoredFile:
        path = self.partial / name
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = HashingReader(stream)
        with path.open("wb") as handle:
            shutil.copyfileobj(reader, handle, CHUNK)  # type: ignore[misc]
        return _checked(name, reader, size)

    def finish(self, manifest: bytes) -> None:
        (self.partial / MANIFEST_NAME).write_bytes(manifest)
        if self.destination.is_dir():
            self.destination.rmdir()  # empty: checked before the backup began
        os.replace(self.partial, self.destination)

    def abandon(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


class TarWriter:
    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.partial = destination.with_name(f".{destination.name}.partial")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.tar = tarfile.open(self.partial, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 closed by finish/abandon

    def add(self, name: str, stream: BinaryIO, size: int) -> StoredFile:
        reader = HashingReader(stream)
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o600
        info.mtime = int(time.time())
        try:
            self.tar.addfile(info, reader)  # type: ignore[arg-type]
        except OSError as exc:  # tarfile's "unexpected end of data": the object shrank under us
            raise XrayqError("backup_failed", f"{name}: fewer bytes than the {size} announced ({exc})") from None
        return _checked(name, reader, size)

    def finish(self, manifest: bytes) -> None:
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(manifest)
        info.mode = 0o600
        info.mtime = int(time.time())
        self.tar.addfile(info, io.BytesIO(manifest))
        self.tar.close()
        os.replace(self.partial, self.destination)

    def abandon(self) -> None:
        self.tar.close()
        self.partial.unlink(missing_ok=True)


def _checked(name: str, reader: HashingReader, size: int) -> StoredFile:
    if reader.size != size:
        raise XrayqError("backup_failed", f"{name}: {reader.size} bytes read, {size} announced")
    return StoredFile(file=name, size=size, sha256=reader.digest.hexdigest())


def open_writer(destination: Path) -> BackupWriter:
    """A writer for a new backup at `destination`: a .tar file, or a folder that is absent or empty."""
    if destination.exists() and not (destination.is_dir() and not any(destination.iterdir())):
        raise XrayqError("backup_destination_exists", f"{destination} exists: name a new .tar file or an empty folder")
    return TarWriter(destination) if is_tar(destination) else FolderWriter(destination)


class BackupReader:
    """Reads the files of a backup by the names its manifest gives (checked by the manifest's model)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.tar: tarfile.TarFile | None = None
        if not source.exists():
            raise XrayqError("backup_invalid", f"{source} does not exist")
        if source.is_file():
            try:
                self.tar = tarfile.open(source, "r:")  # noqa: SIM115 closed by close()
            except tarfile.TarError as exc:
                raise XrayqError("backup_invalid", f"{source} is not a tar file: {exc}") from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def read_manifest(self) -> bytes:
        with self.open(MANIFEST_NAME) as handle:
            return handle.read()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self.tar is None:
            path = self.source / name
            if not path.is_file() or path.is_symlink():
                raise XrayqError("backup_invalid", f"{name} is missing from the backup {self.source}")
            with path.open("rb") as handle:
                yield handle
            return
        try:
            member = self.tar.getmember(name)
        except KeyError:
            raise XrayqError("backup_invalid", f"{name} is missing from the backup {self.source}") from None
        member_file = self.tar.extractfile(member) if member.isreg() else None
        if member_file is None:
            raise XrayqError("backup_invalid", f"{name} in the backup {self.source} is not a plain file")
        with member_file:
            yield member_file

    def verify(self, entry: StoredFile) -> None:
        """Reads one file whole and compares it with its manifest entry."""
        with self.open(entry.file) as handle:
            reader = HashingReader(handle)
            while reader.read(CHUNK):
                pass
        check_digest(entry, reader)


def check_digest(entry: StoredFile, reader: HashingReader) -> None:
    if reader.size != entry.size or reader.digest.hexdigest() != entry.sha256:
        raise XrayqError(
            "backup_corrupt",
            f"{entry.file} does not match the manifest (size {reader.size} for {entry.size}, or its sha256):"
            " the backup was changed or damaged",
        )
