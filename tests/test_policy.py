"""decide() and classify() as tables: inputs -> expected action."""
from __future__ import annotations

import pytest

from exim_policy.config import ConfigError, from_dict
from exim_policy.model import (AccountFacts, AccountStatus, Context, Envelope, ScanFailure,
                                ScanResult, Traffic)
from exim_policy.policy import (
    SYM_FORWARDING,
    SYM_OUTBOUND,
    SYM_SCANNER_FAILED,
    classify,
    decide,
)

CONFIG = from_dict({"outbound": {"relay_networks": ["192.0.2.0/24", "2001:db8::/32"]}})
NOW = 1_800_000_000.0

INBOUND = Envelope(sender="a@example.org", recipients=("bob@example.com",), ip="198.51.100.7")
AUTH = Envelope(sender="alice@example.com", recipients=("x@example.net",), ip="198.51.100.7",
                user="alice")
RELAY = Envelope(sender="web@example.com", recipients=("x@example.net",), ip="192.0.2.10")
TO_FWD = Envelope(sender="a@example.org", recipients=("local@example.com", "fwd@example.com"),
                  ip="198.51.100.7")
FWD = Context(forwarding=frozenset({"fwd@example.com"}))
NONE = Context()


def scan(action: str, score: float = 0.0, required: float = 15.0, **kw) -> ScanResult:
    return ScanResult(action=action, score=score, required_score=required, **kw)


@pytest.mark.parametrize("envelope, context, rspamd, expected, traffic", [
    # inbound: Rspamd's action passes through
    (INBOUND, NONE, "no action", "no action", Traffic.INBOUND),
    (INBOUND, NONE, "add header", "add header", Traffic.INBOUND),
    (INBOUND, NONE, "rewrite subject", "rewrite subject", Traffic.INBOUND),
    (INBOUND, NONE, "greylist", "greylist", Traffic.INBOUND),
    (INBOUND, NONE, "soft reject", "soft reject", Traffic.INBOUND),
    (INBOUND, NONE, "reject", "reject", Traffic.INBOUND),
    (INBOUND, NONE, "quarantine", "quarantine", Traffic.INBOUND),  # custom actions verbatim
    # inbound to a forwarding recipient: add header / rewrite subject become reject
    (TO_FWD, FWD, "add header", "reject", Traffic.FORWARDING),
    (TO_FWD, FWD, "rewrite subject", "reject", Traffic.FORWARDING),
    (TO_FWD, FWD, "no action", "no action", Traffic.FORWARDING),
    (TO_FWD, FWD, "greylist", "greylist", Traffic.FORWARDING),
    (TO_FWD, FWD, "reject", "reject", Traffic.FORWARDING),
    # the same message without the forwarding context keeps Rspamd's action
    (TO_FWD, NONE, "add header", "add header", Traffic.INBOUND),
    # outbound (authenticated or relay network): reject stays reject (-> quarantine in Exim)
    (AUTH, NONE, "reject", "reject", Traffic.OUTBOUND),
    (AUTH, NONE, "no action", "no action", Traffic.OUTBOUND),
    (AUTH, NONE, "add header", "add header", Traffic.OUTBOUND),
    (RELAY, NONE, "reject", "reject", Traffic.OUTBOUND),
    # outbound wins over forwarding: a customer writing to a local forwarder
    (Envelope(recipients=("fwd@example.com",), user="alice"), FWD, "add header",
     "add header", Traffic.OUTBOUND),
])
def test_decide_table(envelope, context, rspamd, expected, traffic):
    decision = decide(envelope, scan(rspamd, 7.0), context, CONFIG, NOW)
    assert decision.action == expected
    assert decision.traffic is traffic
    assert not decision.defer


def test_outbound_spam_actions_are_configurable():
    config = from_dict({"outbound": {"spam_actions": ["reject", "add header"]}})
    assert decide(AUTH, scan("add header", 8.0), NONE, config, NOW).action == "reject"
    assert decide(AUTH, scan("add header", 8.0), NONE, CONFIG, NOW).action == "add header"


def test_forwarding_actions_are_configurable():
    config = from_dict({"forwarding": {"spam_actions": ["greylist"]}})
    assert decide(TO_FWD, scan("greylist", 4.0), FWD, config, NOW).action == "reject"
    assert decide(TO_FWD, scan("add header", 7.0), FWD, config, NOW).action == "add header"


