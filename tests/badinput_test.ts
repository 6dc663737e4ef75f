/** Bad input against a running listener: precise replies, no crash, other sessions keep working. */
import { assert, assertEquals } from "../rig/assert.ts";
import { type Listener, RawClient, transaction, withListener as withRunning } from "../rig/helpers.ts";
import { MAX_COMMAND_LINE, MAX_ERRORS_PER_SESSION, MAX_RECIPIENTS, MAX_TEXT_LINE } from "../listener.ts";

/**
 * An idle timeout short enough to end the bad sessions below quickly, and long enough that
 * the healthy sessions beside them, which answer in milliseconds, never meet it on a busy
 * machine (a margin of about a thousand).
 */
const IDLE_TIMEOUT_S = 5;
/** Waiting for the reply that the idle timeout brings: a hang guard. */
const TIMEOUT_REPLY_WAIT_MS = 60_000;

/** Runs `fn` against one accept-log listener, then proves it is still healthy (and exits cleanly). */
function withListener(fn: (l: Listener) => Promise<void>, env: Record<string, string> = {}): Promise<void> {
  return withRunning({ SINKHOLE_MODE: "accept-log", ...env }, async (l) => {
    await fn(l);
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221], "a healthy session still succeeds");
    assert(!l.logs.some((x) => x.event === "error"), "no error was logged");
  });
}

async function greeted(port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  assertEquals((await c.reply()).code, 220);
  assertEquals((await c.cmd("EHLO client.test")).code, 250);
  return c;
}

Deno.test("bad input: a command line over 512 octets gets 500 5.5.2, in one read or spread over many", () =>
  withListener(async (l) => {
    const c = await greeted(l.port);
    const long = "NOOP " + "x".repeat(MAX_COMMAND_LINE);
    assertEquals((await c.cmd(long)).lines, ["500 5.5.2 Line too long"]);
    assertEquals((await c.cmd("NOOP")).code, 250);
    // Spread over writes: one reply as soon as the limit is crossed, the rest discarded to LF.
    await c.send("NOOP " + "y".repeat(300));
    await new Promise((ok) => setTimeout(ok, 50));
    await c.send("y".repeat(300));
    assertEquals((await c.reply()).lines, ["500 5.5.2 Line too long"]);
    await c.send("y".repeat(5000) + "\r\nNOOP\r\n");
    assertEquals((await c.reply()).code, 250, "the tail of the long line is discarded, the next command answered");
    // Exactly at the limit is fine.
    assertEquals((await c.cmd("NOOP " + "z".repeat(MAX_COMMAND_LINE - 7))).code, 250);
    c.close();
  }));

Deno.test("bad input: a text line over 1000 octets makes end of data 554 5.6.0; the session goes on", () =>
  withListener(async (l) => {
    const c = await greeted(l.port);
    await c.cmd("MAIL FROM:<a@origin.test>");
    await c.cmd("RCPT TO:<b@sinkhole.test>");
    assertEquals((await c.cmd("DATA")).code, 354);
    await c.send(`Subject: long\r\n\r\n${"L".repeat(MAX_TEXT_LINE * 3)}\r\nshort\r\n`);
    await c.send("M".repeat(MAX_TEXT_LINE - 200));
    await c.send("M".repeat(400) + "\r\n.\r\n");
    assertEquals((await c.reply()).lines, ["554 5.6.0 Message has a line over 1000 octets"]);
    assertEquals((await c.cmd("MAIL FROM:<a@origin.test>")).code, 250, "a new transaction can start");
    c.close();
    assert(!l.logs.some((x) => x.event === "message"), "a refused message is not logged as accepted");
  }));

Deno.test("bad input: NUL bytes, control characters and invalid UTF-8 in commands get 500 5.5.2", () =>
  withListener(async (l) => {
    const c = await greeted(l.port);
    const bad = [
      new Uint8Array([0x4e, 0x4f, 0x00, 0x4f, 0x50, 13, 10]),
      new Uint8Array([0x48, 0x45, 0x4c, 0x4f, 0x20, 0xff, 0xfe, 0xc3, 13, 10]),
      new TextEncoder().encode("MAIL FROM:<\u00e9t\u00e9@origin.test>\r\n"),
      new Uint8Array([0x4e, 0x4f, 0x4f, 0x50, 0x1b, 13, 10]),
    ];
    for (const bytes of bad) {
      await c.send(bytes);
      assertEquals((await c.reply()).lines, ["500 5.5.2 Command contains invalid characters"]);
    }
    assertEquals((await c.cmd("NOOP")).code, 250);
    c.close();
  }));

Deno.test("bad input: a client that talks before the greeting is answered in order", () =>
  withListener(async (l) => {
    const c = await RawClient.connect(l.port);
    await c.send("EHLO early.test\r\nNOOP\r\nQUIT\r\n");
    assertEquals((await c.reply()).code, 220);
    assertEquals((await c.reply()).code, 250);
    assertEquals((await c.reply()).code, 250);
    assertEquals((await c.reply()).code, 221);
    assert(await c.closedByServer());
    c.close();
  }));

