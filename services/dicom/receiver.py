"""`xrayq dicom`: the DICOM receiver, a C-STORE SCP (pynetdicom) in a process of its own.

It answers C-ECHO, and C-STORE for the image storage SOP classes xrayq reads (radiographs and secondary
captures, `shared.intake.sop_classes`) in every transfer syntax this installation decodes. Received
instances get the same checks (`shared.intake`) and study intake (`shared.jobs.studies`) as STOW-RS and
REST: stored, turned into jobs of their study's batch, published. Statuses (PS3.4 B.2.3):
0x0000 once the instance is durably stored and queued; 0xA700 (Refused: Out of Resources) when storage,
database or broker fail, or no model can answer yet -- the sender should retry; 0xA900 when the data
set is not of the negotiated SOP class; 0xC000 (Cannot understand) for an instance that cannot be
classified (its ErrorComment carries xrayq's error code).

It fails closed (`services.dicom.guard`, `services.dicom.peers`): outside the embedded mode on loopback
it does not start without an allow-list of calling AE titles and their source networks; it rejects
associations to another called AE title, from unknown senders, and past the per-peer and total
limits; data sets are streamed to disk and refused past XRAYQ_MAX_FILE_BYTES; idle associations are
aborted after XRAYQ_DICOM_NETWORK_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType

from services.dicom import metrics
from services.dicom.guard import GuardedAssociationServer, screen_association, stream_data_sets_to_disk
from services.dicom.peers import AllowedSender, AllowListError, admitted, allowed_senders
from shared.core.errors import XrayqError
from shared.core.logs import configure_logging
from shared.core.queue import make_celery
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.session import database_for
from shared.imaging.dicom import read_header
from shared.imaging.dimse import decodable_transfer_syntaxes
from shared.intake.instances import check_instance
from shared.intake.sop_classes import ACCEPTED_SOP_CLASSES
from shared.jobs.studies import add_instances

log = logging.getLogger("xrayq.dicom")

VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
NOT_AUTHORISED = 0x0124  # Refused: Not Authorized (PS3.7 C.4)
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Not the sender's fault: it should send again later.
_OUR_TROUBLE = frozenset({"no_active_model", "model_not_found", "model_corrupt", "file_too_large", "internal_error"})


class StoreHandler:
    """C-STORE requests to study intake; one per process, called from each association's thread."""

    def __init__(self, settings: Settings, senders: list[AllowedSender]) -> None:
        self.settings = settings
        self.senders = senders
        self.database = database_for(settings)
        self.store = make_object_store(settings)
        self.celery = make_celery(settings, "xrayq-dicom")

    def __call__(self, event: Any) -> Dataset | int:
        calling = str(event.assoc.requestor.ae_title).strip()
        sender = admitted(self.senders, calling, event.assoc.requestor.address) if self.senders else None
        if self.senders and sender is None:
            # Only the healthcheck's association gets here unlisted (services.dicom.peers): it may echo.
            return _status(NOT_AUTHORISED, XrayqError("dicom_sender_not_allowed", "this sender may only echo"))
        negotiated = str(event.context.abstract_syntax)
        try:
            data = self._received(event)
            upload = check_instance(f"{calling}-{event.request.AffectedSOPInstanceUID}.dcm", data, self.settings)
            sop_class = str(read_header(data).get("SOPClassUID", ""))
        except XrayqError as error:
            status = OUT_OF_RESOURCES if error.code in _OUR_TROUBLE else CANNOT_UNDERSTAND
            return _status(status, error)
        except Exception as exc:  # a data set pydicom cannot even encode
            return _status(CANNOT_UNDERSTAND, XrayqError("dicom_unreadable", type(exc).__name__))
        if sop_class != negotiated:
            return _status(SOP_CLASS_MISMATCH, XrayqError("dicom_sop_class_mismatch", "SOP class differs from context"))
        try:
            with self.database.session() as session:
                intake = add_instances(
                    session,
                    self.store,
                    self.celery,
                    self.settings,
                    [upload],
                    organisation=sender.organisation if sender else self.settings.dicom_organisation,
                    source="dimse",
                    model_ref=self.settings.dicom_model or self.settings.default_model,
                )
        except XrayqError as error:
            return _status(OUT_OF_RESOURCES, error)
        except Exception:
            log.exception("could not store an instance from %s", calling)
            return _status(OUT_OF_RESOURCES, XrayqError("internal_error", "storage unavailable"))
        batch = intake.batches[0]
        log.info("instance from %s joined study batch %s (%d instances)", calling, batch.id, batch.total)
        metrics.INSTANCES.labels("stored").inc()
        return SUCCESS

    def _received(self, event: Any) -> bytes:
        """The data set as pynetdicom streamed it to disk, read only when within the file limit."""
        spool, path = event.request._dataset_file, Path(event.dataset_path)
        if getattr(spool, "overflowed", False) or path.stat().st_size > self.settings.max_file_bytes:
            raise XrayqError("file_too_large", f"The data set exceeds {self.settings.max_file_bytes} bytes.")
        return path.read_bytes()


def _status(code: int, error: XrayqError) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = f"{error.code}: {error.detail}"[:64]  # LO: 64 characters
    log.warning("C-STORE refused with 0x%04X: %s", code, error.code)
    metrics.INSTANCES.labels(error.code).inc()
    return status


def make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom_ae_title)
    # Idle associations, and connections that never send an A-ASSOCIATE-RQ, are aborted after this.
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = settings.dicom_network_timeout_s
    ae.maximum_associations = settings.dicom_max_associations
    ae.require_called_aet = True  # another called AE title: "called AE title not recognised"
    ae.add_supported_context(VERIFICATION)
    syntaxes = decodable_transfer_syntaxes()
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


def start_receiver(settings: Settings) -> GuardedAssociationServer:
    """The receiver, serving in threads of this process; AllowListError if it must not run as configured."""
    senders = allowed_senders(settings)
    stream_data_sets_to_disk(settings.max_file_bytes)
    ae = make_ae(settings)
    handlers: list[EventHandlerType] = [
        (evt.EVT_REQUESTED, screen_association, [senders]),
        (evt.EVT_C_STORE, StoreHandler(settings, senders)),
        (evt.EVT_C_ECHO, lambda _event: SUCCESS),
        (evt.EVT_ACCEPTED, metrics.association_accepted),
        (evt.EVT_REJECTED, metrics.association_rejected),
    ]
    address = (settings.dicom_bind_host, settings.dicom_port)
    server: GuardedAssociationServer = ae.make_server(  # type: ignore[assignment]
        address,
        evt_handlers=handlers,
        server_class=GuardedAssociationServer,
        senders=senders,
        per_peer=settings.dicom_max_associations_per_peer,
    )
    ae._servers.append(server)  # as `start_server` does: `shutdown` takes it off this list
    threading.Thread(target=server.serve_forever, name="xrayq-dicom-server", daemon=True).start()
    accepting = ", ".join(f"{s.ae_title}@{s.network or 'any'}" for s in senders) or "any sender (loopback only)"
    log.info("DICOM receiver %s listening on %s:%d (accepting %s)", settings.dicom_ae_title, *address, accepting)
    return server


def run_scp(settings: Settings) -> int:
    """Serve until SIGTERM / SIGINT; associations in progress are aborted on the way out."""
    configure_logging(settings, "dicom")
    try:
        server = start_receiver(settings)
    except AllowListError as exc:
        log.error("%s", exc)
        print(f"xrayq dicom: {exc}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0
