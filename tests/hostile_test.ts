/**
 * Hostile input that is legal SMTP or a documented operator action: SMTP smuggling, logs
 * that must say only what happened on the wire and fit CloudWatch, shutdown inside a
 * delay, and case in mode values. Real clients over TCP; memory is in memory_test.ts.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import {
  type EventOf,
  type Listener,
  mailer,
  RawClient,
  readByServer,
  startListener,
  transaction,
  withListener,
} from "../rig/helpers.ts";
import { logLine, MAX_LOG_LINE_BYTES, MAX_RECIPIENTS, MAX_TRANSCRIPT_BYTES, parseScenario } from "../listener.ts";

const ACCEPTED = [220, 250, 250, 250, 354, 250, 221];

/** A session up to DATA's 354 in accept-log. */
async function inData(l: Listener, from = "a@origin.test"): Promise<RawClient> {
  const c = await RawClient.connect(l.port);
  assertEquals((await c.reply()).code, 220);
  assertEquals((await c.cmd("EHLO smuggler.test")).code, 250);
  assertEquals((await c.cmd(`MAIL FROM:<${from}>`)).code, 250);
  assertEquals((await c.cmd("RCPT TO:<victim@sinkhole.test>")).code, 250);
  assertEquals((await c.cmd("DATA")).code, 354);
  return c;
}

const SMUGGLED = "MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@sinkhole.test>\r\nDATA\r\n" +
  "Subject: smuggled\r\n\r\nwire the money\r\n.\r\nQUIT\r\n";

for (
  const [shape, end] of [
    ["<LF>.<LF>", "\n.\n"],
    ["<CR><LF>.<LF>", "\r\n.\n"],
    ["<LF>.<CR><LF>", "\n.\r\n"],
    ["<CR>.<CR><LF>", "\r.\r\n"],
    ["<CRLF><LF>.<CRLF>", "\r\n\n.\r\n"],
  ]
) {
  Deno.test(`smuggling: ${shape} does not end DATA; the message is refused and the session closed`, () =>
    withListener({ SINKHOLE_MODE: "accept-log" }, async (l) => {
      const c = await inData(l);
      await c.send(`Subject: cover\r\n\r\nhello${end}${SMUGGLED}`);
      const reply = await c.reply();
      assertEquals(reply.lines, ["550 5.5.2 Bare <LF> or <CR> in message content, lines must end in <CRLF>"]);
      assert(await c.closedByServer(), "closed: nothing after the bare line end is read as a command");
      c.close();
      const session = await l.waitFor("session", (s) => s.helo === "smuggler.test");
      assertEquals(session.transactionCount, 1, "one transaction, not a smuggled second one");
      assertEquals(session.transactions[0].result, 550);
      assertEquals(l.events("message"), [], "nothing was accepted, nothing smuggled was logged");
      assertEquals(await transaction(l.port), ACCEPTED, "the listener is fine");
    }));
}

Deno.test("smuggling: CRLF.CRLF alone ends DATA; commands may still end in a bare LF (as Postfix's normalize)", () =>
  withListener({ SINKHOLE_MODE: "accept-log" }, async (l) => {
    const c = await RawClient.connect(l.port);
    await c.reply();
    assertEquals((await c.cmd("EHLO lf.test\n".slice(0, -1))).code, 250);
    await c.send("MAIL FROM:<a@origin.test>\nRCPT TO:<b@sinkhole.test>\nDATA\n");
    assertEquals([(await c.reply()).code, (await c.reply()).code, (await c.reply()).code], [250, 250, 354]);
    await c.send("Subject: fine\r\n\r\n..dotted\r\n.\r\n");
    assertEquals((await c.reply()).code, 250);
    assertEquals((await c.cmd("QUIT")).code, 221);
    c.close();
    const msg = await l.waitFor("message");
    assertEquals(msg.headers, ["Subject: fine"]);
    assertEquals(msg.size, 15 + 2 + 9, "dot-unstuffed");
  }));

