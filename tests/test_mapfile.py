"""The daemon's forwarding-map reader and its atomic hot reload."""
from __future__ import annotations

import asyncio
import logging
import os

from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.forwarding.watch import MapWatcher

MAP = """\
# exim-policy forwarding map: 3 entries
fwd@example.com
Other@Example.NET   # inline comment
@old.example
<bracket@example.com> extra-token-ignored

   # indented comment
"""


def test_parse_and_match():
    fmap = ForwardingMap.parse(MAP)
    assert fmap.addresses == {"fwd@example.com", "other@example.net", "bracket@example.com"}
    assert fmap.domains == {"old.example"}
    assert fmap.forwards("FWD@example.COM")
    assert fmap.forwards("<other@example.net>")
    assert fmap.forwards("anyone@OLD.example")
    assert fmap.forwards("bracket@example.com")
    assert not fmap.forwards("bob@example.com")
    assert not fmap.forwards("old.example")
    assert not fmap.forwards("x@sub.old.example")
    assert len(fmap) == 4


def _replace(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def test_watcher_swaps_atomically_and_keeps_old_map_on_trouble(tmp_path):
    path = str(tmp_path / "map.txt")
    watcher = MapWatcher(path, interval=0.01)
    watcher.load_now()  # missing file: empty map, no exception
    assert len(watcher.current) == 0

    _replace(path, "a@example.com\n")
    asyncio.run(watcher.reload_if_changed())
    assert watcher.current.forwards("a@example.com")

    _replace(path, "b@example.com\n")
    asyncio.run(watcher.reload_if_changed())
    assert watcher.current.forwards("b@example.com")
    assert not watcher.current.forwards("a@example.com")

    os.unlink(path)  # a missing file must not empty the set under a running daemon
    asyncio.run(watcher.reload_if_changed())
    assert watcher.current.forwards("b@example.com")


def test_serve_start_warns_when_the_map_is_missing_or_empty(tmp_path, caplog):
    """Forwarding protection silently off is what an admin must hear about at start."""
    path = str(tmp_path / "map.txt")
    with caplog.at_level(logging.INFO, logger="exim_policy.forwarding.watch"):
        MapWatcher(path, interval=1).load_now()
        _replace(path, "# lab forwarding map\n")
        MapWatcher(path, interval=1).load_now()
        _replace(path, "a@example.com\n")
        MapWatcher(path, interval=1).load_now()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said[0] == ("WARNING", f"forwarding map {path} does not exist: no recipient counts "
                                  "as forwarding until it appears (exim-policy forwardings "
                                  "build writes it)")
    assert said[1] == ("WARNING", f"forwarding map {path} is empty: no recipient counts as "
                                  "forwarding")
    assert said[2] == ("INFO", f"forwarding map {path} loaded: 1 addresses, 0 domains")


def test_watcher_run_picks_up_changes(tmp_path):
    path = str(tmp_path / "map.txt")
    _replace(path, "a@example.com\n")
    watcher = MapWatcher(path, interval=0.02)
    watcher.load_now()

    async def main():
        task = asyncio.create_task(watcher.run())
        _replace(path, "z@example.com\n")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if watcher.current.forwards("z@example.com"):
                break
        task.cancel()
        return watcher.current.forwards("z@example.com")

    assert asyncio.run(main())


def test_8bit_addresses_match_as_exim_sends_them(tmp_path):
    """The codecs decode request bytes as latin-1; a UTF-8 map must match those views."""
    path = tmp_path / "map.txt"
    path.write_bytes("j\u00f6rg@lab.test\n\u00dcber@lab.test\n".encode("utf-8"))
    fmap = ForwardingMap.load(str(path))
    as_sent = "j\u00f6rg@lab.test".encode("utf-8").decode("latin-1")  # what rspamc.envelope gives
    assert fmap.forwards(as_sent)
    assert fmap.forwards("<" + as_sent.upper() + ">")  # ASCII letters fold, bytes stay
    # 8-bit bytes are compared as they are, never case-folded as latin-1 letters
    assert fmap.forwards("\u00dcber@lab.test".encode("utf-8").decode("latin-1"))
    assert not fmap.forwards("\u00fcber@lab.test".encode("utf-8").decode("latin-1"))
