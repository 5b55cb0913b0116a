"""The quarantine receiver: an SMTP server (aiosmtpd) that Exim's quarantine transport
delivers outbound spam to, every original recipient as an envelope recipient.

aiosmtpd does the SMTP dialogue; DATA is our own (:meth:`_Session.smtp_DATA`) because
aiosmtpd's holds the whole message in memory, three to four times its size: here it
streams through :class:`~exim_policy.protocol.smtp_data.DataDecoder` and
:class:`~exim_policy.quarantine.headers.HeaderSplitter` into a file, in chunks, and the
250 comes only after :meth:`QuarantineStore.commit` has the file fsync'd and indexed.
Every refusal is a 4xx except a message over ``max_message_size`` (552): Exim keeps the
message queued and tries again, so a full disk, a broken index or a restart lose nothing.

File writes, fsync and SQLite run on one :class:`StoreThread`, never on the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiosmtpd.smtp import SMTP

from ..config import Config
from ..protocol.smtp_data import DataDecoder
from ..state.thread import StoreThread
from ..tally import Tally
from ..transport.listeners import client_allowed, start_listeners
from .evidence import from_fields
from .headers import HeaderSplitter, decoded, first
from .store import NewMessage, QuarantineStore

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("exim_policy.quarantine")
# aiosmtpd logs every connection at INFO; our own lines say what matters
logging.getLogger("mail.log").setLevel(logging.WARNING)

#: open SMTP sessions at once; when full, the one silent longest is closed to make room
#: (one storing a message never is); when none can be, 421 (Exim tries again later)
MAX_SESSIONS = 200
#: bytes written to the file per thread call
WRITE_CHUNK = 256 * 1024
#: seconds a session may stay silent (also inside DATA)
IDLE_TIMEOUT = 300.0

#: (account, received) -> the id of the account's incident open then, if any
IncidentLookup = Callable[[str, float], Awaitable["int | None"]]


class QuarantineReceiver:
    #: counts what DATA ended in (None: metrics off); set by Metrics.instrument
    metrics: Metrics | None = None

    def __init__(self, config: Config, store: QuarantineStore,
                 incident_of: IncidentLookup | None = None) -> None:
        self.config = config
        self.store = store
        self.incident_of = incident_of
        self.thread = StoreThread("quarantine")
        #: open sessions, the one silent longest first (a command or a DATA chunk moves a
        #: session to the end)
        self._open: dict[_Session, None] = {}
        self.shed = Tally(log, logging.WARNING)
        self.refused = Tally(log, logging.WARNING)
        self.not_allowed = Tally(log, logging.WARNING)
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def sessions(self) -> int:
        return len(self._open)

    def admit(self, session: _Session, allowed: bool) -> bool:
        """Take ``session`` in; when MAX_SESSIONS are open, close the session silent
        longest to make room, so that silent or slow clients cannot shut the MTAs out for
        IDLE_TIMEOUT. A client outside ``allowed_clients`` (refused at MAIL anyway) makes
        no room. False: no room, refuse it."""
        if len(self._open) >= MAX_SESSIONS:
            now = time.monotonic()
            victim = next((s for s in self._open if not s.committing), None) \
                if allowed else None
            if victim is None:
                self.refused.hit(now, "quarantine: refused a connection from %s: %d sessions "
                                 "open%s", _peer(session.session.peer), MAX_SESSIONS,
                                 "" if allowed else " (not in quarantine.allowed_clients)")
                return False
            self.forget(victim)
            self.shed.hit(now, "quarantine: closed the session from %s that had been silent "
                          "longest, to make room (%d sessions at most)",
                          _peer(victim.session.peer), MAX_SESSIONS)
            victim.shed()
        self._open[session] = None
        return True

    def touch(self, session: _Session) -> None:
        """``session`` said something: it is now the one silent for the shortest time."""
        if self._open.pop(session, False) is None:
            self._open[session] = None

    def forget(self, session: _Session) -> None:
        self._open.pop(session, None)

    async def start(self) -> None:
        self._servers = await start_listeners(self.config.quarantine.listen, self._session)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        await asyncio.to_thread(self.thread.stop)

    def count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.quarantined(result)

    def _session(self) -> _Session:
        return _Session(self, _Handler(self), hostname="exim-policy-quarantine",
                        ident="exim-policy quarantine", timeout=IDLE_TIMEOUT,
                        data_size_limit=self.config.quarantine.max_message_size,
                        enable_SMTPUTF8=True)


class _Handler:
    """aiosmtpd's hooks: who may deliver, how many recipients, whether the disk has room."""

    def __init__(self, receiver: QuarantineReceiver) -> None:
        self.receiver = receiver

    async def handle_MAIL(self, server, session, envelope, address, options):
        quarantine = self.receiver.config.quarantine
        if not client_allowed(session.peer, quarantine.allowed_clients):
            # one line, then a count: an outsider at full speed must not flood the log
            self.receiver.not_allowed.hit(time.monotonic(), "quarantine: refused %s: not in "
                                          "quarantine.allowed_clients", _peer(session.peer))
            return "550 5.7.1 not allowed to deliver into this quarantine"
        free = await self.receiver.thread.call(self.receiver.store.free_bytes)
        if free < quarantine.min_free_bytes:
            log.error("quarantine: %s: %d bytes free, below quarantine.min_free_bytes: "
                      "answering 452", self.receiver.store.root, free)
            return "452 4.3.1 quarantine disk full, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        if len(envelope.rcpt_tos) >= self.receiver.config.quarantine.max_recipients:
            return "452 4.5.3 too many recipients (quarantine.max_recipients)"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


