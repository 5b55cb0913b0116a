"""Rspamd's own HTTP protocol (``/checkv2``), server side: bytes in, events out, reply bytes.

The clients that speak it (facts in ``docs/http-front.md``):

- Haraka's rspamd plugin: ``POST``, HTTP/1.1, keep-alive, chunked body, ``From`` without
  angle brackets, a ``Deliver-To`` with one recipient; with the SPF plugin loaded a junk
  ``SPF: [object Object]`` header (ignored: only the headers named here are read).
- ``rspamc``: ``POST``, HTTP/1.0, ``Content-Length``, header ``Ip`` (names are
  case-insensitive), ``User-Agent: rspamc``.
- ``rspamd_proxy`` in milter mode (Postfix, Sendmail): ``GET`` with an inline body whenever
  the upstream is on loopback, ``Content-Length``, ``IP: addr:port`` (the port is stripped
  here), ``From``/``Rcpt`` with angle brackets, and ``Flags: milter,...``, the reliable sign
  of a request from the proxy (:func:`from_milter`).

HTTP framing is httptools' (llhttp; bytes in, callbacks out, no I/O):
:class:`CheckV2Connection` adds the two routes, the body size limit, and turns everything
it cannot serve into a :class:`~exim_policy.model.ProtocolError` whose ``code`` is the
HTTP status of the error reply (``{"error": "..."}``, then the connection closes).

:func:`build_reply` turns a :class:`~exim_policy.model.Decision` into the ``/checkv2``
JSON the clients read. Rspamd's own reply passes through unchanged where the shim kept
its verdict; the shim's context symbols are added to ``symbols``; a reject or soft
reject carries the public text (``[texts]``, or Rspamd's own) in ``messages.smtp_message``
(the SMTP reply text of Haraka and of the proxy, as the first ``Message:`` line is
Exim's). The shim's reason, which names hosts, scores and config keys, is never in it.
"""
from __future__ import annotations

import collections
import dataclasses
import http
import json

from typing import TYPE_CHECKING, Any

import httptools

from ..model import (ADD_HEADER, GREYLIST, NO_ACTION, REJECT, REWRITE_SUBJECT, SOFT_REJECT,
                     Decision, Envelope, ProtocolError, Request, Traffic)
from ..scanner.rspamd_json import symbol_json
from .parser import NEED_DATA
from .rspamc import envelope as rspamc_envelope
from .text import has_line_breaker, valid_ip

if TYPE_CHECKING:
    from ..config import Config

CHECK_PATH = "/checkv2"
PING_PATH = "/ping"
#: the Prometheus endpoint, where a server enables it (exim_policy/metrics.py)
METRICS_PATH = "/metrics"
#: the Request.command of each route
_COMMANDS = {CHECK_PATH.encode(): "CHECK", PING_PATH.encode(): "PING",
             METRICS_PATH.encode(): "METRICS"}
PONG = b"pong\r\n"

#: the only action names every client knows: rspamd_proxy TEMPFAILs any action name its own
#: config has not registered (``soft_reject``, ``quarantine``, ``discard`` included)
CLIENT_ACTIONS = frozenset({REJECT, SOFT_REJECT, REWRITE_SUBJECT, ADD_HEADER, GREYLIST,
                            NO_ACTION})
#: Rspamd actions a client cannot be told, as the nearest one it knows
_STRONGER_THAN_REJECT = frozenset({"discard", "quarantine"})

#: request headers passed on to Rspamd as sent (after the value checks): what its rules and
#: settings can use (``MTA-Name`` from Postfix's ``milter_macro_daemon_name``, Haraka's
#: ``[request_headers]`` key ``MTA-Tag``, ...). The envelope headers are rebuilt from the
#: Envelope; nothing else is forwarded: ``File``/``Path``/``Shm*`` make Rspamd read local
#: files, ``Pass``/``Flags``/``Settings``/``Raw`` change what it checks, ``User-Agent:
#: rspamc`` makes it skip rate limits.
PASSTHROUGH_HEADERS = ("MTA-Name", "MTA-Tag", "Deliver-To", "TLS-Cipher", "TLS-Version",
                       "Cert-Issuer", "Mailer", "Log-Tag", "Settings-ID")
_PASSTHROUGH = {name.lower(): name for name in PASSTHROUGH_HEADERS}
#: longest passed-through value: these are names and tags, not content
_MAX_PASSTHROUGH_VALUE = 256


