"""TOML configuration -> frozen dataclasses.

Every key has a default in its dataclass field. Unknown keys, wrong types and bad values
raise :class:`ConfigError` naming the dotted key (``forwarding.sources[2].path: ...``), every
one of them at once, so a typo fails at start-up instead of silently using a default.
:func:`to_toml` writes a configuration back as TOML that reads back the same.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import os
import sys
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .model import MAX_ACTION_BYTES, FailureMode, Traffic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/exim-policy/config.toml"


class ConfigError(Exception):
    """Configuration problems, worded for the administrator (no traceback needed): every
    one found, one line each (``errors``), not only the first."""

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------- value types --
@dataclass(frozen=True)
class ListenAddress:
    """``host:port``, ``[v6]:port`` or ``unix:/path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    if not isinstance(text, str) or not text:
        raise ValueError("expected 'host:port', '[v6]:port' or 'unix:/path'")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a unix socket path must be absolute")
        return ListenAddress(path=path)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected '[v6]:port'")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected 'host:port', '[v6]:port' or 'unix:/path'")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{text!r}: the host must be an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: bad port {port!r}")
    return ListenAddress(host=host, port=int(port))


def _listen_list(value: object) -> tuple[ListenAddress, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError("expected a string or a list of strings")
    return tuple(parse_listen(item) for item in items)


def _networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of networks such as '192.0.2.0/24'")
    nets = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a string")
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network") from None
    return tuple(nets)


def _actions(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of Rspamd action names")
    for action in value:
        if not action or len(action.encode()) > MAX_ACTION_BYTES or "\r" in action \
                or "\n" in action:
            raise ValueError(f"{action!r} is not a valid action name")
    return tuple(value)


def _http_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL string")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{value!r}: expected http://host:port (Rspamd's normal worker)")
    try:
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError:
        raise ValueError(f"{value!r}: bad port") from None
    return value.rstrip("/")


def _scanner_url(value: object) -> str:
    """Rspamd's normal worker: ``http://host:port``, or ``unix:/path`` (a ``bind_socket``
    of its own on this host: no TCP on that hop)."""
    if isinstance(value, str) and value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ValueError(f"{value!r}: expected unix:/absolute/path")
        return value
    return _http_url(value)


def _positive(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError("expected a positive number")
    return float(value)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a positive whole number")
    return value


def _octal_mode(value: object) -> int:
    if not isinstance(value, str) or not value or any(c not in "01234567" for c in value) \
            or int(value, 8) > 0o777:
        raise ValueError("expected an octal file mode string such as \"0660\"")
    return int(value, 8)


def _event_loop(value: object) -> str:
    if value not in ("auto", "asyncio", "uvloop"):
        raise ValueError("expected 'auto', 'asyncio' or 'uvloop'")
    return str(value)


#: most processes ``server.workers`` may ask for (a typo must not fork a thousand)
MAX_WORKERS = 64


def cores() -> int:
    """The cores this process may run on (its CPU affinity), what ``workers = "auto"``
    means."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def _workers(value: object) -> int:
    if value == "auto":
        return min(cores(), MAX_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, or \"auto\" "
                         "(the number of cores)")
    return value


def _log_level(value: object) -> str:
    levels = ("debug", "info", "warning", "error")
    if value not in levels:
        raise ValueError(f"expected one of {', '.join(levels)}")
    return str(value)


def _choice(*choices: str):
    def parse(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}")
        return str(value)
    return parse


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """``"30s"``, ``"15m"``, ``"1h"``, ``"1d"`` (or a number of seconds) -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str) and len(value) >= 2 and value[-1] in _DURATION_UNITS:
        number = value[:-1]
        try:
            amount = float(number)
        except ValueError:
            amount = 0.0
        if amount > 0 and number.replace(".", "", 1).isdigit():
            return amount * _DURATION_UNITS[value[-1]]
    raise ValueError("expected a duration such as \"30s\", \"15m\", \"1h\" or \"1d\"")


def format_duration(seconds: float) -> str:
    """The shortest ``parse_duration`` text for ``seconds``: 3600 -> "1h", 90 -> "90s"."""
    for unit in ("d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number, 0 or more (0: no limit)")
    return value


def _smtp_address(value: object) -> str:
    if not isinstance(value, str) or value.startswith("unix:"):
        raise ValueError("expected 'host:port'")
    parse_listen(value)
    return value


def _address(value: object) -> str:
    if not isinstance(value, str) or value.count("@") != 1 or value.startswith("@") \
            or value.endswith("@") or any(c in value for c in " \t\r\n\0<>,;"):
        raise ValueError(f"{value!r} is not a mail address such as 'abuse@example.com'")
    return value


def _addresses(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of mail addresses")
    return tuple(_address(v) for v in value)


def _optional_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL string")
    if value and urllib.parse.urlsplit(value).scheme not in ("http", "https"):
        raise ValueError(f"{value!r}: expected an http:// or https:// URL, or \"\"")
    return value


def _redis_url(value: object) -> str:
    if not isinstance(value, str) or urllib.parse.urlsplit(value).scheme not in (
            "redis", "rediss", "unix"):
        raise ValueError("expected redis://host:port/db, rediss://... or unix:///path")
    return value


def _command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v
                                                           for v in value):
        raise ValueError("expected a command as a list of strings, e.g. [\"/usr/sbin/exim\"]")
    return tuple(value)


def _release_via(value: object) -> str:
    if value == "exim":
        return "exim"
    if isinstance(value, str) and value.startswith("smtp:"):
        _smtp_address(value[5:])
        return value
    raise ValueError("expected \"exim\" (local submission) or \"smtp:HOST:PORT\" (a port "
                     "the Exim ACLs do not scan, EXIM_POLICY_RELEASE_PORT)")


#: longest public SMTP text: Exim adds a code and enhanced code, and a reply line is at
#: most 512 bytes (RFC 5321 4.5.3.1.5)
MAX_PUBLIC_TEXT = 400


def _public_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty text")
    if not value.isprintable():
        raise ValueError("a line break or control character is not allowed in an SMTP text")
    if len(value.encode("utf-8")) > MAX_PUBLIC_TEXT:
        raise ValueError(f"longer than {MAX_PUBLIC_TEXT} bytes")
    return value.strip()


def _parse(fn, show=None):
    """Field metadata: ``fn`` turns the raw TOML value into the field's value or raises;
    ``show`` turns the value back into what ``fn`` reads (when that is not the value)."""
    return {"parse": fn, "show": show} if show else {"parse": fn}


# ----------------------------------------------------------------------------- sections --
@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...] = field(
        default=(ListenAddress(host="127.0.0.1", port=11335),), metadata=_parse(_listen_list))
    allowed_clients: tuple = field(
        default=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        metadata=_parse(_networks))
    #: the one-line policy-helper protocol for ${readsocket}; empty = off
    query_listen: tuple[ListenAddress, ...] = field(default=(), metadata=_parse(_listen_list))
    #: Rspamd's own HTTP protocol (/checkv2, /ping) for Haraka, rspamc and rspamd_proxy
    #: (Postfix, Sendmail); empty = off
    http_listen: tuple[ListenAddress, ...] = field(default=(), metadata=_parse(_listen_list))
    #: "auto" uses uvloop when it is installed (much less CPU per message), else asyncio's
    event_loop: str = field(default="auto", metadata=_parse(_event_loop))
    #: processes that serve the listeners, each with its own event loop: 1 = this process
    #: alone; more = a supervisor and that many workers (exim_policy/workers.py); "auto" =
    #: the number of cores (read as that number when the file is loaded)
    workers: int = field(default=1, metadata=_parse(_workers))
    #: permissions of unix sockets (allowed_clients filters TCP peers only; a unix socket is
    #: guarded by this mode: Exim runs as Debian-exim and must be able to connect)
    unix_socket_mode: int = field(default=0o666, metadata=_parse(
        _octal_mode, show=lambda mode: f"{mode:04o}"))
    #: open client connections; when full, the one that has been sending its request
    #: longest is closed to make room (one still sending holds no scan slot)
    max_connections: int = field(default=1024, metadata=_parse(_positive_int))
    #: requests scanned at once (Rspamd connections); more wait up to queue_timeout,
    #: then get the configured [failure] outcome
    max_scans: int = field(default=256, metadata=_parse(_positive_int))
    #: body bytes held at once over all connections; a request that does not fit waits
    #: up to queue_timeout, then gets a temporary error (Exim defers it)
    max_bytes_in_flight: int = field(default=256 * 1024 * 1024, metadata=_parse(_positive_int))
    queue_timeout: float = field(default=10.0, metadata=_parse(_positive))
    #: larger requests are refused as soon as their Content-length is read
    max_message_size: int = field(default=50 * 1024 * 1024, metadata=_parse(_positive_int))
    #: longest wait for the next bytes of a request
    read_timeout: float = field(default=30.0, metadata=_parse(_positive))
    #: longest time to receive one whole request, counted from the connect
    request_timeout: float = field(default=110.0, metadata=_parse(_positive))
    #: on SIGTERM, how long requests still arriving or being scanned may take to finish
    shutdown_timeout: float = field(default=30.0, metadata=_parse(_positive))


