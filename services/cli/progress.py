"""Progress of a training in this process (`xrayq train DATA`, the starter model), drawn with tqdm.

On a terminal, a bar over each epoch's steps; always, one line for the data and one per epoch, so a
log file or a pipe stays readable. Everything goes to stderr: stdout keeps the command's result.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


class TrainingProgress:
    """A `progress` callback for `train_and_register`: events `data`, `step` and `epoch`; others are ignored."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stderr
        self.bar: tqdm | None = None  # type: ignore[type-arg]

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "data":
            self.write(
                f"data: {event['train']} train / {event['val']} validation images, classes {event['counts']}"
                f" (loaded in {event['load_seconds']} s)"
            )
        elif kind == "step":
            self.step(event)
        elif kind == "epoch":
            self.close()
            auc = event["val_roc_auc"]
            self.write(
                f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f}, "
                f"val loss {event['val_loss']:.4f}, val accuracy {event['val_accuracy']:.4f}, "
                f"val ROC-AUC {auc if auc is None else round(auc, 4)} ({event['seconds']:.0f} s)"
            )

    def step(self, event: dict[str, Any]) -> None:
        if self.bar is None:
            # disable=None: no bar unless the file is a terminal (the epoch lines say enough in a log).
            self.bar = tqdm(
                total=event["steps"],
                desc=f"epoch {event['epoch']}/{event['epochs']}",
                unit="step",
                file=self.file,
                leave=False,
                disable=None,
            )
        self.bar.update(event["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)

    def write(self, line: str) -> None:
        tqdm.write(line, file=self.file)
        self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