Deno.test("logs: a reply is logged once written; a client gone during an end-of-data delay got nothing", () =>
  withListener({ SINKHOLE_MODE: "accept-log delay=10m" }, async (l) => {
    const c = await RawClient.connect(l.port);
    await c.reply();
    await c.cmd("EHLO leaver.test");
    await c.cmd("MAIL FROM:<a@origin.test>");
    await c.cmd("RCPT TO:<b@sinkhole.test>");
    await c.cmd("DATA");
    await c.send("Subject: never told\r\n\r\nx\r\n.\r\n");
    await readByServer(c, l.port); // the end of data was read: the 250 is held for ten minutes
    c.close(); // and the client leaves meanwhile
    // The session ends only when the listener tries to write; stop it to find out (the delay is cut).
    const status = await l.stop();
    assertEquals(status.code, 0);
    const session = l.events("session").find((s) => s.helo === "leaver.test")!;
    assert(session, "the session was logged");
    assertEquals(session.replies.slice(0, 5), [220, 250, 250, 250, 354]);
    assert(!session.replies.slice(5).includes(250), `no 250 for the message, it was never said: ${session.replies}`);
    assertEquals(session.transactions[0].result, undefined, "no end-of-data result: the client was never told");
    assertEquals(l.events("message"), [], "an accept-log message is logged only once its 250 was written");
  }));

Deno.test("logs: the message line lists the accepted recipients only; any 2yz accepts (251 then DATA gets 354)", () =>
  withListener({ SINKHOLE_MODE: "accept-log" }, async (l) => {
    const info = await mailer(l.port).sendMail({
      from: "a@origin.test",
      to: ["plain@sinkhole.test", "defer+1@sinkhole.test", "251+2@sinkhole.test", "bounce+3@sinkhole.test"],
      subject: "mixed",
      text: "x",
    });
    assertEquals(info.accepted.sort(), ["251+2@sinkhole.test", "plain@sinkhole.test"]);
    const msg = await l.waitFor("message");
    assertEquals(msg.rcpts, ["plain@sinkhole.test", "251+2@sinkhole.test"]);
    assertEquals(msg.rcptCount, 2);
    const only251 = await mailer(l.port).sendMail({ from: "a@origin.test", to: "251+x@sinkhole.test", text: "y" });
    assertEquals(only251.accepted, ["251+x@sinkhole.test"], "a lone 251 recipient is enough for DATA");
    assertMatch(only251.response, /^250 /);
  }));

Deno.test("logs: the longest session line stays under CloudWatch's event size, flagged truncated", () =>
  withListener({ SINKHOLE_MODE: "accept" }, async (l) => {
    const c = await RawClient.connect(l.port);
    await c.reply();
    await c.cmd(`EHLO ${"h".repeat(500)}`);
    // The longest valid paths: a 64-octet local part and a long domain (RFC 5321 §4.5.3.1).
    const domain = `${"d".repeat(60)}.${"e".repeat(60)}.${"f".repeat(60)}.test`;
    const long = (i: number, j: number) => `${"r".repeat(56)}${i}x${j}@${domain}`;
    // Each RSET logs its transaction's MAX_RECIPIENTS abandoned attempts (~1.2 KB a line): one transaction at a time,
    // each one's lines read before the next, or 25 at once would overflow the log queue (MAX_LOG_QUEUE_BYTES,
    // `log_dropped`) and could drop the session line this test reads.
    for (let i = 0; i < 25; i++) {
      let script = `MAIL FROM:<${"s".repeat(60)}${i}@${domain}>\r\n`;
      for (let j = 0; j < MAX_RECIPIENTS; j++) script += `RCPT TO:<${long(i, j)}>\r\n`;
      const sending = c.send(script + "RSET\r\n");
      for (let k = 0; k < MAX_RECIPIENTS + 2; k++) await c.reply();
      await sending;
      await l.waitFor("attempt", (a) => a.rcpt === long(i, MAX_RECIPIENTS - 1));
    }
    assertEquals((await c.cmd("QUIT")).code, 221);
    c.close();
    const session = await l.waitFor("session", (s) => s.commands > 2000);
    const line = logLine(session as EventOf<"session">);
    assert(line.length <= MAX_LOG_LINE_BYTES, `${line.length} octets`);
    assert(line.length <= MAX_TRANSCRIPT_BYTES * 3, `bounded by the transcript: ${line.length} octets`);
    assertEquals(session.transcriptTruncated, true);
    assertEquals(session.transactionCount, 25);
  }));

