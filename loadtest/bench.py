"""Headless benchmark of a running xrayq stack; prints one JSON document (`make bench`).

What it measures, all in one run, against the model version the stack serves:
- model_only: decode + preprocess + forward of that model in this one process, on the worker's
  device, at batch sizes 1..64, best of three repeats (the ceiling on this machine); and the forward
  pass as the worker serves it (calibrated, `shared.models.answers`) with and without the per-result
  uncertainty (the head's Monte Carlo dropout samples): what uncertainty costs;
- pipeline: images/s through the batch API (N images as concurrent ZIP batches), from the first byte
  sent until the last job finished; the median of three rounds, each on images of its own;
- single: single-image jobs at concurrency 1, 8 and 32 (submit, then long-poll), with latencies;
- overhead_ms_p50: single-job latency at idle minus the model's time for one image;
- submit_rps: submissions accepted per second by a gateway whose messages no worker reads (of
  XRAYQ_GATEWAY_PROCESSES processes; `--gateway-processes 1,3` measures each count);
- baseline: a synchronous endpoint running the same model inside the request, at concurrency 32;
- peak RSS of the stack's gateway and worker processes (when they run on this machine);
- idle_cpu: percent of one core each of the stack's processes uses while nothing is sent;
- pipeline.cpu_ms_per_image: CPU milliseconds per image each process spent during the pipeline
  rounds (from the kernel's counters, so it holds whoever shares the machine), and the part of it
  outside the model's forward pass (the pipeline's own cost; `model_only.forward_cpu_ms_per_image`).

Usage: python -m loadtest.bench [--url URL] [--start] [--images N] [--output FILE]
       python -m loadtest.bench --submit-only --gateway-processes 1,3   (submissions/s by gateway processes)
The stack's XRAYQ_* settings must be in the environment (the benchmark reads the model from the same
registry and storage). With --start, it starts `xrayq up` itself when nothing answers at URL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from loadtest.harness.clients import TERMINAL_JOB_STATUSES, auth_headers, run_clients, summarise
from loadtest.harness.cpu import cpu_seconds_by_role, cpu_spent
from loadtest.harness.images import load_images, zip_bytes
from loadtest.harness.processes import free_port, peak_rss_mb, start_process, stop_process, wait_ready
from shared.core.settings import Settings, get_settings

if TYPE_CHECKING:  # torch is imported only when a measurement needs it: `--help` stays instant
    from shared.models.artifacts import LoadedModel

# --- model only ----------------------------------------------------------------------------------


def classify_batch(model: LoadedModel, batch: list[bytes]) -> None:
    """Decode, preprocess and forward one batch, the probabilities back on the host, as the worker has them."""
    import torch

    from shared.imaging.decode import open_image
    from shared.imaging.preprocess import preprocess

    tensors = torch.stack([preprocess(open_image(data), model.spec) for data in batch]).to(model.device)
    with torch.inference_mode():
        model.module(tensors).cpu()


# A ceiling is a best case: each figure is the best of three timed repeats, so a moment of contention
# on a small machine does not lower the bar the pipeline is compared with.


def best_decode_and_forward_ips(model: LoadedModel, payloads: list[bytes], size: int) -> float:
    batches = [payloads[i : i + size] for i in range(0, min(len(payloads), max(size * 6, 48)), size)]
    classify_batch(model, batches[0])  # warm-up
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        for batch in batches:
            classify_batch(model, batch)
        rates.append(sum(map(len, batches)) / (time.perf_counter() - started))
    return round(max(rates), 1)


def best_forward_only_ips(model: LoadedModel, size: int, forward: Callable[[Any], object] | None = None) -> float:
    """The network alone (or `forward`), on random input already on the device."""
    import torch

    device = model.device
    forward = forward or model.module

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    x = torch.randn(size, 3, model.spec.size, model.spec.size, device=device)
    passes = max(3, 64 // size)
    with torch.inference_mode():
        forward(x)
        rates = []
        for _ in range(3):
            sync()
            started = time.perf_counter()
            for _ in range(passes):
                forward(x)
            sync()  # CUDA runs asynchronously: without this the clock stops before the work does
            rates.append(size * passes / (time.perf_counter() - started))
    return round(max(rates), 1)


def measure_model_only(settings: Settings, model_ref: str, images: list[tuple[str, bytes]]) -> dict[str, Any]:
    import torch

    from loadtest.harness.served_model import load_served_model

    row, model = load_served_model(settings, model_ref)
    payloads = [data for _, data in images]
    per_batch: dict[int, float] = {}
    forward_only: dict[int, float] = {}
    for size in (1, 8, 16, 32, 64):
        per_batch[size] = best_decode_and_forward_ips(model, payloads, size)
        forward_only[size] = best_forward_only_ips(model, size)
    one = []
    for data in payloads[:20]:
        started = time.perf_counter()
        classify_batch(model, [data])
        one.append((time.perf_counter() - started) * 1000)
    best = max(per_batch, key=per_batch.__getitem__)
    return {
        "model": f"{row.name}@{row.version}",
        "architecture": row.architecture,
        "input_size": model.spec.size,
        "best_batch": best,
        "ips": per_batch[best],
        "ips_by_batch": per_batch,
        "forward_only_ips_by_batch": forward_only,
        "uncertainty_cost": measure_uncertainty_cost(model),
        "forward_cpu_ms_per_image": forward_cpu_ms_per_image(model),
        "one_image_ms_p50": round(statistics.median(one), 2),
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
    }


def served_forward(model: LoadedModel, uncertainty: bool) -> Callable[[Any], object]:
    """The worker's forward pass (`services.worker.inference`): features tapped, answers calibrated as the
    card says, and, with `uncertainty`, the head re-run under its dropout masks; probabilities to the host."""
    from shared.models.answers import answers

    card = model.card if uncertainty else {k: v for k, v in model.card.items() if k != "uncertainty"}

    def forward(x: Any) -> object:
        outputs = model.head.forward(x)
        served = answers(model.head, card, outputs.logits, outputs.features)
        return served.probabilities.cpu(), None if served.uncertainty is None else served.uncertainty.cpu()

    return forward


def measure_uncertainty_cost(model: LoadedModel, sizes: tuple[int, ...] = (1, 8, 64)) -> dict[str, Any]:
    """Images/s of the served forward pass with and without the uncertainty, per batch size."""
    without = {size: best_forward_only_ips(model, size, served_forward(model, False)) for size in sizes}
    with_it = {size: best_forward_only_ips(model, size, served_forward(model, True)) for size in sizes}
    return {
        "method": (model.card.get("uncertainty") or {}).get("method"),
        "samples": model.head.samples if model.head.sampled else 1,
        "without_ips_by_batch": without,
        "with_ips_by_batch": with_it,
        "overhead_by_batch": {size: round(without[size] / with_it[size] - 1, 3) for size in sizes},
    }


# --- through the API -----------------------------------------------------------------------------


def forward_cpu_ms_per_image(model: LoadedModel, size: int = 16) -> float | None:
    """CPU time (all of this process's threads) the forward pass takes per image at batch `size`: the
    share of the worker's CPU that is the model's. None on a GPU, where the forward pass is not CPU."""
    import torch

    if model.device.type != "cpu":
        return None
    x = torch.randn(size, 3, model.spec.size, model.spec.size)
    with torch.inference_mode():
        model.module(x)
        started = time.process_time()
        for _ in range(4):
            model.module(x)
        spent = time.process_time() - started
    return round(spent * 1000 / (4 * size), 2)


def measure_idle_cpu(seconds: float) -> dict[str, float]:
    """Percent of one core each role's processes use over `seconds` with nothing sent."""
    before = cpu_seconds_by_role()
    time.sleep(seconds)
    spent = cpu_spent(before, cpu_seconds_by_role())
    percent = {role: round(100 * cpu_s / seconds, 1) for role, cpu_s in spent.items()}
    return {**percent, "total": round(sum(percent.values()), 1), "seconds": seconds}


def measure_pipeline(url: str, images: list[tuple[str, bytes]], batch_size: int, clients: int) -> dict[str, Any]:
    """N images as ZIP batches of `batch_size`, sent by `clients` concurrent senders (as PACS nodes
    send studies), timed from the first byte sent until the last job finished."""
    bodies = [
        zip_bytes(
            (f"{index:05d}-{name}", data)
            for index, (name, data) in enumerate(images[start : start + batch_size], start)
        )
        for start in range(0, len(images), batch_size)
    ]
    client = httpx.Client(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients * 2), headers=auth_headers()
    )

    def send(body: bytes) -> str:
        response = client.post("/v1/batches", files={"files": ("bench.zip", body, "application/zip")})
        response.raise_for_status()
        return response.json()["id"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        batch_ids = list(pool.map(send, bodies))
    submitted = time.perf_counter()
    succeeded = 0
    for batch_id in batch_ids:
        while True:  # long-polls: the gateway answers as the batch finishes
            view = client.get(f"/v1/batches/{batch_id}", params={"limit": 1, "wait": 30}).json()
            if view["progress"] >= 1.0:
                succeeded += view["counts"]["succeeded"]
                break
    elapsed = time.perf_counter() - started
    client.close()
    return {
        "images": len(images),
        "batches": len(bodies),
        "batch_size": batch_size,
        "senders": clients,
        "seconds": round(elapsed, 3),
        "submit_seconds": round(submitted - started, 3),
        "ips": round(len(images) / elapsed, 1),
        "succeeded": succeeded,
    }


def measure_single(url: str, images: list[tuple[str, bytes]], concurrency: int, total: int) -> dict[str, Any]:
    client = httpx.Client(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency * 2), headers=auth_headers()
    )

    def one(index: int) -> bool:
        name, data = images[index % len(images)]
        response = client.post("/v1/jobs", files={"file": (name, data, "image/jpeg")})
        if response.status_code != 202:
            return False
        job_id = response.json()["id"]
        while True:
            view = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
            if view["status"] in TERMINAL_JOB_STATUSES:
                return view["status"] == "succeeded"

    try:
        result = summarise(*run_clients(concurrency, total, one))
    finally:
        client.close()
    return {"concurrency": concurrency, **result}


