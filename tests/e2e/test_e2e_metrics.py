"""``GET /metrics`` of the real daemon in front of the real Rspamd, scraped over HTTP before,
during and after real traffic: Exim (the project's config), Exim's exact variant=rspamd
bytes, the real ``spamc`` and ``rspamc`` clients.

    smtplib --SMTP--> Exim --spamd_address--> shim (metrics on) --HTTP--> Rspamd
    spamc / Exim's bytes ------------------^    ^
    rspamc --HTTP /checkv2---------------------'     curl/urllib --> /metrics

The shim here is one of this module's own ([metrics] listen + http_front), not the
session's: its counters start at zero and nothing else sends to it.
"""
from __future__ import annotations

import concurrent.futures
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e_helpers import start_or_fail
from exim_policy.lab import RspamdLab, SmtpSink, messages
from exim_policy.lab.addresses import FORWARD_TARGET, FORWARDER
from exim_policy.lab.exim import EximLab
from exim_policy.lab.ports import free_port
from exim_policy.lab.shim import ShimLab
from exim_policy.lab.smtp import send
from exim_policy.metrics import CONTENT_TYPE
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
SENDER = "alice@example.org"
MESSAGES = "exim_policy_messages_total"


# ----------------------------------------------------------------------- helpers --
def scrape(url: str) -> dict:
    """(sample name, sorted labels) -> value, over real HTTP."""
    with urllib.request.urlopen(url, timeout=20) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"] == CONTENT_TYPE
        text = reply.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in found.items() if n == name and want <= set(lab))


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def exim_request(message: bytes, rcpts=(LOCAL,), queue_id: str = "1metric-000001-00") -> bytes:
    """What Exim 4.96 sends with variant=rspamd."""
    body = exim_mbox_wrap(message, sender=SENDER, recipients=list(rcpts))
    head = (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: {queue_id}\r\n"
            f"From: <{SENDER}>\r\nRecipient-Number: {len(rcpts)}\r\n"
            + "".join(f"Rcpt: <{r}>\r\n" for r in rcpts)
            + "Helo: client.test\r\nIP: 127.0.0.1\r\n\r\n")
    return head.encode() + body


