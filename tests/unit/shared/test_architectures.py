"""The gateway's torch-free list of architectures: every name in it is one torchvision builds."""

from __future__ import annotations

import pytest
import torchvision

from shared.core.errors import XrayqError
from shared.models.architectures import ARCHITECTURES, check_architecture


def test_every_listed_name_is_a_torchvision_classification_model() -> None:
    # A subset, not equality: a newer torchvision may add models (runs can't ask for them until listed).
    assert frozenset(torchvision.models.list_models(module=torchvision.models)) >= ARCHITECTURES


def test_unknown_names_and_impossible_sizes_are_refused() -> None:
    assert check_architecture("resnet18", 192) == "resnet18"
    for name, size, code in [("resnet9000", 128, "unknown_architecture"), ("vit_b_16", 128, "invalid_parameter")]:
        with pytest.raises(XrayqError) as caught:
            check_architecture(name, size)
        assert caught.value.code == code
