"""SIGHUP on the real shim in front of the real Rspamd: a valid file is put in force, a
broken one changes nothing, and no scan under way or arriving fails meanwhile. systemd's
notify socket is a datagram socket of the test's (no systemd runs here as PID 1)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from exim_policy.lab import messages
from exim_policy.lab.ports import free_port
from exim_policy.lab.shim import ShimLab
from test_shim_real import LOCAL, action_of, ask, exim_rspamc

pytestmark = pytest.mark.real

SPAM_ACTIONS = 'spam_actions = ["reject"]'


@pytest.fixture
def shim(rspamd, tmp_path, notify_socket):
    lab = ShimLab(tmp_path, rspamd_url=rspamd.url, metrics={})
    text = lab.config_path.read_text()
    lab.config_path.write_text(text.replace("[outbound]\n", f"[outbound]\n{SPAM_ACTIONS}\n"))
    lab.start(env={"NOTIFY_SOCKET": notify_socket[0]})
    yield lab
    lab.stop()


def states(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def outbound_add_header(port: int) -> str:
    """An authenticated message Rspamd answers "add header" for (X-Test-Spam)."""
    return action_of(ask(port, exim_rspamc(messages.x_test_spam(to=LOCAL), user="tester")))


def edit(shim: ShimLab, old: str, new: str) -> None:
    text = shim.config_path.read_text()
    assert old in text
    shim.config_path.write_text(text.replace(old, new))


def reloads(shim: ShimLab) -> dict[str, float]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    body = requests.get(shim.metrics_url, timeout=10).text
    return {sample.labels["result"]: sample.value
            for family in text_string_to_metric_families(body)
            if family.name == "exim_policy_config_reloads"
            for sample in family.samples if sample.name.endswith("_total")}


def test_systemd_hears_ready_reloading_and_stopping(shim, notify_socket):
    _path, sock = notify_socket
    assert states(sock)["READY"] == "1"
    shim.reload()
    reloading = states(sock)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert states(sock)["READY"] == "1"  # done (with the same file: nothing changed)
    shim.stop()
    assert states(sock)["STOPPING"] == "1"


def test_a_valid_file_is_put_in_force_and_restart_keys_are_named(shim):
    assert outbound_add_header(shim.port) == "add header"
    edit(shim, SPAM_ACTIONS, 'spam_actions = ["reject", "add header"]')
    other_port = free_port()
    edit(shim, f'listen = ["127.0.0.1:{shim.port}"]', f'listen = ["127.0.0.1:{other_port}"]')
    shim.reload()
    log = shim.wait_log("reload: ")
    shim.wait_log("in force; changed: outbound.spam_actions")
    assert "kept as they are until a restart: server.listen" in shim.wait_log("until a restart")
    # outbound add-header spam is now outbound spam; the old port still serves
    assert outbound_add_header(shim.port) == "reject"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", other_port), timeout=1).close()
    assert "error" not in log.split("reload: ", 1)[1].lower()
    assert reloads(shim) == {"ok": 1.0, "failed": 0.0}


def test_a_broken_file_under_load_keeps_the_config_and_fails_no_scan(shim):
    answers: list[str] = []
    problems: list[str] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                answers.append(outbound_add_header(shim.port))
            except Exception as exc:  # a dropped connection or a reply Exim cannot read
                problems.append(repr(exc))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        time.sleep(0.5)
        good = shim.config_path.read_text()
        broken = good.replace(SPAM_ACTIONS, 'spam_actions = "reject"\nno_such_key = 1')
        for _ in range(3):
            shim.config_path.write_text(broken)
            shim.reload()
            time.sleep(0.3)
            shim.config_path.write_text(good)
            shim.reload()
            time.sleep(0.3)
        shim.config_path.write_text(broken)
        shim.reload()
        time.sleep(0.5)
    finally:
        done.set()
        for client in clients:
            client.join(30)
    assert problems == []
    assert len(answers) > 20 and set(answers) == {"add header"}, set(answers)
    log = shim.wait_log("the configuration in force is kept")
    assert "has 2 error(s)" in log
    assert "outbound.no_such_key: unknown key" in log
    assert "outbound.spam_actions: expected a list" in log
    counts = reloads(shim)
    assert counts["failed"] == 4.0 and counts["ok"] == 3.0


def test_logging_switches_format_on_reload(shim):
    edit(shim, 'format = "text"', 'format = "json"')
    shim.reload()
    shim.wait_log("in force; changed: logging.format")
    assert outbound_add_header(shim.port) == "add header"
    line = shim.wait_log('"final": "add header"').splitlines()[-1]
    assert line.startswith("{") and '"logger": "exim_policy.decision"' in line
