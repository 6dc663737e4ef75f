/**
 * `deno task bench`: sinkhole side by side with Postfix's smtp-sink, in one run.
 *
 * Throughput (smtp-source against smtp-sink, the Deno floor (alone, on node:net, and with the
 * ledger's line a message), sinkhole in accept and accept-log,
 * nodemailer's smtp-server as a sink and maildev, in turn; both workloads), memory (idle,
 * open sessions at the cap, during throughput; with and without the V8 flags), SSM call
 * rate and the latency a slow SSM adds, mode-switch latency, and start-up time.
 * Prints a table and writes bench/results.md. Everything runs on loopback.
 *
 * Environment: BENCH_REPS (default 5), BENCH_MESSAGES (default 50000), BENCH_SLOW_MESSAGES
 * (maildev's, default 5000); smaller ones for a quick look (ratios then weigh start-up more).
 */
import { memoryMiB, privateAddress, RawClient, ROOT, run, startCommand, transaction } from "../rig/helpers.ts";
import { faultProxy, putMode, ssmEnv, startMoto } from "../rig/aws.ts";
import { MAX_SESSIONS_CAP } from "../listener.ts";

const REPS = Number(Deno.env.get("BENCH_REPS") ?? "5");
const MESSAGES = Number(Deno.env.get("BENCH_MESSAGES") ?? "50000");
const SESSIONS = 20;
/**
 * Messages a run for the slow peers (seconds a run all the same): maildev (it keeps every message
 * in memory), and smtp-server one message a connection (it waits 100 ms before each greeting to
 * catch early talkers, smtp-connection.js `init`: at 20 sessions at most 200 connections a second).
 */
const SLOW_MESSAGES = Number(Deno.env.get("BENCH_SLOW_MESSAGES") ?? String(Math.min(MESSAGES, 5000)));
/** The two workloads: one message per connection, many per connection (smtp-source -d). */
const SHAPES = [
  { label: "one message per connection", args: ["-s", String(SESSIONS)] },
  { label: "many messages per connection", args: ["-d", "-s", String(SESSIONS)] },
];
const SMTP_SERVER_VERSION = versionOf("smtp-server");
const MAILDEV_VERSION = versionOf("maildev");
/** Sessions held open at once: the most SINKHOLE_MAX_SESSIONS allows. */
const OPEN_SESSIONS = MAX_SESSIONS_CAP;
/** Where scripts/mtas.sh unpacks the MTAs (its default, or SINKHOLE_MTAS_DIR as the tests set it). */
const MTAS = Deno.env.get("SINKHOLE_MTAS_DIR") ?? `${ROOT}/.mtas`;
const POSTFIX = `${MTAS}/postfix`;
const SLOW_SSM_MS = 3000;
const SWITCH_TTL_S = 5;

/** A peer's version as deno.json pins it (`npm:NAME@VERSION`). */
function versionOf(name: string): string {
  const imports = JSON.parse(Deno.readTextFileSync(`${ROOT}/deno.json`)).imports as Record<string, string>;
  return imports[name]?.split("@").pop() ?? "?";
}

const sleep = (ms: number) => new Promise((ok) => setTimeout(ok, ms));
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
/** Ratios of `xs` to `ys` pair by pair (the same repetition): their median, least and most. */
interface Spread {
  median: number;
  min: number;
  max: number;
}
export function spread(xs: number[], ys: number[]): Spread {
  const rs = xs.map((x, i) => x / ys[i]);
  return { median: median(rs), min: Math.min(...rs), max: Math.max(...rs) };
}
/** A server's throughput: its ratio to smtp-sink in each workload, paired spreads, its messages a run if fewer. */
interface Throughput {
  name: string;
  ratios: number[];
  /** The ledger floor's and the listener's to the Deno floor, repetition by repetition. */
  toFloor?: Spread[];
  /** The listener's to the ledger floor (bench/floor_ledger.ts), repetition by repetition. */
  toLedger?: Spread[];
  messages?: number[];
}
const LEDGER_FLOOR = "Deno floor + the ledger's line (bench/floor_ledger.ts)";
const spreadText = (s: Spread) => `${s.median.toFixed(2)} (${s.min.toFixed(2)}–${s.max.toFixed(2)})`;
const fmt = (n: number, digits = 0) => n.toLocaleString("en-US", { maximumFractionDigits: digits });

