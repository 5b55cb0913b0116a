"""Config: defaults, the documented contract, and errors that name the dotted key."""
from __future__ import annotations

import dataclasses
import ipaddress
import sys

import pytest

from exim_policy import cli
from exim_policy.config import ConfigError, ListenAddress, ServerConfig, from_dict, load, to_toml
from exim_policy.model import FailureMode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONTRACT = """
[server]
listen = ["127.0.0.1:11335", "[::1]:11335", "unix:/run/exim-policy/spamd.sock"]
allowed_clients = ["127.0.0.1/32", "::1/128"]
[rspamd]
url = "http://127.0.0.1:11333"
timeout = 8.0
[outbound]
relay_networks = ["192.0.2.0/24"]
[forwarding]
map = "/var/lib/exim-policy/forwardings.txt"
"""


def test_defaults():
    config = from_dict({})
    assert config.server.listen == (ListenAddress(host="127.0.0.1", port=11335),)
    assert config.server.allowed_clients == (ipaddress.ip_network("127.0.0.1/32"),
                                             ipaddress.ip_network("::1/128"))
    assert config.rspamd.url == "http://127.0.0.1:11333"
    assert config.rspamd.timeout == 8.0
    assert config.outbound.spam_actions == ("reject",)
    assert config.forwarding.spam_actions == ("add header", "rewrite subject")
    assert (config.failure.inbound, config.failure.outbound, config.failure.forwarding) == (
        FailureMode.ACCEPT, FailureMode.TEMPFAIL, FailureMode.TEMPFAIL)


def test_contract_example(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONTRACT)
    config = load(path)
    assert [str(a) for a in config.server.listen] == [
        "127.0.0.1:11335", "[::1]:11335", "unix:/run/exim-policy/spamd.sock"]
    assert config.outbound.relay_networks == (ipaddress.ip_network("192.0.2.0/24"),)


