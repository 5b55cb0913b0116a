"""The lab: real Rspamd, a loopback NXDOMAIN resolver and an SMTP sink, run by the project.

Used by the test fixtures (tests/conftest.py) and by the product's demo.  Everything binds
127.0.0.1 on free ports and nothing sends a packet to any other address.  Needs root and
the Debian packages rspamd and util-linux (setpriv); the sink needs aiosmtpd.

``Lab(workdir)`` starts the parts in order (nxdns, rspamd, optionally the sink) and stops
them in reverse order; use it as a context manager::

    with Lab(workdir, sink=True) as lab:
        lab.rspamd.url, lab.sink.port, lab.nxdns.port
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from .errors import LabError, LabUnavailable
from .nxdns import NxDns
from .ports import free_port, wait_tcp
from .process import ManagedProcess, pid_alive
from .rspamd import RspamdLab, check_prerequisites
from .sink import SinkMessage, SmtpSink

__all__ = [
    "Lab", "LabError", "LabUnavailable", "ManagedProcess", "NxDns", "RspamdLab", "SinkMessage",
    "SmtpSink", "check_prerequisites", "free_port", "pid_alive", "wait_tcp",
]


class Lab:
    """nxdns + rspamd (+ sink) in one work dir; ``stop()`` is safe after a partial start."""

    def __init__(self, workdir: str | os.PathLike[str], *, sink: bool = False,
                 extra_local_d: Mapping[str, str] | None = None,
                 maps: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.nxdns = NxDns(self.workdir / "dns")
        self.rspamd: RspamdLab | None = None
        self.sink: SmtpSink | None = SmtpSink(self.workdir / "sink") if sink else None
        self._extra_local_d = dict(extra_local_d or {})
        self._maps = dict(maps or {})

    def start(self) -> None:
        check_prerequisites()
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # the service users must be able to traverse it
        try:
            self.nxdns.start()
            self.rspamd = RspamdLab(self.workdir, dns_port=self.nxdns.port,
                                    extra_local_d=self._extra_local_d, maps=self._maps)
            self.rspamd.start()
            if self.sink is not None:
                self.sink.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what runs, in reverse start order; every part is tried even if one fails."""
        errors: list[BaseException] = []
        for stop in (self.sink.stop if self.sink else None,
                     self.rspamd.stop if self.rspamd else None,
                     self.nxdns.stop):
            if stop is None:
                continue
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(exc)
        if errors:
            raise LabError("; ".join(str(e) for e in errors))

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