/** smtp-source and smtp-sink from Debian's postfix package, unpacked by scripts/mtas.sh into .mtas/postfix, not installed. */
async function postfixTools(): Promise<{ source: string; sink: string; env: Record<string, string>; version: string }> {
  const source = `${POSTFIX}/usr/sbin/smtp-source`;
  try {
    Deno.statSync(`${POSTFIX}/.stamp`);
  } catch {
    const res = await run("bash", [`${ROOT}/scripts/mtas.sh`], { env: { SINKHOLE_MTAS_DIR: MTAS } });
    if (res.code !== 0) throw new Error(`scripts/mtas.sh failed: ${res.stderr}`);
  }
  const stamp = (await Deno.readTextFile(`${POSTFIX}/.stamp`)).trim();
  return {
    source,
    sink: `${POSTFIX}/usr/sbin/smtp-sink`,
    env: { LD_LIBRARY_PATH: `${POSTFIX}/usr/lib/postfix` },
    version: stamp,
  };
}

/** Where a server listens: a loopback address of this run's own (rig/helpers.ts `privateAddress`). */
interface Addr {
  host: string;
  port: number;
}

interface Proc extends Addr {
  pid: number;
  child: Deno.ChildProcess;
  logFile: string;
  stop(): Promise<void>;
}

/** Waits for the 220 greeting; returns ms since `t0`. */
async function firstGreeting(at: Addr, t0: number, limitMs = 30_000): Promise<number> {
  while (performance.now() - t0 < limitMs) {
    try {
      const c = await RawClient.connect(at.port, at.host);
      const r = await c.reply(2000);
      c.close();
      if (r.code === 220) return performance.now() - t0;
    } catch { /* not yet */ }
    await sleep(5);
  }
  throw new Error(`no greeting on ${at.host}:${at.port} in ${limitMs} ms`);
}

/** `cmd` with its stdout and stderr to `logFile` (through sh: a file, as awslogs would take it, not a pipe). */
function loggedCommand(logFile: string, cmd: string[], opts: { cwd?: string; env?: Record<string, string> } = {}) {
  return new Deno.Command("sh", { args: ["-c", 'exec "$@" > "$0" 2>&1', logFile, ...cmd], ...opts, stdin: "null" });
}

/** The listener exactly as `deno task start` runs it, stdout to a file (as awslogs would take it). */
async function sinkhole(
  env: Record<string, string>,
  opts: { v8Defaults?: boolean } = {},
): Promise<Proc & { startMs: number }> {
  const at = privateAddress();
  const logFile = await Deno.makeTempFile({ prefix: "sinkhole-bench-", suffix: ".log" });
  let cmd = startCommand();
  if (opts.v8Defaults) cmd = cmd.filter((a) => !a.startsWith("--v8-flags="));
  const t0 = performance.now();
  const child = loggedCommand(logFile, cmd, {
    cwd: ROOT,
    env: {
      SINKHOLE_BIND_HOST: at.host,
      SINKHOLE_BIND_PORT: String(at.port),
      SINKHOLE_HEALTH_HOST: at.host,
      SINKHOLE_HEALTH_PORT: "0",
      NO_COLOR: "1",
      ...env,
    },
  }).spawn();
  const startMs = await firstGreeting(at, t0);
  return {
    pid: child.pid,
    ...at,
    child,
    logFile,
    startMs,
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
      await Deno.remove(logFile).catch(() => {});
    },
  };
}

