"""The asyncio transport with a fake scanner: limits, timeouts, refusals, concurrency.

The real-Rspamd path is in test_shim_real.py; these tests pin the transport's promises
without a scanner in the way.
"""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from exim_policy.config import from_dict
from exim_policy.forwarding.mapfile import ForwardingMap
from exim_policy.model import Envelope, ScanResult, Traffic
from exim_policy.scanner import ScannerError
from exim_policy.transport.spamd import SpamdServer
from exim_policy.pipeline import PolicyService

BODY = (b"From MAILER-DAEMON Sun Nov 22 05:56:46 2026\nX-Envelope-From: <a@example.org>\n"
        b"X-Envelope-To: bob@example.com\nSubject: hi\n\nhello\n")


def rspamc_request(body: bytes = BODY, *, user: str | None = None,
                   rcpts=("bob@example.com",)) -> bytes:
    head = (f"CHECK RSPAMC/1.3\r\nContent-length: {len(body)}\r\nQueue-Id: 1xV0ZC-0003TR-0m\r\n"
            f"From: <a@example.org>\r\nRecipient-Number: {len(rcpts)}\r\n"
            + "".join(f"Rcpt: <{r}>\r\n" for r in rcpts)
            + "Helo: client.example\r\nIP: 192.0.2.10\r\n"
            + (f"User: {user}\r\n" if user else "") + "\r\n")
    return head.encode() + body


class FakeScanner:
    """Answers from a script; records what it saw and how many scans overlapped."""

    def __init__(self, action="no action", score=0.0, delay=0.0, fail: str | None = None):
        self.action, self.score, self.delay, self.fail = action, score, delay, fail
        self.seen: list[tuple[bytes, Envelope, Traffic]] = []
        self.in_flight = self.max_in_flight = 0

    async def scan(self, message, envelope, traffic):
        self.seen.append((message, envelope, traffic))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise ScannerError(self.fail)
            return ScanResult(action=self.action, score=self.score, required_score=15.0)
        finally:
            self.in_flight -= 1


