"""Message builders for the tests and the demo, which talk to the real Rspamd / Exim / shim.

Every builder returns the whole RFC 5322 message as bytes (CRLF line endings unless
``eol="\\n"``) and takes the envelope addresses, because two facts about Rspamd 3.4 matter:
- ``To:`` must equal the envelope recipient, else FORGED_RECIPIENTS adds +2.0 to ham;
- the scan must say ``IP: 127.0.0.1`` (what Exim sends for loopback clients), else offline
  NXDOMAIN answers push plain ham to "add header".

Verdicts with the lab's Rspamd (``enable_test_patterns``, TEST_SPAM_HEADER rule):
  ham -> "no action"; gtube -> "reject" (only symbol GTUBE, all other rules skipped);
  gtube_add_header (YJS) -> "add header"; gtube_rewrite_subject (ZJS) -> "rewrite subject";
  gtube_no_action (AJS) -> "no action"; x_test_spam -> "add header" (TEST_SPAM_HEADER 7.0,
  other rules still run, so it combines with multimap / force_actions rules).
"""
from __future__ import annotations

import datetime
import email.utils
import uuid

from .addresses import INBOUND_SENDER, LOCAL

#: the GTUBE test string; the first three characters select the verdict (X/Y/Z/A JS*)
GTUBE_TAIL = "C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE = "XJS*" + GTUBE_TAIL
GTUBE_ADD_HEADER = "YJS*" + GTUBE_TAIL
GTUBE_REWRITE_SUBJECT = "ZJS*" + GTUBE_TAIL
GTUBE_NO_ACTION = "AJS*" + GTUBE_TAIL

DEFAULT_TO = LOCAL
DEFAULT_FROM = INBOUND_SENDER

_HAM_PARAGRAPHS = (
    "Hi Bob,",
    "Thanks for the notes from Tuesday's planning meeting. I went through the action items "
    "this morning and I think we are in good shape for the release at the end of next month. "
    "The one open question is whether the documentation team can finish the migration guide "
    "in time; Carol offered to check with them on Thursday and to get back to both of us.",
    "About the budget spreadsheet: I updated the second tab with the revised travel "
    "estimates, and I moved the hardware items into a section of their own so that they are "
    "easier to review. Please have a look when you have a moment and tell me if anything "
    "looks wrong to you, in particular the numbers for the conference in the autumn.",
    "For the office move, facilities confirmed the date. The movers arrive early on the "
    "Friday morning, so please pack your desk on Thursday afternoon and label the boxes with "
    "your name and the new room number. Monitors and docking stations stay where they are; "
    "the new rooms already have the same equipment installed and tested.",
    "The customer workshop is now planned for the second week of the month. Dave is "
    "preparing the agenda and will circulate a first draft by Monday. If you want a slot for "
    "the roadmap overview, tell him soon, because the afternoon sessions are filling up and "
    "he wants to send the invitations before the end of the week.",
    "I also read the retrospective notes. Most of the points are about the test environment "
    "being slow in the mornings, which we already know about. The infrastructure team said "
    "that the new build machines should arrive within two weeks, and that they will move the "
    "nightly jobs to them first, before anything else changes.",
    "Finally, the quarterly review: I booked the large meeting room for the whole Wednesday "
    "afternoon. Coffee and something to eat will be there at three. Please bring the updated "
    "slides for your area; ten minutes each should be enough, with some time for questions "
    "at the end of every section.",
    "On the hiring side, we had four good interviews for the support position this week. "
    "Two of the candidates will come back for a second conversation with the team, and I "
    "would like you to join one of them if your calendar allows it. Erin will send the "
    "details together with the notes from the first round.",
    "One more thing about the release: the translation files need a last review. Frank "
    "said the German and the French versions are complete, while the Spanish one still has "
    "a few open strings in the settings dialog. He expects to close them by Wednesday, which "
    "leaves enough time for the final check before we freeze the branch.",
    "Let me know if I missed anything, and thanks again for organising the meeting.",
    "Best regards,\nAlice",
)


def new_message_id(domain: str = "example.org") -> str:
    """A unique Message-ID value without the angle brackets."""
    return f"{uuid.uuid4().hex}@{domain}"


def _build(headers: list[tuple[str, str]], body: str, eol: str) -> bytes:
    lines = [f"{name}: {value}" for name, value in headers]
    text = eol.join(lines) + eol + eol + body.replace("\n", eol)
    if not text.endswith(eol):
        text += eol
    return text.encode("utf-8")


def _message(subject: str, body: str, to: str, from_addr: str, message_id: str | None,
             eol: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    headers = [
        ("Date", email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc))),
        ("From", from_addr),
        ("To", to),
        ("Subject", subject),
        ("Message-ID", f"<{message_id or new_message_id()}>"),
        *extra,
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=UTF-8"),
        ("Content-Transfer-Encoding", "7bit"),
    ]
    return _build(headers, body, eol)


def ham(to: str = DEFAULT_TO, from_addr: str = DEFAULT_FROM, message_id: str | None = None,
        *, eol: str = "\r\n") -> bytes:
    """About 3 KB of plain, friendly text: "no action" (score about -0.1)."""
    return _message("Notes from the planning meeting", "\n\n".join(_HAM_PARAGRAPHS) + "\n",
                    to, from_addr, message_id, eol)


def _gtube_body(pattern: str) -> str:
    # the pattern must sit in a text part of 68 bytes to 8 KiB
    return f"Hello,\n\nThis is a test message for the spam filter.\n\n{pattern}\n"


def gtube(to: str = DEFAULT_TO, from_addr: str = DEFAULT_FROM, message_id: str | None = None,
          *, eol: str = "\r\n") -> bytes:
    """Standard GTUBE (XJS*): "reject", score 15, always."""
    return _message("GTUBE reject test", _gtube_body(GTUBE), to, from_addr, message_id, eol)


def gtube_add_header(to: str = DEFAULT_TO, from_addr: str = DEFAULT_FROM,
                     message_id: str | None = None, *, eol: str = "\r\n") -> bytes:
    """YJS* variant: "add header" (score 6); needs enable_test_patterns."""
    return _message("GTUBE add header test", _gtube_body(GTUBE_ADD_HEADER), to, from_addr,
                    message_id, eol)


def gtube_rewrite_subject(to: str = DEFAULT_TO, from_addr: str = DEFAULT_FROM,
                          message_id: str | None = None, *, eol: str = "\r\n") -> bytes:
    """ZJS* variant: "rewrite subject"; needs enable_test_patterns."""
    return _message("GTUBE rewrite subject test", _gtube_body(GTUBE_REWRITE_SUBJECT), to,
                    from_addr, message_id, eol)


def gtube_no_action(to: str = DEFAULT_TO, from_addr: str = DEFAULT_FROM,
                    message_id: str | None = None, *, eol: str = "\r\n") -> bytes:
    """AJS* variant: "no action" (score 0); needs enable_test_patterns."""
    return _message("GTUBE no action test", _gtube_body(GTUBE_NO_ACTION), to, from_addr,
                    message_id, eol)


def x_test_spam(to: str = DEFAULT_TO, from_addr: str = DEFAULT_FROM,
                message_id: str | None = None, *, eol: str = "\r\n") -> bytes:
    """The ham with ``X-Test-Spam: add-header``: "add header" (TEST_SPAM_HEADER 7.0 + ham set)."""
    return _message("Header-triggered add header test", "\n\n".join(_HAM_PARAGRAPHS) + "\n",
                    to, from_addr, message_id, eol, extra=(("X-Test-Spam", "add-header"),))
