"""``exim-policy accounts``: list, show, lock, unlock, reset on the SQLite store, with the
audit trail, the ``show --json`` contract, and the notice a human's lock sends."""
from __future__ import annotations

import json
import time

import pytest

from exim_policy.cli import main
from exim_policy.config import from_dict
from exim_policy.lab.ports import free_port
from exim_policy.model import MessageEvent
from exim_policy.state.sqlite import SqliteStore

SHOW_KEYS = {"account", "state", "counts", "incidents", "audit"}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[accounts]\nenabled = true\npath = "{tmp_path / "accounts.db"}"\n'
                    '[[accounts.limits]]\nwindow = "1h"\nmessages = 2\n'
                    f'[accounts.notify]\nmail_to = ["abuse@lab.test"]\n'
                    f'smtp = "127.0.0.1:{free_port()}"\nattempts = 1\ntimeout = 2.0\n')
    return path


def cli(capsys, *argv):
    rc = main(["accounts", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def seed(config_path, account="alice", messages=2):
    """Messages as the daemon records them (the CLI and the daemon share the store)."""
    import asyncio

    from exim_policy.config import load

    config = load(config_path)

    async def go():
        store = SqliteStore(config.accounts)
        for i in range(messages):
            await store.record(account, MessageEvent(
                at=time.time(), recipients=("x@example.net",), counted=True, spam=i == 0,
                ip="192.0.2.7", queue_id=f"q{i}", subject="hello"), (), time.time())
        await store.close()
    asyncio.run(go())


def test_show_json_contract_and_throttled_state(config, capsys):
    seed(config)
    rc, out, _ = cli(capsys, "show", "alice", "--json", "--config", str(config))
    doc = json.loads(out)
    assert rc == 0 and SHOW_KEYS <= set(doc)
    assert doc["state"] == "throttled"       # two messages, the limit is two per hour
    assert doc["counts"] == {"1h": {"messages": 2, "recipients": 2, "unique_recipients": 1}}
    assert doc["recent"][0]["subject"] == "hello"


def test_lock_unlock_is_audited_with_who_and_why(config, capsys, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "carol")
    seed(config)
    rc, out, err = cli(capsys, "lock", "alice", "--reason", "phished", "--config", str(config))
    assert rc == 0 and out.strip() == "alice: locked (incident 1)"
    # no mail server listens: the lock stands, the failed notice is a warning
    assert "warning: notice not delivered: mail to abuse@lab.test" in err
    rc, _, err = cli(capsys, "lock", "alice", "--reason", "again", "--config", str(config))
    assert rc == 1 and "already locked" in err
    rc, out, _ = cli(capsys, "show", "alice", "--json", "--config", str(config))
    doc = json.loads(out)
    assert doc["state"] == "locked"
    [incident] = doc["incidents"]
    assert incident["id"] == 1 and incident["state"] == "locked"
    assert incident["evidence"]["client_ips"] == ["192.0.2.7"]
    rc, out, _ = cli(capsys, "unlock", "alice", "--reason", "password changed",
                     "--config", str(config))
    assert rc == 0
    doc = json.loads(cli(capsys, "show", "alice", "--json", "--config", str(config))[1])
    assert doc["state"] == "ok" and doc["counts"]["1h"]["messages"] == 0
    assert [(a["who"], a["action"], a["reason"]) for a in doc["audit"]] == [
        ("carol", "unlocked", "password changed"), ("carol", "locked", "locked by carol: phished")]
    assert doc["incidents"][0]["state"] == "closed" and doc["incidents"][0]["closed"]


def test_reset_clears_counters_only(config, capsys):
    seed(config)
    cli(capsys, "lock", "alice", "--reason", "x", "--config", str(config))
    rc, out, _ = cli(capsys, "reset", "alice", "--config", str(config))
    assert rc == 0 and "counters cleared" in out
    doc = json.loads(cli(capsys, "show", "alice", "--json", "--config", str(config))[1])
    assert doc["state"] == "locked" and doc["counts"]["1h"]["messages"] == 0
    assert doc["audit"][0]["action"] == "reset"


def test_list_and_unknown_accounts(config, capsys):
    seed(config, "alice", 1)
    seed(config, "ip:192.0.2.9", 1)
    rc, out, _ = cli(capsys, "list", "--json", "--config", str(config))
    assert rc == 0 and [r["account"] for r in json.loads(out)] == ["alice", "ip:192.0.2.9"]
    rc, out, _ = cli(capsys, "list", "--config", str(config))
    assert "alice" in out and "ip:192.0.2.9" in out
    rc, _, err = cli(capsys, "show", "nobody", "--config", str(config))
    assert rc == 1 and "no such account" in err
    rc, _, err = cli(capsys, "unlock", "nobody", "--reason", "x", "--config", str(config))
    assert rc == 1 and "nothing to unlock" in err


def test_a_lock_before_the_account_sent_anything(config, capsys):
    rc, out, _ = cli(capsys, "lock", "new@example.com", "--reason", "pre-emptive",
                     "--config", str(config))
    assert rc == 0
    doc = json.loads(cli(capsys, "show", "new@example.com", "--json", "--config",
                         str(config))[1])
    assert doc["state"] == "locked"


def test_a_store_that_cannot_be_opened_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('[accounts]\nenabled = true\npath = "/nonexistent/dir/accounts.db"\n')
    rc, _, err = cli(capsys, "list", "--config", str(path))
    assert rc == 2 and "account store /nonexistent/dir/accounts.db" in err
    assert "Traceback" not in err


def test_the_notice_of_a_lock_reaches_the_mail_server(tmp_path, capsys, sink):
    sink.clear()
    path = tmp_path / "config.toml"
    path.write_text(f'[accounts]\nenabled = true\npath = "{tmp_path / "a.db"}"\n'
                    f'[accounts.notify]\nmail_to = ["abuse@lab.test"]\n'
                    f'mail_from = "exim-policy@lab.test"\nsmtp = "127.0.0.1:{sink.port}"\n')
    seed(path)
    rc, _, err = cli(capsys, "lock", "alice", "--reason", "phished", "--config", str(path))
    assert rc == 0 and err == ""
    [mail] = sink.wait_for(1, timeout=10)
    assert mail.rcpt_tos == ("abuse@lab.test",) and mail.mail_from == "exim-policy@lab.test"
    text = mail.data.decode()
    assert "Subject: [exim-policy] incident 1 locked: account alice is locked" in text
    assert "Client IPs:   192.0.2.7" in text and "Subjects:     hello" in text
    assert from_dict({}).accounts.enabled is False  # (the default stays off)
