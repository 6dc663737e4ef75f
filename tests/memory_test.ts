/**
 * The memory budget (docs/protocol.md, "Memory budget") driven for real, under the production
 * flags (`deno task start`: a 32 MB V8 old space, optimized for size): the greylist table
 * filled with the longest keys, then the session cap's worth of sessions each holding the
 * most a client can make one hold, with STARTTLS off and on (sessions upgradable by node:tls;
 * TLS-upgraded ones have a test of their own below), with the mode read from SSM (moto) by the
 * listener's own client, as in production. The process must not crash (the V8 limit) and must
 * keep answering. At the default cap (DEFAULT_MAX_SESSIONS) the whole peak RSS (VmHWM, the
 * executable's mapped code included) stays under 96 MiB either way; at the highest cap allowed
 * (MAX_SESSIONS_CAP) it stays under the task's 128 MB.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import {
  eventually,
  healthcheck,
  type Listener,
  memoryCgroup,
  memoryCgroupIn,
  memoryMiB,
  RawClient,
  readByServer,
  REPLY_WAIT_MS,
  startListener,
  transaction,
} from "../rig/helpers.ts";
import { MEMORY_HARD_CAP_MB } from "../terraform/sinkhole.ts";
import { awsTest, putMode, ssmEnv, type World } from "../rig/aws.ts";
import {
  configFromEnv,
  DEFAULT_MAX_SESSIONS,
  MAX_GREYLIST_ENTRIES,
  MAX_LOGGED_HEADER_BYTES,
  MAX_RECIPIENTS,
  MAX_SESSIONS_CAP,
  MAX_TLS_SESSIONS,
  MAX_TRANSCRIPT_BYTES,
  REPLIES,
  tlsMaterial,
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

/**
 * The task's memory, as ECS enforces it: a cgroup (v1 or v2) with the container's hard limit. Where
 * none can be made the OOM assertions cannot run: that fails the test, unless
 * SINKHOLE_MEMORY_NO_CGROUP=1 says to run without them (said in the output).
 */
function requiredCgroup(label: string) {
  const cgroup = memoryCgroup(ECS_MEMORY_MIB);
  if (cgroup) return cgroup;
  if (Deno.env.get("SINKHOLE_MEMORY_NO_CGROUP") !== "1") {
    throw new Error(
      `${label}: no memory cgroup can be made here (v1 or v2), so no OOM kill can be seen; ` +
        "SINKHOLE_MEMORY_NO_CGROUP=1 runs the test without the cgroup checks",
    );
  }
  console.log(`${label}: SINKHOLE_MEMORY_NO_CGROUP=1: the cgroup checks are skipped`);
  return undefined;
}

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
 * a transaction's accepted recipients full (MAX_KEPT_RCPT_BYTES, then all sessions' RCPT_POOL_BYTES); inside DATA with the
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
  // Every recipient it may: its own MAX_KEPT_RCPT_BYTES full, then the shared RCPT_POOL_BYTES (452 once both are).
  for (let j = 0; j < MAX_RECIPIENTS; j++) script += `RCPT TO:<${path(`k${id}-${j}`)}>\r\n`;
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
  const cgroup = requiredCgroup(label);
  const l = await w.listen(
    // The control port on (any free port): the fill's attempts fill what it keeps (MAX_CONTROL_LEDGER_BYTES).
    // Measured with STARTTLS off; when STARTTLS sessions were node:net's it took their whole peak to 95.6–96.6 MiB.
    {
      ...ssmEnv(w.moto.url, "0.2"),
      SINKHOLE_MAX_SESSIONS: String(sessions),
      ...(env.SINKHOLE_STARTTLS ? {} : { SINKHOLE_CONTROL_PORT: "0" }),
      ...env,
    },
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
    await readByServer(clients, l.port);
    // At the peak, the control port's largest answer (every attempt it keeps, as JSON) and a body refused unread.
    let served = "";
    if (!env.SINKHOLE_STARTTLS) {
      const control = `http://${l.events("start")[0].control}`;
      served = await (await fetch(`${control}/attempts`)).text();
      const refused = await fetch(`${control}/mode`, { method: "PUT", body: new Uint8Array(1024 * 1024) });
      assertEquals([refused.status, await refused.text() !== ""], [413, true]);
    }
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
        `of it anonymous at most ${anonPeak.toFixed(1)} MiB; GET /attempts answered ${served.length} octets`,
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
  "memory: the budget's worst case at the default session cap, STARTTLS on: whole peak under 96 MiB",
  (w) => worstCase(w, { SINKHOLE_STARTTLS: "on" }, "starttls transport", DEFAULT_MAX_SESSIONS, TARGET_MIB),
);
awsTest(
  "memory: at the highest session cap allowed (MAX_SESSIONS_CAP), both transports: no crash, under the task's cap",
  async (w) => {
    await worstCase(w, {}, "plain at the cap", MAX_SESSIONS_CAP, TASK_CAP_MIB);
    await worstCase(w, { SINKHOLE_STARTTLS: "on" }, "starttls at the cap", MAX_SESSIONS_CAP, TASK_CAP_MIB);
  },
);

