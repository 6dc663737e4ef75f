/**
 * A soak run sized for CI (bounded count and time): concurrent sessions while the mode
 * flips through all five modes, with random disconnects. Afterwards the listener answers
 * normally, what stays live after a full garbage collection is back at its baseline (no
 * leak), and the logs agree with what clients saw.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import {
  eventually,
  inspector,
  type LogLine,
  memoryMiB,
  prng,
  RawClient,
  startListener,
  transaction,
} from "../rig/helpers.ts";
import { MODES } from "../listener.ts";

const SESSIONS = 3000;
const CONCURRENCY = 40;
const SEED = Number(Deno.env.get("SOAK_SEED") ?? "20261128");
const DISCONNECT_CHANCE = 0.12;
/**
 * What may stay live after the run beyond the warmed-up baseline, after a full garbage
 * collection: V8 heap objects and ArrayBuffer backing stores together (code compiled during
 * the run, caches). A leak of a 4 KiB read buffer a session (12 MiB over the run) is three
 * times this; a leak of a kilobyte a session (3 MiB) still fails.
 */
const LIVE_SLACK_MIB = 2;
/** Descriptors open after the run beyond the baseline (a mode file being read, say): none is a session's. */
const FD_SLACK = 2;

type Drop = "none" | "after-greeting" | "after-mail" | "after-rcpt" | "mid-data";

interface ClientView {
  /** Message-ID → the end-of-data code the client saw. */
  endOfData: Map<string, number>;
  sessions: number;
}

async function soakSession(port: number, id: number, rand: () => number, view: ClientView): Promise<void> {
  const drop: Drop = rand() < DISCONNECT_CHANCE
    ? (["after-greeting", "after-mail", "after-rcpt", "mid-data"] as const)[Math.floor(rand() * 4)]
    : "none";
  const c = await RawClient.connect(port);
  view.sessions++;
  try {
    await c.reply();
    if (drop === "after-greeting") return;
    await c.cmd(`EHLO soak${id}.test`);
    const transactions = 1 + Math.floor(rand() * 3);
    for (let tx = 0; tx < transactions; tx++) {
      if ((await c.cmd("MAIL FROM:<soak@origin.test>")).code !== 250) return;
      if (drop === "after-mail") return;
      let accepted = 0;
      const rcpts = 1 + Math.floor(rand() * 3);
      for (let r = 0; r < rcpts; r++) {
        const rep = await c.cmd(`RCPT TO:<r${r}@sinkhole.test>`);
        if (rep.code === 421) return; // defer closes the connection
        if (rep.code === 250) accepted++;
      }
      if (drop === "after-rcpt") return;
      const data = await c.cmd("DATA");
      if (data.code !== 354) {
        assertEquals(accepted, 0, "DATA refused only when no recipient was accepted");
        await c.cmd("RSET");
        continue;
      }
      const msgId = `<soak-${id}-${tx}@sinkhole.test>`;
      await c.send(`Message-ID: ${msgId}\r\nSubject: soak ${id}/${tx}\r\n\r\nbody line\r\n..stuffed\r\n`);
      if (drop === "mid-data") return;
      const end = await c.cmd(".");
      view.endOfData.set(msgId, end.code);
    }
    await c.cmd("QUIT");
  } catch {
    // The listener may close on us (421); the logs say what happened.
  } finally {
    c.close();
  }
}

