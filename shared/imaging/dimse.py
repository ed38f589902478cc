"""DICOM networking that more than one process needs: what we negotiate, and C-STORE as an SCU.

The receiver (`services/dicom/receiver.py`) accepts only transfer syntaxes this installation can decode,
so a sender converts or fails at negotiation instead of storing what we would refuse later.
"""

from __future__ import annotations

import io
import re
import threading
import time
from dataclasses import dataclass

import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import (
    JPEGLossless as JPEGLosslessP14,
)

from shared.core.errors import XrayqError

NATIVE_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
COMPRESSED_SYNTAXES = [
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def decodable_transfer_syntaxes() -> list[UID]:
    """Native syntaxes, then every compressed one with an installed decoder."""
    compressed = []
    for syntax in COMPRESSED_SYNTAXES:
        try:
            if get_decoder(syntax).is_available:
                compressed.append(syntax)
        except NotImplementedError:
            continue
    return NATIVE_SYNTAXES + compressed


@dataclass(frozen=True)
class RemoteAE:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


_AE_ADDRESS = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def parse_remote_ae(text: str) -> RemoteAE:
    """`AE_TITLE@host:port` -> RemoteAE (the form of XRAYQ_DICOM_SR_DESTINATION)."""
    match = _AE_ADDRESS.match(text.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise XrayqError("invalid_parameter", f"Not an AE address (AE_TITLE@host:port): {text!r}")
    return RemoteAE(match["aet"].strip(), match["host"].strip("[]"), int(match["port"]))


# C-STORE statuses a sender may treat as stored (PS3.4 B.2.3: success and the warnings).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def send_c_store(data: bytes, destination: RemoteAE, calling_ae_title: str, timeout_s: float, deadline_s: float) -> int:
    """Send one Part-10 instance by C-STORE; returns the status, raises XrayqError if not stored.

    `timeout_s` bounds each step; the whole association, however slowly the peer answers, ends after
    `deadline_s`: a watchdog aborts it, so a stalled PACS holds one delivery thread for that long at most."""
    from pynetdicom import AE

    started = time.monotonic()
    dataset = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title=calling_ae_title)
    # Connecting and negotiating share the deadline; the watchdog covers the rest.
    ae.connection_timeout = ae.acse_timeout = min(timeout_s, deadline_s / 2)
    ae.dimse_timeout = ae.network_timeout = min(timeout_s, deadline_s)
    ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    # The details name the AE title, never the address: they are shown on the submitter's batch.
    if not assoc.is_established:
        raise XrayqError("delivery_failed", f"{destination.ae_title} did not accept an association.")
    watchdog = threading.Timer(max(deadline_s - (time.monotonic() - started), 0.0), assoc.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        status = assoc.send_c_store(dataset)
    finally:
        watchdog.cancel()
        if assoc.is_established:
            assoc.release()
    if time.monotonic() - started >= deadline_s:
        raise XrayqError("delivery_failed", f"{destination.ae_title} did not store the report within {deadline_s:g}s.")
    code = int(status.get("Status", -1)) if status else -1
    if code not in STORED_STATUSES:
        raise XrayqError("delivery_failed", f"{destination.ae_title} answered C-STORE with 0x{code & 0xFFFF:04X}.")
    return code
