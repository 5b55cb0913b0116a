"""Binding listen addresses and filtering clients, shared by the spamd and query listeners."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from typing import Callable

from ..config import ListenAddress


def client_allowed(peername: object, allowed: tuple) -> bool:
    """Unix-socket peers are allowed (file permissions guard them); TCP peers by network."""
    if not isinstance(peername, tuple):
        return True
    try:
        addr = ipaddress.ip_address(peername[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in allowed)


async def start_listeners(addresses: tuple[ListenAddress, ...],
                          protocol_factory: Callable[[], asyncio.Protocol],
                          unix_mode: int = 0o666) -> list[asyncio.AbstractServer]:
    """Bind every address; a unix socket left over from a previous run is replaced.

    Protocol objects rather than streams: per connection that saves the stream objects and
    a task, which is most of the shim's CPU per message.
    """
    loop = asyncio.get_running_loop()
    servers = []
    try:
        for address in addresses:
            if address.is_unix:
                if os.path.exists(address.path) and _is_stale_socket(address.path):
                    os.unlink(address.path)
                servers.append(await loop.create_unix_server(protocol_factory, address.path))
                os.chmod(address.path, unix_mode)
            else:
                servers.append(await loop.create_server(
                    protocol_factory, address.host, address.port, reuse_address=True,
                    backlog=1024))
    except OSError:
        for server in servers:
            server.close()
        raise
    return servers


def _is_stale_socket(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return True
    finally:
        sock.close()
    return False
