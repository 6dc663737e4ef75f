/**
 * The listener as a person at a terminal meets it: `deno task dev` (its defaults lose to
 * the environment; a relative mode file is taken from where the person stands and logged
 * absolute; text logs, one line a session), `--help`, and errors at start that name the
 * address and say what to do, with one format and the exit codes `--help` states. Real
 * processes, real TCP on loopback, the real `deno task`.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { REPLY_WAIT_MS, ROOT, run, startCommand, transaction, variablesInSource } from "../rig/helpers.ts";
import {
  absolutePath,
  bindError,
  configFromEnv,
  devEnvironment,
  ENVIRONMENT_VARIABLES,
  type LogEvent,
  textLine,
} from "../listener.ts";

Deno.test("listener --help and -h: usage, every environment variable it reads, the exit codes", async () => {
  const read = variablesInSource();
  assertEquals(
    ENVIRONMENT_VARIABLES.map((v) => v.name).sort(),
    read,
    "the table lists exactly what the source reads",
  );
  const [cmd, ...args] = startCommand();
  for (const flag of ["--help", "-h"]) {
    const r = await run(cmd, [...args, flag]);
    assertEquals(r.code, 0, r.stderr);
    assertMatch(r.stdout, /^usage: /);
    for (const name of read) assertMatch(r.stdout, new RegExp(`^  ${name} `, "m"), `--help lists ${name}`);
    assertMatch(r.stdout, /exit codes: 0 .* 2 refused at start .* 3 could not start/s);
  }
  const bad = await run(cmd, [...args, "--bogus"]);
  assertEquals(bad.code, 2);
  assertEquals(bad.stderr, "sinkhole: unknown argument --bogus\nsinkhole: hint: see sinkhole --help\n");
});

Deno.test("listener: errors at start name the address and the variable, give a hint, one format; exit 2 or 3", async () => {
  const [cmd, ...args] = startCommand();
  const base = { SINKHOLE_BIND_HOST: "127.0.0.1", SINKHOLE_HEALTH_PORT: "0", SINKHOLE_MODE: "defer", NO_COLOR: "1" };
  const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (taken.addr as Deno.NetAddr).port;
  try {
    for (const starttls of ["off", "on"]) {
      const r = await run(cmd, args, {
        env: { ...base, SINKHOLE_BIND_PORT: String(port), SINKHOLE_STARTTLS: starttls },
      });
      assertEquals(r.code, 3, `${starttls}: ${r.stderr}`);
      assertMatch(r.stderr, new RegExp(`^sinkhole: cannot listen for SMTP on 127\\.0\\.0\\.1:${port}: .*\\n`));
      assertMatch(r.stderr, /\nsinkhole: hint: another process listens on .*set SINKHOLE_BIND_PORT to another port\n$/);
      assert(!r.stdout.includes('"start"'), "no start line");
    }
    const health = await run(cmd, args, {
      env: { ...base, SINKHOLE_BIND_PORT: "0", SINKHOLE_HEALTH_HOST: "127.0.0.1", SINKHOLE_HEALTH_PORT: String(port) },
    });
    assertEquals(health.code, 3, health.stderr);
    assertMatch(health.stderr, new RegExp(`^sinkhole: cannot listen for the liveness port on 127\\.0\\.0\\.1:${port}`));
    assertMatch(health.stderr, /hint: .*set SINKHOLE_HEALTH_PORT to another port/);
  } finally {
    taken.close();
  }
  const config = await run(cmd, args, { env: { ...base, SINKHOLE_BIND_PORT: "99999" } });
  assertEquals(config.code, 2);
  assertMatch(config.stderr, /^sinkhole: SINKHOLE_BIND_PORT must be an integer from 0 to 65535, got "99999"\n/);
  assertMatch(config.stderr, /\nsinkhole: hint: see sinkhole --help/);
  const tls = await run(cmd, args, {
    env: { ...base, SINKHOLE_BIND_PORT: "0", SINKHOLE_STARTTLS: "on", SINKHOLE_TLS_CERT: "/nonexistent/c.pem" },
  });
  assertEquals(tls.code, 2, "a certificate without its key is a configuration error");
  const unreadable = await run(cmd, args, {
    env: {
      ...base,
      SINKHOLE_BIND_PORT: "0",
      SINKHOLE_STARTTLS: "on",
      SINKHOLE_TLS_CERT: "/nonexistent/c.pem",
      SINKHOLE_TLS_KEY: "/nonexistent/k.pem",
    },
  });
  assertEquals(unreadable.code, 3, unreadable.stderr);
  assertMatch(unreadable.stderr, /^sinkhole: cannot read the STARTTLS certificate or key \(\/nonexistent\/c\.pem/);
});

Deno.test("listener: a privileged port refused says so and what to do (the error as the OS gives it)", () => {
  // Tests run as root, where binding port 25 succeeds; the message is checked on the errors themselves.
  const denied = bindError("SMTP", "0.0.0.0", 25, "SINKHOLE_BIND_PORT", new Deno.errors.PermissionDenied("denied"));
  assertEquals(denied.exitCode, 3);
  assertMatch(denied.message, /^cannot listen for SMTP on 0\.0\.0\.0:25: PermissionDenied: denied$/);
  assertMatch(denied.hint, /ports below 1024 need root or CAP_NET_BIND_SERVICE; set SINKHOLE_BIND_PORT to 1024/);
  const nodeDenied = bindError(
    "SMTP",
    "0.0.0.0",
    25,
    "SINKHOLE_BIND_PORT",
    Object.assign(new Error("x"), { code: "EACCES" }),
  );
  assertMatch(nodeDenied.hint, /ports below 1024/);
  const away = bindError("SMTP", "10.9.9.9", 2525, "SINKHOLE_BIND_PORT", new Deno.errors.AddrNotAvailable("no"));
  assertMatch(away.hint, /10\.9\.9\.9 is not an address of this machine; set SINKHOLE_BIND_HOST/);
});

Deno.test("config: --dev's defaults lose to the environment; a relative mode file is absolute from INIT_CWD", () => {
  const env = (vars: Record<string, string>) => (k: string) => vars[k];
  const dev = configFromEnv(devEnvironment(env({}), "/repo"), "/elsewhere");
  assertEquals([dev.bindHost, dev.bindPort, dev.cacheTtlMs, dev.logFormat], ["127.0.0.1", 2525, 1000, "text"]);
  assertEquals([dev.modeSource, dev.modeFile], ["file", "/repo/sinkhole.mode"]);
  const mine = configFromEnv(
    devEnvironment(
      env({
        SINKHOLE_BIND_PORT: "2600",
        SINKHOLE_LOG_FORMAT: "json",
        SINKHOLE_MODE_FILE: "my.mode",
        INIT_CWD: "/home/me/work",
      }),
      "/repo",
    ),
    "/repo",
  );
  assertEquals([mine.bindPort, mine.logFormat, mine.modeFile], [2600, "json", "/home/me/work/my.mode"]);
  const fixed = configFromEnv(devEnvironment(env({ SINKHOLE_MODE: "accept" }), "/repo"));
  assertEquals([fixed.modeSource, fixed.staticMode], ["static", "accept"], "SINKHOLE_MODE is not overridden by --dev");
  const none = configFromEnv(devEnvironment(env({ SINKHOLE_MODE_FILE: "", SINKHOLE_MODE: "" }), "/repo"));
  assertEquals(none.modeSource, "ssm", "set empty: the environment still wins");
  assertEquals(configFromEnv(env({ SINKHOLE_MODE_FILE: "../m" }), "/a/b").modeFile, "/a/m");
  assertEquals(absolutePath("./x/../y//z", "/c"), "/c/y/z");
  assertEquals(absolutePath("/abs/./p", "/c"), "/abs/p");
  let refused = "";
  try {
    configFromEnv(env({ SINKHOLE_LOG_FORMAT: "xml" }));
  } catch (err) {
    refused = (err as Error).message;
  }
  assertEquals(refused, 'SINKHOLE_LOG_FORMAT must be json or text, got "xml"');
});

Deno.test("text logs: one readable line an event, wire text escaped, the same bound as a JSON line", () => {
  const at = new Date("2026-11-28T12:34:56.789Z");
  const cases: [LogEvent, string][] = [
    [
      {
        event: "session",
        client: "127.0.0.1:40000",
        helo: "mx.test",
        modes: ["defer"],
        transactions: [
          {
            mode: "greylist",
            from: "a@x.test",
            rcpts: [{ to: "b@y.test", code: 451 }, { to: "c@y.test", code: 250 }],
            size: 120,
            result: 250,
          },
        ],
        transactionCount: 1,
        replies: [220, 250, 250, 451, 250, 354, 250, 221],
        replyCount: 8,
        commands: 7,
        bytesIn: 300,
        bytesOut: 200,
        durationMs: 12,
      },
      '12:34:56.789 session 127.0.0.1:40000 helo="mx.test": [greylist] <a@x.test> → b@y.test 451, c@y.test 250; ' +
      "DATA 120 B → 250 — replies 220 250 250 451 250 354 250 221 (7 commands, 12 ms)",
    ],
    [
      {
        event: "session",
        client: "127.0.0.1:1",
        helo: "evil\u2028\x1b[31m",
        modes: [],
        transactions: [],
        transactionCount: 0,
        replies: [220],
        replyCount: 1,
        commands: 1,
        bytesIn: 1,
        bytesOut: 1,
        durationMs: 1,
        dropped: true,
      },
      '12:34:56.789 session 127.0.0.1:1 helo="evil\\u2028\\u001b[31m": no transaction — replies 220, dropped ' +
      "(1 commands, 1 ms)",
    ],
    [
      {
        event: "attempt",
        key: "a@x.test > b@y.test",
        attempt: 2,
        from: "a@x.test",
        rcpt: "b@y.test",
        stage: "rcpt",
        code: 451,
        client: "127.0.0.1:2",
        tls: false,
        mode: "defer first=2",
      },
      "12:34:56.789 attempt 2 of <a@x.test> → <b@y.test>: 451 at rcpt [defer first=2] from 127.0.0.1:2",
    ],
    [
      { event: "mode_invalid", source: "file:/r/sinkhole.mode", keeping: "defer", value: "bogus", reason: "no" },
      '12:34:56.789 mode refused: "bogus" from file:/r/sinkhole.mode: no; keeping "defer"',
    ],
    [
      { event: "stop", signal: "SIGINT", sessions: 0 },
      '12:34:56.789 stop signal="SIGINT" sessions=0',
    ],
  ];
  for (const [e, want] of cases) assertEquals(textLine(e, at), want);
  const huge = textLine({ event: "mode_error", source: "x", keeping: "defer", reason: "r".repeat(400_000) }, at);
  assert(new TextEncoder().encode(huge).length <= 256 * 1024, "bounded like a JSON line");
});

/** `deno task dev` from `cwd` with `env`; resolves with the text lines it printed so far, on demand. */
function dev(cwd: string, env: Record<string, string>) {
  // As from a person's shell: no INIT_CWD inherited (under `deno task test` it is set, and deno task keeps it).
  const { INIT_CWD: _, ...inherited } = Deno.env.toObject();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["task", "--config", `${ROOT}/deno.json`, "dev"],
    cwd,
    clearEnv: true,
    env: { ...inherited, NO_COLOR: "1", SINKHOLE_HEALTH_HOST: "127.0.0.1", SINKHOLE_HEALTH_PORT: "0", ...env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  const waiters: { re: RegExp; ok: (m: RegExpMatchArray) => void }[] = [];
  const pump = (async () => {
    let rest = "";
    for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
      rest += chunk;
      for (let nl; (nl = rest.indexOf("\n")) >= 0; rest = rest.slice(nl + 1)) {
        const line = rest.slice(0, nl);
        lines.push(line);
        for (const w of [...waiters]) {
          const m = line.match(w.re);
          if (m) waiters.splice(waiters.indexOf(w), 1), w.ok(m);
        }
      }
    }
  })();
  const stderr = new Response(child.stderr).text();
  const waitFor = (re: RegExp) => {
    for (const line of lines) {
      const m = line.match(re);
      if (m) return Promise.resolve(m);
    }
    return new Promise<RegExpMatchArray>((ok, fail) => {
      const t = setTimeout(() => fail(new Error(`no line ${re} in:\n${lines.join("\n")}`)), REPLY_WAIT_MS);
      waiters.push({ re, ok: (m) => (clearTimeout(t), ok(m)) });
    });
  };
  return { lines, waitFor, status: child.status, pump, stderr };
}

