"""The daemon process and its signals: SIGTERM lets a request in flight finish, SIGHUP
re-reads the forwarding map at once, a taken port is a clear error.

Rspamd here is a scripted local HTTP peer that answers slowly: the point is the timing of
the shim's own shutdown, not Rspamd's verdict (the real Rspamd is in test_shim_real.py).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exim_policy.lab.ports import LOOPBACK, free_port, wait_tcp
from exim_policy.lab.shim import render_toml

REPLY = {"action": "add header", "score": 7.0, "required_score": 15.0, "symbols": {},
         "messages": {}}


class SlowRspamd(BaseHTTPRequestHandler):
    delay = 1.0

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        body = json.dumps(REPLY).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def slow_rspamd():
    server = ThreadingHTTPServer((LOOPBACK, 0), SlowRspamd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def request(rcpt: str = "fwd@lab.test") -> bytes:
    body = b"Subject: hi\n\nhello\n"
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nFrom: <a@example.org>\r\n"
            f"Rcpt: <{rcpt}>\r\nIP: 127.0.0.1\r\n\r\n").encode() + body


def ask(port: int, payload: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
        sock.sendall(payload)
        return b"".join(iter(lambda: sock.recv(65536), b""))


@pytest.fixture()
def daemon(tmp_path, slow_rspamd):
    port = free_port()
    fmap = tmp_path / "forwardings.txt"
    fmap.write_text("# none yet\n")
    config = tmp_path / "config.toml"
    config.write_text(render_toml({
        "server": {"listen": [f"{LOOPBACK}:{port}"]},
        "rspamd": {"url": slow_rspamd, "timeout": 5.0},
        # a long poll interval: only SIGHUP can explain a quick reload
        "forwarding": {"map": str(fmap), "reload_interval": 3600.0},
        "quarantine": {"listen": []},
    }))
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "exim_policy", "serve", "--config",
                             str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_tcp(LOOPBACK, port, time.monotonic() + 20, alive=lambda: proc.poll() is None)
    yield proc, port, fmap, config
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_sigterm_finishes_the_request_in_flight_then_exits(daemon):
    proc, port, _, _ = daemon
    result = {}
    client = threading.Thread(target=lambda: result.update(reply=ask(port, request())))
    client.start()
    time.sleep(0.3)  # the request is now waiting for the slow Rspamd
    proc.send_signal(signal.SIGTERM)
    client.join(20)
    assert b"Action: add header\r\n" in result["reply"]
    assert proc.wait(20) == 0
    with pytest.raises(OSError):  # and nothing listens any more
        socket.create_connection((LOOPBACK, port), timeout=2).close()


def test_sighup_reloads_the_forwarding_map_at_once(daemon):
    proc, port, fmap, _ = daemon
    SlowRspamd.delay = 0.0
    try:
        assert b"Action: add header\r\n" in ask(port, request())
        tmp = fmap.with_suffix(".new")
        tmp.write_text("fwd@lab.test\n")
        os.replace(tmp, fmap)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while b"Action: reject\r\n" not in ask(port, request()):
            assert time.monotonic() < deadline, "SIGHUP did not reload the map"
            time.sleep(0.05)
    finally:
        SlowRspamd.delay = 1.0


def test_a_taken_port_is_a_clear_error(daemon, tmp_path):
    _, _, _, config = daemon  # same config: its port is taken by the running daemon
    done = subprocess.run([sys.executable, "-m", "exim_policy", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "cannot serve" in done.stderr and "Traceback" not in done.stderr
