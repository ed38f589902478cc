"""A safetensors file is read as data: real files parse, pickles are recognised and never run, and every
way a header can lie is refused with a code."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from shared.core.errors import XrayqError
from shared.models.safetensors_header import TensorEntry, read_header


def framed(header: dict, body: bytes, pad_to: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    if pad_to is not None:
        text += b" " * (pad_to - len(text))
    return struct.pack("<Q", len(text)) + text + body


def refused(data: bytes, code: str) -> str:
    with pytest.raises(XrayqError) as caught:
        read_header(data, "w.safetensors")
    assert caught.value.code == code, caught.value.detail
    return caught.value.detail


def test_a_file_written_by_safetensors_parses_with_its_dtypes_shapes_and_metadata() -> None:
    tensors = {
        "conv.weight": torch.zeros(4, 3, 3, 3),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.bias": torch.ones(2),
    }
    header = read_header(save_safetensors(tensors, metadata={"trained_on": "site-b"}), "w.safetensors")
    assert header.tensors == {
        "conv.weight": TensorEntry("F32", (4, 3, 3, 3)),
        "bn.num_batches_tracked": TensorEntry("I64", ()),
        "fc.bias": TensorEntry("F32", (2,)),
    }
    assert header.metadata == {"trained_on": "site-b"}
    half = read_header(save_safetensors({"w": torch.zeros(2, 2, dtype=torch.float16)}), "w.safetensors")
    assert half.tensors["w"] == TensorEntry("F16", (2, 2))


def test_a_header_whose_length_looks_like_a_pickle_opcode_is_still_safetensors() -> None:
    # A 640-byte header: the file opens with 0x80 0x02, a pickle of protocol 2's first two bytes.
    data = framed({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, pad_to=640)
    assert data[:2] == b"\x80\x02"
    assert read_header(data, "w.safetensors").tensors == {"w": TensorEntry("F32", (2,))}


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint does on unpickling
        return (Path.touch, (Path("/tmp/xrayq-unpickled-marker"),))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_are_refused_and_never_unpickled(protocol: int) -> None:
    marker = Path("/tmp/xrayq-unpickled-marker")
    marker.unlink(missing_ok=True)
    detail = refused(pickle.dumps({"state": _Payload()}, protocol=protocol), "weights_pickled")
    assert "safetensors.torch.save_file" in detail
    assert not marker.exists()


def test_what_torch_save_writes_is_refused_in_both_of_its_formats() -> None:
    state = {"w": torch.zeros(3)}
    for zipped in (True, False):  # the ZIP of torch >= 1.6, and the legacy bare pickle
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
        refused(buffer.getvalue(), "weights_pickled")


def test_empty_garbage_and_other_formats_are_refused() -> None:
    refused(b"", "empty_file")
    for data in (b"not weights at all, just text", b"\x00" * 64, b"{}"):
        refused(data, "weights_unreadable")
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    refused(buffer.getvalue(), "weights_unreadable")


GOOD = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]},
}


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (framed(GOOD, b"\0" * 15), "do not hold a I64 [] in 15"),
        (framed(GOOD, b"\0" * 20), "4 bytes after its last tensor"),
        (struct.pack("<Q", 10_000) + b"{}", "does not start with a safetensors header"),
        (struct.pack("<Q", 4) + b"[1] ", "does not start with a safetensors header"),
        (struct.pack("<Q", 6) + b'{"a":}', "its header is not JSON"),
        (struct.pack("<Q", 8) + b"{\xff\xfe}    ", "can't decode byte 0xff"),
        (framed({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "lacks dtype, shape or data_offsets"),
        (framed({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype 'F33'"),
        (
            framed({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "shape that is not a list of sizes",
        ),
        (
            framed({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "shape that is not a list of sizes",
        ),
        (framed({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "do not hold a F32 [3]"),
        (
            framed({**GOOD, "c": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16),
            "overlap or leave a gap at byte 8",
        ),
        (framed({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 16), "__metadata__ is not a map of strings"),
        (framed({}, b""), "holds no tensors"),
    ],
)
def test_a_header_that_lies_is_refused(data: bytes, said: str) -> None:
    assert said in refused(data, "weights_unreadable")


def test_a_name_given_twice_is_refused() -> None:
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    text = ('{"a": ' + entry + ', "a": ' + entry.replace("[0, 8]", "[8, 16]") + "}").encode()
    assert "twice" in refused(struct.pack("<Q", len(text)) + text + b"\0" * 16, "weights_unreadable")