/** TLS-upgraded sessions: a shape a client can hold a session in, over TLS, and what it sends to get there. */
type TlsShape = "pipelined" | "longline" | "message" | "folded" | "idle";
const TLS_SHAPES: TlsShape[] = ["pipelined", "longline", "message", "folded"];
const MiB = 1024 * 1024;
/** What each shape writes after the upgrade (shared buffers: the client's own memory stays small). */
const ENVELOPE = "EHLO tls.test\r\nMAIL FROM:<a@origin.test>\r\nRCPT TO:<b@sinkhole.test>\r\nDATA\r\n";
const BODY_LINE = "b".repeat(998) + "\r\n";
const TLS_SCRIPTS: Record<TlsShape, Uint8Array> = {
  idle: new Uint8Array(0),
  // A held reply (the mode's delay at end of data), then commands pipelined behind it, 1 MiB of them.
  pipelined: enc.encode(ENVELOPE + "Subject: x\r\n\r\nbody\r\n.\r\n" + "NOOP\r\n".repeat(MiB / 6)),
  // 1 MiB of a command line without LF (a thousand times MAX_TEXT_LINE).
  longline: enc.encode("EHLO tls.test\r\nNOOP " + "x".repeat(MiB)),
  // A 1 MiB message, its reply held.
  message: enc.encode(ENVELOPE + "Subject: big\r\n\r\n" + BODY_LINE.repeat(MiB / BODY_LINE.length) + ".\r\n"),
  // accept-log's header capture at its worst shape: one field folded over thousands of short lines, and more.
  folded: enc.encode(ENVELOPE + "Subject: folded\r\n" + " y\r\n".repeat(20_000) + "X-More: z\r\n".repeat(2_000)),
};

/** The kernel's queues of the loopback connection from `local` to `remote` (/proc/net/tcp): octets unsent, unread. */
function tcpQueues(local: number, remote: number): { tx: number; rx: number } | undefined {
  const hex = (n: number) => n.toString(16).toUpperCase().padStart(4, "0");
  for (const line of Deno.readTextFileSync("/proc/net/tcp").split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length > 4 && f[1].endsWith(`:${hex(local)}`) && f[2].endsWith(`:${hex(remote)}`)) {
      const [tx, rx] = f[4].split(":").map((h) => parseInt(h, 16));
      return { tx, rx };
    }
  }
  return undefined;
}

/**
 * One session at its worst shape: upgraded (or, past MAX_TLS_SESSIONS, told 454 and in plaintext),
 * then writing its script without reading; resolves once it is sent or the server stopped reading.
 */
