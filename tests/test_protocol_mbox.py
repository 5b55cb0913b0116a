"""Exim's scan-file wrapper: build it like Exim 4.96, strip it, read the envelope from it."""
from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exim_policy.protocol.mbox import (envelope_from_mbox, exim_mbox_wrap, leading_headers,
                                       strip_mbox_from_line)




from golden import captures as cap  # noqa: E402 (tests/ is on sys.path, see conftest)


# ------------------------------------------------------------------------------- strip --
def test_strip_exim_from_line():
    stripped = bytes(strip_mbox_from_line(cap.EXIM_MBOX_484))
    assert stripped.startswith(b"X-Envelope-From: <sender@example.org>\n")
    assert cap.EXIM_MBOX_484.endswith(stripped)


@pytest.mark.parametrize("body", [b"From: a@b\n\nx", b"Subject: From here\n\n", b"", b"from x\n",
                                  b"X-Envelope-To: a\nFrom x\n"])
def test_strip_leaves_other_bodies_alone(body):
    assert strip_mbox_from_line(body) is body


def test_strip_only_the_first_line():
    assert strip_mbox_from_line(b"From a b\nFrom c d\n") == b"From c d\n"
    body = bytearray(b"From a b\nSubject: x\n\nbig\n")
    view = strip_mbox_from_line(body)
    assert isinstance(view, memoryview) and view.obj is body  # a view: no copy of the body
    assert strip_mbox_from_line(b"From MAILER-DAEMON Sun Nov 22") == b""


# -------------------------------------------------------------------------------- wrap --
def test_wrap_reproduces_exim_capture_0001_prefix():
    """Capture 0001 (Exim 4.96; docs/wire-formats.md, "Lab captures"): the wrapper lines are
    byte-identical."""
    message = b"Received: from [127.0.0.1] (helo=client.test)\r\n\tby mx.stack.test\r\n"
    wrapped = exim_mbox_wrap(message, sender="alice@example.org", recipients=["bob@stack.test"],
                             now=datetime(2026, 11, 22, 5, 58, 15))
    assert wrapped == (b"From alice@example.org Sun Nov 22 05:58:15 2026\n"
                       b"X-Envelope-From: <alice@example.org>\n"
                       b"X-Envelope-To: bob@stack.test\n"
                       b"Received: from [127.0.0.1] (helo=client.test)\n\tby mx.stack.test\n")
    assert cap.EXIM_MBOX_0001.startswith(wrapped[:-len(b"\tby mx.stack.test\n")])


def test_wrap_recipients_keep_case_and_order_and_day_is_space_padded():
    wrapped = exim_mbox_wrap(b"S: x\n\nbody\n", sender="sender@example.org",
                             recipients=["rcpt1@example.com", "Rcpt2@Example.COM"],
                             now=datetime(2026, 11, 2, 5, 6, 7))
    assert wrapped == (b"From sender@example.org Mon Nov  2 05:06:07 2026\n"
                       b"X-Envelope-From: <sender@example.org>\n"
                       b"X-Envelope-To: rcpt1@example.com, Rcpt2@Example.COM\n"
                       b"S: x\n\nbody\n")


@pytest.mark.parametrize("sender", [None, ""])
def test_wrap_bounce_or_unknown_sender(sender):
    """Exim writes X-Envelope-From only ${if def:sender_address} (false when empty)."""
    wrapped = exim_mbox_wrap(b"\nbody", sender=sender, recipients=["a@b"],
                             now=datetime(2026, 1, 1))
    assert wrapped == b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\nX-Envelope-To: a@b\n\nbody"


def test_wrap_without_recipients_has_no_envelope_to():
    wrapped = exim_mbox_wrap(b"", sender="a@b", recipients=[], now=datetime(2026, 1, 1))
    assert b"X-Envelope-To" not in wrapped


def test_wrap_default_time_is_now():
    first = exim_mbox_wrap(b"", sender="a@b", recipients=["c@d"]).split(b"\n")[0]
    assert first.startswith(b"From a@b ") and str(datetime.now().year).encode() in first


