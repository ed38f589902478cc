"""The embedded mode's broker: kombu's file-system transport with atomic message files.

kombu's own `_put` creates the message file in the consumers' folder and then writes it, so a
consumer polling at that moment can take a half-written file and lose the message. Here the file is
written under a name consumers ignore and renamed into place (atomic on POSIX).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic_ns
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # Zero-padded nanoseconds first: consumers take files in name order, which is then arrival order.
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.part"  # not "<queue>.msg": consumers skip it
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add message file to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
