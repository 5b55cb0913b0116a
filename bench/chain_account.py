"""The chain bench's accounting: every copy that arrived, against what the clients were told.

Copies are found by Message-ID in the three places mail can end up: the Maildirs of
lab.test, the SMTP sink's files and the quarantine's index. Each copy names the Exim queue
id it came from (the ``id`` of the Received: line our Exim wrote, or the quarantine
evidence's ``queue``), so a copy is matched to the one transaction whose 250 carried that
id. Per accepted transaction the expected copies follow from the scenario:

- outbound spam: one quarantine recipient per envelope recipient, nothing else;
- anything else accepted: each local recipient's Maildir, the forwarder's target in the
  sink, each external recipient in the sink;
- inbound copies carry the scan's headers: X-Spam-Flag for "add header" spam, and
  "X-Spam-Status: unscanned" when Rspamd was down and failure.inbound = accept let it in
  (then a spam body may be delivered: as configured, and counted apart);
- every copy in the sink or the quarantine carries the envelope sender the client gave.

Refusals (5xx) are right only where the verdict refuses: inbound GTUBE, and inbound
"add header" spam in a transaction with a recipient that forwards externally.
"""
from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exim_policy.lab.addresses import FORWARD_TARGET, FORWARDER

from chain_traffic import LOCAL_DOMAIN, MessageLog, Planned, Txn, direction

_MID = re.compile(rb"^message-id:\s*<([^>\s]+)>", re.I | re.M)
_OUR_RECEIVED = re.compile(rb"^received: [^\n]*?\bby mx\.lab\.test\b[^\n]*?\bid (\S+?)[;\s]",
                           re.I | re.M)
_FLAG = re.compile(rb"^x-spam-flag:\s*yes", re.I | re.M)
_UNSCANNED = re.compile(rb"^x-spam-status:\s*unscanned", re.I | re.M)
_SINK_FROM = re.compile(rb"^X-Sink-Mail-From: <([^>]*)>", re.M)
_SINK_RCPT = re.compile(rb"^X-Sink-Rcpt-To: (.*)$", re.M)
_BENCH_MID = re.compile(rb"message-id:\s*<(chain-[^>\s]+)>", re.I)


@dataclass(frozen=True)
class Copy:
    #: "mbox" (a Maildir of lab.test), "sink", "quarantine", "bounce" (a DSN in the sink)
    place: str
    #: the mailbox, the sink's or the quarantine's envelope recipient
    address: str
    mid: str
    qid: str
    flagged: bool = False
    unscanned: bool = False
    sender: str = ""
    at: float = 0.0


# ------------------------------------------------------------------------- finding --
def head_of(data: bytes) -> bytes:
    """The header block, unfolded (continuation lines joined to their field)."""
    end = data.find(b"\n\n")
    crlf = data.find(b"\r\n\r\n")
    if crlf != -1 and (end == -1 or crlf < end):
        end = crlf
    head = data if end == -1 else data[:end]
    return re.sub(rb"\r?\n[ \t]+", b" ", head).replace(b"\r\n", b"\n")


def _copy_fields(head: bytes) -> tuple[str, str, bool, bool] | None:
    mid = _MID.search(head)
    if mid is None:
        return None
    qid = _OUR_RECEIVED.search(head)
    return (mid.group(1).decode(), qid.group(1).decode() if qid else "",
            bool(_FLAG.search(head)), bool(_UNSCANNED.search(head)))


def maildir_copies(mail_dir: Path, users: Iterable[str]) -> Iterator[Copy]:
    for user in users:
        base = mail_dir / user / "Maildir"
        for sub in ("new", "cur"):
            folder = base / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                fields = _copy_fields(head_of(path.read_bytes()))
                if fields is not None:
                    yield Copy("mbox", user, *fields, at=path.stat().st_mtime)


def sink_copies(sink_dir: Path) -> Iterator[Copy]:
    """One copy per envelope recipient of each sink file; a bounce (MAIL FROM:<>) is a
    "bounce" copy of the bench message it returns (its Message-ID is in the body)."""
    for path in sink_dir.glob("*.eml"):
        data = path.read_bytes()
        head = head_of(data)
        sender = _SINK_FROM.search(head)
        rcpts = _SINK_RCPT.search(head)
        if sender is None or rcpts is None:
            continue
        at = path.stat().st_mtime
        if not sender.group(1):
            original = _BENCH_MID.search(data)
            if original is not None:
                yield Copy("bounce", rcpts.group(1).decode(), original.group(1).decode(), "",
                           at=at)
            continue
        fields = _copy_fields(head)
        if fields is None:
            continue
        for rcpt in re.findall(rb"<([^>]*)>", rcpts.group(1)):
            yield Copy("sink", rcpt.decode(), *fields, sender=sender.group(1).decode(), at=at)