@dataclass(frozen=True)
class SettingsIds:
    """Rspamd ``Settings-ID`` sent per traffic class; an empty string sends none."""

    inbound: str = "exim-policy-inbound"
    outbound: str = "exim-policy-outbound"
    forwarding: str = "exim-policy-forwarding"

    def for_traffic(self, traffic: Traffic) -> str:
        return getattr(self, traffic.value)


@dataclass(frozen=True)
class RspamdConfig:
    url: str = field(default="http://127.0.0.1:11333", metadata=_parse(_scanner_url))
    #: keep below Exim's spamd_address tmo= (the bundled config uses 30s)
    timeout: float = field(default=8.0, metadata=_parse(_positive))
    settings_id: SettingsIds = SettingsIds()
    #: Rspamd's controller worker (``quarantine release --learn-ham``)
    controller_url: str = field(default="http://127.0.0.1:11334", metadata=_parse(_http_url))
    #: its ``password`` (or ``enable_password``); "" when the controller needs none
    controller_password: str = ""


@dataclass(frozen=True)
class OutboundConfig:
    #: clients whose unauthenticated mail is outbound: these networks, and those in
    #: relay_networks_file
    relay_networks: tuple = field(default=(), metadata=_parse(_networks))
    #: the same list for both sides: one address or network per line, read at start by
    #: the shim and by Exim (EXIM_POLICY_RELAY_HOSTS = <this path>: a host list item
    #: that is a file name); "" = none
    relay_networks_file: str = ""
    #: what relay_networks_file held when the configuration was loaded (not a key)
    file_networks: tuple = field(default=(), metadata={"derived": True})

    @property
    def all_relay_networks(self) -> tuple:
        return self.relay_networks + self.file_networks
    #: Rspamd actions that mean "outbound spam"; answered as reject (-> quarantine redirect)
    spam_actions: tuple[str, ...] = field(default=("reject",), metadata=_parse(_actions))