Deno.test("deno task dev: the environment wins, the mode file is where you stand, logs are text", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-dev-" });
  await Deno.writeTextFile(`${dir}/mine.mode`, "accept\n");
  // Port 0 (any free port) instead of the task's 2525: the start line says which, so an override is seen to win.
  const d = dev(dir, { SINKHOLE_BIND_PORT: "0", SINKHOLE_MODE_FILE: "mine.mode" });
  let pid = 0;
  try {
    const start = await d.waitFor(/ start: SMTP on 127\.0\.0\.1:(\d+), .* from file:(\S+) .* pid (\d+)$/);
    const port = Number(start[1]);
    pid = Number(start[3]);
    assert(port !== 2525 && port > 0, `bound ${port}: the environment's port, not the task's`);
    assertEquals(start[2], `${await Deno.realPath(dir)}/mine.mode`.replace(/^\/private/, ""));
    assertEquals(await transaction(port, { to: ["x@sinkhole.test"] }), [220, 250, 250, 250, 354, 250, 221]);
    const session = await d.waitFor(/ session 127\.0\.0\.1 helo="client\.test": \[accept\] <sender@origin\.test>/);
    assertMatch(session.input!, /→ x@sinkhole\.test 250; DATA \d+ B → 250 — replies 220 250 250 250 354 250 221 \(/);
    assert(!d.lines.some((l) => l.startsWith("{")), "no JSON at the terminal");
  } finally {
    if (pid) Deno.kill(pid, "SIGINT");
    await d.waitFor(/ stopped signal="SIGINT"/).catch(() => {});
    await d.status;
    await d.pump;
    await Deno.remove(dir, { recursive: true });
  }
  const json = dev(ROOT, { SINKHOLE_BIND_PORT: "0", SINKHOLE_LOG_FORMAT: "json", SINKHOLE_MODE: "defer" });
  try {
    const start = await json.waitFor(/^\{.*"event":"start".*"source":"static:defer".*"pid":(\d+)/);
    Deno.kill(Number(start[1]), "SIGTERM");
    assertEquals((await json.status).code, 0, await json.stderr);
  } finally {
    await json.pump;
  }
});

Deno.test("the listener's first run on a fresh clone downloads nothing (it uses no npm package)", async () => {
  const clone = await Deno.makeTempDir({ prefix: "sinkhole-fresh-" });
  const cache = await Deno.makeTempDir({ prefix: "sinkhole-denodir-" });
  try {
    for (const f of ["deno.json", "deno.lock", "listener.ts"]) await Deno.copyFile(`${ROOT}/${f}`, `${clone}/${f}`);
    const r = await new Deno.Command(Deno.execPath(), {
      args: ["task", "start", "--help"],
      cwd: clone,
      env: { DENO_DIR: cache, NO_COLOR: "1" },
    }).output();
    const stderr = new TextDecoder().decode(r.stderr);
    assertEquals(r.code, 0, stderr);
    assertEquals(stderr.split("\n").filter((l) => /Download/.test(l)), [], "no download line");
    assertEquals(await Deno.stat(`${clone}/node_modules`).then(() => true, () => false), false, "no node_modules");
  } finally {
    await Deno.remove(clone, { recursive: true });
    await Deno.remove(cache, { recursive: true });
  }
});
