"""A tiny canned-reply server that speaks the Exim side of ``variant=rspamd``.

Fast tests of the bundled Exim ACL use it instead of the shim, to feed Exim replies that
are hard to get from a real Rspamd on demand (soft reject, a custom reason sentence, a
rewritten subject, a close without an answer).  It is an addition to the end-to-end tests
with the real shim and Rspamd, not a replacement.

Framing as Exim needs it (docs/wire-formats.md, "Exim's request: variant=rspamd" and "How
Exim reads a reply"): the request is headers up to a blank
line, then exactly ``Content-length`` body bytes (Exim does not half-close); the server
answers, then closes (Exim reads to EOF).
"""
from __future__ import annotations

import socket
import threading
from typing import NamedTuple
from collections.abc import Callable

from exim_policy.lab.ports import LOOPBACK


class CannedRequest(NamedTuple):
    head: str    # request line + headers, latin-1
    body: bytes  # the mbox-wrapped message Exim sent

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def rspamc_reply(action: str, score: float = 0.0, *, lines: tuple[str, ...] = ()) -> bytes:
    """A legacy RSPAMC/1.3 reply as Rspamd (and the shim) write it."""
    text = (f"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; {score:.2f} / 15.00 / 0.0\r\n"
            f"Action: {action}\r\n" + "".join(f"{line}\r\n" for line in lines))
    return text.encode("utf-8")


#: the reply function: request -> reply bytes, or None to close without answering
Responder = Callable[[CannedRequest], "bytes | None"]


class CannedSpamd:
    """Threaded server on a free 127.0.0.1 port; ``requests`` records what Exim sent."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[CannedRequest] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="canned-spamd", daemon=True)

    @property
    def spamd_address(self) -> str:
        return f"{LOOPBACK} {self.port} variant=rspamd tmo=10s"

    def start(self) -> CannedSpamd:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                request = CannedRequest(head.decode("latin-1"), b"")
                length = int(request.header("Content-length") or 0)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                request = CannedRequest(request.head, body)
                self.requests.append(request)
                reply = self.responder(request)
                if reply is not None:
                    conn.sendall(reply)
            except (OSError, ValueError):
                return