@pytest.mark.parametrize("data, key", [
    ({"server": {"listne": ["127.0.0.1:1"]}}, "server.listne"),
    ({"sever": {}}, "sever"),
    ({"server": {"listen": ["127.0.0.1"]}}, "server.listen"),
    ({"server": {"listen": ["example.com:25"]}}, "server.listen"),
    ({"server": {"listen": ["unix:relative.sock"]}}, "server.listen"),
    ({"server": {"listen": ["127.0.0.1:99999"]}}, "server.listen"),
    ({"server": {"allowed_clients": ["10.0.0.0/33"]}}, "server.allowed_clients"),
    ({"server": {"max_connections": 0}}, "server.max_connections"),
    ({"server": {"max_message_size": "50M"}}, "server.max_message_size"),
    ({"server": {"max_scans": 0}}, "server.max_scans"),
    ({"server": {"shutdown_timeout": 0}}, "server.shutdown_timeout"),
    ({"server": {"max_bytes_in_flight": 1000, "max_message_size": 1001}},
     "server.max_bytes_in_flight"),
    ({"rspamd": {"url": "https://x:11333"}}, "rspamd.url"),
    ({"rspamd": {"url": "unix:normal.sock"}}, "rspamd.url"),
    ({"rspamd": {"timeout": -1}}, "rspamd.timeout"),
    ({"rspamd": {"timeout": "8"}}, "rspamd.timeout"),
    ({"rspamd": {"settings_id": {"inbound": 3}}}, "rspamd.settings_id.inbound"),
    ({"outbound": {"relay_networks": "192.0.2.0/24"}}, "outbound.relay_networks"),
    ({"outbound": {"spam_actions": ["x" * 40]}}, "outbound.spam_actions"),
    ({"failure": {"inbound": "drop"}}, "failure.inbound"),
    ({"forwarding": {"case_sensitive_local_parts": "yes"}},
     "forwarding.case_sensitive_local_parts"),
    ({"forwarding": {"sources": [{"type": "lsearch", "path": "/x"}, {"type": "ldap"}]}},
     "forwarding.sources[1].type"),
    ({"forwarding": {"sources": [{"type": "sqlite", "path": "/x"}]}},
     "forwarding.sources[0].query"),
    ({"forwarding": {"sources": [{"type": "lsearch", "path": "/x", "pth": 1}]}},
     "forwarding.sources[0].pth"),
    ({"logging": {"level": "loud"}}, "logging.level"),
])
def test_errors_name_the_dotted_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nlisten=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_check_config_prints_toml_that_reads_back_the_same(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(CONTRACT)
    assert cli.main(["check-config", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {good}: OK")
    assert '[outbound]\nrelay_networks = ["192.0.2.0/24"]' in out
    assert 'unix_socket_mode = "0666"' in out and "SettingsIds(" not in out
    assert from_dict(tomllib.loads(out)) == load(good)


def test_to_toml_round_trips_every_shape():
    config = from_dict({
        "server": {"listen": ["[::1]:11335", "unix:/run/x.sock"], "unix_socket_mode": "0660",
                   "http_listen": ["127.0.0.1:11338"]},
        "policy": {"mode": "shadow"},
        "forwarding": {"sources": [{"type": "lsearch", "path": "/etc/aliases",
                                    "domain": "x.test"},
                                   {"type": "sqlite", "path": "/a.db", "query": "select 1"}]},
        "accounts": {"enabled": True, "limits": [{"window": "1h", "messages": 5},
                                                 {"window": 90, "recipients": 100}],
                     "notify": {"mail_to": ["root@x.test"]}},
        "failure": {"inbound": "defer"},
        "outbound": {"relay_networks": ["192.0.2.0/24", "2001:db8::/32"]},
        "rspamd": {"settings_id": {"inbound": ""}},
    })
    text = to_toml(config)
    assert from_dict(tomllib.loads(text)) == config
    assert 'window = "1h"' in text and 'window = "90s"' in text
    assert text.count("[[forwarding.sources]]") == 2


def test_every_error_is_reported_at_once(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[rspamd]\ntimeout = 'soon'\nurl = 'ftp://x'\n[server]\nlisten = 'nope'\n"
                   "colour = 'red'\n[[accounts.limits]]\nmessages = 1\n")
    assert cli.main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [  # in the file's order; a table's unknown keys first
        "exim-policy: config: rspamd.timeout: expected a positive number",
        "exim-policy: config: rspamd.url: 'ftp://x': expected http://host:port (Rspamd's "
        "normal worker)",
        "exim-policy: config: server.colour: unknown key (known: " + ", ".join(
            sorted(f.name for f in dataclasses.fields(ServerConfig))) + ")",
        "exim-policy: config: server.listen: 'nope': expected 'host:port', '[v6]:port' or "
        "'unix:/path'",
        "exim-policy: config: accounts.limits[0].window: required (e.g. \"1h\")",
    ]


def test_check_config_warns_about_files_that_are_not_there(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(f'[forwarding]\nmap = "{tmp_path}/none.txt"\n'
                    f'[[forwarding.sources]]\ntype = "lsearch"\npath = "{tmp_path}/aliases"\n')
    assert cli.main(["check-config", "--quiet", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"exim-policy: warning: forwarding.map: {tmp_path}/none.txt does not exist: no "
        "recipient counts as forwarding until it does (exim-policy forwardings build writes it)",
        f"exim-policy: warning: forwarding.sources[0].path: {tmp_path}/aliases does not exist",
    ]


def test_example_config_is_valid_and_complete():
    """contrib/config.example.toml documents every key with its default."""
    import dataclasses
    from pathlib import Path

    from exim_policy.config import Config

    path = Path(__file__).resolve().parent.parent / "contrib" / "config.example.toml"
    assert load(path) == from_dict({})  # the example shows the defaults

    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    data = tomllib.loads(path.read_text())

    def missing(cls, table, prefix):
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if f.name in ("sources", "limits") or f.metadata.get("derived"):
                continue  # lists of tables, shown commented out; not keys
            if dataclasses.is_dataclass(f.type) or (
                    isinstance(f.default, object) and dataclasses.is_dataclass(f.default)):
                yield from missing(type(f.default), table.get(f.name, {}), key + ".")
            elif f.name not in table:
                yield key

    assert list(missing(Config, data, "")) == []


def test_every_command_module_is_named_after_its_subcommand():
    """cli.main imports only the module of the subcommand given (fast ${run} calls)."""
    import importlib

    from exim_policy.cli import command_name
    from exim_policy.commands import MODULES

    for name in MODULES:
        module = importlib.import_module(f"exim_policy.commands.{name}")
        assert module.NAME == command_name(name)


def test_query_command_does_not_import_the_other_commands():
    import subprocess
    import sys

    code = ("import sys; from exim_policy import cli\n"
            "try:\n    cli.main(['query', 'forwarding', 'a@b', '--config', '/nonexistent'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('exim_policy.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout
    assert out.strip() == "['exim_policy.commands.query']"


def test_relay_networks_file_is_read_with_exims_rules(tmp_path):
    path = tmp_path / "relays"
    path.write_text("# ours\n192.0.2.10\n\n2001:db8::/32   # v6 office\n\t198.51.100.0/24\n")
    config = from_dict({"outbound": {"relay_networks": ["203.0.113.0/24"],
                                     "relay_networks_file": str(path)}})
    assert [str(n) for n in config.outbound.all_relay_networks] == [
        "203.0.113.0/24", "192.0.2.10/32", "2001:db8::/32", "198.51.100.0/24"]
    text = to_toml(config)
    assert "file_networks" not in text and from_dict(tomllib.loads(text)) == config
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict({"outbound": {"file_networks": []}})


def test_relay_networks_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "relays"
    path.write_text("192.0.2.10\nrelay.example.net\n*.example.org\n")
    with pytest.raises(ConfigError) as caught:
        from_dict({"outbound": {"relay_networks_file": str(path)}})
    assert caught.value.errors == (
        f"outbound.relay_networks_file: {path} line 2: 'relay.example.net' is not an IP "
        "address or network",
        f"outbound.relay_networks_file: {path} line 3: '*.example.org' is not an IP address "
        "or network")
    with pytest.raises(ConfigError, match="cannot read .*: No such file"):
        from_dict({"outbound": {"relay_networks_file": str(tmp_path / "none")}})
