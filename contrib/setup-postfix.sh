#!/usr/bin/env bash
# contrib/setup-postfix.sh -- unpack Postfix 3.7 for the Postfix lab (idempotent, unattended, root).
#
# Debian's postfix package conflicts with exim4 (both are a mail-transport-agent), and exim4
# must stay installed, so Postfix is never installed here: its .deb (and sasl2-bin, for
# saslpasswd2) is fetched with `apt-get download` and unpacked with `dpkg -x` into
#   /var/cache/exim-policy-lab/postfix      (or $EXIM_POLICY_LAB_POSTFIX_DIR)
# Nothing of it goes to /etc, /usr or dpkg's database; exim_policy/lab/postfix.py runs it from
# there (LD_LIBRARY_PATH for its libpostfix-*.so, its own config/queue/data directories).
# Runtime libraries Postfix needs that are not installed (libsasl2-2, libsasl2-modules for
# PLAIN/LOGIN, libsasl2-modules-db for sasldb, libdb5.3, libicu72, libnsl2, libssl3) are
# unpacked into the same tree; the lab puts its lib dirs first on LD_LIBRARY_PATH/SASL_PATH.
# The sasl2 packages are taken at the version of the installed libsasl2-2 when apt has it.
#
# It also creates the accounts the lab runs Postfix as.  Their names cannot clash with a real
# Postfix (which uses postfix/postdrop): user and group _eplab-postfix (mail_owner), group
# _eplab-postdrop (setgid_group).  They are system accounts without a home or a shell.
#
# A stamp file in the tree records the package versions; when it is there and the binaries are
# present, a second run touches nothing and needs no network.  `apt-get update` is run only
# when a download fails for lack of package lists.  Prints one summary line.
set -euo pipefail

DEST=${EXIM_POLICY_LAB_POSTFIX_DIR:-/var/cache/exim-policy-lab/postfix}
STAMP=$DEST/.exim-policy-postfix
MAIL_OWNER=_eplab-postfix
SETGID_GROUP=_eplab-postdrop
RUNTIME_LIBS=(libsasl2-2 libsasl2-modules libsasl2-modules-db libdb5.3 libicu72 libnsl2 libssl3)
SASL_FAMILY=" sasl2-bin libsasl2-2 libsasl2-modules libsasl2-modules-db "

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-postfix.sh: must run as root (try: sudo bash contrib/setup-postfix.sh)" >&2
  exit 2
fi

installed() {  # is the Debian package $1 installed?
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

# ------------------------------------------------------------------- accounts --
accounts="accounts present"
if ! getent group "$SETGID_GROUP" >/dev/null; then
  groupadd --system "$SETGID_GROUP"
  accounts="accounts created"
fi
if ! getent passwd "$MAIL_OWNER" >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
          --shell /usr/sbin/nologin --comment "exim-policy Postfix lab" "$MAIL_OWNER"
  accounts="accounts created"
fi

# ---------------------------------------------------------- the unpacked tree --
complete() {  # stamp written and the binaries the lab runs are there
  [ -s "$STAMP" ] && [ -x "$DEST/usr/sbin/postfix" ] && [ -x "$DEST/usr/sbin/postqueue" ] &&
    [ -x "$DEST/usr/lib/postfix/sbin/master" ] && [ -x "$DEST/usr/sbin/saslpasswd2" ]
}

if complete; then
  echo "setup-postfix.sh: ok -- up to date in $DEST ($(tr '\n' ' ' < "$STAMP" | sed 's/ $//')); $accounts"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-postfix.sh: no apt-get here; this needs Debian's postfix and sasl2-bin packages" >&2
  exit 1
fi

sasl_version=""
installed libsasl2-2 && sasl_version=$(dpkg-query -W -f='${Version}' libsasl2-2)

wanted=(postfix sasl2-bin)
for pkg in "${RUNTIME_LIBS[@]}"; do
  installed "$pkg" || wanted+=("$pkg")
done

spec() {  # the apt-get download argument for package $1 (pinned for the sasl2 family)
  local pkg=$1
  if [ -n "$sasl_version" ] && [[ $SASL_FAMILY == *" $pkg "* ]] &&
     apt-cache madison "$pkg" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' |
       grep -qxF "$sasl_version"; then
    echo "$pkg=$sasl_version"
  else
    echo "$pkg"
  fi
}

work=$(mktemp -d /tmp/exim-policy-postfix-debs.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt's download sandbox (_apt) must be able to write here
chown _apt "$work" 2>/dev/null || true

download() {
  local specs=()
  for pkg in "${wanted[@]}"; do specs+=("$(spec "$pkg")"); done
  (cd "$work" && apt-get download -qq "${specs[@]}") >"$work/apt.log" 2>&1
}
download_failed() {
  echo "setup-postfix.sh: apt-get download ${wanted[*]} failed:" >&2
  cat "$work/apt.log" >&2
  exit 1
}
updated=""
if ! download; then
  # no package lists (unknown package) or stale ones (404): the one reason for apt-get update
  grep -qE "Unable to locate package|Can't select|no installation candidate|404" "$work/apt.log" ||
    download_failed
  apt-get update -qq >/dev/null 2>&1 || download_failed
  download || download_failed
  updated=" (after apt-get update)"
fi

mkdir -p "$DEST"
chmod 755 "$DEST"
versions=()
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$DEST"
  versions+=("$(dpkg-deb -f "$deb" Package)=$(dpkg-deb -f "$deb" Version)")
done
# every directory the lab reads must be traversable by the Postfix user (dpkg -x keeps modes)
chmod 755 "$DEST"
printf '%s\n' "${versions[@]}" > "$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"

if ! complete; then
  echo "setup-postfix.sh: unpacked into $DEST but binaries are missing (see $STAMP)" >&2
  exit 1
fi
echo "setup-postfix.sh: ok -- unpacked ${versions[*]} into $DEST$updated; $accounts"
