"""``exim-policy accounts list|show|lock|unlock|reset``: the account store, for humans.

Works on the store the daemon uses (``[accounts]`` of the configuration); a running
daemon sees a change within a second. Every change is audited with who (``SUDO_USER``,
else the Unix user), when and why, and a lock or unlock is notified like the daemon's
own transitions. ``show --json`` prints one object: ``account``, ``state`` (ok, throttled,
held, locked), ``counts``, ``spam_verdicts``, ``incidents`` (``id``, ``opened``,
``state``, ``reason``, ``evidence``...), ``audit``, ``recent``, and ``quarantined`` (the
account's messages in the quarantine of ``[quarantine] path``, as ``quarantine list
--json`` gives them) when there is a quarantine.

Exit status: 0 done; 1 nothing to do (unknown account, nothing to unlock); 2 error.
"""
from __future__ import annotations

import argparse
import sys

NAME = "accounts"
HELP = "list, show, lock, unlock or reset the accounts the shim keeps count of"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_CONFIG_PATH

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    sub = parser.add_subparsers(dest="accounts_command", metavar="ACTION")
    sub.required = True
    listing = sub.add_parser("list", parents=[common], help="every account seen lately")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    show = sub.add_parser("show", parents=[common],
                          help="one account: state, counts, incidents, audit trail")
    show.add_argument("account", metavar="USER")
    show.add_argument("--json", action="store_true", help="one JSON object")
    for action, text in (("lock", "lock an account: refused at MAIL/AUTH, mail quarantined"),
                         ("unlock", "end an account's incident, clear its counters"),
                         ("reset", "clear an account's counters (not its hold or lock)")):
        cmd = sub.add_parser(action, parents=[common], help=text, description=text)
        cmd.add_argument("account", metavar="USER")
        cmd.add_argument("--reason", required=action != "reset", default="",
                         help="why (kept in the audit trail and the notice)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..config import load
    from ..state import StoreError

    config = load(args.config)
    try:
        return asyncio.run(_run(args, config))
    except StoreError as exc:
        print(f"exim-policy: {exc}", file=sys.stderr)
        return 2


def who_am_i() -> str:
    import os
    import pwd

    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


async def _run(args: argparse.Namespace, config) -> int:
    import time

    from ..state import open_store

    store = open_store(config.accounts)
    now = time.time()
    try:
        if args.accounts_command == "list":
            return _list(await store.accounts(now), config, args.json)
        account = await _resolve(store, args.account, now)
        if args.accounts_command == "show":
            detail = await store.detail(account, now)
            if detail is None:
                print(f"exim-policy: {account}: no such account in the store", file=sys.stderr)
                return 1
            return _show(detail, config, args.json, _quarantined(config, account))
        return await _change(store, config, args.accounts_command, account, args.reason, now)
    finally:
        await store.close()


async def _resolve(store, name: str, now: float) -> str:
    """The id as ``list`` shows it, or the name as Exim would send it."""
    from ..state.names import RELAY_PREFIXES, USER_PREFIX, user_account

    if name.startswith((*RELAY_PREFIXES, USER_PREFIX)) or await store.detail(name, now):
        return name
    return user_account(name)


async def _change(store, config, action: str, account: str, reason: str, now: float) -> int:
    from ..model import AccountStatus, Transition, TransitionKind
    from ..notify import Notice, deliver_once

    who = who_am_i()
    if action == "reset":
        if not await store.reset(account, who, reason or "reset", now):
            print(f"exim-policy: {account}: no such account in the store", file=sys.stderr)
            return 1
        print(f"{account}: counters cleared")
        return 0
    if action == "lock":
        step = Transition(TransitionKind.LOCKED, AccountStatus.LOCKED,
                          expect=(AccountStatus.OK, AccountStatus.HELD),
                          reason=f"locked by {who}: {reason}", mode="lock", who=who)
    else:
        step = Transition(TransitionKind.UNLOCKED, AccountStatus.OK, expect=(),
                          reason=reason, who=who)
    applied = await store.record(account, None, [step], now)
    if not applied:
        what = "already locked" if action == "lock" else "nothing to unlock (ok, no incident)"
        print(f"exim-policy: {account}: {what}", file=sys.stderr)
        return 1
    incident = applied[0].incident
    print(f"{account}: {action}ed" + (f" (incident {incident.id})" if incident.id else ""))
    for failure in deliver_once(Notice.of(applied[0]), config.accounts.notify):
        print(f"exim-policy: warning: notice not delivered: {failure}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ output --
def _when(at: float | None) -> str | None:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else None


def _state_word(state, config) -> str:
    """ok, throttled, held or locked, as stored (shadow-mode holds included)."""
    from ..model import AccountStatus
    from ..policy import over_limit

    if state.status is AccountStatus.OK and over_limit(state, 1, 1, config):
        return "throttled"
    return state.status.value


def detail_json(detail, config) -> dict:
    from ..config import format_duration

    state = detail.state
    return {
        "account": state.account,
        "state": _state_word(state, config),
        "mode": config.accounts.mode,
        "last_seen": _when(detail.last_seen),
        "counts": {format_duration(c.window): {
            "messages": c.messages, "recipients": c.recipients,
            "unique_recipients": c.unique_recipients} for c in state.windows},
        "spam_verdicts": {format_duration(config.accounts.incident.window): state.spam_verdicts},
        "spam_since_hold": state.spam_since_hold,
        "incidents": [{"id": i.id, "opened": _when(i.opened), "state": i.state,
                       "reason": i.reason, "shadow": i.shadow, "closed": _when(i.closed),
                       "evidence": i.evidence} for i in detail.incidents],
        "audit": [{"at": _when(a.at), "who": a.who, "action": a.action, "reason": a.reason}
                  for a in detail.audit],
        "recent": [{"at": _when(e.at), "queue_id": e.queue_id, "ip": e.ip,
                    "subject": e.subject, "action": e.action, "score": e.score,
                    "symbols": list(e.symbols), "recipients": list(e.recipients)}
                   for e in detail.evidence],
    }


def _list(summaries, config, as_json: bool) -> int:
    import json

    rows = [{"account": s.account, "state": s.status.value, "incident": s.incident,
             "messages": s.messages, "spam_verdicts": s.spam_verdicts,
             "last_seen": _when(s.last_seen)} for s in summaries]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    window = config.accounts.limits[0].window if config.accounts.limits else \
        config.accounts.incident.window
    from ..config import format_duration

    table = Table(title=f"accounts ({len(rows)})", title_justify="left")
    for column in ("account", "state", "incident", f"messages ({format_duration(window)})",
                   "spam verdicts", "last seen"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["account"], row["state"], str(row["incident"] or "-"),
                      str(row["messages"]), str(row["spam_verdicts"]), row["last_seen"] or "-")
    Console().print(table)
    return 0


def _quarantined(config, account: str) -> list | None:
    """The account's messages in the quarantine, newest first; None without one here."""
    from ..quarantine.store import QuarantineError, QuarantineStore

    try:
        store = QuarantineStore(config.quarantine.path, create=False)
    except QuarantineError:
        return None
    try:
        return store.list(account=account)
    finally:
        store.close()


def _show(detail, config, as_json: bool, quarantined: list | None = None) -> int:
    import json

    from .quarantine import entry_json, print_table

    doc = detail_json(detail, config)
    if quarantined is not None:
        doc["quarantined"] = [entry_json(e) for e in quarantined]
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]{doc['account']}[/bold]: {doc['state']} (mode {doc['mode']}), "
                  f"last seen {doc['last_seen'] or '-'}", markup=True)
    counts = ", ".join(f"{w}: {c['messages']} messages, {c['recipients']} recipients, "
                       f"{c['unique_recipients']} unique" for w, c in doc["counts"].items())
    spam = ", ".join(f"{n} within {w}" for w, n in doc["spam_verdicts"].items())
    console.print(f"counts: {counts or '-'}; spam verdicts: {spam}", markup=False)
    for title, rows, columns in (
            ("incidents", doc["incidents"], ("id", "opened", "state", "reason", "closed")),
            ("audit", doc["audit"], ("at", "who", "action", "reason")),
            ("recent spam", doc["recent"], ("at", "queue_id", "ip", "subject", "score"))):
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row[c]) if row[c] is not None else "-" for c in columns))
        console.print(table)
    if quarantined:
        print_table(quarantined, f"quarantined ({len(quarantined)})")
    return 0
