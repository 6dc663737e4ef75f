/**
 * The retry ledger over TCP: stateful scenarios answered per message across sessions,
 * `attempt` events as the listener logs them, and `ctl report` / `ctl expect` reading them
 * from a JSON-lines file, as `SINKHOLE_LOG_FORMAT=json deno task dev`'s output is read.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import {
  logsFile,
  RawClient,
  run,
  runCtl,
  startListener,
  taskCommand,
  tempModeFile,
  transaction,
} from "../rig/helpers.ts";
import { type AttemptLine, histories, markdownReport, parseRange, unmet } from "../ctl/report.ts";

const MESSAGE = (id: string) => `Message-ID: <${id}@origin.test>\r\nSubject: t\r\n\r\nbody`;
const FROM = "sender@origin.test";
const TO = "someone@sinkhole.test";

const ctl = (...args: string[]) => runCtl(args);

Deno.test("ledger: defer first=2 defers a message twice, then accepts it; every attempt is one event", async () => {
  const l = await startListener({ SINKHOLE_MODE: "defer first=2" });
  try {
    const body = MESSAGE("m1");
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), [220, 250, 250, 421]);
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), [220, 250, 250, 421]);
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), [220, 250, 250, 250, 354, 250, 221]);
    // Another message (another recipient) starts its own count.
    assertEquals(await transaction(l.port, { from: FROM, to: ["other@sinkhole.test"], body }), [220, 250, 250, 421]);
    await l.waitFor("attempt", (a) => a.stage === "eod");
    await l.waitFor("attempt", (a) => a.rcpt === "other@sinkhole.test");
    const attempts = l.events("attempt").filter((a) => a.rcpt === TO);
    assertEquals(attempts.map((a) => [a.attempt, a.stage, a.code]), [[1, "rcpt", 421], [2, "rcpt", 421], [
      3,
      "eod",
      250,
    ]]);
    assertEquals(attempts[2].messageId, "<m1@origin.test>");
    assertEquals(attempts[0].key, `${FROM} > ${TO}`);
    assertEquals(attempts[0].mode, "defer first=2");

    const file = await logsFile(l.logs);
    try {
      const report = await ctl("report", "--file", file);
      assertEquals(report.code, 0, report.stderr);
      assertMatch(report.stdout, /sender@origin\.test > someone@sinkhole\.test: 3 attempt\(s\), delivered once/);
      assertMatch(report.stdout, /#2 \S+ \(\+\d+\.\d s\) 421 at rcpt from 127\.0\.0\.1/);
      const met = await ctl("expect", TO, "--attempts", "3", "--delivered-once", "--interval", "0..60", "--file", file);
      assertEquals(met.code, 0, met.stdout + met.stderr);
      const missed = await ctl("expect", TO, "--attempts", "2", "--file", file);
      assertEquals(missed.code, 1);
      assertMatch(missed.stdout, /unmet: sender@origin\.test > someone@sinkhole\.test: 3 attempt\(s\), expected 2/);
      const stdin = await run("sh", [
        "-c",
        `cat '${file}' | "$@"`,
        "sh",
        ...taskCommand("ctl"),
        "report",
        "--file",
        "-",
      ]);
      assertMatch(stdin.stdout, /delivered once/, "a file, or standard input");
    } finally {
      await Deno.remove(file);
    }
  } finally {
    await l.stop();
  }
});

Deno.test("ledger: defer every=2 defers every second attempt of each message, the others are accepted", async () => {
  const l = await startListener({ SINKHOLE_MODE: "defer every=2" });
  try {
    const body = MESSAGE("e1");
    const accepted = [220, 250, 250, 250, 354, 250, 221];
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), accepted);
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), [220, 250, 250, 421]);
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), accepted);
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), [220, 250, 250, 421]);
    await l.waitFor("attempt", (a) => a.attempt === 4);
    const attempts = l.events("attempt").filter((a) => a.rcpt === TO);
    assertEquals(attempts.map((a) => [a.attempt, a.stage, a.code]), [
      [1, "eod", 250],
      [2, "rcpt", 421],
      [3, "eod", 250],
      [4, "rcpt", 421],
    ]);
    assertEquals(attempts[1].mode, "defer every=2");
  } finally {
    await l.stop();
  }
});

Deno.test("ledger: a dropped final reply, then an accepted retry, is flagged as a duplicate", async () => {
  const modeFile = await tempModeFile("drop at=eod");
  const l = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2" });
  try {
    const body = MESSAGE("dup");
    const first = await transaction(l.port, { from: FROM, to: [TO], body }).catch(() => "dropped");
    assertEquals(first, "dropped", "no reply to the final dot");
    await Deno.writeTextFile(modeFile, "accept");
    await l.waitFor("mode", (m) => m.mode === "accept");
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), [220, 250, 250, 250, 354, 250, 221]);
    await l.waitFor("attempt", (a) => a.code === 250);
    const hs = histories(l.events("attempt") as AttemptLine[]);
    assertEquals(hs.length, 1);
    assertEquals(hs[0].deliveries, 2);
    assert(hs[0].duplicate, "the same Message-ID handed over twice");
    assertEquals(unmet(hs, { message: TO, deliveredOnce: true }), [
      `${FROM} > ${TO}: DELIVERED 2 TIMES (duplicate), expected delivered exactly once`,
    ]);
  } finally {
    await l.stop();
    await Deno.remove(modeFile);
  }
});

Deno.test("ledger: expectations are precise; ranges parse", () => {
  assertEquals(parseRange("3"), [3, 3]);
  assertEquals(parseRange("2..4"), [2, 4]);
  assertEquals(parseRange("5.."), [5, Infinity]);
  assertEquals(parseRange("4..2"), undefined);
  assertEquals(parseRange("x"), undefined);
  const at = (s: number) => new Date(1_700_000_000_000 + s * 1000).toISOString();
  const ev = (attempt: number, s: number, code: number, stage: "rcpt" | "eod"): AttemptLine => ({
    event: "attempt",
    ts: at(s),
    key: `${FROM} > ${TO}`,
    attempt,
    from: FROM,
    rcpt: TO,
    stage,
    code,
    client: "192.0.2.1",
    tls: false,
    mode: "defer first=2",
  });
  const hs = histories([ev(3, 40, 250, "eod"), ev(1, 0, 421, "rcpt"), ev(2, 10, 421, "rcpt")]);
  assertEquals(hs[0].attempts.map((a) => a.intervalS), [undefined, 10, 30], "time order, whatever the log order");
  assertEquals(unmet(hs, { message: TO, intervalS: [5, 20] }), [
    `${FROM} > ${TO}: attempt #3 came 30.0 s after the one before, expected 5..20 s`,
  ]);
  assertEquals(unmet(hs, { message: TO, withinS: 30 }), [
    `${FROM} > ${TO}: delivered after 40.0 s, expected within 30 s of the first attempt`,
  ]);
  assertEquals(unmet(hs, { message: "nobody@sinkhole.test", attempts: [1, 1] }), [
    "no attempt logged for nobody@sinkhole.test",
  ]);
  // The job summary: a table per message and a Mermaid timeline GitHub renders.
  const md = markdownReport(hs);
  assertMatch(md, /\*\*sender@origin\.test > someone@sinkhole\.test\*\*: 3 attempt\(s\), delivered once/);
  assertMatch(md, /\| 2 \| \S+ \| \+10\.0 s \| 421 at rcpt \| 192\.0\.2\.1 \|/);
  assertMatch(md, /```mermaid\ngantt\n {2}dateFormat x\n {2}axisFormat %H:%M:%S\n {2}section someone@sinkhole\.test\n/);
  assert(md.includes(`  #3 250 :milestone, ${Date.parse(at(40))}, 0d\n` + "```"), md);
});

Deno.test("ledger: a client that closes its side during the end-of-data delay was not served: unheard, no message line; both transports", async () => {
  for (const env of [{}, { SINKHOLE_STARTTLS: "on" }] as Record<string, string>[]) {
    const modeFile = await tempModeFile("accept-log delay=60s");
    const l = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2", ...env });
    try {
      const c = await RawClient.connect(l.port);
      await c.reply();
      for (const cmd of ["EHLO c.test", `MAIL FROM:<${FROM}>`, `RCPT TO:<${TO}>`, "DATA"]) await c.cmd(cmd);
      await c.send(MESSAGE("gone") + "\r\n.\r\n");
      await c.conn.closeWrite(); // the client's Timeout.datafinal: it gives up, keeps the message
      assert(await c.closedByServer(), "the listener closes at the client's FIN, before its delay is over");
      c.close();
      const attempt = await l.waitFor("attempt", (a) => a.rcpt === TO);
      assertEquals([attempt.stage, attempt.code, attempt.unheard, attempt.dropped], [
        "eod",
        undefined,
        true,
        undefined,
      ]);
      const session = await l.waitFor("session", () => true);
      assertMatch(session.error ?? "", /closed the connection while its reply was held/);
      assertEquals(session.replies, [220, 250, 250, 250, 354], "nothing said at the end of data");
      // The retry is delivered; the ledger says delivered once, not twice.
      await Deno.writeTextFile(modeFile, "accept-log");
      await l.waitFor("mode", (m) => m.mode === "accept-log");
      assertEquals((await transaction(l.port, { from: FROM, to: [TO], body: MESSAGE("gone") })).slice(-2), [250, 221]);
      await l.waitFor("attempt", (a) => a.rcpt === TO && a.code === 250);
      await l.waitFor("message", () => true);
      assertEquals(l.events("message").length, 1, "one message line: the retry's");
      const file = await logsFile(l.logs);
      try {
        const report = await ctl("report", "--file", file);
        assertMatch(report.stdout, /2 attempt\(s\), delivered once/);
        assertMatch(report.stdout, /client left at eod before the reply \(not delivered\)/);
      } finally {
        await Deno.remove(file);
      }
    } finally {
      await l.stop();
      await Deno.remove(modeFile);
    }
  }
});

Deno.test("ledger: an attempt cut after its RCPT was accepted is one attempt line, counted as the next one shows", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  const d = await startListener({ SINKHOLE_MODE: "drop at=data" });
  try {
    /** Opens a transaction to `to` (each RCPT's reply code), then ends it by `end`. */
    const cut = async (port: number, to: string[], end: (c: RawClient) => Promise<void>) => {
      const c = await RawClient.connect(port);
      try {
        assertEquals((await c.reply()).code, 220);
        assertEquals((await c.cmd("EHLO client.test")).code, 250);
        assertEquals((await c.cmd(`MAIL FROM:<${FROM}>`)).code, 250);
        for (const rcpt of to) {
          if (!rcpt.startsWith("drop+")) assertEquals((await c.cmd(`RCPT TO:<${rcpt}>`)).code, 250);
        }
        await end(c);
      } finally {
        c.close();
      }
    };
    const rcpts = ["quit", "rset", "gone", "beside", "indata"].map((n) => `${n}@sinkhole.test`);
    await cut(l.port, [rcpts[0]], async (c) => assertEquals((await c.cmd("QUIT")).code, 221));
    await cut(l.port, [rcpts[1]], async (c) => {
      assertEquals((await c.cmd("RSET")).code, 250);
      assertEquals((await c.cmd("QUIT")).code, 221);
    });
    await cut(l.port, [rcpts[2]], async () => {}); // the client disconnects
    await cut(l.port, [rcpts[3]], async (c) => {
      await c.send("RCPT TO:<drop+x@sinkhole.test>\r\n"); // dropped: no reply, the connection closed
      assert(await c.closedByServer());
    });
    await cut(l.port, [rcpts[4]], async (c) => {
      assertEquals((await c.cmd("DATA")).code, 354);
      await c.send("Subject: half a message\r\n"); // and gone
    });
    for (const port of [d.port, d.port]) {
      await cut(port, [TO], async (c) => {
        await c.send("DATA\r\n");
        assert(await c.closedByServer());
      });
    }
    // The next attempt of each is numbered from what was counted: the cut one was counted once.
    for (const to of rcpts) {
      assertEquals(await transaction(l.port, { from: FROM, to: [to], body: MESSAGE(to) }), [
        220,
        250,
        250,
        250,
        354,
        250,
        221,
      ]);
    }
    // Each is logged when its session ends, which may come after the next one: wait for both, compare in order.
    for (const rcpt of rcpts) {
      for (const n of [1, 2]) {
        await l.waitFor("attempt", (a) => a.rcpt === rcpt && a.attempt === n);
      }
    }
    await d.waitFor("attempt", (a) => a.attempt === 2);
    const lines = (rcpt: string, from = l) =>
      from.events("attempt").filter((a) => a.rcpt === rcpt).map((a) => [
        a.attempt,
        a.stage,
        a.dropped ? "dropped" : a.code,
        a.abandoned,
      ]).sort((a, b) => Number(a[0]) - Number(b[0]));
    const delivered = [2, "eod", 250, undefined];
    assertEquals(lines(rcpts[0]), [[1, "rcpt", 250, "quit"], delivered]);
    assertEquals(lines(rcpts[1]), [[1, "rcpt", 250, "rset"], delivered]);
    assertEquals(lines(rcpts[2]), [[1, "rcpt", 250, "close"], delivered]);
    assertEquals(lines(rcpts[3]), [[1, "rcpt", 250, "close"], delivered]);
    assertEquals(lines("drop+x@sinkhole.test"), [[1, "rcpt", "dropped", undefined]]);
    assertEquals(lines(rcpts[4]), [[1, "data", 354, "close"], delivered]);
    assertEquals(lines(TO, d), [[1, "data", "dropped", undefined], [2, "data", "dropped", undefined]]);
  } finally {
    await l.stop();
    await d.stop();
  }
});

