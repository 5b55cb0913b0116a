#!/usr/bin/env python3
"""Refresh the Debian snippets from the canonical exim/*.conf files.

Each snippet under conf.d/ is a Debian-specific head followed by a marker line
``# ---- exim/<file> ----`` and then that file verbatim, optionally followed by an end
marker ``# ---- end of exim/<file> ----`` and a Debian-specific tail. This script keeps
each head (and tail) and replaces what is between them.  ``--check`` only reports (exit 1)
when a snippet is out of date; tests/e2e/test_e2e_exim_config.py runs the same comparison.

    python3 exim/debian/regenerate.py [--check]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

DEBIAN_DIR = Path(__file__).resolve().parent
EXIM_DIR = DEBIAN_DIR.parent
SNIPPETS = {
    "conf.d/main/04_exim-policy_options": "main.conf",
    "conf.d/acl/exim-policy_check_data.conf": "acl_data.conf",
    "conf.d/acl/exim-policy_check_rcpt.conf": "acl_rcpt.conf",
    "conf.d/acl/35_exim-policy_check_mail": "acl_mail.conf",
    "conf.d/router/050_exim-policy_quarantine": "routers.conf",
    "conf.d/transport/30_exim-policy_quarantine": "transports.conf",
}
_MARKER = re.compile(r"^# ---- exim/(\S+) ----\n", re.MULTILINE)
_END = re.compile(r"^# ---- end of exim/(\S+) ----\n", re.MULTILINE)


def expected(snippet: str, source: str) -> str:
    """The snippet's text as it should be: its own head, the marker, the source file, and
    its own tail after an end marker, if it has one."""
    current = (DEBIAN_DIR / snippet).read_text(encoding="utf-8")
    found = _MARKER.search(current)
    if found is None or found.group(1) != source:
        raise SystemExit(f"{snippet}: no '# ---- exim/{source} ----' marker line")
    end = _END.search(current, found.end())
    tail = current[end.start():] if end is not None and end.group(1) == source else ""
    return current[:found.end()] + (EXIM_DIR / source).read_text(encoding="utf-8") + tail


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for snippet, source in SNIPPETS.items():
        text = expected(snippet, source)
        path = DEBIAN_DIR / snippet
        if path.read_text(encoding="utf-8") != text:
            stale.append(snippet)
            if not check:
                path.write_text(text, encoding="utf-8")
    if stale:
        print(("out of date: " if check else "rewrote: ") + ", ".join(stale))
    return 1 if (check and stale) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
