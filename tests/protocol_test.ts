/** Each mode end to end over TCP with real clients: nodemailer, swaks, and raw SMTP. */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { DEFAULT_HEALTH_PORT, HEALTHCHECK_TIMEOUT_MS, MAX_LOGGED_TRANSACTIONS } from "../listener.ts";
import {
  assertTools,
  eventually,
  failure,
  healthcheck,
  mailer as smtpClient,
  needs,
  privateAddress,
  RawClient,
  REPLY_WAIT_MS,
  run,
  type SendError,
  startListener,
  tempModeFile,
  transaction,
} from "../rig/helpers.ts";

/** How long the client waits for a reply: a hang guard, generous on a busy machine. */
const CLIENT_WAIT_MS = REPLY_WAIT_MS;
/** A timeout under test: short, and only ever asserted as a lower bound. */
const SHORT_TIMEOUT_S = 0.5;

const mailer = (port: number) => smtpClient(port, { name: "nodemailer.client.test" });

const MESSAGE = {
  from: "sender@origin.test",
  to: "someone@sinkhole.test",
  subject: "sinkhole protocol test",
  headers: { "X-Sinkhole-Test": "header-visible" },
  text: "BODY-MUST-NOT-BE-LOGGED\n.leading dot line\n",
};

const sendError = (port: number): Promise<SendError> => failure(mailer(port).sendMail(MESSAGE));

Deno.test("accept: nodemailer delivers, the body is discarded and not logged", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  try {
    const info = await mailer(l.port).sendMail(MESSAGE);
    assertEquals(info.accepted, ["someone@sinkhole.test"]);
    assertMatch(info.response, /^250 2\.0\.0 Message accepted and discarded/);
    const session = await l.waitForLog((x) => x.event === "session");
    const [tx] = session.transactions as { mode: string; result: number; size: number }[];
    assertEquals(tx.mode, "accept");
    assertEquals(tx.result, 250);
    assert(tx.size > 0);
    assert(!l.logs.some((x) => x.event === "message"), "accept mode logs no message line");
  } finally {
    await l.stop();
  }
});

Deno.test("accept-log: one JSON line with envelope and headers, never the body", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept-log" });
  try {
    await mailer(l.port).sendMail(MESSAGE);
    const msg = await l.waitForLog((x) => x.event === "message");
    assertEquals(msg.client, "127.0.0.1");
    assertEquals(msg.helo, "nodemailer.client.test");
    assertEquals(msg.from, "sender@origin.test");
    assertEquals(msg.rcpts, ["someone@sinkhole.test"]);
    assertEquals(msg.truncated, false);
    const headers = msg.headers as string[];
    assert(headers.includes("X-Sinkhole-Test: header-visible"), JSON.stringify(headers));
    assert(headers.some((h) => h.startsWith("Subject: sinkhole protocol test")));
    assert(typeof msg.size === "number" && msg.size > 0);
    await l.waitForLog((x) => x.event === "session");
    const all = l.logs.map((x) => JSON.stringify(x)).join("\n");
    assert(!all.includes("BODY-MUST-NOT-BE-LOGGED"), "the body never reaches the logs");
    assertEquals(l.logs.filter((x) => x.event === "message").length, 1);
  } finally {
    await l.stop();
  }
});

Deno.test("accept-log: header section is bounded and flagged truncated", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept-log" });
  try {
    const big = Array.from({ length: 400 }, (_, i) => `X-Filler-${i}: ${"y".repeat(60)}`).join("\r\n");
    const codes = await transaction(l.port, { body: `Subject: big\r\n${big}\r\n\r\nbody` });
    assertEquals(codes.at(-2), 250);
    const msg = await l.waitForLog((x) => x.event === "message");
    assertEquals(msg.truncated, true);
    assert(JSON.stringify(msg.headers).length < 20 * 1024, "logged headers stay under the cap");
  } finally {
    await l.stop();
  }
});

