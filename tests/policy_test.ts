/** The pure reply logic, table-tested: every mode × every command × every state. */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { play, SERVER } from "./policy.ts";
import {
  type Abandon,
  abandoned,
  ATTEMPT_COUNT_SPAN,
  ATTEMPT_ENTRY_BYTES,
  type AttemptEntry,
  type AttemptEvent,
  attemptKey,
  AttemptTable,
  configFromEnv,
  counted,
  decide,
  DigestTable,
  ended,
  endOfData,
  FIRST_SEEN_SPAN,
  formatReply,
  greeting,
  GREYLIST_ENTRY_BYTES,
  GreylistTable,
  type GreylistVerdict,
  greylistVerdict,
  inFailingPhase,
  keptRecipientCost,
  MAX_ATTEMPT_ENTRIES,
  MAX_ERRORS_PER_SESSION,
  MAX_GREYLIST_ENTRIES,
  MAX_KEPT_RCPT_BYTES,
  MAX_MESSAGE_BYTES,
  MAX_RECIPIENTS,
  MAX_TLS_SESSIONS,
  ModeCache,
  MODES,
  packAttempt,
  parseMailbox,
  parsePathArg,
  type Point,
  pooledOf,
  REPLIES,
  respond,
  respondToBadLine,
  type Scenario,
  scenario,
  seededUnit,
  type Stateful,
  type Transaction,
  unpackAttempt,
} from "../listener.ts";

/** What each mode answers to RCPT and then to DATA. */
const MODE_TABLE: {
  mode: string;
  greylist?: GreylistVerdict;
  rcpt: string;
  close?: boolean;
  data?: number;
}[] = [
  { mode: "defer", rcpt: "421 4.3.2 Service temporarily unavailable", close: true },
  { mode: "bounce", rcpt: "550 5.1.1 User unknown", data: 554 },
  { mode: "accept", rcpt: "250 2.1.5 Recipient OK", data: 354 },
  { mode: "accept-log", rcpt: "250 2.1.5 Recipient OK", data: 354 },
  { mode: "greylist", greylist: "defer", rcpt: "451 4.7.1 Greylisted, please try again later", data: 554 },
  { mode: "greylist", greylist: "pass", rcpt: "250 2.1.5 Recipient OK", data: 354 },
];

const STATES: Record<string, string[]> = {
  start: [],
  greeted: ["EHLO client.test"],
  mail: ["EHLO client.test", "MAIL FROM:<a@origin.test>"],
  rcpt: ["EHLO client.test", "MAIL FROM:<a@origin.test>", "RCPT TO:<b@sinkhole.test>"],
};

const COMMANDS = [
  "HELO client.test",
  "EHLO client.test",
  "MAIL FROM:<a@origin.test>",
  "RCPT TO:<c@sinkhole.test>",
  "DATA",
  "RSET",
  "NOOP",
  "QUIT",
  "VRFY someone",
  "HELP",
  "EXPN list",
  "STARTTLS",
  "AUTH PLAIN",
  "BDAT 10 LAST",
  "XYZZY",
];

/** Expected code for a command in a state, given the mode's row. */
function expected(state: string, command: string, row: typeof MODE_TABLE[number]): number {
  const verb = command.split(" ")[0];
  const rcptCode = Number(row.rcpt.slice(0, 3));
  switch (verb) {
    case "HELO":
    case "EHLO":
    case "RSET":
    case "NOOP":
      return 250;
    case "QUIT":
      return 221;
    case "VRFY":
      return 252;
    case "HELP":
      return 214;
    case "EXPN":
    case "STARTTLS":
    case "AUTH":
    case "BDAT":
      return 502;
    case "MAIL":
      return state === "greeted" ? 250 : 503;
    case "RCPT":
      return state === "mail" || state === "rcpt" ? rcptCode : 503;
    case "DATA":
      return state === "rcpt" ? row.data! : 503;
    default:
      return 500;
  }
}

for (const row of MODE_TABLE) {
  const label = row.mode + (row.greylist ? `/${row.greylist}` : "");
  Deno.test(`policy: ${label}: RCPT gets "${row.rcpt}"`, () => {
    const { last } = play(row.mode, [...STATES.mail, "RCPT TO:<b@sinkhole.test>"], row.greylist);
    assertEquals(formatReply(last.reply), row.rcpt + "\r\n");
    assertEquals(last.after === "close", row.close ?? false);
  });

  Deno.test(`policy: ${label}: every command in every state`, () => {
    for (const [state, prefix] of Object.entries(STATES)) {
      if (state === "rcpt" && row.close) continue; // defer closed the session at the first RCPT
      for (const command of COMMANDS) {
        const { last, codes } = play(row.mode, [...prefix, command], row.greylist);
        assertEquals(
          last.reply.code,
          expected(state, command, row),
          `${label} in ${state}: ${command} (codes ${codes.join(",")})`,
        );
        const verb = command.split(" ")[0];
        assertEquals(
          last.after === "close",
          verb === "QUIT" || (verb === "RCPT" && (state === "mail" || state === "rcpt") && !!row.close),
          `${label} in ${state}: ${command} closes?`,
        );
        assertEquals(last.after === "data", verb === "DATA" && last.reply.code === 354);
      }
    }
  });
}

Deno.test("policy: the mode is fixed per transaction, read at MAIL", () => {
  const inputs = (mode: string) => ({ scenario: scenario(mode), serverName: SERVER });
  let state = play("accept", STATES.mail).state;
  const out = respond(state, "RCPT TO:<b@sinkhole.test>", inputs("bounce"));
  assertEquals(out.reply.code, 250, "a mode change mid-transaction does not apply");
  state = respond(out.state, "RSET", inputs("bounce")).state;
  state = respond(state, "MAIL FROM:<a@origin.test>", inputs("bounce")).state;
  assertEquals(respond(state, "RCPT TO:<b@sinkhole.test>", inputs("bounce")).reply.code, 550);
});

Deno.test("policy: greylist by IP asks once per transaction and keeps the answer", () => {
  const { codes, asked } = play("greylist", [...STATES.mail, "RCPT TO:<b@sinkhole.test>", "RCPT TO:<c@sinkhole.test>"]);
  assertEquals(codes.slice(-2), [451, 451], "same answer for every recipient of the transaction");
  assertEquals(asked, ["192.0.2.1"]);
  assertEquals(play("accept", [...STATES.mail, "RCPT TO:<b@sinkhole.test>"]).asked, [], "only greylist mode asks");
});

Deno.test("policy: EHLO advertises only what is implemented", () => {
  const { last } = play("accept", ["EHLO client.test"]);
  assertEquals(last.reply.lines, [
    `${SERVER} greets client.test`,
    "PIPELINING",
    `SIZE ${MAX_MESSAGE_BYTES}`,
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
  ]);
  assertEquals(
    formatReply(last.reply).split("\r\n").slice(0, 2),
    [`250-${SERVER} greets client.test`, "250-PIPELINING"],
  );
});

