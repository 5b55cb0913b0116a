"""``server.workers`` > 1: a supervisor and N worker processes, each a whole daemon
(:func:`exim_policy.daemon.run`) with its own event loop, serving the same listeners.

The supervisor is the process ``exim-policy serve`` started: systemd's main PID, so
``READY=1`` comes from it, as ``NotifyAccess=main`` wants. It never runs an event loop.
Before it forks the workers it binds the unix sockets (every worker serves them from the
descriptor it inherits: the kernel does not spread unix connections over ``SO_REUSEPORT``
sockets) and checks that no other process holds a TCP address (each worker binds its own
socket there with ``SO_REUSEPORT``, and the kernel spreads new connections over them).
Then it only watches:

- readiness: a worker writes its states (``ready``, ``reloading``, ``stopping``) to a pipe
  of its own; the supervisor sends ``READY=1`` once every worker is ready, and after a
  reload once every worker has finished it;
- signals: SIGHUP goes on to every worker (each re-reads the configuration file and the
  forwarding map, as one process does; ``RELOADING=1`` / ``READY=1`` around it come from
  the supervisor, which re-reads the file too, for the workers it starts later); SIGTERM
  and SIGINT go on to every worker, and the supervisor waits for their graceful stop
  (``server.shutdown_timeout``, then :data:`STOP_MARGIN` more before SIGKILL);
- deaths: a worker that ends when it was not told to is logged with its exit status or
  signal and started again, after :data:`RESTART_DELAY` s, doubling while it keeps dying
  within :data:`QUICK_DEATH` s of its start, up to :data:`MAX_RESTART_DELAY` s. A worker
  that ends before the daemon was ever ready (a listen address it cannot bind, an account
  store it cannot open) stops the daemon: the supervisor exits with its status.

A worker blocks SIGHUP, SIGTERM and SIGINT from its fork until its event loop handles
them (a signal sent meanwhile waits; it is not lost), gets SIGTERM when the supervisor
dies, logs through a queue and writer thread of its own with every line naming it
(``[worker N]`` after the level; ``"worker": N`` in JSON), and never talks to systemd.
Worker 1 also runs what must be one per daemon: the quarantine receiver (one writer of
its store, one hourly purge).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import config as config_file
from .config import Config, ConfigError, LoggingConfig
from .logs import JsonFormatter, handler_for
from .sdnotify import SystemdNotifier
from .transport.listeners import bind_unix, check_tcp_free, share_listeners

log = logging.getLogger("exim_policy.workers")

#: first wait before a worker that died is started again (seconds)
RESTART_DELAY = 0.5
#: longest wait between the starts of a worker that keeps dying
MAX_RESTART_DELAY = 30.0
#: a worker that dies within this many seconds of its start makes the next wait longer
QUICK_DEATH = 10.0
#: after ``server.shutdown_timeout``, how long a stop waits for a worker before SIGKILL
STOP_MARGIN = 10.0
#: what a worker holds back from its fork until its event loop handles them
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
#: prctl(2) option: the signal this process gets when its parent ends
_PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------ in a worker --
class WorkerNotifier:
    """:class:`~exim_policy.sdnotify.SystemdNotifier`'s calls in a worker: its states go
    to the supervisor, one word a line on a pipe, and the supervisor tells systemd."""

    enabled = True

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, word: str) -> bool:
        try:
            os.write(self.fd, word.encode("ascii") + b"\n")
        except OSError:  # the supervisor is gone (the worker gets SIGTERM for that)
            return False
        return True

    def send(self, **state: str | int) -> bool:
        return True  # STATUS= lines are the supervisor's

    def ready(self, status: str) -> bool:
        return self._send("ready")

    def reloading(self) -> bool:
        return self._send("reloading")

    def stopping(self) -> bool:
        return self._send("stopping")


class WorkerFormatter(logging.Formatter):
    """A writer's own format with the worker named: ``[worker N]`` after the level of a
    text line, ``"worker": N`` as the first key of a JSON one."""

    def __init__(self, inner: logging.Formatter | None, index: int) -> None:
        super().__init__()
        self.index = index
        self.json = isinstance(inner, JsonFormatter)
        self.prefix = ""
        fmt = getattr(inner, "_fmt", None) or ""
        if self.json or inner is None:
            self.inner = inner or logging.Formatter()
        elif "%(levelname)s " in fmt:
            self.inner = logging.Formatter(
                fmt.replace("%(levelname)s ", f"%(levelname)s [worker {index}] ", 1),
                inner.datefmt)
        else:
            self.inner, self.prefix = inner, f"[worker {index}] "

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        if self.json:
            brace = text.find("{")
            return f'{text[:brace + 1]}"worker": {self.index}, {text[brace + 1:]}'
        return self.prefix + text


@dataclass
class WorkerRole:
    """What the daemon in a worker process needs to know of its place."""

    #: 1 to ``count``; it keeps its number when it is started again
    index: int
    count: int
    notifier: WorkerNotifier
    #: the directory of the shared metrics values (None: ``[metrics]`` off)
    metrics_dir: str | None = None

    @property
    def first(self) -> bool:
        """Worker 1 runs what must be one per daemon (the quarantine receiver)."""
        return self.index == 1

    def log_writer(self, config: LoggingConfig) -> logging.Handler:
        """:func:`~exim_policy.logs.handler_for`, its lines naming this worker."""
        writer = handler_for(config)
        writer.setFormatter(WorkerFormatter(writer.formatter, self.index))
        return writer

    def signals_handled(self) -> None:
        """The event loop handles SIGHUP/SIGTERM/SIGINT now: take those that waited."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _die_with_parent() -> None:
    """SIGTERM (a graceful stop) to this process when its parent ends."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError, TypeError):  # not Linux: the worker outlives it
        pass


# ------------------------------------------------------------------ the supervisor --
@dataclass
class _Worker:
    index: int
    pid: int = 0
    #: the read end of its state pipe (-1: none)
    fd: int = -1
    started: float = 0.0
    buffer: bytes = b""
    ready: bool = False
    #: a SIGHUP was passed to it and it has not finished a reload since
    reload_wanted: bool = False
    #: it said "reloading" and not yet "ready"
    in_reload: bool = False
    #: deaths in a row, each within QUICK_DEATH of the start
    quick_deaths: int = 0
    #: when to start it again (None: running, or not to be started)
    restart_at: float | None = None


def _noop(signum: int, frame: object) -> None:
    """A handler, so that the signal is written to the wakeup pipe the loop reads."""


def describe_status(status: int) -> str:
    """A wait status in words: ``exited with status 2``, ``was killed by signal 9
    (SIGKILL)``."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-code} ({name})"