Deno.test("bounce: 550 5.1.1 on RCPT (nodemailer and swaks), DATA refused", async () => {
  const l = await startListener({ SINKHOLE_MODE: "bounce" });
  try {
    const err = await sendError(l.port);
    assertEquals(err.responseCode, 550);
    assertMatch(err.response ?? "", /^550 5\.1\.1 User unknown/);
    assertEquals(await transaction(l.port), [220, 250, 250, 550, 554, 221]);
  } finally {
    await l.stop();
  }
});

const swaks = needs("swaks");
Deno.test({
  name: "swaks: each mode gives swaks the exit code of its stage",
  ignore: swaks.ignore,
  fn: async () => {
    assertTools(swaks.missing);
    const modeFile = await tempModeFile("accept");
    const l = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.1" });
    const swak = () =>
      run("swaks", ["--server", `127.0.0.1:${l.port}`, "--from", "a@origin.test", "--to", "b@sinkhole.test"]);
    // swaks exit codes: 0 delivered, 24 no recipient accepted.
    const expect: [string, number, RegExp][] = [
      ["accept", 0, /<- {2}250 2\.0\.0 Message accepted and discarded/],
      ["accept-log", 0, /<- {2}250 2\.0\.0 Message accepted and discarded/],
      ["bounce", 24, /<\*\* 550 5\.1\.1 User unknown/],
      ["defer", 24, /<\*\* 421 4\.3\.2 Service temporarily unavailable/],
      ["greylist", 24, /<\*\* 451 4\.7\.1 Greylisted/],
      ["greylist", 0, /<- {2}250 2\.1\.5 Recipient OK/],
    ];
    try {
      for (const [mode, code, pattern] of expect) {
        await Deno.writeTextFile(modeFile, mode);
        await eventually(() => l.logs.findLast((x) => x.event === "mode")?.mode === mode);
        const res = await swak();
        assertEquals(res.code, code, `${mode}: ${res.stdout}`);
        assertMatch(res.stdout, pattern, mode);
      }
    } finally {
      await l.stop();
      await Deno.remove(modeFile);
    }
  },
});

Deno.test("defer: 421 4.3.2 on RCPT, then the server closes; one log line per session", async () => {
  const l = await startListener({ SINKHOLE_MODE: "defer" });
  try {
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).code, 220);
    assertEquals((await c.cmd("EHLO client.test")).code, 250);
    assertEquals((await c.cmd("MAIL FROM:<a@origin.test>")).code, 250);
    const rcpt = await c.cmd("RCPT TO:<b@sinkhole.test>");
    assertEquals(rcpt.lines, ["421 4.3.2 Service temporarily unavailable"]);
    assert(await c.closedByServer(), "421 closes the connection (RFC 5321 §3.8)");
    c.close();
    const err = await sendError(l.port);
    assertEquals(err.responseCode, 421);
    const sessions = () => l.logs.filter((x) => x.event === "session").length;
    await eventually(() => sessions() === 2);
    const before = l.logs.length;
    await transaction(l.port);
    // A session's lines are all written before its closing session line.
    await eventually(() => sessions() === 3);
    assertEquals(
      l.logs.slice(before).map((x) => x.event),
      ["attempt", "session"],
      "a defer session costs its attempt line (the retry ledger) and its session line",
    );
  } finally {
    await l.stop();
  }
});

