"""The demo's scenarios: what happens to each kind of mail in the whole chain, on loopback.

:class:`Stack` starts, in a work dir, everything the production setup has: an NXDOMAIN-only
DNS responder (so nothing leaves the machine), Rspamd, the shim (``exim-policy serve``, with
accounts and the quarantine receiver), Exim running the bundled exim/exim.conf with the
policy helper, and an SMTP sink standing in for the Internet. :func:`scenarios` lists what
to send through Exim and where each message must end up (a Maildir, the quarantine, the
sink, nowhere); ``exim-policy demo`` runs them in order and prints the table.

The messages are :mod:`.messages`' builders, sent with :mod:`.smtp`, to the addresses of
:mod:`.addresses`; the scenarios run in order and build on each other (the incident ones
on the account state the earlier ones left).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import Lab, messages
from .addresses import (ALIASES, AUTH, EXTERNAL, FORWARD_TARGET, FORWARDER, INBOUND_SENDER,
                        LOCAL, RELAY_HOST, USER_ADDRESS)
from .exim import DEFAULT_USERS, DOMAIN, EximLab, free_port_v4_v6
from .shim import ShimLab
from .smtp import Outcome, data, in_mailbox, in_sink, one_line, send, session, wait_sink

#: the account the incident scenarios compromise, and one that sends too fast
MALLORY = ("mallory", "malpass")
MALLORY_ADDRESS = f"mallory@{DOMAIN}"
WALTER = ("walter", "walterpass")
WALTER_ADDRESS = f"walter@{DOMAIN}"
ABUSE = f"abuse@{DOMAIN}"
#: the demo shim's [accounts]: the store in the work dir, notices to the abuse mailbox
#: through Exim itself; tester's three GTUBE scenarios stay below spam_verdicts
ACCOUNTS_TOML = """
[accounts]
enabled = true
path = "{path}"
[[accounts.limits]]
window = "1m"
messages = 10
[accounts.incident]
spam_verdicts = 4
on_open = "hold"
lock_after = 2
[accounts.notify]
mail_to = ["{abuse}"]
mail_from = "exim-policy@{domain}"
smtp = "127.0.0.1:{port}"
"""
#: the domain of the demo's Message-IDs
MESSAGE_ID_DOMAIN = "demo.example.org"


# ------------------------------------------------------------------- messages --
def _with_id(build: Callable[..., bytes]) -> Callable[..., tuple[str, bytes]]:
    """A builder of :mod:`.messages` that returns (Message-ID, message), the Message-ID
    being what :func:`locate` finds the copies by. To: is the envelope recipient, as Rspamd
    expects (FORGED_RECIPIENTS would otherwise add to the score)."""
    def make(to: str, sender: str = INBOUND_SENDER) -> tuple[str, bytes]:
        message_id = messages.new_message_id(MESSAGE_ID_DOMAIN)
        return message_id, build(to, sender, message_id)
    return make


ham = _with_id(messages.ham)
gtube = _with_id(messages.gtube)
#: the lab's Rspamd scores ``X-Test-Spam: add-header`` 7.0: an "add header" verdict
add_header_spam = _with_id(messages.x_test_spam)


# -------------------------------------------------------------------- the stack --
@dataclass
class Stack:
    """The running components; ``stop()`` stops whatever was started, in reverse order."""

    workdir: Path
    lab: Lab | None = None       # nxdns, rspamd, sink
    shim: ShimLab | None = None
    exim: EximLab | None = None
    errors: list[str] = field(default_factory=list)

    def start(self, say: Callable[[str], None]) -> None:
        say("starting the DNS responder, Rspamd and the SMTP sink")
        self.lab = Lab(self.workdir, sink=True)
        self.lab.start()
        say("starting the shim (exim-policy serve)")
        exim_port = free_port_v4_v6()  # the shim mails its notices through this Exim
        accounts = ACCOUNTS_TOML.format(path=self.workdir / "accounts.db", abuse=ABUSE,
                                        domain=DOMAIN, port=exim_port)
        self.shim = ShimLab(self.workdir, rspamd_url=self.lab.rspamd.url,
                            forwarding=(FORWARDER,), relay_networks=(f"{RELAY_HOST}/128",),
                            extra_toml=accounts, quarantine={"exim_command": [
                                "exim", "-C", str(self.workdir / "exim" / "conf" / "lab.conf")]})
        self.shim.start()
        say("starting Exim with exim/exim.conf")
        # with the policy helper: acl_rcpt.conf keeps local and forwarding recipients in
        # separate transactions, acl_mail.conf and the authenticators refuse locked
        # accounts: the set-up the README recommends
        self.exim = EximLab(self.workdir, spamd_address=self.shim.spamd_address,
                            sink_port=self.lab.sink.port, relay_hosts=f"<; {RELAY_HOST}",
                            aliases=ALIASES, ipv6=True,
                            query_address=self.shim.query_address,
                            local_users=(*DEFAULT_USERS, "abuse"),
                            auth_users=dict([AUTH, MALLORY, WALTER]),
                            receiver_port=self.shim.quarantine_port)
        self.exim.port = exim_port
        self.exim.start()

    def stop(self) -> None:
        for part in (self.exim, self.shim, self.lab):
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # keep stopping the rest
                self.errors.append(f"{type(part).__name__}: {exc}")


@dataclass(frozen=True)
class Result:
    """What a scenario saw: the SMTP reply (for people), its code, and where copies are."""

    reply: str
    code: int
    places: tuple[str, ...]


def _reply(outcome: Outcome) -> str:
    """The reply as the table shows it: the code, the command when it was AUTH or MAIL."""
    command = {"auth": "AUTH: ", "mail": "MAIL: "}.get(outcome.stage, "")
    return f"{outcome.code} {command}{outcome.text}"


def send_like_an_mta(stack: Stack, message: bytes, rcpts: Sequence[str], *,
                     sender: str = INBOUND_SENDER, host: str = "127.0.0.1"
                     ) -> list[tuple[tuple[str, ...], int, str, str | None]]:
    """What a sending MTA does with recipients deferred at RCPT time: deliver to the
    accepted ones, then try the deferred ones again in a new transaction.
    Returns (recipients, code, reply, queue id) per transaction."""
    transactions = []
    pending = list(rcpts)
    while pending:
        accepted, deferred, first_reply = [], [], ""
        with session(host, stack.exim.port) as smtp:
            smtp.mail(sender)
            for rcpt in pending:
                code, text = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    deferred.append(rcpt)
                    first_reply = first_reply or f"RCPT {rcpt}: {code} {one_line(text)}"
            if not accepted:
                transactions.append((tuple(pending), code, first_reply, None))
                break
            done = data(smtp, message)
        reply = f"DATA {done.code} {done.text}"
        transactions.append((tuple(accepted), done.code,
                             f"{first_reply}; {reply}" if first_reply else reply,
                             done.queue_id))
        if done.code // 100 == 5 or not deferred or deferred == pending:
            break  # refused, or nothing left, or no progress
        pending = deferred
    return transactions


def deliver_split(stack: Stack, message: tuple[str, bytes], rcpts: Sequence[str],
                  **kw: Any) -> Result:
    """Like deliver(), for a transaction the RCPT ACL may split: the result's code is the
    last transaction's, the reply lists every transaction."""
    message_id, raw = message
    transactions = send_like_an_mta(stack, raw, rcpts, **kw)
    for _, _, _, queue_id in transactions:
        if queue_id:
            stack.exim.wait_completed(queue_id, timeout=30)
    time.sleep(0.3)
    reply = " | ".join(f"{', '.join(r.split('@')[0] for r in who)}: {text}"
                       for who, _, text, _ in transactions)
    return Result(reply, transactions[-1][1], locate(stack, message_id))


