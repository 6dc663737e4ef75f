/**
 * The one test rig, shared by tests/, bench/ and rehearse/: run the real listener as a
 * subprocess, talk raw SMTP (or nodemailer) to it, run commands and tasks, find tools.
 */
import nodemailer from "nodemailer";
import { type LogLine as ListenerLogLine, parseLogLine } from "../listener.ts";

export const ROOT = new URL("..", import.meta.url).pathname;
export const IN_CI = Deno.env.get("CI") === "true";

/** A task of deno.json as written (`deno run … file.ts`). */
export function taskText(name: string): string {
  const task = JSON.parse(Deno.readTextFileSync(`${ROOT}/deno.json`)).tasks[name];
  const command = typeof task === "string" ? task : task?.command;
  if (typeof command !== "string") throw new Error(`deno.json has no task ${name}`);
  return command;
}

/**
 * A `deno …` task as an argv to spawn from anywhere: this Deno, and the task's own files
 * made absolute (one source of truth for what the tests, the bench and the image run).
 */
export function taskCommand(name: string): string[] {
  const words = taskText(name).split(/\s+/);
  if (words[0] !== "deno") throw new Error(`tasks.${name} must begin with deno: ${taskText(name)}`);
  return [Deno.execPath(), ...words.slice(1).map((w) => /^[\w-]+\/[\w./-]+\.ts$/.test(w) ? `${ROOT}/${w}` : w)];
}

/** Every environment variable name listener.ts reads, found in its source (a quoted SINKHOLE_, AWS_ or INIT_ name). */
export function variablesInSource(): string[] {
  const src = Deno.readTextFileSync(`${ROOT}/listener.ts`);
  return [...new Set([...src.matchAll(/"((?:SINKHOLE|AWS|INIT)_[A-Z_]+)"/g)].map((m) => m[1]))].sort();
}

/** The listener command exactly as `deno task start` runs it. */
export function startCommand(): string[] {
  return taskCommand("start");
}

/** A line the listener wrote: one of its typed events, or text that was not one (kept as `raw`). */
export type LogLine = ListenerLogLine | { event: "raw"; text: string };
/** The log line of one kind of event. */
export type EventOf<K extends LogLine["event"]> = Extract<LogLine, { event: K }>;

export interface Listener {
  host: string;
  port: number;
  logs: LogLine[];
  /** Resolves with the first log line that matches, or throws after `ms`. */
  waitForLog<T extends LogLine>(pred: (l: LogLine) => l is T, ms?: number): Promise<T>;
  waitForLog(pred: (l: LogLine) => boolean, ms?: number): Promise<LogLine>;
  /** The first event of a kind that matches, typed as that kind. */
  waitFor<K extends LogLine["event"]>(kind: K, pred?: (e: EventOf<K>) => boolean, ms?: number): Promise<EventOf<K>>;
  /** Every event of a kind logged so far. */
  events<K extends LogLine["event"]>(kind: K): EventOf<K>[];
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
  child: Deno.ChildProcess;
  stderr(): string;
  pid: number;
}

/** How long `stop` waits for a clean exit before SIGKILL: the shutdown grace and a wide margin. */
const STOP_WAIT_MS = 60_000;

