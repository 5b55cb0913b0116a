"""The accounts' Exim side in Debian's split configuration (update-exim4.conf, Exim 4.96):
conf.d/acl/35_exim-policy_check_mail as MAIN_ACL_CHECK_MAIL, and the authenticator check
exactly as exim/debian/README.md documents it, against the real shim with accounts on."""
from __future__ import annotations

import base64
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from e2e_helpers import build_debian_config

from exim_policy.lab import messages
from exim_policy.lab.exim import HOSTNAME, check_prerequisites, crypt_sha512
from exim_policy.lab.ports import LOOPBACK
from exim_policy.lab.shim import ShimLab
from exim_policy.protocol.mbox import exim_mbox_wrap

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
EXIM_DIR = REPO / "exim"
PASSWORD = "s3cret"


def documented_server_condition() -> str:
    """The server_condition line of exim/debian/README.md's plain_server example."""
    text = (EXIM_DIR / "debian" / "README.md").read_text()
    found = re.search(r"^  server_condition = (\"\$\{if and.*?locked\}\}\}\}\")$", text,
                      re.M | re.S)
    assert found, "exim/debian/README.md: no plain_server server_condition example"
    return found.group(1)


def count_one_message(shim: ShimLab, user: str) -> None:
    body = exim_mbox_wrap(messages.ham(to="x@example.com"), sender=f"{user}@lab.test",
                          recipients=["x@example.com"])
    request = (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nRcpt: <x@example.com>\r\n"
               f"IP: 127.0.0.1\r\nUser: {user}\r\n\r\n").encode() + body
    with socket.create_connection((LOOPBACK, shim.port), timeout=30) as sock:
        sock.sendall(request)
        assert sock.recv(100).startswith(b"RSPAMD/1.3 0 EX_OK")


def session(user: str) -> str:
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    return (f"EHLO client.test\r\nAUTH PLAIN {token}\r\nMAIL FROM:<{user}@lab.test>\r\n"
            "QUIT\r\n")


@pytest.fixture
def shim(tmp_path, rspamd_running):
    lab = ShimLab(tmp_path, rspamd_url=rspamd_running.url, extra_toml=(
        f'\n[accounts]\nenabled = true\npath = "{tmp_path / "accounts.db"}"\n'
        '[[accounts.limits]]\nwindow = "1h"\nmessages = 1\n'))
    lab.start()
    yield lab
    lab.stop()


def test_debian_mail_acl_and_documented_auth_check(shim):
    try:
        check_prerequisites()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    locked = subprocess.run([sys.executable, "-m", "exim_policy", "accounts", "lock",
                             "locked-user", "--reason", "test", "--config",
                             str(shim.config_path)], capture_output=True, text=True,
                            timeout=60)
    assert locked.returncode == 0, locked.stderr
    count_one_message(shim, "busy-user")  # the limit is one message per hour
    base = Path(tempfile.mkdtemp(prefix="exim-policy-acct-deb-"))
    try:
        base.chmod(0o755)
        confdir = base / "etc-exim4"
        passwd = "".join(f"{u}:{crypt_sha512(PASSWORD)}\n"
                         for u in ("locked-user", "busy-user", "fine-user"))
        conf = build_debian_config(
            base, EXIM_DIR,
            f"CONFDIR = {confdir}\nEXIM_POLICY_QUERY = {shim.query_address}\n"
            "MAIN_ACL_CHECK_MAIL = acl_exim_policy_check_mail\n",
            auth=("plain_server:\n  driver = plaintext\n  public_name = PLAIN\n"
                  f"  server_condition = {documented_server_condition()}\n"
                  "  server_set_id = $auth2\n  server_prompts = :\n"),
            files={"passwd": passwd})
        assert subprocess.run(["exim", "-C", str(conf), "-bV"], capture_output=True,
                              timeout=30).returncode == 0

        def replies(user: str) -> list[str]:
            result = subprocess.run(["exim", "-C", str(conf), "-bh", "192.0.2.10"],
                                    input=session(user), capture_output=True, text=True,
                                    timeout=60)
            return [line for line in result.stdout.splitlines()
                    if re.match(r"^\d{3} ", line)]

        locked_out = replies("locked-user")
        assert locked_out[2].startswith("535 "), locked_out  # (a broken condition: 435)
        busy = replies("busy-user")
        assert busy[2].startswith("235 ") and busy[3] == \
            "451 4.7.1 Sending rate limit exceeded, please try again later", busy
        fine = replies("fine-user")
        assert fine[2].startswith("235 ") and fine[3].startswith("250 "), fine
        assert HOSTNAME in replies("fine-user")[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)