@pytest.mark.parametrize("envelope, context, failure_cfg, action, defer", [
    # defaults: inbound accept, outbound tempfail, forwarding tempfail
    (INBOUND, NONE, {}, "no action", False),
    (AUTH, NONE, {}, "soft reject", False),
    (RELAY, NONE, {}, "soft reject", False),
    (TO_FWD, FWD, {}, "soft reject", False),
    # configured
    (INBOUND, NONE, {"inbound": "tempfail"}, "soft reject", False),
    (INBOUND, NONE, {"inbound": "defer"}, "soft reject", True),
    (AUTH, NONE, {"outbound": "accept"}, "no action", False),
    (AUTH, NONE, {"outbound": "defer"}, "soft reject", True),
    (TO_FWD, FWD, {"forwarding": "accept"}, "no action", False),
])
def test_scanner_failure_is_a_configured_decision(envelope, context, failure_cfg, action, defer):
    config = from_dict({"failure": failure_cfg,
                        "outbound": {"relay_networks": ["192.0.2.0/24"]}})
    decision = decide(envelope, ScanFailure("connection refused"), context, config, NOW)
    assert (decision.action, decision.defer) == (action, defer)
    assert decision.failure == ScanFailure("connection refused")
    assert "connection refused" in decision.reason
    assert SYM_SCANNER_FAILED in {s.name for s in decision.symbols}


@pytest.mark.parametrize("envelope, traffic, reason_part", [
    (INBOUND, Traffic.INBOUND, "inbound"),
    (AUTH, Traffic.OUTBOUND, "authenticated as alice"),
    (Envelope(user=""), Traffic.OUTBOUND, "authenticated as an unknown id"),
    (RELAY, Traffic.OUTBOUND, "192.0.2.0/24"),
    (Envelope(ip="2001:db8::5"), Traffic.OUTBOUND, "2001:db8::/32"),
    (Envelope(ip="::ffff:192.0.2.9"), Traffic.OUTBOUND, "192.0.2.0/24"),
    (Envelope(ip="[192.0.2.9]"), Traffic.OUTBOUND, "192.0.2.0/24"),
    (Envelope(ip="not-an-ip"), Traffic.INBOUND, "inbound"),
    (Envelope(ip=None), Traffic.INBOUND, "inbound"),
])
def test_classify(envelope, traffic, reason_part):
    got, reason = classify(envelope, NONE, CONFIG)
    assert got is traffic
    assert reason_part in reason


def test_decision_explains_itself():
    d = decide(TO_FWD, scan("add header", 6.9), FWD, CONFIG, NOW)
    assert d.forwarding == ("fwd@example.com",)
    assert "fwd@example.com" in d.reason and "add header" in d.reason
    names = {s.name: s for s in d.symbols}
    assert names[SYM_FORWARDING].options == ("fwd@example.com",)

    d = decide(AUTH, scan("reject", 15.0), NONE, CONFIG, NOW)
    assert "outbound spam" in d.reason and "alice" in d.reason
    assert SYM_OUTBOUND in {s.name for s in d.symbols}

    d = decide(INBOUND, scan("reject", 15.0, messages=(("smtp_message", "Gtube pattern"),)),
               NONE, CONFIG, NOW)
    assert d.reason.startswith("Gtube pattern")
    assert d.symbols == ()


def test_decide_is_pure():
    first = decide(TO_FWD, scan("add header", 6.9), FWD, CONFIG, NOW)
    assert decide(TO_FWD, scan("add header", 6.9), FWD, CONFIG, NOW) == first


def test_texts_forwarding_is_the_public_text_and_the_reason_follows():
    from exim_policy.protocol import rspamc

    config = from_dict({"texts": {"forwarding": "Spam to a forwarding address"}})
    d = decide(TO_FWD, scan("add header", 6.9), FWD, config, NOW)
    assert d.message == "Spam to a forwarding address" and "fwd@example.com" in d.reason
    lines = rspamc.build_reply(d).split(b"\r\n")
    first = next(i for i, line in enumerate(lines) if line.startswith(b"Message: "))
    assert lines[first] == b"Message: Spam to a forwarding address"
    assert lines[first + 1].startswith(b"Reason: spam to a recipient that forwards externally")


def test_the_old_text_keys_say_where_they_moved():
    with pytest.raises(ConfigError) as info:
        from_dict({"forwarding": {"reject_message": "x"},
                   "accounts": {"throttle_message": "y"}})
    assert sorted(info.value.errors) == ["accounts.throttle_message: moved to texts.throttled",
                                         "forwarding.reject_message: moved to texts.forwarding"]