/** Starts `listener.ts` with the given environment on `host` (port 0: any free port). */
export async function startListener(
  env: Record<string, string>,
  opts: { host?: string; port?: number; args?: string[]; cgroup?: MemoryCgroup; denoFlags?: string[] } = {},
): Promise<Listener> {
  const host = opts.host ?? "127.0.0.1";
  // Deno's own flags (--inspect, say) go right after `run`, before the task's.
  const [deno, verb, ...task] = startCommand();
  const command = [deno, verb, ...(opts.denoFlags ?? []), ...task];
  const [cmd, ...args] = opts.cgroup ? opts.cgroup.wrap(command) : command;
  const child = new Deno.Command(cmd, {
    args: [...args, ...(opts.args ?? [])],
    cwd: ROOT,
    env: {
      SINKHOLE_BIND_HOST: host,
      SINKHOLE_BIND_PORT: String(opts.port ?? 0),
      // The liveness port: any free one beside the listener's own address (the start line says which).
      SINKHOLE_HEALTH_HOST: host,
      SINKHOLE_HEALTH_PORT: "0",
      NO_COLOR: "1",
      ...env,
    },
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).spawn();
  const logs: LogLine[] = [];
  const waiters: { pred: (l: LogLine) => boolean; ok: (l: LogLine) => void }[] = [];
  let err = "";
  const pump = (async () => {
    let rest = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      rest += chunk;
      let nl;
      while ((nl = rest.indexOf("\n")) >= 0) {
        const text = rest.slice(0, nl);
        rest = rest.slice(nl + 1);
        const line: LogLine = parseLogLine(text) ?? { event: "raw", text };
        logs.push(line);
        for (const w of [...waiters]) {
          if (w.pred(line)) {
            waiters.splice(waiters.indexOf(w), 1);
            w.ok(line);
          }
        }
      }
    }
  })();
  const errPump = (async () => {
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) err += chunk;
  })();
  const status = child.status;
  let exited = false;
  status.then(() => exited = true);

  const waitForLog = (pred: (l: LogLine) => boolean, ms = REPLY_WAIT_MS): Promise<LogLine> => {
    const found = logs.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((ok, fail) => {
      const w = {
        pred,
        ok: (l: LogLine) => {
          clearTimeout(t);
          ok(l);
        },
      };
      const t = setTimeout(() => {
        waiters.splice(waiters.indexOf(w), 1);
        fail(
          new Error(
            `no matching log line in ${ms} ms; logs:\n${logs.map((l) => JSON.stringify(l)).join("\n")}\n${err}`,
          ),
        );
      }, ms);
      waiters.push(w);
    });
  };

  const stop = async (signal: Deno.Signal = "SIGTERM"): Promise<Deno.CommandStatus> => {
    if (!exited) {
      try {
        child.kill(signal);
      } catch { /* gone */ }
    }
    const killer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
    }, STOP_WAIT_MS);
    const s = await status;
    clearTimeout(killer);
    await pump.catch(() => {});
    await errPump.catch(() => {});
    return s;
  };

  let start: LogLine;
  try {
    start = await Promise.race([
      waitForLog((l) => l.event === "start", 30_000),
      status.then((s) => {
        throw new Error(`listener exited with ${s.code} before start: ${err}`);
      }),
    ]);
  } catch (e) {
    await stop("SIGKILL");
    throw e;
  }
  const port = Number((start as EventOf<"start">).bind.split(":").pop());
  const isKind = <K extends LogLine["event"]>(kind: K) => (l: LogLine): l is EventOf<K> => l.event === kind;
  return {
    host,
    port,
    logs,
    waitForLog: waitForLog as Listener["waitForLog"],
    waitFor: (kind, pred = () => true, ms) =>
      waitForLog((l) => isKind(kind)(l) && pred(l), ms) as Promise<EventOf<typeof kind>>,
    events: (kind) => logs.filter(isKind(kind)),
    stop,
    child,
    stderr: () => err,
    pid: child.pid,
  };
}

export interface SmtpReply {
  code: number;
  lines: string[];
  text: string;
}

/**
 * How long a test client waits for a reply or for the server to close, unless told: a
 * hang guard, never a measure. Generous, so a busy machine cannot trip it; a test that
 * is about a timeout sets the listener's own timeout short and asserts a lower bound.
 */
export const REPLY_WAIT_MS = 60_000;

/** A raw SMTP client over Deno.connect, for exact bytes and exact replies. */
export class RawClient {
  #buf = "";
  #eof = false;
  #decoder = new TextDecoder();
  constructor(readonly conn: Deno.TcpConn) {}

  static async connect(port: number, host = "127.0.0.1"): Promise<RawClient> {
    return new RawClient(await Deno.connect({ hostname: host, port }));
  }

