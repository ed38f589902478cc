"""Model architectures, by torchvision name. Always built without downloaded weights."""

from __future__ import annotations

import torch
import torchvision

from shared.models.architectures import DEFAULT_ARCHITECTURE, check_architecture

__all__ = ["DEFAULT_ARCHITECTURE", "build_model", "pick_device"]


def build_model(architecture: str, num_classes: int) -> torch.nn.Module:
    """A torchvision classification network with `num_classes` outputs and random initial weights."""
    check_architecture(architecture)
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
