"""The daemon's log output (exim_policy/logs.py): JSON lines with the decision's fields,
syslog, the batching writer (a stuck or failing target, a reload's switch), and the real
daemon writing JSON for a message scanned by the real Rspamd."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest

from exim_policy.config import ConfigError, LoggingConfig, from_dict
from exim_policy.lab import messages
from exim_policy.lab.shim import ShimLab
from exim_policy.logs import JsonFormatter, LogWriter, handler_for
from exim_policy.model import Context, Envelope, ScanResult
from exim_policy.policy import decide
from exim_policy.pipeline import Evaluation, log_decision


def decision_record(caplog) -> logging.LogRecord:
    config = from_dict({})
    env = Envelope(sender="a@example.org", recipients=("b@example.com",), ip="192.0.2.1",
                   queue_id="1abc-000001-00")
    decision = decide(env, ScanResult("add header", 7.5, 15.0), Context(), config, 0.0)
    with caplog.at_level(logging.INFO, logger="exim_policy.decision"):
        log_decision("rspamc", "CHECK", Evaluation(env, decision, 0.0123))
    [record] = caplog.records
    return record


def test_json_lines_carry_the_decisions_fields(caplog):
    record = decision_record(caplog)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "info" and doc["logger"] == "exim_policy.decision"
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert {k: doc[k] for k in ("qid", "proto", "traffic", "rspamd", "final", "score", "ms",
                                "account", "would")} == {
        "qid": "1abc-000001-00", "proto": "rspamc/CHECK", "traffic": "inbound",
        "rspamd": "add header", "final": "add header", "score": 7.5, "ms": 12.3,
        "account": None, "would": None}
    assert doc["message"].startswith("qid=1abc-000001-00 proto=rspamc/CHECK traffic=inbound")


def test_syslog_target_sends_to_the_socket(tmp_path, caplog):
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    try:
        for fmt in ("text", "json"):
            handler = handler_for(LoggingConfig(format=fmt, target="syslog",
                                                syslog_address=path, syslog_facility="mail"))
            handler.handle(logging.makeLogRecord({"name": "exim_policy.x", "msg": "hello %s",
                                                  "args": ("there",), "levelno": logging.INFO,
                                                  "levelname": "INFO"}))
            handler.close()
            datagram = receiver.recv(4096).decode()
            # <22>: facility mail (2) * 8 + severity info (6)
            assert datagram.startswith(f"<22>exim-policy[{os.getpid()}]: ")
            body = datagram.split("]: ", 1)[1].rstrip("\x00")
            if fmt == "text":
                assert body == "INFO exim_policy.x: hello there"
            else:
                assert json.loads(body)["message"] == "hello there"
    finally:
        receiver.close()


def test_syslog_socket_that_is_not_there_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="logging.syslog_address: cannot open"):
        handler_for(LoggingConfig(target="syslog", syslog_address=str(tmp_path / "none")))


@pytest.mark.real
def test_the_daemon_writes_json_lines(rspamd_running, tmp_path):
    shim = ShimLab(tmp_path, rspamd_url=rspamd_running.url, log_format="json")
    shim.start()
    try:
        message = tmp_path / "m.eml"
        message.write_bytes(messages.gtube("bob@lab.test", "dave@example.org"))
        done = subprocess.run(["rspamc", "-h", shim.http_address, "-F", "dave@example.org",
                               "-r", "bob@lab.test", "-i", "127.0.0.1", "--header",
                               "Queue-Id=json-1", str(message)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        shim.wait_log('"qid": "json-1"')
        time.sleep(0.2)
        lines = [json.loads(line) for line in shim.log_text().splitlines() if line.strip()]
    finally:
        shim.stop()
    [decision] = [doc for doc in lines if doc.get("qid") == "json-1"]
    assert (decision["final"], decision["rspamd"], decision["traffic"]) == \
        ("reject", "reject", "inbound")
    assert len(lines) > 1  # the start-up lines are JSON too (json.loads read every line)


# ------------------------------------------------------------------ LogWriter --
class _Recording:
    """A stream that records each write; ``gate`` (an Event) holds writes until set."""

    def __init__(self, gate=None, fail=False):
        self.writes, self.gate, self.fail = [], gate, fail

    def write(self, text):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise OSError(32, "Broken pipe")
        self.writes.append(text)

    def flush(self):
        pass


def _writer(stream):
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return LogWriter(handler)


def _record(text, level=logging.INFO):
    return logging.makeLogRecord({"name": "exim_policy.t", "msg": text, "levelno": level,
                                  "levelname": logging.getLevelName(level)})


def test_lines_made_together_go_out_in_one_write():
    stream = _Recording()
    writer = _writer(stream)
    for i in range(50):
        writer.handle(_record(f"line {i}"))
    writer.stop()
    assert "".join(stream.writes) == "".join(f"INFO line {i}\n" for i in range(50))
    assert len(stream.writes) <= 2  # (the thread may have woken between two records)


def test_a_stuck_target_never_blocks_the_thread_that_logs(monkeypatch):
    monkeypatch.setattr("exim_policy.logs.MAX_PENDING", 100)
    gate = threading.Event()
    stream = _Recording(gate)
    writer = _writer(stream)
    writer.handle(_record("first"))
    time.sleep(0.1)  # the writer's thread is now stuck in write("first")
    started = time.monotonic()
    for i in range(250):
        writer.handle(_record(f"line {i}"))
    assert time.monotonic() - started < 1.0
    gate.set()
    writer.stop()
    text = "".join(stream.writes)
    # 100 wait, the other 150 are dropped and counted on the next line out
    assert text.startswith("INFO first\n")
    assert "150 log line(s) lost (the log target did not keep up)\n" in text
    assert text.count("INFO line ") == 100 and "INFO line 99\n" in text
    assert "INFO line 100\n" not in text


def test_a_failed_write_is_counted_on_the_next_line_that_goes_out():
    stream = _Recording(fail=True)
    writer = _writer(stream)
    writer.handle(_record("lost one"))
    writer.handle(_record("lost two"))
    time.sleep(0.2)
    stream.fail = False
    writer.handle(_record("after"))
    writer.stop()
    assert "".join(stream.writes) == ("exim-policy: 2 log line(s) lost (the log target did "
                                      "not keep up)\nINFO after\n")


def test_switch_writes_what_waits_with_the_old_writer_then_closes_it():
    old_stream, new_stream = _Recording(threading.Event()), _Recording()
    writer = _writer(old_stream)
    old = writer.writer
    writer.handle(_record("old"))
    old_stream.gate.set()
    new = logging.StreamHandler(new_stream)
    new.setFormatter(logging.Formatter("NEW %(message)s"))
    writer.switch(new)
    writer.handle(_record("new"))
    writer.stop()
    assert "".join(old_stream.writes) == "INFO old\n" and old._closed  # type: ignore[attr-defined]
    assert "".join(new_stream.writes) == "NEW new\n"


def test_a_record_made_after_stop_is_written_at_once():
    stream = _Recording()
    writer = _writer(stream)
    writer.stop()
    writer.handle(_record("late"))
    assert stream.writes == ["INFO late\n"]


def test_a_syslog_writer_gets_each_record(tmp_path):
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    try:
        writer = LogWriter(handler_for(LoggingConfig(target="syslog", syslog_address=path)))
        writer.handle(_record("one"))
        writer.handle(_record("two", logging.WARNING))
        writer.stop()
        first, second = receiver.recv(4096).decode(), receiver.recv(4096).decode()
    finally:
        receiver.close()
    assert first.rstrip("\x00").endswith("INFO exim_policy.t: one")
    assert second.rstrip("\x00").endswith("WARNING exim_policy.t: two")