def quarantine_copies(store_dir: Path) -> tuple[list[Copy], int]:
    """The quarantine's entries (one copy per recipient) and how many times a delivery
    was merged into an entry it duplicated (the store joins the same bytes from the same
    sender into one entry: a second delivery of one Exim message shows only there)."""
    index = store_dir / "index.db"
    if not index.exists():
        return [], 0
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)
    try:
        rcpts: dict[str, list[str]] = {}
        for entry_id, address in db.execute("SELECT id, address FROM recipients ORDER BY id, seq"):
            rcpts.setdefault(entry_id, []).append(address)
        copies = []
        for entry_id, received, sender, message_id, evidence in db.execute(
                "SELECT id, received, sender, message_id, evidence FROM messages"):
            qid = json.loads(evidence).get("queue_id", "")
            for address in rcpts.get(entry_id, ()):
                copies.append(Copy("quarantine", address, message_id.strip("<> "), qid,
                                   sender=sender, at=received))
        merged = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'merged'").fetchone()[0]
    finally:
        db.close()
    return copies, merged


# ------------------------------------------------------------------------ expecting --
def destination(rcpt: str, local_users: Iterable[str]) -> tuple[str, str]:
    local, _, domain = rcpt.partition("@")
    if rcpt == FORWARDER:
        return "sink", FORWARD_TARGET
    if domain == LOCAL_DOMAIN and local in set(local_users):
        return "mbox", local
    return "sink", rcpt


def expected_copies(planned: Planned, txn: Txn, local_users: Iterable[str]) -> Counter:
    if planned.outbound and planned.spec.body == "gtube":
        return Counter(("quarantine", r) for r in txn.rcpts)
    return Counter(destination(r, local_users) for r in txn.rcpts)


def refusal_expected(planned: Planned, txn: Txn) -> bool:
    """A 5xx the verdict explains: inbound GTUBE (reject), inbound "add header" spam
    with a recipient that forwards externally (the shim's forwarding reject)."""
    if txn.stage != "data" or planned.outbound:
        return False
    body = planned.spec.body
    return body == "gtube" or (body == "flag" and FORWARDER in txn.rcpts)


def planned_outcome(planned: Planned) -> str:
    """What a run without faults ends in, per message."""
    body = planned.spec.body
    if planned.outbound:
        return "quarantined" if body == "gtube" else "delivered"
    if body == "gtube":
        return "refused"
    if body == "flag" and FORWARDER in planned.rcpts:
        return "refused" if len(planned.rcpts) == 1 else "delivered+refused"
    return "delivered"


# ----------------------------------------------------------------------- comparing --
@dataclass
class Verdict:
    """The accounting's result."""

    planned: Counter = field(default_factory=Counter)
    seen: Counter = field(default_factory=Counter)
    #: per recipient: delivered / quarantined / refused / gave up
    recipients: Counter = field(default_factory=Counter)
    retried_then_accepted: int = 0
    retried_then_refused: int = 0
    split_transactions: int = 0
    unscanned_accepted: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    bounces: int = 0
    quarantine_merges: int = 0
    #: (txn, copies) of every accepted transaction, for the fault and latency reports
    accepted: list[tuple[Txn, list[Copy]]] = field(default_factory=list)
    copies: int = 0

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.gave_up
                    or self.bounces or self.quarantine_merges)


def account(logs: list[MessageLog], copies: list[Copy], local_users: Iterable[str],
            merges: int = 0) -> Verdict:
    users = tuple(local_users)
    verdict = Verdict(quarantine_merges=merges, copies=len(copies))
    by_mid: dict[str, list[Copy]] = {}
    for copy in copies:
        by_mid.setdefault(copy.mid, []).append(copy)
    for log in logs:
        _account_message(log, by_mid.pop(log.planned.mid, []), users, verdict)
    # copies of no message of this run (the notices of the accounts feature would be)
    return verdict


