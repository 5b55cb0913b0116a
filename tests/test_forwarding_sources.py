"""Alias sources: Exim lsearch files and SQLite tables -> entries (key, targets, line).

Every lsearch case is read twice: as the reader reads it (plain lines checked and split in
bulk) and with every line sent through redirect.py (``_PLAIN`` emptied: no line is plain);
both must agree.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from exim_policy.forwarding import lsearch, sqlite_source
from exim_policy.forwarding.addresses import ForwardingSourceError

import alias_sets

LOCAL = frozenset(["x.test", "y.test", "z.test"])


def parse_lsearch(path, local=LOCAL, **options):
    return lsearch.read(str(path), local, detail=True, **options)


def parse(tmp_path: Path, text: str | bytes, monkeypatch=None, **options
          ) -> tuple[dict, list[str], list]:
    """(key -> sorted targets, warnings, raw entries); asserts bulk == redirect.py only."""
    path = tmp_path / "virtual"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    warnings: list[str] = []
    fast = alias_sets.entries(parse_lsearch(path, warn=warnings.append, **options))
    slow_warnings: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lsearch, "_PLAIN", b"")
        slow = alias_sets.entries(parse_lsearch(path, warn=slow_warnings.append, **options))
    assert fast == slow, "the bulk reader and redirect.py disagree"
    assert warnings == slow_warnings
    return {key: targets for key, targets, _line in fast}, warnings, fast


# (id, file text, parse options, expected {key: sorted targets})
CASES = [
    ("plain", "a@x.test: b@x.test, c@ext.example\n", {},
     {"a@x.test": ["b@x.test", "c@ext.example"]}),
    ("no colon", "a@x.test b@ext.example\n", {}, {"a@x.test": ["b@ext.example"]}),
    ("space before colon", "a@x.test : b@ext.example\n", {}, {"a@x.test": ["b@ext.example"]}),
    ("no space after colon", "a@x.test:b@ext.example,c@ext.example\n", {},
     {"a@x.test": ["b@ext.example", "c@ext.example"]}),
    ("odd spacing", "a@x.test:   b@ext.example ,c@ext.example  ,  d@ext.example   \n", {},
     {"a@x.test": ["b@ext.example", "c@ext.example", "d@ext.example"]}),
    ("comments and blank lines", "# a comment\n\na@x.test: b@ext.example\n#b@x.test: c@x.test\n",
     {}, {"a@x.test": ["b@ext.example"]}),
    ("continuation lines", "a@x.test: b@ext.example,\n  c@ext.example,\n\td@ext.example\n", {},
     {"a@x.test": ["b@ext.example", "c@ext.example", "d@ext.example"]}),
    ("a comment ends the continuation",
     "a@x.test: b@ext.example,\n# note\n  c@ext.example\nz@x.test: y@ext.example\n", {},
     {"a@x.test": ["b@ext.example"], "z@x.test": ["y@ext.example"]}),
    ("an empty line ends the continuation",
     "a@x.test: b@ext.example,\n\n  c@ext.example\n", {}, {"a@x.test": ["b@ext.example"]}),
    ("a blank line ends the continuation",
     "a@x.test: b@ext.example,\n   \n  c@ext.example\n", {}, {"a@x.test": ["b@ext.example"]}),
    ("indented line before any key is ignored", "  stray@ext.example\na@x.test: b@x.test\n", {},
     {"a@x.test": ["b@x.test"]}),
    ("quoted key", '"Some One@x.test": b@ext.example\n', {},
     {"some one@x.test": ["b@ext.example"]}),
    ("quoted key with escapes", '"a\\"b@x.test" b@ext.example\n', {},
     {'a"b@x.test': ["b@ext.example"]}),
    ("upper case is folded", "A@X.TEST: B@Ext.Example, Cc@X.Test\n", {},
     {"a@x.test": ["b@ext.example", "cc@x.test"]}),
    ("case-sensitive local parts", "A@X.TEST: B@Ext.Example, Cc@X.Test\n",
     {"case_sensitive": True}, {"A@x.test": ["B@ext.example", "Cc@x.test"]}),
    ("bare local part is qualified with the key's domain", "a@x.test: bob, carol@ext.example\n",
     {}, {"a@x.test": ["bob@x.test", "carol@ext.example"]}),
    ("empty value", "a@x.test:\nb@x.test:   \n", {}, {"a@x.test": [], "b@x.test": []}),
    ("trailing and double commas", "a@x.test: b@ext.example,, c@ext.example,\n", {},
     {"a@x.test": ["b@ext.example", "c@ext.example"]}),
    ("CRLF line ends", "a@x.test: b@ext.example\r\nc@x.test: d@ext.example,\r\n  e@x.test\r\n",
     {}, {"a@x.test": ["b@ext.example"], "c@x.test": ["d@ext.example", "e@x.test"]}),
    ("wildcard keys", "*@x.test: catch@ext.example\n*: postmaster, \\root\n", {},
     {"*@x.test": ["catch@ext.example"], "*": ["\\root", "postmaster"]}),
    ("/etc/aliases style with domain", "postmaster: root\nroot: admin@ext.example\n*: root\n",
     {"domain": "X.test"},
     {"postmaster@x.test": ["root@x.test"], "root@x.test": ["admin@ext.example"],
      "*@x.test": ["root@x.test"]}),
    # Exim's special items
    ("blackhole", "a@x.test: :blackhole:\n", {}, {"a@x.test": [":blackhole:"]}),
    ("blackhole anywhere discards the list", "a@x.test: b@ext.example, :blackhole:\n", {},
     {"a@x.test": [":blackhole:"]}),
    ("defer anywhere discards the list", "a@x.test: b@ext.example, :defer: try later\n", {},
     {"a@x.test": [":defer: try later"]}),
    ("fail keeps what came before, its text runs to the end",
     "a@x.test: b@ext.example, :fail: gone, really, c@ext.example\n", {},
     {"a@x.test": [":fail: gone, really, c@ext.example", "b@ext.example"]}),
    ("fail first", "a@x.test: :fail: no such user\n", {}, {"a@x.test": [":fail: no such user"]}),
    ("unknown is ignored", "a@x.test: :unknown:, b@ext.example\n", {},
     {"a@x.test": ["b@ext.example"]}),
    ("pipe and file", "a@x.test: |/usr/bin/Prog --x, /var/mail/Archive\n", {},
     {"a@x.test": ["/var/mail/Archive", "|/usr/bin/Prog --x"]}),
    ("quoted pipe with a comma", 'a@x.test: "|/usr/bin/prog a, b", b@ext.example\n', {},
     {"a@x.test": ["b@ext.example", "|/usr/bin/prog a, b"]}),
    ("a /path with a domain is an address", "a@x.test: /X=y/@gate.example\n", {},
     {"a@x.test": ["/x=y/@gate.example"]}),
    ("backslash: no further redirection", "a@x.test: \\a, \\Ext@Gmail.example\n", {},
     {"a@x.test": ["\\a@x.test", "ext@gmail.example"]}),
    ("name <address> and comments", "a@x.test: Some One <so@ext.example>, b@ext.example (boss)\n",
     {}, {"a@x.test": ["b@ext.example", "so@ext.example"]}),
    ("quoted local part", 'a@x.test: "john doe"@ext.example\n', {},
     {"a@x.test": ["john doe@ext.example"]}),
    ("special on a continuation line", "a@x.test: b@ext.example,\n   :blackhole:\n", {},
     {"a@x.test": [":blackhole:"]}),
]


@pytest.mark.parametrize("text,options,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lsearch_syntax(tmp_path, text, options, expected):
    entries, warnings, _ = parse(tmp_path, text, **options)
    assert entries == expected
    assert warnings == []


def test_lines_are_the_key_lines(tmp_path):
    _, _, raw = parse(tmp_path, "# c\na@x.test: b@x.test,\n  c@x.test\n\nd@x.test: :blackhole:\n")
    assert [(key, line) for key, _t, line in raw] == [("a@x.test", 2), ("d@x.test", 5)]


def test_include_is_read_and_followed(tmp_path):
    inc = tmp_path / "list.inc"
    inc.write_text("# members\ni1@ext.example, i2@x.test\nbob\n\"|/bin/x\"\n")
    entries, _, _ = parse(tmp_path, f"team@x.test: :include:{inc}, lead@ext.example\n")
    assert entries == {"team@x.test": ["bob@x.test", "i1@ext.example", "i2@x.test",
                                       "lead@ext.example", "|/bin/x"]}


def test_include_with_blackhole_and_fail(tmp_path):
    bh = tmp_path / "bh.inc"
    bh.write_text("i1@ext.example\n:blackhole:\n")
    fail = tmp_path / "fail.inc"
    fail.write_text("i1@ext.example\n:fail: closed\n")
    entries, _, _ = parse(tmp_path, f"a@x.test: o@ext.example, :include:{bh}\n"
                                    f"b@x.test: o@ext.example, :include:{fail}, p@ext.example\n")
    assert entries["a@x.test"] == [":blackhole:"]
    # Exim drops the included items before :fail: but keeps the outer ones before it
    assert entries["b@x.test"] == [":fail: closed", "o@ext.example"]


def test_keys_exim_never_looks_up_are_warned_about(tmp_path):
    entries, warnings, _ = parse(tmp_path, "bare: b@ext.example\nok@x.test: c@ext.example\n")
    assert entries == {"ok@x.test": ["c@ext.example"]}
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path}/virtual:1: key 'bare'")
    entries, warnings, _ = parse(tmp_path, "full@x.test: b@ext.example\nok: c@ext.example\n",
                                 domain="x.test")
    assert entries == {"ok@x.test": ["c@ext.example"]}
    assert warnings[0].startswith(f"{tmp_path}/virtual:1: key 'full@x.test' ignored")


# (id, file text, line named in the error, words in it)
ERRORS = [
    ("two @", "a@x.test: b@@ext.example\n", 1, "bad address"),
    ("white space inside an address", "ok@x.test: b@ext.example\nbad@x.test: a b@ext.example\n",
     2, "bad address"),
    ("empty domain", "ok@x.test: b@ext.example\n\nbad@x.test: b@\n", 3, "bad address"),
    ("double dot", "a@x.test: b@ext..example\n", 1, "bad"),
    ("bad char", "a@x.test: b;c@ext.example\n", 1, "bad address"),
    ("error on a continuation names the key line", "a@x.test: b@ext.example,\n  c d@x.test\n",
     1, "bad address"),
    ("unterminated quoted key", '"a@x.test: b@ext.example\n', 1, "unterminated"),
    ("empty local part in a key", "@x.test: b@ext.example\n", 1, "bad key"),
    ("unknown special", "a@x.test: :frobnicate: x\n", 1, "unknown special"),
    ("relative include", "a@x.test: :include:list.inc\n", 1, "not an absolute path"),
    ("missing include", "z@x.test: x@y.example\na@x.test: :include:/nonexistent/list\n", 2,
     "No such file"),
    ("unterminated <", "a@x.test: Name <b@ext.example\n", 1, "bad address"),
]


@pytest.mark.parametrize("text,line,words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_lsearch_errors_name_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "virtual"
    path.write_text(text)
    for plain in (lsearch._PLAIN, b""):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lsearch, "_PLAIN", plain)
            with pytest.raises(ForwardingSourceError) as info:
                parse_lsearch(path)
        message = str(info.value)
        assert message.startswith(f"{path}:{line}: "), message
        assert words in message
        assert "\n" not in message


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ForwardingSourceError, match=r"/missing: No such file"):
        parse_lsearch(tmp_path / "missing")
    path = tmp_path / "latin1"
    path.write_bytes(b"a@x.test: b@ext.example\nc@x.test: caf\xe9@ext.example\n")
    with pytest.raises(ForwardingSourceError, match=r"/latin1:2: not valid UTF-8"):
        parse_lsearch(path)


def test_include_loop_is_an_error(tmp_path):
    loop = tmp_path / "loop.inc"
    loop.write_text(f":include:{loop}\n")
    path = tmp_path / "virtual"
    path.write_text(f"a@x.test: :include:{loop}\n")
    with pytest.raises(ForwardingSourceError, match="loop"):
        parse_lsearch(path)


@pytest.mark.parametrize("seed", [1, 2])
def test_bulk_reader_and_redirect_py_agree_on_generated_sets(tmp_path, seed):
    path = alias_sets.generate(tmp_path, seed, 3000, 7000, 12)
    local = alias_sets.local_domains(tmp_path)
    fast = alias_sets.entries(parse_lsearch(path, local))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lsearch, "_PLAIN", b"")
        slow = alias_sets.entries(parse_lsearch(path, local))
    assert len(fast) == 3000
    assert fast == slow


# ------------------------------------------------------------------------- sqlite --
def make_db(path: Path, rows: list[tuple]) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE forwardings (source TEXT, destination TEXT, active INTEGER)")
    conn.executemany("INSERT INTO forwardings VALUES (?, ?, 1)", rows)
    conn.commit()
    conn.close()
    return str(path)


QUERY = "SELECT source, destination FROM forwardings WHERE active = 1"


def parse_sqlite(db, query, local=LOCAL, **options):
    return sqlite_source.read(db, query, local, detail=True, **options)


def test_sqlite_rows(tmp_path):
    db = make_db(tmp_path / "panel.db", [
        ("a@X.test", "b@ext.example"),
        ("a@x.test", "local@x.test"),  # a second row for the same source: both are used
        ("list@x.test", "m1@ext.example, m2@ext.example,m3"),
        ("@x.test", "catch@ext.example"),  # Postfix-style catch-all
        ("*@y.test", ":blackhole:"),
    ])
    source = parse_sqlite(db, QUERY)
    assert alias_sets.entries(source) == [
        ("a@x.test", ["b@ext.example"], 1),
        ("a@x.test", ["local@x.test"], 2),
        ("list@x.test", ["m1@ext.example", "m2@ext.example", "m3@x.test"], 3),
        ("*@x.test", ["catch@ext.example"], 4),
        ("*@y.test", [":blackhole:"], 5),
    ]
    assert source.origin(3) == f"{db}:row 3"
    assert not source.first_wins


def test_sqlite_is_opened_read_only(tmp_path):
    db = make_db(tmp_path / "panel.db", [("a@x.test", "b@ext.example")])
    with pytest.raises(ForwardingSourceError, match="readonly"):
        parse_sqlite(db, "DELETE FROM forwardings RETURNING source, destination")
    assert alias_sets.entries(parse_sqlite(db, QUERY)) == [("a@x.test", ["b@ext.example"], 1)]
    # a missing database is an error, not a new empty file
    with pytest.raises(ForwardingSourceError, match="cannot open database"):
        parse_sqlite(str(tmp_path / "missing.db"), QUERY)
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("rows,query,words", [
    ([("a@x.test", "b@ext.example")], "SELECT source, nope FROM forwardings", "query failed"),
    ([("a@x.test", "b@ext.example")], "SELEC source", "query failed"),
    ([("a@x.test", "b@ext.example"), ("c@x.test", None)], QUERY, "row 2: source and destination"),
    ([("a@x.test", "b@ext.example")], "SELECT source FROM forwardings", "row 1: the query must"),
    ([("a@x.test", "b@@ext.example")], QUERY, "row 1: bad address"),
    ([("@", "b@ext.example")], QUERY, "row 1: bad source"),
], ids=["unknown column", "syntax", "null", "one column", "bad address", "bad source"])
def test_sqlite_errors(tmp_path, rows, query, words):
    db = make_db(tmp_path / "panel.db", rows)
    with pytest.raises(ForwardingSourceError) as info:
        parse_sqlite(db, query)
    assert str(info.value).startswith(db)
    assert words in str(info.value)
