/**
 * The retry ledger, read back: the listener's `attempt` events (one per attempt to deliver a
 * message to one recipient) grouped per message, with the interval between attempts, the
 * reply each got, from which client, and whether the message was delivered once, never, or
 * more than once. `ctl report` prints it (and a Markdown summary with a Mermaid timeline);
 * `ctl expect` holds a message to stated expectations.
 *
 * The input is not trusted: it is read as a stream of lines of bounded length, each line is
 * checked field by field (`checkAttempt`) and one that cannot be used is skipped and counted
 * with its reason, never a crash; the attempts kept are bounded in number, so memory does not
 * grow with the input; every text that came from the input is escaped before it reaches a
 * terminal (`printable`), the Markdown summary (`markdownText`) or Mermaid (`mermaidText`).
 * Pure but for `readLedger`.
 */
import {
  type Abandon,
  type AttemptEvent,
  type Envelope,
  handedOver,
  MAX_LOG_LINE_BYTES,
  messageHistory,
  messagesOf,
  normalMessageId,
} from "../listener.ts";
import { EXIT } from "./cli.ts";

export { normalMessageId };

export type AttemptLine = AttemptEvent & { ts: string };

/**
 * The longest line read: the listener never writes a longer one (MAX_LOG_LINE_BYTES, under
 * CloudWatch's limit for one event). A longer line is skipped as it streams past, never held.
 */
export const MAX_LEDGER_LINE_BYTES = MAX_LOG_LINE_BYTES;
/** The most attempts one report keeps (memory bounded whatever the input's size); later ones are skipped, counted. */
export const MAX_LEDGER_ATTEMPTS = 100_000;
/** The most messages the Markdown summary details (GitHub takes at most 1 MiB of job summary a step). */
export const MAX_SUMMARY_MESSAGES = 20;
/** The most attempts a message's table and timeline in the summary show. */
export const MAX_SUMMARY_ATTEMPTS = 50;

/** Why a line was not used: the reasons `ctl report` counts and says. */
export const SKIP = {
  overlong: `line longer than ${MAX_LEDGER_LINE_BYTES} bytes`,
  brokenJson: "broken JSON (a truncated line?)",
  badTimestamp: "attempt with a bad timestamp",
  beyondLimit: `attempt beyond the first ${MAX_LEDGER_ATTEMPTS} (MAX_LEDGER_ATTEMPTS)`,
  field: (name: string) => `attempt with a missing or mistyped ${name}`,
} as const;

/** ISO 8601 in UTC, as the listener writes `ts` (`Date.toISOString`). */
const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$/;
const STAGES: readonly string[] = ["rcpt", "data", "eod"];
const ABANDONS: readonly unknown[] = ["rset", "helo", "quit", "close"] satisfies Abandon[];

/**
 * A parsed `attempt` event, checked field by field: the attempt (only its known fields), or
 * why it cannot be used. `tls` and `mode` may be absent (not known); the rest may not.
 */
