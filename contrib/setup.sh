#!/usr/bin/env bash
# contrib/setup.sh -- prepare this machine to run exim-policy's tests (idempotent, unattended).
#
#  1. installs the Debian packages the tests drive for real (only the missing ones; runs
#     apt-get update only then).  While installing, a temporary /usr/sbin/policy-rc.d that
#     exits 101 keeps the packages' daemons (exim on *:25, rspamd, redis) from starting,
#     unless the image already has one;
#  2. creates .venv in the repo and installs the project with its test extras, skipping the
#     install when .venv already holds it for the current pyproject.toml (hash stamp);
#  3. installs the other MTAs the HTTP front is tested with, outside the system's package
#     set: Haraka from npm (contrib/setup-haraka.sh) and Postfix unpacked from its Debian
#     package beside Exim (contrib/setup-postfix.sh). Both keep stamps and work offline
#     once done: the tests run with no network at all.
#
# Must run as root (the tests start rspamd and exim as their service users).
# Environment: PYTHON (default python3) creates the venv.
set -euo pipefail

PACKAGES=(rspamd exim4-daemon-heavy redis-server spamc swaks curl iproute2 strace python3-venv systemd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=$REPO/.venv
STAMP=$VENV/.exim-policy-setup

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: must run as root (try: sudo bash contrib/setup.sh)" >&2
  exit 2
fi

installed() {  # is the Debian package $1 installed?
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

# ------------------------------------------------------------- Debian packages --
missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

apt_summary="apt: all ${#PACKAGES[@]} packages present"
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: no apt-get here; install these Debian packages (or their equivalents): ${missing[*]}" >&2
    exit 1
  fi
  policy=${SETUP_POLICY_RC_D:-/usr/sbin/policy-rc.d}  # overridable only to test this script
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from exim-policy contrib/setup.sh: start no daemons\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq >/dev/null || \
     ! apt-get install -y -qq "${missing[@]}" >/dev/null; then
    echo "setup.sh: could not install: ${missing[*]}" >&2
    echo "setup.sh: install them by hand: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
  still=()
  for pkg in "${missing[@]}"; do installed "$pkg" || still+=("$pkg"); done
  if [ "${#still[@]}" -gt 0 ]; then
    echo "setup.sh: still missing after apt-get install: ${still[*]}" >&2
    exit 1
  fi
  apt_summary="apt: installed ${missing[*]}"
fi

# ------------------------------------------------------------------- the venv --
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup.sh: $PYTHON not found; install python3 (>= 3.10) or set PYTHON=/path/to/python3" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  venv_summary="venv: created"
else
  venv_summary="venv: present"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup.sh: $VENV uses Python $("$VENV/bin/python" -V 2>&1); 3.10 or newer is required" >&2
  exit 1
fi

want=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" = "$have" ] && "$VENV/bin/python" -c 'import exim_policy, pytest' >/dev/null 2>&1; then
  pip_summary="project: up to date"
else
  if ! (cd "$REPO" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'); then
    echo "setup.sh: pip install -e '.[test]' failed (see above)" >&2
    exit 1
  fi
  echo "$want" > "$STAMP"
  pip_summary="project: installed with [test] extras"
fi

# ----------------------------------------------------------- Haraka, Postfix --
bash "$REPO/contrib/setup-haraka.sh"
bash "$REPO/contrib/setup-postfix.sh"

echo "setup.sh: ok -- $apt_summary; $venv_summary ($("$VENV/bin/python" -V 2>&1)); $pip_summary"