  async #fill(deadline: number): Promise<boolean> {
    const buf = new Uint8Array(65536);
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`timed out; have ${JSON.stringify(this.#buf.slice(0, 200))}`);
    let t: ReturnType<typeof setTimeout> | undefined;
    const n = await Promise.race([
      this.conn.read(buf).catch(() => null),
      new Promise<"timeout">((ok) => t = setTimeout(() => ok("timeout"), left)),
    ]);
    clearTimeout(t);
    if (n === "timeout") throw new Error(`timed out; have ${JSON.stringify(this.#buf.slice(0, 200))}`);
    if (n === null) {
      this.#eof = true;
      return false;
    }
    this.#buf += this.#decoder.decode(buf.subarray(0, n), { stream: true });
    return true;
  }

  /** Reads one (possibly multi-line) reply. */
  async reply(ms = REPLY_WAIT_MS): Promise<SmtpReply> {
    const deadline = Date.now() + ms;
    const lines: string[] = [];
    for (;;) {
      const nl = this.#buf.indexOf("\r\n");
      if (nl < 0) {
        if (this.#eof || !(await this.#fill(deadline))) {
          throw new Error(`connection closed while reading a reply; have ${JSON.stringify(lines)}`);
        }
        continue;
      }
      const line = this.#buf.slice(0, nl);
      this.#buf = this.#buf.slice(nl + 2);
      lines.push(line);
      if (!/^\d{3}[ -]/.test(line)) throw new Error(`malformed reply line ${JSON.stringify(line)}`);
      if (line[3] === " ") {
        return { code: Number(line.slice(0, 3)), lines, text: lines.map((l) => l.slice(4)).join("\n") };
      }
    }
  }

  async send(data: string | Uint8Array): Promise<void> {
    let bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    while (bytes.length > 0) bytes = bytes.subarray(await this.conn.write(bytes));
  }

  async cmd(line: string, ms?: number): Promise<SmtpReply> {
    await this.send(line + "\r\n");
    return await this.reply(ms);
  }

  /** True once the server has closed the connection (within `ms`). */
  async closedByServer(ms = REPLY_WAIT_MS): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.#eof) {
      try {
        if (!(await this.#fill(deadline))) return true;
      } catch {
        return false;
      }
    }
    return true;
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* closed */ }
  }
}

/** A nodemailer transport to a listener on loopback, waiting REPLY_WAIT_MS unless told otherwise. */
export function mailer(port: number, opts: { socketTimeout?: number; name?: string } = {}) {
  return nodemailer.createTransport({
    host: "127.0.0.1",
    port,
    secure: false,
    ignoreTLS: true,
    name: opts.name,
    connectionTimeout: REPLY_WAIT_MS,
    greetingTimeout: REPLY_WAIT_MS,
    socketTimeout: opts.socketTimeout ?? REPLY_WAIT_MS,
  });
}

/** What nodemailer rejects with: the server's reply code and text, or its own error code. */
export interface SendError extends Error {
  responseCode?: number;
  response?: string;
  code?: string;
  rejected?: string[];
}

/** The error a send must fail with (throws when it succeeds). */
export async function failure(p: Promise<unknown>): Promise<SendError> {
  try {
    await p;
  } catch (e) {
    return e as SendError;
  }
  throw new Error("expected a failure");
}

/**
 * Runs `fn` against a listener started with `env`, then stops it and checks that it
 * exited cleanly (code 0).
 */
export async function withListener(env: Record<string, string>, fn: (l: Listener) => Promise<void>): Promise<void> {
  const l = await startListener(env);
  try {
    await fn(l);
  } catch (err) {
    await l.stop();
    throw err;
  }
  const status = await l.stop();
  if (status.code !== 0) throw new Error(`the listener exited with ${status.code}: ${l.stderr()}`);
}

/** Runs a full transaction and returns the reply codes (greeting included). */
export async function transaction(
  port: number,
  opts: { from?: string; to?: string[]; body?: string; host?: string } = {},
): Promise<number[]> {
  const c = await RawClient.connect(port, opts.host);
  const codes: number[] = [];
  try {
    codes.push((await c.reply()).code);
    codes.push((await c.cmd("EHLO client.test")).code);
    codes.push((await c.cmd(`MAIL FROM:<${opts.from ?? "sender@origin.test"}>`)).code);
    for (const to of opts.to ?? ["someone@sinkhole.test"]) {
      const rep = await c.cmd(`RCPT TO:<${to}>`);
      codes.push(rep.code);
      if (rep.code === 421) return codes; // the server closes after 421
    }
    const data = await c.cmd("DATA");
    codes.push(data.code);
    if (data.code === 354) {
      codes.push((await c.cmd(`${opts.body ?? "Subject: t\r\n\r\nbody"}\r\n.`)).code);
    }
    codes.push((await c.cmd("QUIT")).code);
    return codes;
  } finally {
    c.close();
  }
}

/**
 * A loopback address of this run's own, for a server that must listen on a fixed port
 * (sendmail's mailertable takes no port, so a sinkhole under test listens on :25).
 * Drawn at random from 127.16.0.0–127.254.255.255 (about 15 million addresses, none of
 * them 127.0.0.1) and checked by binding every port in `ports` on it, so two concurrent
 * runs (two CI clones, a rehearsal beside the tests) do not share one. An address found
 * taken is skipped; the draw is bounded.
 */
