"""A classifier's head: the features it sees before its last layer, and Monte Carlo samples of it.

One forward pass gives both the logits and the *features* (the input of the final linear layer, or of
the dropout right before it): out-of-distribution checks measure how far an input's features are from
the training set's, and uncertainty re-runs only the head on them with dropout sampled.

Monte Carlo dropout done right and cheaply: only the head's last dropout is sampled, on the features
of one ordinary eval-mode pass, so batch-norm statistics stay in eval mode and the backbone runs once.
The dropout masks are fixed per loaded model (seeded), so the same input always gets the same
uncertainty whatever else shares its batch. Works for any torchvision classifier whose head is a
`Sequential` ending in `Dropout … Linear` (MobileNet, EfficientNet, VGG, AlexNet, MNASNet, …); for the
others (`sampled` is False) a version has features but no dropout samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Sixteen samples of a 1280-wide head cost about as much as one 1280x1280 matrix product per image.
DEFAULT_SAMPLES = 16
MASK_SEED = 20261205


@dataclass
class HeadOutputs:
    logits: torch.Tensor  # N x classes
    features: torch.Tensor  # N x D, float32


class Head:
    """Where a model's features are tapped, and the layers after that point."""

    def __init__(self, module: nn.Module, samples: int = DEFAULT_SAMPLES) -> None:
        self.module = module
        final = _output_layer(module)
        container, index = _container_of(module, final)
        dropout_index = _last_dropout_before(container, index) if container is not None else None
        if isinstance(final, nn.Linear) and container is not None and dropout_index is not None:
            dropout = container[dropout_index]
            assert isinstance(dropout, nn.Dropout)
            self.tap: nn.Module = dropout
            self.rest: nn.Module = nn.Sequential(*list(container)[dropout_index + 1 : index + 1])
            self.dropout_p: float | None = float(dropout.p)
        else:
            self.tap, self.rest, self.dropout_p = final, final, None
        self.samples = samples
        self.feature_width = final.in_features if isinstance(final, nn.Linear) else final.in_channels
        self._masks: dict[torch.device, torch.Tensor] = {}

    @property
    def sampled(self) -> bool:
        """Whether the head has a dropout to sample (Monte Carlo uncertainty is available)."""
        return self.dropout_p is not None and self.dropout_p > 0 and self.samples > 1

    def forward(self, batch: torch.Tensor) -> HeadOutputs:
        """One eval-mode pass of the whole model: its logits and the features at the tap."""
        captured: list[torch.Tensor] = []
        handle = self.tap.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            logits = _logits_of(self.module(batch))
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the model's forward pass did not reach its final layer")
        features = captured[-1].detach()
        if features.ndim == 4:  # a convolutional output layer sees a map: its features are the pooled map
            features = features.mean(dim=(2, 3))
        return HeadOutputs(logits=logits.float(), features=features.flatten(1).float())

    def sample_logits(self, features: torch.Tensor) -> torch.Tensor:
        """N x samples x classes: the head re-run on `features` under each fixed dropout mask."""
        if not self.sampled:
            raise ValueError("this model's head has no dropout to sample")
        masks = self._masks_on(features.device, features.dtype)  # samples x D, already scaled by 1/(1-p)
        n, width = features.shape
        dropped = (features.unsqueeze(1) * masks.unsqueeze(0)).reshape(n * self.samples, width)
        return self.rest(dropped).float().reshape(n, self.samples, -1)

    def _masks_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        masks = self._masks.get(device)
        if masks is None:
            assert self.dropout_p is not None
            generator = torch.Generator().manual_seed(MASK_SEED)
            keep = torch.rand(self.samples, self.feature_width, generator=generator) >= self.dropout_p
            masks = (keep.float() / (1.0 - self.dropout_p)).to(device)
            self._masks[device] = masks
        return masks.to(dtype)


def _logits_of(outputs: object) -> torch.Tensor:
    # GoogLeNet and Inception v3 return a named tuple with `.logits` in train mode; a tensor in eval.
    return outputs.logits if hasattr(outputs, "logits") else outputs  # type: ignore[return-value]


def _output_layer(module: nn.Module) -> nn.Linear | nn.Conv2d:
    """The output layer: torchvision defines every classifier's final layer last (a linear layer, or
    SqueezeNet's 1x1 convolution)."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no output layer")
    return layers[-1]


def _container_of(root: nn.Module, target: nn.Module) -> tuple[nn.Sequential | None, int]:
    """The Sequential that holds `target` directly, and its index there (None if not in one)."""
    for parent in root.modules():
        if isinstance(parent, nn.Sequential):
            for index, child in enumerate(parent):
                if child is target:
                    return parent, index
    return None, -1


def _last_dropout_before(container: nn.Sequential, index: int) -> int | None:
    """The index of the last plain Dropout before `index`, if only parameter-free layers follow it."""
    for position in range(index - 1, -1, -1):
        child = container[position]
        if type(child) is nn.Dropout:
            return position
        if any(True for _ in child.parameters()):
            return None  # a weighted layer comes first: the dropout there is not the head's
    return None
