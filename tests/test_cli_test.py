"""``exim-policy test``: messages through the daemon's code path against the real Rspamd 3.4.

Each test writes a config in tmp_path whose ``[rspamd] url`` is the session Rspamd and whose
``[forwarding] map`` lists ``fwd@lab.test``. ``--ip 127.0.0.1`` is passed wherever the
verdict matters (without an IP, Rspamd's offline NXDOMAIN answers push ham to "add header",
see exim_policy/lab/messages.py). The command runs in-process through ``cli.main``
(capsys), and as a real ``python -m exim_policy`` subprocess where noted.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exim_policy.cli import main
from exim_policy.commands.test.envelope_guess import (as_exim_sends, guess_envelope,
                                                      strip_exim_wrapper)
from exim_policy.lab import messages
from exim_policy.lab.ports import free_port
from exim_policy.model import Envelope
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

LOCAL = "bob@lab.test"
FORWARDER = "fwd@lab.test"
QUARANTINE = "quarantine@lab.test"
IP = ("--ip", "127.0.0.1")
SUBPROCESS_TIMEOUT = 120
REPO = Path(__file__).resolve().parent.parent

#: keys every --json line has (the contract in the issue, plus a few extras)
JSON_KEYS = {"file", "size", "scanned_size", "envelope", "direction", "direction_reason",
             "forwarding", "scanner", "context_symbols", "action", "reason", "exim"}


# ------------------------------------------------------------------------------ helpers --
def write_config(tmp_path: Path, url: str, *, map_text: str | None = f"{FORWARDER}\n",
                 extra: str = "") -> Path:
    fwd_map = tmp_path / "forwardings.txt"
    if map_text is not None:
        fwd_map.write_text(map_text)
    config = tmp_path / "config.toml"
    # timeout: the 20 MB message must not hit the daemon's 8 s default on a busy machine
    config.write_text(f'[rspamd]\nurl = "{url}"\ntimeout = 60\n\n'
                      f'[forwarding]\nmap = "{fwd_map}"\n{extra}')
    return config


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich folds long lines at 80 columns when stdout is no terminal; substring checks
    need whole lines (rich reads COLUMNS when it creates a console)."""
    monkeypatch.setenv("COLUMNS", "300")