def locate(stack: Stack, message_id: str) -> tuple[str, ...]:
    """Where copies of the message are: mailboxes, the quarantine and the sink (with the
    recipients of each)."""
    places = []
    for user in ("bob", "carol", "abuse"):
        for copy in in_mailbox(stack.exim, user, message_id):
            note = " (X-Spam-Flag)" if copy.get("X-Spam-Flag") else ""
            places.append(f"mailbox {user}{note}")
    from ..quarantine.store import QuarantineStore

    store = QuarantineStore(stack.shim.quarantine_path, create=False)
    try:
        for entry in store.list():
            if entry.message_id.strip("<> ") == message_id:
                places.append("quarantine (for "
                              + " ".join(r.address for r in entry.recipients) + ")")
    finally:
        store.close()
    for msg in in_sink(stack.lab.sink, message_id):
        places.append("sink: " + ", ".join(msg.rcpt_tos))
    return tuple(places)


def deliver(stack: Stack, message: tuple[str, bytes], rcpts: Sequence[str], **kw: Any) -> Result:
    """Send, wait until Exim finished the deliveries, and locate the copies."""
    message_id, raw = message
    outcome = send(stack.exim, raw, rcpts, **kw)
    if outcome.queue_id:
        stack.exim.wait_completed(outcome.queue_id, timeout=30)
    else:
        time.sleep(0.3)  # a (wrong) delivery or bounce would show up by now
    return Result(_reply(outcome), outcome.code, locate(stack, message_id))