/** Syntax: line after EHLO (and MAIL where the row says so) → exact reply. */
const SYNTAX: [string[], string][] = [
  [["HELO"], "501 5.5.4 Syntax: HELO hostname"],
  [["EHLO"], "501 5.5.4 Syntax: EHLO hostname"],
  [["MAIL FROM:a@origin.test"], "501 5.5.4 Syntax: MAIL FROM:<address>"],
  [["MAIL TO:<a@origin.test>"], "501 5.5.4 Syntax: MAIL FROM:<address>"],
  [["MAIL FROM:<a b@origin.test>"], "501 5.1.7 Bad sender address syntax"],
  [["MAIL FROM:<a@>"], "501 5.1.7 Bad sender address syntax"],
  [["MAIL FROM:<>"], "250 2.1.0 Sender OK"],
  [["MAIL FROM: <a@origin.test>"], "250 2.1.0 Sender OK"],
  [["mail from:<a@origin.test>"], "250 2.1.0 Sender OK"],
  [["MAIL FROM:<a@origin.test> SIZE=1000 BODY=8BITMIME"], "250 2.1.0 Sender OK"],
  [[`MAIL FROM:<a@origin.test> SIZE=${MAX_MESSAGE_BYTES + 1}`], "552 5.3.4 Message size exceeds fixed limit"],
  [["MAIL FROM:<a@origin.test> SIZE=lots"], "501 5.5.4 Syntax: MAIL FROM:<address>"],
  [["MAIL FROM:<a@origin.test> BODY=BINARYMIME"], "555 5.5.4 Unsupported parameter"],
  [["MAIL FROM:<a@origin.test> SMTPUTF8"], "555 5.5.4 Unsupported parameter"],
  [["MAIL FROM:<a@origin.test>", "RCPT TO:<postmaster>"], "250 2.1.5 Recipient OK"],
  [["MAIL FROM:<a@origin.test>", "RCPT TO:<@relay.test,@b.test:u@sinkhole.test>"], "250 2.1.5 Recipient OK"],
  [["MAIL FROM:<a@origin.test>", 'RCPT TO:<"odd name"@sinkhole.test>'], "250 2.1.5 Recipient OK"],
  [["MAIL FROM:<a@origin.test>", "RCPT TO:<u@[127.0.0.2]>"], "250 2.1.5 Recipient OK"],
  [["MAIL FROM:<a@origin.test>", "RCPT TO:<no-at-sign>"], "501 5.1.3 Bad recipient address syntax"],
  [["MAIL FROM:<a@origin.test>", "RCPT TO:<u@sinkhole.test> NOTIFY=NEVER"], "555 5.5.4 Unsupported parameter"],
  [["MAIL FROM:<a@origin.test>", "RCPT TO:u@sinkhole.test"], "501 5.5.4 Syntax: RCPT TO:<address>"],
  [["MAIL FROM:<a@origin.test>", "RCPT FROM:<u@sinkhole.test>"], "501 5.5.4 Syntax: RCPT TO:<address>"],
  [
    ["MAIL FROM:<a@origin.test>", `RCPT TO:<${"x".repeat(65)}@sinkhole.test>`],
    "501 5.1.3 Bad recipient address syntax",
  ],
  [["DATA now"], "501 5.5.4 Syntax error, no parameters allowed"],
  [["RSET everything"], "501 5.5.4 Syntax error, no parameters allowed"],
  [["VRFY"], "501 5.5.4 Syntax: VRFY address"],
  [["MAIL FROM:<a@origin.test>", "MAIL FROM:<a@origin.test>"], "503 5.5.1 Sender already specified"],
  [["MAIL FROM:<a@origin.test>", "DATA"], "503 5.5.1 Need RCPT before DATA"],
  [["RCPT TO:<u@sinkhole.test>"], "503 5.5.1 Need MAIL before RCPT"],
  [["MAIL FROM:<a@origin.test>", "RSET", "RCPT TO:<u@sinkhole.test>"], "503 5.5.1 Need MAIL before RCPT"],
  [["MAIL FROM:<a@origin.test>", "EHLO again.test", "RCPT TO:<u@sinkhole.test>"], "503 5.5.1 Need MAIL before RCPT"],
];

Deno.test("policy: syntax and sequence replies", () => {
  for (const [lines, reply] of SYNTAX) {
    const { last } = play("accept", ["EHLO client.test", ...lines]);
    assertEquals(formatReply(last.reply), reply + "\r\n", lines.join(" | "));
  }
  assertEquals(
    formatReply(play("accept", ["MAIL FROM:<a@origin.test>"]).last.reply),
    "503 5.5.1 Send HELO or EHLO first\r\n",
  );
});

Deno.test("policy: recipients past the cap get 452 4.5.3, each an attempt of its message, and the transaction goes on", () => {
  const rcpts = Array.from({ length: MAX_RECIPIENTS + 5 }, (_, i) => `RCPT TO:<u${i}@sinkhole.test>`);
  for (const mode of ["accept", "bounce"]) {
    const { codes, state, outs } = play(mode, [...STATES.mail, ...rcpts, "DATA"]);
    const rcptCodes = codes.slice(2, -1);
    assertEquals(rcptCodes.slice(MAX_RECIPIENTS), [452, 452, 452, 452, 452], mode);
    assertEquals(state.tx?.acceptedCount, mode === "accept" ? MAX_RECIPIENTS : 0);
    // The MTA defers those recipients and sends them again: each 452 is an attempt, counted and logged at once.
    const past = outs.slice(2 + MAX_RECIPIENTS, -1);
    assertEquals(
      past.map((o) => o.attempt?.key),
      rcpts.slice(MAX_RECIPIENTS).map((_, i) => `a@origin.test > u${MAX_RECIPIENTS + i}@sinkhole.test`),
      mode,
    );
    assertEquals(
      past.map((o) => o.events?.map((e) => e.event === "attempt" ? [e.rcpt, e.stage, e.code] : e.event)),
      rcpts.slice(MAX_RECIPIENTS).map((_, i) => [[`u${MAX_RECIPIENTS + i}@sinkhole.test`, "rcpt", 452]]),
      mode,
    );
  }
  assertEquals(play("accept", [...STATES.mail, ...rcpts, "DATA"]).codes.at(-1), 354);
});

/**
 * The shared recipient pool at RCPT: a transaction keeps its accepted recipients in its own
 * MAX_KEPT_RCPT_BYTES, then draws each one's whole cost from the pool; an accepted recipient
 * neither holds is 452 4.5.3, an attempt counted and logged like any refusal; a recipient refused anyway
 * needs no room, so the scenario's own answer stands.
 */
