/**
 * A generated bad-input corpus, all at once, against one running listener: no crash, no
 * hang, bounded memory, and healthy sessions keep succeeding while the corpus runs.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import { eventually, memoryMiB, prng, RawClient, startListener, transaction } from "../rig/helpers.ts";

/** The memory target at load (the ECS task's hard cap is 128 MB). */
const PEAK_RSS_LIMIT_MIB = 96;
const ACCEPTED = [220, 250, 250, 250, 354, 250, 221];
/** Healthy sessions run one after another while the corpus holds its sockets open. */
const HEALTHY_SESSIONS = 20;
/** Slowloris: one byte every 50 ms until the healthy sessions are done, at most this many. */
const SLOWLORIS_MAX_BYTES = 2000;
const sleep = (ms: number) => new Promise((ok) => setTimeout(ok, ms));

/**
 * Sends bytes, ends its side, and reads whatever comes back until the server closes: the
 * server ends a session at the client's EOF or at the error limit, so no timeout of the
 * listener's is involved.
 */
async function blast(port: number, chunks: Uint8Array[]): Promise<void> {
  const c = await RawClient.connect(port);
  const drain = c.closedByServer();
  try {
    for (const chunk of chunks) await c.send(chunk);
    await c.conn.closeWrite();
  } catch { /* closed by the server: expected for garbage */ }
  await drain;
  c.close();
}

const enc = new TextEncoder();

/** The corpus; the slow and silent sockets stay open until `release` resolves. */
function corpus(port: number, release: Promise<void>): Promise<unknown>[] {
  const rand = prng(7);
  let released = false;
  release.then(() => released = true);
  const bytes = (n: number, f: (i: number) => number) => Uint8Array.from({ length: n }, (_, i) => f(i));
  const jobs: Promise<unknown>[] = [];
  // Over-long command lines, 100 KB each.
  for (let i = 0; i < 20; i++) {
    jobs.push(blast(port, Array.from({ length: 10 }, () => enc.encode("NOOP " + "x".repeat(100_000) + "\r\n"))));
  }
  // Binary noise.
  for (let i = 0; i < 20; i++) jobs.push(blast(port, [bytes(256 * 1024, () => Math.floor(rand() * 256))]));
  // NULs between line ends.
  for (let i = 0; i < 10; i++) jobs.push(blast(port, [bytes(64 * 1024, (j) => (j % 50 === 49 ? 10 : 0))]));
  // Huge header sections in accept-log (2 MB of 900-octet header lines).
  for (let i = 0; i < 10; i++) {
    const header = Array.from({ length: 2300 }, (_, j) => `X-Huge-${j}: ${"h".repeat(880)}`).join("\r\n");
    jobs.push(
      transaction(port, { body: `Subject: huge\r\n${header}\r\n\r\nbody` }).then((codes) => {
        assertEquals(codes, ACCEPTED, "a huge header section is accepted");
      }),
    );
  }
  // Slowloris: one byte every 50 ms, until released.
  for (let i = 0; i < 20; i++) {
    jobs.push((async () => {
      const c = await RawClient.connect(port);
      const script = enc.encode("EHLO slow.test\r\n" + "NOOP\r\n".repeat(SLOWLORIS_MAX_BYTES / 6));
      try {
        for (const b of script.slice(0, SLOWLORIS_MAX_BYTES)) {
          if (released) break;
          await c.send(Uint8Array.of(b));
          await sleep(50);
        }
      } catch { /* closed by the server */ }
      c.close();
    })());
  }
  // 10,000 recipients in one pipelined burst.
  for (let i = 0; i < 3; i++) {
    jobs.push((async () => {
      const c = await RawClient.connect(port);
      await c.reply();
      await c.cmd("EHLO many.test");
      await c.cmd("MAIL FROM:<a@origin.test>");
      const n = 10_000;
      const sending = c.send(Array.from({ length: n }, (_, j) => `RCPT TO:<r${j}@sinkhole.test>\r\n`).join(""));
      const codes = new Map<number, number>();
      for (let j = 0; j < n; j++) {
        const code = (await c.reply()).code;
        codes.set(code, (codes.get(code) ?? 0) + 1);
      }
      await sending;
      assertEquals(codes.get(250), 100);
      assertEquals(codes.get(452), n - 100);
      c.close();
    })());
  }
  // Half-open sockets that never read, and silent ones, held until released.
  for (let i = 0; i < 50; i++) {
    jobs.push((async () => {
      const c = await Deno.connect({ hostname: "127.0.0.1", port });
      await c.write(enc.encode("EHLO half.test\r\nMAIL FROM:<a@origin.test>\r\n"));
      await c.closeWrite();
      await release;
      c.close();
    })());
  }
  for (let i = 0; i < 100; i++) {
    jobs.push((async () => {
      const c = await Deno.connect({ hostname: "127.0.0.1", port });
      await release;
      c.close();
    })());
  }
  return jobs;
}

Deno.test("corpus: the whole bad-input corpus at once; healthy sessions succeed, memory stays bounded", async () => {
  // The listener's own timeouts are left at their defaults: every bad session here ends by
  // the client's EOF, the error limit or the client closing, so none of them can be
  // confused with a slow machine, and no healthy session can meet a timeout.
  const l = await startListener({ SINKHOLE_MODE: "accept-log" });
  try {
    let peak = memoryMiB(l.pid).rss;
    const release = Promise.withResolvers<void>();
    const jobs = Promise.all(corpus(l.port, release.promise));
    jobs.catch(() => release.resolve());
    const healthy: number[][] = [];
    const t0 = Date.now();
    for (let i = 0; i < HEALTHY_SESSIONS; i++) {
      healthy.push(await transaction(l.port));
      peak = Math.max(peak, memoryMiB(l.pid).rss);
    }
    release.resolve();
    await jobs;
    assert(healthy.every((codes) => JSON.stringify(codes) === JSON.stringify(ACCEPTED)), JSON.stringify(healthy));
    const huge = () => l.logs.filter((x) => x.event === "message" && x.truncated === true);
    await eventually(() => huge().length >= 10);
    const mem = memoryMiB(l.pid);
    console.log(
      `corpus: ${healthy.length} healthy sessions during ${Date.now() - t0} ms; ` +
        `RSS sampled peak ${peak.toFixed(1)} MiB, VmHWM ${mem.peak.toFixed(1)} MiB`,
    );
    assert(mem.peak <= PEAK_RSS_LIMIT_MIB, `peak RSS ${mem.peak.toFixed(1)} MiB over ${PEAK_RSS_LIMIT_MIB}`);
    assertEquals(huge().length, 10, "huge header sections are logged truncated");
    assert(!l.logs.some((x) => x.event === "error"), "no error was logged");
    assertEquals(await transaction(l.port), ACCEPTED);
  } finally {
    const status = await l.stop();
    assertEquals(status.code, 0, l.stderr());
  }
});
