"""The forwarding graph: which local addresses reach an external mailbox, and explain().

Scenarios are lsearch texts (read by the real reader) -> the expected map entries.  Every
scenario is built as ``build_map`` does it (a map graph) and as explain builds it
(``detail=True``: every address and end a node); both must give the same entries and
warnings.  Generated alias sets are compared with a deliberately naive reference
(per-address search, no interning, no bulk tricks).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from exim_policy.forwarding import lsearch, sqlite_source
from exim_policy.forwarding.graph import ForwardingGraph, Warnings
from exim_policy.forwarding.redirect import END_START

import alias_sets

LOCAL = ("x.test", "y.test")


def build(tmp_path: Path, *texts: str, local=LOCAL, detail=False, **options):
    """Graph of lsearch sources ``texts`` (written to files virtual0, virtual1, ...)."""
    warn = Warnings()
    sources = []
    for i, text in enumerate(texts):
        path = tmp_path / f"virtual{i}"
        path.write_text(text)
        sources.append(lsearch.read(str(path), frozenset(local), detail=detail, warn=warn,
                                    **options))
    return ForwardingGraph(sources, local, detail=detail, warn=warn,
                           case_sensitive=options.get("case_sensitive", False))


def entries_both_ways(tmp_path, *texts, **options) -> tuple[list[str], list[str]]:
    fast = build(tmp_path, *texts, **options)
    detail = build(tmp_path, *texts, detail=True, **options)
    assert fast.entries() == detail.entries()
    assert fast.warn.first == detail.warn.first
    return fast.entries(), fast.warn.first


SCENARIOS = [
    ("direct forward", "a@x.test: someone@gmail.example\n", ["a@x.test"]),
    ("chain of 5",
     "a1@x.test: a2@x.test\na2@x.test: a3@y.test\na3@y.test: a4@x.test\n"
     "a4@x.test: a5@x.test\na5@x.test: far@gmail.example\n",
     ["a1@x.test", "a2@x.test", "a3@y.test", "a4@x.test", "a5@x.test"]),
    ("cycle without exit", "a@x.test: b@x.test\nb@x.test: c@y.test\nc@y.test: a@x.test\n", []),
    ("cycle with exit",
     "a@x.test: b@x.test\nb@x.test: c@y.test\nc@y.test: a@x.test, out@gmail.example\n",
     ["a@x.test", "b@x.test", "c@y.test"]),
    ("self reference with exit", "a@x.test: a@x.test, out@gmail.example\nb@x.test: b@x.test\n",
     ["a@x.test"]),
    ("fan-out and fan-in",
     "a@x.test: mbox1@x.test, mbox2@y.test, b@x.test\nb@x.test: out@gmail.example\n"
     "c@x.test: b@x.test, d@x.test\nd@x.test: mbox3@x.test\n",
     ["a@x.test", "b@x.test", "c@x.test"]),
    ("local mailbox is an end", "a@x.test: bob@x.test\n", []),
    ("specials are local ends",
     "a@x.test: :blackhole:\nb@x.test: |/usr/bin/ticket\nc@x.test: /var/mail/archive\n"
     "d@x.test: :fail: gone\ne@x.test: :defer: later\nf@x.test: out@gmail.example, :blackhole:\n"
     "g@x.test: out@gmail.example, :defer: x\nh@x.test: out@gmail.example, :fail: x\n"
     "i@x.test: \\i\nj@x.test: \\out@gmail.example\n",
     ["h@x.test", "j@x.test"]),
    ("empty entry: the router declines", "a@x.test:\nb@x.test: a@x.test\n", []),
    ("bare local part qualified with the key's domain",
     "a@x.test: b\nb@x.test: out@gmail.example\nc@y.test: b\n", ["a@x.test", "b@x.test"]),
    ("domain wildcard",
     "*@y.test: catch@gmail.example\nkeep@y.test: keep@y.test\nfwd@x.test: someone@y.test\n",
     ["@y.test", "fwd@x.test", "someone@y.test"]),
    ("exact key beats the wildcard of its source",
     "*@y.test: catch@gmail.example\nloc@y.test: mbox@x.test\nvia@x.test: loc@y.test\n",
     ["@y.test"]),
    ("wildcard to a local mailbox does not forward", "*@y.test: postmaster@x.test\n", []),
    ("catch-all star",
     "*: catch@gmail.example\nbob@x.test: bob@x.test\n", ["@x.test", "@y.test"]),
    ("star with a bare local part is qualified per domain",
     "*: postmaster\npostmaster@x.test: out@gmail.example\n",
     ["@x.test", "postmaster@x.test"]),
    ("case-insensitive", "A@X.TEST: B@x.test\nb@X.Test: Out@Gmail.EXAMPLE\n",
     ["a@x.test", "b@x.test"]),
    ("unknown local domain: the key is ignored",
     "a@other.example: out@gmail.example\nb@x.test: a@other.example\n", ["b@x.test"]),
    ("duplicate key: the first line wins",
     "a@x.test: mbox@x.test\na@x.test: out@gmail.example\nb@x.test: out@gmail.example\n"
     "b@x.test: mbox@x.test\n", ["b@x.test"]),
]


@pytest.mark.parametrize("text,expected", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_scenarios(tmp_path, text, expected):
    entries, _warnings = entries_both_ways(tmp_path, text)
    assert entries == expected


def test_include_is_followed(tmp_path):
    inc = tmp_path / "team.inc"
    inc.write_text("alice@x.test\nbob@gmail.example\n")
    entries, _ = entries_both_ways(tmp_path, f"team@x.test: :include:{inc}\nalice@x.test: :blackhole:\n")
    assert entries == ["team@x.test"]


def test_case_sensitive_local_parts(tmp_path):
    text = "A@x.test: B@x.test\nb@x.test: out@gmail.example\nC@x.test: b@x.test\n"
    graph = build(tmp_path, text, case_sensitive=True)
    # B@x.test is not the key b@x.test: A only reaches a mailbox
    assert not graph.is_forwarding("A@x.test")
    assert graph.is_forwarding("C@x.test") and graph.is_forwarding("b@x.test")
    assert graph.entries() == ["b@x.test", "c@x.test"]  # the map is lower-case
    assert build(tmp_path, text, detail=True, case_sensitive=True).entries() == graph.entries()


def test_warnings(tmp_path):
    text = ("a@other.example: out@gmail.example\n"  # not a local domain
            "d@x.test: out@gmail.example\nd@x.test: mbox@x.test\n"  # duplicate
            "*@y.test: out@gmail.example\nkeep@y.test: mbox@x.test\n")  # over-match
    entries, warnings = entries_both_ways(tmp_path, text)
    assert entries == ["@y.test", "d@x.test"]
    source = f"{tmp_path}/virtual0"
    assert f"{source}:1: key 'a@other.example' ignored: other.example is not a local domain" \
        in warnings
    assert f"{source}:3: duplicate key 'd@x.test' ignored (the first one wins)" in warnings
    assert any(w.startswith("keep@y.test does not forward, but the map's @y.test entry matches it")
               for w in warnings)


def test_unwritable_addresses_are_left_out_with_a_warning(tmp_path):
    entries, warnings = entries_both_ways(
        tmp_path, '"john doe@x.test": out@gmail.example\nok@x.test: out@gmail.example\n')
    assert entries == ["ok@x.test"]
    assert any("'john doe@x.test' forwards but cannot be written" in w for w in warnings)


def test_sources_are_combined_by_union(tmp_path):
    db = tmp_path / "panel.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE f (s TEXT, d TEXT)")
    conn.executemany("INSERT INTO f VALUES (?, ?)", [
        ("a@x.test", "mbox@x.test"), ("a@x.test", "out@gmail.example"),  # rows: all used
        ("b@x.test", "out@gmail.example"),
        ("@y.test", "out@gmail.example"),
    ])
    conn.commit()
    conn.close()
    path = tmp_path / "virtual"
    path.write_text("b@x.test: mbox@x.test\nc@x.test: b@x.test\nloc@y.test: loc@y.test\n")
    for detail in (False, True):
        local = frozenset(LOCAL)
        graph = ForwardingGraph([lsearch.read(str(path), local, detail=detail),
                                 sqlite_source.read(str(db), "SELECT s, d FROM f", local,
                                                    detail=detail)], LOCAL, detail=detail)
        # b: a mailbox in the file, a forward in the table -> forwards; loc@y.test is an exact
        # key in the file, but the table's catch-all covers it (it is no key there)
        assert graph.entries() == ["@y.test", "a@x.test", "b@x.test", "c@x.test", "loc@y.test"]


# ------------------------------------------------------------------------ explain --
def test_explain_chain_with_sources(tmp_path):
    graph = build(tmp_path, "# aliases\na@x.test: b@x.test\nb@x.test: mbox@x.test, c@y.test\n"
                            "c@y.test: far@gmail.example, near@gmail.example\n", detail=True)
    result = graph.explain("A@X.test")
    assert result.forwarding
    source = f"{tmp_path}/virtual0"
    assert [[(h.address, h.source) for h in chain] for chain in result.chains] == [
        [("a@x.test", f"{source}:2"), ("b@x.test", f"{source}:3"), ("c@y.test", f"{source}:4"),
         ("far@gmail.example", None)],
        [("a@x.test", f"{source}:2"), ("b@x.test", f"{source}:3"), ("c@y.test", f"{source}:4"),
         ("near@gmail.example", None)],
    ]


def test_explain_through_a_wildcard(tmp_path):
    graph = build(tmp_path, "fwd@x.test: anyone@y.test\n*@y.test: catch@gmail.example\n",
                  detail=True)
    (chain,) = graph.explain("fwd@x.test").chains
    source = f"{tmp_path}/virtual0"
    assert [(h.address, h.source, h.key) for h in chain] == [
        ("fwd@x.test", f"{source}:1", "fwd@x.test"),
        ("anyone@y.test", f"{source}:2", "*@y.test"),
        ("catch@gmail.example", None, None)]
    fresh = graph.explain("never-seen@y.test")  # an address that appears nowhere
    assert fresh.forwarding
    assert [(h.address, h.key) for h in fresh.chains[0]] == [
        ("never-seen@y.test", "*@y.test"), ("catch@gmail.example", None)]


@pytest.mark.parametrize("text,address,words", [
    ("a@x.test: b@x.test\nb@x.test: a@x.test\n", "a@x.test",
     "cycle without exit: a@x.test -> b@x.test -> a@x.test"),
    ("a@x.test: b@x.test\n", "nobody@x.test", "local mailbox: not a key in any source"),
    ("a@x.test: b@x.test\n", "a@x.test", "only local ends: mailbox b@x.test"),
    ("a@x.test: :blackhole:, |/bin/x\n", "a@x.test", "only local ends: :blackhole:"),
    ("a@x.test:\n", "a@x.test", "its entry has no targets"),
    ("a@x.test: b@gmail.example\n", "a@gmail.example", "gmail.example is not a local domain"),
    ("*@y.test: out@gmail.example\nk@y.test: k@y.test\n", "k@y.test",
     "the map's @y.test entry matches it anyway"),
    ("a@x.test: b\n", "no-at-sign", "not an address"),
], ids=["cycle", "mailbox", "mailbox end", "specials", "empty", "not local", "over-match",
        "garbage"])
def test_explain_why_not(tmp_path, text, address, words):
    result = build(tmp_path, text, detail=True).explain(address)
    assert not result.forwarding and result.chains == ()
    assert words in result.reason, result.reason


# ----------------------------------------------------------- naive reference model --
def reference(local: frozenset, sources: list[tuple[list, bool]]) -> list[str]:
    """Map entries by brute force: resolve each address like Exim's lsearch*@ per source
    (exact key, else *@domain, else *), union over sources, depth-first search to an
    external address."""
    tables = []
    for entries, first_wins in sources:
        exact, wild, star = {}, {}, None
        for key, targets, _line in entries:
            domain = key.rpartition("@")[2]
            if key == "*":
                if star is None or not first_wins:
                    star = (star or []) + list(targets)
            elif domain not in local:
                continue
            elif key.startswith("*@"):
                if not (first_wins and domain in wild):
                    wild.setdefault(domain, []).extend(targets)
            elif not (first_wins and key in exact):
                exact.setdefault(key, []).extend(targets)
        tables.append((exact, wild, star))

    def successors(address):
        domain = address.rpartition("@")[2]
        for exact, wild, star in tables:
            if address in exact:
                yield from exact[address]
            elif domain in wild:
                yield from wild[domain]
            elif star is not None:
                for t in star:
                    yield t if "@" in t or (t[0] in END_START and t[0] != "\\") \
                        else f"{t}@{domain}"

    def forwards(address):
        seen, stack = {address}, [address]
        while stack:
            for t in successors(stack.pop()):
                if t[0] == "\\":
                    if t[1:].rpartition("@")[2] not in local:
                        return True
                    continue
                if t[0] in END_START:
                    continue
                if t.rpartition("@")[2] not in local:
                    return True
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return False

    candidates = set()
    for exact, _w, _s in tables:
        candidates |= set(exact)
    for entries, _ in sources:
        for _key, targets, _line in entries:
            candidates |= {t for t in targets
                           if t[0] not in END_START and t.rpartition("@")[2] in local}
    result = {a for a in candidates if forwards(a)}
    domains = set().union(*(set(w) for _e, w, _s in tables))
    if any(s is not None for _e, _w, s in tables):
        domains |= local
    result |= {f"@{d}" for d in domains if forwards(f"\0fresh@{d}")}
    return sorted(result)


@pytest.mark.parametrize("seed,aliases,edges,domains", [
    (1, 2000, 4000, 14), (2, 3000, 9000, 24), (3, 1500, 1200, 8)])
def test_generated_sets_match_the_reference(tmp_path, seed, aliases, edges, domains):
    path = alias_sets.generate(tmp_path, seed, aliases, edges, domains)
    local = alias_sets.local_domains(tmp_path)
    entries = alias_sets.entries(lsearch.read(str(path), local, detail=True))
    expected = reference(local, [(entries, True)])
    assert any(e.startswith("@") for e in expected)  # the sets do exercise wildcards
    for detail in (False, True):
        graph = ForwardingGraph([lsearch.read(str(path), local, detail=detail)], local,
                                detail=detail)
        assert graph.entries() == expected
        for address in expected[:200]:
            if not address.startswith("@"):
                assert graph.is_forwarding(address)
    # explain agrees with the map for every key
    wanted = set(expected)
    for key, _t, _l in entries[:300]:
        if key.startswith("*"):
            continue
        result = graph.explain(key)
        domain = key.rpartition("@")[2]
        assert result.forwarding == (key in wanted), (key, result.reason)
        if result.forwarding:
            assert all(chain[0].address == key and chain[-1].source is None
                       and chain[-1].address.rpartition("@")[2] not in local
                       for chain in result.chains)
        elif f"@{domain}" not in wanted:
            assert result.reason


def test_several_sources_of_one_key(tmp_path):
    """A key of two sources is one address: it forwards if either entry does; a source's
    wildcard covers the addresses that are no key *there*."""
    texts = ("a@x.test: m@x.test\nb@x.test: a@x.test\nd@x.test: d@x.test\n"
             "d@x.test: out@gmail.example\nk@x.test: k@x.test\nn@x.test: n@x.test\n",
             "a@x.test: out@gmail.example\n*@x.test: catch@gmail.example\nn@x.test: n@x.test\n")
    entries, warnings = entries_both_ways(tmp_path, *texts)
    assert entries == ["@x.test", "a@x.test", "b@x.test", "d@x.test", "k@x.test", "m@x.test"]
    assert f"{tmp_path}/virtual0:4: duplicate key 'd@x.test' ignored (the first one wins)" \
        in warnings
    assert any(w.startswith("n@x.test does not forward, but the map's @x.test") for w in warnings)
