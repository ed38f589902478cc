"""Training without a server: the starter model of `xrayq up` and `xrayq train DATA`.

The same path as an API run, called in-process: the local folder or file becomes a dataset through
the upload intake, the dataset gets a training run row (owned as a local admin's request would be),
and the trainer's run executor trains, evaluates, compares, registers and promotes it. So every
version, the starter included, has a dataset, a run record, an evaluation report and plots.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.trainer.local_datasets import dataset_from_path
from services.trainer.runs import execute_run
from services.trainer.training import ProgressCallback, TrainConfig
from shared.auth import BOOTSTRAP_ORGANISATION
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.models import RunStatus, TrainingRun
from shared.db.session import database_for
from shared.schemas import TrainingRunCreate
from shared.training.runs import CONFIG_FIELDS, create_run

log = logging.getLogger(__name__)

STARTER_MODEL_NAME = "chest-xray"
# The starter recipe: small and quick enough to train from scratch in about three minutes on a
# 2-core CPU, yet well above the "always pneumonia" baseline. Better recipes come with training runs.
# What the starter model is for: DICOM inputs showing anything else are flagged in their results.
STARTER_INTENDED_USE = {"body_parts": ["CHEST"], "modalities": ["CR", "DX"]}
STARTER_CONFIG = TrainConfig(
    architecture="mobilenet_v3_small", image_size=128, epochs=5, batch_size=64, learning_rate=2e-3
)
# `activate` of the command line -> the run's promotion policy.
PROMOTION_FOR_ACTIVATE = {"if_none_active": "if_none_active", "always": "always", "never": "manual"}
SUMMARY_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "confusion_matrix")


def starter_data_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / "chest-xray-224" / "train"


def local_organisation(settings: Settings) -> str | None:
    """Who owns what a local command makes: what the API would file a local admin's request under
    (no organisation in the open embedded mode, the bootstrap admin's where keys are required)."""
    return BOOTSTRAP_ORGANISATION if settings.auth_enabled else None


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
    """Make a dataset of `data_path`, train a run on it in-process, register the version; its summary.

    `activate`: "if_none_active" (the default), "always" or "never". Raises the run's error if it fails.
    """
    started = time.monotonic()
    request = _run_request(name, name, config, activate, intended_use)
    database = database_for(settings)
    organisation = local_organisation(settings)
    with database.session() as session:
        dataset = dataset_from_path(
            session,
            make_object_store(settings),
            settings,
            Path(data_path),
            name=name,
            max_per_class=config.max_per_class,
            organisation=organisation,
        )
        # A local command acts as the local admin: its new names are shared models.
        request = request.model_copy(update={"dataset": dataset.id})
        run = create_run(session, settings, request, organisation, model_scope=None)
        run_id = run.id
    outcome = execute_run(settings, run_id, listener=progress)
    if outcome is None:
        with database.session() as session:
            row = session.get(TrainingRun, run_id)
            assert row is not None
            if row.status == RunStatus.cancelled:
                raise XrayqError("run_cancelled", f"Training run {run_id} was cancelled.")
            raise XrayqError(row.error_code or "training_failed", row.error_detail or f"Training run {run_id} failed.")
    summary = {
        "name": outcome["name"],
        "version": outcome["version"],
        "active": outcome["active"],
        "architecture": config.architecture,
        "classes": outcome["classes"],
        "validation": {key: outcome["validation"].get(key) for key in SUMMARY_METRICS},
        "train_seconds": outcome["train_seconds"],
        "total_seconds": round(time.monotonic() - started, 1),
    }
    log.info("registered %s@%s (run %s): %s", summary["name"], summary["version"], run_id, summary["validation"])
    return summary


def _run_request(
    name: str, dataset: str, config: TrainConfig, activate: str, intended_use: dict[str, list[str]] | None
) -> TrainingRunCreate:
    """The request an API client would send for this training, checked by the API's own schema."""
    if activate not in PROMOTION_FOR_ACTIVATE:
        raise XrayqError("invalid_parameter", f"activate is one of {sorted(PROMOTION_FOR_ACTIVATE)}, not {activate!r}.")
    values = config.to_dict()
    try:
        return TrainingRunCreate(
            dataset=dataset,
            model_name=name,
            promotion=PROMOTION_FOR_ACTIVATE[activate],  # type: ignore[arg-type]
            intended_use=intended_use or None,
            **{key: values[key] for key in CONFIG_FIELDS},
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise XrayqError("invalid_parameter", problems) from None
