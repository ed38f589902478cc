"""`xrayq up`: migrate, make sure a model is active, then run gateway, worker, trainer and the DICOM
receiver as children.

A child that exits is restarted (with a growing pause if it keeps crashing); Ctrl-C or SIGTERM stops
them all, letting each finish what it is doing first.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from shared.core.durable import remove_crash_leftovers
from shared.core.settings import Settings
from shared.db.bootstrap import prepare_backends
from shared.db.session import database_for

log = logging.getLogger("xrayq.up")

ROLES = ("gateway", "worker", "trainer")
DICOM_ROLE = "dicom"  # the DICOM receiver, when XRAYQ_DICOM_PORT is not 0
STOP_GRACE_S = 20.0


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "services.cli", self.role], preexec_fn=die_with_parent)
        self.started_at = time.monotonic()


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies, even by SIGKILL (Linux), so no
    orphaned worker keeps consuming from the queue of a stack that is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ensure_starter_model(settings: Settings) -> bool:
    """Train and activate the starter chest X-ray model unless one is active. False if it cannot."""
    from services.cli.progress import TrainingProgress
    from services.trainer.pipeline import (
        STARTER_CONFIG,
        STARTER_INTENDED_USE,
        STARTER_MODEL_NAME,
        starter_data_path,
        train_and_register,
    )
    from shared.models.registry import any_active_version

    prepare_backends(settings)
    with database_for(settings).session() as session:
        if any_active_version(session, settings.default_model):
            return True
    if settings.default_model != STARTER_MODEL_NAME:
        print(f"No active version of {settings.default_model!r}; train one with `xrayq train`.", flush=True)
        return False
    data = starter_data_path(settings)
    if not data.is_dir():
        print(
            f"No active model, and no starter data at {data} (set XRAYQ_DATA_DIR to the folder that "
            "holds chest-xray-224/).",
            flush=True,
        )
        return False
    print(
        f"No active model yet: training the starter chest X-ray model from {data} "
        f"({STARTER_CONFIG.architecture}, {STARTER_CONFIG.image_size} px, {STARTER_CONFIG.epochs} epochs; "
        "a few minutes on a laptop CPU)...",
        flush=True,
    )
    summary = train_and_register(
        settings,
        data,
        name=STARTER_MODEL_NAME,
        # XRAYQ_DEVICE and XRAYQ_TORCH_THREADS apply to the starter too (STARTER_CONFIG says "auto").
        config=replace(STARTER_CONFIG, device=settings.device, torch_threads=settings.torch_threads),
        progress=TrainingProgress(),
        intended_use=STARTER_INTENDED_USE,
    )
    v = summary["validation"]
    print(
        f"Model {summary['name']}@{summary['version']} is active: validation accuracy {v['accuracy']:.3f}, "
        f"ROC-AUC {v['roc_auc']:.3f}, trained in {summary['train_seconds']:.0f} s.",
        flush=True,
    )
    return True


def prepare_stack(settings: Settings) -> None:
    """Before any child starts: the schema and bucket, and the half-written files a crash left."""
    prepare_backends(settings)
    remove_crash_leftovers(settings)


def run_stack(settings: Settings, train_starter: bool = True) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    prepare_stack(settings)
    if train_starter:
        # In a child process: trained here, on CUDA, the model would leave this long-lived supervisor
        # holding a CUDA context and cached GPU memory (1.4 GiB on an H100) for the stack's whole life.
        subprocess.run([sys.executable, "-m", "services.cli", "ensure-model"], check=False)

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    children = [Child(role) for role in (*ROLES, DICOM_ROLE) if role != DICOM_ROLE or settings.dicom_port]
    for child in children:
        child.start()
    _announce(settings)
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                _restart_if_dead(child)
    finally:
        _stop_all(children)
    return 0


def _restart_if_dead(child: Child) -> None:
    assert child.process is not None
    code = child.process.poll()
    now = time.monotonic()
    if code is None:
        return
    if child.next_start == 0.0:
        # Back off when it keeps dying: 1 s, 2 s, 4 s ... up to 30 s; reset after a minute of health.
        if now - child.started_at > 60:
            child.restarts = 0
        delay = min(30.0, 2.0**child.restarts)
        child.next_start = now + delay
        log.warning("%s exited with code %s; restarting in %.0f s", child.role, code, delay)
        return
    if now >= child.next_start:
        child.restarts += 1
        child.next_start = 0.0
        child.start()
        log.info("%s restarted (restart #%d)", child.role, child.restarts)


def _stop_all(children: list[Child]) -> None:
    print("\nStopping xrayq (waiting for running work to finish)...", flush=True)
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def _announce(settings: Settings) -> None:
    url = settings.public_url
    mode = "embedded (SQLite, local files, no servers)" if settings.embedded else "services"
    if settings.auth_enabled:
        access = "API keys required (Authorization: Bearer <key>; create them with `xrayq keys create`)."
        auth_header = ' -H "Authorization: Bearer $XRAYQ_API_KEY"'
    else:
        access = f"OPEN: no API keys on this loopback address ({settings.host}); anyone on this machine can use it."
        auth_header = ""
    sample = settings.data_dir / "chest-xray-224" / "train" / "PNEUMONIA"
    example = next(iter(sorted(sample.glob("*.jpeg"))), None) if sample.is_dir() else None
    image = example.resolve() if example else "path/to/chest-xray.png"
    dicom = (
        f"{settings.dicom_ae_title} on {settings.dicom_bind_host}:{settings.dicom_port} (C-STORE, C-ECHO)"
        if settings.dicom_port
        else "off (XRAYQ_DICOM_PORT=0)"
    )
    print(
        f"""
xrayq is up in {mode} mode: {url}  (API docs: {url}/docs)
Dashboard: {url}/{"  (sign in with an API key)" if settings.auth_enabled else ""}
DICOM receiver: {dicom}; STOW-RS at {url}/dicomweb/studies
Access: {access}
State lives in {settings.home.resolve()} unless XRAYQ_DATABASE_URL / XRAYQ_BROKER_URL / XRAYQ_S3_ENDPOINT_URL
are set. Press Ctrl-C to stop.

Try it:
  curl -s{auth_header} -F file=@{image} {url}/v1/jobs
  curl -s{auth_header} "{url}/v1/jobs/<id>?wait=10"
""",
        flush=True,
    )
