"""Who may associate with the receiver: calling AE titles *and* the networks they call from.

An AE title is a label any sender can type, so it is only trusted together with the source address
of the connection. `XRAYQ_DICOM_ALLOWED_AE_TITLES` lists `TITLE@network:organisation` entries (see
`shared.core.settings`); a sender matches an entry when both its title and its address do, and files
its studies under that entry's organisation.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shared.core.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# `xrayq healthcheck dicom` (the container's healthcheck) sends a C-ECHO as this title from the
# receiver's own loopback address, whatever the allow-list says; it may echo, never store.
HEALTH_CHECK_AE_TITLE = "XRAYQ-HEALTH"
HEALTH_CHECK_ADDRESSES = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})

# TITLE, then optionally @network (IPv6 in brackets), then optionally :organisation.
_ENTRY = re.compile(
    r"^(?P<title>[^@:\\]{1,16})(?:@(?P<network>\[[0-9A-Fa-f:.]+\](?:/\d{1,3})?|[^:\[\]]+))?(?::(?P<org>.+))?$"
)


class AllowListError(ValueError):
    """The allow-list cannot be read, or is missing where the receiver must not run without one."""


@dataclass(frozen=True)
class AllowedSender:
    ae_title: str
    network: Network | None  # None: any address (only where the allow-list may be open)
    organisation: str

    def admits(self, ae_title: str, address: Address) -> bool:
        return ae_title == self.ae_title and (self.network is None or address in self.network)


def peer_address(host: str) -> Address:
    """The connection's source address; an IPv4 peer of a dual-stack socket as plain IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_allowed_senders(text: str, default_organisation: str) -> list[AllowedSender]:
    senders = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise AllowListError(f"XRAYQ_DICOM_ALLOWED_AE_TITLES: cannot read {entry!r} (TITLE@network:organisation).")
        network = None
        if match["network"]:
            try:
                network = ipaddress.ip_network(match["network"].replace("[", "").replace("]", ""), strict=False)
            except ValueError:
                raise AllowListError(
                    f"XRAYQ_DICOM_ALLOWED_AE_TITLES: {match['network']!r} in {entry!r} is not an address or network."
                ) from None
        organisation = (match["org"] or "").strip() or default_organisation
        senders.append(AllowedSender(match["title"].strip(), network, organisation))
    return senders


def allow_list_required(settings: Settings) -> bool:
    """Only the embedded mode listening on loopback may take senders it does not know."""
    return not (settings.embedded and settings.dicom_bind_host in LOOPBACK_HOSTS)


def allowed_senders(settings: Settings) -> list[AllowedSender]:
    """The configured senders; refuses (AllowListError) a configuration that would let anyone send."""
    senders = parse_allowed_senders(settings.dicom_allowed_ae_titles, settings.dicom_organisation)
    if not allow_list_required(settings):
        return senders
    if not senders:
        raise AllowListError(
            "The DICOM receiver will not start without an allow-list outside the embedded loopback mode: set "
            "XRAYQ_DICOM_ALLOWED_AE_TITLES to TITLE@address-or-network[:organisation] entries, comma-separated "
            "(e.g. CT1@10.1.2.0/24:st-mary), or XRAYQ_DICOM_PORT=0 to run without a receiver."
        )
    open_entries = [sender.ae_title for sender in senders if sender.network is None]
    if open_entries:
        raise AllowListError(
            f"XRAYQ_DICOM_ALLOWED_AE_TITLES: {', '.join(open_entries)} name no source address; outside the embedded "
            "loopback mode every entry needs one (TITLE@10.1.2.0/24 or TITLE@10.1.2.3)."
        )
    return senders


def is_health_check_address(host: str) -> bool:
    return peer_address(host) in HEALTH_CHECK_ADDRESSES


def is_health_check(ae_title: str, host: str) -> bool:
    """The receiver's own healthcheck: its title, from this machine's own loopback address."""
    return ae_title == HEALTH_CHECK_AE_TITLE and is_health_check_address(host)


def admitted(senders: list[AllowedSender], ae_title: str, host: str) -> AllowedSender | None:
    """The entry that admits this calling AE title from this address; None when none does."""
    address = peer_address(host)
    return next((sender for sender in senders if sender.admits(ae_title, address)), None)


def address_allowed(senders: list[AllowedSender], host: str) -> bool:
    """Whether any entry admits this address: others are dropped before they can speak DICOM."""
    address = peer_address(host)
    return any(sender.network is None or address in sender.network for sender in senders)