class _Closed:
    """Type of :data:`CLOSED` (a singleton, compare with ``is``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSED"


#: the client closed the connection between requests (the normal end of a keep-alive)
CLOSED = _Closed()


@dataclasses.dataclass(frozen=True)
class Reply:
    """One HTTP reply body and its status; the connection frames it."""

    status: int
    body: bytes
    content_type: str = "application/json"


def error_reply(status: int, text: str) -> Reply:
    """Rspamd's error shape: ``{"error": "..."}`` (Haraka reads it as a scan error)."""
    return Reply(status, json.dumps({"error": text}).encode("ascii"))


PONG_REPLY = Reply(200, PONG, "text/plain")


# ------------------------------------------------------------------------- connection --
class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the error is queued already)."""


class CheckV2Connection:
    """One client connection, any number of requests (keep-alive, pipelining), sans-IO::

        conn = CheckV2Connection(max_header_bytes=..., max_body_bytes=...)
        conn.receive_data(chunk)        # b"" when the peer closed
        event = conn.next_event()       # Request | ProtocolError | NEED_DATA | CLOSED
        out = conn.data_to_send()       # e.g. "100 Continue"; write it
        out = conn.send_reply(reply)    # after a Request; then conn.keep_alive says
        conn.next_request()             # whether another request may follow

    After a :class:`ProtocolError` the connection is done: write :meth:`send_error`'s
    bytes and close. Parsing is httptools' (llhttp, Node's parser, in C): strict framing
    (both ``Content-Length`` and ``Transfer-Encoding``, two ``Content-Length``, a control
    character in a header value: 400), at a few percent of the CPU a pure-Python parser
    needs per request.
    """

    #: the request's Content-Length (None: none, or chunked)
    _length: int | None

    def __init__(self, *, max_header_bytes: int, max_body_bytes: int,
                 paths: tuple[str, ...] = (CHECK_PATH, PING_PATH)) -> None:
        """``paths``: the routes served (any of /checkv2, /ping, /metrics); others: 404."""
        self._parser = httptools.HttpRequestParser(self)
        self.paths = paths
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        #: complete requests with "may the connection stay open after it" (pipelined
        #: ones wait here), and maybe, last, an error
        self._ready: collections.deque[tuple[Request | ProtocolError, bool]] = \
            collections.deque()
        self._failed = False
        self._closed = False
        self._in_message = False
        self._keep_alive = False
        self._outgoing = b""
        self._start_message()

    # --------------------------------------------------------------- feeding --
    def receive_data(self, data: bytes) -> None:
        if self._failed:
            return
        if not data:
            self._closed = True
            if self._in_message:
                self._fail(400, "the client closed the connection in the middle of a request")
            return
        try:
            self._parser.feed_data(data)
            if self._in_message and (not self._in_body or self._in_trailers):
                # llhttp keeps an unfinished header line to itself: bound it from here (all
                # of this chunk counts, so a chunk that also held earlier requests
                # over-counts, which only matters for chunks near the limit); so are the
                # trailer fields after a chunked body's last chunk
                self._unfinished_head += len(data)
                if self._unfinished_head > self.max_header_bytes:
                    self._fail(431, f"request headers larger than {self.max_header_bytes} "
                                    "bytes")
        except httptools.HttpParserCallbackError:
            pass  # one of ours (_Stop): the error is queued already
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad HTTP request: {exc}")

    def next_event(self) -> Request | ProtocolError | _Closed | object:
        if self._ready:
            return self._ready[0][0]
        if self._closed:
            return CLOSED
        return NEED_DATA

    def data_to_send(self) -> bytes:
        out, self._outgoing = self._outgoing, b""
        return out

    def send_reply(self, reply: Reply, *, close: bool = False) -> bytes:
        """The framed reply to the current request. It says ``Connection: close`` when
        ``close`` is set (the server stops), when the client asked for it, and for an
        HTTP/1.0 client that did not ask for keep-alive."""
        request, keep_alive = self._ready[0]
        assert isinstance(request, Request)
        self._keep_alive = keep_alive and not close
        connection = b""
        if not self._keep_alive:
            connection = b"Connection: close\r\n"
        elif request.version == "1.0":
            connection = b"Connection: keep-alive\r\n"
        return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            reply.status, _phrase(reply.status).encode("ascii"),
            reply.content_type.encode("ascii"), len(reply.body), connection)) + reply.body

    @property
    def keep_alive(self) -> bool:
        """After :meth:`send_reply`: may the client send another request?"""
        return self._keep_alive

    def next_request(self) -> None:
        """Go on with the next request on this connection (after :attr:`keep_alive`)."""
        self._ready.popleft()

    @staticmethod
    def send_error(error: ProtocolError) -> bytes:
        """The error reply for ``error``, always with ``Connection: close``."""
        reply = error_reply(error.code, error.text)
        return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % (
                    error.code, _phrase(error.code).encode("ascii"),
                    reply.content_type.encode("ascii"), len(reply.body))) + reply.body

    # ------------------------------------------------- httptools' callbacks --
    def on_message_begin(self) -> None:
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # (a head that came whole in one read is bounded here: receive_data counts only
        # the reads that end inside it)
        self._count_head(len(name) + len(value) + 4)
        if self._in_body:
            # a trailer field after a chunked body: counted, never read as a header (a
            # trailer "User:" or "Settings-Id:" must not steer the scan)
            return
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if name.lower() == b"content-length" and value.isdigit():
            self._length = int(value)
        elif name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self._in_body = True
        method = self._parser.get_method().decode("ascii", "replace")
        target = self._url.decode("latin-1").split("?", 1)[0]
        if target not in self.paths:
            served = " and ".join(filter(None, (", ".join(self.paths[:-1]), self.paths[-1])))
            self._stop(404, f"unknown path {target[:100]!r}: this server answers {served}")
        # GET with a body: rspamd_proxy 3.4 sends that to a loopback upstream
        if method not in ("GET", "POST"):
            self._stop(405, f"method {method[:20]} is not supported")
        if self._length is not None and self._length > self.max_body_bytes:
            self._stop_too_large()
        if self._expect_continue and self._parser.get_http_version() == "1.1":
            self._outgoing += b"HTTP/1.1 100 Continue\r\n\r\n"

    def on_chunk_header(self) -> None:
        # trailer fields may follow (the last chunk), counted as the head is; a data
        # chunk's on_body ends that, the end of the message (_start_message) too
        self._in_trailers, self._unfinished_head = True, 0

    def on_body(self, body: bytes) -> None:
        self._in_trailers = False
        if len(self._body) + len(body) > self.max_body_bytes:
            self._stop_too_large()
        self._body += body

    def on_message_complete(self) -> None:
        target = self._url.split(b"?", 1)[0]
        self._ready.append((Request(
            protocol="http", command=_COMMANDS.get(target, "CHECK"),
            version=self._parser.get_http_version(), headers=tuple(self._headers),
            body=self._body), self._parser.should_keep_alive()))
        self._start_message()

    # -------------------------------------------------------------- internals --
    def _start_message(self) -> None:
        self._in_message = False
        self._in_body = False
        self._in_trailers = False
        self._unfinished_head = 0
        self._head_bytes = 0  # of the URL and the header fields parsed so far
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._length = None
        self._expect_continue = False
        self._body = bytearray()

    def _stop_too_large(self) -> None:
        self._stop(413, f"message larger than {self.max_body_bytes} bytes "
                        "(server.max_message_size)")

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._stop(431, f"request headers larger than {self.max_header_bytes} bytes")

    def _stop(self, status: int, text: str) -> None:
        self._fail(status, text)
        raise _Stop

    def _fail(self, status: int, text: str) -> None:
        self._failed = True
        self._body = bytearray()
        self._ready.append((ProtocolError(status, text), False))


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# ---------------------------------------------------------------------------- request --
def envelope(request: Request) -> Envelope:
    """The envelope in a ``/checkv2`` request: the same headers as Exim's ``variant=rspamd``
    (read by the same function), ``IP`` with its port stripped, and the
    :data:`PASSTHROUGH_HEADERS` with a safe value."""
    base = rspamc_envelope(request)
    return dataclasses.replace(base, ip=valid_ip(strip_port(request.header("IP"))),
                               passthrough=passthrough(request))


def strip_port(value: str | None) -> str | None:
    """``192.0.2.10:12345`` -> ``192.0.2.10``, ``[2001:db8::1]:25`` -> ``2001:db8::1``;
    a bare IPv4 or IPv6 address stays as it is (rspamd_proxy sends the port)."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("["):
        inside, bracket, _port = value[1:].partition("]")
        return inside if bracket else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def passthrough(request: Request) -> tuple[tuple[str, str], ...]:
    out = []
    for name, value in request.headers:
        canonical = _PASSTHROUGH.get(name.lower())
        if canonical is None or has_line_breaker(value):
            continue
        value = value.strip()
        if value and len(value) <= _MAX_PASSTHROUGH_VALUE and value.isprintable():
            out.append((canonical, value))
    return tuple(out)


def from_milter(request: Request) -> bool:
    """rspamd_proxy in milter mode sends ``Flags: milter,body_block``."""
    flags = ",".join(request.header_values("Flags"))
    return "milter" in (flag.strip().lower() for flag in flags.split(","))


# ------------------------------------------------------------------------------ reply --
def client_action(action: str) -> str:
    """The action as a name every client knows: underscores as spaces (``soft_reject``),
    ``discard``/``quarantine`` as ``reject``; a custom Rspamd action as ``no action``."""
    name = action.replace("_", " ")
    if name in CLIENT_ACTIONS:
        return name
    return REJECT if name in _STRONGER_THAN_REJECT else NO_ACTION


def build_reply(decision: Decision, *, milter: bool, outbound_spam: str) -> Reply:
    """The ``/checkv2`` reply for ``decision``.

    Outbound spam (an outbound ``reject``: what Exim's bundled config quarantines) is
    answered ``reject`` + ``milter.reject = "quarantine"`` to rspamd_proxy, so Postfix or
    Sendmail put it in their hold queue; other clients (Haraka has no quarantine) get
    ``outbound_spam`` (``reject`` or ``soft reject``).
    """
    return Reply(200, json.dumps(reply_document(decision, milter=milter,
                                                outbound_spam=outbound_spam),
                                 allow_nan=False).encode("ascii"))


def reply_document(decision: Decision, *, milter: bool,
                   outbound_spam: str) -> dict[str, Any]:
    scan = decision.scan
    action = client_action(decision.action)
    quarantine = decision.traffic is Traffic.OUTBOUND and action == REJECT
    if quarantine and not milter:
        action = outbound_spam
    raw = scan.raw if scan is not None and isinstance(scan.raw, dict) else None
    if raw is not None:
        doc = dict(raw)
    else:  # no verdict from Rspamd (scanner failure, an account over its limit)
        doc = {"score": decision.score, "required_score": decision.required_score or 0.0,
               "is_skipped": True}
    doc["action"] = action
    symbols = doc.get("symbols")
    doc["symbols"] = dict(symbols) if isinstance(symbols, dict) else {}
    for symbol in decision.symbols:
        doc["symbols"][symbol.name] = symbol_json(symbol)
    if action != (scan.action if scan is not None else None):
        # Rspamd's edits belong to its own verdict, not to the one the shim gives
        for key in ("milter", "dkim-signature", "subject"):
            doc.pop(key, None)
    if action in (REJECT, SOFT_REJECT) and decision.message is not None:
        # the public text only: the reason (hosts, scores, config keys) stays in the log
        messages = doc.get("messages")
        doc["messages"] = dict(messages) if isinstance(messages, dict) else {}
        doc["messages"]["smtp_message"] = decision.message
    if quarantine and milter:
        doc["milter"] = {"reject": "quarantine"}
    return doc


class CheckV2Codec:
    """The HTTP front: ``/checkv2`` and ``/ping`` (see :mod:`.codec`)."""

    name = "http"

    def answer_at_once(self, request: Request) -> Reply | None:
        return PONG_REPLY if request.command == "PING" else None

    def envelope(self, request: Request, config: Config) -> Envelope:
        return envelope(request)

    def reply(self, request: Request, decision: Decision, config: Config) -> Reply:
        """The reply; ``defer`` is a 503 with Rspamd's error shape, so the client applies
        its own scanner-failure setting (Haraka ``[defer] error``, Postfix
        ``milter_default_action``)."""
        if decision.defer:
            return error_reply(http.HTTPStatus.SERVICE_UNAVAILABLE, decision.reason)
        return build_reply(decision, milter=from_milter(request),
                           outbound_spam=config.http.outbound_spam)


CODEC = CheckV2Codec()
