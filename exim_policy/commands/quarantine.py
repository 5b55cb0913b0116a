"""``exim-policy quarantine list|show|release|delete|purge|import``: held outbound spam.

Works on the store of ``[quarantine] path`` (the daemon's receiver writes it). Release
sends a message to its original envelope recipients with its original sender, once:
a second release says when and by whom it was released and sends nothing (``--force``
sends again). Every release and delete is kept with who (``SUDO_USER``, else the Unix
user), when and why, and ``show`` prints it. ``--json`` output: ``list`` one array,
``show`` one object (``id``, ``received``, ``state``, ``sender``, ``recipients``
[{``address``, ``state``, ``at``, ``detail``}], ``evidence``, ``headers``, ``audit``...).

Exit status: 0 done; 1 nothing done for at least one message (unknown, already
released, refused on import); 2 error (configuration, store, release path).
"""
from __future__ import annotations

import argparse
import sys

NAME = "quarantine"
HELP = "list, show, release, delete, purge or import quarantined outbound spam"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    sub = parser.add_subparsers(dest="quarantine_command", metavar="ACTION")
    sub.required = True

    listing = sub.add_parser("list", parents=[common], help="held (and past) messages")
    listing.add_argument("--account", metavar="USER", help="only this account's messages")
    listing.add_argument("--since", metavar="DURATION", help="only this recent, e.g. 2h")
    listing.add_argument("--state", choices=("held", "releasing", "released", "deleted"))
    listing.add_argument("--limit", type=int, default=0, metavar="N", help="at most N")
    listing.add_argument("--json", action="store_true", help="one JSON array")

    show = sub.add_parser("show", parents=[common],
                          help="one message: envelope, evidence, headers, text, audit")
    show.add_argument("id", metavar="ID")
    what = show.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="one JSON object")
    what.add_argument("--raw", action="store_true", help="the stored message, as it is")

    rel = sub.add_parser("release", parents=[common],
                         help="send to the original recipients, once, unscanned")
    rel.add_argument("ids", nargs="*", metavar="ID")
    rel.add_argument("--account", metavar="USER", help="every held message of this account")
    rel.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    rel.add_argument("--dry-run", action="store_true", help="say what would be sent")
    rel.add_argument("--force", action="store_true",
                     help="send again, also what was released (or half released) before")
    rel.add_argument("--learn-ham", action="store_true",
                     help="also teach Rspamd's controller that it is ham (/learnham)")

    delete = sub.add_parser("delete", parents=[common], help="remove messages' files")
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.add_argument("--reason", required=True, help="why (kept in the audit trail)")

    purge = sub.add_parser("purge", parents=[common],
                           help="forget entries older than quarantine.retention")
    purge.add_argument("--older-than", metavar="DURATION",
                       help="instead of quarantine.retention, e.g. 7d")

    imp = sub.add_parser("import", parents=[common],
                         help="read a quarantine mailbox (mbox or Maildir) into the store")
    imp.add_argument("paths", nargs="+", metavar="PATH")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load, parse_duration
    from ..quarantine.store import QuarantineError, QuarantineStore

    config = load(args.config)
    command = args.quarantine_command
    try:
        for name in ("since", "older_than"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(args, name, parse_duration(value))
    except ValueError as exc:
        raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
    if command == "release" and bool(args.ids) == bool(args.account):
        print("exim-policy: quarantine release: give message ids or --account, not both",
              file=sys.stderr)
        return 2
    try:
        store = QuarantineStore(config.quarantine.path, create=command == "import")
    except QuarantineError as exc:
        print(f"exim-policy: {exc}", file=sys.stderr)
        return 2
    try:
        return _COMMANDS[command](store, config, args)
    except QuarantineError as exc:
        print(f"exim-policy: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


# ---------------------------------------------------------------------- commands --
def _list(store, config, args) -> int:
    import json
    import time

    since = time.time() - args.since if args.since else None
    entries = store.list(account=_account(args.account), since=since, state=args.state,
                         limit=args.limit or None)
    if args.json:
        print(json.dumps([entry_json(e) for e in entries], indent=2))
        return 0
    print_table(entries, f"quarantine ({len(entries)})")
    return 0


def print_table(entries, title: str) -> None:
    """The list view (also under ``accounts show``)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for column in ("id", "received", "state", "account", "sender", "rcpts", "subject",
                   "score", "top symbols"):
        table.add_column(column, no_wrap=column in ("id", "received"))
    for e in entries:
        score = f"{e.evidence.score:g}" if e.evidence.score is not None else "-"
        table.add_row(*(Text(v) for v in (
            e.id, _when(e.received), e.state, e.evidence.account or "-", e.sender or "<>",
            str(len(e.recipients)), e.subject or "-", score,
            ", ".join(e.evidence.top_symbols()) or "-")))
    Console().print(table)


def _show(store, config, args) -> int:
    import json

    entry = store.get(args.id)
    if entry is None:
        print(f"exim-policy: {args.id}: no such message in the quarantine", file=sys.stderr)
        return 1
    path = store.path_of(entry.id)
    if args.raw:
        if not path.exists():
            print(f"exim-policy: {entry.id}: the message file is gone ({entry.state})",
                  file=sys.stderr)
            return 1
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                sys.stdout.buffer.write(chunk)
        return 0
    headers, preview = _read_preview(path)
    doc = entry_json(entry, audit=True)
    doc["headers"] = [[name, value] for name, value in headers]
    doc["preview"] = preview
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    _print_entry(doc)
    return 0


def _release(store, config, args) -> int:
    from ..quarantine.release import ReleaseFailed, learn_ham, release
    from ..quarantine.store import HELD, QuarantineError

    who = _who()
    ids = args.ids or [e.id for e in store.list(account=_account(args.account), state=HELD)]
    if not ids:
        print(f"exim-policy: {args.account}: no held messages", file=sys.stderr)
        return 1
    status = 0
    for entry_id in ids:
        if args.dry_run:
            entry = store.get(entry_id)
            if entry is None:
                print(f"{entry_id}: no such message", file=sys.stderr)
                status = 1
                continue
            to = [r.address for r in entry.recipients if args.force or r.state != "released"]
            print(f"{entry.id}: would send ({entry.state}) from <{entry.sender}> to "
                  f"{len(to)}: {', '.join(to) or '-'} via {config.quarantine.release_via}")
            continue
        try:
            done = release(store, entry_id, config, who=who, reason=args.reason,
                           force=args.force)
        except QuarantineError as exc:
            print(f"exim-policy: {exc}", file=sys.stderr)
            status = max(status, 2 if isinstance(exc, ReleaseFailed) else 1)
            continue
        line = f"{entry_id}: released to {len(done.sent_to)}: {', '.join(done.sent_to)}"
        if done.refused:
            line += "; refused (still held): " + "; ".join(f"{a}: {d}" for a, d in done.refused)
            status = max(status, 1)
        print(line)
        if args.learn_ham:
            try:
                print(f"{entry_id}: {learn_ham(store, done.entry, config)}")
            except QuarantineError as exc:
                print(f"exim-policy: {exc}", file=sys.stderr)
                status = 2
    return status


def _delete(store, config, args) -> int:
    from ..quarantine.store import QuarantineError

    status = 0
    for entry_id in args.ids:
        try:
            store.delete(entry_id, _who(), args.reason)
        except QuarantineError as exc:
            print(f"exim-policy: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{entry_id}: deleted")
    return status


def _purge(store, config, args) -> int:
    import time

    from ..config import format_duration

    age = args.older_than or config.quarantine.retention
    gone = store.purge(time.time() - age)
    print(f"purged {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} older than "
          f"{format_duration(age)}")
    return 0


def _import(store, config, args) -> int:
    from ..quarantine.importer import import_path

    status = 0
    for path in args.paths:
        try:
            results = import_path(store, path, config)
        except OSError as exc:
            print(f"exim-policy: {path}: {exc.strerror or exc}", file=sys.stderr)
            status = 2
            continue
        if not results:
            print(f"exim-policy: {path}: no messages in it", file=sys.stderr)
            status = max(status, 1)
        for item in results:
            if item.refused:
                print(f"{item.where}: refused: {item.refused}", file=sys.stderr)
                status = max(status, 1)
            elif item.duplicate:
                print(f"{item.where}: already in the quarantine as {item.entry_id}")
            else:
                entry = store.get(item.entry_id)
                print(f"{item.where}: imported as {item.entry_id} (from <{entry.sender}> to "
                      f"{len(entry.recipients)} recipient(s))")
    return status


_COMMANDS = {"list": _list, "show": _show, "release": _release, "delete": _delete,
             "purge": _purge, "import": _import}


# ------------------------------------------------------------------------ output --
def _when(at: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else "-"


def entry_json(entry, audit: bool = False) -> dict:
    ev = entry.evidence
    doc = {
        "id": entry.id, "received": _when(entry.received), "state": entry.state,
        "sender": entry.sender,
        "recipients": [{"address": r.address, "state": r.state,
                        "at": _when(r.at) if r.at else None, "detail": r.detail}
                       for r in entry.recipients],
        "subject": entry.subject, "from": entry.from_header, "message_id": entry.message_id,
        "size": entry.size, "sha256": entry.sha256, "source": entry.source,
        "evidence": {"account": ev.account, "reason": ev.reason, "action": ev.action,
                     "score": ev.score, "symbols": [{"name": n, "score": s}
                                                    for n, s in ev.symbols],
                     "ip": ev.ip, "helo": ev.helo, "queue_id": ev.queue_id, "host": ev.host,
                     "incident": ev.incident, "report": list(ev.report)},
    }
    if audit:
        doc["audit"] = [{"at": _when(a.at), "who": a.who, "action": a.action,
                         "reason": a.reason, "detail": a.detail} for a in entry.audit]
    return doc


def _read_preview(path, head_bytes: int = 512 * 1024, lines: int = 20):
    """The header fields and the first lines of the first text part (of at most the
    first ``head_bytes`` of the file: a preview of a large message stays cheap)."""
    import email
    import email.policy

    from ..protocol.text import printable

    try:
        with open(path, "rb") as fh:
            data = fh.read(head_bytes)
    except FileNotFoundError:
        return [], "(the message file is gone)"
    message = email.message_from_bytes(data, policy=email.policy.default)
    headers = [(name, printable(str(value), limit=500)) for name, value in message.items()]
    part = message.get_body(preferencelist=("plain", "html")) \
        if message.is_multipart() else message
    try:
        text = part.get_content() if part is not None else ""
    except (LookupError, ValueError, AttributeError):
        text = ""
    if not isinstance(text, str):
        text = ""
    shown = [printable(line, limit=200) for line in text.splitlines()[:lines]]
    return headers, "\n".join(shown)


def _print_entry(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    ev = doc["evidence"]
    out = [f"{doc['id']}: {doc['state']}, received {doc['received']} ({doc['source']})",
           f"sender:     <{doc['sender']}>",
           f"recipients: {len(doc['recipients'])}"]
    out += [f"  {r['address']}  {r['state']}"
            + (f" {r['at']} {r['detail']}" if r["at"] else "") for r in doc["recipients"]]
    out += [f"account:    {ev['account'] or '-'}   ip: {ev['ip'] or '-'}   "
            f"helo: {ev['helo'] or '-'}",
            f"queue id:   {ev['queue_id'] or '-'} on {ev['host'] or '-'}   "
            f"incident: {ev['incident'] or '-'}",
            f"verdict:    {ev['action'] or '-'}, score {ev['score']}: {ev['reason'] or '-'}",
            "symbols:    " + (", ".join(f"{s['name']}({s['score']:g})" for s in ev["symbols"])
                              or "-"),
            f"subject:    {doc['subject'] or '-'}",
            f"size:       {doc['size']} bytes, sha256 {doc['sha256'][:16]}..."]
    for line in out:
        console.print(Text(line))
    console.print(Text("headers:", style="bold"))
    for name, value in doc["headers"]:
        console.print(Text(f"  {name}: {value}"))
    console.print(Text("text:", style="bold"))
    for line in (doc["preview"] or "(no text part)").splitlines():
        console.print(Text(f"  {line}"))
    if doc["audit"]:
        table = Table(title="audit", title_justify="left")
        for column in ("at", "who", "action", "reason", "detail"):
            table.add_column(column)
        for a in doc["audit"]:
            table.add_row(*(Text(a[c] or "-") for c in ("at", "who", "action", "reason",
                                                        "detail")))
        console.print(table)


def _who() -> str:
    from .accounts import who_am_i

    return who_am_i()


def _account(name: str | None) -> str | None:
    """The account id as ``list`` shows it, or the name as Exim sends it."""
    if name is None:
        return None
    from ..state.names import RELAY_PREFIXES, USER_PREFIX, user_account

    return name if name.startswith((*RELAY_PREFIXES, USER_PREFIX)) else user_account(name)
