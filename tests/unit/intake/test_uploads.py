"""Submitted files and ZIP archives become checked `Upload`s, within hard limits."""

from __future__ import annotations

import io
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.intake.images import check_file
from shared.intake.uploads import clean_filename, expand_zip, read_bounded
from tests.conftest import jpeg_bytes, png_bytes


def grey(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)


def colour(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def make_zip(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


# --- expand_zip: the happy path -------------------------------------------------------------------


def test_images_come_back_in_archive_order_with_names_kept(settings: Settings) -> None:
    entries = [
        ("scans/zeta.png", png_bytes(grey(1))),
        ("alpha.jpg", jpeg_bytes(colour(2))),
        ("scans/deep/middle.jpeg", jpeg_bytes(grey(3, size=80))),
        ("beta.png", png_bytes(colour(4))),
    ]
    uploads = list(expand_zip(make_zip(entries), settings))

    assert [u.filename for u in uploads] == [name for name, _ in entries]
    assert [u.error for u in uploads] == [None] * 4
    assert [u.media_type for u in uploads] == ["image/png", "image/jpeg", "image/jpeg", "image/png"]
    assert [u.data for u in uploads] == [data for _, data in entries]


def test_stored_entries_are_read_like_deflated_ones(settings: Settings) -> None:
    data = png_bytes(grey(5))
    uploads = list(expand_zip(make_zip([("a.png", data)], compression=zipfile.ZIP_STORED), settings))
    assert len(uploads) == 1
    assert uploads[0].error is None and uploads[0].data == data


def test_directory_entries_are_not_uploads(settings: Settings) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.mkdir("folder")
        archive.writestr("folder/a.png", png_bytes(grey(6)))
    uploads = list(expand_zip(buffer.getvalue(), settings))
    assert [u.filename for u in uploads] == ["folder/a.png"]


# --- expand_zip: unsafe paths refuse the whole archive -------------------------------------------


@pytest.mark.parametrize(
    "bad_name",
    ["../../x.png", "/abs.png", "a/../../b.png", "C:/x.png", "..\\x.png", "a\\..\\..\\b.png", "C:\\x.png"],
)
def test_path_escapes_refuse_the_whole_archive(settings: Settings, bad_name: str) -> None:
    good = png_bytes(grey(7))
    data = make_zip([("fine-first.png", good), (bad_name, good), ("fine-last.png", good)])
    # The entry name really is in the archive as written (zipfile keeps it verbatim when reading).
    assert bad_name in zipfile.ZipFile(io.BytesIO(data)).namelist()

    with pytest.raises(XrayqError) as caught:
        expand_zip(data, settings)
    assert caught.value.code == "archive_unsafe_path"
    assert repr(bad_name) in caught.value.detail


def test_unsafe_path_is_refused_even_when_it_is_the_last_entry(settings: Settings) -> None:
    good = png_bytes(grey(8))
    data = make_zip([(f"ok-{i}.png", good) for i in range(3)] + [("../escape.png", good)])
    with pytest.raises(XrayqError) as caught:
        expand_zip(data, settings)
    assert caught.value.code == "archive_unsafe_path"


def test_dot_dot_inside_a_name_is_not_a_path_escape(settings: Settings) -> None:
    data = make_zip([("scan..v2.png", png_bytes(grey(9))), ("dir/..hidden.png", png_bytes(grey(10)))])
    uploads = list(expand_zip(data, settings))
    assert [u.filename for u in uploads] == ["scan..v2.png", "dir/..hidden.png"]
    assert all(u.error is None for u in uploads)


# --- expand_zip: limits -----------------------------------------------------------------------------


def test_zip_bomb_is_refused_by_declared_size(tmp_path: Path) -> None:
    bomb = make_zip([("zeros.png", bytes(20 * 1024 * 1024))])
    assert len(bomb) < 200_000  # it really is a bomb: tiny on the wire, 20 MB expanded
    settings = Settings(home=tmp_path, max_zip_expanded_bytes=1024 * 1024)
    with pytest.raises(XrayqError) as caught:
        expand_zip(bomb, settings)
    assert caught.value.code == "archive_too_large"


def test_expanded_size_is_summed_over_entries(tmp_path: Path) -> None:
    # Each entry alone is under the limit; together they are over it.
    entries = [(f"part-{i}.png", bytes(400_000)) for i in range(3)]
    settings = Settings(home=tmp_path, max_zip_expanded_bytes=1_000_000)
    with pytest.raises(XrayqError) as caught:
        expand_zip(make_zip(entries), settings)
    assert caught.value.code == "archive_too_large"


def test_lying_size_header_cannot_expand_past_the_declared_size(tmp_path: Path) -> None:
    real = bytes(1_000_000)
    data = bytearray(make_zip([("liar.png", real)]))
    # Rewrite the uncompressed size in the central directory (what zipfile trusts) to 100 bytes.
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0].file_size == 100

    settings = Settings(home=tmp_path, max_zip_expanded_bytes=1_000)
    uploads = list(expand_zip(bytes(data), settings))
    assert len(uploads) == 1
    assert len(uploads[0].data) <= 100
    assert uploads[0].error is not None
    assert uploads[0].error.code == "archive_unreadable"


def test_more_entries_than_the_batch_limit_are_refused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_batch_files=3)
    image = png_bytes(grey(11))
    with pytest.raises(XrayqError) as caught:
        expand_zip(make_zip([(f"{i}.png", image) for i in range(4)]), settings)
    assert caught.value.code == "too_many_files"


