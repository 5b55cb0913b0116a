"""Request bytes captured from the real peers, used as golden test data.

Sources (copied here as facts; nothing outside the repository is read at test time):

* EXIM_RSPAMC_*, EXIM_SA_*: Exim 4.96 (Debian exim4-daemon-heavy 4.96-15+deb12u10) talking to
  a byte-recording capture server, as described in docs/wire-formats.md ("Exim's scan file
  (both variants)", "Exim's request: SpamAssassin variant", "Exim's request: variant=rspamd"
  and "Lab captures"). The request header bytes are verbatim. The recorded captures elide
  part of each mbox body ("..."); the elided part is replaced by filler so that the body has
  exactly the captured Content-length. Everything Exim-specific that the codecs read (From_
  line, X-Envelope-*, Exim's Received:) is verbatim where the captures have it.
* SPAMC_*: spamc 4.0.1 (Debian 4.0.1-1~deb12u1), captured for this project with
  ``spamc -d 127.0.0.1 -p PORT [-c|-R|-y|-K]`` reading SPAMC_MESSAGE on stdin, against a
  throwaway Python socket server that recorded every byte until spamc half-closed.
  tests/test_protocol_spamc.py re-captures them live and compares.
"""
from __future__ import annotations


def _pad(prefix: bytes, suffix: bytes, total: int) -> bytes:
    """prefix + filler header line + suffix, exactly ``total`` bytes long."""
    room = total - len(prefix) - len(suffix)
    filler = b"X-Elided: " + b"x" * (room - len(b"X-Elided: \n")) + b"\n"
    body = prefix + filler + suffix
    assert len(body) == total, (len(body), total)
    return body


# --- Exim 4.96, "Exim's scan file (both variants)": the 484-byte scan file, 2 recipients -----
EXIM_MBOX_484 = _pad(
    b"From MAILER-DAEMON Sun Nov 22 05:56:46 2026\n"
    b"X-Envelope-From: <sender@example.org>\n"
    b"X-Envelope-To: rcpt1@example.com, Rcpt2@Example.COM\n"
    b"Received: from client.example.net\n"
    b"\t([192.0.2.10] helo=helo.client.example ident=root)\n"
    b"\tby mx.test.example with esmtp (Exim 4.96)\n"
    b"\t(envelope-from <sender@example.org>)\n"
    b"\tid 1xV0ZC-0003TR-0m;\n"
    b"\tSun, 22 Nov 2026 05:56:46 +0000\n"
    b"From: Sender <sender@example.org>\n",
    b"\nHello world\n.dot line\n",
    484)

# --- Exim 4.96, "Exim's request: variant=rspamd" (authenticated via -oMai) -------------------
EXIM_RSPAMC_AUTH_HEAD = (
    b"CHECK RSPAMC/1.3\r\nContent-length: 484\r\nQueue-Id: 1xV0ZC-0003TR-0m\r\n"
    b"From: <sender@example.org>\r\nRecipient-Number: 2\r\nRcpt: <rcpt1@example.com>\r\n"
    b"Rcpt: <Rcpt2@Example.COM>\r\nHelo: helo.client.example\r\nHostname: client.example.net\r\n"
    b"IP: 192.0.2.10\r\nUser: alice@example.com\r\n\r\n")
EXIM_RSPAMC_AUTH = EXIM_RSPAMC_AUTH_HEAD + EXIM_MBOX_484

# --- Exim 4.96 default variant, "Exim's request: SpamAssassin variant" ------------------------
EXIM_SA_HEAD = b"REPORT SPAMC/1.2\r\nUser: nobody\r\nContent-length: 484\r\n\r\n"
EXIM_SA = EXIM_SA_HEAD + EXIM_MBOX_484

# --- Exim 4.96 -> rspamd through a tap, "Lab captures", capture 0001 (unauthenticated) -------
EXIM_RSPAMC_0001_HEAD = (
    b"CHECK RSPAMC/1.3\r\nContent-length: 3312\r\nQueue-Id: 1xV0ad-0003s2-0s\r\n"
    b"From: <alice@example.org>\r\nRecipient-Number: 1\r\nRcpt: <bob@stack.test>\r\n"
    b"Helo: client.test\r\nIP: 127.0.0.1\r\n\r\n")
