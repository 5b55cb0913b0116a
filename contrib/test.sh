#!/usr/bin/env bash
# contrib/test.sh [pytest args...] -- set the machine up (contrib/setup.sh), then run the
# test suite from the repo root and exit with pytest's status.  Run as root:
#     sudo bash contrib/test.sh
# "No tests collected" (pytest exit 5) counts as a failure: a filter that selects nothing
# must not look like a green run.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

bash "$REPO/contrib/setup.sh"

cd "$REPO"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$rc"
