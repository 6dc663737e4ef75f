/**
 * The ledger floor: bench/floor.ts plus the one thing every sinkhole attempt must leave, its
 * `attempt` line (the retry ledger's, docs/ledger.md: the same fields, made by the listener's
 * own `jsonText` and `isoTime`, gathered and written on stdout LOG_GATHER_MS at a time as the
 * listener's log is), done the least way: no policy, no limits, no transcript, no bound on
 * what waits to be written, one count per envelope in a Map. It shows how much of the gap
 * between the listener and the floor the ledger's line costs by itself. Not a product: bench only.
 *
 *   deno run --allow-net bench/floor_ledger.ts HOST PORT > FILE
 */
import { type AttemptEvent, isoTime, jsonText, LOG_GATHER_MS, LOG_WRITE_AT_BYTES } from "../listener.ts";
import { type Ledger, responder, session } from "./floor.ts";

const encoder = new TextEncoder();
/** Attempts seen per envelope (the listener's `attemptKey`). */
const attempts = new Map<string, number>();
let queued: string[] = [];
let queuedLength = 0;
let writing: Promise<void> | undefined;

function log(line: string): void {
  queued.push(line);
  queuedLength += line.length;
  writing ??= write();
}

/** After LOG_GATHER_MS (or once LOG_WRITE_AT_BYTES characters wait), everything queued in one write. */
async function write(): Promise<void> {
  while (queued.length > 0) {
    if (queuedLength < LOG_WRITE_AT_BYTES) await new Promise((ok) => setTimeout(ok, LOG_GATHER_MS));
    const all = encoder.encode(queued.join(""));
    queued = [];
    queuedLength = 0;
    for (let off = 0; off < all.length;) off += await Deno.stdout.write(all.subarray(off));
  }
  writing = undefined;
}

/** `<path>` of a MAIL FROM or RCPT TO line (the floor's client sends nothing else). */
const pathOf = (line: string) => line.slice(line.indexOf("<") + 1, line.lastIndexOf(">"));

/** A session's ledger: each recipient's attempt, logged at the message's final dot. */
export function ledger(client: string, logLine: (line: string) => void = log): Ledger {
  let from = "";
  let rcpts: string[] = [];
  let messageId: string | undefined;
  return {
    mail(line) {
      from = pathOf(line);
      rcpts = [];
      messageId = undefined;
    },
    rcpt(line) {
      rcpts.push(pathOf(line));
    },
    header(line) {
      if (messageId === undefined && line.length > 11 && line.slice(0, 11).toLowerCase() === "message-id:") {
        messageId = line.slice(11).trim();
      }
    },
    end() {
      for (const rcpt of rcpts) {
        const key = `${from.toLowerCase()} > ${rcpt.toLowerCase()}`;
        const attempt = (attempts.get(key) ?? 0) + 1;
        attempts.set(key, attempt);
        // Field by field in the listener's order (attemptEvents), the optional Message-ID only when there is one.
        const e = { event: "attempt", key, attempt, from, rcpt, stage: "eod", code: 250 } as AttemptEvent;
        if (messageId) e.messageId = messageId;
        e.client = client;
        e.tls = false;
        e.mode = "accept";
        logLine(jsonText(e, isoTime(Date.now()))); // the listener's own line: its serializer and its clock
      }
      rcpts = [];
    },
  };
}

if (import.meta.main) {
  for await (const conn of Deno.listen({ hostname: Deno.args[0], port: Number(Deno.args[1]) })) {
    session(conn, responder(ledger((conn.remoteAddr as Deno.NetAddr).hostname)));
  }
}