Deno.test("policy: an accepted recipient beyond the transaction's bytes draws on the shared pool, or is 452 4.5.3", () => {
  const box = "b@sinkhole.test";
  const cost = keptRecipientCost(box);
  const own = (sc: Scenario, used: number): Transaction => ({ ...emptyTx(sc), acceptedBytes: used, acceptedCount: 1 });
  // [mode, octets the transaction holds, the pool's free octets, the reply, counted as an attempt]
  const rows: [string, number, number | undefined, number, boolean][] = [
    ["accept", 0, 0, 250, true], // its own bytes hold it: the pool is not asked
    ["accept", MAX_KEPT_RCPT_BYTES - cost, 0, 250, true], // exactly fits its own
    ["accept", MAX_KEPT_RCPT_BYTES - cost + 1, cost, 250, true], // drawn from the pool, exactly its cost
    ["accept", MAX_KEPT_RCPT_BYTES - cost + 1, cost - 1, 452, true], // neither holds it: refused, counted
    ["accept", MAX_KEPT_RCPT_BYTES, 0, 452, true],
    ["accept", MAX_KEPT_RCPT_BYTES, undefined, 250, true], // no pool said: not bounded (the pure engine alone)
    ["defer", MAX_KEPT_RCPT_BYTES, 0, 421, true], // refused anyway: no room needed, its own reply
    ["bounce", MAX_KEPT_RCPT_BYTES, 0, 550, true],
  ];
  for (const [mode, used, free, code, counted] of rows) {
    const sc = scenario(mode);
    const d = decide({
      point: "rcpt",
      inputs: { scenario: sc, serverName: SERVER, rcptPoolFree: free },
      state: { esmtp: true, errors: 0, tx: own(sc, used) },
      rcpt: box,
    });
    const label = `${mode}, ${used} octets kept, pool ${free}`;
    assertEquals((d.fail ?? REPLIES.rcptOk).code, code, label);
    assertEquals(d.attempt !== undefined, counted, label);
    if (code === 452) {
      assertEquals(formatReply(d.fail!), "452 4.5.3 Too many recipients\r\n");
      const e = d.events?.map((e) => e.event === "attempt" ? [e.rcpt, e.stage, e.code] : e.event);
      assertEquals(e, [[box, "rcpt", 452]], "this attempt of the message ends deferred, logged at once");
    }
  }
  // The transaction after it: every accepted recipient kept, its draw said (the session reserves it).
  const rcpts = Array.from(
    { length: 30 },
    (_, i) => `RCPT TO:<${"r".repeat(60)}${String(i).padStart(2, "0")}@sinkhole.test>`,
  );
  const { state, codes } = play("accept", [...STATES.mail, ...rcpts], "defer", { rcptPoolFree: 10 * 1024 });
  const each = keptRecipientCost(`${"r".repeat(60)}10@sinkhole.test`);
  const ownCount = Math.floor(MAX_KEPT_RCPT_BYTES / each);
  assertEquals(state.tx!.accepted.length, 30);
  assertEquals(pooledOf(state), (30 - ownCount) * each);
  assertEquals(codes.slice(2).every((c) => c === 250), true);
});

Deno.test("policy: too many errors closes the session with 421 4.7.0", () => {
  const { outs } = play("accept", Array(MAX_ERRORS_PER_SESSION + 5).fill("BOGUS"));
  assertEquals(outs.length, MAX_ERRORS_PER_SESSION);
  assertEquals(outs.at(-1)!.after, "close");
  assertEquals(outs.at(-1)!.farewell, REPLIES.tooManyErrors);
  assert(outs.slice(0, -1).every((o) => o.after !== "close"));
});

Deno.test("policy: end of data", () => {
  const state = play("accept", [...STATES.rcpt, "DATA"]).state;
  const cases: [{ size: number; longLine: boolean }, string][] = [
    [{ size: 10, longLine: false }, "250 2.0.0 Message accepted and discarded"],
    [{ size: 10, longLine: true }, "554 5.6.0 Message has a line over 1000 octets"],
    [{ size: MAX_MESSAGE_BYTES + 1, longLine: false }, "552 5.3.4 Message size exceeds fixed limit"],
  ];
  for (const [data, reply] of cases) {
    const out = endOfData(state, data);
    assertEquals(formatReply(out.reply), reply + "\r\n");
    assertEquals(out.state.tx, undefined, "the transaction ends");
  }
});

Deno.test("policy: the five plain modes parse, trimmed and case-insensitive", () => {
  for (const m of MODES) {
    assertEquals(scenario(m).base, m);
    assertEquals(scenario(m).text, m);
    assertEquals(scenario(`  ${m.toUpperCase()}\n`).text, m);
  }
});

Deno.test("policy: mailbox and path parsing", () => {
  assertEquals(parseMailbox("a@b.test"), "a@b.test");
  assertEquals(parseMailbox("@r.test:a@b.test"), "a@b.test");
  for (const bad of ["", "a", "@b.test", "a@", "a@@b", "a b@c.test", "a@b..test", "a@-b.test", "a@b.test\x00"]) {
    assertEquals(parseMailbox(bad), undefined, JSON.stringify(bad));
  }
  assertEquals(parsePathArg("FROM:<a@b.test> SIZE=5", "FROM")?.params.get("SIZE"), "5");
  assertEquals(parsePathArg("TO:<a@b.test>", "FROM"), undefined);
});

Deno.test("policy: paths by the RFC 5321 grammar: quoted local parts hold > and <, MAIL FROM and RCPT TO alike", () => {
  // [argument after the keyword, the path parsed (undefined: a syntax error), the mailbox (undefined: refused)]
  const PATHS: [string, string | undefined, string | undefined][] = [
    ["<a@b.test>", "a@b.test", "a@b.test"],
    ['<"x > y"@sinkhole.test>', '"x > y"@sinkhole.test', '"x > y"@sinkhole.test'],
    ['<"x < y"@sinkhole.test>', '"x < y"@sinkhole.test', '"x < y"@sinkhole.test'],
    ['<"a\\"b>"@sinkhole.test>', '"a\\"b>"@sinkhole.test', '"a\\"b>"@sinkhole.test'], // a quoted-pair: \"
    ['<"x@y"@sinkhole.test>', '"x@y"@sinkhole.test', '"x@y"@sinkhole.test'],
    ['<"">', '""', undefined], // no domain
    ["<@r.test,@s.test:a@b.test>", "@r.test,@s.test:a@b.test", "a@b.test"], // a source route, ignored
    ["<a.b@[192.0.2.1]>", "a.b@[192.0.2.1]", "a.b@[192.0.2.1]"],
    ["<x > y@sinkhole.test>", "x ", undefined], // unquoted: > ends the path, which is no mailbox
    ["<x < y@sinkhole.test>", undefined, undefined],
    ['<"x > y@sinkhole.test>', undefined, undefined], // the quote never closes
    ['<"x\\">', undefined, undefined], // the escaped quote leaves the string open
    ["<a@b.test", undefined, undefined],
    ["a@b.test", undefined, undefined],
    ["<a@b.test>x", undefined, undefined],
    ['<x"y"@b.test>', 'x"y"@b.test', undefined], // a quote inside a dot-atom
    ['<"\x01"@b.test>', '"\x01"@b.test', undefined], // a control character is no qtext
  ];
  for (const [arg, path, box] of PATHS) {
    for (const keyword of ["FROM", "TO"] as const) {
      const parsed = parsePathArg(`${keyword}:${arg}`, keyword);
      assertEquals(parsed?.path, path, `${keyword}:${arg}`);
      if (parsed) assertEquals(parseMailbox(parsed.path), box, `${keyword}:${arg}`);
    }
  }
  assertEquals(parsePathArg('TO:<"x > y"@sinkhole.test> NOTIFY=NEVER', "TO")?.params.get("NOTIFY"), "NEVER");
  // Over the protocol: both are accepted (250), an unclosed quote is a syntax error (501).
  const { codes } = play("accept", [
    "EHLO c.test",
    'MAIL FROM:<"a > b"@origin.test>',
    'RCPT TO:<"x > y"@sinkhole.test>',
    'RCPT TO:<"x > y@sinkhole.test>',
  ]);
  assertEquals(codes, [250, 250, 250, 501]);
});

Deno.test("greylist table: first attempt deferred, retries in the window pass, expired entries forgotten", () => {
  const t = new GreylistTable(1000, 3);
  assertEquals(t.check("10.0.0.1", 0), "defer");
  assertEquals(t.check("10.0.0.1", 1), "pass");
  assertEquals(t.check("10.0.0.1", 1000), "pass");
  assertEquals(t.check("10.0.0.2", 1000), "defer");
  assertEquals(t.check("10.0.0.1", 1001), "defer", "window passed: a first attempt again");
  assertEquals(t.size, 2);
  assertEquals(t.check("10.0.0.9", 5000), "defer");
  assertEquals(t.size, 1, "expired entries are swept");
});