# --- measurements that run processes of their own ----------------------------------------------


def measure_submit_rps(
    settings: Settings, images: list[tuple[str, bytes]], total: int, workdir: Path, processes: int = 1
) -> dict:
    """A second gateway (of `processes` processes) on the same database and storage whose messages go
    where no worker listens."""
    port = free_port()
    env = {
        "XRAYQ_PORT": str(port),
        "XRAYQ_GATEWAY_PROCESSES": str(processes),
        "XRAYQ_DATABASE_URL": settings.database_url,
        "XRAYQ_STORAGE_DIR": str(settings.storage_dir),
    }
    if settings.uses_filesystem_broker:
        env["XRAYQ_HOME"] = str(workdir / "isolated-home")
    else:
        env["XRAYQ_BROKER_KEY_PREFIX"] = f"{settings.broker_key_prefix}bench-{uuid.uuid4().hex[:8]}:"
    process = start_process([sys.executable, "-m", "services.cli", "gateway"], env, workdir / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    marker = f"bench-submit-{uuid.uuid4().hex[:8]}"
    try:
        if not wait_ready(url, 180, process=process) or not wait_for_processes(url, processes, 180):
            return {"error": "isolated gateway did not start"}
        client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64), headers=auth_headers())

        def one(index: int) -> bool:
            name, data = images[index % len(images)]
            response = client.post("/v1/jobs", files={"file": (name, data, "image/jpeg")}, data={"client_ref": marker})
            return response.status_code == 202

        one(0)  # warm-up
        result = summarise(*run_clients(32, total, one))
        client.close()
        return {"concurrency": 32, "gateway_processes": processes, "rps": result.pop("ips"), **result}
    finally:
        stop_process(process)
        _delete_jobs(settings, marker)