async def start(scanner, **server_cfg):
    cfg = {"listen": ["127.0.0.1:0"], **server_cfg}
    config = from_dict({"server": cfg, "failure": {"inbound": "defer"}
                        if scanner.fail == "defer-me" else {}})
    fmap = ForwardingMap.parse("fwd@example.com\n")
    service = PolicyService(config, scanner, fmap.forwards)
    server = SpamdServer(config.server, service.answer)
    await server.start()
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, payload: bytes, chunk: int | None = None, pause: float = 0.0):
    """Send, read to EOF (the server must close after replying). A refused connection
    (closed unread, which the kernel reports as a reset) reads as b""."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = chunk or len(payload) or 1
    try:
        for i in range(0, len(payload), step):
            writer.write(payload[i:i + step])
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_reply_and_close_without_half_close():
    async def main():
        scanner = FakeScanner("reject", 15.0)
        server, port = await start(scanner)
        try:
            whole = await exchange(port, rspamc_request())
            chunked = await exchange(port, rspamc_request(), chunk=7)
        finally:
            await server.stop()
        return scanner, whole, chunked

    scanner, whole, chunked = asyncio.run(main())
    assert whole.startswith(b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; True; 15.00 / 15.00 / 0.0\r\n"
                            b"Action: reject\r\n")
    assert chunked == whole
    message, envelope, traffic = scanner.seen[0]
    assert message == b"X-Envelope-From: <a@example.org>\nX-Envelope-To: bob@example.com\n" \
                      b"Subject: hi\n\nhello\n"  # the mbox From_ line is not Rspamd's business
    assert envelope.recipients == ("bob@example.com",) and envelope.ip == "192.0.2.10"
    assert traffic is Traffic.INBOUND


def test_context_reaches_the_reply_and_settings_id():
    async def main():
        scanner = FakeScanner("add header", 7.0)
        server, port = await start(scanner)
        try:
            fwd = await exchange(port, rspamc_request(rcpts=("bob@example.com", "fwd@example.com")))
            out = await exchange(port, rspamc_request(user="alice"))
        finally:
            await server.stop()
        return scanner, fwd, out

    scanner, fwd, out = asyncio.run(main())
    assert b"Action: reject\r\n" in fwd
    assert b"Symbol: EXIM_POLICY_FORWARDING(0.00)" in fwd
    assert b"Reason: spam to a recipient that forwards externally (fwd@example.com)" in fwd
    assert b"Action: add header\r\n" in out and b"EXIM_POLICY_OUTBOUND" in out
    assert [t for _, _, t in scanner.seen] == [Traffic.FORWARDING, Traffic.OUTBOUND]


def test_many_connections_are_served_concurrently():
    async def main():
        scanner = FakeScanner(delay=0.05)
        server, port = await start(scanner)
        try:
            replies = await asyncio.gather(*(exchange(port, rspamc_request()) for _ in range(40)))
        finally:
            await server.stop()
        return scanner, replies

    scanner, replies = asyncio.run(main())
    assert all(b"Action: no action\r\n" in r for r in replies)
    assert scanner.max_in_flight > 10


def test_bad_requests_get_an_error_and_the_server_keeps_serving():
    async def main():
        scanner = FakeScanner()
        server, port = await start(scanner)
        try:
            bad = await exchange(port, b"check rspamc/1.3\r\n\r\n")
            http = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            good = await exchange(port, rspamc_request())
        finally:
            await server.stop()
        return bad, http, good

    bad, http, good = asyncio.run(main())
    assert bad.startswith(b"SPAMD/1.0 76 ") and http.startswith(b"SPAMD/1.0 76 ")
    assert b"Action: no action" in good


def test_absurd_content_length_is_refused_before_the_body():
    async def main():
        scanner = FakeScanner()
        server, port = await start(scanner, max_message_size=1000)
        try:
            head = b"CHECK RSPAMC/1.3\r\nContent-length: 99999999999\r\nRcpt: <a@b>\r\n\r\n"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)  # no body at all: the answer must not wait for it
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            await server.stop()
        return scanner, reply

    scanner, reply = asyncio.run(main())
    assert reply.startswith(b"SPAMD/1.0 76 ") and b"too big" in reply
    assert scanner.seen == []


def test_stalled_client_times_out():
    async def main():
        scanner = FakeScanner()
        server, port = await start(scanner, read_timeout=0.3)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"CHECK RSPAMC/1.3\r\nContent-length: 10\r\n")
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            await server.stop()
        return reply

    assert asyncio.run(main()).startswith(b"SPAMD/1.0 79 Timeout")


def test_clients_outside_allowed_clients_are_refused_unread():
    async def main():
        scanner = FakeScanner()
        server, port = await start(scanner, allowed_clients=["10.0.0.0/8"])
        try:
            reply = await exchange(port, rspamc_request())
        finally:
            await server.stop()
        return scanner, reply

    scanner, reply = asyncio.run(main())
    assert reply == b"" and scanner.seen == []


def test_a_full_table_of_requests_being_answered_refuses_a_newcomer():
    async def main():
        scanner = FakeScanner(delay=0.5)
        server, port = await start(scanner, max_connections=1)
        try:
            first = asyncio.create_task(exchange(port, rspamc_request()))
            await asyncio.sleep(0.1)
            second = await exchange(port, rspamc_request())  # the only place is taken
            first = await first
            third = await exchange(port, rspamc_request())   # free again
        finally:
            await server.stop()
        return first, second, third

    first, second, third = asyncio.run(main())
    assert b"Action: no action" in first and second == b"" and b"Action: no action" in third


def test_a_full_table_sheds_the_oldest_connection_still_sending():
    async def main():
        server, port = await start(FakeScanner(), max_connections=2)
        try:
            old_r, old_w = await asyncio.open_connection("127.0.0.1", port)
            old_w.write(b"CHECK RSPAMC/1.3\r\n")
            await asyncio.sleep(0.05)
            new_r, new_w = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)
            reply = await exchange(port, rspamc_request())  # needs a place: the oldest goes
            shed = await asyncio.wait_for(old_r.read(), 5)
            new_w.write(rspamc_request())  # the younger one is still served
            younger = await asyncio.wait_for(new_r.read(), 5)
            old_w.close()
            new_w.close()
        finally:
            await server.stop()
        return reply, shed, younger

    reply, shed, younger = asyncio.run(main())
    assert b"Action: no action" in reply and b"Action: no action" in younger
    assert shed == b""


def test_no_free_scan_slot_in_time_is_the_configured_failure_outcome():
    async def main():
        scanner = FakeScanner(delay=0.5)
        server, port = await start(scanner, max_scans=1, queue_timeout=0.1)
        try:
            first = asyncio.create_task(exchange(port, rspamc_request()))
            await asyncio.sleep(0.1)
            inbound = await exchange(port, rspamc_request())      # failure.inbound = accept
            outbound = await exchange(port, rspamc_request(user="alice"))  # tempfail
            return await first, inbound, outbound, scanner.max_in_flight
        finally:
            await server.stop()

    first, inbound, outbound, most = asyncio.run(main())
    assert b"Action: no action" in first and most == 1
    assert b"Action: no action\r\n" in inbound and b"EXIM_POLICY_SCANNER_FAILED" in inbound
    assert b"no free scan slot within 0.1s (server.max_scans = 1)" in inbound
    assert b"Action: soft reject\r\n" in outbound


def test_a_body_that_does_not_fit_the_byte_budget_waits_its_turn():
    big = BODY + b"x" * 600

    async def main():
        scanner = FakeScanner(delay=0.3)
        server, port = await start(scanner, max_message_size=1000, max_bytes_in_flight=1000)
        try:
            replies = await asyncio.gather(exchange(port, rspamc_request(big)),
                                           exchange(port, rspamc_request(big)))
            return replies, scanner.max_in_flight, server.limits.budget.used
        finally:
            await server.stop()

    replies, most, left = asyncio.run(main())
    assert all(b"Action: no action" in r for r in replies)
    assert most == 1  # the second body was read only once the first one was answered
    assert left == 0


def test_no_room_in_the_byte_budget_in_time_is_a_temporary_error():
    big = BODY + b"x" * 600

    async def main():
        scanner = FakeScanner(delay=0.5)
        server, port = await start(scanner, max_message_size=1000, max_bytes_in_flight=1000,
                                   queue_timeout=0.1)
        try:
            first = asyncio.create_task(exchange(port, rspamc_request(big)))
            await asyncio.sleep(0.1)
            second = await exchange(port, rspamc_request(big))
            return await first, second, server.limits.budget
        finally:
            await server.stop()

    first, second, budget = asyncio.run(main())
    assert b"Action: no action" in first
    assert second.startswith(b"SPAMD/1.0 75 Service Unavailable: too many bytes in flight")
    assert budget.used == 0 and budget.waiting == 0


def test_the_body_reaches_the_scanner_without_a_copy():
    """The parser's buffer is the message the scanner gets (a view past the From_ line)."""
    class Keeper(FakeScanner):
        async def scan(self, message, envelope, traffic):
            self.view = message
            return await super().scan(message, envelope, traffic)

    async def main():
        scanner = Keeper()
        server, port = await start(scanner)
        try:
            await exchange(port, rspamc_request())
        finally:
            await server.stop()
        return scanner.view

    view = asyncio.run(main())
    assert isinstance(view, memoryview) and isinstance(view.obj, bytearray)
    assert view.obj == BODY and bytes(view) == BODY[BODY.index(b"\n") + 1:]


