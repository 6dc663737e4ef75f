/**
 * The shared recipient pool over TCP (RCPT_POOL_BYTES; made small here with
 * SINKHOLE_RCPT_POOL_BYTES, the constant untouched): a transaction keeps its accepted
 * recipients in its own MAX_KEPT_RCPT_BYTES, then draws on the pool every session shares;
 * an accepted recipient neither holds is 452 4.5.3 and never accepted unlogged; the pool is
 * whole again however a transaction ends.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import { type Listener, RawClient, startListener } from "../rig/helpers.ts";
import { KEPT_ENTRY_COST, MAX_ERRORS_PER_SESSION, MAX_KEPT_RCPT_BYTES } from "../listener.ts";

const FROM = "sender@origin.test";
/** A 250-octet recipient address, `tag` making it unique (RFC 5321: a local part of at most 64 octets). */
const LONG_DOMAIN = `${"d".repeat(60)}.${"e".repeat(60)}.${"f".repeat(49)}.sinkhole.test`;
const rcpt = (tag: string) => `${tag.padEnd(64, "x").slice(0, 64)}@${LONG_DOMAIN}`;
const COST = rcpt("a").length + KEPT_ENTRY_COST;
/** Recipients a transaction holds of its own, and how many the pool holds beyond them. */
const OWN = Math.floor(MAX_KEPT_RCPT_BYTES / COST);
const POOLED = 5;
const ENV = { SINKHOLE_MODE: "accept", SINKHOLE_RCPT_POOL_BYTES: String(POOLED * COST) };

/**
 * Opens a transaction (pipelined: one write, so no idle gap) with `n` recipients tagged `tag`;
 * returns the client and each RCPT's reply code. With `c`, the session goes on (it said EHLO).
 */
async function fill(port: number, tag: string, n: number, c?: RawClient): Promise<{ c: RawClient; codes: number[] }> {
  const fresh = !c;
  c ??= await RawClient.connect(port);
  let script = fresh ? "EHLO client.test\r\n" : "";
  script += `MAIL FROM:<${FROM}>\r\n`;
  for (let i = 0; i < n; i++) script += `RCPT TO:<${rcpt(`${tag}-${i}`)}>\r\n`;
  await c.send(script);
  if (fresh) {
    assertEquals((await c.reply()).code, 220);
    assertEquals((await c.reply()).code, 250);
  }
  assertEquals((await c.reply()).code, 250);
  const codes: number[] = [];
  for (let i = 0; i < n; i++) codes.push((await c.reply()).code);
  return { c, codes };
}

/** A transaction with every recipient it can hold and one more: OWN + POOLED accepted, then 452. */
const FULL = [...Array(OWN + POOLED).fill(250), 452];

/** Waits until `n` sessions have ended (their session lines: logged once each is closed and its draw given back). */
async function sessionsEnded(l: Listener, n: number): Promise<void> {
  await l.waitForLog(() => l.events("session").length >= n);
}

/** The pool is whole: a new session's transaction holds exactly OWN + POOLED recipients again. */
async function assertWhole(l: Listener, tag: string, why: string): Promise<void> {
  const ended = l.events("session").length;
  const { c, codes } = await fill(l.port, tag, OWN + POOLED + 1);
  c.close();
  assertEquals(codes, FULL, `the pool is whole again after ${why}`);
  await sessionsEnded(l, ended + 1);
}

/** A session holding the whole pool, ended by `end`; then the pool must be whole. */
async function ending(l: Listener, why: string, end: (c: RawClient) => Promise<void>): Promise<void> {
  const ended = l.events("session").length;
  const { c, codes } = await fill(l.port, why, OWN + POOLED + 1);
  try {
    assertEquals(codes, FULL, `${why}: it holds the whole pool`);
    await end(c);
  } finally {
    c.close();
  }
  await sessionsEnded(l, ended + 1);
  await assertWhole(l, `after-${why}`, why);
}

