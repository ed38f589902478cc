"""A training run's state at the end of an epoch, kept in the object store so another trainer continues it.

What `fit` needs to go on as if it had never stopped: the model's weights and buffers, the optimizer's
moments, the learning-rate schedule's position, every random generator training draws from (the epoch
order and augmentation generator, torch's global one for dropout, CUDA's, numpy's and Python's), the
epochs' history, the last validation report and the seconds trained. On one device with the same thread
count the continued run is bit-for-bit the uninterrupted one (GPU kernels may differ in their last bits).

Stored with `torch.save` and read back with `torch.load(weights_only=True)`: tensors and plain values
only (the report as JSON text), never pickled code. The object store writes it whole or not at all.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.session import Database
from shared.training.checkpoints import checkpoint_key, discard_checkpoint
from shared.training.runs import record_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# The recipe fields a checkpoint must agree on to be continued (the device and threads may change).
RECIPE_FIELDS_IGNORED = ("device", "torch_threads")


@dataclass
class TrainingState:
    epoch: int  # epochs completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor
    rng: dict[str, Any]
    history: list[dict[str, Any]]  # one `EpochStats` as a dict per epoch
    report: dict[str, Any]  # the last epoch's validation report
    seconds: float  # training time so far, over every trainer that held the run
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the recipe and classes it belongs to


def recipe_fingerprint(config: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """What identifies the training a checkpoint belongs to: a checkpoint of another recipe is not resumed."""
    recipe = {key: value for key, value in config.items() if key not in RECIPE_FIELDS_IGNORED}
    return {"recipe": json.dumps(recipe, sort_keys=True, default=str), "classes": list(classes)}


def capture(
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    history: list[dict[str, Any]],
    report: dict[str, Any],
    seconds: float,
) -> TrainingState:
    numpy_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))  # (name, keys, pos, has_gauss, gauss)
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": random.getstate(),
    }
    return TrainingState(
        epoch=epoch,
        model={key: value.detach().cpu() for key, value in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        generator=generator.get_state(),
        rng=rng,
        history=[dict(entry) for entry in history],
        report=report,
        seconds=seconds,
    )


def restore(
    state: TrainingState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> None:
    """Put `state` back into freshly built training objects and the process's random generators."""
    model.load_state_dict(state.model)
    # A copy: on the parameters' device the optimizer would adopt the state's tensors and step them in place.
    optimizer.load_state_dict(copy.deepcopy(state.optimizer))
    scheduler.load_state_dict(state.scheduler)
    generator.set_state(state.generator)
    torch.set_rng_state(state.rng["torch"])
    if state.rng["cuda"] and torch.cuda.is_available() and len(state.rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state.rng["cuda"])
    numpy_state = state.rng["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state.rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def state_bytes(state: TrainingState) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": state.epoch,
            "model": state.model,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "generator": state.generator,
            "rng": state.rng,
            "history": state.history,
            "report": json.dumps(state.report, default=float),
            "seconds": state.seconds,
            "fingerprint": state.fingerprint,
        },
        buffer,
    )
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> TrainingState:
    """The state in `data`; raises ValueError when it is not a checkpoint this code can continue."""
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holding anything but plain values
        raise ValueError(f"unreadable checkpoint: {type(error).__name__}: {error}") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a checkpoint of this format")
    return TrainingState(
        epoch=int(saved["epoch"]),
        model=saved["model"],
        optimizer=saved["optimizer"],
        scheduler=saved["scheduler"],
        generator=saved["generator"],
        rng=saved["rng"],
        history=list(saved["history"]),
        report=json.loads(saved["report"]),
        seconds=float(saved["seconds"]),
        fingerprint=saved["fingerprint"],
    )


class RunCheckpoints:
    """One run's checkpoint: written after each epoch (then its epoch on the row), read when the run
    comes back to a trainer, deleted when the run ends."""

    def __init__(
        self, database: Database, store: ObjectStore, run_id: str, trainer: str, fingerprint: dict[str, Any]
    ) -> None:
        self.database = database
        self.store = store
        self.run_id = run_id
        self.trainer = trainer
        self.fingerprint = fingerprint

    def load(self, epoch: int | None) -> TrainingState | None:
        """The checkpoint of `epoch` (the row's `checkpoint_epoch`); None, to start afresh, when there is
        none, or it cannot be read, or it belongs to another recipe."""
        if epoch is None:
            return None
        try:
            state = state_from_bytes(self.store.get(checkpoint_key(self.run_id)))
        except (ObjectNotFound, ValueError) as error:
            log.warning("training run %s: checkpoint of epoch %d unusable (%s); afresh", self.run_id, epoch, error)
            return None
        if state.fingerprint != self.fingerprint or state.epoch != epoch:
            log.warning("training run %s: its checkpoint is of another recipe or epoch; starting afresh", self.run_id)
            return None
        log.info("training run %s resumes after epoch %d", self.run_id, state.epoch)
        return state

    def save(self, state: TrainingState) -> None:
        """Write the checkpoint, then record its epoch. A failed write is logged and training goes on:
        the previous checkpoint (if any) still stands. Raises `RunNotHeld` if the run is no longer ours."""
        try:
            data = state_bytes(replace(state, fingerprint=self.fingerprint))
            self.store.put(checkpoint_key(self.run_id), data)
        except Exception:
            log.warning("training run %s: checkpoint of epoch %d not written", self.run_id, state.epoch, exc_info=True)
            return
        with self.database.session() as session:
            record_checkpoint(session, self.run_id, self.trainer, state.epoch)
        log.info("training run %s: checkpoint of epoch %d written (%.1f MB)", self.run_id, state.epoch, len(data) / 1e6)

    def discard(self) -> None:
        discard_checkpoint(self.store, self.run_id)
