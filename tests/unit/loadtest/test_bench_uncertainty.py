"""`make bench` measures the worker's forward pass with and without the uncertainty's dropout samples."""

from __future__ import annotations

import pytest
import torch

from loadtest.bench import measure_uncertainty_cost, served_forward
from shared.imaging.preprocess import PreprocessSpec
from shared.models.artifacts import LoadedModel
from shared.models.heads import Head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model() -> LoadedModel:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 2),
    ).eval()  # fmt: skip
    card = {"calibration": {"temperature": 1.5}, "uncertainty": {"method": "mc_dropout", "threshold": 0.5}}
    return LoadedModel(
        id="v", name="m", version=1, classes=["a", "b"], spec=PreprocessSpec(size=16), module=module,
        device=torch.device("cpu"), intended_use={}, head=Head(module), card=card,
    )  # fmt: skip


def test_the_two_paths_differ_only_by_the_uncertainty() -> None:
    model = small_model()
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        plain_probabilities, no_uncertainty = served_forward(model, uncertainty=False)(x)
        probabilities, uncertainty = served_forward(model, uncertainty=True)(x)
    assert no_uncertainty is None and uncertainty.shape == (3,)
    assert torch.equal(plain_probabilities, probabilities)


def test_the_cost_is_reported_per_batch_size() -> None:
    report = measure_uncertainty_cost(small_model(), sizes=(1, 4))
    assert report["method"] == "mc_dropout" and report["samples"] > 1
    assert set(report["with_ips_by_batch"]) == set(report["without_ips_by_batch"]) == {1, 4}
    assert all(rate > 0 for rate in report["with_ips_by_batch"].values())
    assert set(report["overhead_by_batch"]) == {1, 4}