Deno.test("bad input: commands pipelined in one packet get their replies in order", () =>
  withListener(async (l) => {
    const c = await RawClient.connect(l.port);
    await c.send(
      "EHLO pipe.test\r\nMAIL FROM:<a@origin.test>\r\nRCPT TO:<b@sinkhole.test>\r\nRCPT TO:<bad>\r\n" +
        "RCPT TO:<c@sinkhole.test>\r\nDATA\r\nSubject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@origin.test>\r\n" +
        "RCPT TO:<d@sinkhole.test>\r\nDATA\r\nSubject: q\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
    );
    const codes = [];
    for (let i = 0; i < 13; i++) codes.push((await c.reply()).code);
    assertEquals(codes, [220, 250, 250, 250, 501, 250, 354, 250, 250, 250, 354, 250, 221]);
    c.close();
    await l.waitForLog((x) => x.event === "session" && x.helo === "pipe.test"); // written after its messages
    const msgs = l.logs.filter((x) => x.event === "message");
    assertEquals(msgs.length, 2);
    assertEquals(msgs[0].rcpts, ["b@sinkhole.test", "c@sinkhole.test"]);
    // "Subject: q\r\n" + "\r\n" + ".dot\r\n" after dot-unstuffing.
    assertEquals(msgs[1].size, 12 + 2 + 6);
  }));

Deno.test("bad input: 1000 recipients: 100 accepted, the rest 452 4.5.3 (each logged), the message still goes", () =>
  withListener(async (l) => {
    const c = await greeted(l.port);
    await c.cmd("MAIL FROM:<a@origin.test>");
    const n = 1000;
    await c.send(Array.from({ length: n }, (_, i) => `RCPT TO:<r${i}@sinkhole.test>\r\n`).join(""));
    const codes: number[] = [];
    for (let i = 0; i < n; i++) codes.push((await c.reply()).code);
    assertEquals(codes.filter((x) => x === 250).length, MAX_RECIPIENTS);
    assertEquals(codes.filter((x) => x === 452).length, n - MAX_RECIPIENTS);
    assertEquals((await c.cmd("DATA")).code, 354);
    assertEquals((await c.cmd("Subject: many\r\n\r\nx\r\n.")).code, 250);
    c.close();
    const msg = await l.waitForLog((x) => x.event === "message");
    assertEquals((msg.rcpts as string[]).length, MAX_RECIPIENTS);
    // Each recipient past the cap is an attempt of its message, deferred (the MTA sends it again later): logged.
    for (const i of [MAX_RECIPIENTS, n - 1]) {
      const a = await l.waitForLog((x) => x.event === "attempt" && x.rcpt === `r${i}@sinkhole.test`);
      assertEquals(a.event === "attempt" && [a.stage, a.code, a.attempt], ["rcpt", 452, 1]);
    }
  }));

Deno.test("bad input: DATA never terminated ends at the idle timeout; others are served meanwhile", () =>
  withListener(async (l) => {
    const c = await greeted(l.port);
    await c.cmd("MAIL FROM:<a@origin.test>");
    await c.cmd("RCPT TO:<b@sinkhole.test>");
    await c.cmd("DATA");
    await c.send("Subject: never ends\r\n\r\nand on\r\n");
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221]);
    assertEquals((await c.reply(TIMEOUT_REPLY_WAIT_MS)).lines, ["421 4.4.2 Timeout, closing connection"]);
    assert(await c.closedByServer());
    c.close();
    assert(!l.logs.some((x) => x.event === "message" && (x.headers as string[]).includes("Subject: never ends")));
  }, { SINKHOLE_IDLE_TIMEOUT: String(IDLE_TIMEOUT_S) }));

Deno.test("bad input: a client that never reads is dropped at the timeout; others are served", () =>
  withListener(async (l) => {
    const c = await RawClient.connect(l.port);
    // Commands, 1 MB at a time (at most 256 MB), and never a read: the replies fill the
    // socket buffers, the server stops reading, and our writes block until it closes.
    const chunk = new TextEncoder().encode("NOOP\r\n".repeat(174_763));
    const writing = (async () => {
      for (let i = 0; i < 256; i++) {
        try {
          await c.send(chunk);
        } catch {
          return "closed";
        }
      }
      return "never blocked";
    })();
    await new Promise((ok) => setTimeout(ok, 300));
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221]);
    assertEquals(await writing, "closed", "the server closed the connection");
    c.close();
    const session = await l.waitFor("session", (x) => x.commands > 1000);
    assert(session.replyCount < 256 * 174_763, "the session ended before the flood did");
  }, { SINKHOLE_IDLE_TIMEOUT: String(IDLE_TIMEOUT_S) }));

Deno.test("bad input: binary garbage hits the error limit: 421 4.7.0 and close", () =>
  withListener(async (l) => {
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).code, 220);
    const garbage = new Uint8Array(64 * 1024);
    let x = 12345;
    for (let i = 0; i < garbage.length; i++) {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      garbage[i] = x % 7 === 0 ? 10 : x & 0xff;
    }
    await c.send(garbage).catch(() => {});
    const lines: string[] = [];
    for (let i = 0; i < MAX_ERRORS_PER_SESSION + 1; i++) {
      const r = await c.reply().catch(() => undefined);
      if (!r) break;
      lines.push(...r.lines);
    }
    assertEquals(lines.at(-1), "421 4.7.0 Too many errors, closing connection");
    assert(await c.closedByServer());
    c.close();
  }));

Deno.test("bad input: half-open and silent sockets do not hold up other sessions", () =>
  withListener(async (l) => {
    const silent = await Promise.all(
      Array.from({ length: 50 }, () => Deno.connect({ hostname: "127.0.0.1", port: l.port })),
    );
    const halfOpen = await RawClient.connect(l.port);
    await halfOpen.reply();
    await halfOpen.send("EHLO half.test\r\nMAIL FROM:<a@origin.test>\r\n");
    await halfOpen.conn.closeWrite();
    assertEquals((await halfOpen.reply()).code, 250);
    assertEquals((await halfOpen.reply()).code, 250);
    assert(await halfOpen.closedByServer(), "EOF from the client ends the session");
    halfOpen.close();
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221]);
    for (const s of silent) s.close();
  }));
