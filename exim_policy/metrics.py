"""Prometheus metrics: their definitions, the counting per message, and ``GET /metrics``.

Three kinds of source (every metric, its labels and meaning: docs/metrics.md):

- Each message, counted once by the service after the decision (:meth:`Metrics.message`):
  one counter, two histograms, and for a failure or an account one more counter. The
  children of labelled metrics are made once and kept (:class:`_Children`):
  prometheus_client's ``labels()`` costs several times the ``inc()`` it leads to.
- Rare events, counted where they happen (refusals, protocol errors, waits for a limit,
  forwarding map reload failures, incident transitions, notices, quarantine deliveries):
  the component holds this object as its ``metrics`` attribute, set by
  :meth:`Metrics.instrument`, None while metrics are off (nothing is counted then).
- State, read when scraped (:class:`_State`): open connections, requests, scans and bytes
  in flight, the forwarding map's size and load time, quarantine entries by state.
  Nothing of it costs anything per message.

Plus prometheus_client's process (CPU, memory, descriptors, start time), platform and GC
collectors. Each :class:`Metrics` has a registry of its own, never the library's global
one: one per daemon, and tests make as many as they like. It outlives everything it
counts for (a component made anew gets the same object), so counters never go back.

Every label has a small fixed set of values; a value outside it is counted as ``other``
(an Rspamd action name a site made up, say), so no input can make new series.

With ``server.workers`` > 1 (``Metrics(shared_dir=...)``, one per worker process), the
values are kept in prometheus_client's multi-process mode: each worker writes its own
into files in the directory the supervisor made, and a scrape of any worker reads every
worker's files (``MultiProcessCollector``): counters and histograms are summed over the
workers, including those that have ended, so they never go back when a worker is
restarted. The state gauges are written by each worker once a second (and by the one
scraped just before it answers) and combined over the live workers (:data:`STATE_GAUGES`);
the ``process_*`` series are the supervisor's and its workers' together
(:class:`_Processes`); the ``python_gc_*`` series are left out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, generate_latest, values)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__
from .model import (ADD_HEADER, GREYLIST, NO_ACTION, REJECT, REWRITE_SUBJECT, SOFT_REJECT,
                    AccountStatus, Request, Traffic)
from .notify import Notifier
from .protocol.checkv2 import Reply
from .scanner import BAD_REPLY, CONNECT, HTTP_STATUS, OTHER, RSPAMD_ERROR, TIMEOUT
from .transport.http import HttpServer
from .transport.limits import Limits

if TYPE_CHECKING:
    from .config import Config
    from .forwarding.watch import MapWatcher
    from .quarantine.receiver import QuarantineReceiver
    from .pipeline import Evaluation, PolicyService
    from .state.tracker import AccountTracker
    from .transport.listeners import StreamServer

log = logging.getLogger(__name__)

#: the text format 0.0.4 (what the names and labels here need; the library's "latest"
#: is 1.0.0 from version 0.22 on, the same text for such names)
CONTENT_TYPE = getattr(prometheus_client.exposition, "CONTENT_TYPE_PLAIN_0_0_4",
                       prometheus_client.CONTENT_TYPE_LATEST)

# ------------------------------------------------------------------- label values --
PROTOCOLS = ("spamc", "rspamc", "http")
TRAFFIC = tuple(t.value for t in Traffic)
#: Rspamd's actions (3.4), and the two of its custom ones that sites commonly add
ACTIONS = (NO_ACTION, GREYLIST, ADD_HEADER, REWRITE_SUBJECT, SOFT_REJECT, REJECT, "discard",
           "quarantine")
#: rspamd_action of a message Rspamd gave no verdict for / was not asked about
FAILED, SKIPPED = "FAILED", "SKIPPED"
#: action of a message answered with no answer (failure.* = "defer")
DEFER = "defer"
NO_SLOT = "no_slot"
FAILURE_KINDS = (TIMEOUT, CONNECT, HTTP_STATUS, RSPAMD_ERROR, BAD_REPLY, NO_SLOT, OTHER)
LISTENERS = ("spamd", "http", "metrics")
REFUSALS = ("allowed_clients", "max_connections")
LIMITS = ("max_scans", "max_bytes_in_flight")
MAP_FAILURES = ("missing", "unreadable")
#: (transition, the incident's state after it): what the daemon's records can make
INCIDENT_STEPS = (("opened", "notify"), ("opened", "held"), ("opened", "locked"),
                  ("locked", "locked"), ("unlocked", "closed"))
ACCOUNT_STATUSES = tuple(s.value for s in AccountStatus)
CHANNELS = ("mail", "webhook")
NOTICE_RESULTS = ("sent", "retried", "failed")
QUARANTINE_RESULTS = ("held", "merged", "refused")

#: Rspamd's task timeout is 8 s: the library's default buckets cover it to 10 s
DURATION_BUCKETS = Histogram.DEFAULT_BUCKETS
#: quarantine counts are read (an SQL count on the store's thread) at most this often
QUARANTINE_EVERY = 5.0
#: longest wait for them in a scrape; after it the last counts are served
QUARANTINE_TIMEOUT = 2.0
#: children kept per labelled metric (the label sets are bounded; this bounds the cache)
MAX_CHILDREN = 4096

#: the gauges that mirror state: name -> (help, how the workers' values combine with
#: ``server.workers`` > 1: prometheus_client's multiprocess_mode over the live workers)
STATE_GAUGES = {
    "exim_policy_connections_open": (
        "Open client connections (spamd and HTTP listeners; server.max_connections)",
        "livesum"),
    "exim_policy_requests_in_flight": ("Complete requests being answered", "livesum"),
    "exim_policy_bytes_in_flight": (
        "Request body bytes held (server.max_bytes_in_flight)", "livesum"),
    "exim_policy_scans_in_flight": ("Rspamd scans under way (server.max_scans)", "livesum"),
    "exim_policy_forwarding_map_entries": (
        "Addresses and @domains in the forwarding map in use", "livemax"),
    "exim_policy_forwarding_map_loaded_timestamp_seconds": (
        "When the forwarding map in use was read (Unix time; 0: none yet)", "livemin"),
}
QUARANTINE_GAUGE = "exim_policy_quarantine_messages"
QUARANTINE_HELP = "Quarantine entries by state"
#: seconds between a worker's writes of its state gauges (server.workers > 1)
PUBLISH_EVERY = 1.0
#: the supervisor's file in the shared directory: its pid, its workers' pids and the CPU
#: seconds of the workers that have ended (for the process_* series)
PROCESSES_FILE = "processes.json"


def _one_of(value: object, allowed: tuple[str, ...]) -> str:
    value = getattr(value, "value", value)  # an enum (Traffic, AccountStatus)
    return value if value in allowed else OTHER  # type: ignore[return-value]


class _Children(dict):
    """Label values -> the metric's child, made on first use (``labels()`` is costly).

    Keys are the values as the caller has them (a Traffic member, an action name);
    ``clean`` turns them into the label values, mapping the unknown to ``other``."""

    __slots__ = ("metric", "clean")

    def __init__(self, metric, clean: Callable[[tuple], tuple] | None = None,
                 known: Iterable = ()) -> None:
        super().__init__()
        self.metric = metric
        self.clean = clean
        for key in known:  # series that exist from the start, at 0
            self[key]  # noqa: B018 - made by __missing__

    def __missing__(self, key):
        values = key if isinstance(key, tuple) else (key,)
        child = self.metric.labels(*(self.clean(values) if self.clean else values))
        if len(self) < MAX_CHILDREN:
            self[key] = child
        return child


def _message_labels(values: tuple) -> tuple:
    protocol, traffic, rspamd, action = values
    return (_one_of(protocol, PROTOCOLS), _one_of(traffic, TRAFFIC),
            _one_of(rspamd, ACTIONS + (FAILED, SKIPPED)), _one_of(action, ACTIONS + (DEFER,)))


def share_values(directory: str) -> None:
    """Switch this process's prometheus_client values to its multi-process mode, kept in
    files of this process's in ``directory`` (process-wide: for a worker process, before
    its first metric is made)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


