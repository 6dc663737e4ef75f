/**
 * The retry ledger, read back: the listener's `attempt` events (one per attempt to deliver a
 * message to one recipient) grouped per message, with the interval between attempts, the
 * reply each got, from which client, and whether the message was delivered once, never, or
 * more than once. `ctl report` prints it (and a Markdown summary with a Mermaid timeline);
 * `ctl expect` holds a message to stated expectations. Pure but for `readAttempts`.
 */
import { type AttemptEvent, type LogLine, parseLogLine } from "../listener.ts";

export type AttemptLine = AttemptEvent & { ts: string };

/** One message's attempts, in order, and what became of it. */
export interface MessageHistory {
  key: string;
  from: string;
  rcpt: string;
  attempts: (AttemptLine & { intervalS?: number })[];
  /**
   * Attempts that handed the whole message over: answered 2yz at the end of data, or dropped
   * there (the sinkhole has it; the MTA, told nothing, will send it again).
   */
  deliveries: number;
  /** Delivered more than once with the same Message-ID (or none): the MTA sent it again. */
  duplicate: boolean;
  /** Refused for good (5yz) at its last attempt. */
  bounced: boolean;
}

/** Attempt events out of JSON log lines (other events and other text are skipped). */
export function attemptsIn(lines: Iterable<string>): AttemptLine[] {
  const out: AttemptLine[] = [];
  for (const text of lines) {
    const line = parseLogLine(text.trim()) as LogLine | undefined;
    if (line?.event === "attempt") out.push(line as AttemptLine);
  }
  return out;
}

/** Groups attempts per message (its key), in time order, with intervals and outcomes. */
export function histories(events: AttemptLine[]): MessageHistory[] {
  const byKey = new Map<string, AttemptLine[]>();
  for (const e of events) {
    const list = byKey.get(e.key);
    if (list) list.push(e);
    else byKey.set(e.key, [e]);
  }
  return [...byKey.entries()].map(([key, list]) => {
    const sorted = [...list].sort((a, b) => Date.parse(a.ts) - Date.parse(b.ts));
    const attempts = sorted.map((a, i) => ({
      ...a,
      ...(i > 0 ? { intervalS: (Date.parse(a.ts) - Date.parse(sorted[i - 1].ts)) / 1000 } : {}),
    }));
    const delivered = sorted.filter(handedOver);
    const ids = delivered.map((a) => a.messageId ?? "");
    const duplicate = ids.some((id, i) => ids.indexOf(id) !== i);
    const last = sorted.at(-1);
    return {
      key,
      from: sorted[0].from,
      rcpt: sorted[0].rcpt,
      attempts,
      deliveries: delivered.length,
      duplicate,
      bounced: last?.code !== undefined && last.code >= 500,
    };
  }).sort((a, b) => Date.parse(a.attempts[0].ts) - Date.parse(b.attempts[0].ts));
}

/** The message reached the sinkhole whole at this attempt (said 2yz, or dropped after the final dot). */
const handedOver = (a: AttemptLine) => a.stage === "eod" && (a.dropped || (a.code !== undefined && a.code < 300));

const outcomeOf = (a: AttemptLine) =>
  a.dropped
    ? `dropped at ${a.stage} (no reply${a.stage === "eod" ? ": received, not confirmed" : ""})`
    : `${a.code} at ${a.stage}`;

function fate(h: MessageHistory): string {
  if (h.duplicate) return `DELIVERED ${h.deliveries} TIMES (duplicate)`;
  if (h.deliveries === 1) return "delivered once";
  if (h.deliveries > 1) return `delivered ${h.deliveries} times (different Message-IDs)`;
  return h.bounced ? "bounced" : "not delivered (yet)";
}

/** The report as text, one block per message. */
export function renderReport(hs: MessageHistory[]): string[] {
  if (hs.length === 0) return ["no attempt events"];
  const lines: string[] = [];
  for (const h of hs) {
    lines.push(`${h.key}: ${h.attempts.length} attempt(s), ${fate(h)}`);
    for (const a of h.attempts) {
      const interval = a.intervalS === undefined ? "" : ` (+${a.intervalS.toFixed(1)} s)`;
      const id = a.messageId ? ` ${a.messageId}` : "";
      lines.push(`  #${a.attempt} ${a.ts}${interval} ${outcomeOf(a)} from ${a.client}${a.tls ? " TLS" : ""}${id}`);
    }
  }
  return lines;
}