Deno.test("greylist: first attempt 451, retry accepted, forgotten after the window", async () => {
  // The retry within the window, with the default window (30 min: no machine is that slow).
  const l = await startListener({ SINKHOLE_MODE: "greylist" });
  try {
    const first = await sendError(l.port);
    assertEquals(first.responseCode, 451);
    const info = await mailer(l.port).sendMail(MESSAGE);
    assertEquals(info.accepted, ["someone@sinkhole.test"]);
  } finally {
    await l.stop();
  }
  // The expiry, with a 1 s window: a retry at least that much later is a first attempt again
  // (only a lower bound on time is relied on; a slower machine waits longer, same answer).
  const short = await startListener({ SINKHOLE_MODE: "greylist", SINKHOLE_GREYLIST_WINDOW: "1" });
  try {
    assertEquals((await sendError(short.port)).responseCode, 451);
    await new Promise((ok) => setTimeout(ok, 1200));
    assertEquals((await sendError(short.port)).responseCode, 451, "after the window it is a first attempt again");
  } finally {
    await short.stop();
  }
});

Deno.test("mode file: a developer switches modes live; each transaction keeps its mode", async () => {
  const modeFile = await tempModeFile("defer");
  const l = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2" });
  try {
    assertEquals(await transaction(l.port), [220, 250, 250, 421]);
    const c = await RawClient.connect(l.port);
    await c.reply();
    await c.cmd("EHLO client.test");
    await Deno.writeTextFile(modeFile, "accept\n");
    await l.waitForLog((x) => x.event === "mode" && x.mode === "accept");
    assertEquals((await c.cmd("MAIL FROM:<a@origin.test>")).code, 250);
    await Deno.writeTextFile(modeFile, "bounce\n");
    await l.waitForLog((x) => x.event === "mode" && x.mode === "bounce");
    assertEquals((await c.cmd("RCPT TO:<b@sinkhole.test>")).code, 250, "the transaction began in accept");
    assertEquals((await c.cmd("RSET")).code, 250);
    assertEquals((await c.cmd("MAIL FROM:<a@origin.test>")).code, 250);
    assertEquals((await c.cmd("RCPT TO:<b@sinkhole.test>")).code, 550, "the next transaction is in bounce");
    c.close();
    await Deno.writeTextFile(modeFile, "not-a-mode\n");
    const invalid = await l.waitForLog((x) => x.event === "mode_invalid");
    assertEquals(invalid.keeping, "bounce");
    assertEquals(await transaction(l.port), [220, 250, 250, 550, 554, 221], "invalid value keeps the last good mode");
    await Deno.remove(modeFile);
    const missing = await l.waitForLog((x) => x.event === "mode_error");
    assertMatch(String(missing.reason), /NotFound/);
    // Three TTLs of the file missing (more fetches that fail), then it comes back: the
    // recovery line proves the listener kept fetching, and the error was logged once.
    await new Promise((ok) => setTimeout(ok, 600));
    await Deno.writeTextFile(modeFile, "accept\n");
    await l.waitForLog((x) => x.event === "mode" && x.mode === "accept", CLIENT_WAIT_MS);
    assertEquals(l.logs.filter((x) => x.event === "mode_error").length, 1, "logged once per change of state");
  } finally {
    await l.stop();
    await Deno.remove(modeFile).catch(() => {});
  }
});

Deno.test("protocol: VRFY, HELP, NOOP, RSET, EXPN, unknown commands", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  try {
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).lines, ["220 sinkhole.cabal.internal ESMTP sinkhole"]);
    assertEquals((await c.cmd("VRFY someone")).code, 252);
    assertEquals((await c.cmd("HELP")).code, 214);
    assertEquals((await c.cmd("NOOP")).code, 250);
    assertEquals((await c.cmd("EXPN list")).lines, ["502 5.5.1 Command not implemented"]);
    assertEquals((await c.cmd("STARTTLS")).code, 502);
    assertEquals((await c.cmd("FROBNICATE")).lines, ["500 5.5.2 Command unrecognized"]);
    assertEquals((await c.cmd("MAIL FROM:<a@origin.test>")).lines, ["503 5.5.1 Send HELO or EHLO first"]);
    const ehlo = await c.cmd("EHLO client.test");
    assert(!ehlo.text.includes("STARTTLS") && !ehlo.text.includes("AUTH"), "nothing unimplemented is advertised");
    assertEquals((await c.cmd("DATA")).code, 503);
    assertEquals((await c.cmd("QUIT")).lines, ["221 2.0.0 Bye"]);
    assert(await c.closedByServer());
    c.close();
  } finally {
    await l.stop();
  }
});

