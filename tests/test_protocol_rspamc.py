"""RSPAMC codec (Exim variant=rspamd): envelope from request headers, golden reply bytes, and
the reply as Exim 4.96's sscanf-based parser reads it."""
from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exim_policy.model import (ADD_HEADER, GREYLIST, NO_ACTION, REJECT, REWRITE_SUBJECT,
                               SOFT_REJECT, Decision, Envelope, Request, ScanFailure, ScanResult,
                               Symbol, Traffic)
from exim_policy.protocol import rspamc
from exim_policy.protocol.parser import RequestParser
from exim_policy.protocol.scores import exim_threshold, format_number, format_score
from exim_policy.protocol.text import encode, one_line, truncate_bytes




from golden import captures as cap  # noqa: E402 (tests/ is on sys.path, see conftest)
from golden import exim_reply_parse as exim  # noqa: E402


def request(head: bytes, body: bytes = b"") -> Request:
    data = head.replace(b"{LEN}", b"%d" % len(body)) + body
    parser = RequestParser()
    parser.feed(data)
    event = parser.next_event()
    assert isinstance(event, Request), event
    return event


# ------------------------------------------------------------------------------ envelope --
def test_envelope_of_exim_capture_authenticated():
    env = rspamc.envelope(request(cap.EXIM_RSPAMC_AUTH))
    assert env == Envelope(sender="sender@example.org",
                           recipients=("rcpt1@example.com", "Rcpt2@Example.COM"),
                           ip="192.0.2.10", helo="helo.client.example",
                           hostname="client.example.net", user="alice@example.com",
                           queue_id="1xV0ZC-0003TR-0m")


def test_envelope_of_exim_capture_unauthenticated_no_hostname():
    env = rspamc.envelope(request(cap.EXIM_RSPAMC_0001))
    assert env == Envelope(sender="alice@example.org", recipients=("bob@stack.test",),
                           ip="127.0.0.1", helo="client.test", hostname=None, user=None,
                           queue_id="1xV0ad-0003s2-0s")


def test_envelope_any_case_and_lf_and_unknown_headers():
    env = rspamc.envelope(request(
        b"CHECK RSPAMC/1.3\nCONTENT-LENGTH: {LEN}\nfrom: <a@b>\nrcpt: <c@d>\nRCPT: <e@f>\n"
        b"hElO: h\nip: ::1\nuser: u\nqueue-id: q\nX-Whatever: 1\nRecipient-Number: 9\n\n", b"x"))
    assert env == Envelope(sender="a@b", recipients=("c@d", "e@f"), ip="::1", helo="h",
                           user="u", queue_id="q")


def test_bounce_sender_and_missing_optional_headers():
    env = rspamc.envelope(request(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\nFrom: <>\r\n"
                                  b"Rcpt: <postmaster@example.com>\r\n\r\n"))
    assert env == Envelope(sender="", recipients=("postmaster@example.com",))