export function checkAttempt(v: Record<string, unknown>): AttemptLine | string {
  if (typeof v.ts !== "string" || !ISO_UTC.test(v.ts) || !Number.isFinite(Date.parse(v.ts))) {
    return SKIP.badTimestamp;
  }
  for (const name of ["key", "from", "rcpt", "client"] as const) {
    if (typeof v[name] !== "string") return SKIP.field(name);
  }
  if (!Number.isSafeInteger(v.attempt) || (v.attempt as number) < 1) return SKIP.field("attempt");
  if (typeof v.stage !== "string" || !STAGES.includes(v.stage)) return SKIP.field("stage");
  const code = v.code;
  if (code !== undefined && !(Number.isInteger(code) && (code as number) >= 200 && (code as number) <= 599)) {
    return SKIP.field("code");
  }
  if (v.dropped !== undefined && v.dropped !== true) return SKIP.field("dropped");
  if (v.unheard !== undefined && v.unheard !== true) return SKIP.field("unheard");
  if ([code, v.dropped, v.unheard].filter((x) => x !== undefined).length !== 1) {
    return SKIP.field("code (or dropped or unheard)");
  }
  if (v.messageId !== undefined && typeof v.messageId !== "string") return SKIP.field("messageId");
  if (v.abandoned !== undefined && !ABANDONS.includes(v.abandoned as string)) return SKIP.field("abandoned");
  if (v.tls !== undefined && typeof v.tls !== "boolean") return SKIP.field("tls");
  if (v.mode !== undefined && typeof v.mode !== "string") return SKIP.field("mode");
  return {
    event: "attempt",
    ts: v.ts,
    key: v.key as string,
    attempt: v.attempt as number,
    from: v.from as string,
    rcpt: v.rcpt as string,
    stage: v.stage as AttemptLine["stage"],
    ...(code !== undefined
      ? { code: code as number }
      : v.unheard
      ? { unheard: true as const }
      : { dropped: true as const }),
    ...(v.abandoned !== undefined ? { abandoned: v.abandoned as Abandon } : {}),
    ...(v.messageId !== undefined ? { messageId: v.messageId as string } : {}),
    client: v.client as string,
    tls: v.tls === true,
    mode: (v.mode as string | undefined) ?? "",
  };
}

/** What to keep: attempts at or after `sinceMs`; messages that carry `messageId` (`<…>` added when missing). */
export interface LedgerFilter {
  sinceMs?: number;
  messageId?: string;
}

/**
 * The attempts read so far, grouped per message, and what was not used and why. Adding is
 * constant time per line; what it keeps is bounded by MAX_LEDGER_ATTEMPTS.
 */
export class Ledger {
  /** Lines that were not used, per reason (SKIP). */
  readonly skipped = new Map<string, number>();
  /** JSON events read (an object with an `event`), used or not: 0 means this was not the listener's log. */
  events = 0;
  /** Events other than `attempt`; lines that are no event (text, other JSON). */
  otherEvents = 0;
  textLines = 0;
  /** Attempts left out by the filter (before --since). */
  beforeSince = 0;
  kept = 0;
  readonly #byKey = new Map<string, Envelope>();
  /** One copy of each client address and mode text, however many attempts name it. */
  readonly #strings = new Map<string, string>();
  readonly #filter: LedgerFilter;

  constructor(filter: LedgerFilter = {}) {
    this.#filter = filter;
  }

  skip(reason: string): void {
    this.skipped.set(reason, (this.skipped.get(reason) ?? 0) + 1);
  }

  /** One line of the log (a JSON event, or anything else). */
  addLine(text: string): void {
    const line = text.trim();
    if (!line) return;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch {
      if (line.startsWith("{")) this.skip(SKIP.brokenJson);
      else this.textLines++;
      return;
    }
    this.addEvent(v);
  }

  /** One parsed event (from a line, or from CloudWatch Logs). */
  addEvent(v: unknown): void {
    if (typeof v !== "object" || v === null || Array.isArray(v)) return void this.textLines++;
    const e = v as Record<string, unknown>;
    if (typeof e.event !== "string") return void this.textLines++;
    this.events++;
    if (e.event !== "attempt") return void this.otherEvents++;
    const a = checkAttempt(e);
    if (typeof a === "string") return this.skip(a);
    const t = Date.parse(a.ts);
    if (this.#filter.sinceMs !== undefined && t < this.#filter.sinceMs) return void this.beforeSince++;
    if (this.kept >= MAX_LEDGER_ATTEMPTS) return this.skip(SKIP.beyondLimit);
    this.kept++;
    let message = this.#byKey.get(a.key);
    if (!message) {
      message = { key: a.key, from: a.from, rcpt: a.rcpt, attempts: [] };
      this.#byKey.set(a.key, message);
    }
    message.attempts.push({
      ts: a.ts,
      t,
      attempt: a.attempt,
      stage: a.stage,
      code: a.code,
      dropped: a.dropped,
      unheard: a.unheard,
      abandoned: a.abandoned,
      messageId: a.messageId,
      client: this.#once(a.client),
      tls: a.tls,
      mode: this.#once(a.mode),
    });
  }

  #once(s: string): string {
    const known = this.#strings.get(s);
    if (known !== undefined) return known;
    this.#strings.set(s, s);
    return s;
  }

