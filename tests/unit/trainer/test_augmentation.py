"""The shift-aimed training augmentation: reproducible, shape-keeping, and varied within a batch."""

from __future__ import annotations

import torch

from services.trainer.augmentation import ShiftAugmentation


def batch(n: int = 16, size: int = 64, channels: int = 1) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = (0.2 + 0.6 * x * y + 0.1 * torch.sin(20 * x)).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).expand(n, channels, size, size).contiguous()


def test_augmentation_keeps_dtype_and_shape_and_is_reproducible_with_the_generator() -> None:
    augment = ShiftAugmentation()
    pixels = batch()
    first = augment(pixels, torch.Generator().manual_seed(3))
    assert first.dtype == torch.uint8 and first.shape == pixels.shape
    assert torch.equal(first, augment(pixels, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment(pixels, torch.Generator().manual_seed(4)))
    assert augment(batch(channels=3), torch.Generator().manual_seed(3)).shape == (16, 3, 64, 64)


def test_each_image_of_a_batch_gets_its_own_draw_and_stays_an_image_of_the_same_scene() -> None:
    pixels = batch()
    out = ShiftAugmentation()(pixels, torch.Generator().manual_seed(0)).float()
    assert len({tuple(image.flatten().tolist()) for image in out}) == len(out)
    # Moderate: on average an augmented image stays close to its original.
    assert (out - pixels.float()).abs().mean() / 255 < 0.15


def test_without_any_jitter_the_batch_passes_unchanged() -> None:
    identity = ShiftAugmentation(
        rotation_degrees=0, translate=0, magnification=(1.0, 1.0), zoom_out_probability=0, aspect=0,
        brightness=0, contrast=0, gamma=0, blur_probability=0, noise_probability=0,
    )  # fmt: skip
    pixels = batch()
    assert (identity(pixels, torch.Generator().manual_seed(0)).int() - pixels.int()).abs().max() <= 1