/**
 * A reference server on an address of its own, its output discarded (`logged`: its stdout to a
 * file, as the listener's); ready once it greets.
 */
async function reference(
  cmd: string,
  args: (at: Addr) => string[],
  env?: Record<string, string>,
  logged = false,
): Promise<Proc> {
  const at = privateAddress();
  const logFile = logged ? await Deno.makeTempFile({ prefix: "sinkhole-bench-ref-", suffix: ".log" }) : "";
  const child = logged
    ? loggedCommand(logFile, [cmd, ...args(at)], { env }).spawn()
    : new Deno.Command(cmd, { args: args(at), env, stdout: "null", stderr: "null" }).spawn();
  await firstGreeting(at, performance.now());
  return {
    pid: child.pid,
    ...at,
    child,
    logFile,
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
      if (logFile) await Deno.remove(logFile).catch(() => {});
    },
  };
}

/** Postfix's smtp-sink, the reference. */
function smtpSink(tools: Awaited<ReturnType<typeof postfixTools>>): Promise<Proc> {
  const asRoot = Deno.uid() === 0 ? ["-u", "nobody"] : [];
  return reference(tools.sink, (at) => [...asRoot, `${at.host}:${at.port}`, "1000"], tools.env);
}

/** bench/floor.ts: the least SMTP responder on Deno's own I/O, for scale. */
function denoFloor(): Promise<Proc> {
  return reference(
    Deno.execPath(),
    (
      at,
    ) => [
      "run",
      "--v8-flags=--max-semi-space-size=1",
      "--allow-net",
      `${ROOT}/bench/floor.ts`,
      at.host,
      String(at.port),
    ],
  );
}

/** bench/floor_ledger.ts: the floor and the ledger's attempt line a message, stdout to a file as the listener's. */
function denoLedgerFloor(): Promise<Proc> {
  return reference(
    Deno.execPath(),
    (at) => [
      "run",
      "--v8-flags=--max-semi-space-size=1",
      "--allow-net",
      `${ROOT}/bench/floor_ledger.ts`,
      at.host,
      String(at.port),
    ],
    undefined,
    true,
  );
}

/** bench/floor_node.ts: the same floor on node:net. */
function denoFloorNode(): Promise<Proc> {
  return reference(Deno.execPath(), (at) => [
    "run",
    "--v8-flags=--max-semi-space-size=1",
    "--allow-net",
    `${ROOT}/bench/floor_node.ts`,
    at.host,
    String(at.port),
  ]);
}

/** nodemailer's smtp-server as a plain accept-all sink (bench/smtp_server_sink.ts), pinned in deno.json. */
function smtpServerSink(): Promise<Proc> {
  return reference(Deno.execPath(), (at) => [
    "run",
    "--allow-net",
    "--allow-env",
    "--allow-read",
    "--allow-sys",
    `${ROOT}/bench/smtp_server_sink.ts`,
    at.host,
    String(at.port),
  ]);
}

/** maildev as a developer runs it (its defaults; the web interface off so no port is shared), pinned in deno.json. */
function maildev(): Promise<Proc> {
  return reference(Deno.execPath(), (at) => [
    "run",
    "--allow-all",
    `${ROOT}/node_modules/maildev/dist/bin/maildev.js`,
    "--smtp",
    String(at.port),
    "--ip",
    at.host,
    "--disable-web",
    "--silent",
  ]);
}

/** One smtp-source run; returns messages per second and the peak RSS sampled meanwhile. */
async function source(
  tools: Awaited<ReturnType<typeof postfixTools>>,
  at: Addr,
  shape: string[],
  samplePid?: number,
  messages = MESSAGES,
): Promise<{ rate: number; rss: number[] }> {
  const rss: number[] = [];
  const timer = samplePid ? setInterval(() => rss.push(memoryMiB(samplePid).rss), 50) : undefined;
  const t0 = performance.now();
  const out = await run(tools.source, [
    ...shape,
    "-m",
    String(messages),
    "-f",
    "bench@origin.test",
    "-t",
    "bench@sinkhole.test",
    `${at.host}:${at.port}`,
  ], { env: tools.env });
  const ms = performance.now() - t0;
  clearInterval(timer);
  if (out.code !== 0) throw new Error(`smtp-source failed: ${out.stderr}`);
  return { rate: messages / (ms / 1000), rss };
}

