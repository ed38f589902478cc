"""Checkpoints: a run stopped after an epoch and continued from its checkpoint trains exactly as one
that never stopped; the checkpoint holds plain values only and is refused when it is not the run's."""

from __future__ import annotations

import io
import os
import signal
from dataclasses import asdict

import pytest
import torch

from services.trainer import handback
from services.trainer.checkpoints import (
    RunCheckpoints,
    TrainingState,
    capture,
    recipe_fingerprint,
    restore,
    state_bytes,
    state_from_bytes,
)
from services.trainer.data import LabelledImages
from services.trainer.training import TrainConfig, fit
from shared.core.storage import LocalObjectStore
from shared.models.nets import build_model
from shared.training.checkpoints import checkpoint_key

CONFIG = TrainConfig(
    architecture="mobilenet_v3_small", image_size=32, color="grayscale", epochs=3, batch_size=8,
    learning_rate=2e-3, normalization="fixed", device="cpu", torch_threads=1,
)  # fmt: skip


def images(n: int, seed: int) -> LabelledImages:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    pixels = torch.randint(0, 120, (n, 1, 32, 32), generator=generator) + 100 * labels.view(-1, 1, 1, 1)
    return LabelledImages(pixels.to(torch.uint8), labels, ["NORMAL", "PNEUMONIA"], [str(i) for i in range(n)])


TRAIN, VAL = images(40, seed=1), images(12, seed=2)


def trained(**kwargs) -> tuple[dict[str, torch.Tensor], list[dict], list[bytes]]:
    checkpoints: list[bytes] = []
    result = fit(TRAIN, VAL, CONFIG, checkpoint=lambda state: checkpoints.append(state_bytes(state)), **kwargs)
    history = [{k: v for k, v in asdict(h).items() if k != "seconds"} for h in result.history]
    return result.state_dict, history, checkpoints


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_continued_from_its_checkpoint_ends_bit_for_bit_as_one_that_never_stopped() -> None:
    weights, history, checkpoints = trained()
    assert len(checkpoints) == CONFIG.epochs  # one per epoch, the last included

    after_first = state_from_bytes(checkpoints[0])
    assert after_first.epoch == 1 and len(after_first.history) == 1
    resumed_weights, resumed_history, resumed_checkpoints = trained(resume=after_first)

    assert_same_tensors(weights, resumed_weights)
    assert resumed_history == history  # epochs 1 (from the checkpoint), 2 and 3, figures identical
    assert len(resumed_checkpoints) == CONFIG.epochs - 1
    # Resumed after the last epoch (lost while evaluating): nothing left to train, the same weights.
    finished_weights, finished_history, _ = trained(resume=state_from_bytes(checkpoints[-1]))
    assert_same_tensors(weights, finished_weights) and finished_history == history


def training_objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = build_model("mobilenet_v3_small", 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=20)
    return model, optimizer, scheduler


def one_step(model, optimizer, scheduler) -> torch.Tensor:
    model.train()
    inputs = torch.randn(4, 3, 32, 32)  # from the global generator, restored with the checkpoint
    loss = torch.nn.functional.cross_entropy(model(inputs), torch.tensor([0, 1, 0, 1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def test_the_round_trip_gives_identical_model_and_optimizer_state_and_the_same_next_step() -> None:
    torch.manual_seed(0)
    model, optimizer, scheduler = training_objects()
    one_step(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(5)
    state = capture(1, model, optimizer, scheduler, generator, [{"epoch": 1}], {"accuracy": 0.5}, 1.5)
    loaded = state_from_bytes(state_bytes(state))

    copy, copy_optimizer, copy_scheduler = training_objects()
    copy_generator = torch.Generator()
    restore(loaded, copy, copy_optimizer, copy_scheduler, copy_generator)
    assert_same_tensors(model.state_dict(), copy.state_dict())
    original_moments = optimizer.state_dict()["state"]
    restored_moments = copy_optimizer.state_dict()["state"]
    for index, moments in original_moments.items():
        assert_same_tensors(moments, restored_moments[index])
    assert copy_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(copy_generator.get_state(), generator.get_state())
    assert loaded.report == {"accuracy": 0.5} and loaded.seconds == 1.5

    # The next step, from the global generator onwards, is the same in both.
    restore(loaded, model, optimizer, scheduler, generator)
    expected = one_step(model, optimizer, scheduler)
    restore(loaded, copy, copy_optimizer, copy_scheduler, copy_generator)
    assert torch.equal(one_step(copy, copy_optimizer, copy_scheduler), expected)
    assert_same_tensors(model.state_dict(), copy.state_dict())


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_with_pickled_code_or_garbage_is_refused_not_run() -> None:
    buffer = io.BytesIO()
    torch.save({"format": 1, "epoch": Payload()}, buffer)
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        state_from_bytes(buffer.getvalue())
    with pytest.raises(ValueError):
        state_from_bytes(b"not a checkpoint")


def test_a_checkpoint_of_another_recipe_or_a_missing_one_means_starting_afresh(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    fingerprint = recipe_fingerprint(CONFIG.to_dict(), ["NORMAL", "PNEUMONIA"])
    # The device and thread count may change between trainers; the recipe may not.
    assert recipe_fingerprint({**CONFIG.to_dict(), "device": "cuda", "torch_threads": 8}, TRAIN.classes) == fingerprint
    checkpoints = RunCheckpoints(None, store, "run-1", "trainer", fingerprint)  # type: ignore[arg-type]
    assert checkpoints.load(None) is None and checkpoints.load(1) is None  # none written

    model, optimizer, scheduler = training_objects()
    state = capture(1, model, optimizer, scheduler, torch.Generator(), [], {}, 0.0)
    other = recipe_fingerprint({**CONFIG.to_dict(), "epochs": 9}, TRAIN.classes)
    store.put(checkpoint_key("run-1"), state_bytes(TrainingState(**{**state.__dict__, "fingerprint": other})))
    assert checkpoints.load(1) is None
    store.put(checkpoint_key("run-1"), state_bytes(TrainingState(**{**state.__dict__, "fingerprint": fingerprint})))
    assert checkpoints.load(1) is not None and checkpoints.load(2) is None  # the row's epoch must match
    checkpoints.discard()
    assert not store.exists(checkpoint_key("run-1"))


def test_sigterm_while_holding_a_run_asks_for_a_hand_back_instead_of_ending_the_process() -> None:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, handback.HANDBACK_SIGNAL)}
    try:
        handback.hand_back_on_sigterm()
        os.kill(os.getpid(), handback.HANDBACK_SIGNAL)  # no run in hand: nothing to give back
        handback.check_handback()
        for sig in (signal.SIGTERM, handback.HANDBACK_SIGNAL):  # the process's own, or its main process's
            with handback.holding_a_run():
                handback.check_handback()  # nothing asked yet
                os.kill(os.getpid(), sig)
                os.kill(os.getpid(), handback.HANDBACK_SIGNAL)  # the forwarded one on top: still one request
                with pytest.raises(handback.RunHandedBack):
                    handback.check_handback()
            handback._stop.clear()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handback._stop.clear()
