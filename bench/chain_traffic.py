"""The chain bench's traffic: the message plan, and SMTP clients that record every reply.

A plan is a list of :class:`Planned` messages (a scenario, its envelope, its body kind),
drawn with a seed from :data:`SCENARIOS` by weight. Each message carries a unique
Message-ID (``chain-RUN-N@bench.example.org``), by which the accounting finds its copies.

:class:`Clients` runs N threads, each one SMTP client (one connection per message, as an
MTA delivering to us would). What a client does with the replies is what a sending MTA
does:
- RCPT 451 4.5.3 (acl_rcpt.conf's split: "send this recipient separately"): the accepted
  recipients go on to DATA, the deferred ones follow in a new transaction on the same
  connection right after;
- any other 4xx, or a lost connection: the recipients not yet settled are tried again
  later (back-off ``retry_base`` doubling to ``retry_max`` seconds, ``max_attempts`` in
  all); each such message counts as "deferred (4xx), delivered on retry" when it ends
  accepted;
- 5xx: refused; recorded, never retried.
Every transaction is kept (:class:`Txn`: its recipients, stage, code, text, queue id,
times), the accounting compares them with what arrived.
"""
from __future__ import annotations

import heapq
import random
import re
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from exim_policy.lab import messages
from exim_policy.lab.addresses import FORWARDER, RELAY_HOST

from chain_stack import GOOD_USERS, SPAM_USERS

LOCAL_DOMAIN = "lab.test"
MID_DOMAIN = "bench.example.org"
#: acl_rcpt.conf's "different spam policy" deferral: a split, not a failure
SPLIT = re.compile(r"^4\.5\.3 |send this recipient separately")


@dataclass(frozen=True)
class Scenario:
    name: str
    weight: int
    #: "in" (127.0.0.1, no AUTH), "auth" (127.0.0.1, AUTH), "relay" (::1, no AUTH)
    source: str
    #: "ham", "gtube" (Rspamd: reject) or "flag" (X-Test-Spam: add header)
    body: str
    #: recipient choices: each entry is a tuple of alternatives, one is drawn per slot
    rcpts: tuple[tuple[str, ...], ...]
    #: how the sender is chosen ("inbound", "good", "spammer", "web", "webspam")
    sender: str


_LOCAL = ("bob@lab.test", "carol@lab.test", "dave@lab.test")
_EXT = ("carol@example.com", "dave@example.net", "erin@example.org", "frank@example.com")

#: the mix (weights are per cent of the messages)
SCENARIOS = (
    Scenario("in-ham", 22, "in", "ham", (_LOCAL,), "inbound"),
    Scenario("in-ham-multi", 8, "in", "ham", (("bob@lab.test",), ("carol@lab.test",),
                                             ("dave@lab.test",)), "inbound"),
    Scenario("in-spam", 10, "in", "gtube", (_LOCAL,), "inbound"),
    Scenario("in-flagged", 5, "in", "flag", (_LOCAL,), "inbound"),
    Scenario("in-fwd-ham", 5, "in", "ham", ((FORWARDER,),), "inbound"),
    Scenario("in-fwd-spam", 3, "in", "flag", ((FORWARDER,),), "inbound"),
    Scenario("in-mixed-ham", 6, "in", "ham", (("bob@lab.test",), (FORWARDER,),
                                             ("carol@lab.test",)), "inbound"),
    Scenario("in-mixed-spam", 3, "in", "flag", (("bob@lab.test",), (FORWARDER,)), "inbound"),
    Scenario("out-ham", 12, "auth", "ham", (_EXT, _EXT), "good"),
    Scenario("out-ham-mixed", 4, "auth", "ham", (_EXT, ("bob@lab.test",), (FORWARDER,)),
             "good"),
    Scenario("out-spam", 10, "auth", "gtube", (_EXT, _EXT, ("carol@lab.test",)), "spammer"),
    Scenario("relay-ham", 8, "relay", "ham", (_EXT,), "web"),
    Scenario("relay-spam", 4, "relay", "gtube", (_EXT, _EXT), "webspam"),
)
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class Planned:
    n: int
    scenario: str
    rcpts: tuple[str, ...]
    sender: str
    #: (user, password) for AUTH, or None
    auth: tuple[str, str] | None
    mid: str

    @property
    def spec(self) -> Scenario:
        return BY_NAME[self.scenario]

    @property
    def host(self) -> str:
        """Where the client connects, which is also its source address."""
        return RELAY_HOST if self.spec.source == "relay" else "127.0.0.1"

    @property
    def outbound(self) -> bool:
        return self.spec.source in ("auth", "relay")

    def build(self) -> bytes:
        build = {"ham": messages.ham, "gtube": messages.gtube,
                 "flag": messages.x_test_spam}[self.spec.body]
        return build(to=self.rcpts[0], from_addr=self.sender, message_id=self.mid)


