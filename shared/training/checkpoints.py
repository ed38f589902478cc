"""Where a training run's checkpoint lives in the object store, and its removal when the run ends.

The trainer writes it after every epoch (`services.trainer.checkpoints`) and reads it when the run comes
back to a trainer; whoever ends the run for good (the trainer, the reconciler after the resume budget, a
cancellation of a requeued run) deletes it, so finished runs leave no checkpoints behind.
"""

from __future__ import annotations

import logging

from shared.core.storage import ObjectStore

log = logging.getLogger(__name__)


def checkpoint_key(run_id: str) -> str:
    return f"training-runs/{run_id}/checkpoint.pt"


def discard_checkpoint(store: ObjectStore, run_id: str) -> None:
    """Delete the run's checkpoint, if any; a failure is logged, never raised (the run's outcome stands)."""
    try:
        store.delete(checkpoint_key(run_id))
    except Exception:
        log.warning("could not delete the checkpoint of training run %s", run_id, exc_info=True)
