/**
 * The shared recipient pool over TCP (RCPT_POOL_BYTES; made small here with
 * SINKHOLE_RCPT_POOL_BYTES, the constant untouched): a transaction keeps its accepted
 * recipients in its own MAX_KEPT_RCPT_BYTES, then draws on the pool every session shares;
 * an accepted recipient neither holds is 452 4.5.3 and never accepted unlogged; the pool is
 * whole again however a transaction ends.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import { assertTools, IN_CI, type Listener, needs, RawClient, startListener } from "../rig/helpers.ts";
import { mtaBinary, withMtaRig } from "../rig/mtas.ts";
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
    const delivered = lines.filter((e) => e.stage === "eod" && e.code === 250);
    assertEquals(delivered.length, OWN + POOLED, "one attempt line per accepted recipient");
    // A 452 for room ends that attempt of its message, deferred, like any refusal at RCPT: one line each.
    const refused = l.events("attempt").filter((e) => e.code === 452 && e.stage === "rcpt").map((e) => e.rcpt);
    assertEquals(
      refused.sort(),
      [
        rcpt(`a-${OWN + POOLED}`),
        rcpt(`a-${OWN + POOLED + 1}`),
        rcpt(`b-${OWN}`),
        rcpt("b-again"),
      ].sort(),
    );
    assertEquals(lines.length, OWN + POOLED + 2);
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

const mtaTools = needs("unshare", "nsenter", "ldconfig");
let postfixMissing = false;
try {
  postfixMissing = !Deno.statSync(mtaBinary("postfix")).isFile;
} catch {
  postfixMissing = true;
}

Deno.test({
  name: "rcptpool: Postfix told 452 4.5.3 for the recipients the pool cannot hold delivers them in a later transaction",
  ignore: !IN_CI && (mtaTools.ignore || Deno.uid() !== 0 || postfixMissing),
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    assertTools(mtaTools.missing);
    // The rig routes sinkhole.test itself (no subdomains): 78-octet addresses. One message to more recipients than
    // a transaction's own bytes and the pool hold: the first transaction takes OWN + POOLED, the rest get 452.
    const box = (i: number) => `${`p${i}`.padEnd(64, "x")}@sinkhole.test`;
    const cost = box(0).length + KEPT_ENTRY_COST;
    const own = Math.floor(MAX_KEPT_RCPT_BYTES / cost);
    const to = Array.from({ length: own + POOLED + 5 }, (_, i) => box(i));
    await withMtaRig("postfix", async (rig) => {
      const sunk = () => rig.sink.events("attempt").filter((a) => a.code === 250 && a.stage === "eod");
      assertEquals((await rig.mta.submit(to, { messageId: "<pool@origin.test>" }))[0], 220);
      await rig.mta.retryUntil(() => sunk().length >= to.length);
      const delivered = sunk();
      assertEquals(delivered.map((a) => a.rcpt).sort(), [...to].sort(), "every recipient delivered once");
      const refused = rig.sink.events("attempt").filter((a) => a.code === 452).map((a) => a.rcpt);
      assertEquals(refused.length, 5, "the pool held OWN + POOLED of the first transaction; 5 were told 452");
      const transactions = rig.sink.events("session").flatMap((s) => s.transactions).filter((t) => t.result === 250);
      assert(transactions.length >= 2, "in more than one transaction");
      // Postfix's own account, attempt by attempt: the 452 is `status=deferred`, then `sent`; the ledger's the same.
      for (const r of to) {
        const ledger = rig.sink.events("attempt").filter((a) => a.rcpt === r);
        const ours = ledger.map((a) => a.code === 250 ? "sent" : "deferred");
        assertEquals(rig.mta.attempts(r).map((a) => a.outcome), ours, r);
        assertEquals(ledger.map((a) => a.attempt), ours.map((_, i) => i + 1), `${r}: numbered in order`);
      }
    }, { sinkEnv: { SINKHOLE_RCPT_POOL_BYTES: String(POOLED * cost) } });
  },
});
