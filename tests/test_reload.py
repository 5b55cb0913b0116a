"""What a reload puts in force (daemon.in_force): pure, from two configurations."""
from __future__ import annotations

from exim_policy.config import from_dict
from exim_policy.daemon import in_force, needs_restart


def test_live_keys_apply_and_restart_keys_keep_their_old_value():
    old = from_dict({"server": {"listen": ["127.0.0.1:1"], "read_timeout": 5},
                     "accounts": {"enabled": True,
                                  "limits": [{"window": "1h", "messages": 10}]}})
    new = from_dict({"server": {"listen": ["127.0.0.1:2"], "read_timeout": 7},
                     "accounts": {"enabled": True,
                                  "limits": [{"window": "1h", "messages": 20}]},
                     "texts": {"spam": "No"}})
    config, applied, kept = in_force(old, new)
    assert applied == ["server.read_timeout", "texts.spam"]
    assert kept == ["server.listen", "accounts.limits"]
    assert config.server.listen == old.server.listen and config.server.read_timeout == 7
    assert config.accounts.limits == old.accounts.limits
    assert config.texts.spam == "No"


def test_the_same_file_changes_nothing():
    config = from_dict({"texts": {"spam": "No"}})
    assert in_force(config, from_dict({"texts": {"spam": "No"}})) == (config, [], [])


def test_restart_keys_match_whole_names_only():
    assert needs_restart("metrics.listen") and needs_restart("server.listen")
    assert not needs_restart("server.listen_backlog") and not needs_restart("texts.spam")
