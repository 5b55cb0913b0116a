"""exim-policy demo: the whole chain on loopback, and what happens to each kind of mail.

Starts, in a fresh temp dir, everything the production setup has: an NXDOMAIN-only DNS
responder (so nothing leaves the machine), Rspamd 3.4, the shim (``exim-policy serve``),
Exim 4.96 running the bundled exim/exim.conf, and an SMTP sink standing in for the
Internet.  Then it sends one message per scenario through Exim with smtplib, looks where
each ended up (a Maildir, the quarantine, the sink, nowhere) and prints a table.

Exit status: 0 if every scenario matched its expectation, 1 if one did not, 2 if the
demo cannot run here (not root, a package missing, a component failed to start), 130 on
Ctrl-C.  Whatever it started is stopped on every path out (normal end, error, Ctrl-C,
SIGTERM).
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import email.utils
import importlib.util
import os
import re
import shutil
import signal
import smtplib
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME = "demo"
HELP = "run Rspamd, the shim, Exim and an SMTP sink on loopback and show the outcomes"
#: set by SIGINT/SIGTERM (see run())
INTERRUPTED = threading.Event()

#: binary -> Debian package that provides it
REQUIRED_BINARIES = {
    "rspamd": "rspamd",
    "exim": "exim4-daemon-heavy",
    "openssl": "openssl",
    "setpriv": "util-linux",
}

DOMAIN = "lab.test"
LOCAL = f"bob@{DOMAIN}"
FORWARDER = f"fwd@{DOMAIN}"
FORWARD_TARGET = "ext-fwd@example.com"
EXTERNAL = "carol@example.com"
USER = ("tester", "testpass")
USER_ADDRESS = f"tester@{DOMAIN}"
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
STRANGER = "alice@example.org"
RELAY_HOST = "::1"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM_TEXT = (
    "Hi,\n\nthanks for the notes from Tuesday's planning meeting. I went through the action "
    "items this morning and I think we are in good shape for the release at the end of next "
    "month. Carol offered to check with the documentation team on Thursday.\n\n"
    "I also updated the budget spreadsheet with the revised travel estimates and moved the "
    "hardware items into a section of their own, so that they are easier to review.\n\n"
    "Best regards,\nAlice\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (configs, logs, Maildirs) after the run")


def missing_prerequisites() -> list[str]:
    """Human-readable problems that stop the demo; empty when it can run."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root: it starts Rspamd and Exim as their service users "
                        f"(try: sudo {sys.executable} -m exim_policy demo)")
    missing = sorted({pkg for binary, pkg in REQUIRED_BINARIES.items()
                      if shutil.which(binary) is None})
    if missing:
        problems.append(f"missing Debian package(s): {' '.join(missing)} (apt-get install "
                        f"{' '.join(missing)} as root, or in a checkout: bash contrib/setup.sh)")
    if importlib.util.find_spec("aiosmtpd") is None:  # the SMTP sink
        problems.append("missing Python package aiosmtpd: pip install -e .")
    from ..lab.errors import LabUnavailable
    from ..lab.exim import find_exim_dir

    try:
        find_exim_dir()  # the demo runs the shipped exim/ configuration
    except LabUnavailable as exc:
        problems.append(str(exc))
    return problems