Deno.test("greylist table: bounded, the oldest key is forgotten first", () => {
  const t = new GreylistTable(60_000, 3);
  for (const k of ["a", "b", "c", "d"]) t.check(k, 0);
  assertEquals(t.size, 3);
  assertEquals(t.check("a", 1), "defer", "a was evicted");
  assertEquals(t.check("d", 1), "pass");
});

Deno.test("config: defaults keep the upstream fixture's names and values", () => {
  const c = configFromEnv(() => undefined);
  assertEquals(c.bindHost, "0.0.0.0");
  assertEquals(c.bindPort, 25);
  assertEquals(c.modeParam, "/cabal/sinkhole_mode");
  assertEquals(c.cacheTtlMs, 30_000);
  assertEquals(c.greylistWindowMs, 1_800_000);
  assertEquals(c.serverName, "sinkhole.cabal.internal");
  assertEquals(c.modeSource, "ssm");
  assertEquals(
    configFromEnv((k) => ({ SINKHOLE_MODE_FILE: "/tmp/m" } as Record<string, string>)[k]).modeSource,
    "file",
  );
  assertEquals(configFromEnv((k) => ({ SINKHOLE_MODE: "accept" } as Record<string, string>)[k]).modeSource, "static");
});

Deno.test("config: bad values are refused with the variable's name", () => {
  const bad: [string, string, RegExp][] = [
    ["SINKHOLE_BIND_PORT", "70000", /SINKHOLE_BIND_PORT must be an integer from 0 to 65535/],
    ["SINKHOLE_BIND_PORT", "25x", /SINKHOLE_BIND_PORT/],
    ["SINKHOLE_CACHE_TTL", "-1", /SINKHOLE_CACHE_TTL must be a positive number of seconds/],
    ["SINKHOLE_GREYLIST_WINDOW", "soon", /SINKHOLE_GREYLIST_WINDOW/],
    [
      "SINKHOLE_MODE",
      "deny",
      /SINKHOLE_MODE "deny": unknown mode "deny": one of defer, bounce, accept, accept-log, greylist, drop/,
    ],
    ["SINKHOLE_MAX_SESSIONS", "0", /SINKHOLE_MAX_SESSIONS/],
  ];
  for (const [name, value, message] of bad) {
    let error = "";
    try {
      configFromEnv((k) => k === name ? value : undefined);
    } catch (e) {
      error = (e as Error).message;
    }
    assertMatch(error, message);
  }
});

/**
 * The cache's state logic with an in-process source (the real SSM path is
 * tested against moto in ssm_test.ts; this checks keep-last-good and log-once).
 */
Deno.test("mode cache: keeps the last good mode and logs each change of state once", async () => {
  const answers: (string | Error)[] = [
    "accept",
    "accept",
    "nonsense",
    "nonsense",
    new Error("boom"),
    new Error("boom"),
    "bounce",
  ];
  const lines: Record<string, unknown>[] = [];
  const cache = new ModeCache(
    {
      describe: "test",
      fetch: () => {
        const a = answers.shift()!;
        return a instanceof Error ? Promise.reject(a) : Promise.resolve(a);
      },
    },
    1000,
    (e) => lines.push({ ...e }),
  );
  assertEquals(cache.current.text, "defer", "defer before any answer");
  const seen: string[] = [];
  for (let i = 0; i < 7; i++) {
    await cache.refresh();
    seen.push(cache.current.text);
  }
  assertEquals(seen, ["accept", "accept", "accept", "accept", "accept", "accept", "bounce"]);
  assertEquals(lines.map((l) => l.event), ["mode", "mode_invalid", "mode_error", "mode"]);
  assertEquals(lines[1].keeping, "accept");
  assertEquals(lines[2].reason, "Error: boom");
});

/** The decision table, asked directly: (scenario, point) → failure reply, drop, delay, what follows. */
const DECISIONS: [string, Point, { fail?: number; drop?: boolean; delayMs?: number; after?: string }][] = [
  ["defer", "rcpt", { fail: 421 }],
  ["defer", "mail", {}],
  ["defer at=mail", "mail", { fail: 421 }],
  ["bounce", "rcpt", { fail: 550 }],
  ["bounce at=data", "data", { fail: 554 }],
  ['bounce at=connect reply="550 5.7.1 Go away"', "connect", { fail: 550 }],
  ["drop at=eod delay=2s", "eod", { drop: true, delayMs: 2000 }],
  ["accept delay=1s", "eod", { delayMs: 1000 }],
  ["accept delay=1s", "rcpt", {}],
  ["accept", "rcpt", {}],
  ["accept starttls=refuse", "starttls", { fail: 454 }],
  ["accept starttls=break", "starttls", { fail: 220, after: "close" }],
  ["accept", "starttls", { after: "starttls" }],
];

/** A transaction just begun by MAIL FROM:<a@origin.test>, under `sc`. */
function emptyTx(sc: Scenario): Transaction {
  return {
    scenario: sc,
    from: "a@origin.test",
    rcptCount: 0,
    accepted: [],
    acceptedAttempts: [],
    acceptedCount: 0,
    acceptedBytes: 0,
  };
}

Deno.test("policy: decide() is the one table of what a scenario does where", () => {
  for (const [mode, point, want] of DECISIONS) {
    const sc = scenario(mode);
    const d = decide({
      point,
      inputs: { scenario: sc, serverName: SERVER },
      state: { esmtp: true, errors: 0, tx: emptyTx(sc) },
      rcpt: "b@sinkhole.test",
    });
    assertEquals(
      { fail: d.fail?.code, drop: d.drop, delayMs: d.delayMs || undefined, after: d.after },
      { fail: want.fail, drop: want.drop, delayMs: want.delayMs, after: want.after },
      `${mode} at ${point}`,
    );
  }
});

Deno.test("policy: STARTTLS past MAX_TLS_SESSIONS is 454 and the session goes on; a mode's refuse or break still wins", () => {
  const cases: [string, boolean, number | undefined, string | undefined][] = [
    ["accept", true, 454, undefined],
    ["accept", false, undefined, "starttls"],
    ["accept starttls=refuse", true, 454, undefined],
    ["accept starttls=break", true, 220, "close"],
  ];
  for (const [mode, tlsBusy, code, after] of cases) {
    const sc = scenario(mode);
    const d = decide({
      point: "starttls",
      inputs: { scenario: sc, serverName: SERVER, tlsBusy },
      state: { esmtp: true, errors: 0, tx: emptyTx(sc) },
      rcpt: "b@sinkhole.test",
    });
    assertEquals({ code: d.fail?.code, after: d.after }, { code, after }, `${mode}, tlsBusy ${tlsBusy}`);
    if (tlsBusy && mode === "accept") {
      assert(d.fail!.lines.join(" ").includes(`${MAX_TLS_SESSIONS} TLS sessions at most`), d.fail!.lines.join(" "));
      assertEquals(d.drop, undefined);
    }
  }
});

/**
 * The session's own rules, rows of the table like the scenario's: a 5yz greeting refuses the
 * session (`refuse`: 503 to all but QUIT), the error limit ends it with a farewell 421 unless the
 * reply closes already, a bare line end at the end of data refuses the message and closes.
 */
