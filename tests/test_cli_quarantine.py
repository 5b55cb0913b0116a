"""``exim-policy quarantine`` on a store, releasing through SMTP to the lab's sink (the
real chain through Exim is tests/e2e/test_e2e_quarantine.py), and the entries under
``accounts show``."""
from __future__ import annotations

import hashlib
import json
import time

import pytest

from exim_policy.cli import main
from exim_policy.lab import SmtpSink
from exim_policy.lab.ports import LOOPBACK, free_port
from exim_policy.quarantine.evidence import Evidence
from exim_policy.quarantine.store import NewMessage, QuarantineStore

BODY = (b"From: alice@lab.test\r\nTo: x@example.com\r\nSubject: offer\r\n"
        b"Message-ID: <cli1@lab.test>\r\n\r\n.a line with a dot\r\nbuy now\r\n")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich tables are as wide as the terminal


@pytest.fixture
def sink(tmp_path):
    s = SmtpSink(tmp_path / "sink")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def config(tmp_path, sink):
    path = tmp_path / "config.toml"
    path.write_text(f'[quarantine]\nlisten = []\npath = "{tmp_path / "q"}"\n'
                    f'release_via = "smtp:{LOOPBACK}:{sink.port}"\n'
                    f'[accounts]\nenabled = true\npath = "{tmp_path / "accounts.db"}"\n')
    return path


def hold(tmp_path, body=BODY, recipients=("x@example.com", "bcc@example.org"),
         account="alice") -> str:
    store = QuarantineStore(tmp_path / "q")
    path, fh = store.temp_file()
    with fh:
        fh.write(body)
    entry_id, _ = store.commit(path, NewMessage(
        sender="alice@lab.test", recipients=recipients, size=len(body),
        sha256=hashlib.sha256(body).hexdigest(), subject="offer",
        message_id="<cli1@lab.test>",
        evidence=Evidence(account=account, score=15.0, action="reject",
                          symbols=(("GTUBE", 0.0), ("BIG", 9.5)), reason="outbound spam")))
    store.close()
    return entry_id


def cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_show_release_once_delete(tmp_path, config, sink, capsys):
    entry_id = hold(tmp_path)
    rc, out, _ = cli(capsys, "quarantine", "list", "--json", "--config", str(config))
    [row] = json.loads(out)
    assert rc == 0 and row["id"] == entry_id and row["evidence"]["account"] == "alice"
    rc, out, _ = cli(capsys, "quarantine", "list", "--config", str(config))
    assert rc == 0 and entry_id in out and "BIG, GTUBE" in out
    rc, out, _ = cli(capsys, "quarantine", "show", entry_id, "--config", str(config))
    assert rc == 0 and "bcc@example.org" in out and "buy now" in out and "Subject: offer" in out
    rc, out, _ = cli(capsys, "quarantine", "show", entry_id, "--raw", "--config", str(config))
    assert rc == 0 and out.encode() == BODY

    rc, out, _ = cli(capsys, "quarantine", "release", entry_id, "--dry-run", "--reason", "x",
                     "--config", str(config))
    assert rc == 0 and "would send" in out and sink.messages == []
    rc, out, err = cli(capsys, "quarantine", "release", entry_id, "--reason", "ok by phone",
                       "--config", str(config))
    assert rc == 0, err
    [sent] = sink.messages
    assert sent.mail_from == "alice@lab.test"
    assert sorted(sent.rcpt_tos) == ["bcc@example.org", "x@example.com"]
    assert sent.data.replace(b"\r\n", b"\n") == BODY.replace(b"\r\n", b"\n")  # dot kept
    rc, _, err = cli(capsys, "quarantine", "release", entry_id, "--reason", "again",
                     "--config", str(config))
    assert rc == 1 and "already released" in err and "ok by phone" in err
    assert len(sink.messages) == 1

    rc, _, _ = cli(capsys, "quarantine", "delete", entry_id, "--reason", "done",
                   "--config", str(config))
    assert rc == 0
    rc, out, _ = cli(capsys, "quarantine", "show", entry_id, "--json", "--config", str(config))
    doc = json.loads(out)
    assert doc["state"] == "deleted" and [a["action"] for a in doc["audit"]] == [
        "release-started", "released", "deleted"]
    assert doc["preview"] == "(the message file is gone)"


