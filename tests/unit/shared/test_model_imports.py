"""Imported weights are checked against the architecture they claim, tensor by tensor, before anything is
stored (the registration itself: tests/integration/test_model_import.py)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save as save_safetensors

from shared.core.errors import XrayqError
from shared.models.imports import checked_state_dict, expected_tensors
from shared.models.names import MAX_CLASSES, check_classes, check_model_name
from shared.models.nets import build_model

torch.set_num_threads(1)


def weights(architecture: str = "mobilenet_v3_small", classes: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(architecture, classes).state_dict()


def check(state: dict[str, torch.Tensor], architecture: str = "mobilenet_v3_small", classes: int = 2, **file):
    data = save_safetensors(state)
    sha256 = file.get("sha256", hashlib.sha256(data).hexdigest())
    return checked_state_dict(data, sha256, architecture, classes, "w.safetensors")


def refusal(state: dict[str, torch.Tensor], code: str, architecture: str = "mobilenet_v3_small", classes: int = 2):
    with pytest.raises(XrayqError) as caught:
        check(state, architecture, classes)
    assert caught.value.code == code, caught.value.detail
    return caught.value


@pytest.mark.parametrize(
    ("architecture", "classes"), [("mobilenet_v3_small", 3), ("squeezenet1_1", 7), ("regnet_x_400mf", 1000)]
)
def test_the_expected_tensors_are_the_real_networks(architecture: str, classes: int) -> None:
    """Read off meta-device builds (RegNets real ones) with 1 and 2 outputs: the names, shapes and dtypes
    of the network built with that many classes (a linear head, a convolution head, a RegNet)."""
    real = build_model(architecture, classes).state_dict()
    assert expected_tensors(architecture, classes) == {name: (tuple(t.shape), t.dtype) for name, t in real.items()}


def test_weights_that_fit_come_back_as_they_were_and_half_precision_is_widened() -> None:
    state = weights()
    loaded, header = check(state)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert header.tensors["classifier.3.weight"].shape == (2, 1024)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    widened, _ = check(half)
    assert widened["classifier.3.weight"].dtype == torch.float32
    assert torch.allclose(widened["classifier.3.weight"], state["classifier.3.weight"], atol=1e-3)


def test_another_class_count_names_the_head_tensors() -> None:
    error = refusal(weights(classes=3), "weights_mismatch")
    assert "2 of another shape or kind" in error.detail and "classifier.3.weight: F32 [3, 1024]" in error.detail
    assert error.extra["tensors"]["mismatched"] == [
        "classifier.3.weight: F32 [3, 1024] where it has [2, 1024]",
        "classifier.3.bias: F32 [3] where it has [2]",
    ]
    assert error.extra["tensors"]["missing"] == [] and error.extra["tensors"]["unexpected"] == []


def test_another_architecture_is_missing_and_unexpected_tensors() -> None:
    error = refusal(weights("resnet18"), "weights_mismatch")
    assert "does not fit mobilenet_v3_small with 2 outputs" in error.detail
    assert "missing (features.0.0.weight," in error.detail and "unexpected (bn1.bias," in error.detail
    assert "conv1.weight" in error.extra["tensors"]["unexpected"]
    assert len(error.extra["tensors"]["missing"]) == 20  # bounded, however many there are


def test_a_wrapped_models_prefix_is_pointed_out() -> None:
    error = refusal({f"module.{k}": v for k, v in weights().items()}, "weights_mismatch")
    assert "Every name carries the prefix 'module.'" in error.detail


def test_a_tensor_of_the_wrong_kind_or_missing_is_refused() -> None:
    state = weights()
    counter = next(k for k in state if k.endswith("num_batches_tracked"))
    error = refusal({**state, counter: state[counter].float()}, "weights_mismatch")
    assert f"{counter}: F32 []" in error.detail
    del state["classifier.3.bias"]
    assert refusal(state, "weights_mismatch").extra["tensors"]["missing"] == ["classifier.3.bias"]


def test_nan_or_infinite_weights_are_refused() -> None:
    state = weights()
    state["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    state["classifier.3.bias"][1] = float("inf")
    error = refusal(state, "weights_not_finite")
    assert error.extra["tensors"]["not_finite"] == ["classifier.3.bias", "features.0.0.weight"]


def test_the_sha256_is_of_the_bytes_received_and_checked_first() -> None:
    with pytest.raises(XrayqError) as caught:
        check(weights(classes=5), sha256="0" * 64)  # wrong shapes too: the sha256 answers first
    assert caught.value.code == "weights_sha256_mismatch"
    with pytest.raises(XrayqError) as caught:
        checked_state_dict(b"", hashlib.sha256(b"").hexdigest(), "resnet18", 2, "w.safetensors")
    assert caught.value.code == "empty_file"


@pytest.mark.parametrize(
    "classes",
    [[], ["only"], ["a", "a"], ["a", ""], ["a", "b/c"], ["a", "x" * 65], [f"c{i}" for i in range(MAX_CLASSES + 1)]],
)
def test_class_lists_a_classifier_cannot_have_are_refused(classes: list[str]) -> None:
    with pytest.raises(XrayqError) as caught:
        check_classes(classes)
    assert caught.value.code == "invalid_classes"


def test_model_names_follow_the_dataset_name_rule() -> None:
    assert check_model_name("chest-xray.v2_b") == "chest-xray.v2_b"
    assert check_classes([f"c{i}" for i in range(MAX_CLASSES)])
    for name in ("", "Chest", "-x", "a b", "x" * 65, "a/b"):
        with pytest.raises(XrayqError) as caught:
            check_model_name(name)
        assert caught.value.code == "invalid_model_name"
