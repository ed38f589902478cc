"""Grad-CAM explanations: which layer a card names (or its architecture's default), for every architecture
a run may train; a map that points at the evidence for the class, at the layer's resolution and at the
model's input size; an unusable layer refused with its own code; nothing left hooked afterwards."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shared.core.errors import XrayqError
from shared.imaging.preprocess import PreprocessSpec
from shared.models.architectures import ARCHITECTURES, FIXED_INPUT_SIZE, MIN_INPUT_SIZE, explain_section
from shared.models.artifacts import LoadedModel
from shared.models.explanations import (
    ExplainTarget,
    explain_target,
    grad_cams,
    overlay_png,
    spatial_reader,
    target_module,
)
from shared.models.heads import Head
from shared.models.nets import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 64


class BrightnessNet(nn.Module):
    """A classifier whose evidence is known: class 1 is "something bright", wherever it is in the image.

    `features` (a 3x3 convolution averaging the pixels, stride 4, then ReLU) is high where the image is
    bright; class 1's logit is their mean, class 0's its negative. Grad-CAM of class 1 must light up the
    bright region, and of class 0 nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 3, stride=4, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 27)
            self.features[0].bias.zero_()
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def loaded(module: nn.Module, card: dict) -> LoadedModel:
    """A model as the worker holds it (only what Grad-CAM reads matters here)."""
    spec = PreprocessSpec(size=SIZE)  # "fixed": (x / 255 - 0.5) / 0.25, grey repeated to three channels
    module.eval()
    return LoadedModel("id", "net", 1, ["dark", "bright"], spec, module, torch.device("cpu"), {}, Head(module), card)


def square_at(row: int, col: int) -> torch.Tensor:
    """Model pixels (uint8, 1 x SIZE x SIZE): black, with a bright 16 px square at (row, col)."""
    pixels = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    pixels[0, row : row + 16, col : col + 16] = 255
    return pixels


BRIGHTNESS_CARD = {"architecture": "custom", "explain": {"target_layer": "features", "layout": "nchw"}}


def test_the_map_points_at_the_evidence_for_the_class_and_follows_the_input() -> None:
    model = loaded(BrightnessNet(), BRIGHTNESS_CARD)
    top_left, bottom_right = square_at(4, 4), square_at(44, 44)
    first, second = grad_cams(model, [top_left, bottom_right], [1, 1])
    for heatmap in (first, second):
        assert heatmap.cells.shape == (16, 16)  # the layer's own resolution (stride 4)
        assert heatmap.full.shape == (SIZE, SIZE)  # and resized to the model's input
        for grid in (heatmap.cells, heatmap.full):
            assert grid.min() >= 0 and grid.max() <= 1 and grid.max() == pytest.approx(1, abs=1e-3)
    assert all(index < 32 for index in np.unravel_index(first.full.argmax(), first.full.shape))
    assert all(index >= 32 for index in np.unravel_index(second.full.argmax(), second.full.shape))
    assert first.full[:32, :32].mean() > 10 * first.full[32:, 32:].mean()  # it depends on the input
    (dark,) = grad_cams(model, [top_left], [0])  # nothing in the image argues for "dark"
    assert dark.cells.max() == pytest.approx(0, abs=1e-6)


def test_nothing_stays_hooked_or_holding_gradients_afterwards() -> None:
    module = BrightnessNet()
    grad_cams(loaded(module, BRIGHTNESS_CARD), [square_at(0, 0)] * 9, [1] * 9)  # two passes of up to 8
    for layer in module.modules():
        assert not layer._forward_hooks and not layer._backward_hooks and not layer._forward_pre_hooks
    assert all(parameter.grad is None for parameter in module.parameters())


def test_the_raw_map_is_small_json_and_the_overlay_a_png_of_the_input_that_says_what_made_it() -> None:
    (heatmap,) = grad_cams(loaded(BrightnessNet(), BRIGHTNESS_CARD), [square_at(4, 4)], [1])
    document = heatmap.document()
    assert (document["width"], document["height"]) == (16, 16) and len(document["map"]) == 16
    assert all(0 <= value <= 1 and round(value, 3) == value for row in document["map"] for value in row)
    png = Image.open(io.BytesIO(overlay_png(square_at(4, 4), heatmap, {"xrayq:model": "net@1"})))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (SIZE, SIZE)
    assert png.text["xrayq:model"] == "net@1"


