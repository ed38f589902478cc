"""The model version a stack serves, loaded in this process the way the worker loads it."""

from __future__ import annotations

from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.models import ModelVersion
from shared.db.session import database_for
from shared.models.artifacts import LoadedModel, load_model
from shared.models.nets import pick_device
from shared.models.registry import parse_model_ref, resolve_version


def load_served_model(settings: Settings, model_ref: str) -> tuple[ModelVersion, LoadedModel]:
    """The registry row of `model_ref` (name@version) and its model, on the device the worker uses
    (XRAYQ_DEVICE): on a GPU host a ceiling measured here is the GPU's, not the CPU's."""
    name, version = parse_model_ref(model_ref)
    with database_for(settings).session() as session:
        row = resolve_version(session, name, version)
        session.expunge(row)
    return row, load_model(row, make_object_store(settings), pick_device(settings.device))
