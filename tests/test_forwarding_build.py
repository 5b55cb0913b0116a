"""``exim-policy forwardings build|explain``: files on disk, atomic writes, exit codes."""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from exim_policy import cli
from exim_policy.config import ForwardingConfig, ForwardingSource
from exim_policy.forwarding import mapfile
from exim_policy.forwarding.build import ForwardingError, build_map, check_map, explain
from exim_policy.forwarding.mapfile import ForwardingMap

VIRTUAL = """\
# virtual aliases
info@example.com: sales@example.com, boss@gmail.example
sales@example.com: team@example.net
team@example.net: anna@example.net, \\team@example.net
anna@example.net: anna.private@web.example
loop1@example.com: loop2@example.com
loop2@example.com: loop1@example.com
bh@example.com: :blackhole:
*@old.example: someone@gmail.example
kept@old.example: kept@example.com
"""
ALIASES = "postmaster: root\nroot: admin@example.net\nabuse: |/usr/local/bin/ticket\n"
EXPECTED = ["@old.example", "anna@example.net", "info@example.com", "sales@example.com",
            "team@example.net"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "virtual").write_text(VIRTUAL)
    (tmp_path / "aliases").write_text(ALIASES)
    (tmp_path / "local_domains").write_text("# Exim domain list\nexample.net\n\nold.example\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "config.toml").write_text(f"""\
[forwarding]
local_domains = ["example.com"]
local_domains_file = "{tmp_path}/local_domains"
map = "{tmp_path}/out/forwardings.txt"
lsearch_output = "{tmp_path}/out/forwardings.lsearch"

[[forwarding.sources]]
type = "lsearch"
path = "{tmp_path}/virtual"

[[forwarding.sources]]
type = "lsearch"
path = "{tmp_path}/aliases"
domain = "example.com"
""")
    return tmp_path


def fconfig(site: Path, **changes) -> ForwardingConfig:
    from exim_policy.config import load

    config = load(site / "config.toml").forwarding
    return ForwardingConfig(**{**config.__dict__, **changes})


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_writes_map_and_lsearch_output(site, capsys):
    code, out, err = run(capsys, "forwardings", "build", "--config", str(site / "config.toml"))
    assert code == 0, err
    assert "5 entries, written" in out
    text = (site / "out/forwardings.txt").read_text()
    header, _, body = text.partition("\n# written by")
    assert header.startswith("# exim-policy forwarding map: 5 entries, built ")
    assert header.endswith("Z")
    assert all(line.startswith("#") for line in text.splitlines()[:2])
    assert text.splitlines()[2:] == EXPECTED
    assert os.stat(site / "out/forwardings.txt").st_mode & 0o777 == 0o644
    # what the daemon's reader makes of it
    fmap = ForwardingMap.load(str(site / "out/forwardings.txt"))
    assert fmap.forwards("Info@Example.COM") and fmap.forwards("whoever@old.example")
    assert not fmap.forwards("loop1@example.com") and not fmap.forwards("root@example.com")
    lsearch = (site / "out/forwardings.lsearch").read_text().splitlines()
    assert lsearch[0].startswith("# exim-policy forwarding map: 5 entries")
    assert lsearch[2:] == ["*@old.example: yes", "anna@example.net: yes", "info@example.com: yes",
                           "sales@example.com: yes", "team@example.net: yes"]
    # warnings: the over-matched key of the wildcard domain
    assert "kept@old.example does not forward, but the map's @old.example entry matches it" in err
    # root@example.com forwards to admin@example.net, a local mailbox: not in the map
    assert "root@example.com" not in text


def test_no_rewrite_when_unchanged_then_rewrite_on_change(site):
    config = fconfig(site)
    first = build_map(config, now=datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert first.written == (config.map, config.lsearch_output)
    before = {p: (os.stat(p).st_mtime_ns, Path(p).read_text()) for p in first.written}
    second = build_map(config, now=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert second.written == () and not second.changed
    assert {p: (os.stat(p).st_mtime_ns, Path(p).read_text()) for p in first.written} == before
    with open(site / "virtual", "a") as fh:
        fh.write("new@example.com: x@gmail.example\n")
    third = build_map(config, now=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert third.written == (config.map, config.lsearch_output)
    text = Path(config.map).read_text()
    assert "new@example.com\n" in text and "built 2025-01-01T00:00:00Z" in text
    # only the file that is stale is rewritten
    os.unlink(config.lsearch_output)
    mtime = os.stat(config.map).st_mtime_ns
    assert build_map(config).written == (config.lsearch_output,)
    assert os.stat(config.map).st_mtime_ns == mtime


def test_rewrite_keeps_mode_and_leaves_no_temp_files(site):
    config = fconfig(site, lsearch_output="")
    Path(config.map).write_text("stale@example.com\n")
    os.chmod(config.map, 0o640)
    assert build_map(config).written == (config.map,)
    assert os.stat(config.map).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(site / "out")) == ["forwardings.txt"]


@pytest.mark.parametrize("bad,words", [
    ("info@example.com: ok@gmail.example\nbroken@example.com: a b@gmail.example\n",
     "virtual:2: bad address"),
    ("x@example.com: :include:relative.inc\n", "virtual:1: :include: 'relative.inc'"),
], ids=["bad address", "relative include"])
def test_bad_input_exits_2_and_leaves_the_old_map(site, capsys, bad, words):
    config_path = str(site / "config.toml")
    assert run(capsys, "forwardings", "build", "--config", config_path)[0] == 0
    map_path = site / "out/forwardings.txt"
    before = (os.stat(map_path).st_mtime_ns, map_path.read_text())
    (site / "virtual").write_text(bad)
    code, out, err = run(capsys, "forwardings", "build", "--config", config_path)
    assert code == 2
    assert err.count("\n") == 1 and words in err and err.startswith("exim-policy: forwardings: ")
    assert (os.stat(map_path).st_mtime_ns, map_path.read_text()) == before
    assert sorted(os.listdir(site / "out")) == ["forwardings.lsearch", "forwardings.txt"]
    # --check and explain fail the same way
    assert run(capsys, "forwardings", "build", "--check", "--config", config_path)[0] == 2
    assert run(capsys, "forwardings", "explain", "a@example.com", "--config", config_path)[0] == 2


def test_sql_error_exits_2(site, capsys):
    db = site / "panel.db"
    sqlite3.connect(db).execute("CREATE TABLE t (a TEXT, b TEXT)").connection.commit()
    with open(site / "config.toml", "a") as fh:
        fh.write(f'\n[[forwarding.sources]]\ntype = "sqlite"\npath = "{db}"\n'
                 'query = "SELECT a, nope FROM t"\n')
    code, _out, err = run(capsys, "forwardings", "build", "--config", str(site / "config.toml"))
    assert code == 2 and f"{db}: query failed" in err and "nope" in err
    assert not (site / "out/forwardings.txt").exists()


def test_check_exit_codes(site, capsys):
    config_path = str(site / "config.toml")
    code, out, _ = run(capsys, "forwardings", "build", "--check", "--config", config_path)
    assert code == 1 and "forwardings.txt: missing" in out
    assert not (site / "out/forwardings.txt").exists()  # --check writes nothing
    assert run(capsys, "forwardings", "build", "-q", "--config", config_path)[:2] == (0, "")
    code, out, _ = run(capsys, "forwardings", "build", "--check", "--config", config_path)
    assert code == 0 and "current (5 entries)" in out
    with open(site / "virtual", "a") as fh:
        fh.write("new@example.com: x@gmail.example\n")
    mtime = os.stat(site / "out/forwardings.txt").st_mtime_ns
    code, out, _ = run(capsys, "forwardings", "build", "--check", "--config", config_path)
    assert code == 1 and "forwardings.txt: stale, 1 to add, 0 to remove" in out
    assert os.stat(site / "out/forwardings.txt").st_mtime_ns == mtime
    assert check_map(fconfig(site)).current is False


def test_explain_text_and_json(site, capsys):
    config_path = str(site / "config.toml")
    code, out, _ = run(capsys, "forwardings", "explain", "INFO@example.com", "--config", config_path)
    assert code == 0
    virtual = f"{site}/virtual"
    assert out.splitlines() == [
        "info@example.com: forwarding (forwards to 2 external addresses)",
        f"  info@example.com -> boss@gmail.example  ({virtual}:2)",
        f"  info@example.com -> sales@example.com -> team@example.net -> anna@example.net -> "
        f"anna.private@web.example  ({virtual}:2, :3, :4, :5)",
    ]
    code, out, _ = run(capsys, "forwardings", "explain", "x@old.example", "--json",
                       "--config", config_path)
    assert code == 0
    assert json.loads(out) == {
        "address": "x@old.example", "forwarding": True, "reason": "forwards to 1 external address",
        "chains": [[{"address": "x@old.example", "source": f"{virtual}:9", "key": "*@old.example"},
                    {"address": "someone@gmail.example", "source": None, "key": None}]]}
    code, out, _ = run(capsys, "forwardings", "explain", "loop1@example.com", "--json",
                       "--config", config_path)
    data = json.loads(out)
    assert code == 1 and data["forwarding"] is False and data["chains"] == []
    assert data["reason"].startswith("cycle without exit: loop1@example.com -> loop2@example.com")
    code, out, _ = run(capsys, "forwardings", "explain", "postmaster@example.com",
                       "--config", config_path)
    assert code == 1
    assert out == ("postmaster@example.com: not forwarding: only local ends: mailbox "
                   "admin@example.net\n")
    code, out, _ = run(capsys, "forwardings", "explain", "abuse@example.com", "--config", config_path)
    assert code == 1 and f"|/usr/local/bin/ticket ({site}/aliases:3)" in out
    code, out, _ = run(capsys, "forwardings", "explain", "x@elsewhere.example", "--config", config_path)
    assert code == 1 and "elsewhere.example is not a local domain" in out


def test_explain_api(site):
    result = explain(fconfig(site), "sales@example.com")
    assert result.forwarding
    assert [h.address for h in result.chains[0]] == [
        "sales@example.com", "team@example.net", "anna@example.net", "anna.private@web.example"]


def test_configuration_problems(site, capsys, tmp_path):
    with pytest.raises(ForwardingError, match="local_domains"):
        build_map(fconfig(site, local_domains=(), local_domains_file=""))
    with pytest.raises(ForwardingError, match=r"local_domains_file|No such file"):
        build_map(fconfig(site, local_domains_file=str(tmp_path / "nope")))
    with pytest.raises(ForwardingError, match=r"sources\[0\]\.domain: 'elsewhere.example'"):
        build_map(fconfig(site, sources=(ForwardingSource(type="lsearch", path=str(site / "aliases"),
                                                          domain="elsewhere.example"),)))
    with pytest.raises(ForwardingError, match="cannot write"):
        build_map(fconfig(site, map=str(tmp_path / "no-such-dir" / "map.txt")))
    code, _, err = run(capsys, "forwardings", "build", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "no such file" in err


def test_map_file_round_trip(tmp_path):
    entries = ["@old.example", "a@example.com", "b@example.net"]
    text = mapfile.render(mapfile.map_body(entries), len(entries),
                          datetime(2024, 5, 1, 12, tzinfo=timezone.utc))
    assert text == ("# exim-policy forwarding map: 3 entries, built 2024-05-01T12:00:00Z\n"
                    "# written by `exim-policy forwardings build`; do not edit\n"
                    "@old.example\na@example.com\nb@example.net\n")
    path = tmp_path / "map.txt"
    mapfile.atomic_write(str(path), text)
    assert mapfile.read_entries(str(path)) == entries
    assert mapfile.is_current(str(path), mapfile.map_body(entries))
    assert not mapfile.is_current(str(path), mapfile.map_body(entries[:2]))
    assert ForwardingMap.parse(text).domains == {"old.example"}
    assert all(mapfile.has_entry(str(path), a) for a in ("A@Example.com", "x@old.example"))
    assert not mapfile.has_entry(str(path), "c@example.com")
    lsearch = tmp_path / "map.lsearch"
    mapfile.atomic_write(str(lsearch), mapfile.render(mapfile.lsearch_body(entries), 3))
    assert mapfile.read_entries(str(lsearch), lsearch=True) == entries
    assert mapfile.read_entries(str(tmp_path / "missing")) is None
    empty = mapfile.render(mapfile.map_body([]), 0)
    assert empty.startswith("# exim-policy forwarding map: 0 entries")
    assert ForwardingMap.parse(empty).entries() == []