@dataclass(frozen=True)
class ForwardingSource:
    type: str = ""
    path: str = ""
    #: lsearch: domain for keys that are bare local parts (/etc/aliases style)
    domain: str = ""
    #: sqlite: a query returning (source, destination) rows
    query: str = ""

    def check(self) -> None:
        if self.type not in ("lsearch", "sqlite"):
            raise ConfigError("type: expected 'lsearch' or 'sqlite'")
        if not self.path:
            raise ConfigError("path: required")
        if self.type == "sqlite" and not self.query:
            raise ConfigError("query: required for a sqlite source")


@dataclass(frozen=True)
class ForwardingConfig:
    #: the built map (Rspamd multimap format), read by the shim and by Rspamd
    map: str = "/var/lib/exim-policy/forwardings.txt"
    #: inbound Rspamd actions that become reject when a recipient forwards externally
    spam_actions: tuple[str, ...] = field(
        default=("add header", "rewrite subject"), metadata=_parse(_actions))
    #: how often the map file is checked for changes (seconds)
    reload_interval: float = field(default=2.0, metadata=_parse(_positive))
    local_domains: tuple[str, ...] = ()
    local_domains_file: str = ""
    #: compare local parts case-sensitively (Exim's lsearch is case-insensitive by default)
    case_sensitive_local_parts: bool = False
    #: optional second output: an Exim lsearch file ("address: yes") for ACL lookups
    lsearch_output: str = ""
    sources: tuple[ForwardingSource, ...] = ()


