#!/usr/bin/env bash
# Instructions a message (callgrind's Ir, user space) in the listener or the Deno floor: a count
# that holds on a busy machine, where wall-clock rates do not. For before/after a change.
#
#   bash bench/instructions.sh MODE SHAPE [MESSAGES]
#     MODE: floor (bench/floor.ts), ledger-floor (bench/floor_ledger.ts, its lines to a file), or a listener
#       mode (accept, accept-log, ...) run at `deno task start`'s flags
#     SHAPE: one (a message a connection) or many (smtp-source -d)
#
# smtp-source sends MESSAGES/2 first (start-up and V8's compilation), then the counts are zeroed and
# MESSAGES are sent and counted. Needs valgrind and Postfix's tools (scripts/mtas.sh). Slow: minutes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mode=$1 shape=$2 n=${3:-2000}
postfix="${SINKHOLE_MTAS_DIR:-$root/.mtas}/postfix"
[ -f "$postfix/.stamp" ] || bash "$root/scripts/mtas.sh" >&2
host="127.$((RANDOM % 200 + 30)).$((RANDOM % 250 + 1)).$((RANDOM % 250 + 1))" port=2525
out="$(mktemp -d)"
pid=""
trap '[ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null; rm -rf "$out"' EXIT
vg=(valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file="$out/cg.%p" --dump-instr=no)
cd "$root"
if [ "$mode" = floor ] || [ "$mode" = ledger-floor ]; then
  file=floor.ts
  [ "$mode" = ledger-floor ] && file=floor_ledger.ts
  "${vg[@]}" deno run --v8-flags=--max-semi-space-size=1 --allow-net "bench/$file" "$host" "$port" >"$out/log" 2>&1 &
else
  SINKHOLE_MODE=$mode SINKHOLE_BIND_HOST=$host SINKHOLE_BIND_PORT=$port SINKHOLE_HEALTH_HOST=$host \
    SINKHOLE_HEALTH_PORT=0 "${vg[@]}" deno run --no-npm --v8-flags=--max-semi-space-size=1,--max-old-space-size=24 \
    --allow-net --allow-env --allow-read listener.ts >"$out/log" 2>&1 &
fi
pid=$!
for _ in $(seq 1200); do
  (exec 3<>"/dev/tcp/$host/$port" && read -r -t 5 l <&3 && [[ $l == 220* ]]) 2>/dev/null && break
  sleep 0.5
done
args=(-s 20)
[ "$shape" = many ] && args=(-d -s 20)
send() { LD_LIBRARY_PATH="$postfix/usr/lib/postfix" "$postfix/usr/sbin/smtp-source" "${args[@]}" -m "$1" \
  -f bench@origin.test -t bench@sinkhole.test "$host:$port"; }
send $((n / 2))
callgrind_control -z "$pid" >/dev/null
send "$n"
callgrind_control -d "$pid" >/dev/null
sleep 1
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
pid=""
ir=$(awk '/^summary:/ {s += $2} END {print s}' "$out"/cg.*.1)
echo "$mode, $shape message(s) a connection: $((ir / n)) instructions a message"
