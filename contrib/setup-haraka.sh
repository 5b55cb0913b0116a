#!/usr/bin/env bash
# contrib/setup-haraka.sh -- install the Haraka the lab tests run (idempotent, unattended).
#
# The Haraka lab (exim_policy/lab/haraka.py) starts a real Haraka in front of Rspamd or the
# shim.  Tests run in a loopback-only network namespace, so Haraka must be installed before:
#  1. makes sure node and npm exist (Debian's nodejs + npm when node is missing; Haraka
#     3.3.4 declares node >= 20 but runs on Debian 12's node 18 -- npm only warns; that
#     node needs node-acorn, node-cjs-module-lexer and node-undici as well);
#  2. installs the npm packages Haraka and haraka-plugin-rspamd, pinned exactly, into
#     $EXIM_POLICY_LAB_HARAKA_DIR (default /var/cache/exim-policy-lab/haraka), and records
#     the versions in a stamp file.  A second run with the same pins checks the stamp and the
#     installed package.json files and does nothing, so it works offline.
#
# Must run as root (it writes under /var/cache and may apt-get install).
set -euo pipefail

HARAKA_VERSION=3.3.4
RSPAMD_PLUGIN_VERSION=1.6.1
PREFIX=${EXIM_POLICY_LAB_HARAKA_DIR:-/var/cache/exim-policy-lab/haraka}
STAMP=$PREFIX/.exim-policy-haraka
WANT="Haraka@$HARAKA_VERSION haraka-plugin-rspamd@$RSPAMD_PLUGIN_VERSION"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-haraka.sh: must run as root (try: sudo bash contrib/setup-haraka.sh)" >&2
  exit 2
fi

# ------------------------------------------------------------------ node, npm --
node_summary="node: present"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-haraka.sh: node/npm missing and no apt-get here; install Node.js (>= 18) and npm" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq >/dev/null || ! apt-get install -y -qq nodejs npm node-acorn node-cjs-module-lexer node-undici >/dev/null; then
    echo "setup-haraka.sh: could not install nodejs npm; try: apt-get install -y nodejs npm" >&2
    exit 1
  fi
  node_summary="node: installed nodejs npm"
fi
NODE_VERSION=$(node -v)

# version of the installed npm package $1 under $PREFIX, or "" if it is not there
installed_version() {
  local manifest=$PREFIX/node_modules/$1/package.json
  [ -f "$manifest" ] || return 0
  node -e 'process.stdout.write(String(require(process.argv[1]).version || ""))' "$manifest"
}

up_to_date() {
  [ "$(cat "$STAMP" 2>/dev/null || true)" = "$WANT" ] &&
    [ -f "$PREFIX/node_modules/Haraka/bin/haraka" ] &&
    [ "$(installed_version Haraka)" = "$HARAKA_VERSION" ] &&
    [ "$(installed_version haraka-plugin-rspamd)" = "$RSPAMD_PLUGIN_VERSION" ]
}

# ---------------------------------------------------------------- npm install --
if up_to_date; then
  npm_summary="up to date"
else
  mkdir -p "$PREFIX"
  rm -f "$STAMP"
  # --prefix makes $PREFIX/package.json + node_modules/; the plugin is a top-level package
  # (Haraka also pulls it in as an optional dependency ~1.6.1), so its version is pinned too.
  # --prefer-offline: a populated ~/.npm/_cacache is enough, the registry is asked only for
  # what the cache lacks.
  if ! npm install --prefix "$PREFIX" --save-exact --no-audit --no-fund --prefer-offline \
         --loglevel=error "Haraka@$HARAKA_VERSION" "haraka-plugin-rspamd@$RSPAMD_PLUGIN_VERSION" \
         >"$PREFIX/npm-install.log" 2>&1; then
    echo "setup-haraka.sh: npm install failed; see $PREFIX/npm-install.log:" >&2
    tail -n 20 "$PREFIX/npm-install.log" >&2
    exit 1
  fi
  for pkg in "Haraka:$HARAKA_VERSION" "haraka-plugin-rspamd:$RSPAMD_PLUGIN_VERSION"; do
    have=$(installed_version "${pkg%%:*}")
    if [ "$have" != "${pkg#*:}" ]; then
      echo "setup-haraka.sh: ${pkg%%:*} is '${have:-missing}' after npm install, expected ${pkg#*:}" >&2
      exit 1
    fi
  done
  # Haraka runs as root in the lab, but keep the tree readable for anyone inspecting it
  chmod -R a+rX "$PREFIX"
  echo "$WANT" > "$STAMP"
  npm_summary="installed"
fi

echo "setup-haraka.sh: ok -- $node_summary ($NODE_VERSION); $WANT $npm_summary in $PREFIX"
