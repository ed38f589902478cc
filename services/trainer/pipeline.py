"""Data -> training -> evaluation -> registered model version: the one path every training takes.

`xrayq train`, the starter model of `xrayq up` and the trainer service's queued task all call
`train_and_register`.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from services.trainer.data import detect_color, load_dataset, train_val_split
from services.trainer.training import ProgressCallback, TrainConfig, fit
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.session import database_for
from shared.models.artifacts import register_version

log = logging.getLogger(__name__)

STARTER_MODEL_NAME = "chest-xray"
# The starter recipe: small and quick enough to train from scratch in about three minutes on a
# 2-core CPU, yet well above the "always pneumonia" baseline. Better recipes come with training runs.
# What the starter model is for: DICOM inputs showing anything else are flagged in their results.
STARTER_INTENDED_USE = {"body_parts": ["CHEST"], "modalities": ["CR", "DX"]}
STARTER_CONFIG = TrainConfig(
    architecture="mobilenet_v3_small", image_size=128, epochs=5, batch_size=64, learning_rate=2e-3
)


def starter_data_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / "chest-xray-224" / "train"


def train_and_register(
    settings: Settings,
    data_path: Path,
    *,
    name: str,
    config: TrainConfig,
    activate: str = "if_none_active",
    progress: ProgressCallback | None = None,
    intended_use: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Train on `data_path` with a fixed validation split, register the version; returns its summary."""
    started = time.monotonic()
    data_path = Path(data_path).resolve()
    if config.color == "auto":
        config = replace(config, color=detect_color(data_path))
    spec = config.spec()
    data = load_dataset(data_path, spec, max_per_class=config.max_per_class)
    train_idx, val_idx = train_val_split(data, config.val_fraction, config.seed)
    train, val = data.subset(train_idx), data.subset(val_idx)
    if progress is not None:
        progress(
            {
                "event": "data",
                "train": len(train),
                "val": len(val),
                "classes": data.classes,
                "counts": data.class_counts(),
                "load_seconds": round(time.monotonic() - started, 2),
            }
        )
    result = fit(train, val, config, progress)
    metrics = {"validation": result.report, "history": [vars(h) for h in result.history]}
    data_card = {
        "source": str(data_path),
        "classes": data.classes,
        "counts": data.class_counts(),
        "split": {
            "method": "stratified by class, grouped by patient, hashed with seed",
            "seed": config.seed,
            "val_fraction": config.val_fraction,
            "train": len(train),
            "val": len(val),
        },
    }
    training_card = {
        "config": config.to_dict(),
        "seconds": round(result.seconds, 1),
        "device": str(torch.device("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu")),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    database = database_for(settings)
    store = make_object_store(settings)
    with database.session() as session:
        row = register_version(
            session,
            store,
            name=name,
            architecture=config.architecture,
            classes=data.classes,
            preprocessing=spec,
            state_dict=result.state_dict,
            metrics=metrics,
            data=data_card,
            training=training_card,
            activate=activate,
            intended_use=intended_use,
        )
        summary = {
            "name": row.name,
            "version": row.version,
            "active": row.is_active,
            "architecture": row.architecture,
            "classes": row.classes,
            "validation": {
                k: result.report.get(k)
                for k in ("accuracy", "roc_auc", "sensitivity", "specificity", "confusion_matrix")
            },
            "train_seconds": round(result.seconds, 1),
            "total_seconds": round(time.monotonic() - started, 1),
        }
    log.info("registered %s@%s: %s", summary["name"], summary["version"], summary["validation"])
    return summary