@dataclass(frozen=True)
class FailureConfig:
    """The answer per traffic class when Rspamd gives no verdict."""

    inbound: FailureMode = FailureMode.ACCEPT
    outbound: FailureMode = FailureMode.TEMPFAIL
    forwarding: FailureMode = FailureMode.TEMPFAIL
    #: the account store cannot be reached: "open" (the verdict still applies, limits and
    #: counting are skipped) or "tempfail" (outbound mail of accounts gets a 451)
    accounts: str = field(default="open", metadata=_parse(_choice("open", "tempfail")))

    def for_traffic(self, traffic: Traffic) -> FailureMode:
        return getattr(self, traffic.value)


@dataclass(frozen=True)
class LimitConfig:
    """One sliding window; over any of its counts, the account is throttled (451)."""

    window: float = field(default=0.0, metadata=_parse(parse_duration, show=format_duration))
    #: 0: no limit on that count
    messages: int = field(default=0, metadata=_parse(_count))
    recipients: int = field(default=0, metadata=_parse(_count))
    unique_recipients: int = field(default=0, metadata=_parse(_count))

    def check(self) -> None:
        if not self.window:
            raise ConfigError("window: required (e.g. \"1h\")")
        if not (self.messages or self.recipients or self.unique_recipients):
            raise ConfigError("set at least one of messages, recipients, unique_recipients")


@dataclass(frozen=True)
class IncidentConfig:
    """``spam_verdicts`` spam verdicts within ``window`` open an incident."""

    window: float = field(default=3600.0, metadata=_parse(parse_duration, show=format_duration))
    #: 0: never open an incident
    spam_verdicts: int = field(default=5, metadata=_parse(_count))
    on_open: str = field(default="hold", metadata=_parse(_choice("notify", "hold", "lock")))
    #: a held account is locked after this many more spam verdicts (0: never)
    lock_after: int = field(default=20, metadata=_parse(_count))


@dataclass(frozen=True)
class NotifyConfig:
    """Who hears of incidents: mail through an SMTP server, and/or a JSON webhook."""

    mail_to: tuple[str, ...] = field(default=(), metadata=_parse(_addresses))
    mail_from: str = field(default="exim-policy@localhost", metadata=_parse(_address))
    smtp: str = field(default="127.0.0.1:25", metadata=_parse(_smtp_address))
    webhook_url: str = field(default="", metadata=_parse(_optional_url))
    #: seconds per attempt (SMTP dialogue or HTTP request)
    timeout: float = field(default=10.0, metadata=_parse(_positive))
    #: attempts per notice and channel, backing off from 5 s to 5 min between them
    attempts: int = field(default=6, metadata=_parse(_positive_int))


@dataclass(frozen=True)
class AccountsConfig:
    """Per-account memory of outbound mail: limits, incidents, hold, lock, notify."""

    enabled: bool = False
    store: str = field(default="sqlite", metadata=_parse(_choice("sqlite", "redis", "memory")))
    path: str = "/var/lib/exim-policy/accounts.db"
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_parse(_redis_url))
    #: every Redis key starts with this (several sites or test runs on one Redis)
    redis_prefix: str = "exim-policy:"
    #: "shadow": count, open incidents, log and notify ("would hold"), answer as if off
    mode: str = field(default="enforce", metadata=_parse(_choice("enforce", "shadow")))
    #: the account of unauthenticated outbound mail from a relay network
    relay_key: str = field(default="ip", metadata=_parse(_choice("ip", "sender")))
    #: how long the incidents and audit trail of an account that sends nothing more are
    #: kept (held and locked accounts are kept until a human acts)
    history: float = field(default=30 * 86400.0,
                           metadata=_parse(parse_duration, show=format_duration))
    limits: tuple[LimitConfig, ...] = ()
    incident: IncidentConfig = IncidentConfig()
    notify: NotifyConfig = NotifyConfig()

    @property
    def retention(self) -> float:
        """How far back message counts are needed: the longest window."""
        return max([limit.window for limit in self.limits] + [self.incident.window])