# --------------------------------------------------------------------- scenarios --
@dataclass(frozen=True)
class Scenario:
    title: str
    expected: str
    code: int
    #: the exact set of places a copy must be found in (empty: nowhere)
    places: tuple[str, ...]
    action: Callable[[Stack], Result]


def _retry_after(restart: Callable[[Stack], None], message: Callable[[], tuple[str, bytes]],
                 rcpts: Sequence[str], **kw: Any) -> Callable[[Stack], Result]:
    """Send while something is down, restart it, send the same message again (what a
    client does after a 451); the result is the retry's, the first reply is shown too."""
    def action(stack: Stack) -> Result:
        msg = message()
        first = send(stack.exim, msg[1], rcpts, **kw)
        restart(stack)
        again = deliver(stack, msg, rcpts, **kw)
        reply = f"first {first.code}, retry {again.reply}"
        ok_first = first.code == 451
        return Result(reply, again.code if ok_first else first.code, again.places)
    return action


def _down(part: str) -> Callable[[Stack], None]:
    def stop(stack: Stack) -> None:
        (stack.lab.rspamd if part == "rspamd" else stack.shim).stop()
    return stop


def _up(part: str) -> Callable[[Stack], None]:
    def start(stack: Stack) -> None:
        (stack.lab.rspamd if part == "rspamd" else stack.shim).start()
    return start


def _with_down(part: str, inner: Callable[[Stack], Result]) -> Callable[[Stack], Result]:
    def action(stack: Stack) -> Result:
        _down(part)(stack)
        try:
            return inner(stack)
        finally:
            _up(part)(stack)
    return action


def _notices(stack: Stack, wait_for: int, timeout: float = 20.0) -> list[str]:
    """The subjects of the incident notices in the abuse mailbox, once ``wait_for`` are."""
    deadline = time.monotonic() + timeout
    while True:
        subjects = [" ".join(str(m["Subject"]).split())
                    for m in stack.exim.maildir_messages("abuse")]
        if len(subjects) >= wait_for or time.monotonic() >= deadline:
            return subjects
        time.sleep(0.1)


def _compromised(stack: Stack) -> Result:
    """mallory sends GTUBE four times: the fourth spam verdict opens an incident."""
    for _ in range(4):
        result = deliver(stack, gtube(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL],
                         sender=MALLORY_ADDRESS, auth=MALLORY)
    notices = _notices(stack, 1)
    return Result(result.reply, result.code,
                  result.places + tuple(f"notice: {n}" for n in notices))


