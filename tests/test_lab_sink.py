"""The SMTP sink, driven with smtplib like Exim's smtp transport would."""
from __future__ import annotations

import smtplib
import time

import pytest

from exim_policy.lab import SmtpSink, messages


def _send(sink: SmtpSink, sender: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as client:
        client.ehlo("client.lab.test")
        client.sendmail(sender, rcpts, data)


def test_message_is_kept_in_memory_and_on_disk(smtp_sink: SmtpSink) -> None:
    data = messages.ham(to="carol@example.com")
    _send(smtp_sink, "tester@lab.test", ["carol@example.com", "dave@example.net"], data)
    (msg,) = smtp_sink.wait_for(1, timeout=5)
    mail_from, rcpts, body = msg
    assert mail_from == "tester@lab.test"
    assert rcpts == ("carol@example.com", "dave@example.net")
    assert body == data
    files = sorted(smtp_sink.directory.glob("*.eml"))
    stored = files[-1].read_bytes()
    assert stored.startswith(b"X-Sink-Mail-From: <tester@lab.test>\r\n"
                             b"X-Sink-Rcpt-To: <carol@example.com>, <dave@example.net>\r\n")
    assert stored.endswith(data)


def test_a_sink_that_keeps_no_messages_writes_the_files_only(tmp_path) -> None:
    with SmtpSink(tmp_path / "sink", keep_messages=False) as sink:
        data = messages.ham(to="carol@example.com")
        _send(sink, "tester@lab.test", ["carol@example.com"], data)
        [stored] = sorted(sink.directory.glob("*.eml"))
        assert sink.messages == []
    assert stored.read_bytes().endswith(data)


def test_dot_stuffing_and_null_sender(smtp_sink: SmtpSink) -> None:
    data = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n"
    _send(smtp_sink, "", ["postmaster@example.com"], data)
    (msg,) = smtp_sink.wait_for(1, timeout=5)
    assert msg.mail_from == ""  # the null sender <> of a bounce
    assert msg.data == data
    stored = sorted(smtp_sink.directory.glob("*.eml"))[-1].read_bytes()
    assert stored.startswith(b"X-Sink-Mail-From: <>\r\n")


def test_clear_and_wait_for_timeout(smtp_sink: SmtpSink) -> None:
    assert smtp_sink.messages == []  # cleared by the fixture
    _send(smtp_sink, "a@lab.test", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    assert len(smtp_sink.wait_for(1, timeout=5)) == 1
    smtp_sink.clear()
    assert smtp_sink.messages == []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="0 message"):
        smtp_sink.wait_for(1, timeout=0.3)
    assert time.monotonic() - started < 2