def test_release_by_account_and_errors(tmp_path, config, sink, capsys):
    hold(tmp_path, account="alice")
    hold(tmp_path, body=BODY + b"other", account="bob")
    rc, _, err = cli(capsys, "quarantine", "release", "--account", "nobody", "--reason", "x",
                     "--config", str(config))
    assert rc == 1 and "no held messages" in err
    rc, _, err = cli(capsys, "quarantine", "release", "--reason", "x", "--config", str(config))
    assert rc == 2 and "not both" in err
    rc, out, _ = cli(capsys, "quarantine", "release", "--account", "alice", "--reason", "x",
                     "--config", str(config))
    assert rc == 0 and len(sink.messages) == 1
    rc, _, err = cli(capsys, "quarantine", "release", "nope", "--reason", "x",
                     "--config", str(config))
    assert rc == 1 and "no such message" in err
    rc, _, err = cli(capsys, "quarantine", "list", "--since", "soon", "--config", str(config))
    assert rc == 2 and "--since" in err


def test_release_path_down_keeps_it_held(tmp_path, capsys):
    config = tmp_path / "down.toml"
    config.write_text(f'[quarantine]\nlisten = []\npath = "{tmp_path / "q"}"\n'
                      f'release_via = "smtp:{LOOPBACK}:{free_port()}"\n')
    entry_id = hold(tmp_path)
    rc, _, err = cli(capsys, "quarantine", "release", entry_id, "--reason", "x",
                     "--config", str(config))
    assert rc == 2 and "still held" in err
    rc, out, _ = cli(capsys, "quarantine", "show", entry_id, "--json", "--config", str(config))
    assert json.loads(out)["state"] == "held"


def test_purge_and_missing_store(tmp_path, config, capsys):
    hold(tmp_path)
    rc, out, _ = cli(capsys, "quarantine", "purge", "--config", str(config))
    assert rc == 0 and out.startswith("purged 0 entries older than 30d")
    time.sleep(0.01)
    rc, out, _ = cli(capsys, "quarantine", "purge", "--older-than", "0.001s", "--config",
                     str(config))
    assert rc == 0 and out.startswith("purged 1 entry")
    other = tmp_path / "none.toml"
    other.write_text(f'[quarantine]\npath = "{tmp_path / "nothing"}"\n')
    rc, _, err = cli(capsys, "quarantine", "list", "--config", str(other))
    assert rc == 2 and "no quarantine here" in err


def test_accounts_show_lists_the_accounts_quarantined_messages(tmp_path, config, capsys):
    import asyncio

    from exim_policy.config import load
    from exim_policy.model import MessageEvent
    from exim_policy.state.sqlite import SqliteStore

    async def seed():
        store = SqliteStore(load(config).accounts)
        await store.record("alice", MessageEvent(at=time.time(), recipients=("x@example.com",),
                                                 counted=True, spam=True), (), time.time())
        await store.close()
    asyncio.run(seed())
    entry_id = hold(tmp_path)
    rc, out, _ = cli(capsys, "accounts", "show", "alice", "--json", "--config", str(config))
    assert rc == 0 and [e["id"] for e in json.loads(out)["quarantined"]] == [entry_id]
    rc, out, _ = cli(capsys, "accounts", "show", "alice", "--config", str(config))
    assert rc == 0 and "quarantined (1)" in out and entry_id in out


@pytest.mark.real
def test_learn_ham_asks_the_real_rspamd_controller(tmp_path, sink, rspamd_running, capsys):
    """--learn-ham posts the released message to Rspamd's /learnham; the lab Rspamd has no
    Bayes store, so its refusal must come back as a clear line, the release standing."""
    config = tmp_path / "learn.toml"
    config.write_text(f'[quarantine]\nlisten = []\npath = "{tmp_path / "q"}"\n'
                      f'release_via = "smtp:{LOOPBACK}:{sink.port}"\n'
                      f'[rspamd]\ncontroller_url = "{rspamd_running.controller_url}"\n')
    entry_id = hold(tmp_path)
    rc, out, err = cli(capsys, "quarantine", "release", entry_id, "--reason", "ham",
                       "--learn-ham", "--config", str(config))
    assert f"{entry_id}: released to 2" in out and len(sink.messages) == 1
    if rc == 0:
        assert f"{entry_id}: learned as ham" in out or "not learned again" in out
    else:
        assert rc == 2 and f"learn-ham: {rspamd_running.controller_url}/learnham: HTTP" in err
