"""The embedded mode's broker: kombu's file-system transport with atomic message files, woken on arrival.

kombu's own `_put` creates the message file in the consumers' folder and then writes it, so a
consumer polling at that moment can take a half-written file and lose the message. Here the file is
written under a name consumers ignore and renamed into place (atomic on POSIX).

kombu's consumers list the folder every `polling_interval`; at the 2 ms a job's latency needs, an
idle worker and trainer together burnt a sixth of a core doing nothing. Here an idle consumer blocks
on the folder's inotify events (Linux) and lists it again only when a message file was renamed into
it -- or once a second, a safety net for an event the kernel dropped. Without inotify (macOS, or the
per-user watch limit reached) it polls, backing off from `polling_interval` to a tenth of a second.
"""

from __future__ import annotations

import logging
import os
import uuid
from queue import Empty
from time import monotonic, monotonic_ns, sleep
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from shared.core.durable import SPOOL_PARTIAL_SUFFIX, sync_directory, sync_file


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # Zero-padded nanoseconds first: consumers take files in name order, which is then arrival order.
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}{SPOOL_PARTIAL_SUFFIX}"  # not "<queue>.msg": consumers skip it
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
                sync_file(handle)
            os.replace(partial, final)
            sync_directory(self.data_folder_out)  # the message of an accepted job survives a power loss
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add message file to {self.data_folder_out!r}") from exc


# The longest an idle consumer sleeps without listing the folder, inotify or not.
SAFETY_RELIST_S = 1.0
BACKOFF_MAX_S = 0.1

log = logging.getLogger(__name__)


class ArrivalWatch:
    """Waits until a message file is renamed into `folder` (inotify), or polls with back-off without it."""

    def __init__(self, folder: str, polling_interval: float) -> None:
        self._min_s = polling_interval
        self._backoff_s = polling_interval
        self._inotify: Any = None
        try:
            from inotify_simple import INotify, flags

            inotify = INotify()
            # Producers rename finished messages into place (`Channel._put`): one MOVED_TO per message.
            inotify.add_watch(folder, flags.MOVED_TO)
            self._inotify = inotify
        except (ImportError, OSError) as exc:  # not Linux, or the watch limit reached
            log.info("broker spool: no inotify (%s); polling with back-off", exc)

    def wait(self, timeout_s: float) -> None:
        """Return when a message may have arrived, or after `timeout_s`."""
        if self._inotify is not None:
            # Events that arrived since the last read are already queued: none is missed between the
            # consumer's empty listing and this call.
            self._inotify.read(timeout=max(1, int(timeout_s * 1000)))
            return
        sleep(min(self._backoff_s, timeout_s))
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)

    def delivered(self) -> None:
        self._backoff_s = self._min_s  # traffic: poll fast again

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


class Transport(filesystem.Transport):
    Channel = Channel

    _arrivals: ArrivalWatch | None = None

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]
        """kombu's loop, with its fixed sleep between empty listings replaced by `ArrivalWatch.wait`."""
        assert self.client is not None and self.cycle is not None  # set once the connection is made
        if self._arrivals is None:  # made by the consuming process, before its first listing
            options = self.client.transport_options
            self._arrivals = ArrivalWatch(options["data_folder_in"], self.polling_interval or 0.002)
        started = monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
            except Empty:
                left = SAFETY_RELIST_S if timeout is None else timeout - (monotonic() - started)
                if left <= 0:
                    raise TimeoutError() from None
                self._arrivals.wait(min(left, SAFETY_RELIST_S))
            else:
                self._arrivals.delivered()
                return

    def close_connection(self, connection: Any) -> None:
        if self._arrivals is not None:
            self._arrivals.close()
            self._arrivals = None
        super().close_connection(connection)