const SESSION_ROWS: [
  string,
  Point,
  { errors?: number; after?: "continue" | "close" | "drop"; bare?: boolean },
  { fail?: number; drop?: boolean; refuse?: boolean; farewell?: number; after?: string },
][] = [
  ["accept", "connect", {}, {}],
  ["bounce at=connect", "connect", {}, { fail: 554, refuse: true }],
  ['bounce at=connect reply="550 5.7.1 Go away"', "connect", {}, { fail: 550, refuse: true }],
  ['bounce at=connect reply="521 5.3.2 Not today"', "connect", {}, { fail: 521, refuse: true }],
  ["defer at=connect", "connect", {}, { fail: 421 }],
  ["drop at=connect", "connect", {}, { drop: true }],
  ["accept", "errors", { errors: MAX_ERRORS_PER_SESSION - 1 }, {}],
  ["accept", "errors", { errors: MAX_ERRORS_PER_SESSION }, { farewell: 421, after: "close" }],
  ["bounce", "errors", { errors: MAX_ERRORS_PER_SESSION + 3 }, { farewell: 421, after: "close" }],
  ["accept", "errors", { errors: MAX_ERRORS_PER_SESSION, after: "close" }, {}],
  ["accept", "errors", { errors: MAX_ERRORS_PER_SESSION, after: "drop" }, {}],
  ["accept", "eod", { bare: true }, { fail: 550, after: "close" }],
  ["bounce at=eod", "eod", { bare: true }, { fail: 550, after: "close" }],
];

Deno.test("policy: the greeting's refusal, the error limit and a bare line end are rows of decide() too", () => {
  for (const [mode, point, at, want] of SESSION_ROWS) {
    const sc = scenario(mode);
    const d = decide({
      point,
      inputs: { scenario: sc, serverName: SERVER },
      state: { esmtp: true, errors: at.errors ?? 0, ...(point === "eod" ? { tx: emptyTx(sc) } : {}) },
      after: at.after ?? "continue",
      ...(at.bare ? { data: { size: 5, longLine: false, bare: true } } : {}),
    });
    assertEquals(
      { fail: d.fail?.code, drop: d.drop, refuse: d.refuse, farewell: d.farewell?.code, after: d.after },
      { fail: want.fail, drop: want.drop, refuse: want.refuse, farewell: want.farewell, after: want.after },
      `${mode} at ${point} ${JSON.stringify(at)}`,
    );
  }
  // The session carries them out: a refused greeting's state, a bad line's farewell past the limit.
  assertEquals(greeting(scenario('bounce at=connect reply="521 5.3.2 Not today"'), SERVER).state.refused, true);
  assertEquals(greeting(scenario("defer at=connect"), SERVER).state.refused, undefined);
  const inputs = { scenario: scenario("accept"), serverName: SERVER };
  const past = respondToBadLine({ esmtp: false, errors: MAX_ERRORS_PER_SESSION - 1 }, "chars", inputs);
  assertEquals([past.reply.code, past.farewell, past.after], [500, REPLIES.tooManyErrors, "close"]);
  const before = respondToBadLine({ esmtp: false, errors: MAX_ERRORS_PER_SESSION - 2 }, "long", inputs);
  assertEquals([before.reply.code, before.farewell, before.after], [500, undefined, "continue"]);
});

Deno.test("policy: greylisting takes the time and the table's entry as inputs, and says what to remember", () => {
  const sc = scenario("greylist min=5m");
  const now = 1_000_000_000;
  const tx = emptyTx(sc);
  const ask = (entry?: { at: number; windowMs: number }) =>
    decide({
      point: "rcpt",
      state: { esmtp: true, errors: 0, tx },
      rcpt: "b@sinkhole.test",
      inputs: { scenario: sc, serverName: SERVER, client: "192.0.2.7", now, greylist: () => entry },
    });
  const first = ask();
  assertEquals([first.fail?.code, first.greylist], [451, "defer"]);
  assertEquals(first.remember, [{ key: "192.0.2.7", at: now, windowMs: undefined }], "a first attempt is remembered");
  const early = ask({ at: now - 10_000, windowMs: 3_600_000 });
  assertEquals([early.fail?.code, early.remember], [451, undefined], "too early: deferred, nothing new to remember");
  const later = ask({ at: now - 360_000, windowMs: 3_600_000 });
  assertEquals([later.fail, later.greylist, later.remember], [undefined, "pass", undefined], "after min: passes");
  const expired = ask({ at: now - 7_200_000, windowMs: 3_600_000 });
  assertEquals([expired.fail?.code, expired.remember?.length], [451, 1], "past the window: a first attempt again");
  assertEquals(greylistVerdict({ at: 0, windowMs: 10 }, 5, 5), "pass");
  assertEquals(greylistVerdict({ at: 0, windowMs: 10 }, 11, 5), "defer");
});

/** Asks the policy about RCPT of `rcpt` from a@origin.test, given the table's entry for that message. */
function rcptWith(mode: string, seen: AttemptEntry | undefined, now: number, rcpt = "b@sinkhole.test") {
  const sc = scenario(mode);
  const tx = emptyTx(sc);
  return decide({
    point: "rcpt",
    state: { esmtp: true, errors: 0, tx },
    rcpt,
    inputs: { scenario: sc, serverName: SERVER, now, attempts: () => seen },
  });
}

Deno.test("policy: stateful scenarios, one table: first=N, for=, rate= with a seed, then=, per recipient", () => {
  const t0 = 1_700_000_000_000;
  const key = attemptKey("a@origin.test", "b@sinkhole.test");
  assertEquals(key, "a@origin.test > b@sinkhole.test");
  // [mode, attempts so far, ms since first seen, failing reply code (0: accepted), the attempt number]
  const TABLE: [string, number, number, number, number][] = [
    ["defer first=2", 0, 0, 421, 1],
    ["defer first=2", 1, 60_000, 421, 2],
    ["defer first=2", 2, 120_000, 0, 3],
    ["defer first=2 then=bounce", 2, 120_000, 550, 3],
    ["bounce first=1", 0, 0, 550, 1],
    ["bounce first=1", 1, 1, 0, 2],
    ['defer first=1 reply="452 4.2.2 Mailbox full"', 0, 0, 452, 1],
    ["defer for=4h then=bounce", 5, 4 * 3_600_000 - 1, 421, 6],
    ["defer for=4h then=bounce", 6, 4 * 3_600_000, 550, 7],
    ["defer for=1h", 0, 0, 421, 1],
    ["bounce first=1 then=defer", 1, 0, 421, 2],
    // every=N: the Nth, 2Nth, … attempt of each message gets the failure, the others `then`.
    ...[1, 2, 3, 4, 5, 6, 7].map((n): [string, number, number, number, number] => [
      "defer every=3",
      n - 1,
      (n - 1) * 60_000,
      n % 3 === 0 ? 421 : 0,
      n,
    ]),
    ...[1, 2].map((
      n,
    ): [string, number, number, number, number] => ["bounce every=2 then=defer", n - 1, 0, n === 2 ? 550 : 421, n]),
  ];
  for (const [mode, count, since, code, n] of TABLE) {
    const d = rcptWith(mode, count ? { count, first: t0 } : undefined, t0 + since);
    assertEquals(d.fail?.code ?? 0, code, `${mode} after ${count} attempts, ${since} ms`);
    assertEquals(d.attempt, { key, n, first: t0 }, `${mode}: the attempt to count`);
  }
  const dropped = rcptWith("drop first=1", undefined, t0);
  assertEquals(dropped.drop, true);
  // Per recipient: `defer2+x@` is deferred twice, then accepted; its neighbours are not.
  assertEquals(rcptWith("accept", undefined, t0, "defer2+x@sinkhole.test").fail?.code, 451);
  assertEquals(rcptWith("accept", { count: 1, first: t0 }, t0, "defer2+x@sinkhole.test").fail?.code, 451);
  assertEquals(rcptWith("accept", { count: 2, first: t0 }, t0, "defer2+x@sinkhole.test").fail, undefined);
  assertEquals(rcptWith("accept", undefined, t0, "bounce1+x@sinkhole.test").fail?.code, 550);
  assertEquals(rcptWith("accept", undefined, t0, "x@sinkhole.test").fail, undefined);
  // Plain modes count attempts too (the ledger), without changing their answer.
  assertEquals(rcptWith("defer", { count: 4, first: t0 }, t0).attempt?.n, 5);
});