/** Opens `n` sessions and leaves each in the middle of a transaction. */
async function openSessions(at: Addr, n: number): Promise<RawClient[]> {
  const clients: RawClient[] = [];
  for (let i = 0; i < n; i += 100) {
    clients.push(
      ...await Promise.all(Array.from({ length: Math.min(100, n - i) }, async () => {
        const c = await RawClient.connect(at.port, at.host);
        await c.reply();
        await c.cmd("EHLO open.test");
        await c.cmd("MAIL FROM:<a@origin.test>");
        await c.cmd("RCPT TO:<b@sinkhole.test>");
        return c;
      })),
    );
  }
  return clients;
}

/** Latency of `count` sequential sessions, in ms. */
async function latencies(at: Addr, count: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const t0 = performance.now();
    await transaction(at.port, { host: at.host });
    out.push(performance.now() - t0);
  }
  return out;
}

/** Time from `change()` returning to the first session whose RCPT reply is `code`. */
async function switchLatency(at: Addr, change: () => Promise<unknown>, code: number, limitMs: number) {
  await change();
  const t0 = performance.now();
  while (performance.now() - t0 < limitMs) {
    const codes = await transaction(at.port, { host: at.host });
    if (codes[3] === code) return performance.now() - t0;
    await sleep(20);
  }
  throw new Error(`mode not seen within ${limitMs} ms`);
}

