"""What keeps the receiver up under attack: who may connect, how many at once, and how much they may send.

- Connections from addresses no allow-list entry names, or past the per-peer or total limit, are
  closed before a byte of DICOM is read (`GuardedAssociationServer.verify_request`); idle ones are
  counted too, and the ACSE / network timeouts close them.
- A-ASSOCIATE-RQs whose calling AE title does not match the entry for their address are rejected
  with the standard reason "calling AE title not recognised" (`screen_association`); a wrong called
  AE title gets "called AE title not recognised" (pynetdicom's `require_called_aet`).
- A data set is streamed to a temporary file (pynetdicom's chunked receive), and no more than the
  file limit of it is kept (`CappedSpool`); a PDU longer than we negotiated is read as a broken
  connection, never buffered (`BoundedAssociationSocket`). Memory stays flat whatever is sent.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
from collections import Counter
from typing import Any

from pynetdicom import _config, dimse_messages, evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from services.dicom import metrics
from services.dicom.peers import (
    AllowedSender,
    address_allowed,
    admitted,
    is_health_check,
    is_health_check_address,
    peer_address,
)

log = logging.getLogger("xrayq.dicom")

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected permanent, by the service user, calling AE title not recognised.
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
# The A-ASSOCIATE-RQ itself may exceed the negotiated maximum PDU (it comes before the negotiation).
_ASSOCIATE_RQ_ALLOWANCE = 1024 * 1024


class CappedSpool:
    """A temporary file that stores at most `cap` bytes and counts the rest: `overflowed` tells."""

    def __init__(self, cap: int, **kwargs: Any) -> None:
        self._file = tempfile.NamedTemporaryFile(**kwargs)  # noqa: SIM115 -- pynetdicom closes and unlinks it
        self.cap = cap
        self.received = 0

    @property
    def overflowed(self) -> bool:
        return self.received > self.cap

    def write(self, data: bytes) -> int:
        room = self.cap - self.received
        self.received += len(data)
        if room > 0:
            self._file.write(data[:room])
        return len(data)

    def __getattr__(self, name: str) -> Any:  # name, file, close, tell ... of the real file
        return getattr(self._file, name)


def stream_data_sets_to_disk(max_file_bytes: int) -> None:
    """Receive C-STORE data sets into capped temporary files instead of memory (this process only)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom opens the file by this module-level name; one byte past the limit marks "too large".
    dimse_messages.NamedTemporaryFile = functools.partial(CappedSpool, max_file_bytes + 1)  # type: ignore[assignment]


class BoundedAssociationSocket(AssociationSocket):
    """Refuses to buffer a PDU longer than `max_read`: the read ends as if the peer had hung up."""

    max_read = 0

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_read:
            log.warning("closing a connection that announced a %d-byte PDU", nr_bytes)
            return bytearray()
        return super().recv(nr_bytes)


class BoundedRequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # pynetdicom makes the socket here and lets it be set only once: give that one the bounded read.
        socket = assoc.dul.socket
        socket.__class__ = BoundedAssociationSocket
        assert isinstance(socket, BoundedAssociationSocket)
        socket.max_read = (self.ae.maximum_pdu_size or 0) + _ASSOCIATE_RQ_ALLOWANCE
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, closing unknown or excess connections as they are accepted."""

    def __init__(self, *args: Any, senders: list[AllowedSender], per_peer: int, **kwargs: Any) -> None:
        self.senders = senders
        self.per_peer = per_peer
        self._starting: Counter[str] = Counter()  # accepted, association thread not yet running
        self._lock = threading.Lock()
        super().__init__(*args, **{**kwargs, "request_handler": BoundedRequestHandler})

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self._admits(client_address):
            return True
        metrics.ASSOCIATIONS.labels("refused").inc()
        return False

    def _admits(self, client_address: Any) -> bool:
        host = str(peer_address(client_address[0]))
        if self.senders and not (address_allowed(self.senders, host) or is_health_check_address(host)):
            log.warning("connection from %s refused: no allow-list entry names this address", host)
            return False
        with self._lock:
            live = self._live_by_peer()
            if live[host] >= self.per_peer:
                log.warning("connection from %s refused: it already holds %d associations", host, live[host])
                return False
            if sum(live.values()) >= self.ae.maximum_associations:
                log.warning("connection from %s refused: %d associations in progress", host, sum(live.values()))
                return False
            self._starting[host] += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:  # by now the association's own thread is running (and counted) or it never will
            with self._lock:
                self._starting[str(peer_address(client_address[0]))] -= 1

    def _live_by_peer(self) -> Counter[str]:
        live = Counter(self._starting)
        for assoc in self.active_associations:
            try:
                live[str(peer_address(assoc.requestor.address))] += 1
            except ValueError:  # no address yet: counted in `_starting`
                continue
        return live


def screen_association(event: Any, senders: list[AllowedSender]) -> None:
    """EVT_REQUESTED: reject a calling AE title that its source address may not use."""
    if not senders:
        return  # the open embedded mode on loopback
    assoc = event.assoc
    calling = str(assoc.requestor.primitive.calling_ae_title).strip()
    host = assoc.requestor.address
    if admitted(senders, calling, host) is not None or is_health_check(calling, host):
        return
    log.warning("association from %r at %s rejected: calling AE title not recognised for that address", calling, host)
    assoc.acse.send_reject(*CALLING_AE_NOT_RECOGNISED)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()