class Metrics:
    """One daemon's metrics (see the module's doc); ``shared_dir``: one worker's, counted
    with the other workers' in that directory. Every worker reloads the configuration and
    re-reads the forwarding map: only the ``primary`` one (worker 1) counts that, so a
    SIGHUP is one reload in the metrics, as with one process."""

    def __init__(self, shared_dir: str | None = None, *, primary: bool = True) -> None:
        # the *_created series (a second series per counter) mean nothing to a scraper here
        disable_created = getattr(prometheus_client, "disable_created_metrics", None)
        if disable_created is not None:
            disable_created()
        self.shared_dir = shared_dir
        self.primary = primary
        self.registry = CollectorRegistry(auto_describe=False)
        if shared_dir is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
            registry: CollectorRegistry | None = self.registry
        else:
            share_values(shared_dir)
            MultiProcessCollector(self.registry, path=shared_dir)
            PlatformCollector(registry=self.registry)
            self.registry.register(_Processes(shared_dir))
            registry = None  # the values go to the files, which the collector reads
        Gauge("exim_policy_build_info", "The running exim-policy; always 1", ("version",),
              registry=registry, multiprocess_mode="max").labels(__version__).set(1)

        def counter(name, doc, labels, known=(), clean=None):
            metric = Counter(name, doc, labels, registry=registry)
            return _Children(metric, clean or (lambda v: tuple(map(str, v))), known)

        self._messages = counter(
            "exim_policy_messages", "Messages answered, by protocol, traffic class, "
            "Rspamd's action (FAILED, SKIPPED: none) and the action answered (defer: none)",
            ("protocol", "traffic", "rspamd_action", "action"), clean=_message_labels)
        self._answer = Histogram(
            "exim_policy_answer_duration_seconds", "From the complete request to the "
            "decision (account store, scan slot, Rspamd, policy): the log's ms=",
            buckets=DURATION_BUCKETS, registry=registry)
        self._scan = Histogram(
            "exim_policy_scan_duration_seconds", "Rspamd's answer time per scan (failed "
            "ones too; not the wait for a scan slot)", buckets=DURATION_BUCKETS,
            registry=registry)
        self._failures = counter(
            "exim_policy_scanner_failures", "Messages Rspamd gave no verdict for, by kind",
            ("kind",), FAILURE_KINDS, lambda v: (_one_of(v[0], FAILURE_KINDS),))
        self._account_messages = counter(
            "exim_policy_account_messages", "Outbound messages of accounts, by the status "
            "they were answered for (shadow mode: would have been)", ("status",),
            ACCOUNT_STATUSES, lambda v: (_one_of(v[0], ACCOUNT_STATUSES),))
        self._incidents = counter(
            "exim_policy_incidents", "Incident transitions this daemon's records made, by "
            "transition and the incident's state after it", ("transition", "state", "shadow"),
            [(t, s, shadow) for t, s in INCIDENT_STEPS for shadow in (False, True)],
            lambda v: (str(v[0]), str(v[1]), "true" if v[2] else "false"))
        self._store_errors = Counter(
            "exim_policy_account_store_errors", "Account store calls that failed "
            "(failure.accounts applied)", registry=registry)
        self._refused = counter(
            "exim_policy_connections_refused", "Connections closed unread: a client not in "
            "allowed_clients, or server.max_connections with every connection past reading",
            ("listener", "reason"), [(n, r) for n in LISTENERS for r in REFUSALS])
        self._shed = counter(
            "exim_policy_connections_shed", "Connections closed while sending (or idle) to "
            "make room (server.max_connections)", ("listener",), LISTENERS)
        self._protocol_errors = counter(
            "exim_policy_protocol_errors", "Requests answered with a protocol error "
            "(malformed, too large, timed out)", ("listener",), LISTENERS)
        self._handler_errors = counter(
            "exim_policy_handler_errors", "Requests the handler failed on (a bug: see the "
            "log)", ("listener",), LISTENERS)
        self._waits = counter(
            "exim_policy_limit_waits", "Requests that waited for a limit: a scan slot "
            "(max_scans) or body bytes (max_bytes_in_flight)", ("limit",), LIMITS)
        self._timeouts = counter(
            "exim_policy_limit_timeouts", "Waits for a limit that ended after "
            "server.queue_timeout (the [failure] outcome, or a temporary error)",
            ("limit",), LIMITS)
        self._map_failures = counter(
            "exim_policy_forwarding_map_reload_failures", "Forwarding map reloads that kept "
            "the map loaded before", ("reason",), MAP_FAILURES)
        self._notifications = counter(
            "exim_policy_notifications", "Incident notice deliveries, by channel and result "
            "(retried: one attempt failed, another follows)", ("channel", "result"),
            [(c, r) for c in CHANNELS for r in NOTICE_RESULTS])
        self._quarantined = counter(
            "exim_policy_quarantine_received", "Messages delivered to the quarantine "
            "receiver: held, merged into a held one, refused (4xx/5xx)", ("result",),
            QUARANTINE_RESULTS)
        self._reloads = counter(
            "exim_policy_config_reloads", "Configuration reloads (SIGHUP), by result",
            ("result",), ("ok", "failed"))

        # what _State reads when scraped (instrument() sets them)
        self.service: PolicyService | None = None
        self.limits: Limits | None = None
        self.watcher: MapWatcher | None = None
        self.quarantine: QuarantineReceiver | None = None
        self._quarantine_counts: dict[str, int] = {}
        self._quarantine_read = float("-inf")
        if registry is not None:
            registry.register(_State(self))
        else:
            self._state_gauges = {name: Gauge(name, doc, registry=None, multiprocess_mode=mode)
                                  for name, (doc, mode) in STATE_GAUGES.items()}
            self._quarantine_gauge = Gauge(QUARANTINE_GAUGE, QUARANTINE_HELP, ("state",),
                                           registry=None, multiprocess_mode="livesum")

    @classmethod
    def for_config(cls, config: Config, shared_dir: str | None = None, *,
                   primary: bool = True) -> Metrics | None:
        """A Metrics for the daemon (for one of its workers with ``shared_dir``), or None
        with ``[metrics]`` off."""
        return cls(shared_dir, primary=primary) if config.metrics.enabled else None

    def instrument(self, config: Config, *, service: PolicyService | None = None,
                   listeners: Iterable[StreamServer] = (), limits: Limits | None = None,
                   watcher: MapWatcher | None = None, accounts: AccountTracker | None = None,
                   quarantine: QuarantineReceiver | None = None) -> None:
        """Give each component this object to count with, and read its state when
        scraped; ``/metrics`` on the HTTP front with ``metrics.http_front``. Called again
        with new components (a reload), it counts on for them."""
        for part in (service, *listeners, watcher, accounts, quarantine):
            if part is not None:
                part.metrics = self
        if accounts is not None and isinstance(accounts.notify, Notifier):
            accounts.notify.metrics = self
        if config.metrics.http_front:
            for listener in listeners:
                if isinstance(listener, HttpServer):
                    listener.scrape = self.scrape
        self.service, self.limits, self.watcher = service, limits, watcher
        if quarantine is not self.quarantine:
            self.quarantine, self._quarantine_read = quarantine, float("-inf")

    # ------------------------------------------------------------- per message --
    def message(self, protocol: str, evaluation: Evaluation) -> None:
        """One decided message (called once, by the service, after its log line)."""
        d = evaluation.decision
        scan = d.scan
        if scan is not None:
            rspamd = scan.action
        else:
            rspamd = FAILED if d.failure is not None else SKIPPED
        self._messages[protocol, d.traffic, rspamd, DEFER if d.defer else d.action].inc()
        self._answer.observe(evaluation.elapsed)
        if evaluation.scan_elapsed is not None:
            self._scan.observe(evaluation.scan_elapsed)
        if d.failure is not None:
            self._failures[d.failure.kind].inc()
        if d.account is not None:
            self._account_messages[d.account.status].inc()

    # ----------------------------------------------------------------- events --
    def refused(self, listener: str, reason: str) -> None:
        self._refused[listener, reason].inc()

    def shed(self, listener: str) -> None:
        self._shed[listener].inc()

    def protocol_error(self, listener: str) -> None:
        self._protocol_errors[listener].inc()

    def handler_error(self, listener: str) -> None:
        self._handler_errors[listener].inc()

    def limit_wait(self, limit: str) -> None:
        self._waits[limit].inc()

    def limit_timeout(self, limit: str) -> None:
        self._timeouts[limit].inc()

    def map_reload_failed(self, reason: str) -> None:
        if self.primary:
            self._map_failures[reason].inc()

    def incident(self, transition: str, state: str, shadow: bool) -> None:
        self._incidents[transition, state, shadow].inc()

    def store_error(self) -> None:
        self._store_errors.inc()

    def notification(self, channel: str, result: str) -> None:
        self._notifications[channel, result].inc()

    def quarantined(self, result: str) -> None:
        self._quarantined[result].inc()

    def config_reloaded(self, ok: bool) -> None:
        """A configuration reload, applied (``ok``) or refused."""
        if self.primary:
            self._reloads["ok" if ok else "failed"].inc()

    # --------------------------------------------------------------- endpoint --
    async def scrape(self, request: Request | None = None) -> Reply:
        """The ``GET /metrics`` reply, generated on the event loop: 1 to 3 ms for this
        registry, once per scrape interval. A thread would not shorten that stall: under
        the GIL the loop waits for the generating thread just the same (measured: the
        loop's longest lag about 5 ms in the loop, 5 to 8.5 ms through asyncio.to_thread;
        docs/metrics.md)."""
        await self._read_quarantine()
        if self.shared_dir is not None:
            self.publish()
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE)

    def publish(self) -> None:
        """Write this worker's state gauges to its file (``shared_dir`` only)."""
        for name, value in _state_values(self):
            self._state_gauges[name].set(value)
        if self.quarantine is not None:
            for state, count in self._quarantine_counts.items():
                self._quarantine_gauge.labels(state).set(count)

    async def publish_every(self, interval: float = PUBLISH_EVERY) -> None:
        """``shared_dir``: keep this worker's state gauges at most ``interval`` s old."""
        while True:
            await self._read_quarantine()
            self.publish()
            await asyncio.sleep(interval)

    async def _read_quarantine(self) -> None:
        receiver = self.quarantine
        if receiver is None or time.monotonic() - self._quarantine_read < QUARANTINE_EVERY:
            return
        self._quarantine_read = time.monotonic()
        try:
            # on the store's own thread (never SQLite on the loop), behind its writes
            self._quarantine_counts = await asyncio.wait_for(
                receiver.thread.call(receiver.store.counts), QUARANTINE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("metrics: the quarantine store did not answer within %gs; serving "
                        "its last counts", QUARANTINE_TIMEOUT)
        except Exception as exc:  # sqlite3.Error, OSError: the scrape goes on without them
            log.warning("metrics: cannot count the quarantine: %s", exc)

    async def serve(self, config: Config) -> HttpServer | None:
        """Start the listeners of ``metrics.listen`` (None: there are none)."""
        if not config.metrics.listen:
            return None
        server = HttpServer(dataclasses.replace(
            config.server, allowed_clients=config.metrics.allowed_clients,
            max_connections=SCRAPERS, max_message_size=MAX_SCRAPE_BODY,
            max_bytes_in_flight=MAX_SCRAPE_BODY * SCRAPERS),
            None, Limits(SCRAPERS, MAX_SCRAPE_BODY * SCRAPERS),
            addresses=config.metrics.listen, scrape=self.scrape)
        server.name, server.allowed_key = "metrics", "metrics.allowed_clients"
        server.metrics = self
        await server.start()
        log.info("metrics: GET /metrics on %s",
                 ", ".join(str(a) for a in config.metrics.listen))
        return server


#: connections the metrics listener holds at once: its own table, so neither a busy MTA
#: nor a stuck scraper can take the other's places
SCRAPERS = 16
#: a scrape is a GET: a body is refused above this
MAX_SCRAPE_BODY = 64 * 1024


class _State:
    """The gauges that mirror state, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []  # (names depend on what is instrumented; none clash with the counters)

    def collect(self):
        m = self.metrics
        for name, value in _state_values(m):
            yield _gauge(name, STATE_GAUGES[name][0], value)
        if m.quarantine is not None and m._quarantine_counts:
            family = GaugeMetricFamily(QUARANTINE_GAUGE, QUARANTINE_HELP, labels=("state",))
            for state, count in m._quarantine_counts.items():
                family.add_metric((state,), count)
            yield family


def _state_values(m: Metrics) -> Iterable[tuple[str, float]]:
    """(gauge name, value) of each state gauge that has a source."""
    if m.limits is not None:
        table = m.limits.connections
        yield "exim_policy_connections_open", len(table)
        yield "exim_policy_requests_in_flight", table.answering
        yield "exim_policy_bytes_in_flight", m.limits.budget.used
    if m.service is not None:
        yield "exim_policy_scans_in_flight", m.service.scanning
    if m.watcher is not None:
        yield "exim_policy_forwarding_map_entries", len(m.watcher.current)
        yield "exim_policy_forwarding_map_loaded_timestamp_seconds", m.watcher.loaded_at or 0.0


class _Processes:
    """``process_*`` of a daemon with workers: the supervisor's and its live workers'
    summed, CPU also of the workers that have ended (so it never goes back); the open
    files limit and the start time are the supervisor's. The pids come from the
    supervisor's :data:`PROCESSES_FILE`."""

    #: the supervisor's value, not a sum
    OWN = ("process_max_fds", "process_start_time_seconds")

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, PROCESSES_FILE)
        self._pid = 0
        self._reader = ProcessCollector(pid=lambda: self._pid, registry=None)

    def describe(self):
        return []

    def collect(self):
        try:
            with open(self.path, encoding="utf-8") as fh:
                known = json.load(fh)
            supervisor, workers = int(known["supervisor"]), [int(p) for p in known["workers"]]
            ended_cpu = float(known["ended_cpu"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        totals: dict[str, list] = {}  # name -> [family, value]
        for pid in (supervisor, *workers):
            self._pid = pid
            for family in self._reader.collect():
                value = family.samples[0].value
                if family.name not in totals:
                    totals[family.name] = [family, value]
                elif family.name not in self.OWN:
                    totals[family.name][1] += value
        for name, (family, value) in totals.items():
            if family.type == "counter":
                yield CounterMetricFamily(name, family.documentation,
                                          value=value + ended_cpu)
            else:
                yield GaugeMetricFamily(name, family.documentation, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
