"""The HTTP front's asyncio transport with a fake scanner: keep-alive, pipelining, errors,
timeouts, the shared limits, a graceful stop. The real clients (rspamc, Haraka,
rspamd_proxy behind Postfix) are in tests/e2e/test_http_front.py."""
from __future__ import annotations

import asyncio
import json

from exim_policy.config import from_dict
from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.model import Traffic
from exim_policy.pipeline import PolicyService
from exim_policy.transport.http import HttpServer

from test_server import FakeScanner  # noqa: E402 (tests/ is on sys.path)

MESSAGE = b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def post(body: bytes = MESSAGE, *, rcpts=("bob@example.com",), user: str | None = None,
         chunked: bool = False, version: str = "1.1", extra: str = "") -> bytes:
    head = (f"POST /checkv2 HTTP/{version}\r\nHost: shim\r\nFrom: a@example.org\r\n"
            + "".join(f"Rcpt: {r}\r\n" for r in rcpts) + "IP: 192.0.2.10\r\n"
            + (f"User: {user}\r\n" if user else "") + extra)
    if chunked:
        data = b"".join(b"%x\r\n%s\r\n" % (len(line), line)
                        for line in body.splitlines(keepends=True)) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + data
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def start(scanner, config: dict | None = None, **server_cfg):
    server_cfg = {"listen": [], "http_listen": ["127.0.0.1:0"], **server_cfg}
    config_obj = from_dict({"server": server_cfg, **(config or {})})
    fmap = ForwardingMap.parse("fwd@example.com\n")
    service = PolicyService(config_obj, scanner, fmap.forwards)
    server = HttpServer(config_obj.server, service.answer)
    await server.start()
    return server, server.sockets[0].getsockname()[1]


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One HTTP reply: status, headers (lower-case names), body (Content-Length framed)."""
    status_line = await asyncio.wait_for(reader.readline(), 10)
    if not status_line:
        return 0, {}, b""
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


async def ask(port: int, request: bytes, *, then_closed: bool = False):
    """One request on a new connection: its reply (and, with ``then_closed``, whether the
    server closed the connection after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        reply = await read_reply(reader)
        return (reply, await closed(reader)) if then_closed else reply
    finally:
        writer.close()


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


def run(coro):
    return asyncio.run(coro)


def test_keep_alive_serves_several_requests_on_one_connection():
    async def main():
        scanner = FakeScanner("add header", 7.0)
        server, port = await start(scanner)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            replies = []
            for request in (post(chunked=True), post(), post(chunked=True, user="alice")):
                writer.write(request)
                replies.append(await read_reply(reader))
            writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            replies.append(await read_reply(reader))
            writer.close()
        finally:
            await server.stop()
        return scanner, replies

    scanner, replies = run(main())
    assert [status for status, _, _ in replies] == [200, 200, 200, 200]
    assert len(scanner.seen) == 3 and all(m == MESSAGE for m, _, _ in scanner.seen)
    docs = [json.loads(body) for _, _, body in replies[:3]]
    assert [d["action"] for d in docs] == ["add header", "add header", "add header"]
    assert "EXIM_POLICY_OUTBOUND" in docs[2]["symbols"]
    assert replies[3][2] == b"pong\r\n"
    assert scanner.seen[2][2] is Traffic.OUTBOUND  # its Settings-ID is the shim's


def test_pipelined_requests_are_answered_in_order():
    async def main():
        scanner = FakeScanner("no action")
        server, port = await start(scanner)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(rcpts=("fwd@example.com",)) + post() + post(version="1.0"))
            replies = [await read_reply(reader) for _ in range(3)]
            eof = await closed(reader)
            writer.close()
        finally:
            await server.stop()
        return replies, eof

    replies, eof = run(main())
    docs = [json.loads(body) for _, _, body in replies]
    assert "EXIM_POLICY_FORWARDING" in docs[0]["symbols"]
    assert "EXIM_POLICY_FORWARDING" not in docs[1]["symbols"]
    assert replies[2][1].get("connection") == "close" and eof  # HTTP/1.0: close after it


