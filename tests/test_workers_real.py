"""``server.workers = 2`` on the real shim in front of the real Rspamd: both workers answer
on one port, SIGHUP reaches both, a killed worker is started again while the other goes on
serving, SIGTERM stops them all, accounts and metrics count for the whole daemon.

systemd's notify socket is a datagram socket of the test's (no systemd runs here)."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid

import pytest

from exim_policy.lab import messages
from exim_policy.lab.ports import LOOPBACK, tcp_accepts
from exim_policy.lab.process import pid_alive
from exim_policy.lab.shim import ShimLab
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
REMOTE = "carol@example.com"
SPAM_ACTIONS = 'spam_actions = ["reject"]'


def exim_request(message: bytes, *, qid: str, user: str | None = None,
            rcpt: str = LOCAL) -> bytes:
    """The bytes Exim sends (variant=rspamd), with a queue id of its own."""
    body = exim_mbox_wrap(message, sender="alice@example.org", recipients=[rcpt])
    return (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: {qid}\r\n"
            f"From: <alice@example.org>\r\nRecipient-Number: 1\r\nRcpt: <{rcpt}>\r\n"
            "Helo: client.test\r\nIP: 127.0.0.1\r\n"
            + (f"User: {user}\r\n" if user else "") + "\r\n").encode() + body


def ask(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(payload)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def action_of(reply: bytes) -> str:
    lines = reply.split(b"\r\n")
    assert lines[0] == b"RSPAMD/1.3 0 EX_OK", reply[:200]
    return lines[2].removeprefix(b"Action: ").decode()


def new_qid() -> str:
    return f"1w-{uuid.uuid4().hex[:10]}"


def answering_worker(shim: ShimLab, qid: str) -> int:
    """The worker whose decision line has ``qid``."""
    log = shim.wait_log(f"qid={qid} ")
    line = next(line for line in log.splitlines() if f"qid={qid} " in line)
    found = re.search(r"\[worker (\d+)\] exim_policy\.decision: ", line)
    assert found, line
    return int(found.group(1))


def listening_sockets(port: int) -> set[str]:
    """The inodes of the listening TCP sockets on 127.0.0.1:``port`` (/proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    return inodes


def listening_pids(port: int) -> set[int]:
    """The pids holding a listening TCP socket on 127.0.0.1:``port``."""
    inodes = listening_sockets(port)
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            targets = {os.readlink(f"/proc/{pid}/fd/{fd}")
                       for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in targets for inode in inodes):
            pids.add(int(pid))
    return pids


def states(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def no_more_datagrams(sock: socket.socket, wait: float = 1.0) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(20)
    return False


def scraped(shim: ShimLab, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` (with ``labels``) of one scrape."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(shim.metrics_url, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def messages_total(shim: ShimLab) -> float:
    return scraped(shim, "exim_policy_messages_total")


@pytest.fixture
def shim(rspamd_running, tmp_path, notify_socket):
    lab = ShimLab(tmp_path, rspamd_url=rspamd_running.url, workers=2, metrics={})
    text = lab.config_path.read_text()
    lab.config_path.write_text(text.replace("[outbound]\n", f"[outbound]\n{SPAM_ACTIONS}\n"))
    lab.start(env={"NOTIFY_SOCKET": notify_socket[0]})
    yield lab
    lab.stop()


def test_two_workers_answer_on_one_port(shim, notify_socket):
    workers = shim.worker_pids()
    assert len(workers) == 2 and shim.proc.pid not in workers
    # each worker holds a listening socket of its own on the port; the supervisor none
    assert listening_pids(shim.port) == set(workers)
    qids = [new_qid() for _ in range(40)]
    for qid in qids:
        assert action_of(ask(shim.port, exim_request(messages.ham(to=LOCAL), qid=qid))) == \
            "no action"
    answered = [answering_worker(shim, qid) for qid in qids]
    assert set(answered) == {1, 2}, answered  # the kernel spreads the connections
    # READY=1 once, from the supervisor, when both serve
    assert states(notify_socket[1])["READY"] == "1"
    assert no_more_datagrams(notify_socket[1])
    # the scrape of either worker counts the whole daemon's messages
    assert all(messages_total(shim) == len(qids) for _ in range(6))


def test_sighup_reaches_both_workers(shim, notify_socket):
    sock = notify_socket[1]
    assert states(sock)["READY"] == "1"
    outbound = lambda: action_of(ask(shim.port, exim_request(  # noqa: E731
        messages.x_test_spam(to=LOCAL), qid=new_qid(), user="tester")))
    assert outbound() == "add header"
    shim.config_path.write_text(shim.config_path.read_text().replace(
        SPAM_ACTIONS, 'spam_actions = ["reject", "add header"]'))
    shim.reload()
    assert states(sock)["RELOADING"] == "1"
    assert states(sock)["READY"] == "1"  # once both have reloaded
    for index in (1, 2):  # (a worker's line may trail its report to the supervisor)
        shim.wait_log(f"[worker {index}] exim_policy: reload: {shim.config_path} in force; "
                      "changed: outbound.spam_actions")
    assert "reload: done by every worker" in shim.log_text()
    # whichever worker answers, the new file is in force
    assert {outbound() for _ in range(20)} == {"reject"}
    # one SIGHUP, one reload in the metrics (as with one process), whichever worker is asked
    assert {scraped(shim, "exim_policy_config_reloads_total", result="ok")
            for _ in range(6)} == {1.0}


def test_a_reload_to_json_logs_keeps_naming_the_worker(shim):
    import json

    shim.config_path.write_text(shim.config_path.read_text().replace(
        'format = "text"', 'format = "json"'))
    shim.reload()
    shim.wait_log("reload: done by every worker")
    qids = [new_qid() for _ in range(20)]
    for qid in qids:
        ask(shim.port, exim_request(messages.ham(to=LOCAL), qid=qid))
    shim.wait_log(f'"qid": "{qids[-1]}"')
    lines = [json.loads(line) for line in shim.log_text().splitlines()
             if line.startswith("{") and '"qid": "1w-' in line]
    assert {line["worker"] for line in lines} == {1, 2}
    assert all(line["logger"] == "exim_policy.decision" for line in lines)


def test_a_killed_worker_is_restarted_and_no_other_request_is_lost(shim):
    before = shim.worker_pids()
    victim = before[1]
    results: list[tuple[float, float, str]] = []  # (started, ended, outcome)
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                outcome = action_of(ask(shim.port, exim_request(messages.ham(to=LOCAL),
                                                           qid=new_qid())))
            except (OSError, AssertionError, IndexError) as exc:
                outcome = f"failed: {exc!r}"
            results.append((started, time.monotonic(), outcome))

    clients = [threading.Thread(target=load) for _ in range(6)]
    for client in clients:
        client.start()
    try:
        time.sleep(1.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while len(listening_sockets(shim.port)) > 1:  # until the kernel closed its socket
            time.sleep(0.001)
        dead_at = time.monotonic()
        log = shim.wait_log(f"worker 2 (pid {victim}) was killed by signal 9 (SIGKILL)")
        deadline = time.monotonic() + 15
        while len(after := shim.worker_pids()) < 2 or victim in after:
            assert time.monotonic() < deadline, shim.log_tail()
            time.sleep(0.05)
        shim.wait_log(f"worker 2 (pid {after[1]}) serving again")
        time.sleep(1.5)  # the restarted worker takes its share
    finally:
        done.set()
        for client in clients:
            client.join(60)
    assert "starting it again in 0.5s" in log
    assert after[0] == before[0]  # the other worker went on
    failed = [r for r in results if r[2] != "no action"]
    # lost: only what the killed worker held, the requests it had when it was killed and
    # the connections the kernel gave its socket until that was closed (a client whose
    # request it closed may have sent the next one there too)
    assert all(started <= dead_at and ended >= killed_at for started, ended, _ in failed), \
        (killed_at, dead_at, failed)
    assert sum(1 for started, _, ok in results if started > dead_at and ok == "no action") > 20
    assert listening_pids(shim.port) == set(after)
    # the dead worker's counts stay in the metrics: answered = counted
    answered = sum(1 for r in results if r[2] == "no action")
    assert messages_total(shim) >= answered


def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(shim, notify_socket):
    sock = notify_socket[1]
    assert states(sock)["READY"] == "1"
    workers = shim.worker_pids()
    proc = shim.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert states(sock)["STOPPING"] == "1"
    assert not any(pid_alive(pid) for pid in workers)
    assert not tcp_accepts(LOOPBACK, shim.port, 1.0)
    log = shim.log_text()
    assert "SIGTERM: stopping the 2 workers" in log
    assert "worker 1 (pid" in log and "worker 2 (pid" in log and "stopped" in log


def test_a_taken_port_or_a_worker_that_cannot_start_stops_the_daemon(rspamd_running,
                                                                    tmp_path):
    taken = ShimLab(tmp_path / "first", rspamd_url=rspamd_running.url)
    taken.start()
    try:
        # the supervisor finds the port taken before any worker starts
        lab = ShimLab(tmp_path / "second", rspamd_url=rspamd_running.url, workers=2,
                      server={"http_listen": [f"{LOOPBACK}:{taken.http_port}"]})
        with pytest.raises(RuntimeError, match="cannot serve: .*Address already in use"):
            lab.start(timeout=15)
    finally:
        taken.stop()
    # a worker cannot open the account store: it exits 2, and so does the daemon
    lab = ShimLab(tmp_path / "third", rspamd_url=rspamd_running.url, workers=2, extra_toml=(
        f'\n[accounts]\nenabled = true\npath = "{tmp_path}/no/such/dir/accounts.db"\n'))
    with pytest.raises(RuntimeError, match="exim-policy: config: accounts.path"):
        lab.start(timeout=15)
    log = lab.log_text()
    assert "while starting: stopping the daemon" in log and "exited with status 2" in log


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_an_account_limit_counts_every_workers_messages(rspamd_running, tmp_path, store,
                                                        request: pytest.FixtureRequest):
    limit = 6
    if store == "redis":
        redis = request.getfixturevalue("redis_server")
        if not redis.alive():
            redis.start()
        where = f'store = "redis"\nredis_url = "{redis.url}"\n' \
                f'redis_prefix = "workers-{uuid.uuid4().hex[:8]}:"\n'
    else:
        where = f'store = "sqlite"\npath = "{tmp_path / "accounts.db"}"\n'
    lab = ShimLab(tmp_path, rspamd_url=rspamd_running.url, workers=2, extra_toml=(
        f"\n[accounts]\nenabled = true\n{where}"
        f'[[accounts.limits]]\nwindow = "1h"\nmessages = {limit}\n'))
    lab.start()
    try:
        answers = []
        for _ in range(limit + 12):
            qid = new_qid()
            answers.append((action_of(ask(lab.port, exim_request(
                messages.ham(to=REMOTE), qid=qid, user="alice", rcpt=REMOTE))), qid))
        assert [a for a, _ in answers[:limit]] == ["no action"] * limit
        assert [a for a, _ in answers[limit:]] == ["soft reject"] * 12
        counted = {answering_worker(lab, qid) for _, qid in answers[:limit]}
        throttled = {answering_worker(lab, qid) for _, qid in answers[limit:]}
        assert throttled == {1, 2}, "each worker throttles on every worker's count"
        assert counted, counted
    finally:
        lab.stop()


def test_the_quarantine_receiver_runs_in_worker_1_only(rspamd_running, tmp_path):
    lab = ShimLab(tmp_path, rspamd_url=rspamd_running.url, workers=2, quarantine={})
    lab.start()
    try:
        first, second = lab.worker_pids()
        assert listening_pids(lab.quarantine_port) == {first}
        assert listening_pids(lab.port) == {first, second}
        assert "quarantine receiver in worker 1" in lab.wait_log("[worker 2] exim_policy: "
                                                                 "exim-policy worker 2 of 2")
    finally:
        lab.stop()