Deno.test("policy: what the ledger and accept-log record is part of the decision's answer", () => {
  const t0 = 1_700_000_000_000;
  const ask = (mode: string, point: Point, more: Partial<Parameters<typeof decide>[0]> = {}) => {
    const sc = scenario(mode);
    const tx = { ...emptyTx(sc), accepted: ["b@sinkhole.test"], acceptedAttempts: [3], acceptedCount: 1 };
    return decide({
      point,
      state: { esmtp: true, errors: 0, tx, helo: "client.test", tls: true },
      rcpt: "b@sinkhole.test",
      inputs: {
        scenario: sc,
        serverName: SERVER,
        client: "192.0.2.9",
        now: t0,
        attempts: () => ({ count: 1, first: t0 }),
      },
      ...more,
    });
  };
  const attempt = (stage: string, code: number | undefined, n: number, mode: string, more = {}): unknown => ({
    event: "attempt",
    key: "a@origin.test > b@sinkhole.test",
    attempt: n,
    from: "a@origin.test",
    rcpt: "b@sinkhole.test",
    stage,
    ...(code === undefined ? { dropped: true } : { code }),
    ...more,
    client: "192.0.2.9",
    tls: true,
    mode,
  });
  // RCPT: a refusal or a drop ends the attempt (the second, after one seen); an acceptance does not.
  assertEquals<unknown>(ask("defer first=2", "rcpt").events, [attempt("rcpt", 421, 2, "defer first=2")]);
  assertEquals<unknown>(ask("drop", "rcpt").events, [attempt("rcpt", undefined, 2, "drop")]);
  assertEquals<unknown>(ask("accept", "rcpt").events, undefined);
  // DATA refused ends every accepted recipient's attempt; DATA accepted ends none.
  assertEquals<unknown>(ask("bounce at=data", "data").events, [attempt("data", 554, 3, "bounce at=data")]);
  assertEquals<unknown>(ask("accept", "data").events, undefined);
  assertEquals<unknown>(ask("accept-log", "data").captureHeaders, true);
  // End of data: every accepted recipient's attempt, with the Message-ID; accept-log's message line after it.
  const data = { size: 10, longLine: false, messageId: "<m@o.test>", headers: ["Subject: s"], truncated: false };
  assertEquals<unknown>(ask("accept", "eod", { data }).events, [
    attempt("eod", 250, 3, "accept", { messageId: "<m@o.test>" }),
  ]);
  assertEquals<unknown>(ask("drop at=eod", "eod", { data }).events, [
    attempt("eod", undefined, 3, "drop at=eod", { messageId: "<m@o.test>" }),
  ]);
  const logged = ask("accept-log", "eod", { data }).events!;
  assertEquals(logged.map((e) => e.event), ["attempt", "message"]);
  assertEquals(logged[1], {
    event: "message",
    client: "192.0.2.9",
    helo: "client.test",
    from: "a@origin.test",
    rcpts: ["b@sinkhole.test"],
    rcptCount: 1,
    size: 10,
    headers: ["Subject: s"],
    truncated: false,
  });
  const tooBig = ask("accept-log", "eod", { data: { ...data, size: MAX_MESSAGE_BYTES + 1 } });
  assertEquals([tooBig.fail?.code, tooBig.events?.map((e) => e.event)], [552, ["attempt"]]);
});

Deno.test("policy: every attempt the table counts ends in one event: drops at data, abandoned transactions", () => {
  const t0 = 1_700_000_000_000;
  const inputs = { scenario: scenario("accept"), serverName: SERVER, client: "192.0.2.9", now: t0 };
  const tx = (mode: string): Transaction => ({
    ...emptyTx(scenario(mode)),
    accepted: ["b@sinkhole.test", "250-2.1.5+c@sinkhole.test"],
    acceptedAttempts: [3, 1],
    acceptedCount: 2,
  });
  const state = (mode: string) => ({ esmtp: true, errors: 0, tx: tx(mode), helo: "client.test" });
  const ev = (rcpt: string, n: number, stage: string, end: Record<string, unknown>, mode = "accept") => ({
    event: "attempt",
    key: `a@origin.test > ${rcpt}`,
    attempt: n,
    from: "a@origin.test",
    rcpt,
    stage,
    ...end,
    client: "192.0.2.9",
    tls: false,
    mode,
  });
  // [point, mode, how, data, the events: one per accepted recipient]
  const rows: [Point, string, Abandon | undefined, boolean, unknown[]][] = [
    ["data", "drop at=data", undefined, false, [
      ev("b@sinkhole.test", 3, "data", { dropped: true }, "drop at=data"),
      ev("250-2.1.5+c@sinkhole.test", 1, "data", { dropped: true }, "drop at=data"),
    ]],
    ["abandon", "accept", "quit", false, [
      ev("b@sinkhole.test", 3, "rcpt", { code: 250, abandoned: "quit" }),
      ev("250-2.1.5+c@sinkhole.test", 1, "rcpt", { code: 250, abandoned: "quit" }),
    ]],
    ["abandon", "accept", "close", true, [
      ev("b@sinkhole.test", 3, "data", { code: 354, abandoned: "close" }),
      ev("250-2.1.5+c@sinkhole.test", 1, "data", { code: 354, abandoned: "close" }),
    ]],
  ];
  for (const [point, mode, how, data, events] of rows) {
    const d = decide({ point, state: state(mode), inputs, how, data: data ? { size: 5, longLine: false } : undefined });
    assertEquals<unknown>(d.events, events, `${point} ${mode} ${how}`);
  }
  // A recipient's own 2yz reply is the reply its abandoned attempt got.
  const own = { ...state("accept"), tx: { ...tx("accept"), accepted: ["251+c@sinkhole.test"], acceptedAttempts: [1] } };
  assertEquals(abandoned(own, inputs, "rset").map((e) => (e as { code?: number }).code), [251]);
  // Nothing accepted, nothing abandoned.
  assertEquals(abandoned({ ...own, tx: emptyTx(scenario("accept")) }, inputs, "close"), []);
  // A bare line end is the end of data refused (550), and it ends the attempt too.
  const bare = endOfData(state("accept"), { size: 5, longLine: false, bare: true }, inputs);
  assertEquals([bare.reply.code, bare.after, bare.state.tx, bare.events?.length], [550, "close", undefined, 2]);
  // Over the protocol: RSET and HELO/EHLO abandon the transaction's accepted recipients; QUIT is said in the state.
  const lines = [
    "EHLO c.test",
    "MAIL FROM:<a@origin.test>",
    "RCPT TO:<b@sinkhole.test>",
    "RCPT TO:<bounce+x@sinkhole.test>",
  ];
  for (const [end, how] of [["RSET", "rset"], ["EHLO c.test", "helo"], ["HELO c.test", "helo"]]) {
    const { last } = play("accept", [...lines, end]);
    assertEquals(
      last.events?.map((e) => [(e as { rcpt: string }).rcpt, (e as { abandoned?: string }).abandoned]),
      [["b@sinkhole.test", how]],
      end,
    );
  }
  const quit = play("accept", [...lines, "QUIT"]).last;
  assertEquals([quit.state.quit, quit.state.tx?.acceptedCount, quit.events], [true, 1, undefined]);
  // A refused HELO (defer at=helo) keeps the transaction: nothing is abandoned yet.
  assertEquals(play("defer at=helo", ["HELO c.test"]).last.events, undefined);
});