@pytest.mark.parametrize("text", ["", "  ", "two\nlines", "tab\there", "x" * 401])
def test_a_public_text_is_one_short_line(text):
    with pytest.raises(ConfigError, match="texts.spam"):
        from_dict({"texts": {"spam": text}})


_STORE_DOWN = Context(account=AccountFacts("user:alice", None, AccountStatus.OK))
_HELD_DOWN = Context(account=AccountFacts("user:alice", None, AccountStatus.HELD))
_PRIVATE = ("127.0.0.1", "21333", "alice", "fwd@example.com", "failure.", "score", "15.00",
            "6.90", "rspamd", "Rspamd", "accounts.", "forwards externally:")


@pytest.mark.parametrize("name, envelope, result, context, config, action", [
    ("inbound reject", INBOUND, scan("reject", 15.0), NONE, CONFIG, "reject"),
    ("rspamd soft reject", INBOUND, scan("soft reject", 9.0), NONE, CONFIG, "soft reject"),
    ("forwarding", TO_FWD, scan("add header", 6.9), FWD, CONFIG, "reject"),
    ("outbound spam", AUTH, scan("reject", 15.0), NONE, CONFIG, "reject"),
    ("scanner down", AUTH, ScanFailure("cannot reach Rspamd at 127.0.0.1:21333: refused"),
     NONE, CONFIG, "soft reject"),
    ("store down", AUTH, scan("no action", 0.0), _STORE_DOWN,
     from_dict({"accounts": {"enabled": True}, "failure": {"accounts": "tempfail"}}),
     "soft reject"),
    ("held, store down", AUTH, scan("no action", 0.0), _HELD_DOWN,
     from_dict({"accounts": {"enabled": True}}), "reject"),
])
def test_every_smtp_visible_text_is_public_by_default(name, envelope, result, context, config,
                                                      action):
    """What the SMTP client sees names no host, port, score, address or config key; the
    reason (for the log and $spam_report) keeps them."""
    d = decide(envelope, result, context, config, NOW)
    assert d.action == action
    assert d.message and not any(word in d.message for word in _PRIVATE), d.message
    assert d.reason != d.message


def test_rspamds_own_smtp_message_is_the_public_text():
    d = decide(INBOUND, scan("reject", 15.0, messages=(("smtp_message", "Gtube pattern"),)),
               NONE, CONFIG, NOW)
    assert d.message == "Gtube pattern" and d.reason.startswith("Gtube pattern (Rspamd said")
    assert decide(INBOUND, scan("reject", 15.0), NONE, CONFIG, NOW).message == \
        CONFIG.texts.spam
    # actions whose text no client sees have none
    assert decide(INBOUND, scan("add header", 7.0), NONE, CONFIG, NOW).message is None


# ---------------------------------------------------------------- policy.mode = shadow --
SHADOW = from_dict({"policy": {"mode": "shadow"},
                    "outbound": {"relay_networks": ["192.0.2.0/24"]},
                    "texts": {"forwarding": "forwarding spam refused"}})


@pytest.mark.parametrize("envelope, context, rspamd, would", [
    (TO_FWD, FWD, "add header", "reject"),
    (TO_FWD, FWD, "rewrite subject", "reject"),
    (TO_FWD, FWD, "reject", None),  # the same answer either way
    (AUTH, NONE, "reject", None),  # outbound spam: reject (Exim quarantines it) either way
    (INBOUND, NONE, "add header", None),
])
def test_shadow_mode_answers_rspamds_verdict_and_says_what_it_would(envelope, context,
                                                                    rspamd, would):
    enforced = decide(envelope, scan(rspamd, 7.0), context, CONFIG, NOW)
    shadow = decide(envelope, scan(rspamd, 7.0), context, SHADOW, NOW)
    assert shadow.action == rspamd and shadow.would == would
    if would is None:
        assert shadow.action == enforced.action
        return
    assert enforced.action == would
    assert shadow.reason.startswith(f"shadow mode, would answer {would!r}: ")
    assert shadow.message is None  # no client sees a text for Rspamd's verdict here
    assert ("EXIM_POLICY_SHADOW", (would,)) in [(s.name, s.options) for s in shadow.symbols]
    assert SYM_FORWARDING in {s.name for s in shadow.symbols}  # the context still shows


def test_shadow_mode_keeps_the_failure_outcome():
    """A scanner failure has no verdict to pass on: [failure] applies as configured."""
    failed = decide(AUTH, ScanFailure("down"), NONE, SHADOW, NOW)
    assert failed.action == "soft reject" and failed.would is None
