"""SMTP DATA transparency both ways (exim_policy.protocol.smtp_data), in any chunking."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exim_policy.protocol.smtp_data import DataDecoder, DataEncoder


def decode(wire: bytes, sizes: list[int] | None = None) -> tuple[bytes, bytes, bool]:
    """Feed ``wire`` in chunks of ``sizes`` (cycled); (message, rest, done)."""
    decoder, out, at, i = DataDecoder(), b"", 0, 0
    sizes = sizes or [len(wire) or 1]
    while at < len(wire) and not decoder.done:
        n = sizes[i % len(sizes)]
        out += decoder.feed(wire[at:at + n])
        at, i = at + n, i + 1
    return out, decoder.rest + wire[at:], decoder.done


def encode(message: bytes, sizes: list[int]) -> bytes:
    encoder, out, at, i = DataEncoder(), b"", 0, 0
    while at < len(message):
        n = sizes[i % len(sizes)]
        out += encoder.feed(message[at:at + n])
        at, i = at + n, i + 1
    return out + encoder.end()


@pytest.mark.parametrize("wire, message", [
    (b"Subject: x\r\n\r\nbody\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n"),
    (b".\r\n", b""),                                        # an empty message
    (b"..leading dot\r\n.\r\n", b".leading dot\r\n"),       # first line stuffed
    (b"a\r\n..\r\n...x\r\n.\r\n", b"a\r\n.\r\n..x\r\n"),    # stuffed lines inside
    (b"a\r\n.x\r\n.\r\n", b"a\r\nx\r\n"),                   # a lone stuffing dot, lenient
])
def test_decoding(wire, message):
    for size in (1, 2, 3, 5, 64):
        assert decode(wire, [size]) == (message, b"", True)


@pytest.mark.parametrize("wire", [
    b"a\n.\nb\r\n.\r\n",        # LF . LF does not end it
    b"a\n.\r\nb\r\n.\r\n",      # nor LF . CRLF
    b"a\r\n.\nb\r\n.\r\n",      # nor CRLF . LF
])
def test_bare_lf_never_ends_a_message(wire):
    """The "SMTP smuggling" end markers stay message content; only CRLF . CRLF ends it."""
    message, rest, done = decode(wire, [1])
    assert done and rest == b""
    assert message.endswith(b"b\r\n") and len(message) >= len(wire) - 4


def test_bytes_after_the_end_are_the_next_command():
    assert decode(b"x\r\n.\r\nQUIT\r\n") == (b"x\r\n", b"QUIT\r\n", True)


def test_incomplete_data_is_not_done():
    message, rest, done = decode(b"x\r\n.\r")
    assert not done and message == b"x"  # the CRLF waits: it may start the end marker


def test_feed_after_the_end_is_an_error():
    decoder = DataDecoder()
    decoder.feed(b".\r\n")
    with pytest.raises(ValueError):
        decoder.feed(b"more")


def test_encoder_adds_a_crlf_before_the_end_when_missing():
    assert encode(b"no newline", [3]) == b"no newline\r\n.\r\n"
    assert encode(b"a\r\n.b\r\n", [1]) == b"a\r\n..b\r\n.\r\n"
    assert DataEncoder().end() == b".\r\n"


messages = st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"a", b".\r\n",
                                     b"\r\n.\r\n", b"x" * 7]), max_size=40).map(b"".join)
chunkings = st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(messages, chunkings, chunkings)
def test_round_trip(message, enc_sizes, dec_sizes):
    """Whatever the message and however both sides chunk it: out comes what went in (with
    the CRLF the encoder adds to a message that does not end with one)."""
    wire = encode(message, enc_sizes)
    got, rest, done = decode(wire, dec_sizes)
    expected = message if message.endswith(b"\r\n") or not message else message + b"\r\n"
    assert (got, rest, done) == (expected, b"", True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), chunkings)
def test_any_bytes_never_raise_and_hold_little(data, sizes):
    decoder, at, i = DataDecoder(), 0, 0
    while at < len(data) and not decoder.done:
        n = sizes[i % len(sizes)]
        decoder.feed(data[at:at + n])
        assert len(decoder._tail) <= 4  # constant memory between calls
        at, i = at + n, i + 1
