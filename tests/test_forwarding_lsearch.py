"""The lsearch reader's bulk path against redirect.py, and its pieces against the whole file.

The reader checks and splits plain lines in bulk and sends every other line through
redirect.py; it reads a file in pieces that start at an entry.  Every test builds the same
configuration four ways -- as it is, with no line plain (``_PLAIN`` emptied: every line goes
through redirect.py), in pieces of a few bytes (``PIECE_BYTES``: each piece is an entry or
two), and as explain builds it (``detail``) -- and compares everything a build reports:
entries, alias and target counts, warnings (in order) and their number, or the error.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exim_policy.config import ForwardingConfig, ForwardingSource
from exim_policy.forwarding import build, lsearch
from exim_policy.forwarding.addresses import ForwardingError

import alias_sets
from test_forwarding_graph import SCENARIOS

LOCAL = ("x.test", "y.test", "z.test")


def _config(tmp_path: Path, text: str | bytes, local=LOCAL, **options) -> ForwardingConfig:
    path = tmp_path / "virtual"
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return ForwardingConfig(local_domains=tuple(local), map=str(tmp_path / "map.txt"),
                            sources=(ForwardingSource(type="lsearch", path=str(path)),),
                            **options)


def _map(config: ForwardingConfig, detail: bool = False, **constants):
    """The build's result, or its error as text, with lsearch's ``constants`` set."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in constants.items():
            mp.setattr(lsearch, name, value)
        try:
            return build.load_graph(config, detail=detail).map_data()
        except ForwardingError as exc:
            return str(exc)


def _same(config: ForwardingConfig):
    """All four ways agree; returns the result."""
    result = _map(config)
    assert _map(config, _PLAIN=b"") == result, "the bulk path and redirect.py disagree"
    assert _map(config, PIECE_BYTES=16) == result, "the pieces and the whole file disagree"
    assert _map(config, detail=True) == result, "map and detail graphs disagree"
    return result


@pytest.mark.parametrize("seed,aliases,edges,domains", [
    (1, 3000, 6000, 14), (2, 5000, 15000, 24), (3, 2000, 1500, 8)])
def test_generated_sets(tmp_path, seed, aliases, edges, domains):
    path = alias_sets.generate(tmp_path, seed, aliases, edges, domains)
    local = tuple(sorted(alias_sets.local_domains(tmp_path)))
    config = ForwardingConfig(local_domains=local, map=str(tmp_path / "map.txt"),
                              sources=(ForwardingSource(type="lsearch", path=str(path)),))
    data = _same(config)
    assert any(e.startswith("@") for e in data.entries)  # wildcards are exercised
    assert data.warning_count  # ... and so are the over-match warnings


# every kind of line the bulk path reads itself, and some it leaves to redirect.py
BLOCK = """\
# a comment
a{i}@x.test: b{i}@x.test, out{i}@gmail.example
b{i}@x.test: c{i}@y.test
c{i}@y.test:c{i}@z.test,mbox{i}@x.test
C{i}@Z.TEST: Far{i}@Gmail.EXAMPLE ,  mbox{i}@y.test
d{i}@x.test: mbox{i}@x.test,
  e{i}@x.test,
\tf{i}@x.test
e{i}@x.test: |/usr/bin/ticket, /var/mail/archive{i}
f{i}@x.test: :blackhole:, out@gmail.example
g{i}@x.test: out@gmail.example, :fail: gone for good
h{i}@x.test: "quoted {i}"@gmail.example, Some One <one{i}@gmail.example>
i{i}@x.test: \\i{i}, \\out{i}@gmail.example
j{i}@x.test: mbox{i}@z.test,
  |/bin/cat
k{i}@x.test: k{i}@x.test, j{i}@x.test,
l{i}@x.test:
m{i}@x.test: anyone{i}@z.test, a{i}@x.test,
o{i}@x.test : bare{i}, p{i}@x.test \t
p{i}@x.test  out{i}@gmail.example

   ignored{i}@gmail.example (an indented line after an empty one)
"quoted{i}@x.test": l{i}@x.test, c{i}@y.test
n{i}@x.test: n{i}@x.test
q{i}@y.test: x.{i}@gmail.example, .y{i}@x.test, z..{i}@x.test, /x=y{i}/@gate.example
"""


@pytest.mark.parametrize("crlf", [False, True])
def test_every_line_kind_in_every_piece(tmp_path, crlf):
    text = "*@z.test: catch@gmail.example\n" + "".join(BLOCK.format(i=i) for i in range(40))
    text += "*@y.test: z-catch@z.test\n"
    data = _same(_config(tmp_path, text.replace("\n", "\r\n") if crlf else text))
    assert "@z.test" in data.entries and "@y.test" in data.entries
    assert "a7@x.test" in data.entries and "mbox7@z.test" in data.entries
    assert "l7@x.test" not in data.entries and "n7@x.test" not in data.entries
    assert "o7@x.test" in data.entries and "bare7@x.test" not in data.entries