  /** Each message's history, oldest first; with a Message-ID filter, only the messages that carry it. */
  histories(): MessageHistory[] {
    const want = this.#filter.messageId === undefined ? undefined : normalMessageId(this.#filter.messageId);
    const out: MessageHistory[] = [];
    for (const envelope of this.#byKey.values()) {
      for (const message of messagesOf(envelope)) {
        if (want !== undefined && !message.attempts.some((a) => a.messageId === want)) continue;
        out.push(messageHistory(message));
      }
    }
    return out.sort((a, b) => Date.parse(a.attempts[0].ts) - Date.parse(b.attempts[0].ts));
  }

  /** What was not used, one phrase per reason, most frequent first (empty when nothing was skipped). */
  skippedText(): string[] {
    return [...this.skipped.entries()].sort((a, b) => b[1] - a[1]).map(([reason, n]) => `${n} ${reason}`);
  }
}

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

/** Groups attempts per message (its key), in time order, with intervals and outcomes; unusable ones are left out. */
export function histories(events: Iterable<unknown>): MessageHistory[] {
  const ledger = new Ledger();
  for (const e of events) ledger.addEvent(e);
  return ledger.histories();
}

// ---------------------------------------------------------------------------------------
// Text from the input, made safe for where it is shown.

/**
 * Characters that must not reach a terminal raw: C0 controls (ESC starts CSI and OSC
 * sequences, BEL rings), DEL, C1 controls (U+009B is a one-character CSI), the Unicode line
 * and paragraph separators, bidirectional overrides and isolates (text that reads other than
 * it is), the BOM; and the backslash, so an escape in the output is never ambiguous.
 */
// deno-lint-ignore no-control-regex -- control characters are what it finds
const UNPRINTABLE = /[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff\\]/g;

/** Text from the input, shown as text: every unprintable character as a visible escape (`\x1b`, `\u202e`, `\\`). */
export function printable(s: string): string {
  return s.replace(UNPRINTABLE, (c) => {
    if (c === "\\") return "\\\\";
    const n = c.charCodeAt(0);
    return n < 0x100 ? `\\x${n.toString(16).padStart(2, "0")}` : `\\u${n.toString(16).padStart(4, "0")}`;
  });
}

/**
 * JSON for a terminal or a machine: JSON.stringify escapes C0 controls but leaves DEL, C1
 * controls, line separators and bidirectional controls raw; they are escaped as `\uXXXX`
 * too (still the same JSON: they can only stand inside strings).
 */
