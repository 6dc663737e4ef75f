/**
 * The memory budget (docs/protocol.md, "Memory budget") driven for real, under the production
 * flags (`deno task start`: a 32 MB V8 old space, optimized for size): the greylist table
 * filled with the longest keys, then the session cap's worth of sessions each holding the
 * most a client can make one hold, on both transports (Deno's, and node:net when
 * SINKHOLE_STARTTLS=on), with the mode read from SSM (moto) by the listener's own client, as
 * in production. The process must not crash (the V8 limit) and must keep answering. At the
 * default cap (DEFAULT_MAX_SESSIONS) the whole peak RSS (VmHWM, the executable's mapped code
 * included) stays under 96 MiB on both transports; at the highest cap allowed
 * (MAX_SESSIONS_CAP) it stays under the task's 128 MB.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  eventually,
  healthcheck,
  type Listener,
  memoryCgroup,
  memoryMiB,
  RawClient,
  readByServer,
  transaction,
} from "./helpers.ts";
import { MEMORY_HARD_CAP_MB } from "../terraform/sinkhole.ts";
import { awsTest, putMode, ssmEnv, type World } from "./aws.ts";
import {
  DEFAULT_MAX_SESSIONS,
  MAX_GREYLIST_ENTRIES,
  MAX_KEPT_RCPT_BYTES,
  MAX_LOGGED_HEADER_BYTES,
  MAX_RECIPIENTS,
  MAX_SESSIONS_CAP,
  MAX_TRANSCRIPT_BYTES,
} from "../listener.ts";

/** The ECS task's hard cap, 128 MB (122 MiB): the peak RSS, mapped code included, stays under it. */
const TASK_CAP_MIB = 122;
/** The budget's target for the whole peak RSS (VmHWM, mapped code included) at the default session cap. */
const TARGET_MIB = 96;
/** The container's `memory` (ECS counts MiB): the cgroup limit the kernel enforces. */
const ECS_MEMORY_MIB = MEMORY_HARD_CAP_MB;
/**
 * The budget's target, 96 MiB, for what the cap cannot take back: anonymous memory (the
 * V8 heap, buffers, stacks). The executable's code pages (about 40 MiB of Deno's binary
 * that the process has touched) are page cache the kernel drops and reads again under
 * the cap; docs/protocol.md, "Memory budget", gives both figures.
 */
const ANON_TARGET_MIB = 96;
const enc = new TextEncoder();

/** The longest valid paths (RFC 5321 §4.5.3.1): a 64-octet local part, 254 octets in all. */
const DOMAIN = `${"d".repeat(60)}.${"e".repeat(61)}.${"f".repeat(61)}.test`;
const path = (tag: string) => `${tag.padEnd(64, "x").slice(0, 64)}@${DOMAIN}`;

/** Sends `script` while reading every reply (until `replies` are read); returns the codes seen. */
async function converse(c: RawClient, script: string, replies: number): Promise<Map<number, number>> {
  const sending = c.send(script);
  const codes = new Map<number, number>();
  for (let i = 0; i < replies; i++) {
    const code = (await c.reply()).code;
    codes.set(code, (codes.get(code) ?? 0) + 1);
  }
  await sending;
  return codes;
}

/** Phase 1: MAX_GREYLIST_ENTRIES distinct triplets of the longest addresses, over a few sessions. */
async function fillGreylist(l: Listener): Promise<void> {
  const sessions = 10;
  const perSession = MAX_GREYLIST_ENTRIES / sessions;
  await Promise.all(Array.from({ length: sessions }, async (_, s) => {
    const c = await RawClient.connect(l.port);
    await c.reply();
    await c.cmd("EHLO filler.test");
    for (let done = 0; done < perSession; done += MAX_RECIPIENTS) {
      let script = `MAIL FROM:<${path(`from${s}-${done}`)}>\r\n`;
      for (let j = 0; j < MAX_RECIPIENTS; j++) script += `RCPT TO:<${path(`to${s}-${done}-${j}`)}>\r\n`;
      script += "RSET\r\n";
      const codes = await converse(c, script, MAX_RECIPIENTS + 2);
      assertEquals(codes.get(451), MAX_RECIPIENTS, "each triplet is a first attempt");
    }
    await c.cmd("QUIT");
    c.close();
  }));
}

/**
 * Phase 2: one session at its worst — the longest HELO; its transcript full (MAX_TRANSCRIPT_BYTES);
 * a transaction's accepted recipients full (MAX_KEPT_RCPT_BYTES); inside DATA with the
 * header capture full of the shortest lines (MAX_LOGGED_HEADER_BYTES, the most strings);
 * and half a line pending. The client never reads: its replies stay with the server.
 */
async function worstSession(port: number, id: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  let script = `EHLO ${"h".repeat(500)}\r\n`;
  const transcriptRcpts = Math.ceil(MAX_TRANSCRIPT_BYTES / 250) + 2;
  script += `MAIL FROM:<${path(`w${id}`)}>\r\n`;
  for (let j = 0; j < transcriptRcpts; j++) script += `RCPT TO:<${path(`t${id}-${j}`)}>\r\n`;
  script += "RSET\r\n";
  script += `MAIL FROM:<${path(`w${id}`)}>\r\n`;
  for (let j = 0; j < Math.ceil(MAX_KEPT_RCPT_BYTES / 250) + 2; j++) script += `RCPT TO:<${path(`k${id}-${j}`)}>\r\n`;
  script += "DATA\r\n";
  const shortest = "a:b\r\n"; // a header of 3 octets: the most strings per byte
  script += shortest.repeat(Math.ceil(MAX_LOGGED_HEADER_BYTES / 3) + 10);
  script += "X-Pending: " + "p".repeat(900); // half a line, kept in the line buffer
  await c.send(enc.encode(script));
  return c;
}