Deno.test("ledger: a transaction with MAX_RECIPIENTS recipients of 250 octets has an attempt line for each (past its own 2 KiB: the shared pool)", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  try {
    const domain = `${"d".repeat(60)}.${"e".repeat(60)}.${"f".repeat(49)}.sinkhole.test`;
    const to = Array.from({ length: 100 }, (_, i) => `${`r${i}-`.padEnd(64, "x")}@${domain}`);
    assertEquals(to[0].length, 250);
    const codes = await transaction(l.port, { from: FROM, to, body: MESSAGE("many") });
    assertEquals(codes, [220, 250, 250, ...Array(100).fill(250), 354, 250, 221]);
    await l.waitFor("session");
    const lines = l.events("attempt");
    assertEquals(lines.length, 100, "one attempt line per accepted recipient");
    assertEquals(new Set(lines.map((a) => a.rcpt)), new Set(to));
    assert(lines.every((a) => a.attempt === 1 && a.stage === "eod" && a.code === 250));
    const file = await logsFile(l.logs);
    try {
      const report = await ctl("report", "--file", file);
      assertEquals(report.code, 0, report.stderr);
      assertEquals(report.stdout.match(/: 1 attempt\(s\), delivered once/g)?.length, 100, report.stdout.slice(0, 400));
      for (const rcpt of [to[0], to[99]]) {
        const met = await ctl("expect", rcpt, "--attempts", "1", "--delivered-once", "--file", file);
        assertEquals(met.code, 0, met.stdout + met.stderr);
      }
    } finally {
      await Deno.remove(file);
    }
  } finally {
    await l.stop();
  }
});

