"""Worker hosts on this one machine: Linux network namespaces, each with an address of its own on one
bridge, around the single Redis, Postgres and S3 server of the root namespace.

A host sees the shared services only at the bridge's address (socat forwarders in the root namespace,
since the servers listen on loopback), so each `xrayq worker` reaches them over a network link exactly
as a worker on another machine would, and a host can vanish from that network at any instant. Needs
root and iproute2 (`ip netns`) and socat, as CI installs them (`.ci/run`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.harness.processes import start_process, stop_process

# The ports the shared services are known by on the bridge (those of a real deployment), whatever
# loopback ports this test session's servers happen to use.
REDIS_PORT, POSTGRES_PORT, S3_PORT = 6379, 5432, 9000
WORKER_METRICS_PORT = 9101  # every host serves its metrics on the same port, at its own address
KEEPALIVE = "keepalive,keepidle=2,keepintvl=1,keepcnt=3"


def ip(*args: str) -> str:
    """One `ip` command; raises with its error text when it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def missing_prerequisites() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "socat"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 socat)"
    return None


def unused_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface or route of this machine uses (several runs may share it)."""
    taken = ip("-4", "-o", "addr", "show") + ip("-4", "route", "show")
    pick = random.SystemRandom()  # not the `random` module's state, which training seeds
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.{pick.randint(64, 250)}.{pick.randint(0, 255)}.0/24")
        prefix = ".".join(str(candidate.network_address).split(".")[:3]) + "."
        if prefix not in taken:
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 subnet")


def wait_connectable(address: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on {address}:{port}")


@dataclass
class WorkerHost:
    """One namespace ("host") and the `xrayq worker` it runs."""

    name: str  # the namespace
    address: str
    veth: str  # the root-namespace end of its link, a port of the bridge
    home: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    lost: bool = False
    log_offsets: list[int] = field(default_factory=list)  # where each start's log lines begin

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{WORKER_METRICS_PORT}/metrics"

    def start_worker(self) -> None:
        """`xrayq worker` inside the namespace, one inference process (the hosts share 2 cores here)."""
        self.log_offsets.append(self.log.stat().st_size if self.log.exists() else 0)
        command = ["ip", "netns", "exec", self.name, sys.executable, "-m", "services.cli", "worker"]
        self.process = start_process([*command, "--concurrency", "1"], self.env, self.log)
        self.starts += 1

    def wait_ready(self, timeout: float = 180) -> None:
        """Until Celery says this start of the worker consumes (` ready.`) and its metrics answer."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker on {self.name} exited:\n{self.log_text()[-3000:]}")
            if " ready." in self.log_text(since_start=True) and self.job_counts() is not None:
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker on {self.name} not ready within {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self, since_start: bool = False) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[self.log_offsets[-1] :] if since_start and self.log_offsets else text

    def job_counts(self) -> tuple[int, int] | None:
        """Jobs this start of the worker has claimed and finished, read from the host's own metrics
        endpoint over the network (None: no answer). A job is claimed and not yet finished while the
        worker has it in hand."""
        try:
            text = httpx.get(self.metrics_url, timeout=2).text
        except httpx.HTTPError:
            return None
        totals = {"xrayq_job_queue_wait_seconds_count": 0.0, "xrayq_jobs_finished_total": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        return int(totals["xrayq_job_queue_wait_seconds_count"]), int(totals["xrayq_jobs_finished_total"])

    def finished_jobs(self) -> int:
        counts = self.job_counts()
        assert counts is not None, f"the metrics of {self.name} do not answer"
        return counts[1]

    def tasks_since_start(self) -> tuple[list[str], set[str]]:
        """The task ids this start of the worker received, in order, and those that succeeded (its log)."""
        received, succeeded = [], set()
        for line in self.log_text(since_start=True).splitlines():
            if "Task xrayq." in line and "[" in line:
                task_id = line.split("Task xrayq.", 1)[1].split("[", 1)[1].split("]", 1)[0]
                if line.rstrip().endswith(" received"):
                    received.append(task_id)
                elif " succeeded in " in line:
                    succeeded.add(task_id)
        return received, succeeded

    def wait_running_a_chunk(self, timeout: float) -> bool:
        """Until the worker has received a message it has not finished (it is running a chunk now);
        False if it was not seen doing so within `timeout` (it may have been idle, or quick)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received, succeeded = self.tasks_since_start()
            if set(received) - succeeded:
                return True
            time.sleep(0.01)
        return False

    def warm_restart(self, timeout: float = 120) -> float:
        """SIGTERM (Celery's warm shutdown: the running chunk finishes), wait for the exit, start again;
        returns the seconds the shutdown took. Asserts that every message it had taken succeeded."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)  # `ip netns exec` execs the worker: this is its pid
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker on {self.name} still running {timeout}s after SIGTERM") from None
        stopped = time.monotonic() - started
        assert code == 0, f"worker on {self.name} exited {code} on SIGTERM:\n{self.log_text()[-3000:]}"
        received, succeeded = self.tasks_since_start()
        assert set(received) <= succeeded, f"{self.name} stopped without finishing {set(received) - succeeded}"
        self.start_worker()
        return stopped

    def freeze_holding_jobs(self, timeout: float) -> tuple[int, int] | None:
        """Freeze every process of the host (SIGSTOP) the moment its metrics show jobs claimed and not
        finished; its job counts (claimed, finished) as they last were, or None if it held none within
        `timeout` (the host is then left running)."""
        pids = [int(pid) for pid in ip("netns", "pids", self.name).split()]  # known before: no delay later
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.job_counts()
            if counts is not None and counts[0] > counts[1]:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                return counts
            time.sleep(0.005)
        return None

    def power_off(self) -> None:
        """The host vanishes: its link goes down first (no FIN or RST reaches Redis or Postgres, as when
        a machine loses power), then every process in it is killed."""
        ip("link", "set", self.veth, "down")
        self.kill()
        self.lost = True

    def kill(self) -> None:
        """Every process of the namespace, at once (the end of a test: no shutdown to wait for)."""
        with contextlib.suppress(RuntimeError):
            for pid in ip("netns", "pids", self.name).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)


class HostNetwork:
    """A bridge with forwarders to the shared services, and worker hosts attached to it."""

    def __init__(self, workdir: Path, redis_url: str, database_url: str, s3_endpoint: str) -> None:
        self.run_id = uuid.uuid4().hex[:6]  # interface names are at most 15 characters
        self.workdir = workdir
        self.bridge = f"xqbr{self.run_id}"
        self.subnet = unused_subnet()
        self.gateway_address = str(self.subnet.network_address + 1)
        self.targets = {
            REDIS_PORT: _host_port(redis_url, 6379),
            POSTGRES_PORT: _host_port(database_url, 5432),
            S3_PORT: _host_port(s3_endpoint, 80),
        }
        self.forwarders: list[subprocess.Popen[bytes]] = []
        self.hosts: list[WorkerHost] = []

    def start(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for port, (target_host, target_port) in self.targets.items():
            # TCP keepalive towards the hosts, as the servers of a deployment should have it (Postgres'
            # `tcp_keepalives_*`, Redis' `tcp-keepalive`): the connections of a host that vanished are
            # closed within seconds, and with them any transaction (and its row locks) it left open.
            listen = f"TCP-LISTEN:{port},bind={self.gateway_address},fork,reuseaddr,{KEEPALIVE}"
            self.forwarders.append(
                start_process(["socat", listen, f"TCP:{target_host}:{target_port}"], {}, self.workdir / "socat.log")
            )
            wait_connectable(self.gateway_address, port, 10)

    def services_as_seen_from_hosts(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with the Redis, Postgres and S3 addresses a host reaches them by."""
        at = self.gateway_address
        return {
            **env,
            "XRAYQ_BROKER_URL": _with_host_port(env["XRAYQ_BROKER_URL"], at, REDIS_PORT),
            "XRAYQ_DATABASE_URL": _with_host_port(env["XRAYQ_DATABASE_URL"], at, POSTGRES_PORT),
            "XRAYQ_S3_ENDPOINT_URL": f"http://{at}:{S3_PORT}",
            "XRAYQ_WORKER_METRICS_PORT": str(WORKER_METRICS_PORT),
        }

    def add_host(self, env: dict[str, str]) -> WorkerHost:
        """A new namespace linked to the bridge, with its own address, loopback and home folder."""
        index = len(self.hosts) + 1
        name = f"xrayq-{self.run_id}-host{index}"
        address = str(self.subnet.network_address + 10 + index)
        veth, peer = f"xqv{self.run_id}h{index}", f"xqp{self.run_id}h{index}"
        ip("netns", "add", name)
        home = self.workdir / name
        home.mkdir()
        host = WorkerHost(name, address, veth, home, {**env, "XRAYQ_HOME": str(home)}, self.workdir / f"{name}.log")
        self.hosts.append(host)  # from here on, `close` removes it
        ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", name)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        ip("-n", name, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", peer)
        ip("-n", name, "link", "set", peer, "up")
        ip("-n", name, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Every worker, namespace, link and forwarder of this run, whatever state the test left."""
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.kill()
            with contextlib.suppress(Exception):
                ip("netns", "del", host.name)
            with contextlib.suppress(Exception):
                ip("link", "del", host.veth)  # gone with its namespace already, unless that failed
        for forwarder in self.forwarders:
            stop_process(forwarder, signal.SIGKILL)  # its process group: the per-connection children too
        with contextlib.suppress(Exception):
            ip("link", "del", self.bridge)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _with_host_port(url: str, host: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}{host}:{port}"))
