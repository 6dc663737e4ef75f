# sinkhole-mailertable.sh: sourced by smtp-out's generate-config.sh (POSIX sh).
#
# With SINKHOLE_ENABLED=true, routes sinkhole.test to the sinkhole tier by one
# mailertable line; otherwise removes that line. Safe to run on every reconfigure:
# the line is present exactly once when enabled, never when disabled, and every
# other line of the mailertable is kept as it was. No port in the line: sendmail's
# mailertable has no port syntax (":25" would be read as a second host named 25).
#
# Inputs: SINKHOLE_ENABLED (true/other), MAILERTABLE (default /etc/mail/mailertable),
#         SINKHOLE_HOST (default sinkhole.cabal.internal).
# Run makemap afterwards as generate-config.sh already does for the mailertable.

sinkhole_mailertable() {
  sinkhole_file=${MAILERTABLE:-/etc/mail/mailertable}
  sinkhole_line="sinkhole.test smtp:[${SINKHOLE_HOST:-sinkhole.cabal.internal}]"
  sinkhole_tmp="${sinkhole_file}.sinkhole.$$"
  [ -f "$sinkhole_file" ] || : > "$sinkhole_file" || return 1
  grep -v '^sinkhole\.test[[:space:]]' "$sinkhole_file" > "$sinkhole_tmp"
  if [ $? -gt 1 ]; then rm -f "$sinkhole_tmp"; return 1; fi
  if [ "${SINKHOLE_ENABLED:-false}" = "true" ]; then
    printf '%s\n' "$sinkhole_line" >> "$sinkhole_tmp" || { rm -f "$sinkhole_tmp"; return 1; }
  fi
  cat "$sinkhole_tmp" > "$sinkhole_file" && rm -f "$sinkhole_tmp"
}

sinkhole_mailertable
