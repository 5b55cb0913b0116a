"""Scanners behind one small interface: bytes + envelope in, :class:`ScanResult` out.

A scanner raises :class:`ScannerError` for every failure to get a verdict (refused,
timeout, HTTP error, bad JSON); the caller maps that to the configured failure outcome in
one place.
"""
from __future__ import annotations

from typing import Protocol

from ..model import Envelope, ScanResult, Traffic

#: the message as the transport holds it: scanners take it without copying it
Message = bytes | bytearray | memoryview


#: what went wrong, for the metrics (a small fixed set: it is a label value)
TIMEOUT, CONNECT, HTTP_STATUS, RSPAMD_ERROR, BAD_REPLY, OTHER = (
    "timeout", "connect", "http_status", "rspamd_error", "bad_reply", "other")


class ScannerError(Exception):
    """No verdict; the message says why, in words for the log, and ``kind`` in one word
    (:data:`TIMEOUT`, :data:`CONNECT`, ...)."""

    def __init__(self, message: str, kind: str = OTHER) -> None:
        super().__init__(message)
        self.kind = kind


class Scanner(Protocol):
    async def scan(self, message: Message, envelope: Envelope,
                   traffic: Traffic | None) -> ScanResult:
        """Scan ``message`` (RFC 5322 bytes, no mbox From_ line) of the ``traffic`` class
        (the scanner knows what that means to it: Rspamd's settings per class)."""
        ...