async function main() {
  const rows: [string, string][] = [];
  const throughput: Throughput[] = [];
  const row = (what: string, value: string) => {
    rows.push([what, value]);
    console.log(`${what.padEnd(64)} ${value}`);
  };
  const tools = await postfixTools();
  const moto = await startMoto();
  const proxy = faultProxy(moto.url);
  const procs: Proc[] = [];
  try {
    await putMode(moto.url, "accept", "/bench/accept");
    await putMode(moto.url, "accept-log", "/bench/accept-log");

    // --- Start-up and idle memory -------------------------------------------------
    const startups: Record<string, number[]> = { static: [], ssm: [] };
    for (let i = 0; i < REPS; i++) {
      const s = await sinkhole({ SINKHOLE_MODE: "accept" });
      startups.static.push(s.startMs);
      await s.stop();
      const m = await sinkhole(ssmEnv(proxy.url, "30", "/bench/accept"));
      startups.ssm.push(m.startMs);
      await m.stop();
    }
    row("start-up to first 220, static mode (median ms)", fmt(median(startups.static)));
    row("start-up to first 220, SSM source (median ms)", fmt(median(startups.ssm)));

    // The session cap at its most (MAX_SESSIONS_CAP), so OPEN_SESSIONS can be held open.
    const accept = await sinkhole({
      ...ssmEnv(proxy.url, "30", "/bench/accept"),
      SINKHOLE_MAX_SESSIONS: String(MAX_SESSIONS_CAP),
    });
    const acceptLog = await sinkhole(ssmEnv(proxy.url, "30", "/bench/accept-log"));
    const sink = await smtpSink(tools);
    const floor = await denoFloor();
    const floorNode = await denoFloorNode();
    const ledgerFloor = await denoLedgerFloor();
    const nodemailer = await smtpServerSink();
    const dev = await maildev();
    procs.push(accept, acceptLog, sink, floor, floorNode, ledgerFloor, nodemailer, dev);
    await sleep(1000);
    row("RSS idle, SSM client loaded (MiB)", fmt(memoryMiB(accept.pid).rss, 1));

    // --- Throughput, alternating ---------------------------------------------------
    /** `messages`: a run's, per workload, when not MESSAGES. */
    const servers: { name: string; at: Proc; sample?: boolean; messages?: number[] }[] = [
      { name: "smtp-sink", at: sink },
      { name: "Deno floor (bench/floor.ts, Deno.listen)", at: floor },
      { name: "Deno floor on node:net (bench/floor_node.ts)", at: floorNode },
      { name: LEDGER_FLOOR, at: ledgerFloor },
      { name: "sinkhole accept", at: accept, sample: true },
      { name: "sinkhole accept-log", at: acceptLog, sample: true },
      {
        name: `nodemailer smtp-server ${SMTP_SERVER_VERSION} sink`,
        at: nodemailer,
        messages: [SLOW_MESSAGES, MESSAGES],
      },
      { name: `maildev ${MAILDEV_VERSION}`, at: dev, messages: [SLOW_MESSAGES, SLOW_MESSAGES] },
    ];
    const callsBefore = proxy.count;
    const tThroughput = performance.now();
    const rssDuring: number[] = [];
    const rates = new Map<string, number[]>();
    for (const [w, shape] of SHAPES.entries()) {
      for (let i = 0; i < REPS; i++) {
        // Each repetition starts with the next server, so no one always runs first after a pause.
        for (let k = 0; k < servers.length; k++) {
          const s = servers[(i + k) % servers.length];
          const r = await source(tools, s.at, shape.args, s.sample ? s.at.pid : undefined, s.messages?.[w]);
          rssDuring.push(...r.rss);
          const key = `${w}/${s.name}`;
          rates.set(key, [...rates.get(key) ?? [], r.rate]);
        }
      }
    }
    const rate = (w: number, name: string) => median(rates.get(`${w}/${name}`)!);
    for (const s of servers) {
      const ratios = SHAPES.map((_, w) => rate(w, s.name) / rate(w, "smtp-sink"));
      // To the floor rep by rep (both ran in the same repetition, minutes apart at most): a slow minute of the
      // machine weighs on both, where medians taken apart can pair the floor's best with the listener's worst.
      const paired = (to: string) =>
        SHAPES.map((_, w) => spread(rates.get(`${w}/${s.name}`)!, rates.get(`${w}/${to}`)!));
      const isListener = s.name.startsWith("sinkhole");
      throughput.push({
        name: s.name,
        ratios,
        toFloor: isListener || s.name === LEDGER_FLOOR ? paired(servers[1].name) : undefined,
        toLedger: isListener ? paired(LEDGER_FLOOR) : undefined,
        messages: s.messages,
      });
    }
    for (const t of throughput) {
      const to = (what: string, s?: Spread[]) => s ? `   (to the ${what}: ${s.map(spreadText).join("  ")})` : "";
      console.log(
        `${t.name.padEnd(40)} ${t.ratios.map((r) => r.toFixed(2)).join("  ")}${to("floor", t.toFloor)}${
          to("ledger floor", t.toLedger)
        }`,
      );
    }
    row(
      "smtp-sink's own rate, for scale: one / many per connection (msgs/s, median)",
      `${fmt(rate(0, "smtp-sink"))} / ${fmt(rate(1, "smtp-sink"))}`,
    );
    const throughputS = (performance.now() - tThroughput) / 1000;
    const calls = proxy.count - callsBefore;
    row(
      "SSM GetParameter calls during the throughput runs (2 listeners, TTL 30 s)",
      `${calls} in ${fmt(throughputS, 1)} s (one per TTL per listener: ${fmt(2 * Math.floor(throughputS / 30))})`,
    );
    row(
      "RSS during throughput, median / peak sampled (MiB)",
      `${fmt(median(rssDuring), 1)} / ${fmt(Math.max(...rssDuring), 1)}`,
    );
    row(
      "VmHWM after throughput, accept / accept-log (MiB)",
      `${fmt(memoryMiB(accept.pid).peak, 1)} / ${fmt(memoryMiB(acceptLog.pid).peak, 1)}`,
    );

    // --- open sessions, at the cap --------------------------------------------------------
    const open = await openSessions(accept, OPEN_SESSIONS);
    await sleep(500);
    const mOpen = memoryMiB(accept.pid);
    row(`RSS with ${OPEN_SESSIONS} open sessions, now / VmHWM (MiB)`, `${fmt(mOpen.rss, 1)} / ${fmt(mOpen.peak, 1)}`);
    for (const c of open) c.close();

    // --- Before/after: Deno's default V8 flags -------------------------------------
    const plain = await sinkhole(ssmEnv(proxy.url, "30", "/bench/accept"), { v8Defaults: true });
    procs.push(plain);
    await sleep(1000);
    const plainIdle = memoryMiB(plain.pid).rss;
    const plainRate = (await source(tools, plain, SHAPES[0].args)).rate;
    row(
      "without the V8 flags: RSS idle / VmHWM after one -s 20 run (MiB); msgs/s",
      `${fmt(plainIdle, 1)} / ${fmt(memoryMiB(plain.pid).peak, 1)}; ${fmt(plainRate)}`,
    );
    await plain.stop();
    procs.pop();

    // --- Slow SSM: latency a session sees -----------------------------------------
    const slow = await sinkhole(ssmEnv(proxy.url, "1", "/bench/accept"));
    procs.push(slow);
    const fast = await latencies(slow, 200);
    proxy.state.delayMs = SLOW_SSM_MS;
    await sleep(1500);
    const slowed = await latencies(slow, 200);
    proxy.state.delayMs = 0;
    row(
      `session latency, SSM normal vs answering in ${SLOW_SSM_MS} ms (p50 / max ms)`,
      `${fmt(median(fast), 2)} / ${fmt(Math.max(...fast), 1)}  vs  ${fmt(median(slowed), 2)} / ${
        fmt(Math.max(...slowed), 1)
      }`,
    );
    await slow.stop();
    procs.pop();

    // --- Mode-switch latency -------------------------------------------------------
    await putMode(moto.url, "accept", "/bench/switch");
    const sw = await sinkhole(ssmEnv(moto.url, String(SWITCH_TTL_S), "/bench/switch"));
    procs.push(sw);
    const ssmSwitch: number[] = [];
    for (let i = 0; i < 3; i++) {
      ssmSwitch.push(await switchLatency(sw, () => putMode(moto.url, "bounce", "/bench/switch"), 550, 20_000));
      ssmSwitch.push(await switchLatency(sw, () => putMode(moto.url, "accept", "/bench/switch"), 250, 20_000));
    }
    row(
      `mode switch, aws ssm put-parameter -> first session (TTL ${SWITCH_TTL_S} s; median / max ms)`,
      `${fmt(median(ssmSwitch))} / ${fmt(Math.max(...ssmSwitch))}`,
    );
    await sw.stop();
    procs.pop();
    const modeFile = await Deno.makeTempFile();
    await Deno.writeTextFile(modeFile, "accept");
    const local = await sinkhole({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "1" });
    procs.push(local);
    const fileSwitch: number[] = [];
    for (let i = 0; i < 3; i++) {
      fileSwitch.push(await switchLatency(local, () => Deno.writeTextFile(modeFile, "bounce"), 550, 5000));
      fileSwitch.push(await switchLatency(local, () => Deno.writeTextFile(modeFile, "accept"), 250, 5000));
    }
    row(
      "mode switch, local mode file (TTL 1 s; median / max ms)",
      `${fmt(median(fileSwitch))} / ${fmt(Math.max(...fileSwitch))}`,
    );
    await local.stop();
    procs.pop();
    await Deno.remove(modeFile);

    await report(rows, throughput, tools.version);
  } finally {
    for (const p of procs) await p.stop().catch(() => {});
    await proxy.down().catch(() => {});
    await moto.close();
  }
}

