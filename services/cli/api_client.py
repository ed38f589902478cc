"""The HTTP client of the commands that talk to a running gateway: datasets, training runs, models.

`--server` (or XRAYQ_SERVER; default: this machine's gateway) and `--api-key` (or XRAYQ_API_KEY) say
where and as whom. Errors from the API are printed as their problem+json code and detail.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from tqdm import tqdm

from services.cli.output import fail

TERMINAL = {"succeeded", "failed", "cancelled"}

ServerOption = Annotated[
    str | None,
    typer.Option("--server", envvar="XRAYQ_SERVER", help="gateway URL (default: this machine's gateway)"),
]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", envvar="XRAYQ_API_KEY", help="API key")]


class ApiError(Exception):
    pass


@contextlib.contextmanager
def connect(server: str | None, api_key: str | None) -> Iterator[httpx.Client]:
    """A client for the gateway; an ApiError inside the block is printed to stderr and exits with 1."""
    from shared.core.settings import get_settings

    base_url = (server or get_settings().public_url).rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(60, read=1800)) as client:
            yield client
    except ApiError as error:
        raise fail(str(error)) from None


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise ApiError(f"cannot reach the gateway at {client.base_url}: {exc}") from None
    if response.status_code >= 400:
        try:
            body = response.json()
            message = f"{body.get('code')}: {body.get('detail')}"
            if body.get("files"):
                message += "\n  " + "\n  ".join(str(f) for f in body["files"][:20])
        except ValueError:
            message = response.text[:500]
        raise ApiError(f"{method} {path} -> {response.status_code} {message}")
    return response.json()


def upload_dataset(
    client: httpx.Client,
    path: Path,
    *,
    name: str | None,
    extends: str | None = None,
    classes: str | None = None,
    skip_unreadable: bool = False,
) -> dict[str, Any]:
    """A folder is zipped on the fly (stored, not recompressed: images are compressed already)."""
    path = Path(path)
    form = {k: v for k, v in {"name": name, "extends": extends, "classes": classes}.items() if v}
    form["skip_unreadable"] = "true" if skip_unreadable else "false"
    with tempfile.TemporaryDirectory() as tmp:
        archive = path
        if path.is_dir():
            archive = Path(tmp) / f"{path.name}.zip"
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
                for file in tqdm(files, desc=f"packing {path.name}", unit="file", file=sys.stderr, disable=None):
                    out.write(file, file.relative_to(path).as_posix())
        elif not path.is_file():
            raise ApiError(f"{path} is neither a folder nor a file.")
        with archive.open("rb") as handle:
            return call(  # type: ignore[no-any-return]
                client, "POST", "/v1/datasets", files={"file": (archive.name, handle, "application/zip")}, data=form
            )


def dataset_name(path: Path) -> str:
    """A valid dataset name from a folder's or file's name."""
    stem = Path(path).resolve().name.rsplit(".", 1)[0] if Path(path).is_file() else Path(path).resolve().name
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem.lower()).strip("-._")
    return cleaned[:64] or "dataset"


def follow_run(client: httpx.Client, run_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    """Follow a training run until it ends: a tqdm bar over its percent (on a terminal), and a line per
    finished epoch (always), both on stderr."""
    bar = tqdm(
        total=100.0, unit="%", bar_format="{l_bar}{bar}| {n:.1f}% [{elapsed}{postfix}]", file=sys.stderr, disable=None
    )
    reported_epochs = 0
    try:
        while True:
            run = call(client, "GET", f"/v1/training-runs/{run_id}")
            progress = run["progress"]
            for epoch in run["history"][reported_epochs:]:
                tqdm.write(
                    f"epoch {epoch['epoch']}: train loss {epoch['train_loss']:.4f}, val loss {epoch['val_loss']:.4f}, "
                    f"val accuracy {epoch['val_accuracy']:.4f}, val ROC-AUC {epoch.get('val_roc_auc')}",
                    file=sys.stderr,
                )
            reported_epochs = len(run["history"])
            bar.set_description(f"{run['status']}: {progress.get('phase') or ''}")
            if progress.get("eta_seconds") is not None:
                bar.set_postfix_str(
                    f"epoch {progress.get('epoch')}/{progress.get('epochs')}, ETA {progress['eta_seconds']:.0f} s"
                )
            bar.n = float(progress.get("percent") or 0.0) if progress.get("phase") != "loading" else 0.0
            bar.refresh()
            if run["status"] in TERMINAL:
                return run  # type: ignore[no-any-return]
            time.sleep(poll_s)
    finally:
        bar.close()
