"""Datasets: labelled images uploaded as a ZIP of class folders (optionally split) or a .npz."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from services.gateway.access import GuardedRoute
from services.gateway.deps import SessionDep, SettingsDep, StoreDep, TrainerDep
from services.gateway.problems import PROBLEMS
from shared.db.models import Dataset
from shared.schemas import DatasetView
from shared.training.datasets import check_dataset_name, create_dataset, find_dataset, read_upload
from shared.training.views import dataset_view

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=GuardedRoute)


@router.post("", status_code=201, response_model=DatasetView, responses=PROBLEMS)
def upload_dataset(
    principal: TrainerDep,
    response: Response,
    settings: SettingsDep,
    session: SessionDep,
    store: StoreDep,
    file: Annotated[
        UploadFile,
        File(description="A ZIP of CLASS/ or SPLIT/CLASS/ folders (PNG, JPEG, DICOM), or a MedMNIST-style .npz."),
    ],
    name: Annotated[
        str | None, Form(description="Dataset name (lower case); default: the extended dataset's name.")
    ] = None,
    extends: Annotated[
        str | None, Form(description="Dataset id, name or name@version whose files this version keeps.")
    ] = None,
    classes: Annotated[
        str | None, Form(description=".npz only: class names for labels 0, 1, ..., comma-separated.")
    ] = None,
    skip_unreadable: Annotated[
        bool, Form(description="Leave unreadable files out (listed in `details`) instead of refusing.")
    ] = False,
) -> DatasetView:
    parent = find_dataset(session, extends, principal.scope) if extends else None
    dataset_name = check_dataset_name(name or (parent.name if parent else "dataset"))
    class_names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    upload = read_upload(file.file, settings, skip_unreadable=skip_unreadable, classes=class_names)
    row = create_dataset(session, store, upload, name=dataset_name, parent=parent, organisation=principal.organisation)
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return dataset_view(row)


@router.get("", response_model=list[DatasetView], responses=PROBLEMS)
def list_datasets(principal: TrainerDep, session: SessionDep) -> list[DatasetView]:
    query = select(Dataset).order_by(Dataset.name, Dataset.version.desc())
    if principal.scope is not None:
        query = query.where(Dataset.organisation == principal.scope)
    return [dataset_view(row) for row in session.scalars(query)]


@router.get("/{dataset_id}", response_model=DatasetView, responses=PROBLEMS)
def read_dataset(dataset_id: str, principal: TrainerDep, session: SessionDep) -> DatasetView:
    return dataset_view(find_dataset(session, dataset_id, principal.scope))
