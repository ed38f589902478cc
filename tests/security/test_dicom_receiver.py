"""Finding 5: the DICOM receiver fails closed. A real `xrayq dicom` process in services mode (Postgres,
Redis, S3) is attacked over loopback with real pynetdicom associations and raw sockets: it will not run
without an allow-list, rejects wrong called AE titles and unknown senders, caps associations per peer
and in all, drops idle ones, and takes a 300 MB data set or an over-long PDU without its memory growing."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config

from loadtest.harness.processes import ROOT
from tests.conftest import free_port
from tests.security.dicom_receivers import associate, echo_works, running_receiver, wait_until

pytestmark = pytest.mark.integration
MAX_FILE_BYTES = 8 * 1024 * 1024
TIMEOUT_S = 3  # XRAYQ_DICOM_NETWORK_TIMEOUT_S of the receiver under attack
# Two sites: MODALITY at 127.0.0.1 files under org-a; CT-B at 127.0.0.2 under org-b. 127.0.0.3 is unknown.
ALLOW_LIST = "MODALITY@127.0.0.1:org-a,CT-B@127.0.0.2/32:org-b"


def dicom_cli(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "dicom"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def receiver(services_env, services_settings, tmp_path_factory):
    overrides = {
        "XRAYQ_DICOM_ALLOWED_AE_TITLES": ALLOW_LIST,
        "XRAYQ_DICOM_MAX_ASSOCIATIONS": "5",
        "XRAYQ_DICOM_MAX_ASSOCIATIONS_PER_PEER": "3",
        "XRAYQ_DICOM_NETWORK_TIMEOUT_S": str(TIMEOUT_S),
        "XRAYQ_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
    }
    with running_receiver({**services_env, **overrides}, tmp_path_factory) as running:
        yield running


def test_services_mode_without_an_allow_list_refuses_to_start(services_env, services_settings) -> None:
    env = {**services_env, "XRAYQ_DICOM_HOST": "127.0.0.1", "XRAYQ_DICOM_PORT": str(free_port())}
    nothing = dicom_cli({**env, "XRAYQ_DICOM_ALLOWED_AE_TITLES": ""})
    assert nothing.returncode == 2, nothing.stderr[-2000:]
    assert "will not start without an allow-list" in nothing.stderr, nothing.stderr[-2000:]
    assert "XRAYQ_DICOM_ALLOWED_AE_TITLES" in nothing.stderr
    titles_only = dicom_cli({**env, "XRAYQ_DICOM_ALLOWED_AE_TITLES": "MODALITY@127.0.0.1,CT1:org-a"})
    assert titles_only.returncode == 2, titles_only.stderr[-2000:]
    assert "CT1 name no source address" in titles_only.stderr
    unreadable = dicom_cli({**env, "XRAYQ_DICOM_ALLOWED_AE_TITLES": "CT1@not-a-network:org-a"})
    assert unreadable.returncode == 2 and "is not an address or network" in unreadable.stderr


def test_a_wrong_called_ae_title_is_rejected(receiver) -> None:
    assoc = associate(receiver, called="SOMEONE-ELSE")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x07)
    assert echo_works(receiver)  # the right one still works


def test_unknown_senders_are_refused(receiver) -> None:
    stranger = associate(receiver, calling="STRANGER")
    assert stranger.is_rejected
    rejection = stranger.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
    # org-b's AE title from org-a's address: the title alone proves nothing.
    borrowed = associate(receiver, calling="CT-B", source="127.0.0.1")
    assert borrowed.is_rejected and borrowed.acceptor.primitive.diagnostic == 0x03
    # A known title from an address no entry names: the connection is closed before any DICOM.
    unknown_address = associate(receiver, calling="MODALITY", source="127.0.0.3")
    assert not unknown_address.is_established and not unknown_address.is_rejected
    assert echo_works(receiver, calling="CT-B", source="127.0.0.2")


def test_association_caps_hold_and_idle_associations_are_dropped(receiver) -> None:
    held = [associate(receiver) for _ in range(3)]  # the per-peer cap of 127.0.0.1, left idle
    assert all(assoc.is_established for assoc in held)
    assert not associate(receiver).is_established  # a fourth from the same peer
    other = [associate(receiver, calling="CT-B", source="127.0.0.2") for _ in range(2)]
    assert all(assoc.is_established for assoc in other)  # another peer still gets in
    assert int(other[0].send_c_echo().Status) == 0x0000
    assert not associate(receiver, calling="CT-B", source="127.0.0.2").is_established  # 5 in all: the total cap
    for assoc in other:
        assoc.release()
    # The idle ones are aborted after the network timeout, and their peer is served again.
    wait_until(lambda: not any(assoc.is_established for assoc in held), 10 * TIMEOUT_S, "idle associations aborted")
    assert all(assoc.is_aborted for assoc in held)
    wait_until(lambda: echo_works(receiver), 10 * TIMEOUT_S, "the peer is served again")


def test_a_connection_that_never_asks_for_an_association_is_closed(receiver) -> None:
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10 * TIMEOUT_S) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""  # closed by the receiver's ACSE timeout, not by us
    assert time.monotonic() - started < 10 * TIMEOUT_S


def big_instance(path: Path, data_dir: Path, pixel_bytes: int) -> pydicom.Dataset:
    """A radiograph whose pixel data is `pixel_bytes` of zeros, written to disk without holding it."""
    ds = pydicom.dcmread(data_dir / "dicom" / "RG1_UNCR.dcm", stop_before_pixels=True)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns, ds.BitsAllocated = 10_000, pixel_bytes // 20_000, 16
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as file:
        file.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes))  # (7FE0,0010) Pixel Data
        chunk = bytes(1024 * 1024)
        for _ in range(pixel_bytes // len(chunk)):
            file.write(chunk)
    return ds


class Sampler:
    """The largest value of `read()` seen while it runs (every 20 ms)."""

    def __init__(self, read) -> None:
        self.read, self.peak, self.stop = read, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            self.stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def spooled_bytes(spool: Path) -> int:
    return sum(path.stat().st_size for path in spool.iterdir() if path.is_file())


def test_a_300_mb_data_set_is_refused_without_the_receiver_growing(receiver, data_dir, tmp_path, monkeypatch) -> None:
    path = tmp_path / "huge.dcm"
    ds = big_instance(path, data_dir, 300 * 1024 * 1024)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # our side streams it from disk too
    assoc = associate(receiver, contexts=((ds.SOPClassUID, ExplicitVRLittleEndian),))
    assert assoc.is_established
    assoc.dimse_timeout = 120
    rss_before = receiver.status("VmRSS")
    with Sampler(lambda: receiver.status("VmRSS")) as rss, Sampler(lambda: spooled_bytes(receiver.spool)) as disk:
        status = assoc.send_c_store(path)
    assoc.release()
    assert int(status.Status) == 0xA700 and status.ErrorComment.startswith("file_too_large")
    assert rss.peak - rss_before < 64 * 1024 * 1024, (rss_before, rss.peak)
    assert 0 < disk.peak <= MAX_FILE_BYTES + 1  # what was kept on disk stopped at the limit
    assert spooled_bytes(receiver.spool) == 0  # and was removed
    assert echo_works(receiver)


def test_an_over_long_pdu_is_not_buffered(receiver) -> None:
    rss_before, announced, sent, hung_up = receiver.status("VmRSS"), 300 * 1024 * 1024, 0, False
    with (
        Sampler(lambda: receiver.status("VmRSS")) as rss,
        socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as attacker,
    ):
        attacker.sendall(b"\x01\x00" + struct.pack(">I", announced))  # an A-ASSOCIATE-RQ of 300 MB...
        chunk = bytes(1024 * 1024)
        try:
            while sent < announced:  # ...and its 300 MB
                attacker.sendall(chunk)
                sent += len(chunk)
        except OSError:
            hung_up = True
    assert hung_up and sent < announced  # the receiver hung up long before the end
    assert rss.peak - rss_before < 32 * 1024 * 1024, (rss_before, rss.peak)
    assert echo_works(receiver)
