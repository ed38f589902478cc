"""The baseline the benchmark compares against: what the older tools do.

A plain synchronous FastAPI endpoint that decodes, preprocesses and runs the model inside the request,
one image per forward pass. Run by bench.py as `uvicorn loadtest.sync_baseline:app` with the model
version given in XRAYQ_BASELINE_MODEL (name@version) and the usual XRAYQ_* settings.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI, File, UploadFile

from shared.core.settings import get_settings
from shared.core.storage import make_object_store
from shared.db.session import database_for
from shared.imaging.decode import open_image
from shared.imaging.preprocess import preprocess
from shared.models.artifacts import load_model
from shared.models.nets import pick_device
from shared.models.registry import parse_model_ref, resolve_version

settings = get_settings()
name, version = parse_model_ref(os.environ.get("XRAYQ_BASELINE_MODEL", settings.default_model))
with database_for(settings).session() as session:
    row = resolve_version(session, name, version)
    session.expunge(row)
model = load_model(row, make_object_store(settings), pick_device(settings.device))  # as the worker
app = FastAPI(title="synchronous baseline")


@app.post("/predict")
def predict(file: UploadFile = File(...)) -> dict[str, object]:
    tensor = preprocess(open_image(file.file.read()), model.spec).unsqueeze(0).to(model.device)
    with torch.inference_mode():
        probabilities = torch.softmax(model.module(tensor), dim=1)[0].tolist()
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {"label": model.classes[best], "probabilities": dict(zip(model.classes, probabilities, strict=True))}