def wait_for_processes(url: str, processes: int, timeout: float) -> bool:
    """Until each of the gateway's processes is serving: the first answers while the others still start
    (and take the CPU a measurement would be timed on)."""
    if processes == 1:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scraped = httpx.get(f"{url}/metrics", headers=auth_headers(), timeout=30).text
        if scraped.count("xrayq_gateway_process_requests{pid=") >= processes:
            return True
        time.sleep(0.5)
    return False


def _delete_jobs(settings: Settings, client_ref: str) -> None:
    from sqlalchemy import delete, select

    from shared.core.storage import make_object_store
    from shared.db.models import Job
    from shared.db.session import database_for

    store = make_object_store(settings)
    with database_for(settings).session() as session:
        keys = session.scalars(select(Job.input_key).where(Job.client_ref == client_ref)).all()
        session.execute(delete(Job).where(Job.client_ref == client_ref))
    for key in keys:
        if key:
            store.delete(key)


def measure_baseline(
    model_ref: str, images: list[tuple[str, bytes]], concurrency: int, total: int, workdir: Path
) -> dict[str, Any]:
    port = free_port()
    process = start_process(
        [sys.executable, "-m", "uvicorn", "loadtest.sync_baseline:app", "--port", str(port), "--log-level", "warning"],
        {"XRAYQ_BASELINE_MODEL": model_ref},
        workdir / "baseline.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, path="/docs", process=process)
        client = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency * 2))

        def one(index: int) -> bool:
            name, data = images[index % len(images)]
            return client.post("/predict", files={"file": (name, data, "image/jpeg")}).status_code == 200

        one(0)
        result = summarise(*run_clients(concurrency, total, one))
        client.close()
        return {"concurrency": concurrency, **result}
    finally:
        stop_process(process)