Deno.test("health check: exit 0 in every documented mode and at the session cap; nothing logged; 1 when down", async (t) => {
  const modes = [
    "defer",
    "bounce",
    "accept",
    "accept-log",
    "greylist",
    "defer at=connect",
    "bounce at=connect",
    "drop at=connect",
    // A delay at connect longer than the check's own timeout.
    `defer at=connect delay=${(HEALTHCHECK_TIMEOUT_MS / 1000) * 4}s`,
  ];
  for (const mode of modes) {
    await t.step(mode, async () => {
      const l = await startListener({ SINKHOLE_MODE: mode });
      try {
        const ok = await healthcheck(l);
        assertEquals(ok.code, 0, ok.stderr);
        assertEquals(l.logs.filter((x) => x.event === "session").length, 0, "a check is no session");
      } finally {
        await l.stop();
      }
    });
  }
  await t.step("at the session cap", async () => {
    const l = await startListener({ SINKHOLE_MODE: "accept", SINKHOLE_MAX_SESSIONS: "2" });
    const held = [await RawClient.connect(l.port), await RawClient.connect(l.port)];
    try {
      for (const c of held) assertEquals((await c.reply()).code, 220);
      const third = await RawClient.connect(l.port);
      assertEquals((await third.reply()).code, 421, "the cap is reached");
      third.close();
      const ok = await healthcheck(l);
      assertEquals(ok.code, 0, ok.stderr);
    } finally {
      for (const c of held) c.close();
      await l.stop();
    }
  });
  await t.step("down", async () => {
    // Its own loopback address and a fixed port: once it stops, nobody else answers there.
    const at = privateAddress(DEFAULT_HEALTH_PORT);
    const l = await startListener({ SINKHOLE_MODE: "defer", SINKHOLE_HEALTH_PORT: String(at.port) }, { host: at.host });
    await l.stop();
    const down = await healthcheck(l);
    assertEquals(down.code, 1);
    assertMatch(down.stderr, /healthcheck: 127\.[\d.]+:8025: /);
  });
});

Deno.test("SIGTERM: idle sessions get 421, a session in DATA finishes, exit 0", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  const idle = await RawClient.connect(l.port);
  const busy = await RawClient.connect(l.port);
  try {
    await idle.reply();
    await idle.cmd("EHLO idle.test");
    await busy.reply();
    await busy.cmd("EHLO busy.test");
    await busy.cmd("MAIL FROM:<a@origin.test>");
    await busy.cmd("RCPT TO:<b@sinkhole.test>");
    assertEquals((await busy.cmd("DATA")).code, 354);
    await busy.send("Subject: in flight\r\n\r\nfirst half\r\n");
    l.child.kill("SIGTERM");
    assertEquals((await idle.reply()).lines, ["421 4.3.2 Service shutting down"]);
    assert(await idle.closedByServer());
    await busy.send("second half\r\n.\r\n");
    assertEquals((await busy.reply()).code, 250, "the in-flight message is accepted");
    assertEquals((await busy.reply()).code, 421, "then the session is closed");
    const status = await l.stop();
    assertEquals(status.code, 0);
    assert(l.logs.some((x) => x.event === "stopped"));
    await assertRefused(l.port);
  } finally {
    idle.close();
    busy.close();
    await l.stop();
  }
});

async function assertRefused(port: number): Promise<void> {
  let refused = false;
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port })).close();
  } catch {
    refused = true;
  }
  assert(refused, "the port is closed after shutdown");
}