def make_plan(count: int, run_id: str, seed: int = 1) -> list[Planned]:
    rng = random.Random(seed)
    weights = [s.weight for s in SCENARIOS]
    plan = []
    for n in range(count):
        spec = rng.choices(SCENARIOS, weights)[0]
        rcpts: list[str] = []
        for slot in spec.rcpts:
            choice = rng.choice(slot)
            if choice not in rcpts:  # two draws from one list may coincide
                rcpts.append(choice)
        sender, auth = _sender(spec.sender, rng)
        plan.append(Planned(n, spec.name, tuple(rcpts), sender, auth,
                            f"chain-{run_id}-{n:07d}@{MID_DOMAIN}"))
    return plan


def _sender(kind: str, rng: random.Random) -> tuple[str, tuple[str, str] | None]:
    if kind == "good":
        user = rng.choice(sorted(GOOD_USERS))
        return f"{user}@{LOCAL_DOMAIN}", (user, GOOD_USERS[user])
    if kind == "spammer":
        user = rng.choice(sorted(SPAM_USERS))
        return f"{user}@{LOCAL_DOMAIN}", (user, SPAM_USERS[user])
    if kind == "web":
        return f"web{rng.randrange(3)}@{LOCAL_DOMAIN}", None
    if kind == "webspam":
        return f"webspam@{LOCAL_DOMAIN}", None
    return f"sender{rng.randrange(50)}@example.org", None


def direction(planned: Planned, rcpts: tuple[str, ...]) -> str:
    """How the shim classifies a transaction: outbound, forwarding (inbound with a
    recipient that forwards externally) or inbound."""
    if planned.outbound:
        return "out"
    return "fwd" if FORWARDER in rcpts else "in"


# ------------------------------------------------------------------ what happened --
@dataclass
class Txn:
    """One transaction (or the part of one that got a reply)."""

    n: int
    attempt: int
    rcpts: tuple[str, ...]
    #: "connect", "auth", "mail", "rcpt", "data"
    stage: str
    code: int
    text: str
    start: float
    end: float
    queue_id: str | None = None
    #: the connection was lost after the message was sent, before its reply
    ambiguous: bool = False

    @property
    def accepted(self) -> bool:
        return self.stage == "data" and self.code == 250

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500 or self.code == 0

    @property
    def split(self) -> bool:
        return self.stage == "rcpt" and self.code == 451 and bool(SPLIT.search(self.text))


@dataclass
class MessageLog:
    planned: Planned
    txns: list[Txn] = field(default_factory=list)
    #: recipients still to be settled (accepted or refused)
    pending: tuple[str, ...] = ()
    attempts: int = 0
    gave_up: bool = False
    done_at: float = 0.0


@dataclass(order=True)
class _Job:
    due: float
    n: int = field(compare=False)