def _account_message(log: MessageLog, copies: list[Copy], users: tuple[str, ...],
                     verdict: Verdict) -> None:
    planned, mid = log.planned, log.planned.mid
    verdict.planned[planned_outcome(planned)] += 1
    by_qid: dict[str, list[Copy]] = {}
    for copy in copies:
        if copy.place == "bounce":
            verdict.bounces += 1
            verdict.wrong.append(f"{mid}: a bounce to {copy.address}")
            continue
        by_qid.setdefault(copy.qid, []).append(copy)
    labels: set[str] = set()
    retried = False
    for txn in log.txns:
        if txn.split:
            verdict.split_transactions += 1
            continue
        if txn.temporary:
            retried = True
            continue
        if txn.accepted:
            mine = by_qid.pop(txn.queue_id or "", [])
            _check_accepted(planned, txn, mine, users, verdict)
            verdict.accepted.append((txn, mine))
            outbound_spam = planned.outbound and planned.spec.body == "gtube"
            label = "quarantined" if outbound_spam else "delivered"
            labels.add(label)
            verdict.recipients[label] += len(txn.rcpts)
        else:
            labels.add("refused")
            verdict.recipients["refused"] += len(txn.rcpts)
            if not refusal_expected(planned, txn):
                verdict.wrong.append(f"{mid}: {txn.stage} {txn.code} {txn.text} "
                                     f"({planned.scenario})")
    for qid, extra in by_qid.items():
        ambiguous = any(t.ambiguous for t in log.txns)
        what = "after a lost connection" if ambiguous else "of no accepted transaction"
        verdict.duplicated.append(f"{mid}: {len(extra)} copies from queue id {qid or '?'} "
                                  f"{what}")
    if log.gave_up:
        verdict.gave_up.append(f"{mid}: {', '.join(log.pending)} unsettled after "
                               f"{log.attempts} attempts")
        verdict.recipients["gave up"] += len(log.pending)
    outcome = "+".join(sorted(labels)) or "nothing"
    if retried:
        outcome += " after 4xx"
        if "delivered" in labels or "quarantined" in labels:
            verdict.retried_then_accepted += 1
        else:
            verdict.retried_then_refused += 1
    verdict.seen[outcome] += 1


def _check_accepted(planned: Planned, txn: Txn, copies: list[Copy], users: tuple[str, ...],
                    verdict: Verdict) -> None:
    mid = planned.mid
    want = expected_copies(planned, txn, users)
    got = Counter((c.place, c.address) for c in copies)
    for key, count in (want - got).items():
        verdict.lost.append(f"{mid}: {count} missing at {key[0]} {key[1]} (queue id "
                            f"{txn.queue_id}, {planned.scenario})")
    for key, count in (got - want).items():
        if key in want:
            verdict.duplicated.append(f"{mid}: {count} extra at {key[0]} {key[1]}")
        else:
            verdict.wrong.append(f"{mid}: a copy at {key[0]} {key[1]} ({planned.scenario}, "
                                 f"expected {sorted(want)})")
    for copy in copies:
        # the envelope sender travels with every copy (a quarantine entry keeps it for
        # the release; Exim's alias forwarding keeps it too)
        if copy.place in ("sink", "quarantine") and copy.sender != planned.sender:
            verdict.wrong.append(f"{mid}: envelope sender <{copy.sender}> at {copy.place} "
                                 f"{copy.address}, sent as <{planned.sender}>")
    unscanned = any(c.unscanned for c in copies)
    way = direction(planned, txn.rcpts)
    if unscanned:
        verdict.unscanned_accepted[way] += 1
        if way != "in":
            verdict.wrong.append(f"{mid}: {way} mail accepted unscanned")
        return
    body = planned.spec.body
    if not planned.outbound and (body == "gtube" or (body == "flag" and way == "fwd")):
        verdict.wrong.append(f"{mid}: spam accepted after a scan ({planned.scenario})")
    for copy in copies:
        flag_due = copy.place == "mbox" and not planned.outbound and body == "flag"
        if copy.flagged != flag_due and copy.place == "mbox":
            verdict.wrong.append(f"{mid}: X-Spam-Flag {'present' if copy.flagged else 'absent'}"
                                 f" in {copy.address}'s copy ({planned.scenario})")