# ------------------------------------------------------------------------------ envelope --
@pytest.mark.parametrize("body, expected", [
    (cap.EXIM_MBOX_484, ("sender@example.org", ("rcpt1@example.com", "Rcpt2@Example.COM"))),
    (cap.EXIM_MBOX_0001, ("alice@example.org", ("bob@stack.test",))),
    (cap.EXIM_MBOX_0003, ("tester@stack.test", ("carol@example.com",))),
])
def test_envelope_from_captured_scan_files(body, expected):
    assert envelope_from_mbox(body) == expected


def test_forged_envelope_headers_further_down_are_ignored():
    body = (b"From MAILER-DAEMON Sun Nov 22 05:56:46 2026\n"
            b"X-Envelope-To: real@example.com\n"
            b"Received: from x by y\n"
            b"X-Envelope-From: <forged@evil.example>\n"
            b"X-Envelope-To: forged@evil.example\n\nbody\n")
    assert envelope_from_mbox(body) == (None, ("real@example.com",))


def test_only_the_first_of_repeated_pseudo_headers_counts():
    body = (b"From x Sun Nov 22 05:56:46 2026\nX-Envelope-From: <a@b>\nX-Envelope-To: c@d\n"
            b"X-Envelope-To: forged@evil\nX-Envelope-From: <forged@evil>\n\n")
    assert envelope_from_mbox(body) == ("a@b", ("c@d",))


@pytest.mark.parametrize("body", [
    b"X-Envelope-From: <a@b>\nX-Envelope-To: c@d\n\nno From_ line: not Exim's wrapper\n",
    b"From x Sun Nov 22 05:56:46 2026\nSubject: hi\nX-Envelope-To: c@d\n\n",
    b"From x Sun Nov 22 05:56:46 2026",
    b"",
])
def test_no_pseudo_headers(body):
    assert envelope_from_mbox(body) == (None, ())


def test_crlf_quoted_commas_and_8bit():
    body = (b"From x Sun Nov 22 05:56:46 2026\r\nX-Envelope-From: <j\xc3\xb6rg@b>\r\n"
            b"X-Envelope-To: \"a,b\"@c, <d@e>,  f@g \r\n\r\n")
    sender, rcpts = envelope_from_mbox(body)
    assert sender.encode("latin-1") == b"j\xc3\xb6rg@b"  # raw bytes survive
    assert rcpts == ('"a,b"@c', "d@e", "f@g")


def test_value_with_nul_or_cr_counts_as_absent():
    body = b"From x Sun\nX-Envelope-From: <a\x00@b>\nX-Envelope-To: c\r@d\n\n"
    assert envelope_from_mbox(body) == (None, ())


def test_folded_envelope_to_is_unfolded():
    body = b"From x Sun\nX-Envelope-To: a@b,\n\tc@d\n\n"
    assert envelope_from_mbox(body) == (None, ("a@b", "c@d"))


def test_leading_headers_stop_early_on_huge_messages():
    body = cap.EXIM_MBOX_484[:-1] + b"x" * 10_000_000 + b"\n"
    headers = leading_headers(body)
    assert [name for name, _ in headers][:4] == ["X-Envelope-From", "X-Envelope-To", "Received",
                                                 "From"]
    assert headers[2][1].startswith("from client.example.net ([192.0.2.10] helo=")


_addr = st.from_regex(r"[a-z0-9.+_-]{1,10}@[a-z0-9-]{1,10}\.[a-z]{2,5}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(sender=st.one_of(st.none(), _addr), recipients=st.lists(_addr, max_size=5),
       message=st.binary(max_size=200))
def test_wrap_then_read_round_trip(sender, recipients, message):
    message = b"Subject: x\n" + message  # a message starts with a header line
    wrapped = exim_mbox_wrap(message, sender=sender, recipients=recipients,
                             now=datetime(2026, 11, 22))
    assert envelope_from_mbox(wrapped) == (sender, tuple(recipients))
    assert bytes(strip_mbox_from_line(wrapped)).endswith(message.replace(b"\r\n", b"\n"))