Deno.test("logs: U+2028, U+2029 and U+0085 are escaped, each alone and together; the line is one line and reads back the same", () => {
  for (
    const header of ["Subject: a\u2028b", "Subject: a\u2029b", "Subject: a\u0085b", "Subject: a\u2028b\u2029c\u0085d"]
  ) {
    const bytes = logLine({
      event: "message",
      client: "127.0.0.1",
      from: "",
      rcpts: [],
      rcptCount: 0,
      size: 1,
      headers: [header],
      truncated: false,
    });
    const text = new TextDecoder().decode(bytes);
    assertEquals(text.indexOf("\n"), text.length - 1);
    assert(!/[\u2028\u2029\u0085]/.test(text), text);
    assertMatch(text, /\\u(2028|2029|0085)/);
    assertEquals(JSON.parse(text).headers, [header]);
  }
});

Deno.test("shutdown: SIGTERM ends sessions waiting inside a delay and those mid-command, within the grace", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept at=rcpt delay=10m" });
  const delayed = await RawClient.connect(l.port);
  const typing = await RawClient.connect(l.port);
  try {
    await delayed.reply();
    await delayed.cmd("EHLO delayed.test");
    await delayed.cmd("MAIL FROM:<a@origin.test>");
    await delayed.send("RCPT TO:<b@sinkhole.test>\r\n"); // answered in ten minutes
    await typing.reply();
    await typing.cmd("EHLO typing.test");
    await typing.send("NOO"); // half a command
    await readByServer(delayed, l.port); // the RCPT was read: its 250 is now held for ten minutes
    await readByServer(typing, l.port);
    l.child.kill("SIGTERM");
    assertEquals((await typing.reply()).lines, ["421 4.3.2 Service shutting down"], "mid-command is idle");
    assertEquals((await delayed.reply()).lines, ["421 4.3.2 Service shutting down"], "a delay is cut short");
    // Exit 0 without waiting the delay out (the rig would SIGKILL after a minute: exit 137).
    const status = await l.stop();
    assertEquals(status.code, 0, l.stderr());
    const delayedSession = l.events("session").find((s) => s.helo === "delayed.test")!;
    assertEquals(delayedSession.transactions[0].rcpts, [], "the held 250 was never said, so it is not logged");
  } finally {
    delayed.close();
    typing.close();
    await l.stop();
  }
});

Deno.test("mode values ignore case, but for a custom reply's text", () => {
  const sc = parseScenario('DEFER AT=EOD DELAY=2S REPLY="451 4.3.0 Queue Full"');
  assert(typeof sc !== "string", String(sc));
  assertEquals([sc.base, sc.at, sc.delayMs, sc.reply?.lines], ["defer", "eod", 2000, ["4.3.0 Queue Full"]]);
  assertEquals(sc.text, 'defer at=eod delay=2s reply="451 4.3.0 Queue Full"');
  const grey = parseScenario("Greylist KEY=Triplet MIN=5M STARTTLS=Refuse");
  assert(typeof grey !== "string", String(grey));
  assertEquals([grey.greylist.key, grey.greylist.minMs, grey.starttls], ["triplet", 300_000, "refuse"]);
});

Deno.test("mode file: a file over its bound is refused, not loaded; the last good mode is kept", async () => {
  const file = await Deno.makeTempFile({ prefix: "sinkhole-big-mode-" });
  await Deno.writeTextFile(file, "accept\n");
  const l = await startListener({ SINKHOLE_MODE_FILE: file, SINKHOLE_CACHE_TTL: "0.2" });
  try {
    await Deno.writeTextFile(file, "accept" + " ".repeat(64 * 1024 * 1024));
    const err = await l.waitFor("mode_error");
    assertMatch(err.reason, /the mode file is over \d+ octets/);
    assertEquals(err.keeping, "accept");
    assertEquals(await transaction(l.port), ACCEPTED);
  } finally {
    await l.stop();
    await Deno.remove(file);
  }
});

