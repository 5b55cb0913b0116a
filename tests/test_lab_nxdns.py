"""The NXDOMAIN responder: the pure reply builder, and the running lab instance."""
from __future__ import annotations

import socket
import struct

from exim_policy.lab.nxdns import (FORMERR, NOTIMP, NXDOMAIN, NxDns, build_reply, encode_query,
                                   main, query)
from exim_policy.lab.ports import free_port


def _header(packet: bytes) -> tuple[int, ...]:
    return struct.unpack_from("!HHHHHH", packet)


def test_reply_echoes_question_with_nxdomain_and_ra() -> None:
    q = encode_query("maps.rspamd.com", qtype=28, qid=0x1234)
    reply = build_reply(q)
    assert reply is not None
    qid, flags, qd, an, ns, ar = _header(reply)
    assert qid == 0x1234
    assert flags & 0x8000  # QR: a response
    assert flags & 0x0100  # RD copied from the query
    assert flags & 0x0080  # RA set
    assert flags & 0xF == NXDOMAIN
    assert (qd, an, ns, ar) == (1, 0, 0, 0)
    assert reply[12:] == q[12:]  # the question, byte for byte


def test_reply_ignores_responses_and_runts() -> None:
    response = build_reply(encode_query("a.test"))
    assert response is not None
    assert build_reply(response) is None  # never answer an answer
    assert build_reply(b"\x00" * 11) is None


def test_reply_to_odd_queries() -> None:
    q = bytearray(encode_query("a.test", qid=7))
    q[2] |= 2 << 3  # opcode 2 (STATUS)
    reply = build_reply(bytes(q))
    assert reply is not None and _header(reply)[1] & 0xF == NOTIMP
    truncated = encode_query("a.test")[:15]
    reply = build_reply(truncated)
    assert reply is not None and _header(reply)[1] & 0xF == FORMERR and _header(reply)[2] == 0


def test_running_responder_answers_and_logs(nxdns: NxDns) -> None:
    assert nxdns.alive()
    reply = query("127.0.0.1", nxdns.port, "fuzzy1.rspamd.com", qtype=28)
    assert reply.rcode == NXDOMAIN and reply.recursion_available and reply.qdcount == 1
    assert b"\x06fuzzy1\x06rspamd\x03com\x00" in reply.question
    assert "fuzzy1.rspamd.com type=28" in nxdns.log_path.read_text()


def test_main_reports_a_busy_port() -> None:
    port = free_port(udp=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", port))
        assert main(["--host", "127.0.0.1", "--port", str(port)]) == 1