def test_no_from_header_means_unknown_sender():
    env = rspamc.envelope(request(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\n\r\n"))
    assert env == Envelope()


def test_rcpt_comma_lists_respect_quotes_and_brackets():
    env = rspamc.envelope(request(
        b'CHECK RSPAMC/1.3\r\nContent-length: 0\r\nRcpt: <a@x>, <b@y>\r\n'
        b'Rcpt: "last, first"@z, <@r1,@r2:c@w>\r\nRcpt: <d@v>\r\nRcpt: <>\r\n\r\n'))
    assert env.recipients == ("a@x", "b@y", '"last, first"@z', "@r1,@r2:c@w", "d@v")


def test_8bit_values_survive_as_latin1():
    env = rspamc.envelope(request(
        b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\nFrom: <j\xc3\xb6rg@xn--b.example>\r\n"
        b"Rcpt: <\xe4@b>\r\nHelo: h\xe9lo with spaces\r\nUser: J\xc3\xb6rg Smith\r\n\r\n"))
    assert env.sender.encode("latin-1") == b"j\xc3\xb6rg@xn--b.example"
    assert env.recipients[0].encode("latin-1") == b"\xe4@b"
    assert env.helo.encode("latin-1") == b"h\xe9lo with spaces"
    assert env.user.encode("latin-1") == b"J\xc3\xb6rg Smith"


def test_values_with_nul_or_cr_are_absent():
    env = rspamc.envelope(request(
        b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\nFrom: <a\x00@b>\r\nRcpt: <c\r@d>\r\n"
        b"Rcpt: <ok@d>\r\nHelo: h\x00x\r\nUser: u\rv\r\nQueue-Id: q\x00\r\n\r\n"))
    assert env == Envelope(recipients=("ok@d",))


@pytest.mark.parametrize("value, expected", [
    ("192.0.2.10", "192.0.2.10"), ("2001:db8::1", "2001:db8::1"), ("not-an-ip", None),
    ("", None), ("[192.0.2.1]", None), ("fe80::1%eth0", "fe80::1%eth0")])
def test_ip_must_be_an_address(value, expected):
    req = request(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\nIP: " + value.encode() + b"\r\n\r\n")
    assert rspamc.envelope(req).ip == expected


def test_empty_user_is_unauthenticated():
    req = request(b"CHECK RSPAMC/1.3\r\nContent-length: 0\r\nUser: \r\nHelo:\r\n\r\n")
    assert rspamc.envelope(req).user is None and rspamc.envelope(req).helo is None


# --------------------------------------------------------------------------- decisions --
HAM_SYMBOLS = tuple(Symbol(n, s) for n, s in [
    ("ARC_NA", 0.0), ("FROM_NO_DN", 0.0), ("MIME_TRACE", 0.0), ("RCVD_COUNT_ONE", 0.0),
    ("TO_MATCH_ENVRCPT_ALL", 0.0), ("RCVD_NO_TLS_LAST", 0.1), ("FROM_EQ_ENVFROM", 0.0),
    ("TO_DN_NONE", 0.0), ("MIME_GOOD", -0.1), ("RCPT_COUNT_ONE", 0.0),
    ("MID_RHS_MATCH_FROM", 0.0)])


def gtube() -> Decision:
    scan = ScanResult(action=REJECT, score=15.0, required_score=15.0,
                      symbols=(Symbol("GTUBE", 0.0),), messages=(("smtp_message", "Gtube pattern"),),
                      message_id="probe-1@example.org", is_skipped=True)
    return Decision(action=REJECT, traffic=Traffic.INBOUND, scan=scan, message="Gtube pattern",
                    reason="Gtube pattern (Rspamd said 'reject', score 15.00 / 15.00)")


def ham() -> Decision:
    scan = ScanResult(action=NO_ACTION, score=0.0, required_score=15.0, symbols=HAM_SYMBOLS,
                      message_id="cap-ham@example.org")
    return Decision(action=NO_ACTION, traffic=Traffic.INBOUND, reason="Rspamd: no action", scan=scan)


def forwarding_reject() -> Decision:
    scan = ScanResult(action=ADD_HEADER, score=6.9, required_score=15.0,
                      symbols=(Symbol("TEST_SPAM_HEADER", 7.0), Symbol("MIME_GOOD", -0.1)),
                      message_id="legacy-1@example.org")
    return Decision(action=REJECT, traffic=Traffic.FORWARDING,
                    reason="spam (add header) to a recipient that forwards externally",
                    symbols=(Symbol("EXIM_POLICY_FORWARDING", 0.0, ("bob@example.com",)),),
                    scan=scan, forwarding=("bob@example.com",),
                    message="Spam to a forwarding address is rejected")


def add_header() -> Decision:
    scan = ScanResult(action=ADD_HEADER, score=6.0, required_score=15.0,
                      symbols=(Symbol("GTUBE", 0.0),), messages=(("smtp_message", "Gtube pattern"),),
                      message_id="legacy-1@example.org")
    return Decision(action=ADD_HEADER, traffic=Traffic.INBOUND, reason="Rspamd: add header",
                    scan=scan)


def rewrite_subject() -> Decision:
    scan = ScanResult(action=REWRITE_SUBJECT, score=8.5, required_score=15.0,
                      symbols=(Symbol("BAYES_SPAM", 8.5),), subject="*** SPAM *** hello",
                      message_id="m@x")
    return Decision(action=REWRITE_SUBJECT, traffic=Traffic.INBOUND,
                    reason="Rspamd: rewrite subject", scan=scan)


def downgraded_high_score() -> Decision:
    """Rspamd said reject at 20, the policy let it through (e.g. a trusted relay)."""
    scan = ScanResult(action=REJECT, score=20.0, required_score=15.0, symbols=(Symbol("X", 20.0),))
    return Decision(action=NO_ACTION, traffic=Traffic.OUTBOUND, reason="trusted relay", scan=scan)


def scanner_down() -> Decision:
    return Decision(action=SOFT_REJECT, traffic=Traffic.INBOUND,
                    reason="scanner unavailable: connection refused",
                    failure=ScanFailure("connection refused"))


# ---------------------------------------------------------------------- golden replies --
def test_gtube_reject_matches_rspamd_bytes_except_the_true_flag_and_the_reason():
    # Rspamd 3.4's own reply (docs/wire-formats.md, "Rspamd's legacy protocol"):
    # ...Metric: default; False; 15.00 / 15.00...
    assert rspamc.build_reply(gtube()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; True; 15.00 / 15.00 / 0.0\r\n"
        b"Action: reject\r\nSymbol: GTUBE(0.00)\r\nMessage: Gtube pattern\r\n"
        b"Reason: Gtube pattern (Rspamd said 'reject', score 15.00 / 15.00)\r\n"
        b"Message-ID: probe-1@example.org\r\n")


def test_ham_no_action():
    # Rspamd 3.4 through Exim (docs/wire-formats.md, "Lab captures") plus the shim's reason
    # (no public text)
    assert rspamc.build_reply(ham()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 0.00 / 15.00 / 0.0\r\n"
        b"Action: no action\r\nSymbol: ARC_NA(0.00)\r\nSymbol: FROM_NO_DN(0.00)\r\n"
        b"Symbol: MIME_TRACE(0.00)\r\nSymbol: RCVD_COUNT_ONE(0.00)\r\n"
        b"Symbol: TO_MATCH_ENVRCPT_ALL(0.00)\r\nSymbol: RCVD_NO_TLS_LAST(0.10)\r\n"
        b"Symbol: FROM_EQ_ENVFROM(0.00)\r\nSymbol: TO_DN_NONE(0.00)\r\n"
        b"Symbol: MIME_GOOD(-0.10)\r\nSymbol: RCPT_COUNT_ONE(0.00)\r\n"
        b"Symbol: MID_RHS_MATCH_FROM(0.00)\r\nMessage: Rspamd: no action\r\n"
        b"Reason: Rspamd: no action\r\n"
        b"Message-ID: cap-ham@example.org\r\n")


def test_forwarding_reject_lowers_the_threshold_to_the_score():
    assert rspamc.build_reply(forwarding_reject()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; True; 6.90 / 6.90 / 0.0\r\n"
        b"Action: reject\r\nSymbol: TEST_SPAM_HEADER(7.00)\r\nSymbol: MIME_GOOD(-0.10)\r\n"
        b"Symbol: EXIM_POLICY_FORWARDING(0.00)\r\n"
        b"Message: Spam to a forwarding address is rejected\r\n"
        b"Reason: spam (add header) to a recipient that forwards externally\r\n"
        b"Message-ID: legacy-1@example.org\r\n")


def test_add_header():
    assert rspamc.build_reply(add_header()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 6.00 / 15.00 / 0.0\r\n"
        b"Action: add header\r\nSymbol: GTUBE(0.00)\r\nMessage: Rspamd: add header\r\n"
        b"Reason: Rspamd: add header\r\nMessage: Gtube pattern\r\nMessage-ID: legacy-1@example.org\r\n")


def test_rewrite_subject_has_subject_line_after_action():
    assert rspamc.build_reply(rewrite_subject()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 8.50 / 15.00 / 0.0\r\n"
        b"Action: rewrite subject\r\nSubject: *** SPAM *** hello\r\nSymbol: BAYES_SPAM(8.50)\r\n"
        b"Message: Rspamd: rewrite subject\r\nReason: Rspamd: rewrite subject\r\n"
        b"Message-ID: m@x\r\n")


def test_subject_only_for_rewrite_subject():
    d = rewrite_subject()
    other = Decision(action=ADD_HEADER, traffic=d.traffic, reason="r", scan=d.scan)
    assert b"Subject:" not in rspamc.build_reply(other)


def test_not_reject_at_high_score_raises_the_threshold():
    assert rspamc.build_reply(downgraded_high_score()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 20.00 / 20.01 / 0.0\r\n"
        b"Action: no action\r\nSymbol: X(20.00)\r\nMessage: trusted relay\r\n"
        b"Reason: trusted relay\r\n")


def test_no_scan_result():
    assert rspamc.build_reply(scanner_down()) == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 0.00 / 15.00 / 0.0\r\n"
        b"Action: soft reject\r\nMessage: scanner unavailable: connection refused\r\n"
        b"Reason: scanner unavailable: connection refused\r\n")


def test_cr_lf_nul_in_values_are_sanitised():
    scan = ScanResult(action=REJECT, score=15.0, required_score=15.0,
                      symbols=(Symbol("EVIL\r\nAction: no action", 1.0),),
                      messages=(("smtp_message", "line one\r\nAction: no action\x00!"),),
                      message_id="id\nX")
    d = Decision(action="rej\rect", traffic=Traffic.INBOUND, reason="why\nnot", scan=scan)
    reply = rspamc.build_reply(d)
    assert reply == (
        b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 15.00 / 15.01 / 0.0\r\n"
        b"Action: rej ect\r\nSymbol: EVIL  Action: no action(1.00)\r\nMessage: why not\r\n"
        b"Reason: why not\r\nMessage: line one  Action: no action !\r\nMessage-ID: id X\r\n")
    assert reply.count(b"\n") == reply.count(b"\r\n") == 8 and b"\x00" not in reply


def test_action_truncated_to_31_bytes():
    d = Decision(action="quarantine-and-notify-the-postmaster-please", traffic=Traffic.INBOUND,
                 reason="custom")
    line = rspamc.build_reply(d).split(b"\r\n")[2]
    assert line == b"Action: quarantine-and-notify-the-postm"
    assert len(line) - len(b"Action: ") == 31


def test_rspamd_message_equal_to_the_reason_is_not_repeated():
    reply = rspamc.build_reply(gtube())
    assert reply.count(b"Message: Gtube pattern") == 1


def test_truncation_of_2000_symbols():
    rspamd_symbols = tuple(Symbol(f"RSPAMD_SYMBOL_NUMBER_{i:04d}", (i % 7) * 0.5)
                           for i in range(2000))
    scan = ScanResult(action=REJECT, score=42.0, required_score=15.0, symbols=rspamd_symbols,
                      messages=(("smtp_message", "rspamd says no"), ("other", "x" * 100)),
                      message_id="big@example.org")
    shim = (Symbol("EXIM_POLICY_OUTBOUND", 0.0), Symbol("EXIM_POLICY_USER", 0.0, ("alice",)))
    d = Decision(action=REJECT, traffic=Traffic.OUTBOUND, reason="outbound spam", scan=scan,
                 symbols=shim)
    reply = rspamc.build_reply(d)
    assert len(reply) <= 30000
    lines = reply.split(b"\r\n")
    assert lines[0] == b"RSPAMD/1.3 0 EX_OK"
    assert lines[1] == b"Metric: default; True; 42.00 / 15.00 / 0.0"
    assert lines[2] == b"Action: reject"
    assert b"Message: outbound spam" in lines and b"Message: rspamd says no" in lines
    assert lines[-2] == b"Message-ID: big@example.org"
    kept = [line for line in lines if line.startswith(b"Symbol: RSPAMD_")]
    assert 500 < len(kept) < 2000
    # the shim's own symbols and Rspamd's highest scores survive; emitted in original order
    assert b"Symbol: EXIM_POLICY_OUTBOUND(0.00)" in lines
    score_of = lambda line: float(line[line.rindex(b"(") + 1:-1])  # noqa: E731
    dropped = {f"Symbol: {s.name}({s.score:.2f})".encode() for s in rspamd_symbols} - set(kept)
    assert min(map(score_of, kept)) >= max(map(score_of, dropped))
    assert kept == sorted(kept)
    assert exim.parse_rspamd(reply).action == "reject"


def test_huge_single_values_cannot_break_the_limit():
    scan = ScanResult(action=REJECT, score=1.0, required_score=15.0, subject="s" * 100_000,
                      messages=(("a", "m" * 100_000),), message_id="i" * 100_000)
    d = Decision(action=REWRITE_SUBJECT, traffic=Traffic.INBOUND, reason="r" * 100_000,
                 message="c" * 100_000, scan=scan)
    reply = rspamc.build_reply(d)
    assert len(reply) <= 30000
    assert reply.split(b"\r\n")[2] == b"Action: rewrite subject"


def test_unicode_values_are_utf8():
    d = Decision(action=REJECT, traffic=Traffic.INBOUND, reason="Spam für Jörg")
    assert b"Message: Spam f\xc3\xbcr J\xc3\xb6rg\r\n" in rspamc.build_reply(d)


def test_non_finite_scores_still_parse():
    for score in (math.nan, math.inf, -math.inf):
        scan = ScanResult(action=NO_ACTION, score=score, required_score=math.nan)
        d = Decision(action=NO_ACTION, traffic=Traffic.INBOUND, reason="odd", scan=scan)
        view = exim.parse_rspamd(rspamc.build_reply(d))
        assert view is not None and view.spam is False


# ------------------------------------------------------------- as Exim 4.96 reads them --
def _with(decision: Decision, action: str) -> Decision:
    return Decision(action=action, traffic=decision.traffic, reason=decision.reason,
                    scan=decision.scan, symbols=decision.symbols, message=decision.message)


TABLE = [gtube(), ham(), forwarding_reject(), add_header(), rewrite_subject(),
         downgraded_high_score(), scanner_down(),
         _with(gtube(), NO_ACTION), _with(ham(), REJECT), _with(add_header(), GREYLIST),
         _with(ham(), SOFT_REJECT), _with(downgraded_high_score(), REJECT)]


@pytest.mark.parametrize("decision", TABLE, ids=lambda d: f"{d.action}@{d.score}")
def test_exim_sees_the_decision(decision):
    view = exim.parse_rspamd(rspamc.build_reply(decision))
    assert view is not None, "Exim would DEFER"
    assert view.spam == decision.is_reject
    assert view.action == decision.action
    first = re.search(r"(?:^|\n )Message: ([^\n]*)", view.report)
    assert first.group(1) == rspamc.first_message(decision)
    assert view.report.startswith(f"Action: {decision.action}")


def test_real_rspamd_reply_shapes_parse_in_the_model():
    """The model itself agrees with the captures in docs/wire-formats.md ("Exim's reply
    parser: variant=rspamd", "Rspamd's legacy protocol")."""
    real = (b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 15.00 / 15.00 / 0.0\r\n"
            b"Action: reject\r\nSymbol: GTUBE(0.00)\r\nMessage: Gtube pattern\r\n"
            b"Message-ID: probe-1@example.org\r\n")
    view = exim.parse_rspamd(real)
    assert (view.score, view.threshold, view.spam, view.action) == (15.0, 15.0, True, "reject")
    assert view.report == ("Action: reject\n Symbol: GTUBE(0.00)\n Message: Gtube pattern\n"
                           " Message-ID: probe-1@example.org")
    assert exim.parse_rspamd(b"RSPAMD/1.3 0 EX_OK\nMetric: default; True 7.5 / 6.0 / 15.0\nX")
    # three numbers required; comma decimals; JSON error; nothing after the Metric line
    assert exim.parse_rspamd(b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 1.00 / 15.00\r\nA") is None
    assert exim.parse_rspamd(b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 1,00 / 15,00 / 0,0\r\nA") is None
    assert exim.parse_rspamd(b'RSPAMD/1.3 0 EX_OK\r\n{"error":"x"}') is None
    assert exim.parse_rspamd(b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 0.00 / 15.00 / 0.0\r\n") is None
    assert exim.parse_rspamd(b"HTTP/1.1 200 OK\r\n\r\n") is None
    # Action: must be the very next line, else $spam_action keeps a stale value
    late = b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 1.00 / 15.00 / 0.0\r\nX: y\r\nAction: reject\r\n"
    assert exim.parse_rspamd(late, stale_action="old").action == "old"


_scores = st.one_of(st.floats(min_value=-100, max_value=100, allow_nan=False),
                    st.sampled_from([0.0, -0.0, 0.005, 0.015, 6.895, 6.9, 14.995, 15.0, 15.005,
                                     -0.004, 1e-9, 999999.99, 1e12, -1e12]))
_actions = st.one_of(st.sampled_from([REJECT, NO_ACTION, ADD_HEADER, REWRITE_SUBJECT, GREYLIST,
                                      SOFT_REJECT, "discard"]), st.text(max_size=40))


@settings(max_examples=400, deadline=None)
@given(score=_scores, required=st.one_of(st.none(), _scores), action=_actions,
       defer=st.booleans())
def test_exim_truth_always_matches_the_decision(score, required, action, defer):
    scan = None if required is None else ScanResult(action=action, score=score,
                                                    required_score=required)
    decision = Decision(action=action, traffic=Traffic.INBOUND, reason="r", scan=scan,
                        defer=defer)
    view = exim.parse_rspamd(rspamc.build_reply(decision))
    assert view is not None
    assert view.spam == decision.is_reject
    # what Exim keeps: up to CR/NUL/31 bytes; we send at most 31 bytes, cut at a character
    assert view.action.encode("latin-1") == truncate_bytes(encode(one_line(action)), 31)


@settings(max_examples=400, deadline=None)
@given(score=_scores, required=st.one_of(st.none(), _scores), reject=st.booleans(),
       decimals=st.sampled_from([1, 2]))
def test_exim_threshold_property(score, required, reject, decimals):
    threshold = exim_threshold(score, required, reject, decimals)
    printed_score = float(format_score(score, decimals))
    printed_threshold = float(format_number(threshold, decimals))
    assert printed_threshold == threshold
    assert (printed_score >= printed_threshold) == reject
    if required is not None and (printed_score >= float(format_score(required, decimals))) == reject:
        assert threshold == float(format_score(required, decimals))


def test_extra_messages_dropped_after_symbols_but_first_message_kept():
    messages = tuple((f"k{i}", f"{i:02d}" + "m" * 1900) for i in range(30))
    scan = ScanResult(action=REJECT, score=15.0, required_score=15.0, messages=messages,
                      symbols=(Symbol("SYM", 1.0),), message_id="mid@x")
    d = Decision(action=REJECT, traffic=Traffic.INBOUND, reason="the reason", scan=scan)
    reply = rspamc.build_reply(d)
    assert len(reply) <= 30000
    lines = reply.split(b"\r\n")
    assert lines[2] == b"Action: reject"
    message_lines = [line for line in lines if line.startswith(b"Message: ")]
    assert message_lines[0] == b"Message: the reason"
    assert 10 < len(message_lines) < 31
    assert len(reply) + len(message_lines[-1]) + 2 > 30000  # no further message would fit
    assert message_lines[1:] == sorted(message_lines[1:])  # Rspamd's order, a prefix kept
    assert lines[-2] == b"Message-ID: mid@x"