Deno.test("concurrency cap: past SINKHOLE_MAX_SESSIONS a clear 421, then room again", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept", SINKHOLE_MAX_SESSIONS: "2" });
  const a = await RawClient.connect(l.port);
  const b = await RawClient.connect(l.port);
  try {
    await a.reply();
    await b.reply();
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).lines, ["421 4.3.2 Too many concurrent sessions, try again later"]);
    assert(await c.closedByServer());
    c.close();
    await a.cmd("QUIT");
    a.close();
    await eventually(async () => (await transaction(l.port)).at(-1) === 221);
    await l.waitForLog((x) => x.event === "refused");
  } finally {
    a.close();
    b.close();
    await l.stop();
  }
});

Deno.test("timeouts: idle and total session bounds close with 421 4.4.2", async () => {
  // Each bound on a listener of its own, the other one out of reach, so a slow machine can
  // only make a session wait longer, never end it by the bound not under test.
  const idleOnly = await startListener({ SINKHOLE_MODE: "accept", SINKHOLE_IDLE_TIMEOUT: String(SHORT_TIMEOUT_S) });
  try {
    const idle = await RawClient.connect(idleOnly.port);
    await idle.reply();
    const t0 = Date.now();
    assertEquals((await idle.reply(CLIENT_WAIT_MS)).lines, ["421 4.4.2 Timeout, closing connection"]);
    assert(Date.now() - t0 >= SHORT_TIMEOUT_S * 1000 - 100, `closed after ${Date.now() - t0} ms`);
    assert(await idle.closedByServer(CLIENT_WAIT_MS));
    idle.close();
  } finally {
    await idleOnly.stop();
  }

  const totalOnly = await startListener({
    SINKHOLE_MODE: "accept",
    SINKHOLE_SESSION_TIMEOUT: String(SHORT_TIMEOUT_S * 3),
  });
  try {
    const chatty = await RawClient.connect(totalOnly.port);
    const t0 = Date.now();
    await chatty.reply();
    let last = 0;
    // A NOOP every 100 ms keeps it from ever being idle; bounded to a minute of talking.
    while (Date.now() - t0 < CLIENT_WAIT_MS) {
      await chatty.send("NOOP\r\n");
      last = (await chatty.reply(CLIENT_WAIT_MS)).code;
      if (last === 421) break;
      await new Promise((ok) => setTimeout(ok, 100));
    }
    assertEquals(last, 421, "the total session timeout ends a session that keeps talking");
    assert(Date.now() - t0 >= SHORT_TIMEOUT_S * 3000 - 100, `closed after ${Date.now() - t0} ms`);
    chatty.close();
  } finally {
    await totalOnly.stop();
  }
});

Deno.test("session log: bounded to MAX_LOGGED_TRANSACTIONS, later transactions only counted", async () => {
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  try {
    const c = await RawClient.connect(l.port);
    await c.reply();
    await c.cmd("EHLO many.test");
    const n = MAX_LOGGED_TRANSACTIONS + 5;
    for (let i = 0; i < n; i++) {
      assertEquals((await c.cmd("MAIL FROM:<a@origin.test>")).code, 250);
      assertEquals((await c.cmd(`RCPT TO:<r${i}@sinkhole.test>`)).code, 250);
      assertEquals((await c.cmd("DATA")).code, 354);
      assertEquals((await c.cmd(`Subject: ${i}\r\n\r\nx\r\n.`)).code, 250);
    }
    await c.cmd("QUIT");
    c.close();
    const s = await l.waitForLog((x) => x.event === "session");
    const txs = s.transactions as { rcpts: { to: string }[]; result: number }[];
    assertEquals(s.transactionCount, n);
    assertEquals(txs.length, MAX_LOGGED_TRANSACTIONS);
    assertEquals(txs.at(-1)!.rcpts.map((r) => r.to), [`r${MAX_LOGGED_TRANSACTIONS - 1}@sinkhole.test`]);
    assert(txs.every((t) => t.rcpts.length === 1 && t.result === 250));
  } finally {
    await l.stop();
  }
});