@pytest.mark.parametrize("text,expected", [s[1:] for s in SCENARIOS],
                         ids=[s[0] for s in SCENARIOS])
def test_scenarios(tmp_path, text, expected):
    """The graph tests' scenarios, each repeated under other names."""
    copies = "".join(text.replace("@", f"{i}@") for i in range(1, 30))
    _same(_config(tmp_path, text + copies, local=("x.test", "y.test")))


@pytest.mark.parametrize("name,text", [
    ("duplicate key far apart", "a@x.test: out@gmail.example\n"
     + "".join(f"u{i}@x.test: v{i}@x.test\n" for i in range(50)) + "a@x.test: m@x.test\n"),
    ("key outside the local domains", "a@other.example: out@gmail.example\n"),
    ("bare local part", "a@x.test: b\nb@x.test: out@gmail.example\n"),
    ("non-ASCII", "\u00e4@x.test: out@gmail.example, J\u00f6rg@x.test\n"
     "j\u00f6rg@x.test: x@y.test, a\u00a0b@y.test\n"),
    ("catch-all star", "*: catch@gmail.example\n"),
    ("duplicate wildcard", "*@x.test: a@gmail.example\n*@x.test: b@gmail.example\n"),
    ("wildcard of another domain", "*@other.example: a@gmail.example\n"),
    ("a key that starts with a star", "*a@x.test: out@gmail.example\n"),
    ("indented key line", "a@x.test: m@x.test\n# c\n  b@x.test: out@gmail.example\n"),
    ("two @", "a@x.test: out@gmail.example@x\n"),
    ("bad target", "a@x.test: out@@gmail.example\n"),
    ("bad external domain", "a@x.test: out@gmail..example\n"),
    ("trailing dot", "a@x.test: out@gmail.example.\n"),
    ("empty domain", "a@x.test: out@\n"),
    ("empty local part", "a@x.test: @gmail.example\n"),
    ("a blank inside a target", "a@x.test: out @gmail.example\n"),
    ("unknown special", "a@x.test: :nonsense:\n"),
    ("a quoted local part with an @", 'a@x.test: "q@q"@y.test\n*@y.test: out@gmail.example\n'),
    ("a comment item", "a@x.test: m@x.test, #out@gmail.example\n"),
    ("a key with two @", "a@b@x.test: out@gmail.example\n"),
    ("no colon", "a@x.test out@gmail.example\n"),
    ("empty key", ": out@gmail.example\n"),
    ("blackhole after plain items", "a@x.test: b@y.test, out@gmail.example, :blackhole:\n"),
    ("blackhole in capitals", "a@x.test: out@gmail.example, :BlackHole:\n"),
    ("blackhole with text", "a@x.test: :blackhole: gone, out@gmail.example\n"),
    ("items after a blackhole are not read", "a@x.test: :blackhole:, out@@gmail.example\n"),
    ("a bad item before a blackhole", "a@x.test: out@@gmail.example, :blackhole:\n"),
    ("a blackhole glued to an item", "a@x.test: out@gmail.example:blackhole:\n"),
    ("blackhole, then a continuation", "a@x.test: m@y.test, :blackhole:\n  out@gmail.example\n"),
    ("a pipe and a bare local part before a blackhole",
     "a@x.test: |/bin/true, b, :blackhole:\nb@x.test: out@gmail.example\n"),
])
def test_lines_for_redirect_py(tmp_path, name, text):
    """Each input between plain lines: the same result (or error) either way."""
    filler = "".join(f"f{i}@y.test: g{i}@gmail.example\n" for i in range(30))
    _same(_config(tmp_path, filler + text + filler.replace("f", "h")))


def test_duplicate_keys(tmp_path):
    """The first line of a key wins, the others are warned about and ignored (a later one
    must not be what targets resolve to, nor be listed)."""
    lines = [f"u{i}@x.test: v{i}@x.test\n" for i in range(40)]
    lines[3] = "dup@x.test: mbox@x.test\n"
    lines[5] = "dup@x.test: out@gmail.example\n"  # ignored: dup does not forward
    lines[7] = "via@x.test: dup@x.test\n"
    lines[9] = '"dup@X.test": out@gmail.example\n'  # a redirect.py entry, ignored too
    lines[30] = "late@y.test: out@gmail.example\n"
    lines[32] = "late@y.test: mbox@y.test\n"  # ignored: late forwards
    lines[34] = "*@y.test: catch@gmail.example\n"
    data = _same(_config(tmp_path, "".join(lines)))
    assert "late@y.test" in data.entries
    assert "dup@x.test" not in data.entries and "via@x.test" not in data.entries
    assert sum("duplicate key" in w for w in data.warnings) == 3