export function safeJson(value: unknown, indent?: number): string {
  return JSON.stringify(value, null, indent).replace(
    /[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/** Text from the input inside Markdown (a table cell, bold): printable, then every ASCII punctuation escaped. */
export function markdownText(s: string): string {
  return markdownEscape(printable(s));
}

/**
 * What is markup in GitHub's Markdown anywhere in a line: HTML and autolinks (`<`), entities
 * (`&`), emphasis and strike-through, code, links and images, table cells, math (`$`), emoji
 * codes (`:`), and the backslash itself. (`>` and `#` are markup only at a line's start, where
 * input text never stands.)
 */
const MARKDOWN_SPECIAL = /[\\`*_~\[\]{}()<&|!$:]/g;

/** Printable text inside Markdown: every character that could be markup backslash-escaped (CommonMark). */
export function markdownEscape(s: string): string {
  return s.replace(MARKDOWN_SPECIAL, (c) => `\\${c}`);
}

/** Text from the input as a Mermaid name: letters, digits and `@._+-` kept, anything else `_`. */
export function mermaidText(s: string): string {
  return s.replace(/[^A-Za-z0-9@._+-]/g, "_");
}

const outcomeOf = (a: AttemptLine) =>
  a.dropped
    ? `dropped at ${a.stage} (no reply${a.stage === "eod" ? ": received, not confirmed" : ""})`
    : a.unheard
    ? `client left at ${a.stage} before the reply (not delivered)`
    : `${a.code} at ${a.stage}${a.abandoned ? `, then ${a.abandoned}` : ""}`;

function fate(h: MessageHistory): string {
  if (h.duplicate) return `DELIVERED ${h.deliveries} TIMES (duplicate)`;
  if (h.deliveries === 1) return "delivered once";
  if (h.deliveries > 1) return `delivered ${h.deliveries} times (different Message-IDs)`;
  return h.bounced ? "bounced" : "not delivered (yet)";
}

/** The report as text, one block per message; everything from the input escaped. */
export function renderReport(hs: MessageHistory[]): string[] {
  if (hs.length === 0) return ["no attempt events"];
  const lines: string[] = [];
  for (const h of hs) {
    lines.push(`${printable(h.key)}: ${h.attempts.length} attempt(s), ${fate(h)}`);
    for (const a of h.attempts) {
      const interval = a.intervalS === undefined ? "" : ` (+${a.intervalS.toFixed(1)} s)`;
      const id = a.messageId ? ` ${printable(a.messageId)}` : "";
      lines.push(
        `  #${a.attempt} ${a.ts}${interval} ${outcomeOf(a)} from ${printable(a.client)}${a.tls ? " TLS" : ""}${id}`,
      );
    }
  }
  return lines;
}

/**
 * The same as Markdown for a GitHub job summary, with a Mermaid timeline per message; at most
 * MAX_SUMMARY_MESSAGES messages and MAX_SUMMARY_ATTEMPTS attempts each (the rest is counted),
 * and what was skipped.
 */
export function markdownReport(hs: MessageHistory[], skipped: string[] = []): string {
  const out = ["### sinkhole retry report", ""];
  if (hs.length === 0) out.push("No attempt events.", "");
  for (const h of hs.slice(0, MAX_SUMMARY_MESSAGES)) {
    out.push(`**${markdownText(h.key)}**: ${h.attempts.length} attempt(s), ${fate(h)}`, "");
    out.push("| # | time | interval | outcome | client |", "| - | - | - | - | - |");
    const shown = h.attempts.slice(0, MAX_SUMMARY_ATTEMPTS);
    for (const a of shown) {
      const interval = a.intervalS === undefined ? "" : `+${a.intervalS.toFixed(1)} s`;
      out.push(`| ${a.attempt} | ${a.ts} | ${interval} | ${outcomeOf(a)} | ${markdownText(a.client)} |`);
    }
    if (h.attempts.length > shown.length) out.push("", `… and ${h.attempts.length - shown.length} more attempt(s).`);
    out.push("", "```mermaid", "gantt", "  dateFormat x", "  axisFormat %H:%M:%S", `  section ${mermaidText(h.rcpt)}`);
    for (const a of shown) {
      out.push(
        `  #${a.attempt} ${a.dropped ? "drop" : a.unheard ? "left" : a.code} :milestone, ${Date.parse(a.ts)}, 0d`,
      );
    }
    out.push("```", "");
  }
  if (hs.length > MAX_SUMMARY_MESSAGES) {
    out.push(`… and ${hs.length - MAX_SUMMARY_MESSAGES} more message(s): the step's log has them all.`, "");
  }
  if (skipped.length) out.push(`Skipped: ${skipped.join(", ")}.`, "");
  return out.join("\n") + "\n";
}

// ---------------------------------------------------------------------------------------
// Expectations.

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

/** A range like `3`, `2..4`, `5..` (inclusive; an open end is unbounded); whole numbers only when `integer`. */
export function parseRange(text: string, integer = false): [number, number] | undefined {
  const number = integer ? String.raw`\d+` : String.raw`\d+(?:\.\d+)?`;
  const m = new RegExp(`^(${number})(?:(\\.\\.)(${number})?)?$`).exec(text.trim());
  if (!m) return undefined;
  const lo = Number(m[1]);
  const hi = m[2] ? (m[3] === undefined ? Infinity : Number(m[3])) : lo;
  return lo <= hi ? [lo, hi] : undefined;
}

