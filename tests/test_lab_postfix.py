"""The Postfix lab: a real Postfix 3.7 (unpacked Debian package) with a proxy-only Rspamd as milter.

Two pipelines run side by side, each ``PostfixLab -> RspamdProxyLab (milter mode) -> upstream``:

- *real*: the upstream is the session Rspamd's normal worker (no shim yet), so these tests
  pin what contrib/postfix/ does with a real /checkv2 scanner: GTUBE is refused with 554 at
  the end of DATA (from outside and authenticated alike), ham is delivered to the sink;
- *fake*: the upstream is ``Upstream`` below, a socket server that records the exact request
  bytes and answers a canned JSON reply, so a test can choose the verdict: the hold-queue
  path (``{"action": "reject", "milter": {"reject": "quarantine"}}``), the SMTP codes of the
  other actions, and the request captures in tests/golden/http/proxy-postfix-*.raw
  (rewritten with ``EXIM_POLICY_WRITE_GOLDEN=1``; otherwise a live capture is compared).

Postfix comes from ``contrib/setup-postfix.sh``; when it is missing the fixtures *fail*.
"""
from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from exim_policy.lab import LabError, LabUnavailable, NxDns, RspamdLab, SmtpSink, messages
from exim_policy.lab.contrib import read_contrib
from exim_policy.lab.ports import LOOPBACK, tcp_accepts
from exim_policy.lab.postfix import (HOSTNAME, PostfixLab, QueuedMessage, check_prerequisites,
                                     render_milter_lines, render_submission)
from exim_policy.lab.process import group_members
from exim_policy.lab.rspamd import RspamdProxyLab, render_worker_proxy

pytestmark = pytest.mark.real

CLIENT_HELO = "client.example.net"
LOCAL_RCPT = "bob@example.com"
EXTERNAL_RCPT = "carol@example.net"
OUTSIDE_SENDER = "dave@example.org"
USER, PASSWORD = "alice@example.com", "secret"
GOLDEN = Path(__file__).resolve().parent / "golden" / "http"
GOLDEN_AUTH = GOLDEN / "proxy-postfix-auth-2rcpt.raw"
GOLDEN_INBOUND = GOLDEN / "proxy-postfix-inbound-1rcpt.raw"
NO_ACTION = {"action": "no action"}
QUARANTINE = {"action": "reject", "milter": {"reject": "quarantine"}}


# ------------------------------------------------------------------- fake upstream --
class Upstream:
    """A /checkv2 HTTP server on 127.0.0.1 that keeps every request's bytes, as received.

    One request per connection (rspamd_proxy sends ``Connection: close``); the reply is
    ``reply`` as JSON (or ``reply`` itself if it is bytes) with Content-Length.
    """

    def __init__(self) -> None:
        self.reply: dict | bytes = NO_ACTION
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server((LOOPBACK, 0))
        self.host, self.port = LOOPBACK, self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="fake-upstream", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                raw += chunk
            head = raw.split(b"\r\n\r\n", 1)[0]
            match = re.search(rb"^content-length: *(\d+)\r?$", head, re.IGNORECASE | re.MULTILINE)
            total = len(head) + 4 + (int(match.group(1)) if match else 0)
            while len(raw) < total:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                raw += chunk
            with self._lock:
                self.requests.append(raw)
                reply = self.reply
            body = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    def reset(self, reply: dict | bytes = NO_ACTION) -> None:
        with self._lock:
            self.reply = reply
            self.requests.clear()

    def close(self) -> None:
        self._sock.close()


