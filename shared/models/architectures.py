"""The torchvision classification architectures a run may ask for, known without importing torch.

The gateway validates a training request with this list and never loads torch; a unit test keeps the
list equal to `torchvision.models.list_models(module=torchvision.models)`.
"""

from __future__ import annotations

from shared.core.errors import XrayqError

DEFAULT_ARCHITECTURE = "resnet18"

ARCHITECTURES = frozenset(
    [
        "alexnet",
        "convnext_base",
        "convnext_large",
        "convnext_small",
        "convnext_tiny",
        "densenet121",
        "densenet161",
        "densenet169",
        "densenet201",
        "efficientnet_b0",
        "efficientnet_b1",
        "efficientnet_b2",
        "efficientnet_b3",
        "efficientnet_b4",
        "efficientnet_b5",
        "efficientnet_b6",
        "efficientnet_b7",
        "efficientnet_v2_l",
        "efficientnet_v2_m",
        "efficientnet_v2_s",
        "googlenet",
        "inception_v3",
        "maxvit_t",
        "mnasnet0_5",
        "mnasnet0_75",
        "mnasnet1_0",
        "mnasnet1_3",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "regnet_x_16gf",
        "regnet_x_1_6gf",
        "regnet_x_32gf",
        "regnet_x_3_2gf",
        "regnet_x_400mf",
        "regnet_x_800mf",
        "regnet_x_8gf",
        "regnet_y_128gf",
        "regnet_y_16gf",
        "regnet_y_1_6gf",
        "regnet_y_32gf",
        "regnet_y_3_2gf",
        "regnet_y_400mf",
        "regnet_y_800mf",
        "regnet_y_8gf",
        "resnet101",
        "resnet152",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "resnext50_32x4d",
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "shufflenet_v2_x1_5",
        "shufflenet_v2_x2_0",
        "squeezenet1_0",
        "squeezenet1_1",
        "swin_b",
        "swin_s",
        "swin_t",
        "swin_v2_b",
        "swin_v2_s",
        "swin_v2_t",
        "vgg11",
        "vgg11_bn",
        "vgg13",
        "vgg13_bn",
        "vgg16",
        "vgg16_bn",
        "vgg19",
        "vgg19_bn",
        "vit_b_16",
        "vit_b_32",
        "vit_h_14",
        "vit_l_16",
        "vit_l_32",
        "wide_resnet101_2",
        "wide_resnet50_2",
    ]
)

# Nets whose input size is fixed by their design (position embeddings, window grids).
FIXED_INPUT_SIZE = {"vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 518}
FIXED_INPUT_SIZE |= {"maxvit_t": 224}
# Nets that cannot shrink a small input far enough (pooling stages), with the smallest size that works.
MIN_INPUT_SIZE = {"inception_v3": 75, "alexnet": 63, "googlenet": 32, "squeezenet1_0": 32, "squeezenet1_1": 32}


def check_architecture(name: str, image_size: int | None = None) -> str:
    if name not in ARCHITECTURES:
        raise XrayqError(
            "unknown_architecture",
            f"{name!r} is not a torchvision classification model; e.g. resnet18, mobilenet_v3_small, densenet121.",
        )
    if image_size is not None:
        fixed = FIXED_INPUT_SIZE.get(name)
        if fixed is not None and image_size != fixed:
            raise XrayqError("invalid_parameter", f"{name} takes {fixed} px inputs only, not {image_size}.")
        minimum = MIN_INPUT_SIZE.get(name, 32)
        if image_size < minimum:
            raise XrayqError("invalid_parameter", f"{name} needs inputs of at least {minimum} px.")
    return name


# --- Explanations (Grad-CAM) ------------------------------------------------------------------------
# Where Grad-CAM looks in each architecture: the last layer whose output is still a spatial map, by its
# dotted path in the torchvision module, and how to read that output as N x C x H x W ("nchw"; Swin's
# stages give N x H x W x C, "nhwc"; a ViT's blocks give tokens, N x (1 + H*W) x C, "tokens"). For a ViT
# it is the last block's first LayerNorm, not the block's output: the head reads the class token alone,
# so only inside the last block do the patch tokens still carry a gradient. Written into every card at
# registration (`explain_section`), so a version is explained with the layer its card names; a card
# written before the field existed falls back to this table.
_LAST_MAP_LAYER = {
    "alexnet": "features",
    "convnext": "features",
    "densenet": "features",
    "efficientnet": "features",
    "googlenet": "inception5b",
    "inception_v3": "Mixed_7c",
    "maxvit_t": "blocks.3",
    "mnasnet": "layers",
    "mobilenet": "features",
    "regnet": "trunk_output",
    "resnet": "layer4",
    "resnext": "layer4",
    "shufflenet": "conv5",
    "squeezenet": "features",
    "swin": "features",
    "vgg": "features",
    "wide_resnet": "layer4",
}
_VIT_BLOCKS = {"vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 24, "vit_l_32": 24, "vit_h_14": 32}
EXPLANATION_METHOD = "grad-cam"


def explain_section(architecture: str) -> dict[str, str] | None:
    """The card's `explain` section for a version of `architecture`: Grad-CAM's target layer and how to
    read its output; None for an architecture this table does not know (its versions are not explained)."""
    if architecture in _VIT_BLOCKS:
        last = _VIT_BLOCKS[architecture] - 1
        layer, layout = f"encoder.layers.encoder_layer_{last}.ln_1", "tokens"
    else:
        family = next((prefix for prefix in _LAST_MAP_LAYER if architecture.startswith(prefix)), None)
        if family is None:
            return None
        layer, layout = _LAST_MAP_LAYER[family], "nhwc" if family == "swin" else "nchw"
    return {"method": EXPLANATION_METHOD, "target_layer": layer, "layout": layout}
