#!/usr/bin/env bash
# contrib/demo.sh [--keep] -- set this machine up (contrib/setup.sh: Debian packages and
# .venv), then run `exim-policy demo`: Rspamd, the shim, Exim and an SMTP sink on loopback,
# one message per scenario, and a table of where each ended up.  Run as root:
#     bash contrib/demo.sh           (or, from another user: sudo bash contrib/demo.sh)
# Exit status: the demo's (0 = every scenario as expected, 1 = one was not, 2 = cannot run).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: must run as root (try: sudo bash contrib/demo.sh)" >&2
  exit 2
fi

bash "$REPO/contrib/setup.sh"
cd "$REPO"
exec .venv/bin/exim-policy demo "$@"