@dataclass(frozen=True)
class QuarantineConfig:
    """Held outbound spam: the receiver Exim delivers it to, the store, how to release it."""

    #: the SMTP receiver for Exim's quarantine transport (EXIM_POLICY_QUARANTINE_HOSTS);
    #: empty = no receiver (the CLI still works on the store, e.g. after ``import``)
    listen: tuple[ListenAddress, ...] = field(
        default=(ListenAddress(host="127.0.0.1", port=11337),), metadata=_parse(_listen_list))
    #: the MTAs that may deliver into the quarantine (several MX hosts can share one)
    allowed_clients: tuple = field(
        default=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        metadata=_parse(_networks))
    #: messages/ (one file per message) and index.db (envelope, evidence, state, audit)
    path: str = "/var/lib/exim-policy/quarantine"
    #: ``quarantine purge`` (and the daemon, hourly) removes entries older than this
    retention: float = field(default=30 * 86400.0,
                             metadata=_parse(parse_duration, show=format_duration))
    #: larger messages get a 552 (Exim bounces them to the sender: keep this above
    #: EXIM_POLICY_MAX_SCAN_SIZE, a quarantined message was scanned)
    max_message_size: int = field(default=64 * 1024 * 1024, metadata=_parse(_positive_int))
    max_recipients: int = field(default=10000, metadata=_parse(_positive_int))
    #: below this much free disk space the receiver answers 452 (Exim keeps the message)
    min_free_bytes: int = field(default=256 * 1024 * 1024, metadata=_parse(_count))
    #: "exim": ``EXIM -odi -oi -f SENDER -- RCPTS`` (not scanned: no SMTP DATA ACL runs);
    #: "smtp:127.0.0.1:10025": an Exim port the bundled ACLs do not scan
    release_via: str = field(default="exim", metadata=_parse(_release_via))
    #: the Exim binary (and options such as -C) for release_via = "exim"
    exim_command: tuple[str, ...] = field(default=("/usr/sbin/exim",),
                                          metadata=_parse(_command))


@dataclass(frozen=True)
class SpamcConfig:
    """The SpamAssassin side: its ``User:`` is the name in Exim's ``spam = NAME``."""

    #: User: values that mean "not authenticated"; any other value is taken as the
    #: authenticated id (``spam = ${if def:authenticated_id{$authenticated_id}{nobody}}``)
    anonymous_users: tuple[str, ...] = ("nobody",)


@dataclass(frozen=True)
class PolicyConfig:
    #: "shadow": the shim decides and logs what it would answer ("would"), but answers
    #: Rspamd's verdict unchanged, and accounts only count (as accounts.mode = "shadow"),
    #: so a site can compare before it switches; scanner failures keep their [failure]
    #: outcome (there is no verdict to pass on)
    mode: str = field(default="enforce", metadata=_parse(_choice("enforce", "shadow")))


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP front's answers where its clients differ from Exim."""

    #: outbound spam to a client without a quarantine (Haraka, rspamc): "reject" (550) or
    #: "soft reject" (451: the sender's client keeps it and retries). rspamd_proxy is told
    #: to put it in the MTA's hold queue instead (milter quarantine).
    outbound_spam: str = field(default="reject",
                               metadata=_parse(_choice("reject", "soft reject")))


def _text(default: str):
    return field(default=default, metadata=_parse(_public_text))


