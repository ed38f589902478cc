"""Class balance: the balanced sampler's draws, and older run configs' class_weighting."""

from __future__ import annotations

import torch

from services.trainer.training import epoch_order
from shared.training.runs import class_balance_of


def test_the_balanced_sampler_draws_each_class_about_equally_often() -> None:
    labels = torch.tensor([0] * 100 + [1] * 900)  # one NORMAL for nine PNEUMONIA
    order = epoch_order(labels, "sampler", torch.Generator().manual_seed(0))
    assert len(order) == len(labels)
    share = float((labels[order] == 0).float().mean())
    assert 0.45 < share < 0.55
    # Every minority image is seen (with replacement, about five times each), not a few of them many times.
    assert len(set(order[labels[order] == 0].tolist())) > 95


def test_without_the_sampler_an_epoch_is_a_permutation() -> None:
    labels = torch.tensor([0] * 10 + [1] * 90)
    for balance in ("loss_weights", "none"):
        order = epoch_order(labels, balance, torch.Generator().manual_seed(0))
        assert sorted(order.tolist()) == list(range(100))


def test_the_sampler_is_reproducible_with_the_seed() -> None:
    labels = torch.tensor([0] * 30 + [1] * 70)
    first = epoch_order(labels, "sampler", torch.Generator().manual_seed(5))
    assert torch.equal(first, epoch_order(labels, "sampler", torch.Generator().manual_seed(5)))


def test_class_weighting_of_older_configs_maps_onto_class_balance() -> None:
    assert class_balance_of({}) == "sampler"
    assert class_balance_of({"class_weighting": True}) == "loss_weights"
    assert class_balance_of({"class_weighting": False}) == "none"
    assert class_balance_of({"class_weighting": True, "class_balance": "sampler"}) == "sampler"
    assert class_balance_of({"class_balance": None, "class_weighting": None}) == "sampler"