async function tlsSession(
  port: number,
  caCert: string,
  shape: TlsShape,
): Promise<{ tls: boolean; shape: TlsShape; refusal?: string; close(): void }> {
  const tcp = await Deno.connect({ hostname: "127.0.0.1", port });
  const plain = new RawClient(tcp);
  await plain.reply();
  await plain.cmd("EHLO tls.test");
  const starttls = await plain.cmd("STARTTLS");
  assert([220, 454].includes(starttls.code), starttls.text);
  const conn: Deno.Conn = starttls.code === 220
    ? await Deno.startTls(tcp, { hostname: "localhost", caCerts: [caCert] })
    : tcp;
  let sent = false;
  const sending = (async () => {
    // One TLS record at a time: Deno's TLS client panics on some larger writes (rustls-tokio-stream 0.8).
    for (let bytes = TLS_SCRIPTS[shape]; bytes.length > 0;) {
      bytes = bytes.subarray(await conn.write(bytes.subarray(0, 16384)));
    }
    sent = true;
  })().catch(() => {});
  const clientPort = (tcp.localAddr as Deno.NetAddr).port;
  // Settled: everything was sent and read (a listener without backpressure reads it all), or the listener
  // stopped reading: what it has not read stays the same at three looks in a row while there is more to read.
  let stuck = 0;
  let lastRx = -1;
  await eventually(
    () => {
      const server = tcpQueues(port, clientPort);
      const client = tcpQueues(clientPort, port);
      if (!server || !client) return true; // closed by the server
      if (sent && server.rx === 0) return true;
      stuck = server.rx > 0 && server.rx === lastRx && (sent || client.tx > 0) ? stuck + 1 : 0;
      lastRx = server.rx;
      return stuck >= 3;
    },
    REPLY_WAIT_MS * 5,
    200,
  );
  return {
    tls: starttls.code === 220,
    shape,
    refusal: starttls.code === 454 ? starttls.text : undefined,
    close() {
      try {
        conn.close();
      } catch { /* closed */ }
      sending.catch(() => {});
    },
  };
}

/**
 * TLS-upgraded sessions at the session cap, each at its worst (issue 22.1, 22.3), after the
 * greylist table is filled as in the plain worst case: then `accept-log` with the end-of-data
 * reply held, a quarter of the sessions in each shape, every one asking for STARTTLS. At most
 * MAX_TLS_SESSIONS upgrade; the rest are told 454 and hold the same shape in plaintext. Whole
 * peak under `peakMiB`, and nothing killed in the task's cgroup.
 */
