/** The mode language: every documented form, malformed values with their messages, and the pure policy. */
import { assert, assertEquals } from "../rig/assert.ts";
import { play, SERVER } from "./policy.ts";
import {
  greeting,
  MAX_DELAY_MS,
  parseScenario,
  recipientOutcome,
  respond,
  type Scenario,
  scenario,
} from "../listener.ts";

/** Every documented form (docs/modes.md, "The mode language") and what it parses to. */
const FORMS: [string, Partial<Scenario> & { reply?: { code: number; lines: string[] } }][] = [
  ["defer", { base: "defer", at: "rcpt", delayMs: 0 }],
  ["bounce", { base: "bounce", at: "rcpt" }],
  ["accept", { base: "accept", at: "eod" }],
  ["accept-log", { base: "accept-log" }],
  ["greylist", { base: "greylist", greylist: { key: "ip", minMs: 0 } }],
  ["drop", { base: "drop", at: "rcpt" }],
  ["defer first=2", { base: "defer", stateful: { kind: "first", attempts: 2 }, then: "accept" }],
  ["defer every=3", { base: "defer", stateful: { kind: "every", attempts: 3 }, then: "accept" }],
  ["bounce every=2 then=defer", { stateful: { kind: "every", attempts: 2 }, then: "defer" }],
  ["defer for=4h then=bounce", { stateful: { kind: "for", ms: 4 * 3_600_000 }, then: "bounce" }],
  ["drop rate=30% seed=42", { base: "drop", stateful: { kind: "rate", percent: 30, seed: 42 } }],
  ["DEFER FIRST=3 THEN=DEFER", { stateful: { kind: "first", attempts: 3 }, then: "defer" }],
  ['defer reply="451 4.7.1 Try again later"', { reply: { code: 451, lines: ["4.7.1 Try again later"] } }],
  ['defer reply="452 4.2.2 Mailbox full"', { reply: { code: 452, lines: ["4.2.2 Mailbox full"] } }],
  ['bounce reply="552 5.2.2 Mailbox full"', { reply: { code: 552, lines: ["5.2.2 Mailbox full"] } }],
  ["defer at=connect", { at: "connect" }],
  ["defer at=helo", { at: "helo" }],
  ["bounce at=mail", { at: "mail" }],
  ["defer at=data", { at: "data" }],
  ['defer at=eod reply="451 4.3.0 Queue full, try later"', { at: "eod" }],
  ["accept delay=30s", { at: "eod", delayMs: 30_000 }],
  ["accept at=rcpt delay=1500ms", { at: "rcpt", delayMs: 1500 }],
  ["defer at=mail delay=2m", { at: "mail", delayMs: 120_000 }],
  ["drop at=eod", { base: "drop", at: "eod" }],
  ["drop at=connect", { at: "connect" }],
  ["greylist key=triplet", { greylist: { key: "triplet", minMs: 0 } }],
  ["greylist min=5m window=4h", { greylist: { key: "ip", minMs: 300_000, windowMs: 14_400_000 } }],
  ["  DEFER   at=eod  ", { base: "defer", at: "eod", text: "defer at=eod" }],
];

Deno.test("language: every documented form parses", () => {
  for (const [value, want] of FORMS) {
    const sc = parseScenario(value);
    assert(typeof sc !== "string", `${value}: ${sc}`);
    for (const [k, v] of Object.entries(want)) {
      assertEquals((sc as unknown as Record<string, unknown>)[k], v, `${value}: ${k}`);
    }
  }
});

