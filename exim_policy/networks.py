"""The one "is this address in these networks" test (relay networks, allowed clients)."""
from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def network_of(ip: str, networks: tuple[Network, ...]) -> Network | None:
    """The first of ``networks`` that holds ``ip``, or None (also for text that is not an
    address). ``[v6]`` brackets and a ``%zone`` are ignored; an IPv4-mapped IPv6 address
    (``::ffff:192.0.2.1``: how a dual-stack socket reports an IPv4 client, and how Exim
    may pass it on) counts as the IPv4 address."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for net in networks:
        if addr.version == net.version and addr in net:
            return net
    return None