def test_case_sensitive_local_parts(tmp_path):
    text = "".join(BLOCK.format(i=i) for i in range(5)).replace("mbox", "MBox")
    data = _same(_config(tmp_path, text, case_sensitive_local_parts=True))
    assert "mbox1@z.test" not in data.entries  # the map is lower-case, C1 is no c1
    assert _map(_config(tmp_path, text)) != data


def test_include(tmp_path):
    inc = tmp_path / "Team.inc"
    inc.write_text("out@gmail.example\n")
    data = _same(_config(tmp_path, f"a@x.test: b@x.test\nteam@x.test: :include:{inc}\n"))
    assert data.entries == ["team@x.test"]


def test_domain_source(tmp_path):
    """/etc/aliases style: bare local parts, qualified with the source's domain."""
    text = "postmaster: root\nroot: Admin@gmail.example, local\nlocal: |/bin/x\n*: root\n" \
        + "".join(f"u{i}: u{i + 1}, m{i}\nU{i}x: /var/mail/u{i}\n" for i in range(40)) \
        + "u40: out@gmail.example\nfull@x.test: out@gmail.example\n"
    config = _config(tmp_path, text)
    config = ForwardingConfig(local_domains=LOCAL, map=config.map, sources=(ForwardingSource(
        type="lsearch", path=config.sources[0].path, domain="X.test"),))
    data = _same(config)
    assert "@x.test" in data.entries and "u3@x.test" in data.entries
    assert any("key 'full@x.test' ignored" in w for w in data.warnings)


# ------------------------------------------------------------------ random files --
ADDRESSES = [f"{u}@{d}" for u in ("a", "b", "c", "Dd", "e") for d in ("x.test", "y.test")]
TARGETS = ADDRESSES + ["out@gmail.example", "other@ext.example", "mbox@z.test",
                       "|/bin/true", "/var/mail/x", ":blackhole:", ":fail: no", "bare",
                       '"q q"@gmail.example', "\\a@x.test", "Name <n@gmail.example>",
                       "x.@gmail.example", "#c", "(c)"]
separators = st.sampled_from([", ", ",", " , ", ",  ", ",\n  ", ",\n\t", ",\r\n "])


@st.composite
def alias_lines(draw):
    kind = draw(st.sampled_from(["entry"] * 8 + ["comment", "empty", "wildcard",
                                                 "quoted", "junk"]))
    if kind == "comment":
        return "# note"
    if kind == "empty":
        return draw(st.sampled_from(["", "  ", "\t"]))
    if kind == "junk":
        return draw(st.sampled_from(["  indented@x.test: a@x.test", "nocolon@x.test",
                                     "a@x.test:: b", "x@x.test: a@@b", "\u00fc@x.test: a@x.test",
                                     "k@x.test  ", "k@x.test : a@x.test"]))
    key = {"entry": draw(st.sampled_from(ADDRESSES)),
           "wildcard": draw(st.sampled_from(["*@x.test", "*@z.test"])),
           "quoted": '"' + draw(st.sampled_from(ADDRESSES)) + '"'}[kind]
    targets = draw(st.lists(st.sampled_from(TARGETS), max_size=4))
    data = ""
    for target in targets:
        data += (draw(separators) if data else " ") + target
    return f"{key}:{data}"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(alias_lines(), min_size=1, max_size=30))
def test_random_files(tmp_path, lines):
    _same(_config(tmp_path, "\n".join(lines) + "\n"))


UNIVERSE = [f"{u}{k}@{d}" for u in ("a", "B") for k in range(6)
            for d in ("x.test", "y.test", "z.test")]
PLAIN_TARGETS = UNIVERSE + ["out@gmail.example", "Other@Ext.example", "mbox@z.test",
                            "mbox@x.test", "|/bin/true", "/var/mail/x", ":blackhole:",
                            ":fail: no", "\\a1@x.test", "local"]


@st.composite
def unique_key_files(draw):
    """Alias files with no duplicate key: mostly what the bulk path reads itself."""
    keys = draw(st.lists(st.sampled_from(UNIVERSE), unique=True, min_size=1, max_size=36))
    wildcards = draw(st.dictionaries(st.sampled_from(["x.test", "z.test"]),
                                     st.sampled_from(PLAIN_TARGETS)))
    lines = [f"*@{domain}: {target}" for domain, target in wildcards.items()]
    for key in keys:
        targets = draw(st.lists(st.sampled_from(PLAIN_TARGETS), max_size=4))
        data = ""
        for target in targets:
            data += (draw(separators) if data else draw(st.sampled_from([" ", ""]))) + target
        lines.append(f"{key}:{data}")
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["# note", ""])))
    order = draw(st.permutations(range(len(lines))))
    return "\n".join(lines[i] for i in order) + "\n"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(unique_key_files())
def test_random_files_of_plain_lines(tmp_path, text):
    _same(_config(tmp_path, text))
