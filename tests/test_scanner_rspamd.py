"""The Rspamd HTTP codec (no server) and the client against a scripted local peer."""
from __future__ import annotations

import asyncio
import json

import pytest

from exim_policy.config import SettingsIds
from exim_policy.model import Envelope, Traffic
from exim_policy.scanner import ScannerError
from exim_policy.scanner.rspamd import RspamdScanner, parse_reply, request_head

# /checkv2 replies as captured from Rspamd 3.4 (docs/wire-formats.md, "Rspamd's /checkv2 reply")
GTUBE_JSON = (b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject",'
              b'"symbols":{"GTUBE":{"name":"GTUBE","score":0.0,"metric_score":0.0}},'
              b'"messages":{"smtp_message":"Gtube pattern"},"message-id":"doc-gtube@example.org",'
              b'"time_real":0.000156}')


def http(body: bytes, status: str = "200 OK", length: bool = True) -> bytes:
    head = f"HTTP/1.1 {status}\r\nConnection: close\r\nServer: rspamd/3.4\r\n"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_request_carries_envelope_and_settings_id():
    env = Envelope(sender="a@example.org", recipients=("b@example.com", "C@Example.COM"),
                   ip="192.0.2.10", helo="helo.example", hostname="client.example.net",
                   user="alice@example.com", queue_id="1xV0ZC-0003TR-0m")
    req = request_head(17, env, host="127.0.0.1:11333",
                       settings_id="exim-policy-outbound") + b"Subject: x\n\nbody\n"
    head, _, body = req.partition(b"\r\n\r\n")
    assert body == b"Subject: x\n\nbody\n"
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /checkv2 HTTP/1.1"
    assert lines[1:] == [
        b"Host: 127.0.0.1:11333", b"Content-Length: 17", b"From: <a@example.org>",
        b"Rcpt: <b@example.com>", b"Rcpt: <C@Example.COM>", b"IP: 192.0.2.10",
        b"Helo: helo.example", b"Hostname: client.example.net", b"User: alice@example.com",
        b"Queue-Id: 1xV0ZC-0003TR-0m", b"Settings-ID: exim-policy-outbound"]


def test_request_never_forwards_injected_headers():
    env = Envelope(sender="", recipients=("x@example.com\r\nFile: /etc/shadow",),
                   helo="evil\r\nPath: /etc/passwd", user="", ip="127.0.0.1\0")
    head = request_head(0, env, host="h").partition(b"\r\n\r\n")[0]
    assert b"File" not in head and b"Path" not in head and b"\0" not in head
    assert b"From: <>" in head        # a bounce keeps its empty sender
    assert b"User:" not in head       # empty user must not look authenticated
    assert b"Rcpt:" not in head and b"IP:" not in head and b"Helo:" not in head


def test_request_keeps_8bit_values():
    env = Envelope(sender="j\xf6rg@example.org", recipients=("\xfc@example.com",))
    head = request_head(0, env, host="h")
    assert b"From: <j\xf6rg@example.org>" in head and b"Rcpt: <\xfc@example.com>" in head


def test_parse_gtube_reply():
    result = parse_reply(http(GTUBE_JSON))
    assert (result.action, result.score, result.required_score) == ("reject", 15.0, 15.0)
    assert result.messages == (("smtp_message", "Gtube pattern"),)
    assert [s.name for s in result.symbols] == ["GTUBE"]
    assert result.message_id == "doc-gtube@example.org"
    assert result.is_skipped


def test_parse_without_content_length_reads_to_eof():
    assert parse_reply(http(GTUBE_JSON, length=False)).action == "reject"


def test_parse_milter_headers_object_and_array():
    doc = {"action": "add header", "score": 7.0, "required_score": 15.0, "symbols": {},
           "messages": ["compat message"],
           "milter": {"add_headers": {"X-Spamd-Bar": {"value": "+++", "order": -1},
                                      "X-Multi": [{"value": "a", "order": 0},
                                                  {"value": "b", "order": 0}]}}}
    result = parse_reply(http(json.dumps(doc).encode()))
    assert result.add_headers == (("X-Spamd-Bar", "+++"), ("X-Multi", "a"), ("X-Multi", "b"))
    assert result.messages == (("", "compat message"),)


@pytest.mark.parametrize("reply, words", [
    (http(b'{"error":"invalid command","error_domain":"protocol-error"}',
          "500 invalid command"), "HTTP 500 from Rspamd: invalid command"),
    (http(b"<html>oops</html>", "502 Bad Gateway"), "not JSON"),
    (http(b"{not json"), "not JSON"),
    (http(b'{"score":1}'), "no action"),
    (http(b'{"action":"reject","score":"high","required_score":15}'), "'score' is not a number"),
    (http(b'{"error":"Invalid compression method"}'), "Invalid compression method"),
    (b"RSPAMD/1.3 0 EX_OK\r\nMetric: x", "not an HTTP reply"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "incomplete"),
    (http(GTUBE_JSON)[:-10], "cut short"),
    (b"", "incomplete"),
])
def test_parse_errors_are_scanner_errors(reply, words):
    with pytest.raises(ScannerError, match=words):
        parse_reply(reply)