def test_stop_lets_a_request_still_arriving_finish():
    async def main():
        server, port = await start(FakeScanner("reject", 15.0))
        payload = rspamc_request()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload[:-5])
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(server.stop(grace=5))
        await asyncio.sleep(0.1)
        refused = False
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            refused = True
        writer.write(payload[-5:])
        reply = await asyncio.wait_for(reader.read(), 5)
        await stopping
        return refused, reply

    refused, reply = asyncio.run(main())
    assert refused and b"Action: reject\r\n" in reply


def test_stop_cuts_what_is_still_open_after_the_grace_period():
    async def main():
        server, port = await start(FakeScanner())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"CHECK RSPAMC/1.3\r\n")
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        await server.stop(grace=0.3)
        took = asyncio.get_running_loop().time() - started
        return took, await asyncio.wait_for(reader.read(), 5)

    took, reply = asyncio.run(main())
    assert took < 2 and reply == b""


def test_scanner_failure_defer_closes_without_an_answer():
    async def main():
        scanner = FakeScanner(fail="defer-me")
        server, port = await start(scanner)
        try:
            return await exchange(port, rspamc_request())
        finally:
            await server.stop()

    assert asyncio.run(main()) == b""


def test_unix_socket_listener(tmp_path):
    path = tmp_path / "spamd.sock"

    async def main():
        scanner = FakeScanner("reject", 15.0)
        config = from_dict({"server": {"listen": [f"unix:{path}"]}})
        service = PolicyService(config, scanner, ForwardingMap().forwards)
        server = SpamdServer(config.server, service.answer)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(rspamc_request())
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            await server.stop()
        return reply

    assert b"Action: reject" in asyncio.run(main())
    assert not os.path.exists(path) or oct(os.stat(path).st_mode & 0o777) == "0o666"


def test_stale_unix_socket_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)
    leftover.close()  # file stays, nobody listens: what a crash leaves behind

    async def main():
        config = from_dict({"server": {"listen": [f"unix:{path}"]}})
        server = SpamdServer(config.server, PolicyService(
            config, FakeScanner(), ForwardingMap().forwards).answer)
        await server.start()
        await server.stop()

    asyncio.run(main())


@pytest.mark.parametrize("chunk", [4096, 128, 16, 1])
def test_chunked_delivery_same_answer(chunk):
    async def main():
        server, port = await start(FakeScanner("add header", 7.0))
        try:
            return await exchange(port, rspamc_request(), chunk=chunk)
        finally:
            await server.stop()

    assert b"Action: add header\r\n" in asyncio.run(main())


def test_connect_and_close_is_not_logged_as_an_error(caplog):
    async def main():
        server, port = await start(FakeScanner())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()  # what a TCP health check does
            await asyncio.sleep(0.1)
            return await exchange(port, rspamc_request())
        finally:
            await server.stop()

    with caplog.at_level("INFO", logger="exim_policy.transport.spamd"):
        assert b"Action: no action" in asyncio.run(main())
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_a_flood_of_protocol_errors_is_a_few_log_lines(caplog):
    from exim_policy.transport.listeners import PROTOCOL_ERROR_BURST

    async def main():
        server, port = await start(FakeScanner())
        try:
            return [await exchange(port, b"garbage %d\r\n\r\n" % i) for i in range(40)]
        finally:
            await server.stop()

    with caplog.at_level("WARNING"):
        replies = asyncio.run(main())
    assert all(reply.startswith(b"SPAMD/1.0 76 ") for reply in replies), replies[0]
    lines = [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(lines) == PROTOCOL_ERROR_BURST < 40
    assert lines[0].startswith("protocol error from ('127.0.0.1', ")