class _Session(SMTP):
    #: aiosmtpd sizes its StreamReader by this; DATA reads chunks up to it
    line_length_limit = 256 * 1024

    #: the end marker is in and the message is being stored: never shed
    committing = False

    def __init__(self, receiver: QuarantineReceiver, handler: _Handler, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.receiver = receiver

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        allowed = client_allowed(self.session.peer,
                                 self.receiver.config.quarantine.allowed_clients)
        if not self.receiver.admit(self, allowed):
            transport.write(b"421 4.3.2 too many connections, try again later\r\n")
            transport.close()

    def connection_lost(self, error) -> None:
        self.receiver.forget(self)
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls it for every command, and _read_chunk for every DATA chunk
        super()._reset_timeout(duration)
        self.receiver.touch(self)

    def shed(self) -> None:
        """Make room for a new session (the receiver has forgotten this one)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.3.2 too many connections, closing an idle one\r\n")
            self.transport.close()

    def eof_received(self) -> bool:
        """The client closed: the session ends (aiosmtpd cancels its handler). Close our
        side too: aiosmtpd leaves that to the handler, and under uvloop a connection that
        closed before its handler first ran (a port probe accepted late) would stay half
        open, holding one of the MAX_SESSIONS, until IDLE_TIMEOUT."""
        super().eof_received()
        return False

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        envelope, peer = self.envelope, self.session.peer
        try:
            reply = await self._receive(envelope.mail_from or "", tuple(envelope.rcpt_tos),
                                        peer)
        except ConnectionError:
            return
        finally:
            self.committing = False
        self._set_post_data_state()
        await self.push(reply)

    async def _receive(self, sender: str, recipients: tuple[str, ...], peer) -> str:
        receiver = self.receiver
        thread = receiver.thread
        tmp_path = receiver.store.temp_path()
        failure, stored, digest, fields = await self._spool(tmp_path)
        self.committing = True
        if failure:
            await thread.call(_discard, tmp_path, None)
            log.error("quarantine: message from <%s> not kept: %s", sender, failure)
            receiver.count("refused")
            return failure
        evidence = from_fields(fields, sender, receiver.config)
        if evidence.incident is None and evidence.account and receiver.incident_of:
            incident = await receiver.incident_of(evidence.account, time.time())
            if incident is not None:
                evidence = dataclasses.replace(evidence, incident=incident)
        message = NewMessage(
            sender=sender, recipients=recipients, evidence=evidence, size=stored,
            sha256=digest, subject=decoded(first(fields, "Subject") or b""),
            from_header=decoded(first(fields, "From") or b""),
            message_id=decoded(first(fields, "Message-ID") or b""),
            source=f"smtp from {peer[0] if isinstance(peer, tuple) else 'unix socket'}")
        try:
            entry_id, merged = await thread.call(receiver.store.commit, tmp_path, message)
        except Exception as exc:  # sqlite3.Error, OSError: the MTA keeps the message
            await thread.call(_discard, tmp_path, None)
            log.error("quarantine: cannot store a message from <%s>: %s", sender, exc)
            receiver.count("refused")
            return "451 4.3.0 quarantine store failed, try again later"
        receiver.count("merged" if merged else "held")
        log.info("quarantine: %s %s: from <%s> to %d recipient(s), account %s, queue id %s, "
                 "%d bytes, %s", "merged into" if merged else "held as", entry_id, sender,
                 len(recipients), evidence.account or "-", evidence.queue_id or "-", stored,
                 evidence.reason or "no reason given")
        return f"250 2.0.0 held as {entry_id}"

    async def _spool(self, tmp_path) -> tuple[str, int, str, list[tuple[str, bytes]]]:
        """DATA into ``tmp_path`` (closed, not yet fsync'd): (failure reply or "", bytes
        stored, their sha256, the header fields)."""
        thread = self.receiver.thread
        limit = self.receiver.config.quarantine.max_message_size
        decoder, splitter, digest = DataDecoder(), HeaderSplitter(), hashlib.sha256()
        size, stored, pending, failure, fh = 0, 0, bytearray(), "", None
        try:
            _, fh = await thread.call(self.receiver.store.temp_file, tmp_path)
            while not decoder.done:
                data = decoder.feed(await self._read_chunk())
                size += len(data)
                if failure:
                    continue  # read to the end, then answer
                if size > limit:
                    failure = "552 5.3.4 message larger than quarantine.max_message_size"
                    continue
                out = splitter.feed(data)
                if decoder.done:
                    out += splitter.close()
                digest.update(out)
                stored += len(out)
                pending += out
                if len(pending) >= WRITE_CHUNK or decoder.done:
                    failure = await self._write(fh, pending)
                    pending = bytearray()
            await thread.call(fh.close)
        except BaseException:
            # Cancelled (the client went away) or failed: not awaited, a second cancel
            # could interrupt it. Queued behind any write still in flight on the thread.
            try:
                thread.call(_discard, tmp_path, fh)
            except RuntimeError:  # no loop any more (the coroutine is being closed)
                _discard(tmp_path, fh)
            raise
        return failure, stored, digest.hexdigest(), splitter.fields

    async def _read_chunk(self) -> bytes:
        """Up to the next ``.CRLF`` (every end marker ends so), or what the buffer holds;
        never past the end marker: what follows it is the client's next command."""
        try:
            chunk = await self._reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            chunk = await self._reader.read(exc.consumed)
        except asyncio.IncompleteReadError:
            raise ConnectionError("the client closed the connection during DATA") from None
        self._reset_timeout()
        return chunk

    async def _write(self, fh, data: bytearray) -> str:
        if not data:
            return ""
        try:
            await self.receiver.thread.call(fh.write, bytes(data))
        except OSError as exc:
            log.error("quarantine: cannot write %s: %s", self.receiver.store.tmp, exc)
            return "452 4.3.1 quarantine cannot write the message, try again later"
        return ""


def _peer(peer) -> str:
    return peer[0] if isinstance(peer, tuple) else "a unix socket"


def _discard(path, fh) -> None:
    try:
        if fh is not None:
            fh.close()
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("quarantine: cannot remove %s: %s", path, exc)

