"""The two-process lsearch parse (sources._parse_two) gives exactly the one-process result.

Every test compares ``processes=2`` with ``processes=1`` column by column (keys, lines,
owners, targets, wildcards) plus the warnings, and checks that the second process really
ran (``_parse_two`` returns None when it fell back).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from exim_policy.forwarding import sources
from exim_policy.forwarding.sources import ForwardingSourceError, parse_lsearch

import alias_sets


def _generated(tmp_path: Path, aliases: int = 4000, seed: int = 3) -> Path:
    return alias_sets.generate(tmp_path, seed, aliases, aliases * 2, 12)


def _columns(path: Path, processes: int, local_domains=None) -> tuple:
    warnings: list[str] = []
    batch = parse_lsearch(str(path), warn=warnings.append, processes=processes,
                          local_domains=local_domains)
    return (batch.keys, list(batch.lines), list(batch.owners), batch.targets,
            batch.wildcards, warnings, list(batch.external_owners), batch.keys_local)


def _assert_same(path: Path, local_domains=None) -> tuple:
    one = _columns(path, 1, local_domains)
    two = _columns(path, 2, local_domains)
    for name, a, b in zip(("keys", "lines", "owners", "targets", "wildcards", "warnings",
                           "external_owners", "keys_local"), one, two):
        assert a == b, name
    return one[:6]


def _ran_in_two(path: Path) -> bool:
    text = path.read_text()
    split = sources._split_point(text, 2)
    assert split > 0
    return sources._parse_two(str(path), [text], split, "", False, None) is not None


def test_generated_set_is_the_same_in_two_processes(tmp_path):
    path = _generated(tmp_path)
    keys, lines, owners, targets, wildcards, warnings = _assert_same(path)
    assert len([k for k in keys if k]) > 3000 and len(targets) > 6000 and wildcards
    assert _ran_in_two(path)


def test_preclassified_parse_is_the_same_in_two_processes(tmp_path):
    # as build_map parses: external targets dropped, only their owners kept
    path = _generated(tmp_path)
    local = frozenset((tmp_path / "domains").read_text().split())
    one = _columns(path, 1, local)
    assert one[-1] is True and len(one[-2]) > 1000  # keys all local; many externals
    _assert_same(path, local)
    # the same (owner, target) pairs as the full parse, minus external ones only (those of
    # scanner entries stay: only the fast path drops them), whose owners are kept
    full = _columns(path, 1)
    dropped = Counter(zip(full[2], full[3])) - Counter(zip(one[2], one[3]))
    assert not Counter(zip(one[2], one[3])) - Counter(zip(full[2], full[3]))
    assert all(t.rpartition("@")[2] not in local and t[0] not in ":|/\\" for _o, t in dropped)
    assert Counter(o for o, _t in dropped.elements()) == Counter(one[-2])


def test_warnings_scanner_entries_and_continuations_on_both_sides_of_the_cut(tmp_path):
    # one block of odd entries, repeated so that the cut lands between copies of it:
    # a key Exim never looks up (warning), a quoted key, specials, a continuation that
    # needs the scanner, a comment that ends a continuation, upper case, a wildcard
    block = ("nodomain{i}: a@ext.example\n"
             '"q{i} x"@x.test: b@ext.example\n'
             "p{i}@x.test: |/bin/prog, \"Name\" <c{i}@ext.example>, :fail: gone {i}\n"
             "c{i}@x.test: d{i}@x.test,\n"
             "   \"e{i}\"@ext.example\n"
             "# comment\n"
             "   ignored{i}@ext.example\n"
             "U{i}@X.TEST: F{i}@EXT.example, g{i}\n"
             "*@w{i}.test: catch{i}@ext.example\n"
             "d{i}@x.test: \\d{i}@x.test, :blackhole:\n")
    path = tmp_path / "virtual"
    path.write_text("".join(block.format(i=i) for i in range(200)))
    _assert_same(path, frozenset(["x.test"]))
    keys, _lines, _owners, targets, wildcards, warnings = _assert_same(path)
    # fast-path warnings of both halves come before the scanner's (as in one process)
    assert [("nodomain" in w) for w in warnings] == [True] * 200 + [False] * 200
    assert "'q199 x'" in warnings[-1]
    assert len(wildcards) == 200 and ":fail: gone 199" in targets
    assert _ran_in_two(path)


def test_an_error_in_the_second_half_names_the_same_line(tmp_path):
    path = _generated(tmp_path, 3000)
    lines = path.read_text().split("\n")
    lines.insert(len(lines) - 50, "bad@x.test: Name <b@ext.example")
    path.write_text("\n".join(lines))
    messages = []
    for processes in (1, 2):
        with pytest.raises(ForwardingSourceError) as info:
            parse_lsearch(str(path), processes=processes)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{path}:{len(lines) - 50}: bad address")


def test_an_error_in_the_first_half_wins(tmp_path):
    path = _generated(tmp_path, 3000)
    lines = path.read_text().split("\n")
    lines.insert(10, "bad@x.test: Name <b@ext.example")
    lines.insert(len(lines) - 50, "worse@x.test: <c@ext.example")
    path.write_text("\n".join(lines))
    with pytest.raises(ForwardingSourceError, match=rf"^{path}:11: bad address"):
        parse_lsearch(str(path), processes=2)


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failing_second_process_falls_back_to_one(tmp_path, monkeypatch, how):
    path = _generated(tmp_path, 3000)
    expected = _columns(path, 1)
    real = sources._parse_part

    def broken(path, box, base, *args):
        if base:  # only the second process parses from a line other than 0
            if how == "raise":
                raise RuntimeError("boom")
            os._exit(3)  # killed: the parent reads EOF
        return real(path, box, base, *args)

    monkeypatch.setattr(sources, "_parse_part", broken)
    assert not _ran_in_two(path)
    monkeypatch.setattr(sources, "_parse_part", real)
    # the public function parses again in one process and gets the same result
    monkeypatch.setattr(sources, "_parse_two", lambda *a: None)
    assert _columns(path, 2) == expected


def test_split_point_starts_an_entry_line():
    text = "a@x.test: b@x.test,\n" + "  c@x.test,\n" * 10 + "# note\n\n d@x.test\n" \
        + "e@x.test: f@ext.example\n"
    split = sources._split_point(text, 2)
    assert text[split:].startswith("e@x.test:") and text[split - 1] == "\n"
    assert sources._split_point("a@x.test: b@x.test\n" + "  c@x.test\n" * 5, 2) == 0
    assert sources._split_point(text, 1) == 0
    assert sources._split_point(text, None) == 0  # far below PARALLEL_MIN_LINES


def test_no_fork_from_a_multi_threaded_process():
    """fork() copies only the calling thread; with other threads alive the parse stays in
    one process (unless the caller insists with processes=2)."""
    import threading

    text = "".join(f"u{i}@d.example: x{i}@ext.example\n" for i in range(250_000))
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert sources._split_point(text, None) == 0
        assert sources._split_point(text, 2) > 0
    finally:
        release.set()
        other.join()