def _locked(stack: Stack) -> Result:
    """Two more spam verdicts while held (lock_after = 2): locked; a new session is
    refused at AUTH."""
    for _ in range(2):
        deliver(stack, gtube(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL], sender=MALLORY_ADDRESS,
                auth=MALLORY)
    notices = _notices(stack, 2)
    msg = ham(EXTERNAL, MALLORY_ADDRESS)
    outcome = send(stack.exim, msg[1], [EXTERNAL], sender=MALLORY_ADDRESS, auth=MALLORY)
    return Result(_reply(outcome), outcome.code,
                  locate(stack, msg[0]) + (f"notice: {notices[-1]}",) if notices else ())


def _exim_policy(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """``exim-policy COMMAND ARGS... --config <the demo shim's>``, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "exim_policy", *args, "--config",
                           str(stack.shim.config_path)], capture_output=True, text=True,
                          timeout=60)


def _released(stack: Stack) -> Result:
    """Quarantined, then a human releases it (``exim-policy quarantine release``): it goes
    out once, to its original recipients, unscanned; a second release sends nothing."""
    # from the relay host: an account of its own (tester's spam verdicts would add up to
    # the incident a later scenario expects)
    message_id, raw = gtube(EXTERNAL)
    deliver(stack, (message_id, raw), [EXTERNAL], host=RELAY_HOST)
    listed = json.loads(_exim_policy(stack, "quarantine", "list", "--json").stdout or "[]")
    ids = [e["id"] for e in listed if e["message_id"].strip("<> ") == message_id]
    if not ids:
        return Result("not in the quarantine", 0, locate(stack, message_id))
    first = _exim_policy(stack, "quarantine", "release", ids[0], "--reason",
                         "the customer confirmed it")
    second = _exim_policy(stack, "quarantine", "release", ids[0], "--reason", "again")
    try:
        wait_sink(stack.lab.sink, message_id, timeout=15)
    except TimeoutError:
        pass  # not released: locate() shows where it is
    time.sleep(0.3)
    again = "again: sent nothing" if "already released" in second.stderr else \
        f"again: {second.stdout.strip()} {second.stderr.strip()}"
    return Result(f"release: {first.stdout.strip() or first.stderr.strip()}; {again}",
                  250 if first.returncode == 0 else first.returncode,
                  locate(stack, message_id))


def _unlocked(stack: Stack) -> Result:
    """A human ends the incident; mallory's next ham is relayed."""
    done = _exim_policy(stack, "accounts", "unlock", "mallory", "--reason",
                        "password changed")
    if done.returncode != 0:
        return Result(f"accounts unlock failed: {done.stderr.strip()}", 0, ())
    time.sleep(1.1)  # the daemon sees the change within a second
    result = deliver(stack, ham(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL],
                     sender=MALLORY_ADDRESS, auth=MALLORY)
    return Result(f"unlock: {done.stdout.strip()}; {result.reply}", result.code,
                  result.places)


def _too_fast(stack: Stack) -> Result:
    """walter sends 11 messages within the minute; the limit is 10."""
    for _ in range(10):
        deliver(stack, ham(EXTERNAL, WALTER_ADDRESS), [EXTERNAL], sender=WALTER_ADDRESS,
                auth=WALTER)
    return deliver(stack, ham(EXTERNAL, WALTER_ADDRESS), [EXTERNAL], sender=WALTER_ADDRESS,
                   auth=WALTER)


def scenarios() -> list[Scenario]:
    q_ext = f"quarantine (for {EXTERNAL})"
    opened = "notice: [exim-policy] incident 1 opened: account mallory is held"
    return [
        Scenario("inbound ham", "delivered to bob", 250, ("mailbox bob",),
                 lambda s: deliver(s, ham(LOCAL), [LOCAL])),
        Scenario("inbound GTUBE", "550 at DATA, no bounce", 550, (),
                 lambda s: deliver(s, gtube(LOCAL), [LOCAL])),
        Scenario("authenticated GTUBE to an external address", "quarantined, not relayed",
                 250, (q_ext,),
                 lambda s: deliver(s, gtube(EXTERNAL, USER_ADDRESS), [EXTERNAL],
                                   sender=USER_ADDRESS, auth=AUTH)),
        Scenario("quarantined GTUBE released by a human", "sent once, to its recipient",
                 250, (q_ext, f"sink: {EXTERNAL}"), _released),
        Scenario(f"GTUBE from relay host {RELAY_HOST} (unauthenticated)",
                 "outbound: quarantined", 250, (q_ext,),
                 lambda s: deliver(s, gtube(EXTERNAL), [EXTERNAL], host=RELAY_HOST)),
        Scenario("add-header spam to a forwarding address", "550 at DATA, not forwarded",
                 550, (), lambda s: deliver(s, add_header_spam(FORWARDER), [FORWARDER])),
        Scenario("add-header spam to a local mailbox", "delivered with X-Spam headers",
                 250, ("mailbox bob (X-Spam-Flag)",),
                 lambda s: deliver(s, add_header_spam(LOCAL), [LOCAL])),
        Scenario("authenticated ham to an external address", "relayed to the sink", 250,
                 (f"sink: {EXTERNAL}",),
                 lambda s: deliver(s, ham(EXTERNAL, USER_ADDRESS), [EXTERNAL],
                                   sender=USER_ADDRESS, auth=AUTH)),
        Scenario(f"ham to bob + fwd (forwards to {FORWARD_TARGET}), one transaction",
                 "fwd deferred at RCPT (451), sent again: reaches both", 250,
                 ("mailbox bob", f"sink: {FORWARD_TARGET}"),
                 lambda s: deliver_split(s, ham(f"{LOCAL}, {FORWARDER}"), [LOCAL, FORWARDER])),
        Scenario("add-header spam to bob + fwd, one transaction",
                 "bob gets it marked; fwd deferred, then 550: nothing forwarded", 550,
                 ("mailbox bob (X-Spam-Flag)",),
                 lambda s: deliver_split(s, add_header_spam(f"{LOCAL}, {FORWARDER}"),
                                         [LOCAL, FORWARDER])),
        Scenario("Rspamd down: inbound ham", "accepted (inbound fails open)", 250,
                 ("mailbox bob",),
                 _with_down("rspamd", lambda s: deliver(s, ham(LOCAL), [LOCAL]))),
        Scenario("Rspamd down: authenticated GTUBE, then retry with Rspamd back",
                 "451, retry quarantined", 250, (q_ext,),
                 _with_down("rspamd", _retry_after(
                     _up("rspamd"), lambda: gtube(EXTERNAL, USER_ADDRESS), [EXTERNAL],
                     sender=USER_ADDRESS, auth=AUTH))),
        Scenario("shim down: authenticated GTUBE, then retry with the shim back",
                 "451 (never relayed), retry quarantined", 250, (q_ext,),
                 _with_down("shim", _retry_after(
                     _up("shim"), lambda: gtube(EXTERNAL, USER_ADDRESS), [EXTERNAL],
                     sender=USER_ADDRESS, auth=AUTH))),
        Scenario("shim down: inbound ham, then retry with the shim back",
                 "451 (nothing lost), retry delivered", 250, ("mailbox bob",),
                 _with_down("shim", _retry_after(_up("shim"), lambda: ham(LOCAL), [LOCAL]))),
        Scenario("compromised account: mallory sends GTUBE 4 times",
                 "quarantined; the 4th opens an incident: held, one notice to abuse@", 250,
                 (q_ext, opened), _compromised),
        Scenario("held account: mallory sends ham", "quarantined too, not relayed", 250,
                 (q_ext,), lambda s: deliver(s, ham(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL],
                                             sender=MALLORY_ADDRESS, auth=MALLORY)),
        Scenario("2 more GTUBE while held, then a new session",
                 "locked: AUTH refused (535), notice to abuse@", 535,
                 ("notice: [exim-policy] incident 1 locked: account mallory is locked",),
                 _locked),
        Scenario("exim-policy accounts unlock mallory, then ham", "relayed again", 250,
                 (f"sink: {EXTERNAL}",), _unlocked),
        Scenario("walter sends 11 messages within a minute (limit 10)",
                 "the 11th: 451 at MAIL, nothing relayed", 451, (), _too_fast),
    ]