@dataclass(frozen=True)
class TextsConfig:
    """The texts the SMTP client sees (the bundled ACL's 550/451, the HTTP front's
    ``smtp_message``). Nothing in them names a host, a port, a score, an internal
    address or a config key; the full reason is in the log and in ``$spam_report``.
    Rspamd's own SMTP message (a force_actions rule's, "Gtube pattern") is public by
    Rspamd's design and is used instead of ``spam``/``soft_reject`` when it gives one.
    Exim splits a reply text longer than about 75 characters (with its code) over several
    lines: the defaults stay below that."""

    #: inbound spam Rspamd rejects
    spam: str = _text("Message rejected as spam")
    #: inbound spam to a recipient that forwards to an external mailbox
    forwarding: str = _text("Message rejected as spam (the recipient forwards externally)")
    #: outbound spam, where the client sees it (the HTTP front's clients without a
    #: quarantine; the bundled Exim config quarantines it and answers 250)
    outbound: str = _text("Message rejected as suspected spam, please contact support")
    #: Rspamd's own soft reject (greylisting, its rate limits)
    soft_reject: str = _text("Please try again later")
    #: the scanner (or the account store) failed and failure.* = "tempfail"
    tempfail: str = _text("Message cannot be checked now, please try again later")
    #: an account over one of its limits (451)
    throttled: str = _text("Sending rate limit exceeded, please try again later")
    #: an account on hold or locked (where the client sees it, as for ``outbound``)
    held: str = _text("This account may not send mail now, please contact support")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = field(default="info", metadata=_parse(_log_level))
    #: "text" (one readable line per record) or "json" (one JSON object per line; a
    #: decision's fields as keys of their own)
    format: str = field(default="text", metadata=_parse(_choice("text", "json")))
    #: "stderr" (journald under systemd) or "syslog"
    target: str = field(default="stderr", metadata=_parse(_choice("stderr", "syslog")))
    #: with target = "syslog": the socket (a path, or "host:port" for UDP) and facility
    syslog_address: str = "/dev/log"
    syslog_facility: str = field(default="mail", metadata=_parse(_choice(
        "mail", "daemon", "user", "local0", "local1", "local2", "local3", "local4", "local5",
        "local6", "local7")))


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (``GET /metrics``, text format 0.0.4). Nothing is counted
    when it is off (no listen address and not on the HTTP front)."""

    #: listeners of its own (as server.listen); empty = none
    listen: tuple[ListenAddress, ...] = field(default=(), metadata=_parse(_listen_list))
    #: who may scrape them (TCP peers; a unix socket is guarded by server.unix_socket_mode)
    allowed_clients: tuple = field(
        default=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        metadata=_parse(_networks))
    #: also answer ``GET /metrics`` on the HTTP front (server.http_listen), to the
    #: clients server.allowed_clients lets in
    http_front: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.listen) or self.http_front


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    policy: PolicyConfig = PolicyConfig()
    rspamd: RspamdConfig = RspamdConfig()
    outbound: OutboundConfig = OutboundConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    failure: FailureConfig = FailureConfig()
    spamc: SpamcConfig = SpamcConfig()
    http: HttpConfig = HttpConfig()
    texts: TextsConfig = TextsConfig()
    logging: LoggingConfig = LoggingConfig()
    accounts: AccountsConfig = AccountsConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def accounts_shadow(self) -> bool:
        """Accounts only count and tell: their own shadow mode, or the whole policy's."""
        return self.accounts.mode == "shadow" or self.policy.mode == "shadow"


# ------------------------------------------------------------------------------ writing --
def toml_value(value: object) -> str:
    """One value as TOML: strings, numbers, booleans, lists, and the parsed forms of this
    module (listen addresses, networks, failure modes) as the text that reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, enum.Enum):
        return toml_value(value.value)
    if isinstance(value, (ListenAddress, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return toml_value(str(value))
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Config) -> str:
    """The whole configuration as TOML, every key: ``from_dict(tomllib.loads(...))`` of it
    gives ``config`` back (check-config prints it)."""
    lines: list[str] = []
    _write_table(config, "", None, lines)
    return "\n".join(lines).rstrip() + "\n"


def _write_table(table: object, path: str, header: str | None, lines: list[str]) -> None:
    """``header`` (``[path]`` or ``[[path]]``), the table's own keys, then its subtables
    and arrays of tables (TOML wants the keys of a table before any subtable)."""
    scalars, subtables, arrays = [], [], []
    for f in dataclasses.fields(table):  # type: ignore[arg-type]
        if f.metadata.get("derived"):
            continue
        value = getattr(table, f.name)
        key = _join(path, f.name)
        if _is_section(value):
            subtables.append((key, value))
        elif isinstance(value, tuple) and value and _is_section(value[0]):
            arrays.append((key, value))
        else:
            show = f.metadata.get("show")
            scalars.append(f"{f.name} = {toml_value(show(value) if show else value)}")
    if header is not None:
        lines += [header, *scalars, ""]
    for key, value in subtables:
        _write_table(value, key, f"[{key}]", lines)
    for key, items in arrays:
        for item in items:
            _write_table(item, key, f"[[{key}]]", lines)


def changed_keys(old: object, new: object, path: str = "") -> list[str]:
    """The dotted keys whose values differ between two configurations (a section's own
    keys, recursively; an array of tables counts as one key; a derived field, such as the
    relay networks read from ``relay_networks_file``, by its own name)."""
    changed = []
    for f in dataclasses.fields(old):  # type: ignore[arg-type]
        before, after = getattr(old, f.name), getattr(new, f.name)
        key = _join(path, f.name)
        if _is_section(before):
            changed += changed_keys(before, after, key)
        elif before != after:
            changed.append(key)
    return changed


def _is_section(value: object) -> bool:
    """A table of the file (a ListenAddress is a dataclass too, but a string there)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, ListenAddress)


