"""The two-process route for large alias files (forwarding/bulk.py) against the general one.

Every test builds the same configuration both ways -- ``build.load_graph(...).map_data()``
(the general route, itself checked against ``exim -bt`` and a naive reference elsewhere)
and ``bulk.map_data(..., min_lines=0)`` -- and compares everything a build reports:
entries, alias and target counts, warnings (in order) and their number.  Inputs the bulk
route does not handle must make it step back (None), and ``build.map_data`` must then give
the general route's result or raise its error.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exim_policy.config import ForwardingConfig, ForwardingSource
from exim_policy.forwarding import build, bulk
from exim_policy.forwarding.graph import GraphBuilder
from exim_policy.forwarding.sources import ForwardingError

import alias_sets
from test_forwarding_graph import SCENARIOS

LOCAL = ("x.test", "y.test", "z.test")
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, text: str | bytes, local=LOCAL) -> ForwardingConfig:
    path = tmp_path / "virtual"
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return ForwardingConfig(local_domains=tuple(local), map=str(tmp_path / "map.txt"),
                            sources=(ForwardingSource(type="lsearch", path=str(path)),))


def _bulk(config: ForwardingConfig, **options):
    """The bulk route's result (it forks even while the session's fixtures run threads)."""
    warnings = GraphBuilder(())
    local = build.local_domains(config, warnings.warn)
    options = {"min_lines": 0, "insist": True, **options}
    return bulk.map_data(config, local, warnings, **options)


def _general(config: ForwardingConfig):
    return build.load_graph(config).map_data()


def _same(config: ForwardingConfig, *, stepped_back: bool | None = False):
    """Both routes agree; ``stepped_back``: whether the bulk route must have declined
    (None: either way)."""
    general = _general(config)
    fast = _bulk(config)
    if stepped_back is not None:
        assert (fast is None) == stepped_back
    if fast is not None:
        assert fast == general
    assert build.map_data(config, bulk_min_lines=0) == general
    return general


@pytest.mark.parametrize("seed,aliases,edges,domains", [
    (1, 3000, 6000, 14), (2, 5000, 15000, 24), (3, 2000, 1500, 8), (4, 20000, 40000, 60)])
def test_generated_sets(tmp_path, seed, aliases, edges, domains):
    path = alias_sets.generate(tmp_path, seed, aliases, edges, domains)
    local = tuple(sorted(alias_sets.local_domains(tmp_path)))
    config = ForwardingConfig(local_domains=local, map=str(tmp_path / "map.txt"),
                              sources=(ForwardingSource(type="lsearch", path=str(path)),))
    data = _same(config)
    assert any(e.startswith("@") for e in data.entries)  # wildcards are exercised
    assert data.warning_count  # ... and so are the over-match warnings


# every kind of line the bulk route reads itself, repeated so that each half gets some
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

"quoted{i}@x.test": l{i}@x.test, c{i}@y.test
n{i}@x.test: n{i}@x.test
"""


def test_every_line_kind_on_both_sides_of_the_cut(tmp_path):
    text = "*@z.test: catch@gmail.example\n" + "".join(BLOCK.format(i=i) for i in range(40))
    text += "*@y.test: z-catch@z.test\n"
    data = _same(_config(tmp_path, text))
    assert "@z.test" in data.entries and "@y.test" in data.entries
    assert "a7@x.test" in data.entries and "mbox7@z.test" in data.entries
    assert "l7@x.test" not in data.entries and "n7@x.test" not in data.entries


@pytest.mark.parametrize("text,expected", [s[1:] for s in SCENARIOS],
                         ids=[s[0] for s in SCENARIOS])
def test_scenarios(tmp_path, text, expected):
    """The graph tests' scenarios, each repeated under other names so that it is split."""
    copies = "".join(text.replace("@", f"{i}@") for i in range(1, 30))
    _same(_config(tmp_path, text + copies, local=("x.test", "y.test")), stepped_back=None)