/**
 * Runs the worst case with `sessions` open at their worst (the session cap); the whole peak RSS
 * (VmHWM) must stay under `peakMiB`.
 */
async function worstCase(
  w: World,
  env: Record<string, string>,
  label: string,
  sessions: number,
  peakMiB: number,
): Promise<void> {
  await putMode(w.moto.url, "greylist key=triplet");
  // The task's memory, as ECS enforces it: a cgroup with the container's hard limit, holding
  // the listener and, later, the health checks ECS runs beside it.
  const cgroup = memoryCgroup(ECS_MEMORY_MIB);
  if (!cgroup) console.log(`${label}: no memory cgroup can be made here; the cgroup checks are skipped`);
  const l = await w.listen(
    { ...ssmEnv(w.moto.url, "0.2"), SINKHOLE_MAX_SESSIONS: String(sessions), ...env },
    { cgroup },
  );
  const clients: RawClient[] = [];
  try {
    const t0 = Date.now();
    // Mapped code only grows while nothing presses the machine for memory, so the peak's
    // anonymous part is at most VmHWM less what was mapped at the start.
    const atStart = memoryMiB(l.pid);
    await fillGreylist(l);
    const afterFill = memoryMiB(l.pid);
    await putMode(w.moto.url, "accept-log");
    await l.waitFor("mode", (m) => m.mode === "accept-log");
    for (let i = 0; i < sessions; i += 100) {
      clients.push(...await Promise.all(Array.from({ length: 100 }, (_, j) => worstSession(l.port, i + j))));
    }
    // Every session is at its worst once the listener has read everything its client sent
    // (for node:net, once the kernel buffer is drained into the transport's bounded queue).
    await readByServer(clients, l.port);
    const worst = memoryMiB(l.pid);
    const anonPeak = worst.peak - atStart.file;
    console.log(
      `${label}: greylist ${MAX_GREYLIST_ENTRIES} triplets, then ${clients.length} sessions at their worst ` +
        `(${Date.now() - t0} ms): RSS at start ${atStart.rss.toFixed(1)} MiB (mapped files ${
          atStart.file.toFixed(1)
        }), ` +
        `after the fill ${afterFill.rss.toFixed(1)}, with the sessions ${worst.rss.toFixed(1)} ` +
        `(anonymous ${worst.anon.toFixed(1)}, mapped files ${worst.file.toFixed(1)}); VmHWM ${
          worst.peak.toFixed(1)
        } MiB, ` +
        `of it anonymous at most ${anonPeak.toFixed(1)} MiB`,
    );
    // ECS's health check at the peak: a second Deno runtime in the same cgroup, three times.
    for (let i = 0; i < 3; i++) {
      const check = await healthcheck(l, cgroup);
      assertEquals(check.code, 0, `${label}: health check at the peak: ${check.stderr}`);
    }
    if (cgroup) {
      console.log(
        `${label}: in a cgroup limited to ${ECS_MEMORY_MIB} MiB (the task's hard cap), listener and health checks: ` +
          `peak charge ${cgroup.peakMiB().toFixed(1)} MiB (page cache included, reclaimed under the limit), ` +
          `OOM kills ${cgroup.oomKills()}`,
      );
      assertEquals(cgroup.oomKills(), 0, `${label}: the kernel killed nothing for memory`);
    }
    // Still answering: the cap refuses the next session politely; one freed slot serves again.
    const extra = await RawClient.connect(l.port);
    assertEquals((await extra.reply()).code, 421);
    extra.close();
    clients.pop()!.close();
    await eventually(async () => (await transaction(l.port).catch(() => [])).at(-1) === 221);
    // The whole peak, mapped code included, as /proc says it; and its anonymous part.
    assert(worst.peak <= peakMiB, `${label}: VmHWM ${worst.peak.toFixed(1)} MiB over ${peakMiB}`);
    assert(anonPeak <= ANON_TARGET_MIB, `${label}: anonymous RSS ${anonPeak.toFixed(1)} MiB over ${ANON_TARGET_MIB}`);
  } finally {
    for (const c of clients) c.close();
    const status = await l.stop();
    await cgroup?.remove();
    assertEquals(status.code, 0, `${label}: exit ${status.code}; ${l.stderr().slice(-2000)}`);
  }
}

awsTest(
  "memory: the budget's worst case at the default session cap, Deno's transport: no crash, whole peak under 96 MiB",
  (w) => worstCase(w, {}, "plain", DEFAULT_MAX_SESSIONS, TARGET_MIB),
);
awsTest(
  "memory: the budget's worst case at the default session cap, node:net (STARTTLS on): whole peak under 96 MiB",
  (w) => worstCase(w, { SINKHOLE_STARTTLS: "on" }, "starttls transport", DEFAULT_MAX_SESSIONS, TARGET_MIB),
);
awsTest(
  "memory: at the highest session cap allowed (MAX_SESSIONS_CAP), both transports: no crash, under the task's cap",
  async (w) => {
    await worstCase(w, {}, "plain at the cap", MAX_SESSIONS_CAP, TASK_CAP_MIB);
    await worstCase(w, { SINKHOLE_STARTTLS: "on" }, "starttls at the cap", MAX_SESSIONS_CAP, TASK_CAP_MIB);
  },
);
