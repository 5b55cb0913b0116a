"""The policy helper: one-line protocol (pure), its socket server, and the ${run} command."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from exim_policy import cli
from exim_policy.config import ListenAddress, from_dict
from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.transport.helper import QueryServer, answer

FMAP = ForwardingMap.parse("fwd@example.com\n@old.example\n")


@pytest.mark.parametrize("line, reply", [
    (b"forwarding fwd@example.com", b"yes"),
    (b"forwarding FWD@Example.com\r", b"yes"),
    (b"FORWARDING <fwd@example.com>", b"yes"),
    (b"forwarding anyone@old.example", b"yes"),
    (b"forwarding bob@example.com", b"no"),
    (b"forwarding", b"error usage: forwarding LOCALPART@DOMAIN"),
    (b"forwarding a b@c", b"error usage: forwarding LOCALPART@DOMAIN"),
    (b"forwarding nodomain", b"error usage: forwarding LOCALPART@DOMAIN"),
    (b"ping", b"pong"),
    (b"locked alice", b"error unknown request"),
    (b"account alice", b"ok"),  # accounts off
    (b"account", b"error usage: account USER"),
    (b"\xff\xfe garbage", b"error unknown request"),
    (b"", b"error unknown request"),
])
def test_answer(line, reply):
    assert answer(line, FMAP.forwards) == reply


async def _ask(port: int, payload: bytes, half_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    if half_close:
        writer.write_eof()  # what ${readsocket} does by default
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return reply


def test_query_server_serves_and_survives_bad_requests():
    async def main():
        server = QueryServer((ListenAddress(host="127.0.0.1", port=0),),
                             from_dict({}).server.allowed_clients, FMAP.forwards)
        await server.start()
        port = server.sockets[0].getsockname()[1]
        try:
            replies = [
                await _ask(port, b"forwarding fwd@example.com\n"),
                await _ask(port, b"nonsense\n"),
                await _ask(port, b"x" * 5000),  # too long: error, not a hang
                await _ask(port, b"forwarding bob@example.com"),  # no newline, EOF ends it
                await _ask(port, b"forwarding fwd@example.com\n", half_close=False),
            ]
            # concurrency is the normal case
            many = await asyncio.gather(*(_ask(port, b"forwarding fwd@example.com\n")
                                          for _ in range(50)))
        finally:
            await server.stop()
        return replies, many

    replies, many = asyncio.run(main())
    assert replies == [b"yes", b"error unknown request", b"error request too long",
                       b"no", b"yes"]
    assert set(many) == {b"yes"}


def test_query_command_reads_the_map_file(tmp_path, capsys):
    fmap = tmp_path / "forwardings.txt"
    fmap.write_text("# header\nfwd@example.com\n@old.example\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[forwarding]\nmap = "{fmap}"\n')
    assert cli.main(["query", "forwarding", "Fwd@Example.com", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "yes\n"
    assert cli.main(["query", "forwarding", "x@old.example", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "yes\n"
    assert cli.main(["query", "forwarding", "bob@example.com", "--config", str(config)]) == 1
    assert capsys.readouterr().out == "no\n"
    fmap.unlink()
    assert cli.main(["query", "forwarding", "bob@example.com", "--config", str(config)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_query_command_as_a_process(tmp_path):
    fmap = tmp_path / "forwardings.txt"
    fmap.write_text("fwd@example.com\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[forwarding]\nmap = "{fmap}"\n')
    done = subprocess.run([sys.executable, "-m", "exim_policy", "query", "forwarding",
                           "fwd@example.com", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "yes\n", "")


def test_file_scan_agrees_with_the_daemons_matcher(tmp_path):
    from exim_policy.commands.query import _map_file_has

    text = ("# header\nfwd@example.com\n  Other@Example.NET  # comment\n@old.example\n"
            "<br@example.com> extra\nfwd@example.com.evil\nx.y+z@example.org\n")
    path = tmp_path / "map.txt"
    path.write_text(text)
    fmap = ForwardingMap.parse(text)
    for address in ["fwd@example.com", "FWD@EXAMPLE.COM", "other@example.net",
                    "a@old.example", "br@example.com", "fwd@example.co", "wd@example.com",
                    "x.y+z@example.org", "xxy+z@example.org", "fwd@example.com.evil",
                    "a@sub.old.example", "header@x"]:
        assert _map_file_has(str(path), address) == fmap.forwards(address), address


def test_query_command_8bit_address(tmp_path, capsys):
    fmap = tmp_path / "forwardings.txt"
    fmap.write_bytes("j\u00f6rg@lab.test\n".encode("utf-8"))
    config = tmp_path / "c.toml"
    config.write_text(f'[forwarding]\nmap = "{fmap}"\n')
    assert cli.main(["query", "forwarding", "J\u00f6rg@Lab.test", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "yes\n"


def test_idle_connections_are_bounded_and_queries_still_answered():
    """10,000 idle connections once held 10,022 descriptors for the 5 s read timeout
    (bench/bench_hostile.py): the table sheds the one that has waited longest."""
    async def main():
        server = QueryServer((ListenAddress(host="127.0.0.1", port=0),),
                             from_dict({}).server.allowed_clients, FMAP.forwards,
                             max_connections=8)
        await server.start()
        port = server.sockets[0].getsockname()[1]
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
            answers = [await _ask(port, b"forwarding fwd@example.com\n") for _ in range(3)]
            await asyncio.sleep(0.05)
            open_now = len(server.connections)
            # the first ones were shed: they read EOF at once, not after the timeout
            shed = await asyncio.wait_for(idle[0][0].read(), 1)
            for _reader, writer in idle:
                writer.close()
        finally:
            await server.stop()
        return answers, open_now, shed

    answers, open_now, shed = asyncio.run(main())
    assert answers == [b"yes"] * 3
    assert open_now <= 8 and shed == b""
