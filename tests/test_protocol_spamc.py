"""SPAMC codec (SpamAssassin protocol): envelope from User:/mbox/Received, golden reply bytes,
Exim 4.96's parse of them (modelled), and the real spamc client against them (live)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exim_policy.model import (ADD_HEADER, GREYLIST, NO_ACTION, REJECT, SOFT_REJECT, Decision,
                               Envelope, ProtocolError, Request, ScanFailure, ScanResult, Symbol,
                               Traffic)
from exim_policy.protocol import spamc
from exim_policy.protocol.parser import NEED_DATA, RequestParser




from golden import captures as cap  # noqa: E402 (tests/ is on sys.path, see conftest)
from golden import exim_reply_parse as exim  # noqa: E402


def parsed(data: bytes, eof: bool = True) -> Request:
    parser = RequestParser()
    parser.feed(data)
    if eof:
        parser.feed_eof()
    event = parser.next_event()
    assert isinstance(event, Request), event
    return event


def sa_request(body: bytes, user: bytes | None = b"nobody", command: bytes = b"REPORT",
               version: bytes = b"1.2") -> Request:
    head = command + b" SPAMC/" + version + b"\r\n"
    if user is not None:
        head += b"User: " + user + b"\r\n"
    return parsed(head + b"Content-length: %d\r\n\r\n" % len(body) + body)


MBOX_HEAD = b"From MAILER-DAEMON Sun Nov 22 05:56:46 2026\nX-Envelope-From: <s@example.org>\nX-Envelope-To: r@example.com\n"


# ------------------------------------------------------------------------------ envelope --
def test_envelope_of_exim_capture():
    env = spamc.envelope(parsed(cap.EXIM_SA))
    assert env == Envelope(sender="sender@example.org",
                           recipients=("rcpt1@example.com", "Rcpt2@Example.COM"),
                           ip="192.0.2.10", helo="helo.client.example",
                           hostname="client.example.net", user=None,
                           queue_id="1xV0ZC-0003TR-0m")


def test_authenticated_per_received_but_anonymous_user():
    env = spamc.envelope(parsed(cap.EXIM_SA_0003))
    assert env == Envelope(sender="tester@stack.test", recipients=("carol@example.com",),
                           ip="127.0.0.1", helo="client.test", hostname=None, user="",
                           queue_id="1xV0ad-0003sE-2a")


def test_user_header_names_the_user():
    env = spamc.envelope(sa_request(cap.EXIM_MBOX_0003, user=b"tester"))
    assert env.user == "tester"
    # an unauthenticated message with a non-anonymous spam = NAME still names the user
    assert spamc.envelope(sa_request(cap.EXIM_MBOX_484, user=b"alice")).user == "alice"


def test_custom_anonymous_users():
    req = sa_request(cap.EXIM_MBOX_484, user=b"root")
    assert spamc.envelope(req).user == "root"
    assert spamc.envelope(req, anonymous_users=("nobody", "root")).user is None
    auth = sa_request(cap.EXIM_MBOX_0003, user=b"root")
    assert spamc.envelope(auth, anonymous_users=("root",)).user == ""


@pytest.mark.parametrize("user", [None, b"", b"   ", b"nobody", b"a\x01b"])
def test_missing_empty_or_bad_user_header(user):
    assert spamc.envelope(sa_request(cap.EXIM_MBOX_484, user=user)).user is None


@pytest.mark.parametrize("proto, authenticated", [
    ("esmtpa", True), ("esmtpsa", True), ("ESMTPSA", True), ("utf8esmtpsa", True),
    ("local-esmtpa", True), ("esmtp", False), ("esmtps", False), ("smtp", False),
    ("local", False), ("local-bsmtp", False)])
def test_received_protocol_decides_authentication(proto, authenticated):
    body = MBOX_HEAD + (b"Received: from [192.0.2.1] (helo=h)\n\tby mx with " + proto.encode()
                        + b" (Exim 4.96)\n\tid 1abcde-000001-AB;\n\tSun, 22 Nov 2026\n\nx\n")
    env = spamc.envelope(sa_request(body))
    assert env.user == ("" if authenticated else None)
    assert (env.ip, env.helo, env.queue_id) == ("192.0.2.1", "h", "1abcde-000001-AB")


@pytest.mark.parametrize("from_part, ip, helo, hostname", [
    (b"[IPv6:2001:db8::1] (helo=six.example)", "2001:db8::1", "six.example", None),
    (b"[::1] (helo=localhost)", "::1", "localhost", None),
    (b"[2001:db8::25]:587 (helo=port.example)", "2001:db8::25", "port.example", None),
    (b"mail.example.net ([198.51.100.7] helo=mail.example.net ident=x)", "198.51.100.7",
     "mail.example.net", "mail.example.net"),
    (b"[203.0.113.9]", "203.0.113.9", None, None),
    (b"alice", None, None, None),  # local submission: "from <ident> by ..."
    (b"[999.1.1.1] (helo=bad)", None, "bad", None),
])
def test_received_from_clause_forms(from_part, ip, helo, hostname):
    body = MBOX_HEAD + b"Received: from " + from_part + b"\n\tby mx.example with esmtp (Exim 4.96)\n\tid q1\n\nx"
    env = spamc.envelope(sa_request(body))
    assert (env.ip, env.helo, env.hostname, env.queue_id) == (ip, helo, hostname, "q1")


def test_forged_received_further_down_is_not_trusted():
    """If Exim's Received is not the first header, a later (client-written) one is ignored."""
    body = MBOX_HEAD + (b"Subject: hi\nReceived: from [10.0.0.1] (helo=evil)\n\tby mx with esmtpa"
                        b" (Exim 4.96)\n\tid forged\n\nx\n")
    env = spamc.envelope(sa_request(body))
    assert env == Envelope(sender="s@example.org", recipients=("r@example.com",))


