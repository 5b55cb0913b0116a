"""contrib/rspamd/ (the pure-Rspamd forwarding rule) loaded verbatim into a real Rspamd 3.4.

Only the map path is changed, to the lab's map directory.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from exim_policy.lab import messages
from exim_policy.lab.rspamd import TEST_SPAM_HEADER_RULE, RspamdLab

pytestmark = pytest.mark.real

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "rspamd" / "local.d"
PRODUCTION_MAP = "/var/lib/exim-policy/forwardings.txt"


def contrib_file(name: str) -> str:
    text = (CONTRIB / name).read_text()
    assert PRODUCTION_MAP in text or name != "multimap.conf"
    return text.replace(PRODUCTION_MAP, "${MAPSDIR}/forwardings.txt")


@pytest.fixture(scope="module")
def rspamd_contrib(lab_dir, nxdns):
    lab = RspamdLab(lab_dir / "contrib-rspamd", dns_port=nxdns.port,
                    extra_local_d={
                        # the lab's own test rule stays, so "add header" is deterministic
                        "multimap.conf": TEST_SPAM_HEADER_RULE + contrib_file("multimap.conf"),
                        "force_actions.conf": contrib_file("force_actions.conf"),
                    },
                    maps={"forwardings.txt": "# built map\nfwd@lab.test\n@old.example\n"})
    lab.start()
    yield lab
    lab.stop()


def check(lab: RspamdLab, message: bytes, rcpt: str) -> dict:
    request = urllib.request.Request(
        lab.url + "/checkv2", data=message,
        headers={"Rcpt": rcpt, "IP": "127.0.0.1", "From": "alice@example.org",
                 "Helo": "client.test"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


@pytest.mark.parametrize("rcpt, message, action, symbol", [
    ("fwd@lab.test", messages.x_test_spam, "reject", "EXIM_POLICY_FWD_ADDR"),
    ("FWD@Lab.Test", messages.x_test_spam, "reject", "EXIM_POLICY_FWD_ADDR"),
    ("anyone@old.example", messages.x_test_spam, "reject", "EXIM_POLICY_FWD_DOMAIN"),
    ("bob@lab.test", messages.x_test_spam, "add header", None),
    ("old.example@elsewhere.test", messages.x_test_spam, "add header", None),
    ("fwd@lab.test", messages.ham, "no action", "EXIM_POLICY_FWD_ADDR"),
])
def test_forwarding_rule(rspamd_contrib, rcpt, message, action, symbol):
    result = check(rspamd_contrib, message(to=rcpt), rcpt)
    assert result["action"] == action
    if symbol:
        assert symbol in result["symbols"]
    if action == "reject":
        assert "FORCE_ACTION_EXIM_POLICY_FORWARDING_SPAM" in result["symbols"]
        assert result["messages"]["smtp_message"] == "Spam to a forwarding address is rejected"


def test_map_rebuild_is_picked_up_without_reload(rspamd_contrib):
    rcpt = "late@lab.test"
    assert check(rspamd_contrib, messages.x_test_spam(to=rcpt), rcpt)["action"] == "add header"
    rspamd_contrib.write_map("forwardings.txt", "fwd@lab.test\n@old.example\nlate@lab.test\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if check(rspamd_contrib, messages.x_test_spam(to=rcpt), rcpt)["action"] == "reject":
            break
        time.sleep(0.1)
    else:
        pytest.fail("Rspamd did not pick up the rebuilt map within 10 s")