Deno.test("policy: a seeded rate gives the same decisions for the same seed, others for another", () => {
  const decisions = (seed: number) =>
    Array.from({ length: 200 }, (_, i) => {
      const st: Stateful = { kind: "rate", percent: 30, seed };
      return inFailingPhase(st, { key: `a@o.test > r${i % 20}@sinkhole.test`, n: 1 + Math.floor(i / 20), first: 0 }, 0);
    });
  const a = decisions(42);
  assertEquals(decisions(42), a, "reproducible");
  assert(JSON.stringify(decisions(43)) !== JSON.stringify(a), "another seed, other decisions");
  const share = a.filter(Boolean).length / a.length;
  assert(share > 0.2 && share < 0.4, `about 30% fail: ${share}`);
  assertEquals(seededUnit(42, "k", 1), seededUnit(42, "k", 1));
  assertEquals(rcptWith("defer rate=0%", undefined, 0).fail, undefined);
  assertEquals(rcptWith("defer rate=100%", undefined, 0).fail?.code, 421);
});

Deno.test("attempt table: counts per message, first sighting kept, bounded by its cap", () => {
  const table = new AttemptTable(3);
  assertEquals(table.lookup("m1"), undefined);
  table.count("m1", 100);
  table.count("m1", 200);
  assertEquals(table.lookup("m1"), { count: 2, first: 100 });
  table.count("m2", 300);
  table.count("m3", 400);
  table.count("m4", 500);
  assertEquals(table.size, 3);
  assertEquals(table.lookup("m1"), undefined, "the least recently first seen is forgotten");
  assertEquals(table.lookup("m4"), { count: 1, first: 500 });
});

Deno.test("policy: a message ends when delivered or bounced; the next attempt with its envelope is a new message", () => {
  const t0 = 1_700_000_000_000;
  const key = attemptKey("a@origin.test", "b@sinkhole.test");
  // The table's entry after one more attempt, and after an end (pure: what the table writes).
  assertEquals(counted(undefined, t0), { count: 1, first: t0 });
  assertEquals(counted({ count: 2, first: t0 }, t0 + 5), { count: 3, first: t0 });
  assertEquals(counted({ count: 3, first: t0, ended: true }, t0 + 9), { count: 1, first: t0 + 9, before: 3 });
  assertEquals(counted({ count: 2, first: t0, ended: true, before: 3 }, t0 + 9), {
    count: 1,
    first: t0 + 9,
    before: 5,
  });
  assertEquals(ended({ count: 3, first: t0, before: 2 }, t0 + 9), { count: 3, first: t0, before: 2, ended: true });
  // [mode, the table's entry, the reply (0: accepted), the attempt counted, the number logged, ends the message]
  const delivered: AttemptEntry = { count: 3, first: t0, ended: true };
  const ROWS: [string, AttemptEntry | undefined, number, number, number, boolean][] = [
    ["defer first=2", delivered, 421, 1, 4, false], // a second message: deferred from its own first attempt
    ["defer first=2", { count: 2, first: t0, before: 3 }, 0, 3, 6, false],
    ["defer first=2", { count: 3, first: t0 }, 0, 4, 4, false], // not ended: the same message's retry
    ["defer every=2", { count: 1, first: t0, ended: true }, 421, 1, 2, false], // every= counts the envelope
    ["defer every=2", { count: 1, first: t0, before: 1 }, 0, 2, 3, false],
    ["bounce", undefined, 550, 1, 1, true], // a bounce at RCPT ends it
    ["defer first=1 then=bounce", { count: 1, first: t0 }, 550, 2, 2, true],
    ["defer", delivered, 421, 1, 4, false],
  ];
  for (const [mode, seen, code, n, logged, ends] of ROWS) {
    const d = rcptWith(mode, seen, t0 + 1);
    const what = `${mode} after ${JSON.stringify(seen)}`;
    assertEquals(d.fail?.code ?? 0, code, what);
    assertEquals(d.attempt?.n, n, what);
    if (d.events) assertEquals((d.events[0] as { attempt: number }).attempt, logged, what);
    assertEquals(d.ends, ends ? [key] : undefined, what);
  }
  // The end of data: a message handed over (2yz, or dropped: the sinkhole has it) or bounced ends; a 4yz does not.
  const sc = (mode: string) => scenario(mode);
  const tx = (mode: string): Transaction => ({
    ...emptyTx(sc(mode)),
    accepted: ["b@sinkhole.test"],
    acceptedAttempts: [4],
    acceptedCount: 1,
  });
  const data = { size: 10, longLine: false, messageId: "<m@o.test>" };
  const eod = (mode: string, d = data) =>
    decide({
      point: "eod",
      state: { esmtp: true, errors: 0, tx: tx(mode) },
      data: d,
      inputs: { scenario: sc(mode), serverName: SERVER },
    });
  assertEquals(eod("accept").ends, [key]);
  assertEquals(eod("drop at=eod").ends, [key]);
  assertEquals(eod("bounce at=eod").ends, [key]);
  assertEquals(eod("defer at=eod").ends, undefined);
  assertEquals(eod("accept", { ...data, size: MAX_MESSAGE_BYTES + 1 }).ends, [key], "552: bounced");
  assertEquals((eod("accept").events![0] as { attempt: number }).attempt, 4, "logged with the envelope's number");
  // DATA: a 5yz ends every accepted recipient's message, a 4yz none.
  const data5 = decide({
    point: "data",
    state: { esmtp: true, errors: 0, tx: tx("bounce at=data") },
    inputs: { scenario: sc("bounce at=data"), serverName: SERVER },
  });
  assertEquals(data5.ends, [key]);
  const data4 = decide({
    point: "data",
    state: { esmtp: true, errors: 0, tx: tx("defer at=data") },
    inputs: { scenario: sc("defer at=data"), serverName: SERVER },
  });
  assertEquals(data4.ends, undefined);
});

Deno.test("attempt table: an entry packs into the DigestTable's two numbers, and a message ends in it", () => {
  const t0 = 1_700_000_000_000;
  const entries: AttemptEntry[] = [
    { count: 1, first: t0 },
    { count: ATTEMPT_COUNT_SPAN - 1, first: FIRST_SEEN_SPAN - 1, ended: true, before: ATTEMPT_COUNT_SPAN - 1 },
    { count: 7, first: 0, before: 3 },
  ];
  for (const e of entries) {
    const [a, b] = packAttempt(e);
    assert(Number.isSafeInteger(a) && Number.isSafeInteger(b), JSON.stringify(e));
    assertEquals(unpackAttempt(a, b), e);
  }
  const table = new AttemptTable(3);
  table.count("m1", t0);
  table.count("m1", t0 + 1);
  table.end("m1", t0 + 2);
  assertEquals(table.lookup("m1"), { count: 2, first: t0, ended: true });
  table.count("m1", t0 + 3);
  assertEquals(table.lookup("m1"), { count: 1, first: t0 + 3, before: 2 }, "a new message, counted from 1");
});