def test_no_mbox_wrapper_first_received_still_read():
    body = b"Received: from [192.0.2.5] (helo=c)\r\n\tby mx with esmtps\r\n\tid z\r\nSubject: x\r\n\r\nhi"
    env = spamc.envelope(sa_request(body, user=b"root", version=b"1.5"))
    assert env == Envelope(ip="192.0.2.5", helo="c", user="root", queue_id="z")


def test_unauthenticated_empty_message():
    assert spamc.envelope(sa_request(b"")) == Envelope()


# --------------------------------------------------------------------------- decisions --
def forwarding_reject() -> Decision:
    scan = ScanResult(action=ADD_HEADER, score=6.9, required_score=15.0,
                      symbols=(Symbol("TEST_SPAM_HEADER", 7.0, (), "Test header"),
                               Symbol("MIME_GOOD", -0.1, ("text/plain",))),
                      messages=(("smtp_message", "rspamd text"),))
    return Decision(action=REJECT, traffic=Traffic.FORWARDING,
                    reason="spam (add header) to a recipient that forwards externally",
                    symbols=(Symbol("EXIM_POLICY_FORWARDING", 0.0, ("bob@example.com",)),),
                    scan=scan, message="Spam to a forwarding address is rejected")


def ham() -> Decision:
    scan = ScanResult(action=NO_ACTION, score=-0.1, required_score=15.0,
                      symbols=(Symbol("MIME_GOOD", -0.1), Symbol("ARC_NA", 0.0)))
    return Decision(action=NO_ACTION, traffic=Traffic.INBOUND, reason="Rspamd: no action",
                    scan=scan)


def gtube() -> Decision:
    scan = ScanResult(action=REJECT, score=15.0, required_score=15.0,
                      symbols=(Symbol("GTUBE", 0.0),), messages=(("smtp_message", "Gtube pattern"),),
                      add_headers=(("X-Spamd-Bar", "+++++"),
                                   ("Authentication-Results", "mx;\n\tauth=pass smtp.auth=alice")))
    return Decision(action=REJECT, traffic=Traffic.INBOUND, reason="Gtube pattern", scan=scan)


def soft() -> Decision:
    return Decision(action=SOFT_REJECT, traffic=Traffic.OUTBOUND, reason="scanner unavailable:\r\ndown",
                    failure=ScanFailure("down"))


FWD_REPORT = (b"Action: reject\r\nMessage: Spam to a forwarding address is rejected\r\n"
              b"Reason: spam (add header) to a recipient that forwards externally\r\n"
              b"Message: rspamd text\r\n"
              b" 7.00 TEST_SPAM_HEADER Test header\r\n -0.10 MIME_GOOD [text/plain]\r\n"
              b" 0.00 EXIM_POLICY_FORWARDING [bob@example.com]\r\n")


# ---------------------------------------------------------------------- golden replies --
def test_exim_report_1_2_forwarding_reject():
    reply = spamc.build_reply(parsed(cap.EXIM_SA), forwarding_reject())
    assert reply == b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 6.9 / 6.9\r\n\r\n" + FWD_REPORT


def test_exim_report_1_2_ham():
    reply = spamc.build_reply(parsed(cap.EXIM_SA), ham())
    assert reply == (b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.1 / 15.0\r\n\r\n"
                     b"Action: no action\r\nMessage: Rspamd: no action\r\n"
                     b"Reason: Rspamd: no action\r\n -0.10 MIME_GOOD\r\n 0.00 ARC_NA\r\n")