@pytest.mark.parametrize("name,text", [
    ("duplicate key across the halves", "a@x.test: out@gmail.example\n"
     + "".join(f"u{i}@x.test: v{i}@x.test\n" for i in range(50)) + "a@x.test: m@x.test\n"),
    ("key outside the local domains", "a@other.example: out@gmail.example\n"),
    ("bare local part", "a@x.test: b\nb@x.test: out@gmail.example\n"),
    ("non-ASCII", "ä@x.test: out@gmail.example\n"),
    ("catch-all star", "*: catch@gmail.example\n"),
    ("duplicate wildcard", "*@x.test: a@gmail.example\n*@x.test: b@gmail.example\n"),
    ("wildcard of another domain", "*@other.example: a@gmail.example\n"),
    ("a key that starts with a star", "*a@x.test: out@gmail.example\n"),
    ("indented key line", "a@x.test: m@x.test\n# c\n  b@x.test: out@gmail.example\n"),
    ("CRLF lines", "a@x.test: out@gmail.example\r\nb@x.test: a@x.test\r\n"),
    ("two @", "a@x.test: out@gmail.example@x\n"),
    ("bad target", "a@x.test: out@@gmail.example\n"),
    ("bad external domain", "a@x.test: out@gmail..example\n"),
    ("a blank inside a target", "a@x.test: out @gmail.example\n"),
    ("unknown special", "a@x.test: :nonsense:\n"),
    ("a quoted local part with an @", 'a@x.test: "q@q"@y.test\n*@y.test: out@gmail.example\n'),
])
def test_what_it_steps_back_from(tmp_path, name, text):
    """Each input appears between regular lines; the bulk route declines it and the
    general route's result (or error) is what a build gets."""
    filler = "".join(f"f{i}@y.test: g{i}@gmail.example\n" for i in range(30))
    config = _config(tmp_path, filler + text + filler.replace("f", "h"))
    assert _bulk(config) is None
    try:
        expected = _general(config)
    except ForwardingError as exc:
        with pytest.raises(ForwardingError) as raised:
            build.map_data(config, bulk_min_lines=0)
        assert str(raised.value) == str(exc)
    else:
        assert build.map_data(config, bulk_min_lines=0) == expected


def test_duplicate_keys_in_one_half(tmp_path):
    """The first line of a key wins, the others are warned about and ignored (a later one
    must not be what targets resolve to, nor be listed)."""
    lines = [f"u{i}@x.test: v{i}@x.test\n" for i in range(40)]
    lines[3] = "dup@x.test: mbox@x.test\n"
    lines[5] = "dup@x.test: out@gmail.example\n"  # ignored: dup does not forward
    lines[7] = "via@x.test: dup@x.test\n"
    lines[9] = '"dup@X.test": out@gmail.example\n'  # a scanner entry, ignored too
    lines[30] = "late@y.test: out@gmail.example\n"
    lines[32] = "late@y.test: mbox@y.test\n"  # ignored: late forwards
    lines[34] = "*@y.test: catch@gmail.example\n"
    data = _same(_config(tmp_path, "".join(lines)))
    assert "late@y.test" in data.entries
    assert "dup@x.test" not in data.entries and "via@x.test" not in data.entries
    assert sum("duplicate key" in w for w in data.warnings) == 3


def test_include_steps_back(tmp_path):
    inc = tmp_path / "Team.inc"
    inc.write_text("out@gmail.example\n")
    config = _config(tmp_path, f"a@x.test: b@x.test\nteam@x.test: :include:{inc}\n")
    assert _bulk(config) is None
    assert build.map_data(config, bulk_min_lines=0).entries == ["team@x.test"]


def test_a_dead_second_process_means_the_general_route(tmp_path, monkeypatch):
    path = alias_sets.generate(tmp_path, 5, 2000, 4000, 10)
    local = tuple(sorted(alias_sets.local_domains(tmp_path)))
    config = ForwardingConfig(local_domains=local, map=str(tmp_path / "map.txt"),
                              sources=(ForwardingSource(type="lsearch", path=str(path)),))
    monkeypatch.setattr(bulk, "_child", lambda conn, *args: os._exit(3))
    assert _bulk(config) is None
    assert build.map_data(config, bulk_min_lines=0) == _general(config)