async function report(
  rows: [string, string][],
  throughput: Throughput[],
  postfix: string,
) {
  const cpu = (await Deno.readTextFile("/proc/cpuinfo")).match(/model name\s*:\s*(.*)/)?.[1] ?? "unknown";
  const mem = (await Deno.readTextFile("/proc/meminfo")).match(/MemTotal:\s*(\d+)/)?.[1];
  const ratio = (r: number) => r.toFixed(2);
  const runs = (n: number | undefined) => n !== undefined && n !== MESSAGES ? ` (${n} messages a run)` : "";
  const md = `# sinkhole benchmark results

Written by \`deno task bench\` on ${new Date().toISOString()}.

- Machine: ${navigator.hardwareConcurrency} cores, ${cpu}, ${mem ? Math.round(Number(mem) / 1048576) : "?"} GiB
- Deno ${Deno.version.deno} (V8 ${Deno.version.v8}); reference: Postfix's \`smtp-sink\` (${postfix}, unpacked by
  scripts/mtas.sh), load from its \`smtp-source\` (${SESSIONS} sessions)
- ${MESSAGES} messages a run (fewer for the slow peers, as marked: each run still lasts seconds); ${REPS} repetitions, each server in turn, each repetition
  starting with the next one; the median rate of each, as a ratio to smtp-sink's median in the same run; sinkhole to the
  floor: the median of the ratios repetition by repetition (each ran both), the least and the most in brackets; the
  ledger floor is the Deno floor that also logs each attempt's line as the listener does (its stdout to a file too)
- sinkhole runs as \`deno task start\` with its mode from SSM (moto_server on loopback, TTL 30 s), stdout to a file

## Throughput, as a ratio to smtp-sink (higher is faster)

| server | one message per connection | many messages per connection | to the Deno floor | sinkhole to the ledger floor |
| --- | --- | --- | --- | --- |
${
    throughput.map((t) =>
      `| ${t.name} | ${ratio(t.ratios[0])}${runs(t.messages?.[0])} | ${ratio(t.ratios[1])}${runs(t.messages?.[1])} | ${
        t.toFloor ? t.toFloor.map(spreadText).join(" / ") : ""
      } | ${t.toLedger ? t.toLedger.map(spreadText).join(" / ") : ""} |`
    ).join("\n")
  }

smtp-server waits 100 ms before each greeting to catch early talkers (its \`smtp-connection.js\` \`init\`; no
option turns it off), so one message a connection its rate is bound by ${SESSIONS} sessions / 100 ms; maildev
answers SMTP with smtp-server (its \`@maildev/smtp\`) and keeps each message in memory.

## The rest

| measure | value |
| --- | --- |
${rows.map(([a, b]) => `| ${a} | ${b} |`).join("\n")}

Commands (what the bench runs):

\`\`\`sh
smtp-sink -u nobody HOST:PORT 1000                                       # reference
deno run --allow-net bench/floor.ts HOST PORT                            # Deno's I/O floor
deno run --allow-net bench/floor_node.ts HOST PORT                       # the same on node:net
deno run --allow-net bench/floor_ledger.ts HOST PORT > FILE              # the floor + each attempt's ledger line
deno run --allow-net --allow-env --allow-read --allow-sys bench/smtp_server_sink.ts HOST PORT
deno run --allow-all node_modules/maildev/dist/bin/maildev.js --smtp PORT --ip HOST --disable-web --silent
smtp-source -s ${SESSIONS} -m ${MESSAGES} -f bench@origin.test -t bench@sinkhole.test HOST:PORT
smtp-source -d -s ${SESSIONS} -m ${MESSAGES} -f bench@origin.test -t bench@sinkhole.test HOST:PORT
\`\`\`
`;
  await Deno.writeTextFile(`${ROOT}/bench/results.md`, md);
  console.log(`\nwrote bench/results.md`);
}

if (import.meta.main) await main();