async function tlsWorstCase(label: string, sessions: number, peakMiB: number, shapes = TLS_SHAPES): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-memtls-" });
  const { cert, key } = await tlsMaterial(
    configFromEnv((k) => ({ SINKHOLE_SERVER_NAME: "localhost" } as Record<string, string>)[k]),
  );
  await Deno.writeTextFile(`${dir}/cert.pem`, cert);
  await Deno.writeTextFile(`${dir}/key.pem`, key);
  await Deno.writeTextFile(`${dir}/mode`, "greylist key=triplet\n");
  const cgroup = requiredCgroup(label);
  const l = await startListener({
    SINKHOLE_MODE_FILE: `${dir}/mode`,
    SINKHOLE_CACHE_TTL: "1",
    SINKHOLE_STARTTLS: "on",
    SINKHOLE_TLS_CERT: `${dir}/cert.pem`,
    SINKHOLE_TLS_KEY: `${dir}/key.pem`,
    SINKHOLE_SERVER_NAME: "localhost",
    SINKHOLE_MAX_SESSIONS: String(sessions),
    SINKHOLE_IDLE_TIMEOUT: "1200",
    SINKHOLE_SESSION_TIMEOUT: "1800",
  }, { cgroup });
  const clients: Awaited<ReturnType<typeof tlsSession>>[] = [];
  try {
    const atStart = memoryMiB(l.pid);
    await fillGreylist(l);
    const afterFill = memoryMiB(l.pid);
    await Deno.writeTextFile(`${dir}/mode`, "accept-log delay=10m\n");
    await l.waitFor("mode", (m) => m.mode === "accept-log delay=10m");
    for (let i = 0; i < sessions; i += 50) {
      const batch = Math.min(50, sessions - i);
      clients.push(
        ...await Promise.all(
          Array.from({ length: batch }, (_, j) => tlsSession(l.port, cert, shapes[(i + j) % shapes.length])),
        ),
      );
    }
    const worst = memoryMiB(l.pid);
    const upgraded = clients.filter((c) => c.tls).length;
    console.log(
      `${label}: greylist ${MAX_GREYLIST_ENTRIES} triplets, then ${clients.length} sessions (${shapes.join(", ")}), ` +
        `${upgraded} upgraded: RSS at start ${atStart.rss.toFixed(1)} MiB, after the fill ${
          afterFill.rss.toFixed(1)
        }, ` +
        `with the sessions ${worst.rss.toFixed(1)} (anonymous ${worst.anon.toFixed(1)}, mapped files ${
          worst.file.toFixed(1)
        }); VmHWM ${worst.peak.toFixed(1)} MiB`,
    );
    // At most MAX_TLS_SESSIONS upgraded at once: more in all only as TLS sessions ended and gave their
    // slots back (their session lines say so); every other one told why, precisely, and served in plaintext.
    // A session that was told `220 Ready to start TLS` (its second 220) held a slot until it ended.
    const slotHolders = () => l.events("session").filter((e) => e.replies.filter((c) => c === 220).length > 1);
    const endedTls = () => slotHolders().length;
    assert(upgraded >= MAX_TLS_SESSIONS && upgraded < sessions, `${label}: ${upgraded} sessions upgraded`);
    await eventually(() => upgraded - endedTls() <= MAX_TLS_SESSIONS);
    console.log(
      `${label}: ${upgraded} sessions upgraded, ${endedTls()} of them ended before the peak: ${
        JSON.stringify([...new Set(slotHolders().map((e) => `${e.tls ? "tls" : "no tls"}: ${e.error ?? "no error"}`))])
      }`,
    );
    for (const c of clients.filter((c) => !c.tls)) {
      assertEquals(c.refusal, REPLIES.tlsBusy.lines.join("\n"), `${label}: the reply past MAX_TLS_SESSIONS`);
    }
    for (let i = 0; i < 3; i++) {
      const check = await healthcheck(l, cgroup);
      assertEquals(check.code, 0, `${label}: health check at the peak: ${check.stderr}`);
    }
    if (cgroup) {
      console.log(
        `${label}: cgroup (${cgroup.version}) limited to ${ECS_MEMORY_MIB} MiB: peak charge ${
          cgroup.peakMiB().toFixed(1)
        } MiB, OOM kills ${cgroup.oomKills()}`,
      );
      assertEquals(cgroup.oomKills(), 0, `${label}: the kernel killed nothing for memory`);
    }
    // A TLS slot given back is taken again: an upgraded session closed (one still reading, so the
    // server sees its end), and a session freed for the next: its STARTTLS upgrades.
    const tlsClient = clients.find((c) => c.tls && c.shape === "longline")!;
    clients.splice(clients.indexOf(tlsClient), 1);
    tlsClient.close();
    const extraSlot = clients.find((c) => !c.tls);
    if (extraSlot) {
      clients.splice(clients.indexOf(extraSlot), 1);
      extraSlot.close();
      await eventually(async () => {
        const c = await tlsSession(l.port, cert, "idle").catch(() => undefined);
        c?.close();
        return c?.tls === true;
      });
    }
    assert(worst.peak <= peakMiB, `${label}: VmHWM ${worst.peak.toFixed(1)} MiB over ${peakMiB}`);
  } finally {
    for (const c of clients) c.close();
    const status = await l.stop();
    await cgroup?.remove();
    await Deno.remove(dir, { recursive: true });
    assertEquals(status.code, 0, `${label}: exit ${status.code}; ${l.stderr().slice(-2000)}`);
  }
}