/** The same as Markdown for a GitHub job summary, with a Mermaid timeline per message. */
export function markdownReport(hs: MessageHistory[]): string {
  const out = ["### sinkhole retry report", ""];
  for (const h of hs) {
    out.push(`**${h.key}**: ${h.attempts.length} attempt(s), ${fate(h)}`, "");
    out.push("| # | time | interval | outcome | client |", "| - | - | - | - | - |");
    for (const a of h.attempts) {
      const interval = a.intervalS === undefined ? "" : `+${a.intervalS.toFixed(1)} s`;
      out.push(`| ${a.attempt} | ${a.ts} | ${interval} | ${outcomeOf(a)} | ${a.client} |`);
    }
    out.push("", "```mermaid", "gantt", "  dateFormat x", "  axisFormat %H:%M:%S", `  section ${mermaidSafe(h.rcpt)}`);
    for (const a of h.attempts) {
      out.push(`  #${a.attempt} ${a.dropped ? "drop" : a.code} :milestone, ${Date.parse(a.ts)}, 0d`);
    }
    out.push("```", "");
  }
  return out.join("\n") + "\n";
}

const mermaidSafe = (s: string) => s.replace(/[:#;]/g, "_");

/** What `ctl expect` can ask of a message. */
export interface Expectation {
  /** The message: its recipient (or its key, `sender > recipient`). */
  message: string;
  attempts?: [number, number];
  /** Seconds between consecutive attempts. */
  intervalS?: [number, number];
  deliveredOnce?: boolean;
  /** Delivered within this many seconds of the first attempt. */
  withinS?: number;
}

/** A range like `3`, `2..4`, `5..` (inclusive; an open end is unbounded). */
export function parseRange(text: string): [number, number] | undefined {
  const m = /^(\d+(?:\.\d+)?)(?:(\.\.)(\d+(?:\.\d+)?)?)?$/.exec(text.trim());
  if (!m) return undefined;
  const lo = Number(m[1]);
  const hi = m[2] ? (m[3] === undefined ? Infinity : Number(m[3])) : lo;
  return lo <= hi ? [lo, hi] : undefined;
}

/** Every expectation that is not met, said precisely; empty when all are. */
export function unmet(hs: MessageHistory[], x: Expectation): string[] {
  const want = x.message.toLowerCase();
  const h = hs.find((m) => m.key === want || m.rcpt.toLowerCase() === want);
  if (!h) return [`no attempt logged for ${x.message}`];
  const problems: string[] = [];
  const n = h.attempts.length;
  const range = (r: [number, number]) => r[0] === r[1] ? `${r[0]}` : `${r[0]}..${r[1] === Infinity ? "" : r[1]}`;
  if (x.attempts && (n < x.attempts[0] || n > x.attempts[1])) {
    problems.push(`${h.key}: ${n} attempt(s), expected ${range(x.attempts)}`);
  }
  if (x.intervalS) {
    for (const a of h.attempts) {
      if (a.intervalS !== undefined && (a.intervalS < x.intervalS[0] || a.intervalS > x.intervalS[1])) {
        problems.push(
          `${h.key}: attempt #${a.attempt} came ${a.intervalS.toFixed(1)} s after the one before, ` +
            `expected ${range(x.intervalS)} s`,
        );
      }
    }
  }
  if (x.deliveredOnce && (h.deliveries !== 1 || h.duplicate)) {
    problems.push(`${h.key}: ${fate(h)}, expected delivered exactly once`);
  }
  if (x.withinS !== undefined) {
    const first = Date.parse(h.attempts[0].ts);
    const delivered = h.attempts.find(handedOver);
    const took = delivered ? (Date.parse(delivered.ts) - first) / 1000 : undefined;
    if (took === undefined || took > x.withinS) {
      problems.push(
        `${h.key}: ${took === undefined ? "not delivered" : `delivered after ${took.toFixed(1)} s`}, ` +
          `expected within ${x.withinS} s of the first attempt`,
      );
    }
  }
  return problems;
}

/** Attempt events from a JSON-lines file, or standard input for `-`. */
export async function readAttempts(path: string): Promise<AttemptLine[]> {
  const text = path === "-" ? await new Response(Deno.stdin.readable).text() : await Deno.readTextFile(path);
  return attemptsIn(text.split("\n"));
}