def restart_delay(quick_deaths: int) -> float:
    """Seconds before a worker that died is started again."""
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** max(quick_deaths - 1, 0))


class Supervisor:
    """The main process of a daemon with ``server.workers`` > 1 (see the module's doc)."""

    def __init__(self, config: Config, config_path: str | Path | None = None, *,
                 systemd: SystemdNotifier | None = None) -> None:
        self.config = config
        self.path = config_path
        self.systemd = systemd or SystemdNotifier()
        self.workers = [_Worker(i) for i in range(1, config.server.workers + 1)]
        #: the unix listening sockets, path -> socket (the workers serve them)
        self.unix: dict[str, socket.socket] = {}
        self.metrics_dir: str | None = None
        #: CPU seconds of the workers that have ended (the metrics' process_cpu)
        self.ended_cpu = 0.0
        self.announced = False
        self.reload_pending = False
        self.stopping = False
        self.stop_deadline: float | None = None
        self.exit_status = 0
        self._wakeup = (-1, -1)
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup = -1
        self._writer: logging.Handler | None = None

    # ------------------------------------------------------------------ run --
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status. OSError: a listen address cannot
        be bound (before any worker starts)."""
        self._start_logging()
        try:
            self._bind()
            self._create_account_file()
            if self.config.metrics.enabled:
                self.metrics_dir = tempfile.mkdtemp(prefix="exim-policy-metrics-")
            self._install_signals()
            try:
                for worker in self.workers:
                    try:
                        self._spawn(worker)
                    except OSError as exc:  # no memory or no process slot for the fork
                        log.error("cannot start worker %d: %s; stopping the daemon",
                                  worker.index, exc)
                        self.exit_status = 1
                        self._stop(None)
                        break
                return self._watch()
            finally:
                self._restore_signals()
        finally:
            self._close_sockets()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self._stop_logging()

    def _bind(self) -> None:
        server = self.config.server
        shared = (*server.listen, *server.http_listen, *server.query_listen,
                  *self.config.metrics.listen)
        own = self.config.quarantine.listen  # worker 1 binds these itself
        seen = set()
        try:
            for address in (*shared, *own):
                if address in seen:  # each worker would bind it twice with SO_REUSEPORT
                    raise OSError(errno.EADDRINUSE, f"{address} is listed twice")
                seen.add(address)
                if not address.is_unix:
                    check_tcp_free(address)
            for address in shared:
                if address.path is not None:
                    self.unix[address.path] = bind_unix(address.path, server.unix_socket_mode)
        except OSError:
            self._close_sockets()
            raise

    def _create_account_file(self) -> None:
        """Create the SQLite account file (its WAL mode, its tables) before the workers
        open it: two first openings at the same moment can find it locked. Any error is
        left for the workers to find and report, as one process does."""
        accounts = self.config.accounts
        if not (accounts.enabled and accounts.store == "sqlite"):
            return
        import asyncio

        from .state import StoreError, open_store

        async def create() -> None:
            store = open_store(accounts)  # the CLI's store: its thread ends with close()
            try:
                await store.prune(time.time())  # opens the file, as each start does
            except StoreError:
                pass
            finally:
                await store.close()

        asyncio.run(create())  # no loop and no thread is left for the fork

    def _close_sockets(self) -> None:
        for sock in self.unix.values():
            sock.close()
        self.unix = {}

    def _start_logging(self) -> None:
        """The supervisor writes its few lines itself, no queue and no thread (it forks)."""
        self._writer = handler_for(self.config.logging)
        root = logging.getLogger()
        root.setLevel(self.config.logging.level.upper())
        root.addHandler(self._writer)

    def _stop_logging(self) -> None:
        if self._writer is not None:
            logging.getLogger().removeHandler(self._writer)
            self._writer.close()
            self._writer = None

    def _install_signals(self) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._wakeup = (read, write)
        self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in (*SIGNALS, signal.SIGCHLD):
            self._old_handlers[sig] = signal.signal(sig, _noop)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers = {}
        signal.set_wakeup_fd(self._old_wakeup)
        for fd in self._wakeup:
            if fd >= 0:
                os.close(fd)
        self._wakeup = (-1, -1)

    # --------------------------------------------------------------- workers --
    def _spawn(self, worker: _Worker) -> None:
        read, write = os.pipe()
        # the child holds the signals back from its first instruction on
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read)
            os.close(write)
            raise
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = 1
            try:
                os.close(read)
                code = self._worker_main(worker, write)
            except BaseException:  # noqa: B036 - a bug; nothing may unwind into the supervisor
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write)
        os.set_blocking(read, False)
        worker.pid, worker.fd, worker.buffer = pid, read, b""
        worker.started, worker.ready = time.monotonic(), False
        worker.reload_wanted = worker.in_reload = False
        self._write_processes()
        log.info("worker %d started: pid %d", worker.index, pid)

    def _worker_main(self, worker: _Worker, write: int) -> int:
        """In the forked child: drop what is the supervisor's, then serve."""
        supervisor = os.getppid()
        signal.set_wakeup_fd(-1)
        for sig in (*SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for fd in self._wakeup:
            os.close(fd)
        for other in self.workers:
            if other.fd >= 0:
                os.close(other.fd)
        self._stop_logging()
        _die_with_parent()
        if os.getppid() != supervisor:  # it ended before the line above
            return 1
        os.environ.pop("NOTIFY_SOCKET", None)  # systemd hears the supervisor only
        share_listeners(unix=self.unix)
        role = WorkerRole(worker.index, len(self.workers), WorkerNotifier(write),
                          self.metrics_dir)
        from .commands.serve import serve

        try:
            return serve(self.config, self.path, worker=role)
        except ConfigError as exc:  # as the command line reports it
            for error in exc.errors or (str(exc),):
                print(f"exim-policy: config: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130

    def _write_processes(self) -> None:
        """The pids and the ended workers' CPU, for the metrics' process_* series."""
        if self.metrics_dir is None:
            return
        from .metrics import PROCESSES_FILE

        path = os.path.join(self.metrics_dir, PROCESSES_FILE)
        with open(path + ".new", "w", encoding="utf-8") as fh:
            json.dump({"supervisor": os.getpid(),
                       "workers": [w.pid for w in self.workers if w.pid],
                       "ended_cpu": self.ended_cpu}, fh)
        os.replace(path + ".new", path)

    # ----------------------------------------------------------------- watch --
    def _watch(self) -> int:
        while True:
            if self.stopping and not any(w.pid for w in self.workers):
                log.info("stopped")
                return self.exit_status
            fds = [self._wakeup[0], *(w.fd for w in self.workers if w.fd >= 0)]
            readable, _, _ = select.select(fds, [], [], self._timeout())
            if self._wakeup[0] in readable:
                self._signals()
            for worker in self.workers:
                if worker.fd >= 0 and worker.fd in readable:
                    self._read(worker)
            self._reap()
            self._restart_due()
            self._kill_late()
            self._check_ready()

    def _timeout(self) -> float | None:
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self.stop_deadline is not None:
            due.append(self.stop_deadline)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _signals(self) -> None:
        try:
            received = os.read(self._wakeup[0], 512)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self._reload()
            # SIGCHLD: _reap() follows

    def _read(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # it has ended (or is ending): _reap() tells
            os.close(worker.fd)
            worker.fd = -1
            return
        *lines, worker.buffer = (worker.buffer + data).split(b"\n")
        for line in lines:
            if line == b"reloading":
                worker.in_reload = True
            elif line == b"ready":
                if worker.in_reload:
                    worker.in_reload = worker.reload_wanted = False
                if not worker.ready:
                    worker.ready = True
                    if self.announced:
                        log.info("worker %d (pid %d) serving again", worker.index,
                                 worker.pid)
                        self.systemd.send(status=self._serving())

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.ended_cpu += usage.ru_utime + usage.ru_stime
            for worker in self.workers:
                if worker.pid == pid:
                    self._ended(worker, status)

    def _ended(self, worker: _Worker, status: int) -> None:
        pid, lived, how = worker.pid, time.monotonic() - worker.started, describe_status(status)
        if worker.fd >= 0:
            self._read(worker)  # its last words
            if worker.fd >= 0:
                os.close(worker.fd)
                worker.fd = -1
        worker.pid, worker.ready = 0, False
        worker.reload_wanted = worker.in_reload = False
        if self.metrics_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.metrics_dir)  # its live gauges go
        self._write_processes()
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            if code == 0:
                log.info("worker %d (pid %d) stopped", worker.index, pid)
            else:
                log.error("worker %d (pid %d) %s while stopping", worker.index, pid, how)
                self.exit_status = self.exit_status or 1
            return
        if not self.announced:
            log.error("worker %d (pid %d) %s while starting: stopping the daemon",
                      worker.index, pid, how)
            self.exit_status = code if code > 0 else 1
            self._stop(None)
            return
        worker.quick_deaths = worker.quick_deaths + 1 if lived < QUICK_DEATH else 0
        delay = restart_delay(worker.quick_deaths)
        worker.restart_at = time.monotonic() + delay
        log.error("worker %d (pid %d) %s after %.1fs; starting it again in %gs",
                  worker.index, pid, how, lived, delay)
        self.systemd.send(status=f"{self._serving()}; worker {worker.index} restarting")

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is None or worker.restart_at > now or self.stopping:
                continue
            worker.restart_at = None
            try:
                self._spawn(worker)
            except OSError as exc:  # no memory or no process slot for the fork
                worker.quick_deaths += 1
                delay = restart_delay(worker.quick_deaths)
                worker.restart_at = now + delay
                log.error("cannot start worker %d: %s; trying again in %gs", worker.index,
                          exc, delay)

    def _check_ready(self) -> None:
        if self.stopping:
            return
        if not self.announced and all(w.ready for w in self.workers):
            self.announced = True
            log.info("all %d workers serving (pids %s)", len(self.workers),
                     ", ".join(str(w.pid) for w in self.workers))
            self.systemd.ready(self._serving())
        if self.reload_pending and not any(w.reload_wanted for w in self.workers):
            self.reload_pending = False
            log.info("reload: done by every worker")
            self.systemd.ready(self._serving())

    def _serving(self) -> str:
        return (f"serving on {', '.join(str(a) for a in self.config.server.listen)} with "
                f"{len(self.workers)} workers")

    # --------------------------------------------------------------- signals --
    def _reload(self) -> None:
        """SIGHUP: every worker reloads; the supervisor takes the file in too, for the
        workers it starts later (the keys that need a restart keep their value)."""
        if self.stopping:
            return
        if self.path is not None:
            from .daemon import in_force

            try:
                new = config_file.load(self.path)
            except ConfigError:
                pass  # every worker logs the errors; the configuration in force stays
            else:
                self._switch_logging(new.logging)
                self.config, _, _ = in_force(self.config, new)
        for worker in self.workers:
            if worker.fd >= 0:
                self._read(worker)  # what it said before this reload
        if self.announced:
            self.reload_pending = True
            self.systemd.reloading()
        for worker in self.workers:
            if worker.pid:
                worker.reload_wanted, worker.in_reload = True, False
                self._kill(worker, signal.SIGHUP)
        log.info("reload: SIGHUP passed to the workers")

    def _switch_logging(self, config: LoggingConfig) -> None:
        if config == self.config.logging or self._writer is None:
            return
        try:
            writer = handler_for(config)
        except ConfigError:
            return  # the workers log it
        root = logging.getLogger()
        root.setLevel(config.level.upper())
        root.addHandler(writer)
        root.removeHandler(self._writer)
        self._writer.close()
        self._writer = writer

    def _stop(self, reason: str | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.systemd.stopping()
        self.stop_deadline = time.monotonic() + self.config.server.shutdown_timeout \
            + STOP_MARGIN
        running = [w for w in self.workers if w.pid]
        if reason is not None:
            log.info("%s: stopping the %d workers", reason, len(running))
        for worker in self.workers:
            worker.restart_at = None
        for worker in running:
            self._kill(worker, signal.SIGTERM)
        self._close_sockets()  # the workers hold their own copies until they stop

    def _kill_late(self) -> None:
        if self.stop_deadline is None or time.monotonic() < self.stop_deadline:
            return
        self.stop_deadline = None
        for worker in self.workers:
            if worker.pid:
                log.error("worker %d (pid %d) still running %gs after SIGTERM: killing it",
                          worker.index, worker.pid,
                          self.config.server.shutdown_timeout + STOP_MARGIN)
                self._kill(worker, signal.SIGKILL)

    @staticmethod
    def _kill(worker: _Worker, sig: signal.Signals) -> None:
        try:
            os.kill(worker.pid, sig)
        except ProcessLookupError:  # it has just ended; _reap() tells
            pass