def test_report_1_5_has_content_length_first():
    reply = spamc.build_reply(parsed(cap.SPAMC_REPORT), forwarding_reject())
    assert reply == (b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\n" % len(FWD_REPORT)
                     + b"Spam: True ; 6.9 / 6.9\r\n\r\n" + FWD_REPORT)


@pytest.mark.parametrize("data", [cap.SPAMC_CHECK, b"CHECK SPAMC/1.2\r\n\r\n"])
def test_check_is_spam_header_only(data):
    assert spamc.build_reply(parsed(data), gtube()) == (
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.0 / 15.0\r\n\r\n")


def test_symbols_crlf_only_below_1_3():
    names = b"TEST_SPAM_HEADER,MIME_GOOD,EXIM_POLICY_FORWARDING"
    assert spamc.build_reply(parsed(cap.SPAMC_SYMBOLS), forwarding_reject()) == (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 6.9 / 6.9\r\n\r\n" % len(names)
        + names)
    old = parsed(b"SYMBOLS SPAMC/1.2\r\nContent-length: 0\r\n\r\n")
    assert spamc.build_reply(old, forwarding_reject()) == (
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 6.9 / 6.9\r\n\r\n" + names + b"\r\n")


def test_report_ifspam():
    req = parsed(cap.SPAMC_REPORT.replace(b"REPORT ", b"REPORT_IFSPAM "))
    assert spamc.build_reply(req, ham()) == (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; -0.1 / 15.0\r\n\r\n")
    assert spamc.build_reply(req, forwarding_reject()).endswith(b"\r\n\r\n" + FWD_REPORT)


GTUBE_HEADERS = (b"X-Spam-Flag: YES\nX-Spam-Status: Yes, score=15.0 required=15.0\n"
                 b"X-Spam-Action: reject\nX-Spamd-Bar: +++++\n"
                 b"Authentication-Results: mx;\n\tauth=pass smtp.auth=alice\n")


def test_process_1_5_and_1_2():
    processed = GTUBE_HEADERS + cap.SPAMC_MESSAGE
    assert spamc.build_reply(parsed(cap.SPAMC_PROCESS), gtube()) == (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 15.0 / 15.0\r\n\r\n"
        % len(processed) + processed)
    old = parsed(b"PROCESS SPAMC/1.2\r\nContent-length: 57\r\n\r\n" + cap.SPAMC_MESSAGE)
    assert spamc.build_reply(old, gtube()) == (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\n\r\n" % len(processed) + processed)


def test_process_strips_mbox_line_and_keeps_crlf():
    body = b"From MAILER-DAEMON Sun Nov 22 05:56:46 2026\r\nSubject: x\r\n\r\nhi\r\n"
    reply = spamc.build_reply(sa_request(body, command=b"PROCESS", version=b"1.5"), ham())
    assert reply.endswith(b"\r\n\r\nX-Spam-Flag: NO\r\nX-Spam-Status: No, score=-0.1 required=15.0"
                          b"\r\nX-Spam-Action: no action\r\nSubject: x\r\n\r\nhi\r\n")


def test_headers_returns_the_header_block_only():
    block = GTUBE_HEADERS + b"From: a@example.org\nTo: b@example.com\nSubject: hi\n\n"
    assert spamc.build_reply(parsed(cap.SPAMC_HEADERS), gtube()) == (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 15.0 / 15.0\r\n\r\n"
        % len(block) + block)


@pytest.mark.parametrize("data", [cap.EXIM_SA, cap.SPAMC_CHECK, cap.SPAMC_PROCESS])
def test_soft_reject_is_a_temporary_failure_line(data):
    assert spamc.build_reply(parsed(data), soft()) == (
        b"SPAMD/1.0 75 Temporary failure: scanner unavailable:  down\r\n")


def test_ping_skip_tell():
    assert spamc.build_reply(parsed(cap.SPAMC_PING), ham()) == spamc.PONG == b"SPAMD/1.5 0 PONG\r\n"
    assert spamc.build_reply(parsed(b"SKIP SPAMC/1.2\r\n"), ham()) == b""
    tell = parsed(b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 1\r\n\r\nx")
    assert spamc.build_reply(tell, ham()) == (
        b"SPAMD/1.0 69 Service Unavailable: TELL is not supported\r\n")


def test_build_error_is_one_sanitised_line():
    assert spamc.build_error(76, "Bad header line: a\r\nb\x00c") == (
        b"SPAMD/1.0 76 Bad header line: a  b c\r\n")
    assert len(spamc.build_error(76, "x" * 100_000)) <= 1100
    assert spamc.build_error(76, "für").endswith(b"f\xc3\xbcr\r\n")


def test_report_of_2000_symbols_stays_below_30000_bytes():
    scan = ScanResult(action=REJECT, score=30.0, required_score=15.0,
                      symbols=tuple(Symbol(f"SYM_{i:04d}", i / 1000, ("opt",) * 3, "desc")
                                    for i in range(2000)))
    d = Decision(action=REJECT, traffic=Traffic.INBOUND, reason="spam", scan=scan,
                 symbols=(Symbol("EXIM_POLICY_CONTEXT", 0.0),))
    reply = spamc.build_reply(parsed(cap.EXIM_SA), d)
    assert len(reply) <= 30000
    assert b" 0.00 EXIM_POLICY_CONTEXT\r\n" in reply and b" 2.00 SYM_1999 desc" in reply
    view = exim.parse_spamassassin(reply)
    assert view.spam and view.report.startswith("Action: reject\n Message: spam")


# ------------------------------------------------------------- as Exim 4.96 reads them --
TABLE = [forwarding_reject(), ham(), gtube(),
         Decision(action=NO_ACTION, traffic=Traffic.OUTBOUND, reason="relay",
                  scan=ScanResult(action=REJECT, score=20.0, required_score=15.0)),
         Decision(action=GREYLIST, traffic=Traffic.INBOUND, reason="grey",
                  scan=ScanResult(action=GREYLIST, score=4.96, required_score=5.0)),
         Decision(action=REJECT, traffic=Traffic.INBOUND, reason="prefilter",
                  scan=ScanResult(action=REJECT, score=-0.1, required_score=15.0)),
         Decision(action=NO_ACTION, traffic=Traffic.INBOUND, reason="fail open",
                  failure=ScanFailure("down"))]


@pytest.mark.parametrize("decision", TABLE, ids=lambda d: f"{d.action}@{d.score}")
def test_exim_sees_the_decision(decision):
    view = exim.parse_spamassassin(spamc.build_reply(parsed(cap.EXIM_SA), decision))
    assert view is not None, "Exim would DEFER"
    assert view.spam == decision.is_reject
    assert view.action == ("reject" if decision.is_reject else "no action")
    assert view.report.startswith(f"Action: {decision.action}\n Message: ")


def test_exim_defers_on_temporary_failure_and_cannot_read_1_3_replies():
    assert exim.parse_spamassassin(spamc.build_reply(parsed(cap.EXIM_SA), soft())) is None
    # protocol >= 1.3 puts Content-length first: Exim (which always sends 1.2) could not parse
    # it -- documented in docs/wire-formats.md, "Exim's reply parser: SpamAssassin variant";
    # this pins that the version switch matters
    assert exim.parse_spamassassin(spamc.build_reply(parsed(cap.SPAMC_REPORT), ham())) is None


def test_model_agrees_with_exims_spamassassin_reply_parser():
    assert exim.parse_spamassassin(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.0 / 5.0\r\n\r\nr").spam
    assert exim.parse_spamassassin(b"SPAMD/1.1 0 EX_OK\nSpam: False ; 1.0 / 5.0\n\n").spam is False
    assert exim.parse_spamassassin(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\n\r\n6.0/5.0\r\nx").spam
    assert exim.parse_spamassassin(b"SPAMD/1.1 0 EX_OK\r\nSpam: True; 15.0 / 5.0\r\n\r\n") is None
    assert exim.parse_spamassassin(b"SPAMD/1.0 76 Bad header line: x\r\n") is None


_scores = st.one_of(st.floats(min_value=-1000, max_value=1000, allow_nan=False),
                    st.sampled_from([0.05, 0.04999, 4.95, 5.0, 5.05, 14.95, 15.0, -0.05, 1e12]))


@settings(max_examples=300, deadline=None)
@given(score=_scores, required=st.one_of(st.none(), _scores),
       action=st.sampled_from([REJECT, NO_ACTION, ADD_HEADER, GREYLIST, SOFT_REJECT, "discard"]),
       defer=st.booleans())
def test_exim_truth_always_matches_the_decision(score, required, action, defer):
    scan = None if required is None else ScanResult(action=action, score=score,
                                                    required_score=required)
    decision = Decision(action=action, traffic=Traffic.INBOUND, reason="r", scan=scan, defer=defer)
    view = exim.parse_spamassassin(spamc.build_reply(parsed(cap.EXIM_SA), decision))
    if action == SOFT_REJECT:
        assert view is None  # non-zero code: Exim DEFERs (451 in the bundled ACL)
    else:
        assert view is not None and view.spam == decision.is_reject


# ------------------------------------------------------------------- the real spamc --
SPAMC = shutil.which("spamc")
DEADLINE = 15.0


class OneShotServer:
    """Accept one connection on 127.0.0.1:<free port>, parse with RequestParser, reply, close.

    Records the raw bytes received. Socket operations have timeouts, the thread is joined
    with a deadline, so nothing can hang the test run.
    """

    def __init__(self, reply: Callable[[Request | ProtocolError], bytes]):
        self.reply = reply
        self.raw = b""
        self.event: Request | ProtocolError | None = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(DEADLINE)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(DEADLINE)
            parser = RequestParser()
            while parser.next_event() is NEED_DATA:
                data = conn.recv(65536)
                if not data:
                    parser.feed_eof()
                    break
                self.raw += data
                parser.feed(data)
            self.event = parser.next_event()
            conn.sendall(self.reply(self.event))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()


def run_spamc(args: list[str], reply: Callable, stdin: bytes = cap.SPAMC_MESSAGE):
    if SPAMC is None:
        pytest.fail("spamc is not installed (Debian package 'spamc'); the real-client tests need it")
    server = OneShotServer(reply)
    try:
        proc = subprocess.run([SPAMC, "-x", "-d", "127.0.0.1", "-p", str(server.port),
                               "-u", "root", "-t", "10", *args],
                              input=stdin, capture_output=True, timeout=DEADLINE)
    finally:
        server.close()
    return server, proc


def answer(decision: Decision) -> Callable:
    def reply(event):
        if isinstance(event, ProtocolError):
            return spamc.build_error(event.code, event.text)
        return spamc.build_reply(event, decision)
    return reply


@pytest.mark.parametrize("args, golden", [
    (["-c"], cap.SPAMC_CHECK), (["-R"], cap.SPAMC_REPORT), (["-y"], cap.SPAMC_SYMBOLS),
    ([], cap.SPAMC_PROCESS), (["--headers"], cap.SPAMC_HEADERS), (["-K"], cap.SPAMC_PING)])
@pytest.mark.real  # the real spamc binary
def test_real_spamc_sends_the_golden_bytes(args, golden):
    server, proc = run_spamc(args, answer(ham()))
    assert server.raw == golden
    assert isinstance(server.event, Request)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.real  # the real spamc binary
def test_real_spamc_check_spam_and_ham():
    _, proc = run_spamc(["-c"], answer(forwarding_reject()))
    assert (proc.returncode, proc.stdout) == (1, b"6.9/6.9\n")
    _, proc = run_spamc(["-c"], answer(ham()))
    assert (proc.returncode, proc.stdout) == (0, b"-0.1/15.0\n")


@pytest.mark.real  # the real spamc binary
def test_real_spamc_report():
    _, proc = run_spamc(["-R"], answer(forwarding_reject()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"6.9/6.9\n" + FWD_REPORT


@pytest.mark.real  # the real spamc binary
def test_real_spamc_report_ifspam_ham():
    _, proc = run_spamc(["-r"], answer(ham()))
    assert (proc.returncode, proc.stdout) == (0, b"")


@pytest.mark.real  # the real spamc binary
def test_real_spamc_symbols():
    _, proc = run_spamc(["-y"], answer(forwarding_reject()))
    assert proc.stdout == b"TEST_SPAM_HEADER,MIME_GOOD,EXIM_POLICY_FORWARDING"


@pytest.mark.real  # the real spamc binary
def test_real_spamc_process_and_headers():
    _, proc = run_spamc([], answer(gtube()))
    assert proc.stdout == GTUBE_HEADERS + cap.SPAMC_MESSAGE
    _, proc = run_spamc(["--headers"], answer(gtube()))
    # spamc glues the original body to the header block we return
    assert proc.stdout == GTUBE_HEADERS + cap.SPAMC_MESSAGE


@pytest.mark.real  # the real spamc binary
def test_real_spamc_ping():
    _, proc = run_spamc(["-K"], answer(ham()))
    assert (proc.returncode, proc.stdout) == (0, b"SPAMD/1.5 0\n")


@pytest.mark.real  # the real spamc binary
def test_real_spamc_temporary_failure():
    # spamc ignores the code of an error line; the missing header block makes it fail with
    # EX_IOERR (74), which MTAs treat as temporary; -c prints 0/0
    _, proc = run_spamc(["-c"], answer(soft()))
    assert (proc.returncode, proc.stdout) == (74, b"0/0\n")
