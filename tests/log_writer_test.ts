/**
 * The log writer (issue 21): lines go to stdout in the background, at most MAX_LOG_QUEUE_BYTES
 * of them waiting; a stdout read slowly holds up the log, never the sessions, and what did not
 * fit is counted and said in one `log_dropped` line where the gap is.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import { prng, REPLY_WAIT_MS, ROOT, taskCommand, transaction } from "../rig/helpers.ts";
import {
  isoTime,
  LOG_DRAIN_ON_STOP_MS,
  type LogLine,
  LogQueue,
  MAX_LOG_QUEUE_BYTES,
  MAX_LOGGED_HEADER_BYTES,
  parseLogLine,
  utf8Length,
} from "../listener.ts";

const dec = new TextDecoder();
/** What `take` writes for a gap in these tables. */
const said = (lines: number, octets: number) => `dropped ${lines} ${octets}\n`;
/** Room for `said`'s line in each half, in these tables. */
const NOTE = 16;

Deno.test("log queue: whole lines in order up to the cap; past it counted, and said once where the gap is", () => {
  // `cap`: octets of lines a half holds (the queue holds 2 × (cap + NOTE)).
  const cases: { name: string; cap: number; steps: (string | "take")[]; out: string[] }[] = [
    { name: "nothing queued: nothing to write", cap: 10, steps: ["take"], out: [] },
    { name: "lines in order, one write", cap: 10, steps: ["ab", "cd", "take"], out: ["ab\ncd\n"] },
    { name: "a line exactly at the cap fits", cap: 6, steps: ["ab", "cd", "take"], out: ["ab\ncd\n"] },
    { name: "the line past the cap is counted", cap: 5, steps: ["ab", "cd", "take"], out: ["ab\ndropped 1 3\n"] },
    {
      name: "after a drop, a line that would fit is dropped too (one gap, one note)",
      cap: 6,
      steps: ["ab", "cdefg", "h", "take"],
      out: ["ab\ndropped 2 8\n"],
    },
    {
      name: "the writer caught up: lines are queued again (in the other half), the counts start over",
      cap: 5,
      steps: ["ab", "cd", "take", "ef", "take", "gh", "take"],
      out: ["ab\ndropped 1 3\n", "ef\n", "gh\n"],
    },
    { name: "only drops: the note alone", cap: 2, steps: ["abc", "take", "take"], out: ["dropped 1 4\n"] },
    {
      name: "octets, not characters: é is 2, € 3, 😀 4",
      cap: 8,
      steps: ["é€", "😀😀", "take"],
      out: ["é€\ndropped 1 9\n"],
    },
  ];
  for (const c of cases) {
    const q = new LogQueue(2 * (c.cap + NOTE), NOTE);
    const out: string[] = [];
    for (const step of c.steps) {
      if (step !== "take") {
        q.push(step + "\n");
        assert(q.bytes <= c.cap, `${c.name}: ${q.bytes} octets queued over ${c.cap}`);
        continue;
      }
      const all = q.take(said);
      if (all) out.push(dec.decode(all));
    }
    assertEquals(out, c.out, c.name);
  }
  // A half taken stays as it was while the other fills (the writer writes it meanwhile).
  const q = new LogQueue(2 * (8 + NOTE), NOTE);
  q.push("one\n");
  const taken = q.take(said)!;
  q.push("two\n");
  q.push(new TextEncoder().encode("six\n"));
  assertEquals([dec.decode(taken), dec.decode(q.take(said))], ["one\n", "two\nsix\n"]);
  for (const s of ["", "abc", "é", "€uro", "😀", "a\u2028b", "\ud800x"]) {
    assertEquals(utf8Length(s), s.includes("\ud800") ? 3 : new TextEncoder().encode(s).length, JSON.stringify(s));
  }
});

Deno.test("log lines' time: isoTime is toISOString, ms by ms, across seconds, back in time (a clock stepped back) and far apart", () => {
  const start = Date.UTC(2026, 10, 30, 23, 59, 58, 990);
  const steps = [
    0,
    1,
    9,
    10,
    99,
    100,
    999,
    1000,
    1001,
    start,
    start - 1, // back within the second
    start - 990, // back to an earlier second
    start + 10, // the next day
    Date.UTC(2027, 0, 1) - 1,
    Date.UTC(2027, 0, 1),
  ];
  for (let ms = start; ms < start + 3000; ms++) steps.push(ms); // second and day boundaries, ms after ms
  const rand = prng(21);
  for (let i = 0; i < 2000; i++) steps.push(Math.floor(rand() * 4102444800000)); // 1970 to 2100
  for (const ms of steps) assertEquals(isoTime(ms), new Date(ms).toISOString(), String(ms));
});

/**
 * The listener with its stdout piped to a reader that stops reading once it has the start line:
 * sessions are served all the same, and when the reader reads again every line written or
 * dropped is accounted for.
 */
