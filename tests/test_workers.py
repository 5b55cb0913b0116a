"""``server.workers``: the key, its checks, and the pure parts of the supervisor (restart
back-off, exit statuses in words, the worker's log lines, binding shared listeners).
The daemon with workers runs in test_workers_real.py."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket

import pytest

from exim_policy import config as config_mod
from exim_policy.config import ConfigError, ListenAddress, from_dict, to_toml
from exim_policy.daemon import in_force, needs_restart
from exim_policy.logs import JsonFormatter, SYSLOG_TEXT_FORMAT, TEXT_FORMAT
from exim_policy.transport import listeners
from exim_policy.workers import (MAX_RESTART_DELAY, RESTART_DELAY, WorkerFormatter,
                                 WorkerNotifier, describe_status, restart_delay)


def test_workers_default_to_one_and_take_a_number_or_auto(monkeypatch):
    assert from_dict({}).server.workers == 1
    assert from_dict({"server": {"workers": 3}}).server.workers == 3
    monkeypatch.setattr(config_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert from_dict({"server": {"workers": "auto"}}).server.workers == 5


def test_auto_is_the_cores_this_process_may_use():
    assert config_mod.cores() == len(os.sched_getaffinity(0))
    assert from_dict({"server": {"workers": "auto"}}).server.workers == config_mod.cores()


@pytest.mark.parametrize("value", [0, -1, 65, 1.5, True, "two", "", [2]])
def test_bad_worker_counts_are_named(value):
    with pytest.raises(ConfigError) as caught:
        from_dict({"server": {"workers": value}})
    assert caught.value.errors == (
        'server.workers: expected a whole number from 1 to 64, or "auto" (the number of '
        'cores)',)


def test_workers_and_a_memory_account_store_are_refused():
    with pytest.raises(ConfigError) as caught:
        from_dict({"server": {"workers": 2}, "accounts": {"enabled": True, "store": "memory"}})
    assert caught.value.errors == (
        'server.workers: 2 workers would each count accounts on their own with '
        'accounts.store = "memory": use "sqlite" or "redis", or workers = 1',)
    # one process, or accounts off, or a shared store: fine
    from_dict({"accounts": {"enabled": True, "store": "memory"}})
    from_dict({"server": {"workers": 2}, "accounts": {"store": "memory"}})
    from_dict({"server": {"workers": 2}, "accounts": {"enabled": True, "store": "sqlite"}})


def test_workers_reads_back_and_needs_a_restart():
    config = from_dict({"server": {"workers": 4}})
    assert "workers = 4" in to_toml(config)
    assert needs_restart("server.workers")
    now, applied, kept = in_force(config, from_dict({"server": {"workers": 2}}))
    assert now.server.workers == 4 and kept == ["server.workers"] and applied == []


def test_restart_waits_double_while_a_worker_keeps_dying_at_once():
    assert restart_delay(0) == RESTART_DELAY  # it had served a while
    assert [restart_delay(n) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(40) == MAX_RESTART_DELAY


def test_exit_statuses_in_words():
    assert describe_status(0) == "exited with status 0"
    assert describe_status(2 << 8) == "exited with status 2"
    assert describe_status(signal.SIGKILL) == "was killed by signal 9 (SIGKILL)"
    assert describe_status(signal.SIGSEGV | 0x80) == "was killed by signal 11 (SIGSEGV)"


def record(message: str = "hello %s", *args: object) -> logging.LogRecord:
    return logging.LogRecord("exim_policy.decision", logging.INFO, "", 0, message,
                             args or ("there",), None)


def test_worker_log_lines_name_the_worker():
    text = WorkerFormatter(logging.Formatter(TEXT_FORMAT), 2).format(record())
    assert text.endswith(" INFO [worker 2] exim_policy.decision: hello there")
    syslog = WorkerFormatter(logging.Formatter(SYSLOG_TEXT_FORMAT), 1).format(record())
    assert syslog == f"exim-policy[{os.getpid()}]: INFO [worker 1] exim_policy.decision: " \
        "hello there"  # the syslog tag stays first
    line = WorkerFormatter(JsonFormatter("exim-policy[7]: "), 3).format(record())
    assert line.startswith('exim-policy[7]: {"worker": 3, "time": ')
    assert json.loads(line.split(": ", 1)[1])["message"] == "hello there"
    other = WorkerFormatter(logging.Formatter("%(message)s"), 4).format(record())
    assert other == "[worker 4] hello there"


def test_a_worker_tells_the_supervisor_its_states_on_a_pipe():
    read, write = os.pipe()
    try:
        notifier = WorkerNotifier(write)
        assert notifier.ready("serving") and notifier.reloading() and notifier.stopping()
        assert os.read(read, 100) == b"ready\nreloading\nstopping\n"
    finally:
        os.close(read)
    assert not notifier.ready("serving")  # no supervisor to hear it: never raises
    os.close(write)


def test_a_unix_socket_bound_once_is_served_from_the_descriptor(tmp_path, monkeypatch):
    path = str(tmp_path / "spamd.sock")
    sock = listeners.bind_unix(path, 0o660)
    assert os.stat(path).st_mode & 0o777 == 0o660
    monkeypatch.setattr(listeners, "_sharing", listeners._Sharing())
    listeners.share_listeners(unix={path: sock})

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"here")
            transport.close()

    async def main() -> bytes:
        [server] = await listeners.start_listeners((ListenAddress(path=path),), Echo)
        reader, writer = await asyncio.open_unix_connection(path)
        data = await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return data

    assert asyncio.run(main()) == b"here"


def test_a_second_unix_socket_on_a_live_one_is_an_error(tmp_path):
    path = str(tmp_path / "spamd.sock")
    first = listeners.bind_unix(path, 0o666)
    try:
        with pytest.raises(OSError):
            listeners.bind_unix(path, 0o666)
    finally:
        first.close()
    listeners.bind_unix(path, 0o666).close()  # a stale one is replaced


def test_a_taken_tcp_port_is_found_even_for_reuse_port_workers(monkeypatch):
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError):
            listeners.check_tcp_free(ListenAddress(host="127.0.0.1", port=port))
    listeners.check_tcp_free(ListenAddress(host="127.0.0.1", port=port))  # free again


def test_workers_share_tcp_ports_with_reuse_port(monkeypatch):
    monkeypatch.setattr(listeners, "_sharing", listeners._Sharing())
    listeners.share_listeners(unix={})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = ListenAddress(host="127.0.0.1", port=port)

    async def main() -> int:
        first = await listeners.start_listeners((address,), asyncio.Protocol)
        second = await listeners.start_listeners((address,), asyncio.Protocol)  # no error
        for server in (*first, *second):
            server.close()
        return len(first) + len(second)

    assert asyncio.run(main()) == 2


def test_the_supervisor_refuses_an_address_listed_twice(tmp_path):
    from exim_policy.workers import Supervisor

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = from_dict({"server": {"workers": 2, "listen": [f"127.0.0.1:{port}"],
                                   "query_listen": [f"unix:{tmp_path}/q.sock"]},
                        "quarantine": {"listen": [f"127.0.0.1:{port}"]}})
    with pytest.raises(OSError, match=f"127.0.0.1:{port} is listed twice"):
        Supervisor(config)._bind()
    assert not os.path.exists(tmp_path / "q.sock")  # nothing bound before the check


def test_sigterm_lets_every_worker_finish_its_requests(tmp_path):
    """The supervisor passes SIGTERM on; each worker answers what it holds, then all exit 0.
    (Rspamd here is the scripted slow peer of test_daemon_signals.py.)"""
    import subprocess
    import sys
    import threading
    import time
    from http.server import ThreadingHTTPServer

    from exim_policy.lab.ports import LOOPBACK, free_port, wait_tcp
    from exim_policy.lab.shim import render_toml
    from test_daemon_signals import SlowRspamd, ask, request

    rspamd = ThreadingHTTPServer((LOOPBACK, 0), SlowRspamd)
    threading.Thread(target=rspamd.serve_forever, daemon=True).start()
    port = free_port()
    (tmp_path / "forwardings.txt").write_text("# none\n")
    config = tmp_path / "config.toml"
    config.write_text(render_toml({
        "server": {"listen": [f"{LOOPBACK}:{port}"], "workers": 2},
        "rspamd": {"url": f"http://{LOOPBACK}:{rspamd.server_address[1]}", "timeout": 5.0},
        "forwarding": {"map": str(tmp_path / "forwardings.txt")},
        "quarantine": {"listen": []}}))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "exim_policy", "serve", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        wait_tcp(LOOPBACK, port, deadline, alive=lambda: proc.poll() is None)
        while b"all 2 workers serving" not in log_path.read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        replies: list[bytes] = []
        clients = [threading.Thread(target=lambda: replies.append(ask(port, request())))
                   for _ in range(8)]
        for client in clients:
            client.start()
        time.sleep(0.4)  # every request is waiting for the slow Rspamd
        proc.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(20)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        rspamd.shutdown()
        rspamd.server_close()
    assert len(replies) == 8 and all(b"Action: add header\r\n" in r for r in replies)
    text = log_path.read_text()
    assert "SIGTERM: stopping the 2 workers" in text
    assert text.count("exim_policy: stopped") == 2 and "worker 2 (pid" in text
