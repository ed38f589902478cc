"""What Celery task events (XRAYQ_TASK_EVENTS, for Flower) cost per message; prints one JSON document.

A real `celery worker` with xrayq's Celery configuration and flags (prefork, one process, late acks,
prefetch 1, no gossip or mingle) drains N messages of a task that does nothing on Redis, once with
events off and once on, `--rounds` times in turn: messages/s (the messaging ceiling of one worker
process) and the worker's CPU time per message (steadier than wall time on a shared machine). A
`predict` message carries up to XRAYQ_PREDICT_CHUNK_SIZE jobs, so a job pays a chunk's share of it.

Usage: python -m loadtest.task_events_cost [--messages N] [--rounds R] [--redis URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from shared.core.queue import PREDICT_QUEUE, make_celery
from shared.core.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
NOOP_TASK = "xrayq.bench.noop"

# The worker's side: `celery -A loadtest.task_events_cost worker` loads this app from XRAYQ_* variables.
settings = get_settings()
app = make_celery(settings, "xrayq-events-bench")
_counter = settings.broker_key_prefix + "done"
_clients: list[redis.Redis] = []  # one per pool process, made after the fork


@app.task(name=NOOP_TASK)
def noop(job_ids: list[str]) -> int:
    if not _clients:
        _clients.append(redis.Redis.from_url(settings.broker_url))
    _clients[0].incr(_counter)
    return len(job_ids)


def drain(url: str, events: str, messages: int) -> dict[str, float]:
    """Publish `messages`, start a worker, time it from its 20th message to its last."""
    prefix = f"xrayq-events-bench-{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "XRAYQ_BROKER_URL": url, "XRAYQ_BROKER_KEY_PREFIX": prefix, "XRAYQ_TASK_EVENTS": events}
    publisher = subprocess.run(
        [sys.executable, "-c", _PUBLISH.format(task=NOOP_TASK, queue=PREDICT_QUEUE, n=messages)], env=env, cwd=ROOT
    )
    publisher.check_returncode()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "loadtest.task_events_cost", "worker", "-Q", PREDICT_QUEUE]
        + ["-c", "1", "-P", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(url)
    try:
        warm = min(20, messages // 4)
        done = _wait(client, prefix + "done", warm, worker)
        started, cpu = time.monotonic(), _cpu_seconds(worker.pid)
        _wait(client, prefix + "done", messages, worker)
        elapsed, used = time.monotonic() - started, _cpu_seconds(worker.pid) - cpu
    finally:
        worker.terminate()
        worker.wait(30)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
    timed = messages - done
    return {"messages_per_s": timed / elapsed, "cpu_ms_per_message": used * 1000 / timed}


_PUBLISH = """
from loadtest.task_events_cost import app
for i in range({n}):
    app.send_task("{task}", args=[[str(i)]], queue="{queue}")
"""


def _wait(client: redis.Redis, key: str, count: int, worker: subprocess.Popen[bytes], timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = int(client.get(key) or 0)
        if done >= count:
            return done
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"{count} messages not done within {timeout}s")


def _cpu_seconds(pid: int) -> float:
    """User + system time of a process and its children (the pool), from /proc."""
    pids = [pid]
    for thread in os.listdir(f"/proc/{pid}/task"):
        pids += [int(child) for child in Path(f"/proc/{pid}/task/{thread}/children").read_text().split()]
    ticks = 0
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default=settings.broker_url if settings.broker_url.startswith("redis") else "")
    args = parser.parse_args()
    if not args.redis:
        parser.error("a Redis broker is needed: --redis redis://host:6379/0 (or XRAYQ_BROKER_URL)")
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for events in runs:
            runs[events].append(drain(args.redis, events, args.messages))
    report = {
        events: {
            name: round(statistics.median(run[name] for run in measured), 3)
            for name in ("messages_per_s", "cpu_ms_per_message")
        }
        | {"rounds": [{name: round(value, 3) for name, value in run.items()} for run in measured]}
        for events, measured in runs.items()
    }
    report["messages"] = args.messages
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
