"""Training as plain functions driven by one config object (after torchvision's reference scripts)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from services.trainer.augmentation import ShiftAugmentation
from services.trainer.checkpoints import TrainingState, capture, restore
from services.trainer.data import LabelledImages
from services.trainer.evaluation import classification_report
from shared.imaging.preprocess import RECIPE_NORMALIZATION, Normalization, PreprocessSpec, normalize, recipe_spec
from shared.models.nets import DEFAULT_ARCHITECTURE, build_model, pick_device


@dataclass
class TrainConfig:
    architecture: str = DEFAULT_ARCHITECTURE
    image_size: int = 128
    color: str = "auto"  # "grayscale", "rgb", or "auto": from the data
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    # How the minority class gets its share: "sampler" draws each epoch's batches class-balanced (with
    # replacement); "loss_weights" weighs the loss by inverse class frequency; "none". The spike found the
    # sampler as accurate as loss weights under shift, with half their calibration error.
    class_balance: Literal["sampler", "loss_weights", "none"] = "sampler"
    # The preprocessing's normalisation (`PreprocessSpec.normalization`), CLAHE for the recipe.
    normalization: Normalization = RECIPE_NORMALIZATION
    augment: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    torch_threads: int = 0
    max_per_class: int | None = None  # cap per class, for quick runs and tests

    def spec(self) -> PreprocessSpec:
        return recipe_spec(self.image_size, self.color, self.normalization)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_roc_auc: float | None
    seconds: float


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    report: dict[str, Any]
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0


ProgressCallback = Callable[[dict[str, Any]], None]
# Called with the state after each epoch, to keep it (`services.trainer.checkpoints.RunCheckpoints.save`).
CheckpointCallback = Callable[[TrainingState], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(labels: torch.Tensor, class_balance: str, generator: torch.Generator) -> torch.Tensor:
    """The indices one epoch visits: a permutation, or (balanced sampler) as many draws with
    replacement, each class equally likely, each image within its class equally likely."""
    if class_balance != "sampler":
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels).float()
    weights = 1.0 / counts[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def use_fast_batchnorm(model: torch.nn.Module) -> None:
    """Batch-norm running statistics that settle within a short run.

    Some torchvision nets (MobileNetV3, EfficientNet) use momentum 0.01, tuned for long ImageNet
    schedules; after a few hundred steps from scratch their running statistics are still far from the
    data's and evaluation falls to chance.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1


def train_one_epoch(
    model: torch.nn.Module,
    data: LabelledImages,
    spec: PreprocessSpec,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    class_weights: torch.Tensor | None,
    generator: torch.Generator,
    device: torch.device,
    on_step: Callable[[int, int, float], None] | None = None,
) -> float:
    model.train()
    augmenter = ShiftAugmentation() if config.augment else None
    order = epoch_order(data.labels, config.class_balance, generator)
    steps = math.ceil(len(order) / config.batch_size)
    total_loss = 0.0
    for step in range(steps):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        if len(index) < 2:  # batch norm cannot train on a single example
            continue
        pixels = data.pixels[index]
        if augmenter is not None:
            pixels = augmenter(pixels, generator)
        inputs = normalize(pixels, spec).to(device)
        targets = data.labels[index].to(device)
        loss = F.cross_entropy(
            logits_of(model(inputs)), targets, weight=class_weights, label_smoothing=config.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(index)
        if on_step is not None:
            on_step(step + 1, steps, loss.item())
    return total_loss / max(len(order), 1)


def logits_of(outputs: Any) -> torch.Tensor:
    """GoogLeNet and Inception v3 return (logits, auxiliary logits...) while training; the rest a tensor."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


def load_initial_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Fine-tuning: take every tensor whose name and shape match; a new class count re-learns the head."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module, data: LabelledImages, spec: PreprocessSpec, device: torch.device, batch_size: int = 128
) -> np.ndarray:
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        inputs = normalize(data.pixels[start : start + batch_size], spec).to(device)
        outputs.append(torch.softmax(model(inputs).float(), dim=1).cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(data.classes)))


def fit(
    train: LabelledImages,
    val: LabelledImages,
    config: TrainConfig,
    progress: ProgressCallback | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    resume: TrainingState | None = None,
    checkpoint: CheckpointCallback | None = None,
) -> TrainResult:
    """Train (from scratch, or from `initial_state`), evaluate on `val` after every epoch.

    `resume`: continue after the epoch of that checkpoint, exactly as the run would have gone on;
    `checkpoint` receives the state after every epoch. Returns the last epoch's weights and report.
    `progress` may raise to stop training (cancellation, a hand-back).
    """
    started = time.monotonic()
    seed_everything(config.seed)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = pick_device(config.device)
    spec = config.spec()
    model = build_model(config.architecture, len(train.classes))
    if initial_state is not None:
        load_initial_weights(model, initial_state)
    model = model.to(device)
    use_fast_batchnorm(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=steps_per_epoch * config.epochs, pct_start=0.2
    )
    class_weights = None
    if config.class_balance == "loss_weights":
        counts = torch.bincount(train.labels, minlength=len(train.classes)).float().clamp(min=1)
        class_weights = (counts.sum() / (len(counts) * counts)).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[EpochStats] = []
    report: dict[str, Any] = {}
    trained_before = 0.0  # seconds, by the trainers that held the run before
    if resume is not None:
        restore(resume, model, optimizer, scheduler, generator)
        history = [EpochStats(**entry) for entry in resume.history]
        report, trained_before = resume.report, resume.seconds
    first_epoch = resume.epoch + 1 if resume is not None else 1
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_start = time.monotonic()

        def on_step(step: int, steps: int, loss: float, epoch: int = epoch) -> None:
            if progress is not None:
                progress(
                    {
                        "event": "step",
                        "epoch": epoch,
                        "epochs": config.epochs,
                        "step": step,
                        "steps": steps,
                        "loss": loss,
                    }
                )

        train_loss = train_one_epoch(
            model, train, spec, optimizer, scheduler, config, class_weights, generator, device, on_step
        )
        probabilities = predict_probabilities(model, val, spec, device)
        labels = val.labels.numpy()
        val_loss = (
            float(F.nll_loss(torch.log(torch.from_numpy(probabilities).clamp_min(1e-7)), val.labels).item())
            if len(val)
            else float("nan")
        )
        report = classification_report(labels, probabilities, val.classes)
        stats = EpochStats(
            epoch, train_loss, val_loss, report["accuracy"], report["roc_auc"], time.monotonic() - epoch_start
        )
        history.append(stats)
        if progress is not None:
            progress({"event": "epoch", **asdict(stats), "epochs": config.epochs})
        if checkpoint is not None:
            seconds = trained_before + time.monotonic() - started
            history_dicts = [asdict(entry) for entry in history]
            checkpoint(capture(epoch, model, optimizer, scheduler, generator, history_dicts, report, seconds))
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    seconds = trained_before + time.monotonic() - started
    return TrainResult(state_dict=state_dict, report=report, history=history, seconds=seconds)
