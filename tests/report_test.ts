/**
 * `ctl report` and `ctl expect` on hostile and malformed input: escape sequences and control
 * characters never reach the terminal or the job summary raw; every missing or mistyped field,
 * a bad timestamp, a truncated or overlong line is skipped and counted with its reason, never a
 * crash; the input is streamed in lines of bounded length; 100,000 attempts of one envelope and
 * of 100,000 envelopes are read whole, and attempts past MAX_LEDGER_ATTEMPTS are skipped, said.
 * Exit codes and scoping (--since with --file, --message-id, expect --json, whole --attempts).
 * (Time and memory are measured outside the tests: the closing note of issue 21 has the figures.)
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { main } from "../ctl/ctl.ts";
import { EXIT } from "../ctl/cli.ts";
import {
  boundedLines,
  checkAttempt,
  histories,
  Ledger,
  markdownReport,
  markdownText,
  MAX_LEDGER_ATTEMPTS,
  MAX_LEDGER_LINE_BYTES,
  mermaidText,
  OVERLONG,
  printable,
  readInto,
  renderReport,
  SKIP,
} from "../ctl/report.ts";

/** Runs `ctl argv…` in-process with a job summary file; returns what it printed and summarized. */
async function ctl(argv: string[]) {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-report-" });
  const summary = `${dir}/summary.md`;
  const out: string[] = [];
  const err: string[] = [];
  const env: Record<string, string> = { GITHUB_STEP_SUMMARY: summary };
  try {
    const code = await main(argv, { out: (t) => out.push(t), err: (t) => err.push(t), env: (n) => env[n] });
    const md = await Deno.readTextFile(summary).catch(() => "");
    return { code, stdout: out.join("\n"), stderr: err.join("\n"), summary: md };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function withFile<T>(text: string, fn: (path: string) => Promise<T>): Promise<T> {
  const path = await Deno.makeTempFile({ prefix: "sinkhole-report-", suffix: ".jsonl" });
  try {
    await Deno.writeTextFile(path, text);
    return await fn(path);
  } finally {
    await Deno.remove(path);
  }
}

const T0 = Date.parse("2026-01-01T00:00:00.000Z");
const at = (s: number) => new Date(T0 + s * 1000).toISOString();

/** An attempt event as the listener logs it. */
function attempt(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    ts: at(0),
    event: "attempt",
    key: "a@x.test > b@y.test",
    attempt: 1,
    from: "a@x.test",
    rcpt: "b@y.test",
    stage: "rcpt",
    code: 451,
    client: "127.0.0.1:1",
    tls: false,
    mode: "defer first=2",
    ...over,
  };
}
const line = (v: unknown) => JSON.stringify(v);

/** Characters that must never reach a terminal raw (newline and tab aside, which the report writes itself). */
// deno-lint-ignore no-control-regex -- control characters are what it finds
const RAW_CONTROL = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

const HOSTILE = [
  "\x1b[2J", // clear the screen
  "\x1b]0;pwned\x07", // OSC: set the window title, ended by BEL
  "\x07", // BEL
  "\x9b2J", // C1 CSI
  "\u202egnp.exe", // right-to-left override
  "a\u2028b", // line separator
  "\r\n## heading", // a new line, and Markdown at its start
  "<img src=x onerror=alert(1)>",
  "`code` | cell | [link](http://x.test) $math$ :emoji: **bold**",
  "```\nmermaid-break",
];

Deno.test("report: printable, markdownText and mermaidText leave nothing raw", () => {
  assertEquals(printable("\x1b[2J"), "\\x1b[2J");
  assertEquals(printable("\x1b]0;t\x07"), "\\x1b]0;t\\x07");
  assertEquals(printable("\u202e"), "\\u202e");
  assertEquals(printable("a\\x1b"), "a\\\\x1b", "a literal backslash is escaped: an escape is never ambiguous");
  assertEquals(printable("<ok@x.test> é ü 日本"), "<ok@x.test> é ü 日本", "printable text is left alone");
  for (const h of HOSTILE) {
    assert(!RAW_CONTROL.test(printable(h)), JSON.stringify(h));
    const md = markdownText(h);
    assert(!RAW_CONTROL.test(md) && !/\n/.test(md), JSON.stringify(md));
    assert(!/(^|[^\\])[<`|[\]$*]/.test(md), `no unescaped markup: ${md}`);
    assertMatch(mermaidText(h), /^[A-Za-z0-9@._+-]*$/);
  }
});

Deno.test("report: every missing or mistyped field of an attempt is a reason, never a TypeError", () => {
  assertEquals(typeof checkAttempt(attempt()), "object");
  assertEquals(typeof checkAttempt(attempt({ code: undefined, dropped: true })), "object");
  const { tls: _, mode: __, ...noTlsNoMode } = attempt();
  assertEquals(typeof checkAttempt(noTlsNoMode), "object", "tls and mode may be absent (not known)");
  const without = (name: string) => {
    const v = attempt();
    delete v[name];
    return v;
  };
  const table: [string, Record<string, unknown>, string][] = [
    ["no ts", without("ts"), SKIP.badTimestamp],
    ["ts a number", attempt({ ts: 1 }), SKIP.badTimestamp],
    ["ts not ISO", attempt({ ts: "yesterday" }), SKIP.badTimestamp],
    ["ts local time", attempt({ ts: "2026-01-01T00:00:00" }), SKIP.badTimestamp],
    ["ts impossible", attempt({ ts: "2026-13-45T25:61:00.000Z" }), SKIP.badTimestamp],
    ["ts with an escape", attempt({ ts: "2026-01-01T00:00:00.000Z\x1b[2J" }), SKIP.badTimestamp],
  ];
  for (const name of ["key", "from", "rcpt", "client"]) {
    table.push([`no ${name}`, without(name), SKIP.field(name)]);
    table.push([`${name} a number`, attempt({ [name]: 7 }), SKIP.field(name)]);
    table.push([`${name} an object`, attempt({ [name]: { toString: 1 } }), SKIP.field(name)]);
  }
  table.push(
    ["no attempt", without("attempt"), SKIP.field("attempt")],
    ["attempt a string", attempt({ attempt: "1" }), SKIP.field("attempt")],
    ["attempt 0", attempt({ attempt: 0 }), SKIP.field("attempt")],
    ["attempt 1.5", attempt({ attempt: 1.5 }), SKIP.field("attempt")],
    ["attempt huge", attempt({ attempt: 2 ** 60 }), SKIP.field("attempt")],
    ["no stage", without("stage"), SKIP.field("stage")],
    ["stage unknown", attempt({ stage: "helo" }), SKIP.field("stage")],
    ["code a string", attempt({ code: "451" }), SKIP.field("code")],
    ["code 42", attempt({ code: 42 }), SKIP.field("code")],
    ["code 451.5", attempt({ code: 451.5 }), SKIP.field("code")],
    ["neither code nor dropped", without("code"), SKIP.field("code (or dropped or unheard)")],
    ["both code and dropped", attempt({ dropped: true }), SKIP.field("code (or dropped or unheard)")],
    ["both code and unheard", attempt({ unheard: true }), SKIP.field("code (or dropped or unheard)")],
    ["unheard false", attempt({ code: undefined, unheard: false }), SKIP.field("unheard")],
    ["dropped false", attempt({ code: undefined, dropped: false }), SKIP.field("dropped")],
    ["messageId a number", attempt({ messageId: 5 }), SKIP.field("messageId")],
    ["tls a string", attempt({ tls: "yes" }), SKIP.field("tls")],
    ["mode a list", attempt({ mode: ["defer"] }), SKIP.field("mode")],
  );
  for (const [name, v, reason] of table) assertEquals(checkAttempt(v), reason, name);
  // histories (what the probe and the rehearsal call) on the same input: the usable one only.
  const hs = histories([...table.map(([, v]) => v), null, 3, "text", [], attempt()]);
  assertEquals(hs.length, 1);
  assertEquals(hs[0].attempts.length, 1);
});

Deno.test("report: lines are read in bounded length, across any chunking", async () => {
  const enc = new TextEncoder();
  const read = async (chunks: string[] | Uint8Array[], max: number) => {
    const out: (string | typeof OVERLONG)[] = [];
    const stream = (async function* () {
      for (const c of chunks) yield typeof c === "string" ? enc.encode(c) : c;
    })();
    for await (const l of boundedLines(stream, max)) out.push(l);
    return out;
  };
  assertEquals(await read(["ab\ncd\n"], 10), ["ab", "cd"]);
  assertEquals(await read(["a", "b\nc", "d"], 10), ["ab", "cd"], "a last line without a newline is read too");
  assertEquals(await read(["\n\n"], 10), ["", ""]);
  assertEquals(await read(["0123456789\n"], 10), ["0123456789"], "exactly the bound");
  assertEquals(await read(["01234567890\nok\n"], 10), [OVERLONG, "ok"], "one byte over");
  assertEquals(await read(["01234", "56789", "0", "xyz\nok"], 10), [OVERLONG, "ok"], "over, across chunks");
  assertEquals(await read(["0123456789abc"], 10), [OVERLONG], "over, at the end");
  const e = enc.encode("é\n");
  assertEquals(await read([e.slice(0, 1), e.slice(1)], 10), ["é"], "a character split across chunks");
  assertEquals(MAX_LEDGER_LINE_BYTES >= 200 * 1024, true, "room for the listener's longest line");
});

Deno.test("report: hostile text in every field is escaped on the terminal, in JSON and in the summary", async () => {
  const lines = HOSTILE.flatMap((h, i) => [
    line(attempt({ key: `${h} > b${i}@y.test`, from: h, rcpt: `${h}@y.test`, client: h, mode: h, ts: at(i) })),
    line(attempt({
      key: `${h} > b${i}@y.test`,
      from: h,
      rcpt: `${h}@y.test`,
      client: h,
      messageId: h,
      ts: at(i + 1),
      attempt: 2,
      stage: "eod",
      code: 250,
    })),
  ]);
  await withFile(lines.join("\n") + "\n", async (path) => {
    const r = await ctl(["report", "--file", path]);
    assertEquals(r.code, EXIT.ok, r.stderr);
    assertEquals(r.stdout.split("\n").filter((l) => l.endsWith("delivered once")).length, HOSTILE.length);
    for (const [where, text] of Object.entries({ stdout: r.stdout, stderr: r.stderr, summary: r.summary })) {
      assert(!RAW_CONTROL.test(text), `${where} holds a raw control character: ${JSON.stringify(text)}`);
    }
    assertMatch(r.stdout, /\\x1b\[2J/, "the escape is shown, escaped");
    assertMatch(r.stdout, /\\x1b\]0;pwned\\x07/);
    assert(!/(^|[^\\])<img/m.test(r.summary), "no HTML from the input in the summary");
    assert(!/^```\nmermaid-break/m.test(r.summary), "a fence in the input does not close the summary's");
    assertEquals((r.summary.match(/^```/gm) ?? []).length, 2 * HOSTILE.length, "every fence opened is closed");
    const json = await ctl(["report", "--file", path, "--json"]);
    assertEquals(JSON.parse(json.stdout).length, HOSTILE.length, "JSON carries the text as JSON strings");
    assert(!RAW_CONTROL.test(json.stdout));
    const x = await ctl(["expect", "\x1b[2J > b0@y.test", "--attempts", "2", "--file", path]);
    assertEquals(x.code, EXIT.ok, x.stdout + x.stderr);
    assert(!RAW_CONTROL.test(x.stdout + x.summary), JSON.stringify(x.stdout));
  });
});

Deno.test("report: malformed lines are skipped and counted by reason; the rest is reported", async () => {
  const good = [line(attempt()), line(attempt({ attempt: 2, ts: at(60), stage: "eod", code: 250 }))];
  const lines = [
    good[0],
    line(attempt({ ts: "not a time" })),
    line(attempt({ rcpt: 5 })),
    line(attempt({ rcpt: undefined })),
    line(attempt({ stage: "quit" })),
    line(attempt({ code: undefined })),
    line({ ts: at(1), event: "session", client: "x" }),
    "22:42:47.937 attempt 1 of <a@x.test> → <b@y.test>: 250 at eod",
    "{".padEnd(MAX_LEDGER_LINE_BYTES + 10, "x"),
    "null",
    "[1,2]",
    good[1],
    good[1].slice(0, 40), // a truncated last line (the log was still being written)
  ];
  await withFile(lines.join("\n"), async (path) => {
    const r = await ctl(["report", "--file", path]);
    assertEquals(r.code, EXIT.ok, r.stderr);
    assertMatch(r.stdout, /^a@x\.test > b@y\.test: 2 attempt\(s\), delivered once$/m);
    const skipped = r.stderr.match(/^ctl: skipped in .*?: (.*)$/m)![1].split(", ").sort();
    assertEquals(
      skipped,
      [
        `1 ${SKIP.badTimestamp}`,
        `1 ${SKIP.brokenJson}`,
        `1 ${SKIP.field("stage")}`,
        `1 ${SKIP.field("code (or dropped or unheard)")}`,
        `1 ${SKIP.overlong}`,
        `2 ${SKIP.field("rcpt")}`,
      ].sort(),
    );
    assertMatch(r.summary, /^Skipped: /m);
  });
});

/** A stream of `n` attempt lines, made as it is read (nothing held whole). */
function attemptStream(n: number, of: (i: number) => Record<string, unknown>): AsyncIterable<Uint8Array> {
  const enc = new TextEncoder();
  return (async function* () {
    const BATCH = 2000;
    for (let i = 0; i < n; i += BATCH) {
      let text = "";
      for (let k = i; k < Math.min(n, i + BATCH); k++) text += line(of(k)) + "\n";
      yield enc.encode(text);
    }
  })();
}

Deno.test("report: 100,000 attempts of one envelope, all handed over with one Message-ID: one message, a duplicate", async () => {
  const ledger = new Ledger();
  const n = 100_000;
  await readInto(
    ledger,
    attemptStream(
      n,
      (i) => attempt({ attempt: i + 1, ts: at(i), stage: "eod", code: 250, messageId: "<same@x.test>" }),
    ),
  );
  assertEquals(ledger.kept, n);
  const [h, ...rest] = ledger.histories();
  assertEquals(rest.length, 0);
  assertEquals(h.attempts.length, n);
  assertEquals(h.deliveries, n);
  assert(h.duplicate);
  assertEquals(h.attempts.at(-1)!.intervalS, 1);
  const text = renderReport([h]);
  assertEquals(text.length, n + 1);
  const md = markdownReport([h]);
  assert(md.length < 64 * 1024, `the summary stays small: ${md.length} bytes`);
  assertMatch(md, /… and 99950 more attempt\(s\)\./);
});

Deno.test("report: 100,000 envelopes, then more than MAX_LEDGER_ATTEMPTS: the rest skipped and said", async () => {
  assertEquals(MAX_LEDGER_ATTEMPTS, 100_000);
  const ledger = new Ledger();
  const n = MAX_LEDGER_ATTEMPTS + 5;
  await readInto(ledger, attemptStream(n, (i) => attempt({ key: `a@x.test > r${i}@y.test`, rcpt: `r${i}@y.test` })));
  assertEquals(ledger.kept, MAX_LEDGER_ATTEMPTS);
  assertEquals(ledger.skippedText(), [`5 ${SKIP.beyondLimit}`]);
  const hs = ledger.histories();
  assertEquals(hs.length, MAX_LEDGER_ATTEMPTS);
  const md = markdownReport(hs, ledger.skippedText());
  assert(md.length < 64 * 1024, `the summary stays small: ${md.length} bytes`);
  assertMatch(md, /… and 99980 more message\(s\)/);
  assertMatch(md, /Skipped: 5 attempt beyond the first 100000/);
});

Deno.test("report/expect: exit codes on a log without attempts; --since with --file; --message-id", async () => {
  const start = line({ ts: at(0), event: "start", bind: "127.0.0.1:25", mode: "defer" });
  await withFile(start + "\n", async (path) => {
    // The listener's log, but no message reached it: done, not as wanted; an expectation unmet.
    const r = await ctl(["report", "--file", path]);
    assertEquals(r.code, EXIT.unwanted, r.stderr);
    assertMatch(r.stderr, /no attempt in .*: no message reached the listener/);
    const x = await ctl(["expect", "b@y.test", "--attempts", "1..", "--file", path]);
    assertEquals(x.code, EXIT.unwanted);
    assertEquals(x.stdout, "unmet: no attempt logged for b@y.test");
  });
  const now = Date.now();
  const iso = (msAgo: number) => new Date(now - msAgo).toISOString();
  const lines = [
    attempt({ ts: iso(3 * 3600_000), key: "old@x.test > b@y.test", from: "old@x.test" }),
    attempt({ ts: iso(120_000) }),
    attempt({ ts: iso(60_000), attempt: 2, stage: "eod", code: 250, messageId: "<wanted@x.test>" }),
    attempt({ ts: iso(30_000), key: "c@x.test > d@y.test", from: "c@x.test", rcpt: "d@y.test" }),
  ].map(line);
  await withFile(lines.join("\n") + "\n", async (path) => {
    const all = await ctl(["report", "--file", path]);
    assertEquals(all.code, EXIT.ok);
    assertMatch(all.stdout, /^old@x\.test > b@y\.test: /m, "without --since, a file is read whole");
    const recent = await ctl(["report", "--file", path, "--since", "60"]);
    assertEquals(recent.code, EXIT.ok, recent.stderr);
    assert(!/old@x\.test/.test(recent.stdout), "--since applies with --file");
    assertMatch(recent.stderr, /left out 1 attempt\(s\) before --since/);
    for (const id of ["<wanted@x.test>", "wanted@x.test"]) {
      const one = await ctl(["report", "--file", path, "--message-id", id]);
      assertEquals(one.code, EXIT.ok, one.stderr);
      // The whole message: its earlier attempt, refused before the Message-ID was known, too.
      assertEquals(one.stdout.split("\n")[0], "a@x.test > b@y.test: 2 attempt(s), delivered once");
      assert(!/c@x\.test|old@x\.test/.test(one.stdout), one.stdout);
    }
    const none = await ctl(["report", "--file", path, "--message-id", "<nobody@x.test>"]);
    assertEquals(none.code, EXIT.unwanted);
    const x = await ctl(["expect", "b@y.test", "--message-id", "wanted@x.test", "--attempts", "2", "--file", path]);
    assertEquals(x.code, EXIT.ok, x.stdout);
    const json = await ctl([
      "expect",
      "b@y.test",
      "--message-id",
      "wanted@x.test",
      "--attempts",
      "3",
      "--delivered-once",
      "--file",
      path,
      "--json",
    ]);
    assertEquals(json.code, EXIT.unwanted);
    assertEquals(JSON.parse(json.stdout), {
      message: "b@y.test",
      met: false,
      unmet: ["a@x.test > b@y.test: 2 attempt(s), expected 3"],
      skipped: [],
    });
  });
  for (const bad of ["3.5", "1..2.5", "1.0"]) {
    const r = await ctl(["expect", "b@y.test", "--attempts", bad, "--file", "-"]);
    assertEquals(r.code, EXIT.refused, bad);
    assertMatch(r.stderr, /--attempts must be N or MIN\.\.MAX, got .* \(whole numbers\)/);
  }
});
