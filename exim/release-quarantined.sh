#!/bin/sh
# exim/release-quarantined.sh [-C EXIM_CONFIG] FILE...
#
# Re-send quarantined messages (files from the quarantine mailbox, one message each) to
# the recipients they had before exim-policy quarantined them.
#
# - the envelope sender comes from the Return-path: header the delivery added;
# - the recipients from X-Exim-Policy-Recipients:, which acl_data.conf adds (from
#   $recipients) only to messages it quarantines;
# - Return-path:, Envelope-to:, Delivery-date: and the X-Exim-Policy-* headers are
#   removed, everything else is passed on unchanged;
# - the message is submitted locally ("exim -odi -f SENDER -- RCPTS"). A local
#   submission does not run the SMTP DATA ACL, so it is not scanned (and quarantined)
#   again. Run it as root or as the Exim user (-f needs a trusted caller).
#
# Environment: EXIM (default "exim"). Exit status: 0 if every file was submitted.
set -eu

exim_bin=${EXIM:-exim}
conf=""
if [ "${1:-}" = "-C" ]; then
  [ $# -ge 2 ] || { echo "usage: $0 [-C EXIM_CONFIG] FILE..." >&2; exit 2; }
  conf=$2
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [-C EXIM_CONFIG] FILE..." >&2; exit 2; }

for msg in "$@"; do
  # header block only (up to the first empty line); header names are case-insensitive
  sender=$(awk '/^\r?$/{exit}
                tolower($0) ~ /^return-path:/ {sub(/^[^:]*:[ \t]*/, ""); gsub(/[<>\r]/, "");
                print; exit}' "$msg")
  rcpts=$(awk '/^\r?$/{exit}
               tolower($0) ~ /^x-exim-policy-recipients:/ {f=1; sub(/^[^:]*:/, ""); print; next}
               f && /^[ \t]/ {print; next}
               {f=0}' "$msg" | tr ',\r\n' '   ')
  if [ -z "$(echo "$rcpts" | tr -d ' \t')" ]; then
    echo "$msg: no X-Exim-Policy-Recipients header: not a message exim-policy quarantined" >&2
    exit 1
  fi
  [ -n "$sender" ] || sender="<>"
  # drop the named headers together with their continuation lines
  # shellcheck disable=SC2086  # $rcpts is a list of addresses, split on purpose
  awk 'BEGIN{h=1}
       h && /^\r?$/ {h=0; print; next}
       h && /^[ \t]/ {if (!skip) print; next}
       h {skip = (tolower($0) ~ /^(return-path|envelope-to|delivery-date|x-exim-policy-[a-z-]*):/)}
       !h || !skip {print}' "$msg" \
    | "$exim_bin" ${conf:+-C "$conf"} -odi -f "$sender" -- $rcpts
  echo "released $msg to:$rcpts"
done