/** Malformed values and the exact reason the listener and the CLI give. */
const MALFORMED: [string, string][] = [
  ["", 'unknown mode "": one of defer, bounce, accept, accept-log, greylist, drop'],
  ["deny", 'unknown mode "deny": one of defer, bounce, accept, accept-log, greylist, drop'],
  ["accept;drop", 'unknown mode "accept;drop": one of defer, bounce, accept, accept-log, greylist, drop'],
  ["defer at=queue", "at must be one of connect, helo, mail, rcpt, data, eod"],
  ["defer at", 'expected key=value, got "at"'],
  ["defer at=eod at=rcpt", "at is given twice"],
  [
    "defer colour=red",
    'unknown option "colour": at, reply, delay, key, min, window, starttls, first, every, for, rate, seed, then',
  ],
  ["accept first=2", "first= applies to defer, bounce and drop only"],
  ["defer first=0", "first must be a count from 1 to 100"],
  ["defer first=2 for=1h", "one of first=, every=, for= and rate= at a time"],
  ["defer every=3 first=2", "one of first=, every=, for= and rate= at a time"],
  ["defer every=1", "every must be a count from 2 to 100"],
  ["defer every=101", "every must be a count from 2 to 100"],
  ["accept every=3", "every= applies to defer, bounce and drop only"],
  ["defer every=3 at=eod", "first=, every=, for= and rate= act at rcpt (a message is known by its recipient)"],
  ["defer rate=130%", "rate must be a percentage like 30%"],
  ["defer rate=30", "rate must be a percentage like 30%"],
  ["defer first=2 seed=4", "seed= goes with rate="],
  ["defer then=bounce", "then= goes with first=, every=, for= or rate="],
  ["defer first=2 then=drop", "then must be accept, defer or bounce"],
  ["defer first=2 at=eod", "first=, every=, for= and rate= act at rcpt (a message is known by its recipient)"],
  ["defer for=31d", "for is over the maximum of 2592000 s"],
  ["accept starttls=maybe", "starttls must be off, refuse or break"],
  ['defer reply="550 5.1.1 No"', "defer takes a 4xx reply"],
  ['bounce reply="451 4.7.1 Later"', "bounce takes a 5xx reply"],
  ['accept reply="250 2.0.0 ok"', "reply= applies to defer (4xx) and bounce (5xx) only"],
  ['defer reply="451 5.7.1 Mixed"', "reply code 451 and status 5.7.1 disagree on the class"],
  [
    'defer reply="451 Try later"',
    'reply must be "CODE X.Y.Z text" (e.g. "451 4.7.1 Try again later"), got "451 Try later"',
  ],
  [`defer reply="451 4.7.1 ${"x".repeat(201)}"`, "reply text is over 200 characters"],
  ["accept delay=soon", 'delay must be a duration like 30s, 500ms, 5m, 1h, got "soon"'],
  ["accept delay=11m", `delay is over the maximum of ${MAX_DELAY_MS / 1000} s`],
  ["accept key=triplet", "key= applies to greylist only"],
  ["greylist key=sender", "key must be ip or triplet"],
  ["greylist min=-1s", 'min must be a duration like 30s, 500ms, 5m, 1h, got "-1s"'],
  ["greylist window=8d", "window is over the maximum of 604800 s"],
  ['defer reply="451 4.7.1 unterminated', "unterminated quote in reply="],
  ['defer "at"=eod', 'cannot read the value at "\\"at\\"=eod"'],
  ["drop at=connect delay=1s", "drop at=connect cannot delay: nothing is sent"],
  ["defer " + "x".repeat(600), "the value is over 512 characters"],
];

Deno.test("language: malformed values are refused with a precise reason", () => {
  for (const [value, reason] of MALFORMED) assertEquals(parseScenario(value), reason, JSON.stringify(value));
});

const TX = ["EHLO c.test", "MAIL FROM:<a@origin.test>", "RCPT TO:<b@sinkhole.test>", "DATA"];

Deno.test("language: each stage fails where the scenario says, 421 closes, other stages answer normally", () => {
  const cases: [string, string[], number[], { close?: boolean; drop?: boolean }][] = [
    ["defer at=helo", ["EHLO c.test"], [421], { close: true }],
    ["bounce at=helo", ["EHLO c.test", "MAIL FROM:<a@origin.test>"], [554, 503], {}],
    ["defer at=mail", ["EHLO c.test", "MAIL FROM:<a@origin.test>"], [250, 421], { close: true }],
    [
      'defer at=mail reply="451 4.7.1 Later"',
      ["EHLO c.test", "MAIL FROM:<a@origin.test>", "NOOP"],
      [250, 451, 250],
      {},
    ],
    ["bounce at=data", TX, [250, 250, 250, 554], {}],
    ["defer", TX.slice(0, 3), [250, 250, 421], { close: true }],
    ["drop", TX.slice(0, 3), [250, 250, 451], { drop: true }],
    ["drop at=mail", TX.slice(0, 2), [250, 250], { drop: true }],
  ];
  for (const [mode, lines, codes, how] of cases) {
    const { last, codes: got } = play(mode, lines);
    assertEquals(got, codes, mode);
    assertEquals(last.after === "close", !!how.close, `${mode} closes`);
    assertEquals(last.after === "drop", !!how.drop, `${mode} drops`);
  }
});

Deno.test("language: end of data fails after the body; delay rides on the stage's reply", async () => {
  const { endOfData } = await import("../listener.ts");
  const state = play('defer at=eod reply="451 4.3.0 Queue full"', TX).outs.at(-1)!.state;
  const eod = endOfData(state, { size: 10, longLine: false });
  assertEquals(eod.reply, { code: 451, lines: ["4.3.0 Queue full"] });
  assertEquals(eod.state.tx, undefined);
  const delayed = play("accept delay=30s", TX).outs.at(-1)!.state;
  assertEquals(endOfData(delayed, { size: 1, longLine: false }).delayMs, 30_000);
  assertEquals(play("accept at=rcpt delay=2s", TX).outs[2].delayMs, 2000);
  assertEquals(endOfData(play("drop at=eod", TX).outs.at(-1)!.state, { size: 1, longLine: false }).after, "drop");
});