Deno.test("ledger: two messages with one envelope, one after the other, are two messages, each counted from 1", async () => {
  const modeFile = await tempModeFile("defer first=2");
  const l = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2" });
  try {
    const deferred = [220, 250, 250, 421];
    const accepted = [220, 250, 250, 250, 354, 250, 221];
    for (const id of ["first", "second"]) {
      const body = MESSAGE(id);
      assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), deferred, `${id}: #1`);
      assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), deferred, `${id}: #2`);
      assertEquals(await transaction(l.port, { from: FROM, to: [TO], body }), accepted, `${id}: #3`);
    }
    // A lost final reply: the third message's retry carries its Message-ID, a duplicate of it.
    await Deno.writeTextFile(modeFile, "drop at=eod");
    await l.waitFor("mode", (m) => m.mode === "drop at=eod");
    assertEquals(
      await transaction(l.port, { from: FROM, to: [TO], body: MESSAGE("third") }).catch(() => "dropped"),
      "dropped",
    );
    await Deno.writeTextFile(modeFile, "accept");
    await l.waitFor("mode", (m) => m.mode === "accept");
    assertEquals(await transaction(l.port, { from: FROM, to: [TO], body: MESSAGE("third") }), accepted);
    await l.waitFor("attempt", (a) => a.attempt === 8);
    const attempts = l.events("attempt");
    // The log numbers the envelope's attempts in one sequence; the report splits it into messages.
    assertEquals(attempts.map((a) => a.attempt), [1, 2, 3, 4, 5, 6, 7, 8]);
    const hs = histories(attempts as AttemptLine[]);
    assertEquals(hs.map((h) => [h.attempts.length, h.deliveries, h.duplicate]), [[3, 1, false], [3, 1, false], [
      2,
      2,
      true,
    ]]);
    assertEquals(hs.map((h) => h.attempts.at(-1)!.messageId), [
      "<first@origin.test>",
      "<second@origin.test>",
      "<third@origin.test>",
    ]);
    const file = await logsFile(l.logs);
    try {
      const report = await ctl("report", "--file", file);
      assertEquals(report.code, 0, report.stderr);
      assertMatch(
        report.stdout,
        /someone@sinkhole\.test: 3 attempt\(s\), delivered once[^]*someone@sinkhole\.test: 3 attempt\(s\), delivered once[^]*someone@sinkhole\.test: 2 attempt\(s\), DELIVERED 2 TIMES \(duplicate\)/,
      );
      const first = await ctl(
        "expect",
        TO,
        "--attempts",
        "3",
        "--delivered-once",
        "--file",
        file,
        "--message-id",
        "second@origin.test",
      );
      assertEquals(first.code, 0, first.stdout + first.stderr);
      const all = await ctl("expect", TO, "--delivered-once", "--file", file);
      assertEquals(all.code, 1);
      assertMatch(
        all.stdout,
        /unmet: sender@origin\.test > someone@sinkhole\.test \(message 3 of 3\): DELIVERED 2 TIMES \(duplicate\)/,
      );
      assert(!/message [12] of 3/.test(all.stdout), all.stdout);
    } finally {
      await Deno.remove(file);
    }
  } finally {
    await l.stop();
    await Deno.remove(modeFile);
  }
});