def run(args: argparse.Namespace) -> int:
    problems = missing_prerequisites()
    if problems:
        for problem in problems:
            print(f"exim-policy demo: {problem}", file=sys.stderr)
        return 2

    # SIGTERM must unwind like Ctrl-C, so that the finally blocks stop the daemons. Both
    # are remembered too: the KeyboardInterrupt can be lost on the way (smtplib's
    # "with" block says QUIT, reads the reply the interrupted DATA left unread and raises
    # that instead), so the scenario loop asks INTERRUPTED as well
    def _interrupt(_signum: int, _frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(keep=args.keep)
    except KeyboardInterrupt:
        print("exim-policy demo: interrupted; everything it started was stopped",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------- messages --
def _message(subject: str, body: str, to: str, sender: str, extra: str = "") -> tuple[str, bytes]:
    """(Message-ID, message).  To: equals the envelope recipient, as Rspamd expects
    (FORGED_RECIPIENTS would otherwise add to the score)."""
    mid = f"{uuid.uuid4().hex}@demo.example.org"
    date = email.utils.formatdate(localtime=False)
    text = (f"Date: {date}\nFrom: {sender}\nTo: {to}\nSubject: {subject}\n"
            f"Message-ID: <{mid}>\n{extra}MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 7bit\n\n"
            f"{body}")
    return mid, text.replace("\n", "\r\n").encode()


def ham(to: str, sender: str = STRANGER) -> tuple[str, bytes]:
    return _message("Notes from the planning meeting", HAM_TEXT, to, sender)


def gtube(to: str, sender: str = STRANGER) -> tuple[str, bytes]:
    return _message("GTUBE test", f"Hello,\n\nspam filter test:\n\n{GTUBE}\n", to, sender)


def add_header_spam(to: str, sender: str = STRANGER) -> tuple[str, bytes]:
    """The lab's Rspamd scores ``X-Test-Spam: add-header`` 7.0: an "add header" verdict."""
    return _message("Header-triggered spam test", HAM_TEXT, to, sender,
                    extra="X-Test-Spam: add-header\n")


# -------------------------------------------------------------------- the stack --
@dataclass
class Stack:
    """The running components; ``stop()`` stops whatever was started, in reverse order."""

    workdir: Path
    lab: Any = None    # exim_policy.lab.Lab: nxdns, rspamd, sink
    shim: Any = None   # exim_policy.lab.shim.ShimLab
    exim: Any = None   # exim_policy.lab.exim.EximLab
    errors: list[str] = field(default_factory=list)

    def start(self, say: Callable[[str], None]) -> None:
        from ..lab import Lab
        from ..lab.exim import DEFAULT_USERS, EximLab
        from ..lab.exim import free_port_v4_v6
        from ..lab.shim import ShimLab

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
                            aliases={"fwd": FORWARD_TARGET}, ipv6=True,
                            query_address=self.shim.query_address,
                            local_users=(*DEFAULT_USERS, "abuse"),
                            auth_users=dict([USER, MALLORY, WALTER]),
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
class Outcome:
    reply: str
    code: int
    places: tuple[str, ...]


def send(stack: Stack, message: bytes, rcpts: Sequence[str], *, sender: str = STRANGER,
         auth: bool | tuple[str, str] = False,
         host: str = "127.0.0.1") -> tuple[int, str, str | None]:
    """One SMTP transaction; returns (code, reply text, Exim queue id if accepted).
    ``auth``: True logs in as tester, a (user, password) pair as that user."""
    with smtplib.SMTP(host, stack.exim.port, local_hostname="client.test",
                      timeout=60) as smtp:
        smtp.ehlo("client.test")
        if auth:
            try:
                smtp.login(*(USER if auth is True else auth))
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, f"AUTH: {one_line(exc.smtp_error.decode())}", None
        code, text = smtp.mail(sender)
        if code != 250:
            return code, f"MAIL: {one_line(text.decode(errors='replace'))}", None
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            if code not in (250, 251):
                return code, text.decode(errors="replace"), None
        return _data(smtp, message)


def _data(smtp: smtplib.SMTP, message: bytes) -> tuple[int, str, str | None]:
    """DATA: (code, reply on one line, Exim queue id if accepted)."""
    try:
        code, text = smtp.data(message)
    except smtplib.SMTPDataError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    reply = one_line(text.decode(errors="replace"))
    found = re.search(r"\bid=(\S+)", reply)
    return code, reply, found.group(1) if found and code == 250 else None


def one_line(text: str) -> str:
    """A multi-line SMTP reply (Exim splits long ACL messages) as one line, without the
    repeated enhanced status codes of the continuation lines."""
    return " ".join(re.sub(r"\n(?:\d\.\d{1,3}\.\d{1,3} )?", " ", text).split())


def send_like_an_mta(stack: Stack, message: bytes, rcpts: Sequence[str],
                     **kw: Any) -> list[tuple[tuple[str, ...], int, str, str | None]]:
    """What a sending MTA does with recipients deferred at RCPT time: deliver to the
    accepted ones, then try the deferred ones again in a new transaction.
    Returns (recipients, code, reply, queue id) per transaction."""
    transactions = []
    pending = list(rcpts)
    while pending:
        accepted, deferred, first_reply = [], [], ""
        with smtplib.SMTP(kw.get("host", "127.0.0.1"), stack.exim.port,
                          local_hostname="client.test", timeout=60) as smtp:
            smtp.ehlo("client.test")
            smtp.mail(kw.get("sender", STRANGER))
            for rcpt in pending:
                code, text = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    deferred.append(rcpt)
                    first_reply = first_reply or f"RCPT {rcpt}: {code} {one_line(text.decode())}"
            if not accepted:
                transactions.append((tuple(pending), code, first_reply, None))
                break
            code, reply, queue_id = _data(smtp, message)
        transactions.append((tuple(accepted), code, (first_reply + "; " if first_reply else "")
                             + f"DATA {code} {reply}", queue_id))
        if code // 100 == 5 or not deferred or deferred == pending:
            break  # refused, or nothing left, or no progress
        pending = deferred
    return transactions


def deliver_split(stack: Stack, message: tuple[str, bytes], rcpts: Sequence[str],
                  **kw: Any) -> Outcome:
    """Like deliver(), for a transaction the RCPT ACL may split: the outcome's code is the
    last transaction's, the reply lists every transaction."""
    message_id, data = message
    transactions = send_like_an_mta(stack, data, rcpts, **kw)
    for _, _, _, queue_id in transactions:
        if queue_id:
            stack.exim.wait_completed(queue_id, timeout=30)
    time.sleep(0.3)
    reply = " | ".join(f"{', '.join(r.split('@')[0] for r in who)}: {text}"
                       for who, _, text, _ in transactions)
    return Outcome(reply, transactions[-1][1], locate(stack, message_id))


def locate(stack: Stack, message_id: str) -> tuple[str, ...]:
    """Where copies of the message are: mailboxes, the quarantine and the sink (with the
    recipients of each)."""
    places = []
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    for user in ("bob", "carol", "abuse"):
        for path in stack.exim.maildir_files(user):
            headers = parser.parsebytes(path.read_bytes())
            if (headers.get("Message-ID") or "").strip("<> ") == message_id:
                note = ""
                if headers.get("X-Spam-Flag"):
                    note = " (X-Spam-Flag)"
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
    for msg in stack.lab.sink.messages:
        if f"<{message_id}>".encode() in msg.data:
            places.append("sink: " + ", ".join(msg.rcpt_tos))
    return tuple(places)


def deliver(stack: Stack, message: tuple[str, bytes], rcpts: Sequence[str], **kw: Any) -> Outcome:
    """Send, wait until Exim finished the deliveries, and locate the copies."""
    message_id, data = message
    code, reply, queue_id = send(stack, data, rcpts, **kw)
    if queue_id:
        stack.exim.wait_completed(queue_id, timeout=30)
    else:
        time.sleep(0.3)  # a (wrong) delivery or bounce would show up by now
    return Outcome(f"{code} {reply}", code, locate(stack, message_id))


# --------------------------------------------------------------------- scenarios --
@dataclass(frozen=True)
class Scenario:
    title: str
    expected: str
    code: int
    #: the exact set of places a copy must be found in (empty: nowhere)
    places: tuple[str, ...]
    action: Callable[[Stack], Outcome]


def _retry_after(restart: Callable[[Stack], None], message: Callable[[], tuple[str, bytes]],
                 rcpts: Sequence[str], **kw: Any) -> Callable[[Stack], Outcome]:
    """Send while something is down, restart it, send the same message again (what a
    client does after a 451); the outcome is the retry's, the first reply is shown too."""
    def action(stack: Stack) -> Outcome:
        msg = message()
        first = send(stack, msg[1], rcpts, **kw)
        restart(stack)
        again = deliver(stack, msg, rcpts, **kw)
        reply = f"first {first[0]}, retry {again.reply}"
        ok_first = first[0] == 451
        return Outcome(reply, again.code if ok_first else first[0], again.places)
    return action


def _down(part: str) -> Callable[[Stack], None]:
    def stop(stack: Stack) -> None:
        (stack.lab.rspamd if part == "rspamd" else stack.shim).stop()
    return stop


def _up(part: str) -> Callable[[Stack], None]:
    def start(stack: Stack) -> None:
        (stack.lab.rspamd if part == "rspamd" else stack.shim).start()
    return start


def _with_down(part: str, inner: Callable[[Stack], Outcome]) -> Callable[[Stack], Outcome]:
    def action(stack: Stack) -> Outcome:
        _down(part)(stack)
        try:
            return inner(stack)
        finally:
            _up(part)(stack)
    return action


def _notices(stack: Stack, wait_for: int, timeout: float = 20.0) -> list[str]:
    """The subjects of the incident notices in the abuse mailbox, once ``wait_for`` are."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    deadline = time.monotonic() + timeout
    while True:
        subjects = [" ".join(str(parser.parsebytes(p.read_bytes())["Subject"]).split())
                    for p in stack.exim.maildir_files("abuse")]
        if len(subjects) >= wait_for or time.monotonic() >= deadline:
            return subjects
        time.sleep(0.1)


def _compromised(stack: Stack) -> Outcome:
    """mallory sends GTUBE four times: the fourth spam verdict opens an incident."""
    for _ in range(4):
        outcome = deliver(stack, gtube(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL],
                          sender=MALLORY_ADDRESS, auth=MALLORY)
    notices = _notices(stack, 1)
    return Outcome(outcome.reply, outcome.code,
                   outcome.places + tuple(f"notice: {n}" for n in notices))


def _locked(stack: Stack) -> Outcome:
    """Two more spam verdicts while held (lock_after = 2): locked; a new session is
    refused at AUTH."""
    for _ in range(2):
        deliver(stack, gtube(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL], sender=MALLORY_ADDRESS,
                auth=MALLORY)
    notices = _notices(stack, 2)
    msg = ham(EXTERNAL, MALLORY_ADDRESS)
    code, reply, _ = send(stack, msg[1], [EXTERNAL], sender=MALLORY_ADDRESS, auth=MALLORY)
    return Outcome(f"{code} {reply}", code,
                   locate(stack, msg[0]) + (f"notice: {notices[-1]}",) if notices else ())


def _released(stack: Stack) -> Outcome:
    """Quarantined, then a human releases it (``exim-policy quarantine release``): it goes
    out once, to its original recipients, unscanned; a second release sends nothing."""
    import json
    import subprocess

    # from the relay host: an account of its own (tester's spam verdicts would add up to
    # the incident a later scenario expects)
    message_id, data = gtube(EXTERNAL)
    deliver(stack, (message_id, data), [EXTERNAL], host=RELAY_HOST)

    def quarantine(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exim_policy", "quarantine", args[0],
                               "--config", str(stack.shim.config_path), *args[1:]],
                              capture_output=True, text=True, timeout=60)

    listed = json.loads(quarantine("list", "--json").stdout or "[]")
    ids = [e["id"] for e in listed if e["message_id"].strip("<> ") == message_id]
    if not ids:
        return Outcome("not in the quarantine", 0, locate(stack, message_id))
    first = quarantine("release", ids[0], "--reason", "the customer confirmed it")
    second = quarantine("release", ids[0], "--reason", "again")
    deadline = time.monotonic() + 15
    while not any(f"<{message_id}>".encode() in m.data for m in stack.lab.sink.messages) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    again = "again: sent nothing" if "already released" in second.stderr else \
        f"again: {second.stdout.strip()} {second.stderr.strip()}"
    return Outcome(f"release: {first.stdout.strip() or first.stderr.strip()}; {again}",
                   250 if first.returncode == 0 else first.returncode,
                   locate(stack, message_id))


def _unlocked(stack: Stack) -> Outcome:
    """A human ends the incident; mallory's next ham is relayed."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "exim_policy", "accounts", "unlock",
                           "mallory", "--reason", "password changed", "--config",
                           str(stack.shim.config_path)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        return Outcome(f"accounts unlock failed: {done.stderr.strip()}", 0, ())
    time.sleep(1.1)  # the daemon sees the change within a second
    outcome = deliver(stack, ham(EXTERNAL, MALLORY_ADDRESS), [EXTERNAL],
                      sender=MALLORY_ADDRESS, auth=MALLORY)
    return Outcome(f"unlock: {done.stdout.strip()}; {outcome.reply}", outcome.code,
                   outcome.places)


def _too_fast(stack: Stack) -> Outcome:
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
                                   sender=USER_ADDRESS, auth=True)),
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
                                   sender=USER_ADDRESS, auth=True)),
        Scenario("ham to bob + fwd (forwards to ext-fwd@example.com), one transaction",
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
                     sender=USER_ADDRESS, auth=True))),
        Scenario("shim down: authenticated GTUBE, then retry with the shim back",
                 "451 (never relayed), retry quarantined", 250, (q_ext,),
                 _with_down("shim", _retry_after(
                     _up("shim"), lambda: gtube(EXTERNAL, USER_ADDRESS), [EXTERNAL],
                     sender=USER_ADDRESS, auth=True))),
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