Deno.test("docs: docs/protocol.md's limits and memory budget name every bound with the constant's value", async () => {
  const lim = await import("../listener.ts");
  const readme = Deno.readTextFileSync(new URL("../docs/protocol.md", import.meta.url));
  const kib = (n: number) => `${n / 1024} KiB`;
  const said: [string, string][] = [
    ["MAX_COMMAND_LINE", `${lim.MAX_COMMAND_LINE} octets`],
    ["MAX_TEXT_LINE", `${lim.MAX_TEXT_LINE} octets`],
    ["MAX_RECIPIENTS", `${lim.MAX_RECIPIENTS}`],
    ["MAX_ERRORS_PER_SESSION", `${lim.MAX_ERRORS_PER_SESSION}`],
    ["MAX_LOGGED_HEADER_BYTES", kib(lim.MAX_LOGGED_HEADER_BYTES)],
    ["READ_BUFFER_BYTES", kib(lim.READ_BUFFER_BYTES)],
    ["MAX_PENDING_REPLY_BYTES", kib(lim.MAX_PENDING_REPLY_BYTES)],
    ["MAX_TRANSCRIPT_BYTES", kib(lim.MAX_TRANSCRIPT_BYTES)],
    ["KEPT_ENTRY_COST", `${lim.KEPT_ENTRY_COST} octets`],
    ["MAX_LOGGED_TRANSACTIONS", `${lim.MAX_LOGGED_TRANSACTIONS}`],
    ["MAX_LOGGED_REPLIES", `${lim.MAX_LOGGED_REPLIES}`],
    ["MAX_KEPT_RCPT_BYTES", kib(lim.MAX_KEPT_RCPT_BYTES)],
    ["MAX_GREYLIST_ENTRIES", lim.MAX_GREYLIST_ENTRIES.toLocaleString("en")],
    ["GREYLIST_ENTRY_BYTES", `${lim.GREYLIST_ENTRY_BYTES}`],
    ["MAX_ATTEMPT_ENTRIES", lim.MAX_ATTEMPT_ENTRIES.toLocaleString("en")],
    ["ATTEMPT_ENTRY_BYTES", `${lim.ATTEMPT_ENTRY_BYTES}`],
    ["MAX_SCENARIO_LENGTH", `${lim.MAX_SCENARIO_LENGTH}`],
    ["MAX_MODE_FILE_BYTES", kib(lim.MAX_MODE_FILE_BYTES)],
    ["MAX_SESSIONS_CAP", `${lim.MAX_SESSIONS_CAP}`],
    ["RING_SLACK", `${lim.RING_SLACK}`],
    ["MAX_CONTROL_LEDGER_BYTES", kib(lim.MAX_CONTROL_LEDGER_BYTES)],
    ["MAX_CONTROL_BODY_BYTES", kib(lim.MAX_CONTROL_BODY_BYTES)],
  ];
  assertMatch(readme, new RegExp(`${lim.DEFAULT_MAX_SESSIONS} by default\\s+\\(\`DEFAULT_MAX_SESSIONS\`\\)`));
  for (const [name, value] of said) {
    const at = readme.indexOf(`\`${name}\``);
    assert(at >= 0, `${name} is in docs/protocol.md`);
    const around = readme.slice(at, at + 160);
    assert(around.includes(value), `${name} is said to be ${value}: ${around}`);
  }
  assertEquals(lim.MAX_LOG_LINE_BYTES, 256 * 1024 - 26, "CloudWatch Logs' event size");
  assertMatch(readme, /`MAX_LOG_LINE_BYTES`\s+\(256\s+KiB\s+less\s+26\s+octets/);
});