Deno.test("attempt and greylist tables: an entry costs at most its ENTRY_BYTES, whatever the addresses", () => {
  const gc = (globalThis as { gc?: () => void }).gc;
  // Measured on the V8 heap and outside it (the tables' typed arrays), full of the longest keys, as the budget says.
  const used = () => Deno.memoryUsage().heapUsed + Deno.memoryUsage().external;
  gc?.();
  const before = used();
  const table = new AttemptTable();
  const long = (i: number) => `${"x".repeat(60)}${i}@${"d".repeat(190)}.test > ${"y".repeat(60)}${i}@sinkhole.test`;
  for (let i = 0; i < MAX_ATTEMPT_ENTRIES; i++) table.count(long(i), 1_700_000_000_000 + i);
  for (let i = 0; i < MAX_ATTEMPT_ENTRIES; i += 3) table.count(long(i), 0);
  gc?.();
  const perEntry = (used() - before) / table.size;
  assertEquals(table.size, MAX_ATTEMPT_ENTRIES);
  assertEquals(table.lookup(long(3)), { count: 2, first: 1_700_000_000_003 });
  if (gc) assert(perEntry <= ATTEMPT_ENTRY_BYTES, `attempt: ${perEntry.toFixed(1)} bytes an entry`);

  const before2 = used();
  const grey = new GreylistTable(3_600_000);
  for (let i = 0; i < MAX_GREYLIST_ENTRIES; i++) grey.check(long(i), 1_000 + i, 0, i % 2 ? 60_000_000 : undefined);
  gc?.();
  const perGrey = (used() - before2) / grey.size;
  assertEquals(grey.size, MAX_GREYLIST_ENTRIES);
  if (gc) assert(perGrey <= GREYLIST_ENTRY_BYTES, `greylist: ${perGrey.toFixed(1)} bytes an entry`);
});

Deno.test("digest table: the same answers as an insertion-ordered Map with eviction, through compactions", () => {
  // A reference model: Map keeps insertion order; set = delete + append; past the cap the first key goes.
  let seed = 7;
  const rand = (n: number) => (seed = (seed * 1103515245 + 12345) % 2147483648) % n;
  for (const capacity of [1, 2, 3, 7, 64]) {
    const t = new DigestTable(capacity);
    const model = new Map<number, [number, number]>();
    for (let step = 0; step < 20_000; step++) {
      // Few distinct digests, some sharing their low bits (the same home in the index).
      const digest = rand(capacity * 3) * 4294967296 * (rand(2) ? 1 : 0) + rand(capacity * 3);
      const op = rand(4);
      if (op === 0) {
        t.delete(digest);
        model.delete(digest);
      } else if (op === 1 && model.has(digest)) {
        t.update(digest, step, -step);
        model.set(digest, [step, -step]);
      } else {
        t.set(digest, step, step / 2);
        model.delete(digest);
        while (model.size >= capacity) model.delete(model.keys().next().value!);
        model.set(digest, [step, step / 2]);
      }
      assertEquals(t.size, model.size, `capacity ${capacity}, step ${step}`);
      const probe = rand(capacity * 3);
      assertEquals(t.get(probe), model.get(probe), `get ${probe}`);
      const [firstKey, firstValue] = model.entries().next().value ?? [];
      const oldest = t.oldest();
      assertEquals(
        oldest && [oldest.digest, oldest.a, oldest.b],
        firstKey === undefined ? undefined : [firstKey, ...firstValue!],
      );
    }
    for (const [k, v] of model) assertEquals(t.get(k), v);
  }
});

Deno.test("policy: a recipient shaped like a per-recipient form that is not one gets the mode's answer and a logged reason", async () => {
  const { recipientFormProblem } = await import("../listener.ts");
  const rows: [string, RegExp | undefined][] = [
    ["452-5.2.2+q@sinkhole.test", /452-5\.2\.2: the code's class \(4\) and the status's \(5\) disagree/],
    ["552-4.2.2+q@sinkhole.test", /class \(5\) and the status's \(4\) disagree/],
    ["652+q@sinkhole.test", /a reply code is three digits, 2yz, 4yz or 5yz/],
    ["45+q@sinkhole.test", /a reply code is three digits/],
    ["451-4.7+q@sinkhole.test", /class\.subject\.detail/],
    ["defer0+q@sinkhole.test", /the attempt count is 1 to 99/],
    ["bounce100+q@sinkhole.test", /the attempt count is 1 to 99/],
    ["accept2+q@sinkhole.test", /only defer, bounce and drop take an attempt count/],
    // Taken as forms, or no form at all: no reason.
    ["452-4.2.2+q@sinkhole.test", undefined],
    ["defer2+q@sinkhole.test", undefined],
    ["bounce+q@sinkhole.test", undefined],
    ["user+newsletter@sinkhole.test", undefined],
    ["plain@sinkhole.test", undefined],
  ];
  for (const [rcpt, want] of rows) {
    const got = recipientFormProblem(rcpt);
    if (want === undefined) assertEquals(got, undefined, rcpt);
    else assertMatch(got ?? "(none)", want, rcpt);
  }
  // Through the table: the mode answers (accept: 250), and the reason is among the events to log.
  const { outs } = play("accept", ["EHLO c", "MAIL FROM:<a@o.test>", "RCPT TO:<452-5.2.2+q@sinkhole.test>"]);
  assertEquals(outs[2].reply.code, 250);
  const e = outs[2].events?.find((x) => x.event === "rcpt_form");
  assertEquals(e, {
    event: "rcpt_form",
    client: "192.0.2.1",
    rcpt: "452-5.2.2+q@sinkhole.test",
    reason: "452-5.2.2: the code's class (4) and the status's (5) disagree (RFC 3463 §2)",
  });
  const plain = play("accept", ["EHLO c", "MAIL FROM:<a@o.test>", "RCPT TO:<user+news@sinkhole.test>"]);
  assert(!plain.outs[2].events?.some((x) => x.event === "rcpt_form"), "an ordinary subaddress says nothing");
});

Deno.test("policy: a held reply's events, and what is logged instead if the client leaves first (unheard)", () => {
  const rows: [string, string[], { unheard?: unknown[]; codes: (number | undefined)[] }][] = [
    // accept-log delay: the 250 is held; if the client leaves, its attempt is unheard and no message line.
    ["accept-log delay=20s", [...STATES.rcpt, "DATA"], { unheard: [true], codes: [250] }],
    // No delay: nothing is held, nothing to say instead.
    ["accept-log", [...STATES.rcpt, "DATA"], { codes: [250] }],
    // A drop logs its events at once (nothing is said either way).
    ["drop at=eod delay=5s", [...STATES.rcpt, "DATA"], { codes: [undefined] }],
  ];
  for (const [mode, lines, want] of rows) {
    const state = play(mode, lines).state;
    const out = endOfData(state, { size: 10, longLine: false }, {
      scenario: state.tx!.scenario,
      serverName: SERVER,
      client: "192.0.2.1",
    });
    const attempts = (out.events ?? []).filter((e) => e.event === "attempt") as AttemptEvent[];
    assertEquals(attempts.map((a) => a.code), want.codes, mode);
    if (!want.unheard) {
      assertEquals(out.unheard, undefined, mode);
      continue;
    }
    const unheard = out.unheard ?? [];
    assertEquals(unheard.map((e) => e.event), ["attempt"], `${mode}: no message line for a message not accepted`);
    const a = unheard[0] as AttemptEvent;
    assertEquals([a.unheard, a.code, a.dropped, a.stage], [true, undefined, undefined, "eod"], mode);
  }
});