def test_exactly_the_batch_limit_is_accepted_and_clutter_does_not_count(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_batch_files=3)
    image = png_bytes(grey(12))
    entries = [(f"{i}.png", image) for i in range(3)]
    entries += [("__MACOSX/._0.png", b"\x00\x05\x16\x07"), (".DS_Store", b"Bud1"), ("sub/Thumbs.db", b"x")]
    uploads = list(expand_zip(make_zip(entries), settings))
    assert [u.filename for u in uploads] == ["0.png", "1.png", "2.png"]


def test_empty_zip_is_refused(settings: Settings) -> None:
    with pytest.raises(XrayqError) as caught:
        expand_zip(make_zip([]), settings)
    assert caught.value.code == "archive_empty"


def test_zip_of_only_clutter_is_empty(settings: Settings) -> None:
    data = make_zip([("__MACOSX/a.png", b"junk"), ("photos/.DS_Store", b"Bud1"), ("._a.png", b"junk")])
    with pytest.raises(XrayqError) as caught:
        expand_zip(data, settings)
    assert caught.value.code == "archive_empty"


def test_archiver_clutter_is_skipped(settings: Settings) -> None:
    entries = [
        ("__MACOSX/", b""),
        ("__MACOSX/scans/._a.png", b"\x00\x05\x16\x07 resource fork"),
        ("scans/a.png", png_bytes(grey(13))),
        ("scans/.DS_Store", b"Bud1 not an image"),
        (".DS_Store", b"Bud1"),
        ("b.jpg", jpeg_bytes(grey(14))),
        ("desktop.ini", b"[.ShellClassInfo]"),
    ]
    uploads = list(expand_zip(make_zip(entries), settings))
    assert [u.filename for u in uploads] == ["scans/a.png", "b.jpg"]
    assert all(u.error is None for u in uploads)


# --- expand_zip: per-entry refusals keep their place -------------------------------------------------


def test_nested_archive_is_refused_as_one_entry(settings: Settings) -> None:
    inner = make_zip([("inner.png", png_bytes(grey(15)))])
    entries = [("a.png", png_bytes(grey(16))), ("more.zip", inner), ("c.jpg", jpeg_bytes(grey(17)))]
    uploads = list(expand_zip(make_zip(entries), settings))

    assert [u.filename for u in uploads] == ["a.png", "more.zip", "c.jpg"]
    assert uploads[0].error is None and uploads[2].error is None
    nested = uploads[1]
    assert nested.error is not None and nested.error.code == "nested_archive"
    assert nested.media_type == "application/zip"