# ------------------------------------------------------------------------ fixtures --
def _start(lab: RspamdProxyLab | PostfixLab, what: str) -> None:
    problem = None
    try:
        lab.start()
    except LabUnavailable as exc:
        problem = f"{what} is needed for this test: {exc}"
    except LabError as exc:
        lab.stop()
        problem = f"cannot start the lab's {what}: {exc}"
    if problem:  # outside the except: no "during handling" traceback noise
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="module")
def proxy(lab_dir: Path, nxdns: NxDns, rspamd: RspamdLab) -> Iterator[RspamdProxyLab]:
    """Proxy-only Rspamd whose upstream is the session Rspamd's normal worker."""
    lab = RspamdProxyLab(lab_dir, dns_port=nxdns.port, upstream=f"{rspamd.host}:{rspamd.port}")
    _start(lab, "rspamd_proxy")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def postfix(lab_dir: Path, proxy: RspamdProxyLab, sink: SmtpSink) -> Iterator[PostfixLab]:
    lab = PostfixLab(lab_dir / "postfix-real", milter=proxy.milter_address,
                     relay_host=sink.host, relay_port=sink.port, users={USER: PASSWORD})
    _start(lab, "Postfix")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fake_proxy(lab_dir: Path, nxdns: NxDns, upstream_server: Upstream) -> Iterator[RspamdProxyLab]:
    lab = RspamdProxyLab(lab_dir, dns_port=nxdns.port, upstream=upstream_server.address,
                         subdir="rspamd-proxy-fake")
    _start(lab, "rspamd_proxy")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def fake_postfix(lab_dir: Path, fake_proxy: RspamdProxyLab,
                 sink: SmtpSink) -> Iterator[PostfixLab]:
    lab = PostfixLab(lab_dir / "postfix-fake", milter=fake_proxy.milter_address,
                     relay_host=sink.host, relay_port=sink.port, users={USER: PASSWORD})
    _start(lab, "Postfix")
    yield lab
    lab.stop()


@pytest.fixture
def upstream(upstream_server: Upstream, fake_postfix: PostfixLab) -> Iterator[Upstream]:
    """The fake upstream, answering "no action" and with no requests recorded yet."""
    upstream_server.reset()
    yield upstream_server
    fake_postfix.delete("ALL", "hold")


# ------------------------------------------------------------------------- helpers --
def send(lab: PostfixLab, sender: str, rcpts: list[str], message: bytes, *,
         login: bool = False, submission: bool = False) -> tuple[int, bytes]:
    """One SMTP transaction; the reply to the end of DATA (smtplib does not raise on it)."""
    port = lab.submission_port if submission else lab.port
    with smtplib.SMTP(lab.host, port, local_hostname=CLIENT_HELO, timeout=60) as smtp:
        smtp.ehlo()
        if login:
            smtp.login(USER, PASSWORD)  # AUTH PLAIN, offered in plaintext (no TLS in the lab)
        code, reply = smtp.mail(sender)
        assert code == 250, reply
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        return smtp.data(message)


def in_sink(sink: SmtpSink, message_id: str) -> list:
    return [m for m in sink.messages if message_id.encode() in m.data]


