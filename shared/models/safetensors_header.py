"""A safetensors file read as data: its header parsed and checked without torch, executing nothing.

The format: an 8-byte little-endian header length N, N bytes of JSON (tensor name -> dtype, shape and
byte range in the data that follows; optionally "__metadata__": str -> str), then the tensor bytes,
every byte of them belonging to exactly one tensor. Reading it is `json.loads` and arithmetic. What
`torch.save` writes (a pickle, inside a ZIP since torch 1.6) is recognised by its first bytes and
refused with a code of its own: unpickling runs whatever code the file names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from shared.core.errors import XrayqError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {
    **{"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1},
    **{"U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8},
}
FLOATING_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
INTEGER_DTYPES = frozenset({"U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
_PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol 2+ opens with PROTO (0x80) and its number
_ZIP = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(data: bytes, filename: str) -> WeightsHeader:
    """The checked header of a safetensors file; `weights_pickled`, `weights_unreadable` or `empty_file`."""
    if not data:
        raise XrayqError("empty_file", f"{filename} is empty.")
    header = _framed_header(data)
    if header is None:
        if data.startswith(_ZIP) or (data[0] == 0x80 and len(data) > 1 and data[1] in _PICKLE_PROTOCOLS):
            raise XrayqError(
                "weights_pickled",
                f"{filename} is a pickle or a ZIP (what torch.save writes): pickled code is never loaded. "
                "Save the state dict as safetensors: safetensors.torch.save_file(model.state_dict(), 'w.safetensors').",
            )
        raise unreadable(filename, "it does not start with a safetensors header")
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_refuse_duplicate_names)
    except (UnicodeDecodeError, ValueError) as exc:
        raise unreadable(filename, f"its header is not JSON ({exc})") from None
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise unreadable(filename, "its __metadata__ is not a map of strings")
    body = len(data) - 8 - len(header)
    tensors = {name: _entry(name, value, body, filename) for name, value in parsed.items()}
    _check_coverage(parsed, body, filename)
    if not tensors:
        raise unreadable(filename, "it holds no tensors")
    return WeightsHeader(tensors, metadata)


def unreadable(filename: str, why: str) -> XrayqError:
    return XrayqError("weights_unreadable", f"{filename} is not a usable safetensors file: {why}.")


def short(name: str) -> str:
    """A tensor name as a detail quotes it (names come from the upload: bounded)."""
    return name if len(name) <= 80 else name[:77] + "..."


def _framed_header(data: bytes) -> bytes | None:
    if len(data) < 10:
        return None
    length = int.from_bytes(data[:8], "little")
    if not 2 <= length <= MAX_HEADER_BYTES or 8 + length > len(data) or data[8:9] != b"{":
        return None
    return data[8 : 8 + length]


def _refuse_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A name given twice would mean one tensor to us and perhaps another to the loader.
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("a name appears twice")
    return dict(pairs)


def _entry(name: str, value: Any, body: int, filename: str) -> TensorEntry:
    where = f"tensor {short(name)!r}"
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= set(value):
        raise unreadable(filename, f"{where} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise unreadable(filename, f"{where} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise unreadable(filename, f"{where} has a shape that is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise unreadable(filename, f"{where} has data_offsets that are not [begin, end]")
    begin, end = offsets
    if not begin <= end <= body or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise unreadable(filename, f"{where}: its bytes [{begin}, {end}) do not hold a {dtype} {shape} in {body}")
    return TensorEntry(dtype, tuple(shape))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(parsed: dict[str, Any], body: int, filename: str) -> None:
    """Every data byte belongs to exactly one tensor: no overlaps (two names, one buffer), no hidden bytes."""
    position = 0
    for begin, end in sorted(tuple(v["data_offsets"]) for v in parsed.values()):
        if begin != position:
            raise unreadable(filename, f"its tensors' bytes overlap or leave a gap at byte {position}")
        position = end
    if position != body:
        raise unreadable(filename, f"{body - position} bytes after its last tensor belong to none")