class Clients:
    """``threads`` SMTP clients working through a plan; see the module docstring."""

    def __init__(self, plan: list[Planned], port: int, *, threads: int = 64,
                 rate: float = 0.0, retry_base: float = 1.0, retry_max: float = 8.0,
                 max_attempts: int = 60, timeout: float = 90.0) -> None:
        self.port = port
        self.logs = [MessageLog(p, pending=p.rcpts) for p in plan]
        self.threads = threads
        self.rate = rate
        self.retry_base, self.retry_max = retry_base, retry_max
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._released = 0  # messages handed to the clients so far (pacing)
        self._open = len(plan)  # messages not yet settled
        self._workers: list[threading.Thread] = []
        self._stop = False
        self.started = 0.0
        self.finished = 0.0
        #: transactions in completion order (for the samplers: latency per interval)
        self.completed: list[Txn] = []

    # -------------------------------------------------------------------- control --
    def start(self) -> None:
        self.started = time.time()
        if not self.rate:
            self._release(len(self.logs))
        else:
            threading.Thread(target=self._pace, name="pacer", daemon=True).start()
        for i in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"client-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def released(self) -> int:
        return self._released

    def settled(self) -> int:
        return len(self.logs) - self._open

    def wait(self, timeout: float | None = None) -> bool:
        """True once every message is settled (accepted, refused or given up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._open:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(self.timeout + 10)
        self.finished = self.finished or time.time()

    def _release(self, upto: int) -> None:
        with self._cond:
            now = time.monotonic()
            while self._released < upto:
                heapq.heappush(self._heap, _Job(now, self._released))
                self._released += 1
            self._cond.notify_all()

    def _pace(self) -> None:
        """Hand out messages at ``rate`` per second (the soak's steady load)."""
        begun = time.monotonic()
        while self._released < len(self.logs) and not self._stop:
            due = int((time.monotonic() - begun) * self.rate) + 1
            self._release(min(due, len(self.logs)))
            time.sleep(0.05)

    def _next(self) -> int | None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                if self._heap and self._heap[0].due <= now:
                    return heapq.heappop(self._heap).n
                wait = self._heap[0].due - now if self._heap else 1.0
                self._cond.wait(min(wait, 1.0))
            return None

    # --------------------------------------------------------------------- clients --
    def _work(self) -> None:
        while (n := self._next()) is not None:
            log = self.logs[n]
            log.attempts += 1
            txns = deliver(log.planned, log.pending, self.port, log.attempts, self.timeout)
            self._settle(log, txns)

    def _settle(self, log: MessageLog, txns: list[Txn]) -> None:
        settled = {r for t in txns if not t.temporary or t.accepted for r in t.rcpts}
        with self._cond:
            log.txns.extend(txns)
            self.completed.extend(txns)
            log.pending = tuple(r for r in log.pending if r not in settled)
            if not log.pending or log.attempts >= self.max_attempts:
                log.gave_up = bool(log.pending)
                log.done_at = time.time()
                self._open -= 1
                if not self._open:
                    self.finished = time.time()
                self._cond.notify_all()
                return
            delay = min(self.retry_max, self.retry_base * 2 ** (log.attempts - 1))
            heapq.heappush(self._heap, _Job(time.monotonic() + delay, log.planned.n))
            self._cond.notify_all()


def deliver(planned: Planned, rcpts: tuple[str, ...], port: int, attempt: int,
            timeout: float) -> list[Txn]:
    """One SMTP connection: AUTH if the message's client logs in, then transactions until
    every recipient got an answer (RCPT splits followed at once); never raises."""
    session = _Session(planned, attempt)
    try:
        session.run(rcpts, port, timeout)
    except (OSError, smtplib.SMTPException) as exc:
        session.lost(rcpts, exc)
    return session.txns


class _Session:
    def __init__(self, planned: Planned, attempt: int) -> None:
        self.planned = planned
        self.attempt = attempt
        self.txns: list[Txn] = []
        self.start = time.time()
        self.data_sent = False
        self.unsettled: tuple[str, ...] = ()

    def add(self, rcpts, stage: str, code: int, text: bytes | str, queue_id=None,
            ambiguous=False) -> None:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        # every transaction of a connection starts with it: the latency a client sees
        self.txns.append(Txn(self.planned.n, self.attempt, tuple(rcpts), stage, code,
                             " ".join(text.split()), self.start, time.time(), queue_id,
                             ambiguous))

    def run(self, rcpts: tuple[str, ...], port: int, timeout: float) -> None:
        self.unsettled = rcpts
        try:
            smtp = smtplib.SMTP(self.planned.host, port, local_hostname="client.test",
                                timeout=timeout)
        except smtplib.SMTPConnectError as exc:
            self.add(rcpts, "connect", exc.smtp_code, exc.smtp_error)
            self.unsettled = ()
            return
        try:
            smtp.ehlo("client.test")
            if self.planned.auth is not None:
                try:
                    smtp.login(*self.planned.auth)
                except smtplib.SMTPAuthenticationError as exc:
                    self.add(rcpts, "auth", exc.smtp_code, exc.smtp_error)
                    self.unsettled = ()
                    return
            pending = rcpts
            while pending:
                pending = self.transaction(smtp, pending)
            self.unsettled = ()
            # QUIT without waiting for the 221, as Postfix does (smtp_skip_quit_response):
            # Exim 4.96 holds its 221 about 200 ms, hoping the client closes first
            smtp.send("QUIT\r\n")
        finally:
            smtp.close()

    def transaction(self, smtp: smtplib.SMTP, rcpts: tuple[str, ...]) -> tuple[str, ...]:
        """One MAIL..DATA; returns the recipients split off for the next transaction."""
        self.unsettled = rcpts
        code, text = smtp.mail(self.planned.sender)
        if code != 250:
            self.add(rcpts, "mail", code, text)
            self.unsettled = ()
            return ()
        accepted, split = [], []
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            if code in (250, 251):
                accepted.append(rcpt)
                continue
            self.add((rcpt,), "rcpt", code, text)
            if self.txns[-1].split:
                split.append(rcpt)
        if not accepted:
            smtp.rset()
            self.unsettled = ()  # the splits (if any) got their replies: counted as 4xx
            return ()
        self.unsettled = tuple(accepted)
        self.data_sent = True
        try:
            code, text = smtp.data(self.planned.build())
        except smtplib.SMTPDataError as exc:
            code, text = exc.smtp_code, exc.smtp_error
        self.data_sent = False
        reply = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        found = re.search(r"\bid=(\S+)", reply)
        self.add(accepted, "data", code, reply, found.group(1) if found and code == 250
                 else None)
        self.unsettled = tuple(split)
        if code // 100 == 4:
            # the rest of the message waits with the deferred part: a split recipient is
            # "send separately", and "later" is when the others go again
            return ()
        return tuple(split)

    def lost(self, rcpts: tuple[str, ...], exc: BaseException) -> None:
        """The connection failed: what had no reply yet is tried again."""
        if self.unsettled:
            self.add(self.unsettled, "connect" if not self.txns else "lost", 0,
                     f"{type(exc).__name__}: {exc}", ambiguous=self.data_sent)


def smtp_alive(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


Sampler = Callable[[], dict[str, float]]
