#!/usr/bin/env bash
# contrib/test.sh [pytest args...] -- set the machine up (contrib/setup.sh), then run the
# test suite from the repo root and exit with pytest's status.  Run as root:
#     bash contrib/test.sh           (or, from another user: sudo bash contrib/test.sh)
# "No tests collected" (pytest exit 5) counts as a failure: a filter that selects nothing
# must not look like a green run.
#
# pytest runs under the network guard (exim_policy/lab/netguard.py): in a network namespace
# with only loopback, traced with strace, so that any process the tests start that tries
# to reach an address off loopback (a DNS query to the system resolver, say) is stopped and
# fails the run, named with its command and address. The guard checks itself first.
# EXIM_POLICY_NETGUARD=0 runs pytest without it (for debugging only).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

bash "$REPO/contrib/setup.sh"

cd "$REPO"
guard=()
if [ "${EXIM_POLICY_NETGUARD:-1}" != 0 ]; then
  .venv/bin/python -m exim_policy.lab.netguard --self-test
  guard=(.venv/bin/python -m exim_policy.lab.netguard --)
fi
rc=0
"${guard[@]}" .venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit "$rc"
