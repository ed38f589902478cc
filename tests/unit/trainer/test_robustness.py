"""The robustness table of the evaluation report and its shift proxy."""

from __future__ import annotations

import torch

from services.trainer.data import LabelledImages
from services.trainer.evaluation import classification_report
from services.trainer.plots import robustness_plot
from services.trainer.robustness import evenly_per_class, robustness_report, shift_proxy
from services.trainer.training import predict_probabilities
from shared.imaging.corruptions import suite
from shared.imaging.preprocess import PreprocessSpec


class MeanBrightness(torch.nn.Module):
    """Calls an image PNEUMONIA the brighter it is: a model that a brightness shift fools and CLAHE does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.mean(dim=(1, 2, 3)) * 4
        return torch.stack([-score, score], dim=1)


def images() -> LabelledImages:
    generator = torch.Generator().manual_seed(0)
    dark = torch.randint(40, 110, (12, 1, 32, 32), generator=generator)
    bright = torch.randint(100, 170, (12, 1, 32, 32), generator=generator)
    pixels = torch.cat([dark, bright]).to(torch.uint8)
    return LabelledImages(pixels, torch.tensor([0] * 12 + [1] * 12), ["NORMAL", "PNEUMONIA"], [])


def test_the_report_has_every_corruption_the_proxy_and_the_gap_to_clean() -> None:
    data, spec, device = images(), PreprocessSpec(size=32), torch.device("cpu")
    model = MeanBrightness()
    clean = classification_report(data.labels.numpy(), predict_probabilities(model, data, spec, device), data.classes)
    report = robustness_report(model, data, spec, device, "val")
    assert report["n"] == 24 and len(report["corruptions"]) == len(suite())
    row = report["corruptions"][0]
    assert set(row) == {"corruption", "severity", "accuracy", "roc_auc", "sensitivity", "specificity"}
    # Brightening everything makes a brightness-reading model call the dark NORMAL images PNEUMONIA.
    brighter = next(r for r in report["corruptions"] if (r["corruption"], r["severity"]) == ("brightness_up", 3))
    assert brighter["specificity"] < clean["specificity"]
    proxy = report["proxy"]
    assert proxy["worst_specificity"] <= proxy["mean_specificity"] <= 1
    assert report["clean"]["specificity"] == clean["specificity"]  # all 24 images: under the per-class cap
    assert report["gap"]["specificity"] == clean["specificity"] - proxy["mean_specificity"]
    assert robustness_plot(report, "test").startswith(b"\x89PNG")


def test_large_splits_are_judged_on_an_even_class_balanced_subset() -> None:
    labels = torch.tensor([0] * 50 + [1] * 400 + [2] * 3)
    chosen = evenly_per_class(labels, 20)
    assert torch.bincount(labels[chosen]).tolist() == [20, 20, 3]
    assert chosen[0] == 0 and 449 in chosen and list(chosen) == sorted(set(chosen.tolist()))
    # The same images whatever order the set was loaded in.
    names = [f"img{i:03d}" for i in range(len(labels))]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    shuffled = evenly_per_class(labels[order], 20, [names[i] for i in order])
    assert sorted(order[shuffled].tolist()) == sorted(evenly_per_class(labels, 20, names).tolist())


def test_shift_proxy_means_and_worst() -> None:
    rows = [
        {"corruption": "blur", "severity": 1, "roc_auc": 0.9, "specificity": 0.8, "accuracy": 0.85},
        {"corruption": "jpeg", "severity": 3, "roc_auc": 0.7, "specificity": 0.4, "accuracy": 0.6},
        {"corruption": "noise", "severity": 2, "roc_auc": None, "specificity": 0.6, "accuracy": 0.7},
    ]
    proxy = shift_proxy(rows)
    assert abs(proxy["mean_roc_auc"] - 0.8) < 1e-12 and abs(proxy["mean_specificity"] - 0.6) < 1e-12
    assert proxy["worst_specificity"] == 0.4 and proxy["worst_specificity_under"] == "jpeg@3"
    assert "mean_sensitivity" not in proxy and proxy["corruptions"] == 3