Deno.test("soak: mixed modes, random disconnects; logs match what clients saw; memory returns near baseline", async () => {
  const modeFile = await Deno.makeTempFile({ prefix: "sinkhole-soak-" });
  await Deno.writeTextFile(modeFile, "accept-log");
  // The V8 inspector (on a port of its own choosing) measures what stays live after a full collection.
  const l = await startListener({
    SINKHOLE_MODE_FILE: modeFile,
    SINKHOLE_CACHE_TTL: "0.05",
    SINKHOLE_GREYLIST_WINDOW: "0.2",
  }, { denoFlags: ["--inspect=127.0.0.1:0"] });
  const v8 = await inspector(l.stderr);
  const live = async () => {
    const { used, buffers } = await v8.heap();
    return (used + buffers) / 1024 / 1024;
  };
  const fds = () => [...Deno.readDirSync(`/proc/${l.pid}/fd`)].length;
  try {
    for (let i = 0; i < 50; i++) await transaction(l.port); // warm up
    await new Promise((ok) => setTimeout(ok, 500));
    const baseline = memoryMiB(l.pid).rss;
    const liveBefore = await live();
    const fdsBefore = fds();

    const rand = prng(SEED);
    const view: ClientView = { endOfData: new Map(), sessions: 0 };
    let running = true;
    const flipper = (async () => {
      for (let i = 0; running && i < 10_000; i++) {
        await Deno.writeTextFile(modeFile, MODES[Math.floor(rand() * MODES.length)]);
        await new Promise((ok) => setTimeout(ok, 60));
      }
    })();
    let next = 0;
    const t0 = Date.now();
    let peak = 0;
    await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
      while (next < SESSIONS) {
        const id = next++;
        await soakSession(l.port, id, rand, view);
        if (id % 100 === 0) peak = Math.max(peak, memoryMiB(l.pid).rss);
      }
    }));
    running = false;
    await flipper;
    const elapsed = Date.now() - t0;

    // Every session has been logged once it ended.
    const sessions = () => l.events("session").filter((x) => String(x.helo ?? "").startsWith("soak"));
    await eventually(() => l.logs.filter((x) => x.event === "session").length >= 50 + SESSIONS, 120_000);
    assertEquals(l.logs.filter((x) => x.event === "session").length, 50 + SESSIONS, "one line per session");

    type Tx = { mode: string; rcpts: { code: number }[]; result?: number };
    const txs = sessions().flatMap((s) => s.transactions as Tx[]);
    for (const tx of txs) {
      if (tx.mode === "defer" || tx.mode === "bounce") {
        assert(tx.rcpts.every((r) => r.code !== 250), `no 250 to RCPT in ${tx.mode}: ${JSON.stringify(tx)}`);
        assertEquals(tx.result, undefined, `${tx.mode} never reaches end of data`);
      }
      if (tx.mode === "greylist") assert(tx.rcpts.every((r) => r.code === 250 || r.code === 451));
    }

    const clientAccepted = [...view.endOfData.entries()].filter(([, code]) => code === 250).map(([id]) => id);
    assertEquals(txs.filter((t) => t.result === 250).length, clientAccepted.length, "accepted messages agree");

    const messages = l.logs.filter((x): x is LogLine & { headers: string[] } => x.event === "message")
      .map((x) => x.headers.find((h) => h.startsWith("Message-ID: "))?.slice(12))
      .filter((id): id is string => id?.startsWith("<soak-") ?? false);
    assertEquals(new Set(messages).size, messages.length, "every accepted message logged at most once");
    const accepted = new Set(clientAccepted);
    assert(messages.every((id) => accepted.has(id)), "only messages the client saw accepted are logged");
    assertEquals(
      messages.length,
      txs.filter((t) => t.mode === "accept-log" && t.result === 250).length,
      "every message accepted in accept-log is logged exactly once",
    );
    assert(!l.logs.some((x) => x.event === "error"), "no error was logged");

    await Deno.writeTextFile(modeFile, "accept");
    await eventually(async () => (await transaction(l.port)).at(-2) === 250);
    await new Promise((ok) => setTimeout(ok, 1000));
    const after = memoryMiB(l.pid).rss;
    const liveAfter = await live();
    const fdsAfter = fds();
    console.log(
      `soak: ${SESSIONS} sessions (${view.endOfData.size} messages reached end of data, ${messages.length} logged) ` +
        `in ${elapsed} ms; RSS baseline ${baseline.toFixed(1)} MiB, peak sampled ${peak.toFixed(1)} MiB, ` +
        `after ${after.toFixed(1)} MiB; live after GC ${liveBefore.toFixed(2)} -> ${liveAfter.toFixed(2)} MiB; ` +
        `descriptors ${fdsBefore} -> ${fdsAfter}; seed ${SEED}`,
    );
    assert(
      liveAfter <= liveBefore + LIVE_SLACK_MIB,
      `live after a full GC: ${liveAfter.toFixed(2)} MiB after the run, ${liveBefore.toFixed(2)} MiB before`,
    );
    assert(fdsAfter <= fdsBefore + FD_SLACK, `${fdsAfter} descriptors open after the run, ${fdsBefore} before`);
  } finally {
    v8.close();
    const status = await l.stop();
    assertEquals(status.code, 0);
    await Deno.remove(modeFile);
  }
});
