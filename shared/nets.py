"""Model architectures, by torchvision name. Always built without downloaded weights."""

from __future__ import annotations

import torch
import torchvision

from shared.errors import XrayqError

DEFAULT_ARCHITECTURE = "resnet18"


def available_architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(architecture: str, num_classes: int) -> torch.nn.Module:
    """A torchvision classification network with `num_classes` outputs and random initial weights."""
    if architecture not in available_architectures():
        raise XrayqError("unknown_architecture", f"'{architecture}' is not a torchvision classification model.")
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