RICH_JSON = json.dumps({
    "is_skipped": False, "score": 6.5, "required_score": 15.0, "action": "add header",
    "symbols": {"R_SPF_NA": {"name": "R_SPF_NA", "score": 0, "options": ["no SPF record"]},
                "FAKE_REPLY": {"score": 6.5, "description": "Fake reply"},
                "ODD": "not an object", "NO_SCORE": {"options": [1, "two"]}},
    "messages": {"smtp_message": "Looks like spam"}, "subject": "*** SPAM *** hello",
    "milter": {"add_headers": {"X-Spamd-Bar": "+++"}}}, ensure_ascii=False).encode()


@pytest.mark.parametrize("body", [
    GTUBE_JSON, RICH_JSON,
    # json.loads takes what orjson refuses: NaN, integers past 64 bits, UTF-16
    b'{"action":"no action","score":1,"required_score":15,"time_real":NaN}',
    b'{"action":"no action","score":1,"required_score":15,"big":123456789012345678901234}',
    '{"action":"no action","score":1,"required_score":15}'.encode("utf-16"),
])
def test_replies_read_the_same_with_and_without_orjson(body, monkeypatch):
    from exim_policy.scanner import rspamd_json

    assert rspamd_json._fast_loads is not None  # (the test extras install orjson)
    with_orjson = parse_reply(http(body))
    monkeypatch.setattr(rspamd_json, "_fast_loads", None)
    assert parse_reply(http(body)) == with_orjson


def test_symbols_of_odd_shapes_keep_their_names():
    result = parse_reply(http(RICH_JSON))
    assert [(s.name, s.score, s.options, s.description) for s in result.symbols] == [
        ("R_SPF_NA", 0.0, ("no SPF record",), None), ("FAKE_REPLY", 6.5, (), "Fake reply"),
        ("ODD", 0.0, (), None), ("NO_SCORE", 0.0, ("1", "two"), None)]


async def _scripted_peer(reply: bytes, delay: float = 0.0, path: str | None = None):
    """A one-shot HTTP peer: records the request (Content-Length framed), replies, closes;
    on a unix socket at ``path`` (its port is then None)."""
    seen = {}

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([line for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")][0].split(b":")[1])
        seen["request"] = head + await reader.readexactly(length)
        await asyncio.sleep(delay)
        writer.write(reply)
        await writer.drain()
        writer.close()

    if path is not None:
        return await asyncio.start_unix_server(handle, path), None, seen
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def test_client_round_trip_without_half_close():
    async def main():
        server, port, seen = await _scripted_peer(http(GTUBE_JSON))
        async with server:
            scanner = RspamdScanner(f"http://127.0.0.1:{port}", timeout=5,
                                    settings_ids=SettingsIds(outbound="sid"))
            result = await scanner.scan(b"body", Envelope(recipients=("a@b",)),
                                        Traffic.OUTBOUND)
        return result, seen

    result, seen = asyncio.run(main())
    assert result.action == "reject"
    assert seen["request"].endswith(b"\r\n\r\nbody")
    assert b"Settings-ID: sid" in seen["request"]


def test_client_timeout_and_refused():
    async def main():
        server, port, _ = await _scripted_peer(http(GTUBE_JSON), delay=2.0)
        async with server:
            with pytest.raises(ScannerError, match="no reply from Rspamd within 0.3s"):
                await RspamdScanner(f"http://127.0.0.1:{port}", timeout=0.3).scan(
                    b"x", Envelope())
        with pytest.raises(ScannerError, match="cannot reach Rspamd"):
            await RspamdScanner(f"http://127.0.0.1:{port}", timeout=1).scan(b"x", Envelope())

    asyncio.run(main())


def test_client_over_a_unix_socket(tmp_path):
    path = str(tmp_path / "normal.sock")

    async def main():
        server, _, seen = await _scripted_peer(http(GTUBE_JSON), path=path)
        async with server:
            result = await RspamdScanner(f"unix:{path}", timeout=5).scan(b"body", Envelope())
        return result, seen

    result, seen = asyncio.run(main())
    assert result.action == "reject"
    assert seen["request"].startswith(b"POST /checkv2 HTTP/1.1\r\nHost: localhost\r\n")
    with pytest.raises(ScannerError, match=f"cannot reach Rspamd at {path}: "):
        asyncio.run(RspamdScanner(f"unix:{path}", timeout=1).scan(b"x", Envelope()))