def test_a_card_names_the_layer_and_an_older_card_takes_its_architectures_default() -> None:
    named = {"architecture": "resnet18", "explain": {"target_layer": "layer3", "layout": "nchw"}}
    assert explain_target(named) == ExplainTarget("layer3", "nchw")
    assert explain_target({"architecture": "resnet18"}) == ExplainTarget("layer4", "nchw")
    assert explain_target({"architecture": "swin_t"}) == ExplainTarget("features", "nhwc")
    assert explain_target({"architecture": "vit_l_16"}).layer == "encoder.layers.encoder_layer_23.ln_1"


@pytest.mark.parametrize(
    ("card", "says"),
    [
        ({"architecture": "not-a-torchvision-net"}, "names no Grad-CAM target layer"),
        ({"architecture": "resnet18", "explain": {"target_layer": ""}}, "names no Grad-CAM target layer"),
        ({"architecture": "resnet18", "explain": {"target_layer": "layer4", "layout": "nchwc"}}, "layout"),
    ],
)
def test_a_card_without_a_usable_target_is_explanation_unavailable(card: dict, says: str) -> None:
    with pytest.raises(XrayqError) as caught:
        explain_target(card)
    assert caught.value.code == "explanation_unavailable" and says in caught.value.detail


@pytest.mark.parametrize(
    ("layer", "says"),
    [("layer9", "is not a layer of this model"), ("fc", "gives a 2-D output"), ("avgpool.x", "is not a layer")],
)
def test_a_layer_that_is_missing_or_no_spatial_map_is_explanation_unavailable(layer: str, says: str) -> None:
    module = build_model("resnet18", 2)
    model = loaded(module, {"architecture": "resnet18", "explain": {"target_layer": layer}})
    with pytest.raises(XrayqError) as caught:
        grad_cams(model, [square_at(4, 4)], [1])
    assert caught.value.code == "explanation_unavailable" and says in caught.value.detail
    assert not any(layer._forward_hooks for layer in module.modules())  # released on the way out too


def test_a_real_architecture_is_explained_at_its_default_layer() -> None:
    torch.manual_seed(0)
    model = loaded(build_model("resnet18", 2), {"architecture": "resnet18", "explain": explain_section("resnet18")})
    (heatmap,) = grad_cams(model, [square_at(20, 20)], [1])
    assert heatmap.cells.shape == (2, 2) and heatmap.full.shape == (SIZE, SIZE)  # layer4: stride 32
    assert heatmap.target == ExplainTarget("layer4", "nchw")


def _input_size(name: str, module: nn.Module) -> int:
    # A ViT's input size is the one it was built for (vit_h_14 is built at 224 here, like a run builds it).
    return int(getattr(module, "image_size", FIXED_INPUT_SIZE.get(name, max(64, MIN_INPUT_SIZE.get(name, 64)))))


# RegNets compute their stage widths with real tensors while they are built (no meta device), and the
# largest hold gigabytes: the two smallest stand for the family, whose modules are named alike.
BUILT_FOR_REAL = {"regnet_x_400mf", "regnet_y_400mf"}
ON_META = sorted(name for name in ARCHITECTURES if not name.startswith("regnet"))


@pytest.mark.parametrize("name", [*ON_META, *sorted(BUILT_FOR_REAL)])
def test_every_architecture_has_a_default_layer_that_gives_a_spatial_map(name: str) -> None:
    section = explain_section(name)
    assert section is not None and section["method"] == "grad-cam"
    target = explain_target({"architecture": name})
    if name in BUILT_FOR_REAL:
        module = build_model(name, 2).eval()
    else:
        with torch.device("meta"):
            module = build_model(name, 2).eval()
    read = spatial_reader(target)
    maps: list[torch.Tensor] = []
    handle = target_module(module, target).register_forward_hook(lambda _m, _i, output: maps.append(read(output)))
    try:
        size = _input_size(name, module)
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size, device=next(module.parameters()).device))
    finally:
        handle.remove()
    assert len(maps) == 1, f"{target.layer} ran {len(maps)} times"
    batch, channels, height, width = maps[0].shape
    assert batch == 1 and channels > 1 and height >= 1 and width >= 1


def test_regnets_all_name_their_trunk_alike() -> None:
    regnets = sorted(name for name in ARCHITECTURES if name.startswith("regnet"))
    assert {explain_target({"architecture": name}).layer for name in regnets} == {"trunk_output"}
