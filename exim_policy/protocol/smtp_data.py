"""SMTP DATA transparency (RFC 5321 4.5.2), sans-IO, both ways, on chunks of any size.

:class:`DataDecoder` turns the bytes after ``354`` into the message: a leading dot is
removed from every line that has one, and ``CRLF . CRLF`` ends it. Only that exact
sequence ends a message and only a dot after CRLF is removed: bare LF never starts a line
(the "SMTP smuggling" variants ``LF . LF`` and ``LF . CRLF`` stay message content).
:class:`DataEncoder` does the reverse for a message sent on. Neither holds more than four
bytes between calls, so a message of any size streams through in constant memory.
"""
from __future__ import annotations

END = b"\r\n.\r\n"


class DataDecoder:
    def __init__(self) -> None:
        #: bytes that may be the start of ``CRLF .`` or of the end marker
        self._tail = b""
        #: the first line has no CRLF before it, but it is a line start all the same
        self._at_start = True
        self.done = False
        #: bytes after the end marker (the next command of a pipelining client)
        self.rest = b""

    def feed(self, chunk: bytes) -> bytes:
        """The message bytes ``chunk`` completes; sets :attr:`done` at the end marker."""
        if self.done:
            raise ValueError("DATA already ended")
        buf = self._tail + chunk
        self._tail = b""
        pos = 0
        if self._at_start:
            if len(buf) < 3 and b".\r\n".startswith(buf):
                self._tail = buf
                return b""
            self._at_start = False
            if buf.startswith(b".\r\n"):  # an empty message
                self.done, self.rest = True, buf[3:]
                return b""
            if buf.startswith(b"."):
                pos = 1
        out = bytearray()
        while True:
            hit = buf.find(b"\r\n.", pos)
            if hit < 0:
                keep = 2 if buf.endswith(b"\r\n") else 1 if buf.endswith(b"\r") else 0
                keep = min(keep, len(buf) - pos)
                out += buf[pos:len(buf) - keep]
                self._tail = buf[len(buf) - keep:]
                return bytes(out)
            if len(buf) < hit + 5:  # not yet known: the end, or a dot-stuffed line
                out += buf[pos:hit]
                self._tail = buf[hit:]
                return bytes(out)
            out += buf[pos:hit + 2]  # the CRLF belongs to the line it ends
            if buf[hit + 3:hit + 5] == b"\r\n":
                self.done, self.rest = True, buf[hit + 5:]
                return bytes(out)
            pos = hit + 3  # drop the stuffing dot


class DataEncoder:
    """Message bytes -> DATA bytes: a dot doubled at every line start; :meth:`end` adds
    the end marker (after a CRLF when the message does not end with one)."""

    def __init__(self) -> None:
        #: the message's last two bytes so far (a line start is after CRLF)
        self._last = b"\r\n"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        joined = self._last + chunk
        self._last = joined[-2:]
        return joined.replace(b"\r\n.", b"\r\n..")[2:]

    def end(self) -> bytes:
        return b".\r\n" if self._last == b"\r\n" else b"\r\n.\r\n"