Deno.test("ledger: two messages with one envelope in flight at once share a count until one is delivered, as the docs say", async () => {
  const l = await startListener({ SINKHOLE_MODE: "defer first=2" });
  try {
    const deferred = [220, 250, 250, 421];
    const accepted = [220, 250, 250, 250, 354, 250, 221];
    const send = (id: string) => transaction(l.port, { from: FROM, to: [TO], body: MESSAGE(id) });
    // A and B queued together, tried in turn: they share the first two deferrals; A, back third, is accepted.
    assertEquals(await send("a"), deferred);
    assertEquals(await send("b"), deferred);
    assertEquals(await send("a"), accepted);
    // A's delivery ended the message: B's next attempt opens a new one, deferred twice again.
    assertEquals(await send("b"), deferred);
    assertEquals(await send("b"), deferred);
    assertEquals(await send("b"), accepted);
    await l.waitFor("attempt", (a) => a.attempt === 6);
    const hs = histories(l.events("attempt") as AttemptLine[]);
    // The report: A's message holds B's first attempt (no Message-ID before DATA to tell them apart).
    assertEquals(hs.map((h) => h.attempts.map((a) => a.attempt)), [[1, 2, 3], [4, 5, 6]]);
    assertEquals(hs.map((h) => [h.deliveries, h.duplicate, h.attempts.at(-1)!.messageId]), [
      [1, false, "<a@origin.test>"],
      [1, false, "<b@origin.test>"],
    ]);
  } finally {
    await l.stop();
  }
});