# ------------------------------------------------------------------------------- loader --
def load(path: str | Path) -> Config:
    """Read and validate a TOML file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data)


def from_dict(data: dict) -> Config:
    """Validate ``data`` (a parsed TOML document); ConfigError names every problem."""
    errors: list[str] = []
    config = _build(Config, data, "", errors)
    server = config.server
    if server.max_message_size > server.max_bytes_in_flight:
        errors.append(f"server.max_bytes_in_flight: {server.max_bytes_in_flight} is below "
                      f"server.max_message_size ({server.max_message_size}): a message of "
                      "the largest allowed size could never be held")
    if server.workers > 1 and config.accounts.enabled and config.accounts.store == "memory":
        errors.append(f"server.workers: {server.workers} workers would each count accounts "
                      "on their own with accounts.store = \"memory\": use \"sqlite\" or "
                      "\"redis\", or workers = 1")
    for what, items in (("forwarding.sources", config.forwarding.sources),
                        ("accounts.limits", config.accounts.limits)):
        for i, item in enumerate(items):
            try:
                item.check()
            except ConfigError as exc:
                errors.append(f"{what}[{i}].{exc}")
    if len({limit.window for limit in config.accounts.limits}) < len(config.accounts.limits):
        errors.append("accounts.limits: two limits with the same window (merge them)")
    if config.outbound.relay_networks_file:
        try:
            config = dataclasses.replace(config, outbound=dataclasses.replace(
                config.outbound,
                file_networks=read_networks_file(config.outbound.relay_networks_file)))
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(*errors)
    return config


def read_networks_file(path: str) -> tuple:
    """Exim's rules for a file in a host list: one item per line, blank lines and lines
    starting with ``#`` skipped, `` #`` starts a comment. The shim reads only addresses
    and networks (Exim would also take host names and wildcards: they are errors here,
    so the two sides cannot disagree on what the list holds)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"outbound.relay_networks_file: cannot read {path}: "
                          f"{exc.strerror or exc}") from None
    nets, errors = [], []
    for number, line in enumerate(lines, 1):
        item = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not item or item.startswith("#"):
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            errors.append(f"outbound.relay_networks_file: {path} line {number}: {item!r} is "
                          "not an IP address or network")
    if errors:
        raise ConfigError(*errors)
    return tuple(nets)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


#: keys that have a new home (a config naming the old one gets told where)
_MOVED = {"forwarding.reject_message": "texts.forwarding",
          "accounts.throttle_message": "texts.throttled"}


def _build(cls, data: object, path: str, errors: list[str]):
    """``cls`` from ``data``; each problem is appended to ``errors`` and the field keeps
    its default, so one pass finds them all."""
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'}: expected a table")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for name in sorted(set(data) - set(fields)):
        key = _join(path, name)
        moved = _MOVED.get(key)
        errors.append(f"{key}: moved to {moved}" if moved else
                      f"{key}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for name, raw in data.items():
        if name not in fields:
            continue
        key = _join(path, name)
        parse = fields[name].metadata.get("parse")
        try:
            values[name] = parse(raw) if parse else _convert(hints[name], raw, key, errors)
        except ValueError as exc:
            errors.append(f"{key}: {exc}")
    return cls(**values)


def _convert(tp, raw: object, key: str, errors: list[str]):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, raw, key, errors)
    if isinstance(tp, type) and issubclass(tp, FailureMode):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"expected one of {', '.join(m.value for m in tp)}") from None
    if tp is bool:
        if not isinstance(raw, bool):
            raise ValueError("expected true or false")
        return raw
    if tp is str:
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(raw, list):
            raise ValueError("expected a list")
        return tuple(_convert(item_type, item, f"{key}[{i}]", errors)
                     for i, item in enumerate(raw))
    raise TypeError(f"{key}: unsupported config type {tp!r}")  # a bug in this module
