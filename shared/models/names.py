"""What a model's name and its class names may be (the rules datasets, runs and imports share)."""

from __future__ import annotations

import re
from collections import Counter

from shared.core.errors import XrayqError

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+()-]{0,63}$")
# Enough for an ImageNet head (1000 outputs), whose backbone is fine-tuned onto a few classes.
MAX_CLASSES = 1000


def check_model_name(name: str) -> str:
    if not MODEL_NAME.match(name):
        raise XrayqError(
            "invalid_model_name",
            f"A model name is 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"not {name[:80]!r}.",
        )
    return name


def check_classes(classes: list[str]) -> list[str]:
    """A classifier's outputs, in order: 2 to `MAX_CLASSES` distinct names a dataset's folders could have."""
    if len(classes) < 2:
        raise XrayqError("invalid_classes", f"A classifier needs at least two classes; got {classes[:2]}.")
    if len(classes) > MAX_CLASSES:
        raise XrayqError("invalid_classes", f"At most {MAX_CLASSES} classes, not {len(classes)}.")
    bad = [name[:80] for name in classes if not CLASS_NAME.match(name)]
    if bad:
        raise XrayqError(
            "invalid_classes",
            f"Class names are 1-64 letters, digits, spaces or _.+-() starting with a letter or digit: {bad[:5]}.",
        )
    repeated = sorted(name for name, n in Counter(classes).items() if n > 1)
    if repeated:
        raise XrayqError("invalid_classes", f"Each class is named once; repeated: {repeated[:5]}.")
    return classes