export function uniqueLoopback(ports: number[], rand: () => number = Math.random): string {
  for (let attempt = 0; attempt < UNIQUE_LOOPBACK_DRAWS; attempt++) {
    const octet = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
    const host = `127.${octet(16, 254)}.${octet(0, 255)}.${octet(1, 254)}`;
    const held: Deno.Listener[] = [];
    try {
      for (const port of ports) held.push(Deno.listen({ hostname: host, port }));
      return host;
    } catch (e) {
      if (!(e instanceof Deno.errors.AddrInUse)) throw e;
    } finally {
      for (const l of held) l.close();
    }
  }
  throw new Error(`no free loopback address for ports ${ports.join(", ")} in ${UNIQUE_LOOPBACK_DRAWS} draws`);
}
const UNIQUE_LOOPBACK_DRAWS = 100;

/**
 * A port for a child process that cannot take port 0 and tell us which it got: on an
 * address of this run's own (see `uniqueLoopback`), so no other run is listening there.
 */
export function privateAddress(port = 2525): { host: string; port: number } {
  return { host: uniqueLoopback([port]), port };
}

/** Where a command lives on PATH (or an absolute path), or undefined. */
export function which(name: string): string | undefined {
  if (name.startsWith("/")) {
    try {
      return Deno.statSync(name).isFile ? name : undefined;
    } catch {
      return undefined;
    }
  }
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${name}`).isFile) return `${dir}/${name}`;
    } catch { /* not here */ }
  }
  return undefined;
}

/**
 * For suites that need a real peer: locally a missing tool skips the suite with a
 * note; under CI=true the suite runs and fails, saying what is missing.
 */
export function needs(...tools: string[]): { ignore: boolean; missing: string[] } {
  const missing = tools.filter((t) => which(t) === undefined);
  if (missing.length > 0 && !IN_CI) {
    console.error(`note: skipping a suite locally, missing ${missing.join(", ")} (CI installs them; see .ci/run)`);
  }
  return { ignore: missing.length > 0 && !IN_CI, missing };
}

export function assertTools(missing: string[]): void {
  if (missing.length > 0) throw new Error(`required tools missing: ${missing.join(", ")}; .ci/run installs them`);
}

/** Polls `cond` every `stepMs` until true or `ms` passed; bounded. */
export async function eventually(
  cond: () => boolean | Promise<boolean>,
  ms = REPLY_WAIT_MS,
  stepMs = 50,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((ok) => setTimeout(ok, stepMs));
  }
  throw new Error(`condition not met within ${ms} ms`);
}

export async function run(cmd: string, args: string[], opts: { env?: Record<string, string>; stdin?: string } = {}) {
  const child = new Deno.Command(cmd, {
    args,
    env: opts.env,
    stdin: opts.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (opts.stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(opts.stdin));
    await w.close();
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

export async function tempModeFile(mode: string): Promise<string> {
  const path = await Deno.makeTempFile({ prefix: "sinkhole-mode-" });
  await Deno.writeTextFile(path, mode + "\n");
  return path;
}

/**
 * Octets the kernel holds for the server that it has not read yet, on the loopback TCP
 * connection from `clientPort` to `serverPort` (Linux /proc/net/tcp: rx_queue). Zero means
 * the server has read everything sent so far: a causal wait, not a guess at timing.
 */
export function unreadByServer(serverPort: number, clientPort: number): number | undefined {
  const hex = (n: number) => n.toString(16).toUpperCase().padStart(4, "0");
  for (const line of Deno.readTextFileSync("/proc/net/tcp").split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 5) continue;
    if (f[1].endsWith(`:${hex(serverPort)}`) && f[2].endsWith(`:${hex(clientPort)}`)) {
      return parseInt(f[4].split(":")[1], 16);
    }
  }
  return undefined;
}

/**
 * Waits until the server has read every byte these clients sent (see `unreadByServer`). Many
 * clients are polled together, one read of /proc/net/tcp a step: hundreds of pollers each
 * reading it would keep this process from reading the listener's stdout, and a listener
 * whose log pipe is full waits for it (memory_test's 400 sessions).
 */
export async function readByServer(c: RawClient | RawClient[], serverPort: number): Promise<void> {
  const clientPorts = new Set((Array.isArray(c) ? c : [c]).map((x) => (x.conn.localAddr as Deno.NetAddr).port));
  await eventually(() => {
    const hex = (n: number) => n.toString(16).toUpperCase().padStart(4, "0");
    const unread = new Map<string, number>();
    for (const line of Deno.readTextFileSync("/proc/net/tcp").split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 5 || !f[1].endsWith(`:${hex(serverPort)}`)) continue;
      unread.set(f[2].slice(-4), parseInt(f[4].split(":")[1], 16));
    }
    return [...clientPorts].every((port) => unread.get(hex(port)) === 0);
  });
}

/** Resident and peak resident memory of a process, in MiB (Linux /proc). */
/** `deno task ctl ARGS` as a workflow runs it, with more environment (no job summary unless given). */
export function runCtl(args: string[], env: Record<string, string> = {}) {
  const [cmd, ...rest] = taskCommand("ctl");
  return run(cmd, [...rest, ...args], { env: { GITHUB_STEP_SUMMARY: "", ...env } });
}

/** `--healthcheck` as the image runs it, pointed at a listener's liveness port; inside `cgroup` when given. */
export function healthcheck(l: Listener, cgroup?: MemoryCgroup) {
  const [cmd, ...args] = cgroup ? cgroup.wrap(startCommand()) : startCommand();
  const [host, port] = String(l.logs.find((x) => x.event === "start")!.health).split(/:(?=\d+$)/);
  return run(cmd, [...args, "--healthcheck"], {
    env: { SINKHOLE_HEALTH_HOST: host, SINKHOLE_HEALTH_PORT: port, SINKHOLE_MODE: "defer" },
  });
}

/**
 * Log lines as a JSON-lines file (what `SINKHOLE_LOG_FORMAT=json deno task dev` prints), for
 * `ctl report --file`; the caller removes it.
 */
export async function logsFile(lines: LogLine[]): Promise<string> {
  const path = await Deno.makeTempFile({ prefix: "sinkhole-ledger-", suffix: ".jsonl" });
  await Deno.writeTextFile(path, lines.map((l) => JSON.stringify(l)).join("\n") + "\n");
  return path;
}

/**
 * A memory cgroup of a test's own, limited as ECS limits a container: both processes of a task
 * run in it. cgroup v1 (this machine) or v2 (GitHub's runners).
 */
export interface MemoryCgroup {
  dir: string;
  version: "v1" | "v2";
  /** `cmd args…` → the same, started inside the cgroup. */
  wrap(command: string[]): string[];
  /**
   * The highest charge seen (anonymous memory and page cache), in MiB: v1 memory.max_usage_in_bytes,
   * v2 memory.peak (Linux 5.19+; NaN where the kernel has no such file).
   */
  peakMiB(): number;
  /** Times the kernel killed a process of the cgroup for memory: v1 memory.oom_control, v2 memory.events. */
  oomKills(): number;
  remove(): Promise<void>;
}

/**
 * A child of this process's memory cgroup with a hard limit, where the machine lets tests
 * make one (v1 or v2, writable); undefined elsewhere, and the caller says so.
 */
export function memoryCgroup(limitMiB: number): MemoryCgroup | undefined {
  try {
    return memoryCgroupIn(Deno.readTextFileSync("/proc/self/cgroup"), "/sys/fs/cgroup", limitMiB);
  } catch {
    return undefined;
  }
}

/**
 * The same, from the text of /proc/self/cgroup and where the cgroup file systems are mounted
 * (`root`: /sys/fs/cgroup, or a fake directory in a test): v1 when a `N:memory:/path` line is
 * there (the memory hierarchy at root/memory), else v2's `0::/path` (one hierarchy at root,
 * the memory controller enabled for children through cgroup.subtree_control if it is not).
 */
export function memoryCgroupIn(procSelfCgroup: string, root: string, limitMiB: number): MemoryCgroup | undefined {
  const lines = procSelfCgroup.split("\n");
  const v1 = lines.find((l) => /^\d+:(?:[^:]*,)?memory(?:,[^:]*)?:/.test(l));
  const v2 = lines.find((l) => l.startsWith("0::"));
  const own = (v1 ?? v2)?.split(":")[2]?.replace(/\/$/, "");
  if (own === undefined) return undefined;
  const bytes = String(limitMiB * 1024 * 1024);
  /** A new cgroup below `parent` with the limit set; throws (having removed what it made) where it cannot. */
  const makeBelow = (parent: string) => {
    const dir = `${parent}/sinkhole-${crypto.randomUUID()}`;
    Deno.mkdirSync(dir);
    try {
      if (v1) Deno.writeTextFileSync(`${dir}/memory.limit_in_bytes`, bytes);
      else {
        try {
          Deno.writeTextFileSync(`${dir}/memory.max`, bytes, { create: false });
        } catch {
          // No memory.max: the controller is not enabled for the parent's children yet.
          Deno.writeTextFileSync(`${parent}/cgroup.subtree_control`, "+memory");
          Deno.writeTextFileSync(`${dir}/memory.max`, bytes); // the kernel made it (a fake directory: made here)
        }
      }
      return dir;
    } catch (err) {
      Deno.removeSync(dir, { recursive: !root.startsWith("/sys/") });
      throw err;
    }
  };
  // v2's "no internal processes" rule: a cgroup that holds processes (a runner's job) cannot enable the memory
  // controller for children (EBUSY); the hierarchy's root is exempt, and systemd enables memory there. So v2 tries
  // below its own cgroup, then below the root.
  let dir: string;
  try {
    dir = makeBelow(v1 ? `${root}/memory${own}` : `${root}${own}`);
  } catch (err) {
    if (v1 || own === "") throw err;
    dir = makeBelow(root);
  }
  const read = (f: string) => Deno.readTextFileSync(`${dir}/${f}`);
  const counter = (text: string, key: string) => Number(new RegExp(`^${key} (\\d+)`, "m").exec(text)?.[1] ?? 0);
  return {
    dir,
    version: v1 ? "v1" : "v2",
    wrap: (command) => ["sh", "-c", `echo $$ > '${dir}/cgroup.procs' && exec "$@"`, "sh", ...command],
    peakMiB: () => {
      try {
        return Number(read(v1 ? "memory.max_usage_in_bytes" : "memory.peak")) / 1024 / 1024;
      } catch {
        return NaN;
      }
    },
    oomKills: () => counter(read(v1 ? "memory.oom_control" : "memory.events"), "oom_kill"),
    remove: async () => {
      for (let i = 0; i < 100; i++) {
        try {
          return Deno.removeSync(dir, { recursive: !root.startsWith("/sys/") }); // a fake one holds files
        } catch {
          await new Promise((ok) => setTimeout(ok, 50)); // its last process is still exiting
        }
      }
    },
  };
}

export function memoryMiB(pid: number): { rss: number; peak: number; anon: number; file: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
  return { rss: kb("VmRSS") / 1024, peak: kb("VmHWM") / 1024, anon: kb("RssAnon") / 1024, file: kb("RssFile") / 1024 };
}

/** A small deterministic PRNG (mulberry32), so a soak run can be replayed from its seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The V8 inspector of a process started with `--inspect=127.0.0.1:0` (the URL it printed on
 * stderr): `heap()` collects all garbage, then says what stays live: the V8 heap's objects
 * and the ArrayBuffer backing stores outside it (typed arrays, read buffers), in octets.
 */
export async function inspector(
  stderr: () => string,
): Promise<{ heap(): Promise<{ used: number; buffers: number }>; close(): void }> {
  const found = () => /ws:\/\/[\w.:]+\/[\w-]+/.exec(stderr())?.[0];
  await eventually(() => found() !== undefined);
  const ws = new WebSocket(found()!);
  await new Promise((ok, fail) => {
    ws.onopen = ok;
    ws.onerror = fail;
  });
  const pending = new Map<number, (r: Record<string, number>) => void>();
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    pending.get(m.id)?.(m.result ?? {});
    pending.delete(m.id);
  };
  let id = 0;
  const call = (method: string) =>
    new Promise<Record<string, number>>((ok, fail) => {
      const t = setTimeout(() => fail(new Error(`the inspector did not answer ${method}`)), REPLY_WAIT_MS);
      pending.set(++id, (r) => (clearTimeout(t), ok(r)));
      ws.send(JSON.stringify({ id, method }));
    });
  return {
    heap: async () => {
      await call("HeapProfiler.collectGarbage");
      const usage = await call("Runtime.getHeapUsage");
      return { used: usage.usedSize, buffers: usage.backingStorageSize };
    },
    close: () => ws.close(),
  };
}
