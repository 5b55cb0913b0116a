"""The chain bench's SMTP sink, in a process of its own: ``chain_sink.py DIR PORT``.

The lab's :class:`~exim_policy.lab.sink.SmtpSink` keeping no message in memory (at 100,000
messages that would be ~300 MB), and apart from the bench's own process, where its server
thread would compete with 64 client threads for one GIL (skewing the latencies measured).
It writes files only (``NNNNNN.eml`` with ``X-Sink-Mail-From:`` and
``X-Sink-Rcpt-To:`` in front), listens on 127.0.0.1:PORT and stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exim_policy.lab.sink import SmtpSink  # noqa: E402


def main(argv: list[str]) -> int:
    directory, port = Path(argv[1]), int(argv[2])
    sink = SmtpSink(directory, port=port, keep_messages=False)  # (the accounting reads the files)
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