EXIM_MBOX_0001 = _pad(
    b"From alice@example.org Sun Nov 22 05:58:15 2026\n"
    b"X-Envelope-From: <alice@example.org>\n"
    b"X-Envelope-To: bob@stack.test\n"
    b"Received: from [127.0.0.1] (helo=client.test)\n"
    b"\tby mx.stack.test with esmtp (Exim 4.96)\n"
    b"\t(envelope-from <alice@example.org>)\n"
    b"\tid 1xV0ad-0003s2-0s\n"
    b"\tfor bob@stack.test;\n"
    b"\tSun, 22 Nov 2026 05:58:15 +0000\n",
    b"\n" + b"ham body line\n" * 100,
    3312)
EXIM_RSPAMC_0001 = EXIM_RSPAMC_0001_HEAD + EXIM_MBOX_0001

# --- "Lab captures", capture 0003 (authenticated as "tester", so "with esmtpa") ---------------
EXIM_RSPAMC_0003_HEAD = (
    b"CHECK RSPAMC/1.3\r\nContent-length: 3318\r\nQueue-Id: 1xV0ad-0003sE-2a\r\n"
    b"From: <tester@stack.test>\r\nRecipient-Number: 1\r\nRcpt: <carol@example.com>\r\n"
    b"Helo: client.test\r\nIP: 127.0.0.1\r\nUser: tester\r\n\r\n")
EXIM_MBOX_0003 = _pad(
    b"From MAILER-DAEMON Sun Nov 22 05:58:15 2026\n"
    b"X-Envelope-From: <tester@stack.test>\n"
    b"X-Envelope-To: carol@example.com\n"
    b"Received: from [127.0.0.1] (helo=client.test)\n"
    b"\tby mx.stack.test with esmtpa (Exim 4.96)\n"
    # the recorded capture stops here; the rest of Exim's Received follows its default template
    b"\t(envelope-from <tester@stack.test>)\n"
    b"\tid 1xV0ad-0003sE-2a\n"
    b"\tfor carol@example.com;\n"
    b"\tSun, 22 Nov 2026 05:58:15 +0000\n",
    b"\n" + b"auth body line\n" * 100,
    3318)
EXIM_RSPAMC_0003 = EXIM_RSPAMC_0003_HEAD + EXIM_MBOX_0003
#: the same scan file as Exim's SpamAssassin variant would send it (the header shape of
#: docs/wire-formats.md, "Exim's request: SpamAssassin variant")
EXIM_SA_0003 = b"REPORT SPAMC/1.2\r\nUser: nobody\r\nContent-length: 3318\r\n\r\n" + EXIM_MBOX_0003

# --- spamc 4.0.1 ------------------------------------------------------------------------------
SPAMC_MESSAGE = b"From: a@example.org\nTo: b@example.com\nSubject: hi\n\nHello\n"
SPAMC_CHECK = b"CHECK SPAMC/1.5\r\nUser: root\r\nContent-length: 57\r\n\r\n" + SPAMC_MESSAGE    # -c
SPAMC_REPORT = b"REPORT SPAMC/1.5\r\nUser: root\r\nContent-length: 57\r\n\r\n" + SPAMC_MESSAGE  # -R
SPAMC_SYMBOLS = b"SYMBOLS SPAMC/1.5\r\nUser: root\r\nContent-length: 57\r\n\r\n" + SPAMC_MESSAGE  # -y
SPAMC_PROCESS = b"PROCESS SPAMC/1.5\r\nUser: root\r\nContent-length: 57\r\n\r\n" + SPAMC_MESSAGE  # (none)
SPAMC_HEADERS = b"HEADERS SPAMC/1.5\r\nUser: root\r\nContent-length: 57\r\n\r\n" + SPAMC_MESSAGE  # --headers
SPAMC_PING = b"PING SPAMC/1.5\r\n\r\n"                                                         # -K