Deno.test(
  "memory: TLS-upgraded sessions at the default cap after the greylist fill, each at its worst (pipelining behind a held reply, a 1 MiB line, 1 MiB messages, folded headers in accept-log): whole peak under 96 MiB, no OOM kill under the task's cap",
  () => tlsWorstCase("tls", DEFAULT_MAX_SESSIONS, TARGET_MIB),
);

Deno.test("memory cgroup: v1 and v2 files, against a fake cgroup directory (the kernel's own v2 runs on GitHub's runners only)", async () => {
  const root = await Deno.makeTempDir({ prefix: "sinkhole-fakecg-" });
  try {
    // v2: one hierarchy; this process in /runner.slice/job; memory.max written, memory.peak and memory.events read.
    Deno.mkdirSync(`${root}/runner.slice/job`, { recursive: true });
    const v2 = memoryCgroupIn("0::/runner.slice/job\n", root, 128)!;
    assertEquals(v2.version, "v2");
    assert(v2.dir.startsWith(`${root}/runner.slice/job/sinkhole-`), v2.dir);
    assertEquals(Deno.readTextFileSync(`${v2.dir}/memory.max`), String(128 * 1024 * 1024));
    assertEquals(
      Deno.readTextFileSync(`${root}/runner.slice/job/cgroup.subtree_control`),
      "+memory",
      "no memory.max in the new cgroup: the controller was enabled for the parent's children",
    );
    assertEquals(v2.peakMiB(), NaN, "no memory.peak (a kernel before 5.19): said, not zero");
    Deno.writeTextFileSync(`${v2.dir}/memory.peak`, String(60 * 1024 * 1024));
    Deno.writeTextFileSync(`${v2.dir}/memory.events`, "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n");
    assertEquals([v2.peakMiB(), v2.oomKills()], [60, 1]);
    assertEquals(v2.wrap(["deno", "run"]).slice(-2), ["deno", "run"]);
    await v2.remove();
    assert(![...Deno.readDirSync(`${root}/runner.slice/job`)].some((e) => e.name.startsWith("sinkhole-")), "removed");
    // v2 in a cgroup that holds processes (EBUSY on its subtree_control; here, a write that fails): below the root.
    Deno.mkdirSync(`${root}/busy.slice/job/cgroup.subtree_control`, { recursive: true });
    const below = memoryCgroupIn("0::/busy.slice/job\n", root, 128)!;
    assert(below.dir.startsWith(`${root}/sinkhole-`), below.dir);
    assertEquals(Deno.readTextFileSync(`${below.dir}/memory.max`), String(128 * 1024 * 1024));
    assert(![...Deno.readDirSync(`${root}/busy.slice/job`)].some((e) => e.name.startsWith("sinkhole-")), "tidied");
    await below.remove();
    // v1: the memory hierarchy at root/memory (a combined controller line too).
    Deno.mkdirSync(`${root}/memory/user/1`, { recursive: true });
    const v1 = memoryCgroupIn("12:pids:/x\n9:memory:/user/1\n0::/\n", root, 128)!;
    assertEquals(v1.version, "v1");
    assertEquals(Deno.readTextFileSync(`${v1.dir}/memory.limit_in_bytes`), String(128 * 1024 * 1024));
    Deno.writeTextFileSync(`${v1.dir}/memory.max_usage_in_bytes`, String(64 * 1024 * 1024));
    Deno.writeTextFileSync(`${v1.dir}/memory.oom_control`, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n");
    assertEquals([v1.peakMiB(), v1.oomKills()], [64, 3]);
    await v1.remove();
    assertEquals(memoryCgroupIn("1:name=systemd:/x\n", root, 128), undefined, "no memory controller: none");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