# ------------------------------------------------------------------------- main --
def _main(keep: bool) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..lab import LabError, LabUnavailable

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="exim-policy-demo-"))
    workdir.chmod(0o755)  # the service users (_rspamd, Debian-exim) must get in
    stack = Stack(workdir)
    results: list[tuple[Scenario, Outcome | None, bool, str]] = []
    try:
        with console.status("starting") as status:
            try:
                stack.start(lambda text: status.update(text))
            except (LabUnavailable, LabError, RuntimeError) as exc:
                console.print(f"[red]exim-policy demo: a component did not start:[/] {exc}")
                return 2
            exim = stack.exim
            console.print(f"Rspamd {stack.lab.rspamd.url} | shim 127.0.0.1:{stack.shim.port} "
                          f"| Exim 127.0.0.1 + [::1]:{exim.port} | sink 127.0.0.1:"
                          f"{stack.lab.sink.port} | work dir {workdir}")
            for number, scenario in enumerate(scenarios(), 1):
                status.update(f"scenario {number}: {scenario.title}")
                try:
                    outcome = scenario.action(stack)
                except (OSError, smtplib.SMTPException, TimeoutError, LabError,
                        RuntimeError) as exc:
                    if INTERRUPTED.is_set():  # the interrupt, hidden by another exception
                        raise KeyboardInterrupt from exc
                    results.append((scenario, None, False, f"error: {exc}"))
                    continue
                ok = outcome.code == scenario.code and (
                    sorted(outcome.places) == sorted(scenario.places))
                results.append((scenario, outcome, ok, ""))
    finally:
        stack.stop()
        if keep:
            console.print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title="exim-policy demo: Exim 4.96 -> shim -> Rspamd 3.4, on loopback",
                  show_lines=True)
    for column in ("#", "scenario", "expected", "SMTP reply", "ended up in", "result"):
        table.add_column(column, overflow="fold")
    for number, (scenario, outcome, ok, error) in enumerate(results, 1):
        table.add_row(str(number), escape(scenario.title), escape(scenario.expected),
                      escape(outcome.reply if outcome else error),
                      escape("\n".join(outcome.places)) if outcome and outcome.places
                      else "nowhere",
                      "[green]PASS[/]" if ok else "[red]FAIL[/]")
    console.print(table)
    for error in stack.errors:
        console.print(f"[yellow]while stopping: {error}[/]")
    passed = sum(1 for _, _, ok, _ in results if ok)
    console.print(f"{passed} of {len(results)} scenarios as expected")
    return 0 if passed == len(results) == len(scenarios()) else 1
