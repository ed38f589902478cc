from __future__ import annotations

import pytest
import torch

from shared.core.errors import XrayqError
from shared.core.storage import make_object_store
from shared.db.models import ModelVersion
from shared.db.session import database_for
from shared.models.artifacts import load_model
from shared.models.registry import parse_model_ref, resolve_version


def test_trained_version_is_registered_active_and_loads_back(services_settings, services_model) -> None:
    db = database_for(services_settings)
    store = make_object_store(services_settings)
    with db.session() as session:
        row = resolve_version(session, "chest-xray")
        assert row.version == services_model["version"]
        assert row.is_active
        card = row.card
        assert card["architecture"] == "mobilenet_v3_small"
        assert card["classes"] == ["NORMAL", "PNEUMONIA"]
        assert card["preprocessing"]["size"] == 64
        assert card["weights"]["format"] == "safetensors"
        assert set(card["metrics"]["validation"]) >= {"accuracy", "roc_auc", "confusion_matrix"}
        assert card["data"]["split"]["val"] > 0
        model = load_model(row, store, torch.device("cpu"))
    with torch.inference_mode():
        out = model.module(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 2)
    assert store.exists(row.card_key)


def test_corrupted_weights_are_detected(services_settings, services_model) -> None:
    db = database_for(services_settings)
    with db.session() as session:
        row = resolve_version(session, "chest-xray")
        session.expunge(row)
    tampered = ModelVersion(
        **{
            c: getattr(row, c)
            for c in ("id", "name", "version", "architecture", "classes", "weights_key", "card_key", "card", "metrics")
        },
        weights_sha256="0" * 64,
    )
    with pytest.raises(XrayqError) as caught:
        load_model(tampered, make_object_store(services_settings), torch.device("cpu"))
    assert caught.value.code == "model_corrupt"


def test_unknown_model_and_version_are_clear_errors(services_settings, services_model) -> None:
    with database_for(services_settings).session() as session:
        with pytest.raises(XrayqError) as caught:
            resolve_version(session, "no-such-model")
        assert caught.value.code == "model_not_found"
        with pytest.raises(XrayqError) as caught:
            resolve_version(session, "chest-xray", 999)
        assert caught.value.code == "model_not_found"


def test_model_refs_parse() -> None:
    assert parse_model_ref("chest-xray") == ("chest-xray", None)
    assert parse_model_ref("chest-xray@3") == ("chest-xray", 3)
    with pytest.raises(XrayqError):
        parse_model_ref("chest-xray@latest")