def split_request(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    start, *lines = head.decode("latin-1").split("\r\n")
    return start, [tuple(part.strip() for part in line.split(":", 1)) for line in lines], body


# --------------------------------------------------------------- the real Rspamd --
def test_inbound_gtube_is_refused_at_data(postfix: PostfixLab, smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    code, reply = send(postfix, OUTSIDE_SENDER, [LOCAL_RCPT],
                       messages.gtube(LOCAL_RCPT, OUTSIDE_SENDER, mid))
    assert (code, reply) == (554, b"5.7.1 Gtube pattern")
    assert "milter-reject: END-OF-MESSAGE" in postfix.log_text()
    assert not in_sink(smtp_sink, mid)


def test_inbound_ham_is_delivered(postfix: PostfixLab, smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id()
    code, reply = send(postfix, OUTSIDE_SENDER, [LOCAL_RCPT],
                       messages.ham(LOCAL_RCPT, OUTSIDE_SENDER, mid))
    assert code == 250, reply
    smtp_sink.wait_for(1, timeout=15)
    [got] = in_sink(smtp_sink, mid)
    assert (got.mail_from, got.rcpt_tos) == (OUTSIDE_SENDER, (LOCAL_RCPT,))
    assert f"by {HOSTNAME} (Postfix)".encode() in got.data
    assert b"X-Spam" not in got.data


@pytest.mark.parametrize("submission", [False, True], ids=["smtp", "submission"])
def test_authenticated_gtube_is_refused(postfix: PostfixLab, smtp_sink: SmtpSink,
                                        submission: bool) -> None:
    """A plain reject from Rspamd is a 554 for authenticated senders too (the shim will
    answer quarantine instead, see test_quarantine_verdict_goes_to_the_hold_queue)."""
    mid = messages.new_message_id("example.com")
    code, reply = send(postfix, USER, [EXTERNAL_RCPT], messages.gtube(EXTERNAL_RCPT, USER, mid),
                       login=True, submission=submission)
    assert (code, reply) == (554, b"5.7.1 Gtube pattern")
    assert not in_sink(smtp_sink, mid)


def test_authenticated_ham_is_relayed(postfix: PostfixLab, smtp_sink: SmtpSink) -> None:
    mid = messages.new_message_id("example.com")
    code, reply = send(postfix, USER, [EXTERNAL_RCPT], messages.ham(EXTERNAL_RCPT, USER, mid),
                       login=True, submission=True)
    assert code == 250, reply
    smtp_sink.wait_for(1, timeout=15)
    [got] = in_sink(smtp_sink, mid)
    assert (got.mail_from, got.rcpt_tos) == (USER, (EXTERNAL_RCPT,))
    assert b"with ESMTPA" in got.data


def test_relaying_needs_auth(postfix: PostfixLab) -> None:
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname=CLIENT_HELO, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail(OUTSIDE_SENDER)[0] == 250
        code, reply = smtp.rcpt(EXTERNAL_RCPT)
    assert code == 554 and b"Relay access denied" in reply, reply


def test_wrong_password_is_refused(postfix: PostfixLab) -> None:
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname=CLIENT_HELO, timeout=30) as smtp:
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            smtp.login(USER, "wrong")
    assert caught.value.smtp_code == 535


# -------------------------------------------------------------- the fake upstream --
def test_quarantine_verdict_goes_to_the_hold_queue(fake_postfix: PostfixLab, upstream: Upstream,
                                                   smtp_sink: SmtpSink) -> None:
    upstream.reset(QUARANTINE)
    mid = messages.new_message_id("example.com")
    code, reply = send(fake_postfix, USER, [LOCAL_RCPT, EXTERNAL_RCPT],
                       messages.gtube(EXTERNAL_RCPT, USER, mid), login=True, submission=True)
    assert code == 250, reply  # the client is told it was accepted
    [held] = fake_postfix.wait_hold(1)
    assert isinstance(held, QueuedMessage)
    assert (held.sender, sorted(held.recipients)) == (USER, [LOCAL_RCPT, EXTERNAL_RCPT])
    assert mid.encode() in fake_postfix.message(held.queue_id)
    assert re.search(rf"{held.queue_id}: milter-hold: END-OF-MESSAGE .*milter triggers HOLD action",
                     fake_postfix.log_text())
    assert len(upstream.requests) == 1
    fake_postfix.flush()
    assert not in_sink(smtp_sink, mid)  # held mail is not delivered ...
    fake_postfix.release(held.queue_id)  # ... until released, to the original recipients
    smtp_sink.wait_for(1, timeout=15)
    [got] = in_sink(smtp_sink, mid)
    assert (got.mail_from, sorted(got.rcpt_tos)) == (USER, [LOCAL_RCPT, EXTERNAL_RCPT])
    assert fake_postfix.hold_queue() == []
    assert len(upstream.requests) == 1  # a release is not scanned again


@pytest.mark.parametrize("reply, code, text", [
    ({"action": "reject"}, 554, b"5.7.1 Spam message rejected"),
    ({"action": "reject", "messages": {"smtp_message": "Go away"}}, 554, b"5.7.1 Go away"),
    ({"action": "soft reject"}, 451, b"4.7.1 Try again later"),
    ({"action": "no action"}, 250, None),
    ({"action": "add header"}, 250, None),
    # not a registered action / no action at all / not JSON: TEMPFAIL
    ({"action": "quarantine"}, 451, None),
    ({"score": 1.0}, 451, None),
    (b"not json", 451, None),
], ids=["reject", "reject-message", "soft-reject", "no-action", "add-header",
        "unregistered-action", "no-action-key", "not-json"])
def test_upstream_verdict_to_smtp_reply(fake_postfix: PostfixLab, upstream: Upstream,
                                        smtp_sink: SmtpSink, reply: dict | bytes, code: int,
                                        text: bytes | None) -> None:
    upstream.reset(reply)
    mid = messages.new_message_id()
    got_code, got_text = send(fake_postfix, OUTSIDE_SENDER, [LOCAL_RCPT],
                              messages.ham(LOCAL_RCPT, OUTSIDE_SENDER, mid))
    assert got_code == code, got_text
    if text is not None:
        assert got_text == text
    if code == 250:
        [got] = smtp_sink.wait_for(1, timeout=15)
        assert mid.encode() in got.data
        assert (b"X-Spam: Yes" in got.data) == (reply.get("action") == "add header")


def _capture(lab: PostfixLab, upstream: Upstream, *, auth: bool) -> bytes:
    upstream.reset(NO_ACTION)
    if auth:
        rcpts, sender = [LOCAL_RCPT, EXTERNAL_RCPT], USER
        message = messages.ham(EXTERNAL_RCPT, USER, messages.new_message_id("example.com"))
    else:
        rcpts, sender = [LOCAL_RCPT], OUTSIDE_SENDER
        message = messages.ham(LOCAL_RCPT, OUTSIDE_SENDER, messages.new_message_id())
    code, reply = send(lab, sender, rcpts, message, login=auth, submission=auth)
    assert code == 250, reply
    [raw] = upstream.requests
    return raw


#: headers whose values are the same in every capture (the others carry ports, ids, dates)
_STABLE = ("Connection", "User", "MTA-Name", "User-Agent", "Flags", "Helo", "Hostname", "From",
           "Rcpt", "Mailer")


@pytest.mark.parametrize("auth, golden", [(True, GOLDEN_AUTH), (False, GOLDEN_INBOUND)],
                         ids=["auth-2rcpt", "inbound-1rcpt"])
def test_proxy_request_matches_golden(fake_postfix: PostfixLab, upstream: Upstream,
                                      auth: bool, golden: Path) -> None:
    raw = _capture(fake_postfix, upstream, auth=auth)
    if os.environ.get("EXIM_POLICY_WRITE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(raw)
    start, headers, body = split_request(raw)
    g_start, g_headers, g_body = split_request(golden.read_bytes())
    assert start == g_start == "GET /checkv2 HTTP/1.1"
    assert [name for name, _ in headers] == [name for name, _ in g_headers]
    assert ([(n, v) for n, v in headers if n in _STABLE]
            == [(n, v) for n, v in g_headers if n in _STABLE])
    assert int(dict(headers)["Content-Length"]) == len(body)
    # the message as the client sent it: CRLF, dot-unstuffed, and *without* the Received:
    # header Postfix adds (milters do not see it)
    assert body.startswith(b"Date: ") and b"Received:" not in body
    assert not body.endswith(b"\r\n.\r\n")
    assert dict(headers)["IP"].startswith("127.0.0.1:")  # with the client's port
    queue_id = dict(headers)["Queue-ID"]
    assert re.search(rf"{queue_id}: client=unknown\[127\.0\.0\.1\]", fake_postfix.log_text())


def test_proxy_request_headers(fake_postfix: PostfixLab, upstream: Upstream) -> None:
    """What the HTTP front can rely on behind Postfix (see tests/golden/http/)."""
    _, headers, _ = split_request(_capture(fake_postfix, upstream, auth=True))
    auth = dict(headers)
    assert auth["User"] == USER
    assert auth["MTA-Name"] == "ORIGINATING"  # submission's milter_macro_daemon_name
    assert [v for n, v in headers if n == "Rcpt"] == [f"<{LOCAL_RCPT}>", f"<{EXTERNAL_RCPT}>"]
    assert auth["From"] == f"<{USER}>"
    assert auth["Flags"] == "milter,body_block"
    _, headers, _ = split_request(_capture(fake_postfix, upstream, auth=False))
    inbound = dict(headers)
    assert "User" not in inbound
    assert inbound["MTA-Name"] == HOSTNAME  # $myhostname on port 25
    assert inbound["Helo"] == CLIENT_HELO


# ------------------------------------------------------- one source of truth: contrib --
def test_lab_runs_the_contrib_files(postfix: PostfixLab, proxy: RspamdProxyLab) -> None:
    main_cf = (postfix.etc_dir / "main.cf").read_text()
    contrib_main = read_contrib("postfix/main.cf")
    assert render_milter_lines(contrib_main, proxy.milter_address) in main_cf
    assert postfix.postconf("-h", "smtpd_milters").strip() == proxy.milter_address
    assert postfix.postconf("-h", "milter_default_action").strip() == "tempfail"
    master_cf = (postfix.etc_dir / "master.cf").read_text()
    assert "-o milter_macro_daemon_name=ORIGINATING" in master_cf
    worker = (proxy.etc_dir / "override.d" / "worker-proxy.inc").read_text()
    assert worker == render_worker_proxy(read_contrib("postfix/worker-proxy.inc"),
                                         bind=f"127.0.0.1:{proxy.proxy_port}",
                                         upstream=proxy.upstream)
    assert "self_scan" not in re.sub(r"#.*", "", worker)


def test_contrib_files_hold_the_production_addresses() -> None:
    assert "smtpd_milters = inet:127.0.0.1:11332" in read_contrib("postfix/main.cf")
    worker = read_contrib("postfix/worker-proxy.inc")
    assert 'bind_socket = "127.0.0.1:11332";' in worker
    assert 'hosts = "127.0.0.1:11338";' in worker
    assert re.search(r"^milter = yes;$", worker, re.MULTILINE)


def test_render_refuses_a_template_without_the_setting() -> None:
    with pytest.raises(LabError, match="hosts"):
        render_worker_proxy('bind_socket = "x";\n', bind="a", upstream="b")
    with pytest.raises(LabError, match="smtpd_milters"):
        render_milter_lines("# smtpd_milters = inet:x:1\n", "inet:127.0.0.1:1")
    with pytest.raises(LabError, match="service line"):
        render_submission("smtp inet n - y - - smtpd\n", "127.0.0.1:1")


# -------------------------------------------------------------------- lifecycle --
def test_missing_postfix_names_the_setup_script(tmp_path: Path) -> None:
    with pytest.raises(LabUnavailable, match=r"contrib/setup-postfix\.sh"):
        check_prerequisites(tmp_path / "nothing-unpacked")


def test_start_stop_without_milter_leaves_nothing(lab_dir: Path, sink: SmtpSink) -> None:
    lab = PostfixLab(lab_dir / "postfix-lifecycle", milter=None, relay_port=sink.port)
    _start(lab, "Postfix")
    assert "smtpd_milters" not in (lab.etc_dir / "main.cf").read_text()
    assert lab.process is not None and lab.process.pid is not None
    pgid = lab.process.pid
    assert len(group_members(pgid)) > 1  # master plus qmgr, pickup, ...
    lab.stop()
    assert not lab.alive()
    assert group_members(pgid) == []
    assert not tcp_accepts(lab.host, lab.port) and not tcp_accepts(lab.host, lab.submission_port)
