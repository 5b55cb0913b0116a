#!/usr/bin/env bash
# contrib/unit-lane.sh [pytest args...] -- the lane that needs no daemon and no root:
# pytest -m "not real", run where it cannot cheat. Run as root (it sets that up, then
# gives root's powers away):
#   - a private mount namespace in which the daemon binaries the lab uses (Rspamd, rspamc,
#     Exim, Redis, spamc, swaks, node) are /dev/null, and the lab's cache
#     (/var/cache/exim-policy-lab: Haraka, Postfix) is an empty tmpfs;
#   - no capabilities (bounding set and inheritable emptied, securebits noroot): no chown,
#     no setuid, no privileged port, no reading what only root may read.
# A test that needs any of that fails here; mark it `real` (tests/conftest.py marks the
# users of the daemon fixtures itself).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
  echo "unit-lane.sh: run as root (it drops root's powers itself)" >&2
  exit 2
fi
exec unshare --mount --propagation private bash -s "$REPO" "$@" <<'INNER'
set -euo pipefail
REPO=$1; shift
for binary in /usr/bin/rspamd /usr/bin/rspamc /usr/sbin/exim /usr/sbin/exim4 \
              /usr/bin/redis-server /usr/bin/spamc /usr/bin/swaks /usr/bin/node; do
  if [ -e "$binary" ]; then mount --bind /dev/null "$binary"; fi
done
if [ -d /var/cache/exim-policy-lab ]; then mount -t tmpfs none /var/cache/exim-policy-lab; fi
cd "$REPO"
exec setpriv --bounding-set=-all --inh-caps=-all \
  --securebits=+noroot,+noroot_locked -- \
  .venv/bin/python -m pytest -p no:cacheprovider -m "not real" "$@"
INNER
