"""The daemon's log output (exim_policy/logs.py): JSON lines with the decision's fields,
syslog, and the real daemon writing JSON for a message scanned by the real Rspamd."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from exim_policy.config import ConfigError, LoggingConfig, from_dict
from exim_policy.lab import messages
from exim_policy.lab.shim import ShimLab
from exim_policy.logs import JsonFormatter, handler_for
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
