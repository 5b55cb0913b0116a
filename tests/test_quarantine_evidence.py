"""The header block of a quarantined message: our fields read and left out of the stored
copy (quarantine.headers), and the evidence they carry (quarantine.evidence)."""
from __future__ import annotations

import dataclasses

import pytest

from exim_policy.config import Config
from exim_policy.quarantine.evidence import from_fields, parse_pairs, recipients_of
from exim_policy.quarantine.headers import MAX_HEADER_BYTES, HeaderSplitter, decoded, first

#: the fields as acl_data.conf adds them (Exim 4.96 output, ${quote:} values, folded)
MESSAGE = (
    b"Received: from [127.0.0.1] by mx.lab.test with esmtpsa id 1tXy7a-000Abc-3Q\r\n"
    b"From: Tester <tester@lab.test>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <m1@lab.test>\r\n"
    b"X-Exim-Policy-Recipients: carol@example.com, dave@example.net, eve@example.org\r\n"
    b'X-Exim-Policy-Quarantine: reason="Gtube pattern; account tester: incident 7";\r\n'
    b'\tauth=tester; ip=127.0.0.1;\r\n'
    b'\thelo=client.test; queue=1tXy7a-000Abc-3Q;\r\n'
    b"\thost=mx.lab.test; score=15.0; action=reject\r\n"
    b"X-Exim-Policy-Report: Action: reject\r\n Symbol: GTUBE(0.00)\r\n"
    b" Symbol: EXIM_POLICY_OUTBOUND(0.00)\r\n Symbol: BIG(9.50)\r\n"
    b" Message: Gtube pattern\r\n"
    b"\r\n"
    b"body line\r\nX-Exim-Policy-Report: not a header, body text\r\n")


def split(data: bytes, size: int) -> tuple[bytes, HeaderSplitter]:
    splitter, out = HeaderSplitter(), b""
    for at in range(0, len(data), size):
        out += splitter.feed(data[at:at + size])
    return out + splitter.close(), splitter


@pytest.mark.parametrize("size", [1, 7, 100, 100000])
def test_our_fields_are_left_out_and_the_body_is_untouched(size):
    stored, splitter = split(MESSAGE, size)
    head, _, body = stored.partition(b"\r\n\r\n")
    assert b"X-Exim-Policy" not in head
    assert b"eve@example.org" not in stored  # the Bcc recipient is not in the copy
    assert body == b"body line\r\nX-Exim-Policy-Report: not a header, body text\r\n"
    assert head.startswith(b"Received: ") and b"Message-ID: <m1@lab.test>" in head
    assert [n for n, _ in splitter.fields][:4] == ["Received", "From", "Subject", "Message-ID"]


def test_evidence_from_the_fields():
    _, splitter = split(MESSAGE, 50)
    ev = from_fields(splitter.fields, "tester@lab.test", Config())
    assert ev.reason == "Gtube pattern; account tester: incident 7"
    assert (ev.account, ev.ip, ev.helo, ev.queue_id, ev.host) == (
        "tester", "127.0.0.1", "client.test", "1tXy7a-000Abc-3Q", "mx.lab.test")
    assert (ev.action, ev.score, ev.incident) == ("reject", 15.0, 7)
    assert ev.symbols == (("GTUBE", 0.0), ("EXIM_POLICY_OUTBOUND", 0.0), ("BIG", 9.5))
    assert ev.top_symbols(1) == ("BIG",)
    assert ev.report[0] == "Action: reject" and ev.report[-1] == "Message: Gtube pattern"
    assert recipients_of(splitter.fields) == ["carol@example.com", "dave@example.net",
                                              "eve@example.org"]
    assert decoded(first(splitter.fields, "subject")) == "Grüße"


def test_quoted_values_and_the_older_form():
    assert parse_pairs(r'reason="a \"b\"; c\\d"; auth=""; ip=192.0.2.1') == {
        "reason": 'a "b"; c\\d', "auth": "", "ip": "192.0.2.1"}
    # the form of earlier releases, still in quarantine mailboxes
    assert parse_pairs("outbound spam; host=192.0.2.7; score=12.5") == {
        "reason": "outbound spam", "auth": "", "score": "12.5", "host_ip": "192.0.2.7"}
    old = [("X-Exim-Policy-Quarantine", b" Gtube pattern; auth=alice; score=15.0")]
    ev = from_fields(old, "alice@lab.test", Config())
    assert (ev.reason, ev.account, ev.score, ev.host) == ("Gtube pattern", "alice", 15.0, "")


def test_relay_host_accounts_follow_relay_key():
    fields = [("X-Exim-Policy-Quarantine", b' reason="x"; auth=""; ip=192.0.2.9')]
    assert from_fields(fields, "web@example.com", Config()).account == "ip:192.0.2.9"
    config = Config()
    config = dataclasses.replace(config, accounts=dataclasses.replace(config.accounts,
                                                                      relay_key="sender"))
    assert from_fields(fields, "web@example.com", config).account == "sender:web@example.com"
    assert from_fields([], "", Config()).account == ""


def test_an_account_name_cannot_smuggle_control_characters():
    fields = [("X-Exim-Policy-Quarantine", b' reason="x\\ny"; auth="a\\r\\nb"; ip=no-ip')]
    ev = from_fields(fields, "", Config())
    assert "\n" not in ev.account and "\r" not in ev.account and "\n" not in ev.reason
    assert ev.ip == ""


def test_a_header_block_without_end_or_too_large_passes_unchanged():
    data = b"Subject: x\r\nX-Exim-Policy-Report: y\r\n"  # no body: the block ends at EOF
    stored, splitter = split(data, 4)
    assert stored == b"Subject: x\r\n" and splitter.fields[1][0] == "X-Exim-Policy-Report"
    huge = b"X-Long: " + b"a" * (2 * MAX_HEADER_BYTES)
    stored, splitter = split(huge + b"\r\n\r\nbody", 65536)
    assert stored == huge + b"\r\n\r\nbody" and splitter.fields == []