@pytest.fixture
def config(rspamd_running, tmp_path: Path) -> Path:
    return write_config(tmp_path, rspamd_running.url)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["test", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_json(capsys, config: Path, *argv: str) -> tuple[int, list[dict], str]:
    rc, out, err = run(capsys, "--config", str(config), "--json", *argv)
    return rc, [json.loads(line) for line in out.splitlines()], err


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def expected_rc(results: list[dict]) -> int:
    """The exit status the contract asks for, from the printed Exim outcomes."""
    return 1 if any(r["exim"]["outcome"] not in ("accepted", "marked") for r in results) else 0


def assert_short_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3, err
    for needle in needles:
        assert needle in err, err


# ----------------------------------------------------------------- verdict per message --
def test_ham_is_accepted_exit_0(config, tmp_path, capsys):
    msg = write(tmp_path / "ham.eml", messages.ham(to=LOCAL))
    rc, out, err = run(capsys, "--config", str(config), *IP, str(msg))
    assert rc == 0, err
    assert "ACCEPTED" in out and "no action" in out
    assert "alice@example.org" in out and "From: header" in out  # the derived envelope
    assert "MIME_GOOD" in out  # the symbols table
    assert "Summary" not in out  # one message: no summary table


def test_gtube_is_rejected_with_550_exit_1(config, tmp_path, capsys):
    msg = write(tmp_path / "gtube.eml", messages.gtube(to=LOCAL))
    rc, out, _ = run(capsys, "--config", str(config), *IP, str(msg))
    assert rc == 1
    assert "550 5.7.1 Gtube pattern" in out
    assert "REJECTED" in out and "GTUBE" in out
    rc, [result], _ = run_json(capsys, config, *IP, str(msg))
    assert rc == 1
    assert result["scanner"]["action"] == "reject" and result["action"] == "reject"
    assert result["exim"]["outcome"] == "rejected" and result["exim"]["smtp_code"] == 550
    assert result["exim"]["message"].startswith("550 5.7.1 Gtube pattern")


def test_authenticated_gtube_is_redirected_to_the_quarantine(config, tmp_path, capsys):
    msg = write(tmp_path / "gtube.eml", messages.gtube(to="someone@example.com"))
    rc, [result], _ = run_json(capsys, config, *IP, "--user", "alice",
                               "--quarantine", QUARANTINE, str(msg))
    assert rc == 1
    assert result["direction"] == "outbound"
    assert result["direction_reason"] == "authenticated as alice"
    assert result["envelope"]["user"] == "alice"
    assert result["action"] == "reject"
    assert result["exim"] == {"outcome": "redirected", "smtp_code": 250,
                              "message": f"accepted, redirected to {QUARANTINE} "
                                         "(acl_m_outspam=1)"}
    rc, out, _ = run(capsys, "--config", str(config), *IP, "--user", "alice", str(msg))
    assert rc == 1
    assert "redirected to the quarantine address (EXIM_POLICY_QUARANTINE)" in out


def test_spam_to_a_forwarding_recipient_is_rejected(config, tmp_path, capsys):
    msg = write(tmp_path / "fwd.eml", messages.x_test_spam(to=FORWARDER))
    rc, [result], _ = run_json(capsys, config, *IP, str(msg))
    assert rc == 1
    assert result["scanner"]["action"] == "add header"
    assert result["direction"] == "forwarding"
    assert result["forwarding"] == [FORWARDER]
    assert result["action"] == "reject"
    assert result["reason"].startswith(
        f"spam to a recipient that forwards externally ({FORWARDER}) is rejected")
    assert result["exim"]["smtp_code"] == 550
    # the sender sees the public text; the reason (naming the recipient) is the admin's
    assert result["exim"]["message"].startswith(
        "550 5.7.1 Message rejected as spam (the recipient forwards externally)")
    assert FORWARDER not in result["exim"]["message"]
    assert {"name": "EXIM_POLICY_FORWARDING", "score": 0.0, "options": [FORWARDER]} \
        in result["context_symbols"]


def test_spam_to_a_local_recipient_gets_headers_exit_0(config, tmp_path, capsys):
    msg = write(tmp_path / "local.eml", messages.x_test_spam(to=LOCAL))
    rc, out, _ = run(capsys, "--config", str(config), *IP, str(msg))
    assert rc == 0
    assert "accepted with X-Spam headers" in out and "MARKED" in out
    assert "TEST_SPAM_HEADER" in out
    rc, [result], _ = run_json(capsys, config, *IP, str(msg))
    assert (rc, result["action"], result["exim"]["outcome"]) == (0, "add header", "marked")
    assert result["forwarding"] == [] and result["direction"] == "inbound"


def test_envelope_options_override_the_headers(config, tmp_path, capsys):
    # To: says bob, the envelope says fwd@: the envelope counts, as in the daemon
    msg = write(tmp_path / "m.eml", messages.x_test_spam(to=LOCAL))
    rc, [result], _ = run_json(capsys, config, *IP, "--from", "<>", "--rcpt", FORWARDER,
                               "--helo", "client.example", str(msg))
    assert rc == 1
    env = result["envelope"]
    assert (env["sender"], env["sender_source"]) == ("", "--from")
    assert (env["recipients"], env["recipients_source"]) == ([FORWARDER], "--rcpt")
    assert env["helo"] == "client.example" and env["ip"] == "127.0.0.1"
    assert result["exim"]["smtp_code"] == 550


def test_missing_forwarding_map_is_an_empty_map(rspamd_running, tmp_path, capsys):
    config = write_config(tmp_path, rspamd_running.url, map_text=None)
    msg = write(tmp_path / "fwd.eml", messages.x_test_spam(to=FORWARDER))
    rc, [result], err = run_json(capsys, config, *IP, str(msg))
    assert rc == 0
    assert "forwardings.txt does not exist: no recipient counts as forwarding" in err
    assert result["forwarding"] == [] and result["exim"]["outcome"] == "marked"


def test_forwarding_chains_from_the_sources(rspamd_running, tmp_path, capsys):
    aliases = tmp_path / "aliases"
    aliases.write_text("fwd: relay\nrelay: ext@example.com\nbob: bob\n")
    sources = ('local_domains = ["lab.test"]\n\n[[forwarding.sources]]\ntype = "lsearch"\n'
               f'path = "{aliases}"\ndomain = "lab.test"\n')
    config = write_config(tmp_path, rspamd_running.url, extra=sources)
    msg = write(tmp_path / "fwd.eml", messages.x_test_spam(to=FORWARDER))
    rc, [result], _ = run_json(capsys, config, *IP, str(msg))
    assert rc == 1
    [explained] = result["forwarding_chains"]
    assert explained["address"] == FORWARDER and explained["forwarding"] is True
    assert [[hop["address"] for hop in chain] for chain in explained["chains"]] == [
        [FORWARDER, "relay@lab.test", "ext@example.com"]]
    assert explained["chains"][0][0]["source"] == f"{aliases}:1"
    rc, out, _ = run(capsys, "--config", str(config), *IP, str(msg))
    assert f"{FORWARDER} -> relay@lab.test -> ext@example.com  ({aliases}:1, {aliases}:2)" \
        in out
    # without sources the panel points at the explain command instead
    rc, out, _ = run(capsys, "--config", str(write_config(tmp_path, rspamd_running.url)), *IP,
                     str(msg))
    assert "alias chains: exim-policy forwardings explain ADDR" in out


def test_unreadable_sources_leave_a_note(rspamd_running, tmp_path, capsys):
    sources = ('local_domains = ["lab.test"]\n\n[[forwarding.sources]]\ntype = "lsearch"\n'
               f'path = "{tmp_path / "missing-aliases"}"\n')
    config = write_config(tmp_path, rspamd_running.url, extra=sources)
    msg = write(tmp_path / "fwd.eml", messages.x_test_spam(to=FORWARDER))
    rc, results, err = run_json(capsys, config, *IP, str(msg), str(msg))
    assert rc == 1 and len(results) == 2
    assert all("forwarding_chains" not in r and r["exim"]["smtp_code"] == 550 for r in results)
    assert err.count("forwarding chains unavailable") == 1  # once, not per message
    assert "missing-aliases" in err and "Traceback" not in err


# ------------------------------------------------------------------------ many messages --
def test_directory_of_mixed_messages(config, tmp_path, capsys):
    box = tmp_path / "msgs"
    write(box / "b-gtube.eml", messages.gtube(to=LOCAL))
    write(box / "a-ham.eml", messages.ham(to=LOCAL))
    write(box / "sub" / "c-fwd.eml", messages.x_test_spam(to=FORWARDER))
    write(box / "sub" / "deeper" / "d-local.eml", messages.x_test_spam(to=LOCAL))
    rc, out, err = run(capsys, "--config", str(config), *IP, str(box))
    assert rc == 1, err
    assert "Summary" in out
    assert "4 messages: 1 accepted, 1 marked, 2 rejected" in out
    rc, results, _ = run_json(capsys, config, *IP, str(box))
    assert rc == 1
    # every file inside, sorted by path, recursively
    assert [Path(r["file"]).relative_to(box).as_posix() for r in results] == [
        "a-ham.eml", "b-gtube.eml", "sub/c-fwd.eml", "sub/deeper/d-local.eml"]
    assert [r["exim"]["outcome"] for r in results] == ["accepted", "rejected", "rejected",
                                                      "marked"]
    rc, out, _ = run(capsys, "--config", str(config), *IP, "--brief", str(box))
    assert "Summary" in out and "Envelope" not in out  # --brief: no panels


def mbox_of(*msgs: bytes) -> bytes:
    parts = []
    for i, msg in enumerate(msgs):
        parts.append(f"From sender{i}@example.org Sat Nov 21 10:00:0{i} 2026\n".encode()
                     + msg.replace(b"\r\n", b"\n") + b"\n")
    return b"".join(parts)


def test_mbox_with_several_messages(config, tmp_path, capsys):
    mbox = write(tmp_path / "box.mbox", mbox_of(messages.ham(to=LOCAL),
                                                messages.gtube(to=LOCAL),
                                                messages.x_test_spam(to=FORWARDER)))
    rc, results, err = run_json(capsys, config, *IP, "--mbox", str(mbox))
    assert rc == 1, err
    assert [r["mbox_index"] for r in results] == [1, 2, 3]
    assert all(r["file"] == str(mbox) for r in results)
    assert [r["action"] for r in results] == ["no action", "reject", "reject"]
    assert [r["envelope"]["recipients"] for r in results] == [[LOCAL], [LOCAL], [FORWARDER]]
    # the mbox From_ line is stripped before the scan, as the daemon strips Exim's
    assert results[0]["scanned_size"] == results[0]["size"] - len(b"From sender0@example.org "
                                                                   b"Sat Nov 21 10:00:00 2026\n")
    rc, out, _ = run(capsys, "--config", str(config), *IP, "--brief", "--mbox", str(mbox))
    assert "(message 3)" in out and "3 messages:" in out


def test_empty_mbox_and_empty_directory_are_input_errors(config, tmp_path, capsys):
    write(tmp_path / "empty.mbox", b"")
    (tmp_path / "nothing").mkdir()
    rc, out, err = run(capsys, "--config", str(config), "--mbox", str(tmp_path / "empty.mbox"))
    assert rc == 2 and out == ""
    assert_short_error(err, "no messages in this mbox file")
    rc, out, err = run(capsys, "--config", str(config), str(tmp_path / "nothing"))
    assert rc == 2
    assert_short_error(err, "no files in this directory")


# ---------------------------------------------------------------------- awkward input --
def test_malformed_mime(config, tmp_path, capsys):
    broken = (b"From: alice@example.org\r\nTo: bob@lab.test\r\nSubject: broken\r\n"
              b"MIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=\"never-closed\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n"
              b"--never-closed\r\nContent-Type: text/html; charset=x-unknown\r\n\r\n"
              b"<html><body>not base64 at all !!! \x00\x01</bo\r\n"
              b"--wrong-boundary--\r\n")
    msg = write(tmp_path / "broken.eml", broken)
    rc, [result], err = run_json(capsys, config, *IP, str(msg))
    assert rc == expected_rc([result]), err
    assert result["envelope"]["recipients"] == [LOCAL]
    assert isinstance(result["scanner"]["score"], float) and result["scanner"]["symbols"]


def test_empty_file(config, tmp_path, capsys):
    msg = write(tmp_path / "empty.eml", b"")
    rc, [result], err = run_json(capsys, config, *IP, str(msg))
    assert rc == 0, err
    assert result["size"] == 0
    env = result["envelope"]
    assert (env["sender"], env["recipients"]) == (None, [])
    assert (env["sender_source"], env["recipients_source"]) == ("none", "none")
    assert result["scanner"]["action"] == "no action" and result["exim"]["outcome"] == "accepted"


def test_binary_junk(config, tmp_path, capsys):
    junk = random.Random(4).randbytes(64 * 1024)
    msg = write(tmp_path / "junk.bin", junk)
    rc, [result], err = run_json(capsys, config, *IP, str(msg))
    assert rc == expected_rc([result]), err
    assert result["size"] == len(junk)
    assert result["scanner"]["symbols"]  # Rspamd did look at it (MISSING_FROM, ...)
    rc, out, err = run(capsys, "--config", str(config), *IP, str(msg))
    assert rc == expected_rc([result]) and "junk.bin" in out and "Traceback" not in err


def test_8bit_headers(config, tmp_path, capsys):
    raw = ("From: Jörg Müller <jörg@bücher.example>\r\n"
           "To: \"Bob\" <bob@lab.test>, ünïcode@lab.test\r\n").encode() \
        + b"Subject: caf\xe9 latin-1 \xff\r\nX-Raw: \x80\x81\r\n\r\nBody with \xe9.\r\n"
    msg = write(tmp_path / "8bit.eml", raw)
    rc, [result], err = run_json(capsys, config, *IP, str(msg))
    assert rc == expected_rc([result]), err
    env = result["envelope"]
    assert env["sender"] == "jörg@bücher.example"
    assert env["recipients"] == [LOCAL, "ünïcode@lab.test"]
    rc, out, err = run(capsys, "--config", str(config), *IP, str(msg))
    assert "jörg@bücher.example" in out and "Traceback" not in err


def test_20_mb_message(config, tmp_path, capsys):
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    head = messages.ham(to=LOCAL)
    big = head + line * (20 * 1024 * 1024 // len(line))
    assert len(big) > 20 * 1000 * 1000
    msg = write(tmp_path / "big.eml", big)
    rc, [result], err = run_json(capsys, config, *IP, str(msg))
    assert rc == expected_rc([result]), err
    assert result["size"] == len(big) == result["scanned_size"]
    assert result["envelope"]["recipients"] == [LOCAL]


def test_stdin(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(messages.gtube(to=LOCAL))))
    rc, [result], err = run_json(capsys, config, *IP, "-")
    assert rc == 1, err
    assert result["file"] == "-" and result["action"] == "reject"


def test_json_shape(config, tmp_path, capsys):
    msg = write(tmp_path / "ham.eml", messages.ham(to=LOCAL))
    rc, out, _ = run(capsys, "--config", str(config), *IP, "--json", str(msg), str(msg))
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2  # one object per line per message
    result = json.loads(lines[0])
    assert JSON_KEYS <= set(result)
    assert set(result["envelope"]) == {"sender", "sender_source", "recipients",
                                       "recipients_source", "user", "ip", "helo"}
    scanner = result["scanner"]
    assert {"action", "score", "required_score", "symbols", "messages"} <= set(scanner)
    assert scanner["required_score"] == 15.0
    assert {"name": "MIME_GOOD", "score": -0.1, "options": ["text/plain"],
            "description": "Known content-type"} in scanner["symbols"]
    assert set(result["exim"]) == {"outcome", "smtp_code", "message"}
    assert (result["file"], result["direction"], result["forwarding"]) == (str(msg),
                                                                           "inbound", [])


# --------------------------------------------------------------------------- exim mbox --
def test_exim_mbox_wraps_as_exim_does(config, tmp_path, capsys):
    ham = messages.ham(to=LOCAL)
    msg = write(tmp_path / "ham.eml", ham)
    rc, [plain], _ = run_json(capsys, config, *IP, str(msg))
    rc2, [wrapped], _ = run_json(capsys, config, *IP, "--exim-mbox", str(msg))
    assert rc == rc2 == 0
    assert plain["action"] == wrapped["action"] == "no action"
    scan_file = exim_mbox_wrap(ham, sender="alice@example.org", recipients=[LOCAL])
    from_line = scan_file[:scan_file.index(b"\n") + 1]
    # Rspamd got Exim's X-Envelope-* lines and LF line ends, without the From_ line
    assert wrapped["scanned_size"] == len(scan_file) - len(from_line)
    assert plain["scanned_size"] == len(ham)


def test_exim_scan_file_envelope_wins_over_headers(config, tmp_path, capsys):
    # an Exim scan file: X-Envelope-To says fwd@ although To: says bob
    scan_file = exim_mbox_wrap(messages.x_test_spam(to=LOCAL), sender="other@example.org",
                               recipients=[FORWARDER])
    msg = write(tmp_path / "scan.eml", scan_file)
    for extra in ((), ("--exim-mbox",)):  # wrapping an already wrapped file changes nothing
        rc, [result], _ = run_json(capsys, config, *IP, *extra, str(msg))
        assert rc == 1
        assert result["envelope"]["sender"] == "other@example.org"
        assert result["envelope"]["sender_source"] == "X-Envelope-From"
        assert result["envelope"]["recipients_source"] == "X-Envelope-To"
        assert result["forwarding"] == [FORWARDER] and result["exim"]["smtp_code"] == 550
        assert result["scanned_size"] == len(scan_file) - scan_file.index(b"\n") - 1


# ------------------------------------------------------------------------------ errors --
def test_rspamd_unreachable_exit_2(tmp_path, capsys):
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens
    msg = write(tmp_path / "ham.eml", messages.ham(to=LOCAL))
    for extra in ((), ("--json",)):
        rc, out, err = run(capsys, "--config", str(config), *IP, *extra, str(msg), str(msg))
        assert rc == 2
        assert out == ""  # a scanner failure is not shown as a policy outcome
        assert_short_error(err, "Rspamd gave no verdict", "cannot reach Rspamd")
        assert len(err.strip().splitlines()) == 1  # the run stops at the first failure


def test_unreadable_file_in_process(config, tmp_path, capsys):
    # as root no permission bit stops a read; a socket file cannot be opened either (ENXIO)
    sock_path = tmp_path / "socket.eml"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        ham = write(tmp_path / "ham.eml", messages.ham(to=LOCAL))
        rc, results, err = run_json(capsys, config, *IP, str(sock_path), str(ham))
    assert rc == 2
    assert [r["file"] for r in results] == [str(ham)]  # the readable one is still tested
    assert_short_error(err, "socket.eml: cannot read:")


def test_missing_file_and_bad_options_exit_2(config, tmp_path, capsys):
    rc, _, err = run(capsys, "--config", str(config), str(tmp_path / "nope.eml"))
    assert rc == 2
    assert_short_error(err, "nope.eml: no such file or directory")
    rc, _, err = run(capsys, "--config", str(config))
    assert rc == 2
    assert_short_error(err, "no message given")
    rc, _, err = run(capsys, "--config", str(config), "--ip", "not-an-ip", "x.eml")
    assert rc == 2
    assert_short_error(err, "--ip: 'not-an-ip' is not an IP address")
    rc, _, err = run(capsys, "--config", str(tmp_path / "missing.toml"), "x.eml")
    assert rc == 2
    assert_short_error(err, "missing.toml: no such file")


# ------------------------------------------------------------------ real subprocesses --
def run_cli(argv: list[str], *, stdin: bytes | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*(prefix or []), sys.executable, "-m", "exim_policy", "test", *argv],
                          input=stdin, capture_output=True, timeout=SUBPROCESS_TIMEOUT,
                          env=env, cwd=REPO)


