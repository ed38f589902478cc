"""The baseline the benchmark compares against: what the older tools do.

A plain synchronous FastAPI endpoint that decodes, preprocesses and runs the model inside the request,
one image per forward pass. Run by bench.py as `uvicorn loadtest.sync_baseline:app` with the model
version given in XRAYQ_BASELINE_MODEL (name@version) and the usual XRAYQ_* settings.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI, File, UploadFile

from loadtest.harness.served_model import load_served_model
from shared.core.settings import get_settings
from shared.imaging.decode import open_image
from shared.imaging.preprocess import preprocess

settings = get_settings()
_, model = load_served_model(settings, os.environ.get("XRAYQ_BASELINE_MODEL", settings.default_model))  # as the worker
app = FastAPI(title="synchronous baseline")


@app.post("/predict")
def predict(file: UploadFile = File(...)) -> dict[str, object]:
    tensor = preprocess(open_image(file.file.read()), model.spec).unsqueeze(0).to(model.device)
    with torch.inference_mode():
        probabilities = torch.softmax(model.module(tensor), dim=1)[0].tolist()
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {"label": model.classes[best], "probabilities": dict(zip(model.classes, probabilities, strict=True))}