CTRL_C = """
import os, sys, time
sys.path.insert(0, {root!r})
from exim_policy.config import load
from exim_policy.forwarding import build, bulk
def hold(*args, **kwargs):  # both processes wait here, after the swap
    print("ready", os.getpid(), flush=True)
    time.sleep(30)
bulk._Half.resolve_other = hold
build.map_data(load({config!r}).forwarding, bulk_min_lines=0)
"""


def test_ctrl_c_stops_both_processes_quietly(tmp_path):
    """Ctrl-C reaches the whole process group: the parent stops, stopping the second
    process, which itself ignores the signal (no second traceback, nothing left over)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[forwarding]\nlocal_domains = ["x.test"]\nmap = "{tmp_path}/map"\n'
                      f'[[forwarding.sources]]\ntype = "lsearch"\npath = "{tmp_path}/virtual"\n')
    (tmp_path / "virtual").write_text("".join(f"u{i}@x.test: v{i + 1}@x.test\n"
                                               for i in range(100)))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C.format(root=str(ROOT),
                                                               config=str(config))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = [int(proc.stdout.readline().split()[1]) for _ in range(2)]
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "Process ForkProcess" not in err  # the second process said nothing
    child = next(pid for pid in pids if pid != proc.pid)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_only_single_threaded_and_large_enough(tmp_path):
    config = _config(tmp_path, "".join(f"u{i}@x.test: v{i}@gmail.example\n"
                                       for i in range(100)))
    assert _bulk(config) is not None
    assert _bulk(config, min_lines=1000) is None
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert _bulk(config, insist=False) is None  # fork() would copy only this thread
        assert build.map_data(config, bulk_min_lines=0) == _general(config)
    finally:
        release.set()
        other.join()


# ------------------------------------------------------------------ random files --
ADDRESSES = [f"{u}@{d}" for u in ("a", "b", "c", "Dd", "e") for d in ("x.test", "y.test")]
TARGETS = ADDRESSES + ["out@gmail.example", "other@ext.example", "mbox@z.test",
                       "|/bin/true", "/var/mail/x", ":blackhole:", ":fail: no", "bare",
                       '"q q"@gmail.example', "\\a@x.test", "Name <n@gmail.example>"]
separators = st.sampled_from([", ", ",", " , ", ",  ", ",\n  ", ",\n\t"])


@st.composite
def alias_lines(draw):
    kind = draw(st.sampled_from(["entry"] * 8 + ["comment", "empty", "wildcard",
                                                 "quoted", "junk"]))
    if kind == "comment":
        return "# note"
    if kind == "empty":
        return ""
    if kind == "junk":
        return draw(st.sampled_from(["  indented@x.test: a@x.test", "nocolon@x.test",
                                     "a@x.test:: b", "x@x.test: a@@b", "ü@x.test: a@x.test"]))
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
def test_random_files_give_what_the_general_route_gives(tmp_path, lines):
    config = _config(tmp_path, "\n".join(lines) + "\n")
    try:
        expected = _general(config)
    except ForwardingError as exc:
        assert _bulk(config) is None
        with pytest.raises(ForwardingError) as raised:
            build.map_data(config, bulk_min_lines=0)
        assert str(raised.value) == str(exc)
        return
    fast = _bulk(config)
    if fast is not None:
        assert fast == expected
    assert build.map_data(config, bulk_min_lines=0) == expected


UNIVERSE = [f"{u}{k}@{d}" for u in ("a", "B") for k in range(6)
            for d in ("x.test", "y.test", "z.test")]
PLAIN_TARGETS = UNIVERSE + ["out@gmail.example", "Other@Ext.example", "mbox@z.test",
                            "mbox@x.test", "|/bin/true", "/var/mail/x", ":blackhole:",
                            ":fail: no", "\\a1@x.test"]


@st.composite
def unique_key_files(draw):
    """Alias files with no duplicate key and no bare local part: mostly what the bulk route
    reads itself (it steps back only for the odd quoted address or special)."""
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
def test_random_files_the_bulk_route_reads(tmp_path, text):
    _same(_config(tmp_path, text), stepped_back=None)
