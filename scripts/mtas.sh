#!/usr/bin/env bash
# Unpacks Debian's Postfix, Exim and OpenSMTPD beside the installed sendmail, each into a
# directory of its own, for tests/mtas.ts. They conflict with sendmail as packages (each
# Provides/Conflicts mail-transport-agent), so they are never installed: `apt-get download`
# fetches the .deb files and `dpkg -x` unpacks them; nothing of theirs runs as a package
# (no maintainer scripts, no users, no services). tests/mtas.ts runs each from its directory
# inside `unshare --mount --uts` with its own configuration, spool and users.
#
# Where: $SINKHOLE_MTAS_DIR, or .mtas/ at the project's root (in .gitignore).
# Idempotent: a directory that holds its stamp (the package versions it was unpacked from)
# is left as it is, so a second run costs nothing; `rm -rf` it (or set SINKHOLE_MTAS_REFRESH=1)
# to unpack Debian's current versions.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${SINKHOLE_MTAS_DIR:-$root/.mtas}"

# Each MTA: its packages, and the libraries they need that a machine with sendmail lacks
# (libidn12 for Exim, checked on Debian 12: every other dependency comes with the base system,
# sendmail or the tools .ci/run installs; a missing one shows up as "cannot open shared object"
# in the rig's start-up check).
declare -A PACKAGES=(
  [postfix]="postfix"
  [exim]="exim4-daemon-light exim4-base exim4-config libidn12"
  [opensmtpd]="opensmtpd"
)

candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }

updated=false
# Package lists: a fresh machine may have none, and an old list may name a version the archive dropped.
update_once() {
  $updated && return 1
  apt-get update -qq || return 1
  updated=true
}

# The packages of one MTA as name=version, from the package lists as they are.
versions() {
  local want="" v p
  for p in "$@"; do
    v="$(candidate "$p")"
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
      echo "mtas: no Debian package $p" >&2
      return 1
    fi
    want+="$p=$v "
  done
  echo "$want"
}

mkdir -p "$dest"
for mta in postfix exim opensmtpd; do
  dir="$dest/$mta"
  if [ -f "$dir/.stamp" ] && [ -z "${SINKHOLE_MTAS_REFRESH:-}" ]; then
    continue
  fi
  # shellcheck disable=SC2086
  set -- ${PACKAGES[$mta]}
  want="$(versions "$@" 2>/dev/null)" || { update_once && want="$(versions "$@")"; } || exit 1
  tmp="$(mktemp -d "$dest/.download-XXXXXX")"
  # shellcheck disable=SC2086
  if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root $want); then
    update_once || exit 1
    want="$(versions "$@")" || exit 1
    # shellcheck disable=SC2086
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root $want) || exit 1
  fi
  rm -rf "$dir.new"
  mkdir -p "$dir.new"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dir.new"; done
  echo "$want" >"$dir.new/.stamp"
  rm -rf "$dir" "$tmp"
  mv "$dir.new" "$dir"
  echo "mtas: $mta unpacked into $dir ($want)"
done