/** A listener in accept-log whose stdout this test reads only when it says so. */
async function unreadListener() {
  const [cmd, ...args] = taskCommand("start");
  const child = new Deno.Command(cmd, {
    args,
    cwd: ROOT,
    env: {
      SINKHOLE_BIND_HOST: "127.0.0.1",
      SINKHOLE_BIND_PORT: "0",
      SINKHOLE_HEALTH_HOST: "127.0.0.1",
      SINKHOLE_HEALTH_PORT: "0",
      SINKHOLE_MODE: "accept-log",
      NO_COLOR: "1",
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const lines: LogLine[] = [];
  let rest = "";
  /** Reads on until `until` says stop (or stdout ends). */
  const readUntil = async (until: () => boolean) => {
    while (!until()) {
      const { value, done } = await reader.read();
      if (done) return;
      rest += value;
      for (let nl; (nl = rest.indexOf("\n")) >= 0; rest = rest.slice(nl + 1)) {
        const l = parseLogLine(rest.slice(0, nl));
        assert(l, `a line that is not an event: ${rest.slice(0, nl)}`);
        lines.push(l);
      }
    }
  };
  await readUntil(() => lines.some((l) => l.event === "start"));
  const start = lines.find((l) => l.event === "start")!;
  const port = Number((start as { bind: string }).bind.split(":")[1]);
  return { child, stderr, lines, readUntil, port };
}

/** Each message logs its header section (about MAX_LOGGED_HEADER_BYTES): these log several times what the pipe and the queue hold. */
const TRANSACTIONS = Math.ceil((4 * MAX_LOG_QUEUE_BYTES) / MAX_LOGGED_HEADER_BYTES);

/**
 * Serves TRANSACTIONS messages while nobody reads stdout; bounded: a listener whose log write
 * blocks the event loop would hold them forever.
 */
async function serveUnread(port: number) {
  const headers = Array.from({ length: MAX_LOGGED_HEADER_BYTES / 64 }, (_, i) => `X-Filler-${i}: ${"f".repeat(48)}`);
  const body = headers.join("\r\n") + "\r\nSubject: slow reader\r\n\r\nbody";
  const served = (async () => {
    const codes: number[][] = [];
    for (let i = 0; i < TRANSACTIONS; i++) codes.push(await transaction(port, { to: [`r${i}@sinkhole.test`], body }));
    return codes;
  })();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const codes = await Promise.race([
    served,
    new Promise<undefined>((ok) => timer = setTimeout(() => ok(undefined), REPLY_WAIT_MS * 5)),
  ]).finally(() => clearTimeout(timer));
  assert(codes, `the transactions were not served in ${REPLY_WAIT_MS * 5} ms while stdout was not read`);
  assertEquals(new Set(codes.map((c) => c.join(" "))), new Set(["220 250 250 250 354 250 221"]));
}

Deno.test("log writer: a stdout nobody reads for a while holds up no session; the lines it could not keep are counted and said", async () => {
  const { child, stderr, lines, readUntil, port } = await unreadListener();
  let stopped = false;
  try {
    await serveUnread(port);
    // Now read again: stop the listener, read to the end.
    child.kill("SIGTERM");
    stopped = true;
    await readUntil(() => false);
    const dropped = lines.filter((l) => l.event === "log_dropped") as Extract<LogLine, { event: "log_dropped" }>[];
    assert(dropped.length > 0, "nothing dropped: the test did not fill the queue");
    for (const d of dropped) assert(d.lines > 0 && d.octets > 0, JSON.stringify(d));
    // Every line accounted for: each transaction logs an attempt, a message and a session line; then stop, stopped.
    const after = lines.slice(lines.findIndex((l) => l.event === "start") + 1);
    const written = after.filter((l) => l.event !== "log_dropped").length;
    const droppedLines = dropped.reduce((n, d) => n + d.lines, 0);
    console.log(
      `${TRANSACTIONS} transactions served with stdout unread; then ${written} lines written, ` +
        `${droppedLines} dropped in ${dropped.length} gap(s) (${dropped.reduce((n, d) => n + d.octets, 0)} octets)`,
    );
    assertEquals(written + droppedLines, TRANSACTIONS * 3 + 2, "every line written or counted as dropped");
    // Written before the exit: the last line, or the note that counts it (the queue was still catching up).
    assert(["stopped", "log_dropped"].includes(lines.at(-1)!.event), `the last line: ${JSON.stringify(lines.at(-1))}`);
  } finally {
    if (!stopped) child.kill("SIGTERM");
    await readUntil(() => false).catch(() => {});
    const status = await child.status;
    assertEquals(status.code, 0, await stderr);
  }
});

Deno.test("log writer: a stop with stdout never read again waits LOG_DRAIN_ON_STOP_MS for the log, then exits and says so", async () => {
  const { child, stderr, readUntil, port } = await unreadListener();
  try {
    await serveUnread(port);
    child.kill("SIGTERM");
    // Nobody reads: the write in progress never ends. The listener must still exit, by itself (bounded here).
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      child.status,
      new Promise<undefined>((ok) => timer = setTimeout(() => ok(undefined), LOG_DRAIN_ON_STOP_MS + REPLY_WAIT_MS * 5)),
    ]).finally(() => clearTimeout(timer));
    assert(status, `still running ${LOG_DRAIN_ON_STOP_MS + REPLY_WAIT_MS * 5} ms after SIGTERM with stdout unread`);
    assertEquals(status.code, 0);
    const err = await stderr;
    assert(err.includes("stopping with log lines unwritten"), err);
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await readUntil(() => false).catch(() => {});
    await child.status;
  }
});
