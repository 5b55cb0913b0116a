"""Prometheus metrics in-process: one count per message on every path (scanned, failed,
skipped, deferred) with its label values, scanner failure kinds, limits, refusals and
protocol errors, the forwarding map's gauges, accounts, notices, the quarantine, and
``GET /metrics`` over loopback (its own listener, and the HTTP front).

The real chain (Rspamd, the daemon as a process, spamc and rspamc) is in
tests/e2e/test_e2e_metrics.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exim_policy import notify
from exim_policy.config import from_dict
from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.forwarding.watch import MapWatcher
from exim_policy.metrics import CONTENT_TYPE, Metrics
from exim_policy.model import Request, ScanResult
from exim_policy.notify import Notice, Notifier
from exim_policy.protocol.mbox import exim_mbox_wrap
from exim_policy.protocol.rspamc import envelope as rspamc_envelope_of
from exim_policy.quarantine.evidence import Evidence
from exim_policy.quarantine.receiver import QuarantineReceiver
from exim_policy.quarantine.store import NewMessage, QuarantineStore
from exim_policy.scanner import CONNECT, TIMEOUT, ScannerError
from exim_policy.scanner.rspamd import RspamdScanner, parse_reply
from exim_policy.pipeline import PolicyService
from exim_policy.state.memory import MemoryStore
from exim_policy.state.tracker import AccountTracker
from exim_policy.transport.http import HttpServer
from exim_policy.transport.limits import Limits
from exim_policy.protocol import checkv2
from exim_policy.protocol.rspamc import RspamcCodec
from exim_policy.transport.spamd import CODECS, SpamdServer

T0 = 1_800_000_000.0


def handle(service: PolicyService, request: Request):
    """As the spamd listener answers a request: with the codec of its protocol."""
    return service.answer(CODECS[request.protocol], request)


# ----------------------------------------------------------------------- helpers --
def samples(metrics: Metrics) -> dict:
    """(sample name, sorted labels) -> value, parsed from the exposition text."""
    text = asyncio.run(metrics.scrape()).body.decode()
    return parsed(text)


def parsed(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def total(found: dict, name: str, **labels) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in found.items() if n == name and want <= set(lab))


class Scanner:
    """Answers ``action``, or raises ``fail`` (a ScannerError)."""

    def __init__(self) -> None:
        self.action = "no action"
        self.fail: ScannerError | None = None
        self.delay = 0.0

    async def scan(self, message, envelope, traffic):
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return ScanResult(self.action, 15.0 if self.action == "reject" else 1.0, 15.0)


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


def rspamc(rcpts=("bob@example.com",), user: str | None = None) -> Request:
    headers = [("From", "<a@example.org>"), ("IP", "192.0.2.10"), ("Queue-Id", "1abc-0-00")]
    headers += [("Rcpt", f"<{r}>") for r in rcpts]
    if user:
        headers.append(("User", user))
    return Request("rspamc", "CHECK", "1.3", tuple(headers), b"Subject: hi\n\nhello\n")


def spamc() -> Request:
    body = exim_mbox_wrap(b"Subject: hi\n\nhello\n", sender="a@example.org",
                          recipients=["bob@example.com"])
    return Request("spamc", "SYMBOLS", "1.5", (("User", "nobody"),), body)


def http() -> Request:
    return Request("http", "CHECK", "1.1", (("From", "a@example.org"),
                                            ("Rcpt", "bob@example.com")), b"hello\n")


def service_with_metrics(config_data: dict | None = None, accounts: bool = False):
    config = from_dict(config_data or {})
    scanner = Scanner()
    tracker = None
    if accounts:
        tracker = AccountTracker(config, MemoryStore(config.accounts), clock=Clock())
    service = PolicyService(config, scanner, ForwardingMap.parse("fwd@example.com\n").forwards,
                            tracker, clock=Clock())
    metrics = Metrics()
    metrics.instrument(config, service=service, accounts=tracker)
    return service, scanner, metrics


# ----------------------------------------------------------------- per message --
def test_each_path_counts_one_message_with_its_labels():
    service, scanner, metrics = service_with_metrics({
        "failure": {"forwarding": "defer"},
        "accounts": {"enabled": True, "store": "memory",
                     "limits": [{"window": "1m", "messages": 1}]}}, accounts=True)

    async def run():
        await handle(service, rspamc())                        # scanned: no action
        scanner.action = "add header"
        await handle(service, spamc())                         # scanned, SpamAssassin side
        await service.answer(checkv2.CODEC, http())                     # scanned, HTTP front
        scanner.fail = ScannerError("no reply", TIMEOUT)
        await handle(service, rspamc())                        # failed: inbound accepts
        scanner.fail = ScannerError("refused", CONNECT)
        assert await handle(service, rspamc(rcpts=("fwd@example.com",))) is None  # deferred
        scanner.fail, scanner.action = None, "no action"
        await handle(service, rspamc(user="alice"))            # an account's first: ok
        await handle(service, rspamc(user="alice"))            # over its limit: skipped
        await handle(service, Request("spamc", "PING", "1.5"))  # not a message

    asyncio.run(run())
    found = samples(metrics)
    m = "exim_policy_messages_total"
    assert value(found, m, protocol="rspamc", traffic="inbound", rspamd_action="no action",
                 action="no action") == 1
    assert value(found, m, protocol="spamc", traffic="inbound", rspamd_action="add header",
                 action="add header") == 1
    assert value(found, m, protocol="http", traffic="inbound", rspamd_action="add header",
                 action="add header") == 1
    assert value(found, m, protocol="rspamc", traffic="inbound", rspamd_action="FAILED",
                 action="no action") == 1
    assert value(found, m, protocol="rspamc", traffic="forwarding", rspamd_action="FAILED",
                 action="defer") == 1
    assert value(found, m, protocol="rspamc", traffic="outbound", rspamd_action="no action",
                 action="no action") == 1
    assert value(found, m, protocol="rspamc", traffic="outbound", rspamd_action="SKIPPED",
                 action="soft reject") == 1
    assert total(found, m) == 7  # once each, the PING not at all
    assert value(found, "exim_policy_answer_duration_seconds_count") == 7
    assert value(found, "exim_policy_scan_duration_seconds_count") == 6  # not the skipped
    assert value(found, "exim_policy_scanner_failures_total", kind="timeout") == 1
    assert value(found, "exim_policy_scanner_failures_total", kind="connect") == 1
    assert total(found, "exim_policy_scanner_failures_total") == 2
    assert value(found, "exim_policy_account_messages_total", status="ok") == 1
    assert value(found, "exim_policy_account_messages_total", status="throttled") == 1
    assert value(found, "exim_policy_scans_in_flight") == 0


def test_label_values_stay_within_their_sets():
    service, scanner, metrics = service_with_metrics()
    scanner.action = "my-custom-action"

    async def run():
        await handle(service, rspamc())
        weird = type("WeirdCodec", (RspamcCodec,), {"name": "weird"})()
        await service.answer(weird, Request("rspamc", "CHECK", "1.3", (), b"x"))

    asyncio.run(run())
    found = samples(metrics)
    assert value(found, "exim_policy_messages_total", protocol="rspamc", traffic="inbound",
                 rspamd_action="other", action="other") == 1
    assert value(found, "exim_policy_messages_total", protocol="other", traffic="inbound",
                 rspamd_action="other", action="other") == 1
    assert not any("my-custom-action" in str(key) for key in found)


def test_nothing_is_counted_without_metrics():
    config = from_dict({})
    service = PolicyService(config, Scanner(), ForwardingMap().forwards)
    assert service.metrics is None
    asyncio.run(handle(service, rspamc()))  # (no error: the hooks are skipped)


def test_no_free_scan_slot_is_a_wait_a_timeout_and_a_no_slot_failure():
    service, scanner, metrics = service_with_metrics(
        {"server": {"max_scans": 1, "queue_timeout": 0.05}})
    scanner.delay = 0.3

    async def run():
        await asyncio.gather(handle(service, rspamc()), handle(service, rspamc()))

    asyncio.run(run())
    found = samples(metrics)
    assert value(found, "exim_policy_limit_waits_total", limit="max_scans") == 1
    assert value(found, "exim_policy_limit_timeouts_total", limit="max_scans") == 1
    assert value(found, "exim_policy_scanner_failures_total", kind="no_slot") == 1
    assert value(found, "exim_policy_scan_duration_seconds_count") == 1  # Rspamd asked once


# -------------------------------------------------------------- scanner kinds --
@pytest.mark.parametrize("reply, kind", [
    (b"HTTP/1.1 500 Internal\r\nContent-Length: 15\r\n\r\n{\"error\":\"x\"}  ", "http_status"),
    (b"HTTP/1.1 502 Bad\r\n\r\n<html>", "http_status"),
    (b"HTTP/1.1 503 Busy\r\n\r\n{}", "http_status"),
    (b"HTTP/1.1 200 OK\r\n\r\nnot json", "bad_reply"),
    (b"HTTP/1.1 200 OK\r\n\r\n{\"score\": 1}", "bad_reply"),
    (b"SMTP 220 hello\r\n\r\n", "bad_reply"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}", "bad_reply"),
    (b"HTTP/1.1 200 OK\r\n\r\n{\"error\": \"task timeout\"}", "rspamd_error"),
])
def test_a_bad_reply_names_its_kind(reply, kind):
    with pytest.raises(ScannerError) as caught:
        parse_reply(reply)
    assert caught.value.kind == kind


def test_unreachable_and_silent_rspamd_name_their_kind():
    async def run():
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        closed_port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        kinds = []
        for port, timeout in ((closed_port, 2.0), (silent.sockets[0].getsockname()[1], 0.1)):
            scanner = RspamdScanner(f"http://127.0.0.1:{port}", timeout)
            try:
                await scanner.scan(b"x", rspamc_envelope_of(rspamc()))
            except ScannerError as exc:
                kinds.append(exc.kind)
        silent.close()
        return kinds

    assert asyncio.run(run()) == [CONNECT, TIMEOUT]



# ------------------------------------------------------- transport and endpoint --
async def _get(port: int, path: str) -> tuple[int, str, bytes]:
    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read()
    return await asyncio.to_thread(fetch)


async def _exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_the_metrics_listener_and_the_http_front_serve_the_exposition():
    config = from_dict({"server": {"listen": ["127.0.0.1:0"], "http_listen": ["127.0.0.1:0"]},
                        "metrics": {"listen": ["127.0.0.1:0"], "http_front": True}})
    service = PolicyService(config, Scanner(), ForwardingMap().forwards)
    limits = Limits(config.server.max_connections, config.server.max_bytes_in_flight)
    spamd = SpamdServer(config.server, service.answer, limits)
    front = HttpServer(config.server, service.answer, limits)
    metrics = Metrics()
    metrics.instrument(config, service=service, listeners=(spamd, front), limits=limits)

    async def run():
        await spamd.start()
        await front.start()
        own = await metrics.serve(config)
        ports = [s.sockets[0].getsockname()[1] for s in (spamd, front, own)]
        try:
            await _exchange(ports[0], b"CHECK RSPAMC/1.3\r\nContent-length: 3\r\n\r\nhi\n")
            await _exchange(ports[0], b"garbage\r\n\r\n")               # a protocol error
            at_front = await _get(ports[1], "/metrics")
            missing = await _get(ports[1], "/nope")                     # and another one
            at_own = await _get(ports[2], "/metrics")
            no_scans_there = await _get(ports[2], "/checkv2")
        finally:
            await own.stop(1.0)
            await front.stop(1.0)
            await spamd.stop(1.0)
        return at_front, missing, at_own, no_scans_there

    at_front, missing, at_own, no_scans_there = asyncio.run(run())
    for status, content_type, body in (at_front, at_own):
        assert status == 200 and content_type == CONTENT_TYPE
        assert "version=0.0.4" in content_type
        found = parsed(body.decode())
        assert value(found, "exim_policy_messages_total", protocol="rspamc",
                     traffic="inbound", rspamd_action="no action", action="no action") == 1
        assert value(found, "exim_policy_build_info", version="0.1.0") == 1
        assert ("process_cpu_seconds_total", ()) in found
    assert value(parsed(at_front[2].decode()), "exim_policy_requests_in_flight") == 1  # itself
    assert value(parsed(at_own[2].decode()), "exim_policy_protocol_errors_total",
                 listener="spamd") == 1
    assert value(parsed(at_own[2].decode()), "exim_policy_protocol_errors_total",
                 listener="http") == 1
    assert missing[0] == 404 and no_scans_there[0] == 404
    assert b"this server answers /metrics" in no_scans_there[2]


def test_without_http_front_the_front_has_no_metrics_route():
    config = from_dict({"server": {"http_listen": ["127.0.0.1:0"]},
                        "metrics": {"listen": ["127.0.0.1:0"]}})
    service = PolicyService(config, Scanner(), ForwardingMap().forwards)
    front = HttpServer(config.server, service.answer)
    Metrics().instrument(config, service=service, listeners=(front,))

    async def run():
        await front.start()
        try:
            return await _get(front.sockets[0].getsockname()[1], "/metrics")
        finally:
            await front.stop(1.0)

    status, _, body = asyncio.run(run())
    assert status == 404 and b"answers /checkv2 and /ping" in body


def test_refused_and_shed_connections_are_counted_per_listener():
    config = from_dict({"server": {"listen": ["127.0.0.1:0"], "max_connections": 1,
                                   "allowed_clients": ["127.0.0.1/32"]}})
    denied = from_dict({"server": {"listen": ["127.0.0.1:0"], "allowed_clients": ["10.0.0.0/8"]}})
    service = PolicyService(config, Scanner(), ForwardingMap().forwards)
    one = SpamdServer(config.server, service.answer)
    none = SpamdServer(denied.server, service.answer)
    metrics = Metrics()
    metrics.instrument(config, service=service, listeners=(one, none))

    async def run():
        await one.start()
        await none.start()
        try:
            port = one.sockets[0].getsockname()[1]
            _, slow = await asyncio.open_connection("127.0.0.1", port)
            slow.write(b"CHECK")  # still sending: shed for the next one
            await asyncio.sleep(0.1)
            await _exchange(port, b"PING SPAMC/1.5\r\n\r\n")
            await _exchange(none.sockets[0].getsockname()[1], b"PING SPAMC/1.5\r\n\r\n")
            slow.close()
        finally:
            await one.stop(1.0)
            await none.stop(1.0)

    asyncio.run(run())
    found = samples(metrics)
    assert value(found, "exim_policy_connections_shed_total", listener="spamd") == 1
    assert value(found, "exim_policy_connections_refused_total", listener="spamd",
                 reason="allowed_clients") == 1
    assert value(found, "exim_policy_connections_refused_total", listener="spamd",
                 reason="max_connections") == 0


# ----------------------------------------------------------------- the map --
def test_forwarding_map_gauges_and_reload_failures(tmp_path):
    path = tmp_path / "forwardings.txt"
    path.write_text("a@example.com\nb@example.com\n@fwd.example\n")
    watcher = MapWatcher(str(path), 1.0)
    metrics = Metrics()
    metrics.instrument(from_dict({}), watcher=watcher)
    assert value(samples(metrics), "exim_policy_forwarding_map_loaded_timestamp_seconds") == 0
    before = time.time()
    watcher.load_now()
    found = samples(metrics)
    assert value(found, "exim_policy_forwarding_map_entries") == 3
    loaded = value(found, "exim_policy_forwarding_map_loaded_timestamp_seconds")
    assert before <= loaded <= time.time()

    os.unlink(path)
    watcher.load_now()                      # missing: the map stays
    os.mkdir(path)                          # a directory: unreadable, twice
    watcher.load_now()
    watcher.load_now()
    found = samples(metrics)
    assert value(found, "exim_policy_forwarding_map_entries") == 3
    assert value(found, "exim_policy_forwarding_map_loaded_timestamp_seconds") == loaded
    assert value(found, "exim_policy_forwarding_map_reload_failures_total",
                 reason="missing") == 1
    assert value(found, "exim_policy_forwarding_map_reload_failures_total",
                 reason="unreadable") == 2


# ---------------------------------------------------------------- accounts --
def test_incidents_and_account_statuses():
    config_data = {"accounts": {"enabled": True, "store": "memory",
                                "incident": {"window": "1h", "spam_verdicts": 2,
                                             "on_open": "hold", "lock_after": 1}}}
    service, scanner, metrics = service_with_metrics(config_data, accounts=True)
    scanner.action = "reject"

    async def run():
        for _ in range(4):  # spam, spam (opens: held), spam (locks), spam (locked)
            await handle(service, rspamc(user="alice", rcpts=("x@example.net",)))

    asyncio.run(run())
    found = samples(metrics)
    assert value(found, "exim_policy_incidents_total", transition="opened", state="held",
                 shadow="false") == 1
    assert value(found, "exim_policy_incidents_total", transition="locked", state="locked",
                 shadow="false") == 1
    assert total(found, "exim_policy_incidents_total") == 2
    assert value(found, "exim_policy_account_messages_total", status="ok") == 2
    assert value(found, "exim_policy_account_messages_total", status="held") == 1
    assert value(found, "exim_policy_account_messages_total", status="locked") == 1


def test_store_errors_are_counted():
    service, _, metrics = service_with_metrics(
        {"accounts": {"enabled": True, "store": "memory"}}, accounts=True)

    async def broken(*args):
        from exim_policy.state.base import StoreError
        raise StoreError("down")

    service.accounts.store.state = broken
    asyncio.run(handle(service, rspamc(user="alice")))
    assert value(samples(metrics), "exim_policy_account_store_errors_total") == 1


def test_notices_are_counted_by_channel_and_result(monkeypatch):
    monkeypatch.setattr(notify, "FIRST_RETRY", 0.05)
    dead = _closed_port()
    notifier = Notifier(from_dict({"accounts": {"notify": {
        "webhook_url": f"http://127.0.0.1:{dead}/hook", "attempts": 2,
        "timeout": 1.0}}}).accounts.notify)
    tracker = AccountTracker(from_dict({}), MemoryStore(from_dict({}).accounts), notifier)
    metrics = Metrics()
    metrics.instrument(from_dict({}), accounts=tracker)
    notifier.send(Notice(account="alice", incident=1, transition="opened", state="held",
                         shadow=False, reason="test", opened=T0, at=T0, evidence={}))
    deadline = time.monotonic() + 10
    while notifier.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    notifier.close()
    found = samples(metrics)
    assert value(found, "exim_policy_notifications_total", channel="webhook",
                 result="retried") == 1
    assert value(found, "exim_policy_notifications_total", channel="webhook",
                 result="failed") == 1
    assert value(found, "exim_policy_notifications_total", channel="webhook",
                 result="sent") == 0


def _closed_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -------------------------------------------------------------- quarantine --
def test_quarantine_counts_by_state(tmp_path):
    config = from_dict({"quarantine": {"path": str(tmp_path / "q")}})
    store = QuarantineStore(config.quarantine.path)
    body = b"Subject: s\r\n\r\nspam\r\n"
    for i in range(2):
        tmp, fh = store.temp_file()
        with fh:
            fh.write(body + str(i).encode())
        store.commit(tmp, NewMessage(sender="a@lab.test", recipients=("x@example.com",),
                                     evidence=Evidence(account="alice"), size=len(body) + 1,
                                     sha256=hashlib.sha256(body + str(i).encode()).hexdigest()))
    receiver = QuarantineReceiver(config, store)
    metrics = Metrics()
    metrics.instrument(config, quarantine=receiver)
    receiver.count("held")

    async def run():
        return parsed((await metrics.scrape()).body.decode())

    try:
        found = asyncio.run(run())
    finally:
        receiver.thread.stop()
        store.close()
    assert value(found, "exim_policy_quarantine_messages", state="held") == 2
    assert value(found, "exim_policy_quarantine_messages", state="released") == 0
    assert value(found, "exim_policy_quarantine_received_total", result="held") == 1


# ------------------------------------------------------------------- misc --
def test_config_reloads_and_several_registries_in_one_process():
    first, second = Metrics(), Metrics()
    first.config_reloaded(True)
    second.config_reloaded(False)
    assert value(samples(first), "exim_policy_config_reloads_total", result="ok") == 1
    assert value(samples(second), "exim_policy_config_reloads_total", result="ok") == 0
    assert value(samples(second), "exim_policy_config_reloads_total", result="failed") == 1


def test_metrics_config_defaults_and_errors():
    config = from_dict({})
    assert config.metrics.listen == () and not config.metrics.enabled
    assert Metrics.for_config(config) is None
    assert from_dict({"metrics": {"http_front": True}}).metrics.enabled
    with pytest.raises(Exception) as caught:
        from_dict({"metrics": {"listen": ["example.com:9339"], "allowed_clients": ["x"]}})
    assert "metrics.listen" in str(caught.value) and "metrics.allowed_clients" in str(caught.value)

