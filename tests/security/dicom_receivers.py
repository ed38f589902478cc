"""A real `xrayq dicom` process for the attacks of tests/security, and pynetdicom associations to it
from any loopback source address (127.0.0.0/8: a second "site" without leaving the machine)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from loadtest.harness.processes import start_process, stop_process
from tests.conftest import free_port

VERIFICATION = "1.2.840.10008.1.1"
CALLED = "XRAYQ"


class Receiver:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path, spool: Path) -> None:
        self.port, self.process, self.log, self.spool = port, process, log, spool

    def status(self, field: str) -> int:
        """VmRSS / VmHWM of the receiver process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise LookupError(field)


def associate(
    receiver: Receiver,
    calling: str = "MODALITY",
    source: str = "127.0.0.1",
    called: str = CALLED,
    contexts: tuple[tuple[str, str], ...] = ((VERIFICATION, ExplicitVRLittleEndian),),
):
    """An association to the receiver from `source` (any loopback address), as `calling`."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 30
    for abstract_syntax, transfer_syntax in contexts:
        ae.add_requested_context(abstract_syntax, transfer_syntax)
    return ae.associate("127.0.0.1", receiver.port, ae_title=called, bind_address=(source, 0))


def echo_works(receiver: Receiver, **kw) -> bool:
    assoc = associate(receiver, **kw)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0x0000
    finally:
        assoc.release()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


@contextlib.contextmanager
def running_receiver(env: dict[str, str], tmp_path_factory, probe: str = "MODALITY") -> Iterator[Receiver]:
    """`xrayq dicom` on a free loopback port with `env` (its data sets spooled to a folder of its own),
    once it answers a C-ECHO from the allowed AE title `probe` at 127.0.0.1."""
    spool = tmp_path_factory.mktemp("dicom-spool")  # TMPDIR: where pynetdicom streams data sets
    port = free_port()
    env = {
        **env,
        "XRAYQ_DICOM_HOST": "127.0.0.1",
        "XRAYQ_DICOM_PORT": str(port),
        "XRAYQ_DICOM_AE_TITLE": CALLED,
        "TMPDIR": str(spool),
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path_factory.mktemp("dicom-log") / "dicom.log"
    process = start_process([sys.executable, "-m", "services.cli", "dicom"], env, log)
    running = Receiver(port, process, log, spool)
    try:
        wait_until(
            lambda: process.poll() is not None or echo_works(running, calling=probe), 120, "the receiver answers C-ECHO"
        )
        assert process.poll() is None, log.read_text()[-3000:]
        yield running
    finally:
        stop_process(process)