def ask(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def action_of(reply: bytes) -> str:
    line = reply.split(b"\r\n")[2]
    assert line.startswith(b"Action: "), reply[:200]
    return line[len(b"Action: "):].decode()


# ---------------------------------------------------------------------- fixtures --
@pytest.fixture(scope="module")
def metered(e2e_dir: Path, rspamd: RspamdLab) -> Iterator[ShimLab]:
    lab = ShimLab(e2e_dir / "metrics", rspamd_url=rspamd.url, forwarding=(FORWARDER,),
                  relay_networks=("::1/128",), metrics={"http_front": True})
    start_or_fail(lab, "the shim with metrics")
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def metered_exim(e2e_dir: Path, metered: ShimLab, sink: SmtpSink) -> Iterator[EximLab]:
    lab = EximLab(e2e_dir / "metrics", spamd_address=metered.spamd_address,
                  sink_port=sink.port, relay_hosts="<; ::1", aliases={"fwd": FORWARD_TARGET})
    start_or_fail(lab, "the lab's Exim for the metered shim")
    yield lab
    lab.stop()


@pytest.fixture
def running(metered: ShimLab, rspamd_running: RspamdLab) -> ShimLab:
    if not metered.alive():
        metered.start()
    return metered


# ------------------------------------------------------------------------- tests --
def test_counters_move_by_exactly_the_messages_sent_per_protocol_and_action(
        running: ShimLab, tmp_path: Path) -> None:
    before = scrape(running.metrics_url)
    hams, spams = 12, 3
    for i in range(hams):
        reply = ask(running.port, exim_request(messages.ham(LOCAL), queue_id=f"1m-{i:06d}-00"))
        assert action_of(reply) == "no action"
    for _ in range(spams):
        assert action_of(ask(running.port, exim_request(messages.gtube(LOCAL)))) == "reject"
    binary = shutil.which("spamc")
    assert binary, "spamc is missing: apt-get install spamc"
    for _ in range(2):
        done = subprocess.run([binary, "-d", "127.0.0.1", "-p", str(running.port), "-u",
                               "nobody", "-c"], input=messages.gtube(LOCAL),
                              capture_output=True, timeout=30)
        assert done.returncode == 1, done  # spam
    path = tmp_path / "ham.eml"
    path.write_bytes(messages.ham(LOCAL))
    for _ in range(3):
        done = subprocess.run(["rspamc", "-h", running.http_address, "-F", SENDER, "-r", LOCAL,
                               "-i", "127.0.0.1", str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
    # the same endpoint on the HTTP front (metrics.http_front = true)
    after_front = scrape(f"http://{running.http_address}/metrics")
    after = scrape(running.metrics_url)

    rspamc_labels = dict(protocol="rspamc", traffic="inbound")
    assert moved(before, after, MESSAGES, **rspamc_labels, rspamd_action="no action",
                 action="no action") == hams
    assert moved(before, after, MESSAGES, **rspamc_labels, rspamd_action="reject",
                 action="reject") == spams
    assert moved(before, after, MESSAGES, protocol="spamc", rspamd_action="reject") == 2
    assert moved(before, after, MESSAGES, protocol="http") == 3
    sent = hams + spams + 2 + 3
    assert moved(before, after, MESSAGES) == sent
    assert moved(before, after, "exim_policy_answer_duration_seconds_count") == sent
    assert moved(before, after, "exim_policy_scan_duration_seconds_count") == sent
    assert moved(before, after, "exim_policy_scanner_failures_total") == 0
    # the front's scrape came before the last one: nothing was sent in between
    assert total(after_front, MESSAGES) == total(after, MESSAGES)
    assert total(after, "exim_policy_forwarding_map_entries") == 1
    assert total(after, "exim_policy_forwarding_map_loaded_timestamp_seconds") > 0
    assert total(after, "process_cpu_seconds_total") > 0


def test_the_endpoint_answers_while_busy_and_counts_every_message(running: ShimLab) -> None:
    n, concurrency = 240, 8
    payloads = [exim_request(messages.ham(LOCAL), queue_id=f"1load-{i:06d}-00")
                for i in range(n)]
    before = scrape(running.metrics_url)
    sending = threading.Event()
    sending.set()
    seen: list[tuple[float, float, float]] = []

    def scraper() -> None:
        while sending.is_set():
            found = scrape(running.metrics_url)
            seen.append((time.monotonic(), total(found, MESSAGES),
                         total(found, "exim_policy_requests_in_flight")))
            time.sleep(0.02)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            actions = list(pool.map(lambda p: action_of(ask(running.port, p)), payloads))
    finally:
        sending.clear()
        thread.join(30)
    after = scrape(running.metrics_url)
    assert actions == ["no action"] * n
    assert moved(before, after, MESSAGES) == n
    assert moved(before, after, MESSAGES, protocol="rspamc", rspamd_action="no action") == n
    during = [count for _, count, _ in seen
              if total(before, MESSAGES) < count < total(after, MESSAGES)]
    assert len(during) >= 3, seen  # scraped while messages were being answered
    assert max(in_flight for _, _, in_flight in seen) >= 1, seen
    counts = [count for _, count, _ in seen]
    assert counts == sorted(counts)  # a counter never goes back


def test_real_exim_messages_are_counted_once_each(metered_exim: EximLab, running: ShimLab,
                                                   smtp_sink: SmtpSink) -> None:
    before = scrape(running.metrics_url)
    hams, spams = 6, 2
    for _ in range(hams):
        assert send(metered_exim, messages.ham(LOCAL), (LOCAL,)).accepted
    for _ in range(spams):
        assert send(metered_exim, messages.gtube(LOCAL), (LOCAL,)).code == 550
    after = scrape(running.metrics_url)
    assert moved(before, after, MESSAGES) == hams + spams
    assert moved(before, after, MESSAGES, protocol="rspamc", traffic="inbound",
                 rspamd_action="reject", action="reject") == spams
    assert moved(before, after, "exim_policy_answer_duration_seconds_count") == hams + spams


def test_rspamd_unreachable_counts_connect_failures(e2e_dir: Path) -> None:
    dead = ShimLab(e2e_dir / "metrics-dead", rspamd_url=f"http://127.0.0.1:{free_port()}",
                   metrics={})
    start_or_fail(dead, "the shim with metrics and no Rspamd")
    try:
        before = scrape(dead.metrics_url)
        for _ in range(5):  # inbound: failure.inbound = accept
            assert action_of(ask(dead.port, exim_request(messages.ham(LOCAL)))) == "no action"
        after = scrape(dead.metrics_url)
    finally:
        dead.stop()
    assert moved(before, after, "exim_policy_scanner_failures_total", kind="connect") == 5
    assert moved(before, after, MESSAGES, rspamd_action="FAILED", action="no action") == 5
    assert moved(before, after, "exim_policy_scan_duration_seconds_count") == 5