Deno.test("rcptpool: the pool is shared by every session; a recipient past it is 452 4.5.3, not accepted unlogged", async () => {
  const l = await startListener(ENV);
  try {
    const a = await fill(l.port, "a", OWN + POOLED + 2);
    assertEquals(a.codes, [...FULL, 452], "its own bytes, then the pool, then 452 4.5.3");
    // A second session at once: its own bytes still hold OWN; the pool is A's.
    const b = await fill(l.port, "b", OWN + 1);
    assertEquals(b.codes, [...Array(OWN).fill(250), 452], "the pool is shared: another session finds it taken");
    const r = await b.c.cmd(`RCPT TO:<${rcpt("b-again")}>`);
    assertEquals(r.lines, ["452 4.5.3 Too many recipients"]);
    // A gives its draw back at the end of data: every accepted recipient has its attempt line.
    assertEquals((await a.c.cmd("DATA")).code, 354);
    assertEquals((await a.c.cmd("Subject: t\r\n\r\nbody\r\n.")).code, 250);
    assertEquals((await b.c.cmd(`RCPT TO:<${rcpt("b-after")}>`)).code, 250, "A's draw is back in the pool");
    assertEquals((await a.c.cmd("QUIT")).code, 221);
    assertEquals((await b.c.cmd("QUIT")).code, 221);
    a.c.close();
    b.c.close();
    await l.waitFor("session", () => l.events("session").length >= 2);
    const lines = l.events("attempt").filter((e) => e.rcpt.startsWith("a-"));
    assertEquals(lines.length, OWN + POOLED, "one attempt line per accepted recipient, none for the 452s");
    assert(lines.every((e) => e.stage === "eod" && e.code === 250));
    const refused = l.events("attempt").filter((e) => e.code === 452);
    assertEquals(refused, [], "a 452 for room is not an attempt of the message");
  } finally {
    await l.stop();
  }
});

Deno.test("rcptpool: the pool is whole again however a transaction ends", async () => {
  const l = await startListener(ENV);
  const idle = await startListener({ ...ENV, SINKHOLE_IDLE_TIMEOUT: "1" });
  try {
    await assertWhole(l, "first", "nothing");
    await ending(l, "eod", async (c) => {
      assertEquals((await c.cmd("DATA")).code, 354);
      assertEquals((await c.cmd("Subject: t\r\n\r\nbody\r\n.")).code, 250);
      assertEquals((await c.cmd("QUIT")).code, 221);
    });
    // RSET, HELO and EHLO end it in a session that goes on: the same session holds the whole pool again.
    for (const verb of ["RSET", "HELO client.test", "EHLO client.test"]) {
      await ending(l, verb.split(" ")[0].toLowerCase(), async (c) => {
        assertEquals((await c.cmd(verb)).code, 250);
        const again = await fill(l.port, `again-${verb.length}`, OWN + POOLED + 1, c);
        assertEquals(again.codes, FULL, `${verb}: the same session's next transaction holds the pool again`);
        c.close();
      });
    }
    await ending(l, "quit", async (c) => assertEquals((await c.cmd("QUIT")).code, 221));
    await ending(l, "drop", async (c) => {
      await c.send(`RCPT TO:<drop+x@sinkhole.test>\r\n`);
      assert(await c.closedByServer(), "a per-recipient drop closes the session");
    });
    await ending(l, "gone", async () => {}); // the client closes its side
    await ending(l, "gone-in-data", async (c) => {
      assertEquals((await c.cmd("DATA")).code, 354);
      await c.send("Subject: half\r\n");
    });
    await ending(l, "errors", async (c) => {
      await c.send("BOGUS\r\n".repeat(MAX_ERRORS_PER_SESSION));
      for (let i = 0; i < MAX_ERRORS_PER_SESSION - 1; i++) assertEquals((await c.reply()).code, 500);
      assertEquals((await c.reply()).code, 500);
      assertEquals((await c.reply()).code, 421, "past the error limit: 421 and the close");
      assert(await c.closedByServer());
    });
    await ending(idle, "timeout", async (c) => {
      // SINKHOLE_IDLE_TIMEOUT=1: the listener says 421 4.4.2 once the client is idle that long.
      assertEquals((await c.reply()).code, 421);
      assert(await c.closedByServer());
    });
  } finally {
    await l.stop();
    await idle.stop();
  }
});