Deno.test("language: greeting at connect: 421 closes, 554 then 503 to all but QUIT, drop sends nothing", () => {
  assertEquals(greeting(scenario("accept"), SERVER).reply.code, 220);
  const deferred = greeting(scenario("defer at=connect"), SERVER);
  assertEquals([deferred.reply.code, deferred.after === "close"], [421, true]);
  const refused = greeting(scenario("bounce at=connect"), SERVER);
  assertEquals(refused.reply.code, 554);
  let state = refused.state;
  const ehlo = respond(state, "EHLO c.test", { scenario: scenario("accept"), serverName: SERVER });
  assertEquals(ehlo.reply.lines, ["5.5.1 No SMTP service here"]);
  state = ehlo.state;
  assertEquals(respond(state, "QUIT", { scenario: scenario("accept"), serverName: SERVER }).reply.code, 221);
  assertEquals(greeting(scenario("drop at=connect"), SERVER).after, "drop");
});

Deno.test("language: per-recipient outcomes by address, whatever the global mode", () => {
  assertEquals(recipientOutcome("bounce+x@sinkhole.test"), { kind: "bounce" });
  assertEquals(recipientOutcome("Defer+anything@sinkhole.test"), { kind: "defer" });
  assertEquals(recipientOutcome("452-4.2.2+x@sinkhole.test"), {
    kind: "reply",
    reply: { code: 452, lines: ["4.2.2 Per-recipient reply 452 from sinkhole"] },
  });
  assertEquals(recipientOutcome("plain@sinkhole.test"), undefined);
  assertEquals(recipientOutcome("other+x@sinkhole.test"), undefined);
  assertEquals(recipientOutcome("452-5.2.2+x@sinkhole.test"), undefined, "classes must agree");
  const rcpts = [
    "RCPT TO:<accept+1@sinkhole.test>",
    "RCPT TO:<bounce+2@sinkhole.test>",
    "RCPT TO:<defer+3@sinkhole.test>",
    "RCPT TO:<451-4.7.1+4@sinkhole.test>",
    "RCPT TO:<greylist+5@sinkhole.test>",
    "RCPT TO:<plain@sinkhole.test>",
  ];
  const { codes, last } = play("bounce", ["EHLO c.test", "MAIL FROM:<a@origin.test>", ...rcpts, "DATA"]);
  assertEquals(codes, [250, 250, 250, 550, 451, 451, 451, 550, 354]);
  assertEquals(last.after, "data", "one accepted recipient is enough for DATA");
  const pass = play(
    "defer",
    ["EHLO c.test", "MAIL FROM:<a@origin.test>", "RCPT TO:<greylist+5@sinkhole.test>"],
    "pass",
  );
  assertEquals(pass.codes.at(-1), 250, "greylist+ passes on a retry");
  const drop = play("accept", ["EHLO c.test", "MAIL FROM:<a@origin.test>", "RCPT TO:<drop+x@sinkhole.test>"]);
  assertEquals(drop.last.after, "drop");
  const closing = play("accept", ["EHLO c.test", "MAIL FROM:<a@origin.test>", "RCPT TO:<421+x@sinkhole.test>"]);
  assertEquals(closing.last.after, "close", "a per-recipient 421 closes too");
});

Deno.test("language: greylist triplet asks per recipient; min defers early retries", async () => {
  const { asked } = play("greylist key=triplet", [...TX.slice(0, 3), "RCPT TO:<c@sinkhole.test>"], "defer", {
    client: "192.0.2.9",
  });
  assertEquals(asked, ["192.0.2.9|a@origin.test|b@sinkhole.test", "192.0.2.9|a@origin.test|c@sinkhole.test"]);
  const { GreylistTable } = await import("../listener.ts");
  const t = new GreylistTable(60_000);
  assertEquals(t.check("k", 0, 5000), "defer", "first attempt");
  assertEquals(t.check("k", 1000, 5000), "defer", "too early");
  assertEquals(t.check("k", 6000, 5000), "pass", "after min");
  assertEquals(t.check("w", 0, 0, 1000), "defer");
  assertEquals(t.check("w", 2000, 0, 1000), "defer", "the scenario's own window passed");
});

Deno.test("language: the canonical text parses back to the same scenario", () => {
  for (const [value] of FORMS) {
    const sc = scenario(value);
    assertEquals(scenario(sc.text), sc, `${value} → ${sc.text}`);
  }
  assertEquals(scenario('defer reply="451 4.7.1 Try again"').text, 'defer reply="451 4.7.1 Try again"');
});

Deno.test("language: the control CLI validates with the listener's parser and writes the canonical text", async () => {
  const { validateMode, InvalidModeError } = await import("../ctl/commands.ts");
  assertEquals(validateMode('defer  at=eod reply="451 4.3.0 Queue full"'), 'defer at=eod reply="451 4.3.0 Queue full"');
  let refused: unknown;
  try {
    validateMode("defer at=later");
  } catch (e) {
    refused = e;
  }
  assert(refused instanceof InvalidModeError);
  assertEquals(
    (refused as Error).message,
    '"defer at=later" is not a mode the listener accepts: at must be one of connect, helo, mail, rcpt, data, eod',
  );
});