def test_corrupt_image_fails_alone(settings: Settings) -> None:
    whole = png_bytes(grey(18, size=128))
    truncated = whole[: len(whole) // 2]
    entries = [("before.png", png_bytes(grey(19))), ("broken.png", truncated), ("after.jpg", jpeg_bytes(grey(20)))]
    uploads = list(expand_zip(make_zip(entries), settings))

    assert [u.filename for u in uploads] == ["before.png", "broken.png", "after.jpg"]
    assert uploads[0].error is None and uploads[2].error is None
    broken = uploads[1]
    assert broken.error is not None and broken.error.code == "image_unreadable"
    assert broken.media_type == "image/png"


def test_non_image_entry_fails_alone(settings: Settings) -> None:
    entries = [("notes.txt", b"just some text, not a scan"), ("a.png", png_bytes(grey(21)))]
    uploads = list(expand_zip(make_zip(entries), settings))
    assert uploads[0].error is not None and uploads[0].error.code == "unsupported_media_type"
    assert uploads[1].error is None


def test_garbage_with_zip_magic_is_unreadable(settings: Settings) -> None:
    garbage = b"PK\x03\x04" + bytes(range(256)) * 8
    with pytest.raises(XrayqError) as caught:
        expand_zip(garbage, settings)
    assert caught.value.code == "archive_unreadable"


def test_entry_over_the_file_limit_fails_alone(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_file_bytes=20_000)
    small = png_bytes(grey(22))
    big = png_bytes(grey(23, size=256))  # random pixels hardly compress: ~65 kB
    assert len(small) <= 20_000 < len(big)
    uploads = list(expand_zip(make_zip([("small.png", small), ("big.png", big)]), settings))

    assert [u.filename for u in uploads] == ["small.png", "big.png"]
    assert uploads[0].error is None and uploads[0].data == small
    assert uploads[1].error is not None and uploads[1].error.code == "file_too_large"
    assert uploads[1].data == b""


# --- check_file ----------------------------------------------------------------------------------


def test_check_file_accepts_png_and_jpeg(settings: Settings) -> None:
    png, jpeg = png_bytes(grey(24)), jpeg_bytes(colour(25))
    assert check_file("a.png", png, settings).media_type == "image/png"
    upload = check_file("b.jpg", jpeg, settings)
    assert (upload.filename, upload.data, upload.media_type, upload.error) == ("b.jpg", jpeg, "image/jpeg", None)


def test_check_file_trusts_content_not_name(settings: Settings) -> None:
    upload = check_file("scan.png", jpeg_bytes(grey(26)), settings)
    assert upload.media_type == "image/jpeg" and upload.error is None


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"%PDF-1.7 not an image", "unsupported_media_type"),
        (png_bytes(grey(27, size=16)), "image_too_small"),
        (png_bytes(grey(28))[:60], "image_unreadable"),
    ],
)
def test_check_file_refusals_carry_their_code(settings: Settings, data: bytes, code: str) -> None:
    upload = check_file("x", data, settings)
    assert upload.error is not None and upload.error.code == code
    assert upload.filename == "x" and upload.data == data


def test_check_file_honours_the_pixel_limit(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_image_pixels=64 * 64 - 1)
    upload = check_file("x.png", png_bytes(grey(29)), settings)
    assert upload.error is not None and upload.error.code == "image_too_large"


def test_check_file_refuses_zip(settings: Settings) -> None:
    upload = check_file("x.zip", make_zip([("a.png", png_bytes(grey(30)))]), settings)
    assert upload.error is not None and upload.error.code == "nested_archive"


# --- clean_filename and read_bounded ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scan.png", "scan.png"),
        ("folder/sub/scan.png", "scan.png"),
        ("/etc/passwd", "passwd"),
        ("C:\\Users\\me\\scan 01.png", "scan 01.png"),
        ("..\\..\\x.png", "x.png"),
        ("sc\x00an\n\r\t.png", "scan.png"),
        ("bad\x1b[31mname.png", "bad[31mname.png"),
        ("écho-ü.jpeg", "écho-ü.jpeg"),
    ],
)
def test_clean_filename_strips_directories_and_control_characters(name: str, expected: str) -> None:
    assert clean_filename(name, "fallback") == expected


@pytest.mark.parametrize("name", [None, "", "dir/", "a\\b\\", "\x00\x01\n", "folder/\x7f"])
def test_clean_filename_falls_back_when_nothing_is_left(name: str | None) -> None:
    assert clean_filename(name, "file-3") == "file-3"


def test_clean_filename_caps_length() -> None:
    assert clean_filename("a" * 1000 + ".png", "f") == "a" * 255


def test_read_bounded_returns_data_up_to_the_limit() -> None:
    assert read_bounded(io.BytesIO(b"x" * 100), 100, "f") == b"x" * 100
    assert read_bounded(io.BytesIO(b""), 100, "f") == b""


def test_read_bounded_refuses_one_byte_over_and_reads_no_further() -> None:
    stream = io.BytesIO(b"x" * 10_000)
    with pytest.raises(XrayqError) as caught:
        read_bounded(stream, 100, "big.png")
    assert caught.value.code == "file_too_large"
    assert "big.png" in caught.value.detail
    assert stream.tell() == 101


def test_an_archive_of_100k_entries_is_refused_by_count_quickly() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(100_000):
            archive.writestr(f"f{index}.png", b"")
    started = time.monotonic()
    with pytest.raises(XrayqError) as caught:
        expand_zip(buffer.getvalue(), Settings())
    assert caught.value.code == "too_many_files"
    assert time.monotonic() - started < 10  # refused from the directory, nothing is read