def test_forwarding_spam_rejected_and_outbound_spam_by_client():
    async def main():
        scanner = FakeScanner("add header", 7.0)
        server, port = await start(scanner, config={"outbound": {"spam_actions":
                                                                 ["add header", "reject"]},
                                                    "http": {"outbound_spam": "soft reject"}})
        try:
            out = []
            for request in (post(rcpts=("bob@example.com", "fwd@example.com")),
                            post(user="alice"), post(user="alice", extra="Flags: milter\r\n")):
                out.append(json.loads((await ask(port, request))[2]))
        finally:
            await server.stop()
        return out

    forwarding, haraka, proxy = run(main())
    assert forwarding["action"] == "reject"
    assert forwarding["messages"]["smtp_message"] == \
        "Message rejected as spam (the recipient forwards externally)"
    assert haraka["action"] == "soft reject" and "milter" not in haraka
    assert proxy["action"] == "reject" and proxy["milter"] == {"reject": "quarantine"}


def test_bad_request_gets_json_error_close_and_the_server_keeps_serving():
    async def main():
        scanner = FakeScanner()
        server, port = await start(scanner)
        try:
            error, eof = await ask(port, b"POST /nothing HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 0\r\n\r\n", then_closed=True)
            ok = await ask(port, post())
        finally:
            await server.stop()
        return error, eof, ok

    (status, headers, body), eof, ok = run(main())
    assert status == 404 and headers["connection"] == "close" and eof
    assert "unknown path" in json.loads(body)["error"]
    assert ok[0] == 200


def test_clients_outside_allowed_clients_are_closed_unread():
    async def main():
        server, port = await start(FakeScanner(), allowed_clients=["192.0.2.0/24"])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post())
            eof = await closed(reader)
            writer.close()
        finally:
            await server.stop()
        return eof

    assert run(main())


def test_read_timeout_mid_request_is_408_and_idle_keep_alive_is_closed_silently():
    async def main():
        server, port = await start(FakeScanner(), read_timeout=0.3)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post()[:40])
            timed_out = await read_reply(reader)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post())
            first = await read_reply(reader)
            idle_closed = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            await server.stop()
        return timed_out, first, idle_closed

    timed_out, first, idle_closed = run(main())
    assert timed_out[0] == 408 and "no data" in json.loads(timed_out[2])["error"]
    assert first[0] == 200 and idle_closed == b""


def test_body_budget_wait_ends_in_503():
    async def main():
        scanner = FakeScanner(delay=1.0)
        server, port = await start(scanner, max_message_size=600, max_bytes_in_flight=1000,
                                   queue_timeout=0.3)
        try:
            big = MESSAGE + b"x" * 400
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(post(big))
            await asyncio.sleep(0.2)  # the first request holds its bytes while scanned
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(post(big))
            second = await read_reply(r2)
            first = await read_reply(r1)
            w1.close()
            w2.close()
        finally:
            await server.stop()
        return server, first, second

    server, first, second = run(main())
    assert first[0] == 200
    assert second[0] == 503 and "bytes in flight" in json.loads(second[2])["error"]
    assert server.limits.budget.used == 0


def test_defer_failure_is_503_and_a_handler_bug_is_500():
    async def main():
        failing = FakeScanner(fail="Rspamd is down")
        server, port = await start(failing, config={"failure": {"inbound": "defer"}})
        try:
            deferred = await ask(port, post())
        finally:
            await server.stop()

        class Broken(FakeScanner):
            async def scan(self, message, envelope, traffic):
                raise RuntimeError("a bug")

        server, port = await start(Broken())
        try:
            bug, eof = await ask(port, post(), then_closed=True)
        finally:
            await server.stop()
        return deferred, bug, eof

    deferred, bug, eof = run(main())
    assert deferred[0] == 503 and "Rspamd is down" in json.loads(deferred[2])["error"]
    assert bug[0] == 500 and eof


def test_idle_keep_alive_connection_is_shed_for_a_new_one():
    async def main():
        server, port = await start(FakeScanner(), max_connections=1)
        try:
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(post())
            await read_reply(r1)  # now idle, kept alive
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(post())
            second = await read_reply(r2)
            first_closed = await closed(r1)
            w1.close()
            w2.close()
        finally:
            await server.stop()
        return second, first_closed

    second, first_closed = run(main())
    assert second[0] == 200 and first_closed


def test_stop_answers_the_request_in_flight_and_ends_idle_connections():
    async def main():
        server, port = await start(FakeScanner(delay=0.5))
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_reply(r2)  # idle now
        w1.write(post())
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop(grace=5))
        answered = await read_reply(r1)
        results = answered, await closed(r1), await closed(r2)
        await stopping
        w1.close()
        w2.close()
        return results

    answered, first_closed, idle_closed = run(main())
    assert answered[0] == 200 and answered[1].get("connection") == "close"
    assert first_closed and idle_closed
