"""The chain bench's SMTP sink, in a process of its own: ``chain_sink.py DIR PORT``.

The lab's :class:`~exim_policy.lab.sink.SmtpSink` keeps every message in memory as well as
on disk; at 100,000 messages that is ~300 MB, and in the bench's own process its server
thread would compete with 64 client threads for one GIL (skewing the latencies measured).
Here it runs alone, writes files only (``NNNNNN.eml`` with ``X-Sink-Mail-From:`` and
``X-Sink-Rcpt-To:`` in front), listens on 127.0.0.1:PORT and stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exim_policy.lab.sink import SmtpSink  # noqa: E402


class FileSink(SmtpSink):
    """An SmtpSink that keeps nothing in memory: the accounting reads the files."""

    def _store(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> int:
        number = next(self._counter)
        path = self.directory / f"{number:07d}.eml"
        tmp = self.directory / f".{number:07d}.eml.tmp"
        head = (f"X-Sink-Mail-From: <{mail_from}>\r\n"
                f"X-Sink-Rcpt-To: {', '.join(f'<{r}>' for r in rcpt_tos)}\r\n")
        with open(tmp, "wb") as fh:
            fh.write(head.encode("utf-8", "surrogateescape") + data)
        # the rename makes a message visible whole: the accounting never reads half a file
        tmp.rename(path)
        return number


def main(argv: list[str]) -> int:
    directory, port = Path(argv[1]), int(argv[2])
    sink = FileSink(directory, port=port)
    sink.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"sink listening on 127.0.0.1:{sink.port}", flush=True)
    done.wait()
    sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