# --- main ----------------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="the stack's gateway (default: XRAYQ_PUBLIC_URL)")
    parser.add_argument("--start", action="store_true", help="start `xrayq up` if nothing answers at URL")
    parser.add_argument("--images", type=int, default=512, help="images for the pipeline measurement")
    parser.add_argument("--pipeline-rounds", type=int, default=3, help="pipeline runs (median reported)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch in the pipeline run")
    parser.add_argument("--senders", type=int, default=4, help="concurrent batch senders in the pipeline run")
    parser.add_argument("--single-total", type=int, default=160, help="jobs per single-job concurrency level")
    parser.add_argument("--submit-total", type=int, default=1000, help="submissions for submit_rps")
    parser.add_argument("--idle-seconds", type=float, default=10, help="window for the idle stack's CPU")
    parser.add_argument(
        "--gateway-processes",
        default="1",
        help="XRAYQ_GATEWAY_PROCESSES of the submit_rps gateway; several (1,3) measure each in turn",
    )
    parser.add_argument(
        "--submit-only", action="store_true", help="only submit_rps (needs no running stack, only its database)"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args()


def start_stack_unless_ready(url: str, start: bool, workdir: Path) -> subprocess.Popen[bytes] | None:
    """None when a stack already answers at `url`; else (with --start) the `xrayq up` started here."""
    if wait_ready(url, 2):
        return None
    if not start:
        raise SystemExit(f"no ready stack at {url} (start one with `make run`, or pass --start)")
    stack = start_process([sys.executable, "-m", "services.cli", "up"], {}, workdir / "stack.log")
    if not wait_ready(url, 900, process=stack):
        stop_process(stack)
        raise SystemExit(f"the stack did not become ready; see {workdir / 'stack.log'}")
    return stack


def served_model_ref(url: str, settings: Settings) -> str:
    """name@version of the default model's active version, as the stack reports it."""
    models = httpx.get(f"{url}/v1/models", timeout=10, headers=auth_headers()).json()
    active = next(m for m in models if m["name"] == settings.default_model)
    return f"{active['name']}@{active['active_version']}"


def measure_pipeline_rounds(args: argparse.Namespace, url: str, images: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The median round (each on images of its own), with every round kept for the record, and the CPU
    every process spent per image over all rounds."""
    before = cpu_seconds_by_role()
    rounds = [
        measure_pipeline(url, images[i * args.images : (i + 1) * args.images], args.batch_size, args.senders)
        for i in range(args.pipeline_rounds)
    ]
    spent = cpu_spent(before, cpu_seconds_by_role())
    sent = sum(r["images"] for r in rounds)
    per_image = {role: round(1000 * cpu_s / sent, 2) for role, cpu_s in spent.items()}
    per_image["total"] = round(sum(per_image.values()), 2)
    median = sorted(rounds, key=lambda r: r["ips"])[len(rounds) // 2]
    return {**median, "rounds_ips": [r["ips"] for r in rounds], "cpu_ms_per_image": per_image}


def pipeline_cost_ms_per_image(report: dict[str, Any]) -> float | None:
    """CPU per image of every process together, less the model's forward pass: what the pipeline adds."""
    forward = report["model_only"]["forward_cpu_ms_per_image"]
    if forward is None:
        return None
    return round(report["pipeline"]["cpu_ms_per_image"]["total"] - forward, 2)


def ratios(report: dict[str, Any]) -> dict[str, float]:
    model_ips = report["model_only"]["ips"]
    return {
        "pipeline_ips/model_only_ips": round(report["pipeline"]["ips"] / model_ips, 3),
        "single_ips_c32/model_only_ips": round(report["single"]["c32"]["ips"] / model_ips, 3),
        "single_ips_c32/baseline_ips_c32": round(
            report["single"]["c32"]["ips"] / max(report["baseline_sync"]["ips"], 1e-9), 2
        ),
    }


def measure_everything(args: argparse.Namespace, settings: Settings, url: str, workdir: Path) -> dict[str, Any]:
    images = load_images(settings.data_dir, args.images * args.pipeline_rounds)
    model_ref = served_model_ref(url, settings)
    time.sleep(2)  # let the worker finish starting if the stack just came up
    idle_cpu = measure_idle_cpu(args.idle_seconds)  # first: before the benchmark's own threads exist

    report: dict[str, Any] = {
        "mode": "embedded" if settings.embedded else "services",
        "url": url,
        "cpu_count": os.cpu_count(),
        "idle_cpu": idle_cpu,
    }
    report["model_only"] = measure_model_only(settings, model_ref, images)
    measure_single(url, images, 1, 5)  # warm the worker's model cache
    report["pipeline"] = measure_pipeline_rounds(args, url, images)
    report["single"] = {
        f"c{c}": measure_single(url, images, c, max(args.single_total // (4 if c == 1 else 1), 4 * c))
        for c in (1, 8, 32)
    }
    report["pipeline_cpu_ms_per_image_outside_forward"] = pipeline_cost_ms_per_image(report)
    report["overhead_ms_p50"] = round(report["single"]["c1"]["p50_ms"] - report["model_only"]["one_image_ms_p50"], 2)
    report.update(measure_submits(args, settings, images, workdir))
    report["baseline_sync"] = measure_baseline(model_ref, images, 32, args.single_total, workdir)
    report["peak_rss_mb"] = peak_rss_mb(("gateway", "worker"))
    report["ratios"] = ratios(report)
    return report


def measure_submits(
    args: argparse.Namespace, settings: Settings, images: list[tuple[str, bytes]], workdir: Path
) -> dict[str, Any]:
    """`submit` for the first of --gateway-processes; with several, each one's under its count."""
    counts = [int(count) for count in args.gateway_processes.split(",")]
    by_count = {count: measure_submit_rps(settings, images, args.submit_total, workdir, count) for count in counts}
    report: dict[str, Any] = {"submit": by_count[counts[0]]}
    if len(counts) > 1:
        report["submit_by_gateway_processes"] = {str(count): result for count, result in by_count.items()}
    return report


def main() -> int:
    args = parse_arguments()
    settings = get_settings()
    url = args.url or settings.public_url
    workdir = Path(tempfile.mkdtemp(prefix="xrayq-bench-"))
    if args.submit_only:
        report: dict[str, Any] = {"mode": "embedded" if settings.embedded else "services", "cpu_count": os.cpu_count()}
        report.update(measure_submits(args, settings, load_images(settings.data_dir, 64), workdir))
    else:
        stack = start_stack_unless_ready(url, args.start, workdir)
        try:
            report = measure_everything(args, settings, url, workdir)
        finally:
            stop_process(stack)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