def test_subprocess_run(config, tmp_path):
    gtube = write(tmp_path / "gtube.eml", messages.gtube(to=LOCAL))
    proc = run_cli(["--config", str(config), *IP, str(gtube)])
    assert proc.returncode == 1, proc.stderr
    assert b"550 5.7.1 Gtube pattern" in proc.stdout
    proc = run_cli(["--config", str(config), *IP, "--json", "-"], stdin=messages.ham(to=LOCAL))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exim"]["outcome"] == "accepted"


def test_unreadable_file_subprocess(config, tmp_path):
    """A real permission error: the child runs without CAP_DAC_OVERRIDE/READ_SEARCH, so
    root cannot read a mode-000 file it owns."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's DAC capabilities"
    secret = write(tmp_path / "secret.eml", messages.ham(to=LOCAL))
    secret.chmod(0)
    ham = write(tmp_path / "ham.eml", messages.ham(to=LOCAL))
    proc = run_cli(["--config", str(config), *IP, "--json", str(secret), str(ham)],
                   prefix=[setpriv, "--bounding-set=-dac_override,-dac_read_search"])
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert_short_error(err, "secret.eml: cannot read: Permission denied")
    assert [json.loads(line)["file"] for line in proc.stdout.splitlines()] == [str(ham)]


def test_daemon_modules_never_import_rich():
    code = ("import sys\n"
            "import exim_policy.daemon, exim_policy.transport.spamd, exim_policy.pipeline\n"
            "import exim_policy.cli, exim_policy.commands.test.engine\n"
            "import exim_policy.commands.test.exim_outcome\n"
            "print('rich' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == b"False"


# ------------------------------------------------------- envelope guessing (no Rspamd) --
def test_guess_from_headers():
    raw = (b"Received: from x\r\nFrom: \"A, B\" <a@example.org>, c@example.org\r\n"
           b"To: Bob <bob@lab.test>,\r\n  undisclosed-recipients:;\r\n"
           b"Cc: team: BOB@lab.test, carol@lab.test;, (comment) dave@lab.test\r\n"
           b"Bcc: eve@lab.test\r\n\r\nTo: body@lab.test\r\n")
    guess = guess_envelope(raw)
    assert guess.envelope == Envelope(sender="a@example.org",
                                      recipients=(LOCAL, "carol@lab.test", "dave@lab.test"))
    assert (guess.sender_source, guess.recipients_source) == ("From: header", "To/Cc headers")


def test_guess_overrides_and_bounce_scan_file():
    scan_file = exim_mbox_wrap(b"From: x@example.org\nTo: y@lab.test\n\nhi\n", sender=None,
                               recipients=[FORWARDER])
    guess = guess_envelope(scan_file)
    assert guess.envelope.sender == "" and guess.envelope.recipients == (FORWARDER,)
    assert guess.sender_source.startswith("Exim scan file without X-Envelope-From")
    guess = guess_envelope(scan_file, sender="<s@example.org>", recipients=["<r@lab.test>"],
                           user="u", ip="192.0.2.1", helo="h")
    assert guess.envelope == Envelope(sender="s@example.org", recipients=("r@lab.test",),
                                      ip="192.0.2.1", helo="h", user="u")


def test_wrap_is_idempotent_and_keeps_bytes():
    message = b"Subject: caf\xe9\r\nTo: b@lab.test\r\n\r\nbody\r\nFrom the start\r\n"
    envelope = Envelope(sender="j\xc3\xb6rg@example.org", recipients=(LOCAL,))  # wire form
    once = as_exim_sends(message, envelope)
    assert once.startswith(b"From j\xc3\xb6rg@example.org ")
    assert b"\nX-Envelope-From: <j\xc3\xb6rg@example.org>\nX-Envelope-To: bob@lab.test\n" \
        b"Subject: caf\xe9\n" in once
    assert strip_exim_wrapper(once) == message.replace(b"\r\n", b"\n")
    again = as_exim_sends(once, envelope)
    assert again.split(b"\n", 1)[1] == once.split(b"\n", 1)[1]  # same but the date line


# ------------------------------------------------------------------------------ accounts --
def test_the_account_part_is_shown_and_nothing_is_recorded(rspamd_running, tmp_path, capsys):
    db = tmp_path / "accounts.db"
    config = write_config(tmp_path, rspamd_running.url, extra=(
        f'\n[accounts]\nenabled = true\npath = "{db}"\n'
        '[[accounts.limits]]\nwindow = "1h"\nmessages = 100\n'
        '[accounts.incident]\nspam_verdicts = 1\non_open = "hold"\n'))
    msg = tmp_path / "gtube.eml"
    msg.write_bytes(messages.gtube(to="carol@example.com"))
    for _ in range(2):  # the same answer twice: the first run recorded nothing
        rc, [result], _ = run_json(capsys, config, *IP, "--user", "alice", str(msg))
        account = result["account"]
        assert account["account"] == "alice" and account["status"] == "ok"
        assert account["would_record"] == {"counted": True, "spam_verdict": True,
                                           "recipients": 1}
        assert [t["kind"] for t in account["would_transition"]] == ["opened"]
    rc, out, _ = run(capsys, "--config", str(config), *IP, "--user", "alice", str(msg))
    assert ("alice: ok; would count 1 message, 1 recipient(s) and 1 spam verdict; would "
            "open an incident (hold): 1 spam verdicts within 1h") in out
    main(["accounts", "list", "--json", "--config", str(config)])
    assert json.loads(capsys.readouterr().out) == []
