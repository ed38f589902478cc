"""Weights made elsewhere, imported as a version of a model: checked to the last tensor, never activated.

A hospital brings a state dict it trained, or that was pretrained, elsewhere, as safetensors, with the
torchvision architecture and the classes it was made for. Before anything is stored: the sha256 the
hospital gave matches the bytes that came; the file is safetensors (a pickle is refused, never loaded);
every tensor's name, shape and kind (floating or integer) matches that architecture with len(classes)
outputs, and holds finite numbers. Then it is registered like any version (`register_version`) with
its provenance, inactive: it answers jobs only once promoted, and a training run fine-tunes from it as
`base_model` like from any version.

torch is imported here, so the gateway imports this module only when a request imports weights.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Callable

import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.storage import ObjectStore
from shared.db.models import ModelVersion
from shared.imaging.preprocess import recipe_spec
from shared.models.architectures import check_architecture
from shared.models.artifacts import register_version
from shared.models.names import check_classes, check_model_name
from shared.models.nets import build_model
from shared.models.ownership import Actor, check_may_manage
from shared.models.safetensors_header import (
    FLOATING_DTYPES,
    INTEGER_DTYPES,
    WeightsHeader,
    read_header,
    short,
    unreadable,
)

SHA256 = re.compile(r"^[0-9a-f]{64}$")
LISTED = 5  # offending tensor names a detail quotes per kind of mismatch (the problem's `tensors` holds 20)
_BUILDING = threading.Lock()


def check_sha256(value: str) -> str:
    digest = value.strip().lower()
    if not SHA256.match(digest):
        raise XrayqError("invalid_parameter", "sha256 is the file's SHA-256 as 64 hexadecimal digits.")
    return digest


def import_version(
    session: Session,
    store: ObjectStore,
    read_weights: Callable[[], bytes],
    *,
    name: str,
    importer: Actor,
    architecture: str,
    classes: list[str],
    image_size: int,
    color: str,
    sha256: str,
    filename: str,
) -> ModelVersion:
    """Check everything, then register the weights as the next version of `name` (inactive).

    `image_size` and `color` make the preprocessing (the recipe's normalisation) recorded in the card.
    `read_weights` gives the file's bytes; it is called once the request itself is known to be valid.
    `importer.scope` must own `name` or be an admin's (None); a new name becomes its organisation's.
    Refusals store nothing: every check runs before the first byte is written.
    """
    check_model_name(name)
    check_architecture(architecture, image_size)
    check_classes(classes)
    digest = check_sha256(sha256)
    check_may_manage(session, name, importer.scope)  # again, locked, when `register_version` claims it
    data = read_weights()
    state, header = checked_state_dict(data, digest, architecture, len(classes), filename)
    provenance = {
        "source": "import",
        "import": {
            "uploaded_by": {"key_id": importer.key_id, "organisation": importer.organisation},
            "original_filename": filename,
            "sha256": digest,
            "size_bytes": len(data),
            "dtypes": sorted({entry.dtype for entry in header.tensors.values()}),
            "metadata": _bounded_metadata(header.metadata),
        },
    }
    del data  # the file's bytes go before `register_version` serialises the tensors: two copies at most
    return register_version(
        session,
        store,
        name=name,
        scope=importer.scope,
        architecture=architecture,
        classes=classes,
        preprocessing=recipe_spec(image_size, color),
        state_dict=state,
        metrics={},
        data={"classes": classes},
        training={},
        activate="never",
        provenance=provenance,
    )


def checked_state_dict(
    data: bytes, sha256: str, architecture: str, num_classes: int, filename: str
) -> tuple[dict[str, torch.Tensor], WeightsHeader]:
    """The state dict in `data`, in the dtypes the architecture uses, if it is exactly what it should be."""
    if not data:
        raise XrayqError("empty_file", f"{filename} is empty.")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise XrayqError(
            "weights_sha256_mismatch",
            f"The {len(data)} bytes received have sha256 {actual}, not {sha256}: the file changed or was cut short.",
        )
    header = read_header(data, filename)
    expected = expected_tensors(architecture, num_classes)
    _check_names_and_shapes(header, expected, f"{architecture} with {num_classes} outputs", filename)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # the Rust loader's own checks, behind ours
        raise unreadable(filename, str(exc)[:200]) from None
    not_finite = sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if not_finite:
        raise XrayqError(
            "weights_not_finite",
            f"{len(not_finite)} tensors of {filename} hold NaN or infinite values, e.g. {_quoted(not_finite)}.",
            tensors={"not_finite": [short(n) for n in not_finite[:20]]},
        )
    return {name: tensors[name].to(dtype) for name, (_, dtype) in expected.items()}, header


def expected_tensors(architecture: str, num_classes: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the architecture's state dict with `num_classes` outputs.

    Read off the network built with one output and with two: a size that is 1 and then 2 is the class
    count (the heads are linear in it). So each architecture is built twice per process at most,
    whatever class counts imports ask for.
    """
    one, two = _built_tensors(architecture, 1), _built_tensors(architecture, 2)
    return {
        name: (tuple(num_classes if (a, b) == (1, 2) else a for a, b in zip(shape, two[name][0], strict=True)), dtype)
        for name, (shape, dtype) in one.items()
    }


@functools.cache  # bounded: two entries per listed architecture, names and shapes only
def _built_tensors(architecture: str, num_classes: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """On the meta device (no memory for weights), one build at a time."""
    with _BUILDING:
        try:
            with torch.device("meta"):
                module = build_model(architecture, num_classes)
        except NotImplementedError:
            # RegNets compute their stage widths with tensors while they are built: meta tensors have no
            # values to give, so these are built for real (regnet_y_128gf: 2.6 GB, once per process).
            module = build_model(architecture, num_classes)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in module.state_dict().items()}


def _check_names_and_shapes(
    header: WeightsHeader, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], net: str, filename: str
) -> None:
    given = header.tensors
    missing = [name for name in expected if name not in given]
    unexpected = sorted(name for name in given if name not in expected)
    mismatched = []
    for name, (shape, dtype) in expected.items():
        entry = given.get(name)
        kinds = FLOATING_DTYPES if dtype.is_floating_point else INTEGER_DTYPES
        if entry is not None and (entry.shape != shape or entry.dtype not in kinds):
            mismatched.append(f"{short(name)}: {entry.dtype} {list(entry.shape)} where it has {list(shape)}")
    if not (missing or unexpected or mismatched):
        return
    parts = [
        f"{len(found)} {what} ({_quoted(found)})"
        for found, what in ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "of another shape or kind"))
        if found
    ]
    hint = _prefix_hint(unexpected, missing)
    raise XrayqError(
        "weights_mismatch",
        f"{filename} does not fit {net}: {'; '.join(parts)}.{hint}",
        tensors={
            "missing": [short(n) for n in missing[:20]],
            "unexpected": [short(n) for n in unexpected[:20]],
            "mismatched": mismatched[:20],
        },
    )


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """Names saved from a wrapper (`module.` of DataParallel, `model.` of a Lightning module) differ only
    by a first part: say so, since every tensor then looks wrong."""
    prefixes = {name.split(".", 1)[0] for name in unexpected}
    if len(prefixes) == 1 and missing and all("." in name for name in unexpected):
        prefix = prefixes.pop()
        if {name.split(".", 1)[1] for name in unexpected} >= set(missing):
            return f" Every name carries the prefix {short(prefix) + '.'!r}: save the inner model's state dict."
    return ""


def _quoted(names: list[str]) -> str:
    shown = ", ".join(short(n) for n in names[:LISTED])
    return shown + (", ..." if len(names) > LISTED else "")


def _bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The file's own `__metadata__` for the card, cut to a size a card carries."""
    return {key[:64]: value[:256] for key, value in list(metadata.items())[:20]}
