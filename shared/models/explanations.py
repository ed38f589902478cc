"""Grad-CAM explanations of a version's answers: where in the image the evidence for its answer lies.

The computation is pytorch-grad-cam's (`grad-cam` on PyPI), a well-kept implementation: the gradients
of the answered class's logit at one layer, averaged per channel, weight that layer's activations; the
positive part of their sum is the map, scaled to [0, 1]. The layer is the one the version's card names
(`explain`, written at registration from `architectures.explain_section`), else the architecture's
default, so any architecture the table knows is explained, versions trained later included; a card
that names no usable layer gets `explanation_unavailable`, never a wrong picture.

Only the worker calls this, and only for jobs that asked: the layer's hooks exist for the length of one
call, so the forward passes of everyone else run exactly as before. The model's input is the same
preprocessed tensor its answer came from (`shared.imaging.preprocess`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from shared.core.errors import XrayqError
from shared.imaging.preprocess import normalize
from shared.models.architectures import EXPLANATION_METHOD, explain_section
from shared.models.artifacts import LoadedModel

# Images per forward and backward pass: the backward keeps every activation of the batch alive.
EXPLAIN_BATCH = 8
# The overlay: the heatmap's colours over the grey image, half and half (pytorch-grad-cam's default).
IMAGE_WEIGHT = 0.5
LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class ExplainTarget:
    """The layer Grad-CAM looks at (a dotted module path) and how its output reads as N x C x H x W."""

    layer: str
    layout: str = "nchw"


@dataclass
class Heatmap:
    """One image's Grad-CAM for one class."""

    target: ExplainTarget
    cells: np.ndarray  # h x w in [0, 1]: at the layer's own resolution, what clients that draw get
    full: np.ndarray  # size x size in [0, 1]: the same map resized (bilinear) to the model's input

    def document(self) -> dict[str, Any]:
        """The raw map as JSON: rows top to bottom, 3 decimals."""
        rows = [[round(float(value), 3) for value in row] for row in self.cells]
        return {"width": int(self.cells.shape[1]), "height": int(self.cells.shape[0]), "map": rows}


def unavailable(detail: str) -> XrayqError:
    return XrayqError("explanation_unavailable", detail)


def explain_target(card: dict[str, Any]) -> ExplainTarget:
    """The target the card names; a card written before the field existed: its architecture's default."""
    architecture = str(card.get("architecture", ""))
    section = card.get("explain") or explain_section(architecture)
    layer = section.get("target_layer") if isinstance(section, dict) else None
    if not isinstance(layer, str) or not layer:
        raise unavailable(
            f"The card names no Grad-CAM target layer, and {architecture or 'its architecture'} has none."
        )
    layout = section.get("layout", "nchw") if isinstance(section, dict) else "nchw"
    if layout not in LAYOUTS:
        raise unavailable(f"The card's target layer layout {layout!r} is not one of {', '.join(LAYOUTS)}.")
    return ExplainTarget(layer, layout)


def target_module(module: nn.Module, target: ExplainTarget) -> nn.Module:
    try:
        return module.get_submodule(target.layer)
    except AttributeError:
        raise unavailable(f"The card's target layer {target.layer!r} is not a layer of this model.") from None


def spatial_reader(target: ExplainTarget) -> Callable[[Any], torch.Tensor]:
    """The layer's output (and its gradient) as N x C x H x W; anything else is `explanation_unavailable`:
    Grad-CAM needs a spatial map, which a linear or pooled layer no longer has."""

    def read(output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise unavailable(f"The card's target layer {target.layer!r} does not output one tensor.")
        if target.layout == "nhwc" and output.ndim == 4:
            output = output.permute(0, 3, 1, 2)
        elif target.layout == "tokens" and output.ndim == 3:
            side = math.isqrt(output.shape[1] - 1)
            if side * side != output.shape[1] - 1:
                raise unavailable(f"The tokens of {target.layer!r} are not a class token and a square grid.")
            output = output[:, 1:, :].reshape(output.shape[0], side, side, output.shape[2]).permute(0, 3, 1, 2)
        if output.ndim != 4:
            raise unavailable(
                f"The card's target layer {target.layer!r} gives a {output.ndim}-D output, not a spatial map "
                "(N x C x H x W): name a convolutional layer."
            )
        return output

    return read


def grad_cams(model: LoadedModel, pixels: Sequence[torch.Tensor], classes: Sequence[int]) -> list[Heatmap]:
    """Grad-CAM of each image (uint8 C x H x W model pixels, as `to_model_pixels` gives) for its class."""
    # Imported here: it brings matplotlib and scipy along, which a worker that explains nothing never loads.
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target = explain_target(model.card)
    layer = target_module(model.module, target)
    cam = GradCAM(model=model.module, target_layers=[layer], reshape_transform=spatial_reader(target))
    heatmaps: list[Heatmap] = []
    try:
        with torch.enable_grad():
            for start in range(0, len(pixels), EXPLAIN_BATCH):
                batch = normalize(torch.stack(list(pixels[start : start + EXPLAIN_BATCH])), model.spec)
                targets = [ClassifierOutputTarget(c) for c in classes[start : start + EXPLAIN_BATCH]]
                full = _run(cam, batch.to(model.device), targets, target)
                recorded = cam.activations_and_grads
                raw = cam.get_cam_image(
                    batch, layer, targets, recorded.activations[0].numpy(), recorded.gradients[0].numpy()
                )
                cells = scale_cam_image(np.maximum(raw, 0))
                heatmaps += [Heatmap(target, cells[i], full[i]) for i in range(len(targets))]
    finally:
        cam.activations_and_grads.release()  # the hooks go: the next forward pass is a plain one again
        model.module.zero_grad(set_to_none=True)  # and so do the parameters' gradients (a model's worth)
    return heatmaps


def _run(cam: Any, batch: torch.Tensor, targets: list[Any], target: ExplainTarget) -> np.ndarray:
    try:
        return np.asarray(cam(input_tensor=batch, targets=targets))
    except XrayqError:
        raise
    except Exception:
        recorded = cam.activations_and_grads
        if not recorded.activations or not recorded.gradients:
            raise unavailable(
                f"The card's target layer {target.layer!r} takes no part in the answer (no activation or gradient)."
            ) from None
        raise


def overlay_png(pixels: torch.Tensor, heatmap: Heatmap, text: dict[str, str] | None = None) -> bytes:
    """The heatmap (jet colours) blended over the image the model saw: its uint8 model pixels, at the
    model's input size, before normalisation; an RGB PNG carrying `text` (e.g. the model version) in
    its own text chunks, so the file says what made it wherever it goes."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = pixels.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    blended = show_cam_on_image(image, heatmap.full, use_rgb=True, image_weight=IMAGE_WEIGHT)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def method_of(target: ExplainTarget) -> dict[str, str]:
    return {"method": EXPLANATION_METHOD, "target_layer": target.layer, "layout": target.layout}
