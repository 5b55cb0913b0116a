"""The least any asyncio shim does per message, for bench_shim.py ``--floor``: accept a
connection, read a ``Content-length`` framed request, open a connection to the upstream,
POST the body to ``/checkv2``, read the reply until the upstream closes, answer a fixed
"no action", close. No policy, no checks, no log line, no limits: what is left of the
shim's CPU per message once its own work is taken away (the price of the event loop and
the two TCP connections).

    python bench/bare_relay.py UPSTREAM_PORT PORT_FILE
"""
from __future__ import annotations

import asyncio
import os
import sys

try:
    import uvloop
    new_loop = uvloop.new_event_loop
except ImportError:  # pragma: no cover
    new_loop = asyncio.new_event_loop

REPLY = (b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 0.00 / 15.00 / 0.00\r\n"
         b"Action: no action\r\n")


class Upstream(asyncio.Protocol):
    def __init__(self, request: bytes, client: asyncio.Transport) -> None:
        self.request, self.client = request, client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        pass  # (the reply is not looked at)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.write(REPLY)
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.data = bytearray()
        self.need = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.need < 0:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.data[:end]).lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            self.start, self.need = end + 4, end + 4 + length
        if len(self.data) >= self.need:
            body = bytes(self.data[self.start:self.need])
            request = b"POST /checkv2 HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(
                lambda: Upstream(request, self.transport), "127.0.0.1", self.upstream_port))


def main() -> None:
    upstream_port, port_file = int(sys.argv[1]), sys.argv[2]
    loop = new_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: Client(upstream_port), "127.0.0.1", 0, backlog=1024))
    with open(port_file + ".tmp", "w") as out:
        out.write(str(server.sockets[0].getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)
    loop.run_forever()


if __name__ == "__main__":
    main()