/** Every expectation that is not met, said precisely (input text escaped); empty when all are. */
export function unmet(hs: MessageHistory[], x: Expectation): string[] {
  const want = x.message.toLowerCase();
  const matched = hs.filter((m) => m.key.toLowerCase() === want || m.rcpt.toLowerCase() === want);
  if (matched.length === 0) return [`no attempt logged for ${printable(x.message)}`];
  // Each message with the envelope (one ends where it was delivered or bounced) must meet them.
  return matched.flatMap((h, i) =>
    unmetBy(h, x, matched.length > 1 ? `${printable(h.key)} (message ${i + 1} of ${matched.length})` : printable(h.key))
  );
}

function unmetBy(h: MessageHistory, x: Expectation, key: string): string[] {
  const problems: string[] = [];
  const n = h.attempts.length;
  const range = (r: [number, number]) => r[0] === r[1] ? `${r[0]}` : `${r[0]}..${r[1] === Infinity ? "" : r[1]}`;
  if (x.attempts && (n < x.attempts[0] || n > x.attempts[1])) {
    problems.push(`${key}: ${n} attempt(s), expected ${range(x.attempts)}`);
  }
  if (x.intervalS) {
    for (const a of h.attempts) {
      if (a.intervalS !== undefined && (a.intervalS < x.intervalS[0] || a.intervalS > x.intervalS[1])) {
        problems.push(
          `${key}: attempt #${a.attempt} came ${a.intervalS.toFixed(1)} s after the one before, ` +
            `expected ${range(x.intervalS)} s`,
        );
      }
    }
  }
  if (x.deliveredOnce && (h.deliveries !== 1 || h.duplicate)) {
    problems.push(`${key}: ${fate(h)}, expected delivered exactly once`);
  }
  if (x.withinS !== undefined) {
    const first = Date.parse(h.attempts[0].ts);
    const delivered = h.attempts.find(handedOver);
    const took = delivered ? (Date.parse(delivered.ts) - first) / 1000 : undefined;
    if (took === undefined || took > x.withinS) {
      problems.push(
        `${key}: ${took === undefined ? "not delivered" : `delivered after ${took.toFixed(1)} s`}, ` +
          `expected within ${x.withinS} s of the first attempt`,
      );
    }
  }
  return problems;
}

// ---------------------------------------------------------------------------------------
// Reading, and what `report` and `expect` answer.

/** A line longer than the bound, skipped as it streamed past. */
export const OVERLONG = Symbol("overlong line");

/**
 * The lines of a byte stream, each at most `max` bytes (UTF-8 decoded, invalid bytes as
 * U+FFFD); a longer line yields OVERLONG and is never held whole. A last line without a
 * newline is yielded too (a truncated line is the reader's to judge).
 */
export async function* boundedLines(
  stream: AsyncIterable<Uint8Array>,
  max = MAX_LEDGER_LINE_BYTES,
): AsyncGenerator<string | typeof OVERLONG> {
  const decoder = new TextDecoder();
  let parts: Uint8Array[] = [];
  let size = 0;
  let overlong = false;
  const line = () => {
    const bytes = new Uint8Array(size);
    let at = 0;
    for (const p of parts) {
      bytes.set(p, at);
      at += p.length;
    }
    parts = [];
    size = 0;
    return decoder.decode(bytes);
  };
  for await (const chunk of stream) {
    let start = 0;
    while (start <= chunk.length) {
      const nl = chunk.indexOf(0x0a, start);
      const end = nl < 0 ? chunk.length : nl;
      if (!overlong && end > start) {
        if (size + end - start > max) {
          overlong = true;
          parts = [];
          size = 0;
        } else {
          parts.push(chunk.slice(start, end));
          size += end - start;
        }
      }
      if (nl < 0) break;
      yield overlong ? OVERLONG : line();
      overlong = false;
      start = nl + 1;
    }
  }
  if (overlong) yield OVERLONG;
  else if (size > 0) yield line();
}

/** Reads a log stream into `ledger`, line by line: memory bounded by one line and what the ledger keeps. */
export async function readInto(ledger: Ledger, stream: AsyncIterable<Uint8Array>): Promise<void> {
  for await (const line of boundedLines(stream)) {
    if (line === OVERLONG) ledger.skip(SKIP.overlong);
    else ledger.addLine(line);
  }
}

/** A file's lines (or standard input's, for `-`) into a new ledger. */
export async function readLedger(path: string, filter: LedgerFilter = {}): Promise<Ledger> {
  const ledger = new Ledger(filter);
  if (path === "-") {
    await readInto(ledger, Deno.stdin.readable);
  } else {
    using file = await Deno.open(path);
    await readInto(ledger, file.readable);
  }
  return ledger;
}

/** What `report` or `expect` answers: the exit code, standard output, standard error, the job summary. */
export interface LedgerAnswer {
  code: number;
  out: string;
  err: string[];
  summary: string;
}

/** What was read, for the operator: where it came from (`a.jsonl`, `standard input`, `the log group X`). */
export interface LedgerSource {
  name: string;
  /** A file or standard input: holding no listener event at all means the wrong input (refused). */
  isFile: boolean;
}

/**
 * `report`: every message's attempts; 0 when there is at least one, 1 when the listener's log
 * holds none (no message reached it). `expect`: 0 when every expectation holds, 1 naming each
 * that does not. Both: 2 when a file holds no line of the listener's JSON log at all (the text
 * rendering, or another file: nothing was measured), and what was skipped, said on standard
 * error and in the summary.
 */
export function ledgerAnswer(
  command: "report" | "expect",
  ledger: Ledger,
  source: LedgerSource,
  o: { json: boolean; expectation?: Expectation },
): LedgerAnswer {
  const err: string[] = [];
  source = { ...source, name: printable(source.name) };
  const skipped = ledger.skippedText();
  if (skipped.length) err.push(`ctl: skipped in ${source.name}: ${skipped.join(", ")}`);
  if (source.isFile && ledger.events === 0) {
    const why = `${source.name} holds no line of the listener's JSON log (${ledger.textLines} other line(s)): ` +
      "the ledger reads the listener's JSON lines (SINKHOLE_LOG_FORMAT=json), not its text rendering";
    err.push(`ctl: refused: ${why}`);
    return { code: EXIT.refused, out: "", err, summary: `### ⛔ sinkhole ${command}: refused\n\n- ${why}\n\n` };
  }
  const hs = ledger.histories();
  if (ledger.beforeSince) err.push(`ctl: left out ${ledger.beforeSince} attempt(s) before --since`);
  if (command === "report") {
    const out = o.json ? safeJson(hs, 2) : renderReport(hs).join("\n");
    if (hs.length === 0) err.push(`ctl: no attempt in ${source.name}: no message reached the listener`);
    return { code: hs.length ? EXIT.ok : EXIT.unwanted, out, err, summary: markdownReport(hs, skipped) };
  }
  const x = o.expectation!;
  const problems = unmet(hs, x);
  const text = problems.length
    ? problems.map((p) => `unmet: ${p}`)
    : [`met: every expectation for ${printable(x.message)}`];
  const out = o.json
    ? safeJson({ message: x.message, met: problems.length === 0, unmet: problems, skipped: ledger.skippedText() })
    : text.join("\n");
  const summary = `### sinkhole expect: ${problems.length ? "⚠️ unmet" : "✅ met"}\n\n` +
    text.map((t) => `- ${markdownEscape(t)}`).join("\n") +
    (skipped.length ? `\n- skipped: ${skipped.join(", ")}` : "") +
    "\n\n";
  return { code: problems.length ? EXIT.unwanted : EXIT.ok, out, err, summary };
}
