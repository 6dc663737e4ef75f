/**
 * The control port (listener.ts section 14, docs/control.md): its pure parts as tables (who
 * may call, the ledger's shape against ctl's, the byte bound), then over HTTP against the
 * listener as `deno task start` runs it: a mode confirmed only once in effect, the parser's
 * reason for a bad one, a body refused unread, and a test that is not Deno (Python's urllib,
 * real sendmail) driving it; the Python example of docs/control.md, run as printed.
 */
import {
  type AttemptEvent,
  bodyTooLarge,
  configFromEnv,
  controlAllows,
  type ControlAttempt,
  controlHistories,
  ControlLedger,
  KEPT_ENTRY_COST,
  MAX_CONTROL_BODY_BYTES,
  parseScenario,
} from "../listener.ts";
import { parse } from "yaml";
import { histories } from "../ctl/report.ts";
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import {
  assertTools,
  eventually,
  type Listener,
  needs,
  REPLY_WAIT_MS,
  ROOT,
  run,
  runCtl,
  startCommand,
  startListener,
  tempModeFile,
  transaction,
} from "../rig/helpers.ts";
import { makeSendmail, rigAddresses, SMTP_PORT } from "../rig/sendmail.ts";

/** The control port's base URL, from the listener's start line. */
function controlUrl(l: Listener): string {
  const start = l.logs.find((x) => x.event === "start") as { control?: string } | undefined;
  assert(start?.control, "the start line names the control port");
  return `http://${start.control}`;
}

async function call(base: string, method: string, path: string, body?: string) {
  const res = await fetch(`${base}${path}`, { method, body });
  return { status: res.status, body: await res.json() };
}

// ---------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------

Deno.test("control: bound to loopback, it answers loopback clients only; bound elsewhere, anyone", () => {
  const rows: [string, string, boolean][] = [
    ["127.0.0.1", "127.0.0.1", true],
    ["127.0.0.1", "127.45.3.2", true],
    ["127.0.0.1", "::ffff:127.0.0.1", true],
    ["127.0.0.1", "10.0.0.7", false],
    ["127.0.0.1", "::ffff:10.0.0.7", false],
    ["localhost", "192.168.1.2", false],
    ["::1", "::1", true],
    ["::1", "fe80::1", false],
    ["0.0.0.0", "172.17.0.1", true],
    ["10.0.0.5", "10.0.0.7", true],
  ];
  for (const [bind, client, want] of rows) assertEquals(controlAllows(bind, client), want, `${bind} ← ${client}`);
});

Deno.test("control: a body's declared length over MAX_CONTROL_BODY_BYTES is refused before it is read", () => {
  assertEquals(bodyTooLarge(null), false, "no length: read up to the bound");
  assertEquals(bodyTooLarge(String(MAX_CONTROL_BODY_BYTES)), false);
  assertEquals(bodyTooLarge(String(MAX_CONTROL_BODY_BYTES + 1)), true);
  assertEquals(bodyTooLarge(String(1024 * 1024)), true);
  assertEquals(bodyTooLarge("garbage"), true);
});

const ev = (ts: string, e: Partial<AttemptEvent>): ControlAttempt => ({
  event: "attempt",
  key: `${e.from ?? "a@o.test"} > ${e.rcpt ?? "r@sinkhole.test"}`,
  attempt: 1,
  from: "a@o.test",
  rcpt: "r@sinkhole.test",
  stage: "rcpt",
  client: "127.0.0.1",
  tls: false,
  mode: "defer first=2",
  ts,
  ...e,
} as ControlAttempt);

/** Attempts as the listener logs them: retries, a drop, Message-IDs, a duplicate delivery, a bounce, out of order. */
const EVENTS: ControlAttempt[] = [
  ev("2026-01-01T00:00:00.000Z", { code: 421 }),
  ev("2026-01-01T00:02:00.500Z", { attempt: 3, stage: "eod", code: 250, messageId: "<m1@o.test>" }),
  ev("2026-01-01T00:01:00.000Z", { attempt: 2, code: 421 }),
  ev("2026-01-01T00:00:30.000Z", { rcpt: "b@sinkhole.test", stage: "eod", dropped: true, messageId: "<m2@o.test>" }),
  ev("2026-01-01T00:03:30.000Z", {
    rcpt: "b@sinkhole.test",
    attempt: 2,
    stage: "eod",
    code: 250,
    messageId: "<m2@o.test>",
  }),
  ev("2026-01-01T00:04:00.000Z", { rcpt: "c@sinkhole.test", code: 550, mode: "bounce", tls: true }),
];

Deno.test("control: GET /attempts is what ctl report --json makes of the same attempts", () => {
  const same = (a: unknown) => JSON.parse(JSON.stringify(a));
  assertEquals(same(controlHistories(EVENTS)), same(histories(EVENTS)));
  const h = controlHistories(EVENTS);
  assertEquals(h.map((m) => m.rcpt), ["r@sinkhole.test", "b@sinkhole.test", "c@sinkhole.test"]);
  assertEquals(h[0].attempts.map((a) => [a.code, a.intervalS]), [[421, undefined], [421, 60], [250, 60.5]]);
  assertEquals([h[1].deliveries, h[1].duplicate], [2, true], "a drop after the dot, then a 250: twice");
  assertEquals(h[2].bounced, true);
  // The filters: an exact recipient, attempts since a time, messages carrying a Message-ID (brackets optional).
  assertEquals(controlHistories(EVENTS, { rcpt: "b@sinkhole.test" }).map((m) => m.rcpt), ["b@sinkhole.test"]);
  const since = controlHistories(EVENTS, { sinceMs: Date.parse("2026-01-01T00:01:00.000Z") });
  assertEquals(since.map((m) => m.attempts.length), [2, 1, 1]);
  assertEquals(controlHistories(EVENTS, { messageId: "m2@o.test" }).map((m) => m.rcpt), ["b@sinkhole.test"]);
  assertEquals(controlHistories(EVENTS, { messageId: "<m1@o.test>" }).map((m) => m.rcpt), ["r@sinkhole.test"]);
});

Deno.test("control: an envelope's messages are split where one was delivered, as ctl report splits them", () => {
  const twice = [
    ev("2026-01-01T00:00:00.000Z", { stage: "eod", code: 250, messageId: "<x1@o.test>" }),
    ev("2026-01-01T00:01:00.000Z", { attempt: 2, code: 421 }),
    ev("2026-01-01T00:02:00.000Z", { attempt: 3, stage: "eod", code: 250, messageId: "<x2@o.test>" }),
  ];
  const h = controlHistories(twice);
  assertEquals(JSON.parse(JSON.stringify(h)), JSON.parse(JSON.stringify(histories(twice))));
  assertEquals(h.map((m) => [m.attempts.length, m.deliveries, m.duplicate]), [[1, 1, false], [2, 1, false]]);
  assertEquals(controlHistories(twice, { messageId: "x2@o.test" }).map((m) => m.attempts.length), [2]);
});

Deno.test("control: the attempts it serves are bounded by MAX_CONTROL_LEDGER_BYTES, the newest kept", () => {
  const max = 8 * 1024;
  const ledger = new ControlLedger(max);
  const now = new Date("2026-01-01T00:00:00Z");
  for (let i = 0; i < 5000; i++) ledger.add(ev("", { rcpt: `r${i}@sinkhole.test`, code: 421 }), now);
  assert(ledger.bytes <= max, `${ledger.bytes} octets kept`);
  const kept = ledger.events();
  assertEquals(kept.length, ledger.size);
  assertEquals(kept.at(-1)!.rcpt, "r4999@sinkhole.test", "the newest is kept");
  assertEquals(ledger.forgotten + kept.length, 5000, "every attempt is kept or counted as forgotten");
  const line = JSON.stringify({ ...ev("", { rcpt: "r4999@sinkhole.test", code: 421 }), ts: now.toISOString() });
  assert(kept.length >= Math.floor(max / (line.length + KEPT_ENTRY_COST)), "the bound is used, not wasted");
  // Two octets a character when a string is not Latin-1 (V8's two-byte strings).
  const wide = new ControlLedger(max);
  for (let i = 0; i < 5000; i++) wide.add(ev("", { rcpt: `r${i}@пример.test`, code: 421 }), now);
  assert(wide.bytes <= max && wide.size < ledger.size, `${wide.size} wide entries, ${ledger.size} narrow`);
  ledger.clear();
  assertEquals([ledger.size, ledger.bytes, ledger.events()], [0, 0, []]);
});

// ---------------------------------------------------------------------------
// Over HTTP
// ---------------------------------------------------------------------------

Deno.test({
  name: "control: PUT /mode answers 200 only once the mode is in effect: the next session has it, every time",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    // The mode source says defer and is read every 0.2 s: the override must hold against it.
    const modeFile = await tempModeFile("defer");
    const l = await startListener({
      SINKHOLE_MODE_FILE: modeFile,
      SINKHOLE_CACHE_TTL: "0.2",
      SINKHOLE_CONTROL_PORT: "0",
    });
    try {
      const base = controlUrl(l);
      const start = l.events("start")[0];
      assertEquals(start.control!.split(":")[0], "127.0.0.1", "loopback unless told otherwise");
      const rounds = 40;
      for (let i = 0; i < rounds; i++) {
        const [mode, code] = i % 2 === 0 ? ["bounce", 550] : ["accept", 250];
        const put = await call(base, "PUT", "/mode", mode);
        assertEquals([put.status, put.body.mode, put.body.source], [200, mode, "control"]);
        // Right after the 200, no sleep: a new session sees the new mode at RCPT.
        const codes = await transaction(l.port, { host: l.host, to: ["x@sinkhole.test"] });
        assertEquals(codes[3], code, `round ${i}: ${mode}`);
      }
      const got = await call(base, "GET", "/mode");
      assertEquals(got.body, { mode: "accept", source: "control", stored: { mode: "defer" } });
      const back = await call(base, "DELETE", "/mode");
      assertEquals([back.status, back.body.mode, back.body.source], [200, "defer", `file:${modeFile}`]);
      assertEquals((await transaction(l.port, { host: l.host }))[3], 421, "the source's mode again");
    } finally {
      await l.stop();
      await Deno.remove(modeFile).catch(() => {});
    }
  },
});

Deno.test({
  name: "control: a bad mode gets the parser's reason and changes nothing; unknown paths and methods are said",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const l = await startListener({ SINKHOLE_MODE: "accept", SINKHOLE_CONTROL_PORT: "0" });
    try {
      const base = controlUrl(l);
      const before = await call(base, "GET", "/mode");
      for (const bad of ["defer first=0", "nonsense", "defer frist=2", ""]) {
        const put = await call(base, "PUT", "/mode", bad);
        assertEquals(put.status, 400, bad);
        assertEquals(put.body.error, parseScenario(bad), `the parser's own reason for ${JSON.stringify(bad)}`);
        assertEquals(await call(base, "GET", "/mode"), before);
      }
      assertEquals((await transaction(l.port, { host: l.host }))[3], 250, "still accept");
      assertEquals((await call(base, "GET", "/nowhere")).status, 404);
      assertEquals((await call(base, "POST", "/mode", "accept")).status, 405);
      assertEquals((await call(base, "GET", "/attempts?since=yesterday")).status, 400);
    } finally {
      await l.stop();
    }
  },
});

Deno.test({
  name: "control: a 1 MiB body gets 413 without being read whole (and a streamed one past the bound too)",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const l = await startListener({ SINKHOLE_MODE: "accept", SINKHOLE_CONTROL_PORT: "0" });
    try {
      const [host, port] = new URL(controlUrl(l)).host.split(":");
      const ask = async (head: string, body: Uint8Array) => {
        const conn = await Deno.connect({ hostname: host, port: Number(port) });
        try {
          await conn.write(new TextEncoder().encode(head));
          await conn.write(body);
          // Only part of what the length announced was sent: an answer proves it was not waited for.
          const buf = new Uint8Array(4096);
          let text = "";
          // The hang guard: a server waiting for the rest of the body never answers; close and fail.
          const guard = setTimeout(() => conn.close(), REPLY_WAIT_MS);
          try {
            while (!/\r\n\r\n[\s\S]*\}/.test(text)) {
              const n = await conn.read(buf);
              if (n === null) break;
              text += new TextDecoder().decode(buf.subarray(0, n));
            }
          } catch {
            /* closed by the guard */
          } finally {
            clearTimeout(guard);
          }
          return text;
        } finally {
          try {
            conn.close();
          } catch { /* closed by the guard */ }
        }
      };
      const mib = 1024 * 1024;
      const declared = await ask(
        `PUT /mode HTTP/1.1\r\nHost: x\r\nContent-Length: ${mib}\r\n\r\n`,
        new Uint8Array(1024).fill(0x61),
      );
      assertMatch(declared, /^HTTP\/1\.1 413 /);
      const chunk = new Uint8Array(MAX_CONTROL_BODY_BYTES + 1).fill(0x61);
      const streamed = await ask(
        "PUT /mode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        new Uint8Array([...new TextEncoder().encode(`${chunk.length.toString(16)}\r\n`), ...chunk, 13, 10]),
      );
      assertMatch(streamed, /^HTTP\/1\.1 413 /);
      assertEquals((await call(controlUrl(l), "GET", "/mode")).body.mode, "accept", "nothing changed");
    } finally {
      await l.stop();
    }
  },
});

Deno.test({
  name: "control: a removed mode file means defer until it exists again (a fresh start's answer), logged once",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const modeFile = await tempModeFile("accept");
    const l = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2" });
    try {
      assertEquals((await transaction(l.port, { host: l.host }))[3], 250);
      await Deno.remove(modeFile);
      const gone = await l.waitFor("mode_error", (e) => e.keeping === "defer");
      assertMatch(gone.reason, /no file .*: defer until it exists/);
      assertEquals((await transaction(l.port, { host: l.host }))[3], 421, "defer, not the last mode");
      await Deno.writeTextFile(modeFile, "accept\n");
      await l.waitFor("mode", (e) => e.mode === "accept" && e.previous === "defer");
      assertEquals(l.events("mode_error").length, 1, "said once");
    } finally {
      await l.stop();
      await Deno.remove(modeFile).catch(() => {});
    }
  },
});

Deno.test({
  name: "control: ctl report, expect and mode get --local read the listener's control port",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const l = await startListener({ SINKHOLE_MODE: "accept", SINKHOLE_CONTROL_PORT: "0" });
    try {
      const url = controlUrl(l);
      const set = await runCtl(["mode", "set", "defer first=1", "--local", "--url", url]);
      assertEquals(set.code, 0, set.stderr);
      assertMatch(set.stdout, /in effect: defer first=1 \(from control\)/);
      for (let i = 0; i < 2; i++) await transaction(l.port, { host: l.host, to: ["ctl@sinkhole.test"] });
      const served = (await call(url, "GET", "/attempts")).body;
      const report = await runCtl(["report", "--local", "--url", url, "--json"]);
      assertEquals(report.code, 0, report.stderr);
      assertEquals(JSON.parse(report.stdout), served, "ctl report --json --local prints what GET /attempts serves");
      const met = await runCtl([
        "expect",
        "ctl@sinkhole.test",
        "--attempts",
        "2",
        "--delivered-once",
        "--local",
        "--url",
        url,
      ]);
      assertEquals(met.code, 0, met.stdout + met.stderr);
      const unmet = await runCtl(["expect", "ctl@sinkhole.test", "--attempts", "3", "--local", "--url", url]);
      assertEquals(unmet.code, 1, unmet.stdout + unmet.stderr);
      const got = await runCtl(["mode", "get", "--local", "--url", url]);
      assertMatch(got.stdout, /stored: {4}accept/);
      const both = await runCtl(["report", "--local", "--file", "x.jsonl"]);
      assertEquals(both.code, 2, "one source only");
      const nobody = await runCtl(["mode", "get", "--local", "--url", "http://127.0.0.1:1"]);
      assertEquals(nobody.code, 3);
      assertMatch(nobody.stderr, /no control port answers at http:\/\/127\.0\.0\.1:1/);
    } finally {
      await l.stop();
    }
  },
});

const python = needs("python3");

Deno.test({
  name: "control: docs/control.md's Python test, run as printed against the listener",
  ignore: python.ignore,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    assertTools(python.missing);
    const doc = await Deno.readTextFile(`${ROOT}/docs/control.md`);
    const block = /```python\n([\s\S]*?)```/.exec(doc)?.[1];
    assert(block, "docs/control.md holds a Python block");
    const l = await startListener({ SINKHOLE_MODE: "defer", SINKHOLE_CONTROL_PORT: "0" });
    try {
      const r = await run("python3", ["-c", block], {
        env: { SINKHOLE_CONTROL_URL: controlUrl(l), SINKHOLE_SMTP_HOST: l.host, SINKHOLE_SMTP_PORT: String(l.port) },
      });
      assertEquals([r.code, r.stdout.trim()], [0, "ok"], r.stderr);
    } finally {
      await l.stop();
    }
  },
});

const mtaTools = needs("python3", "/usr/sbin/sendmail", "makemap", "m4", "unshare", "/usr/share/sendmail/cf/m4/cf.m4");

Deno.test({
  name: "control: Python drives it over HTTP only, real sendmail delivers: 421, 421, 250, a clean slate, twice",
  ignore: mtaTools.ignore || (Deno.uid() !== 0 && !Deno.env.get("CI")),
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    assertTools(mtaTools.missing);
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-control-" });
    const at = rigAddresses();
    const mta = await makeSendmail(dir, at.mta, `sinkhole.test smtp:[${at.sink}]\n`);
    // The mode the Python test starts from is not the one it needs: it must set it itself.
    const sink = await startListener({ SINKHOLE_MODE: "bounce", SINKHOLE_CONTROL_PORT: "0" }, {
      host: at.sink,
      port: SMTP_PORT,
    });
    try {
      const r = await run("python3", [`${ROOT}/tests/control.py`], {
        env: { SINKHOLE_CONTROL_URL: controlUrl(sink), SENDMAIL: `${mta.bin}/sendmail`, PATH: Deno.env.get("PATH")! },
      });
      assertEquals(r.code, 0, `${r.stdout}\n${r.stderr}`);
      const out = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
      assertEquals(out.rounds.map((round: [number[]]) => round[0]), [[421, 421, 250], [421, 421, 250]]);
      assertEquals(out.invalid, parseScenario("defer first=0"));
      // What Python was told is what was said on the wire: the listener's own log agrees.
      const codes = sink.events("attempt").map((e) => e.code);
      assertEquals(codes, [421, 421, 250, 421, 421, 250]);
      await eventually(() => sink.events("session").length >= 6);
    } finally {
      await mta.kill().catch(() => {});
      await sink.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

// ---------------------------------------------------------------------------
// `deno task dev` as a user runs it: fixed ports (2525, 2580), so in a network namespace of
// the test's own (`unshare --net`: its own loopback), never shared with another run.
// ---------------------------------------------------------------------------

const netns = needs("unshare", "ip", "swaks");

/** Runs a bash script in a network namespace of its own, from the repository; what it printed. */
function inPrivateNetwork(script: string, args: string[] = []) {
  return run("unshare", ["--net", "bash", "-c", `ip link set lo up\ncd '${ROOT}'\n${script}`, "netns", ...args], {
    env: { PATH: Deno.env.get("PATH")!, HOME: Deno.env.get("HOME") ?? "/root", NO_COLOR: "1" },
  });
}

/** Bash: start `$cmd` in the background logging to `$log`, and wait (bounded) for its start line. */
const START_DEV = `
start_dev() { # log, then the command's words
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  for _ in $(seq 1 1200); do grep -q " start: " "$log" && return 0; kill -0 $! 2>/dev/null || break; sleep 0.05; done
  echo "no start line in $log:"; cat "$log"; return 1
}
`;

Deno.test({
  name: "control: the README's quick start, run exactly as printed and as one block, succeeds",
  ignore: netns.ignore || Deno.uid() !== 0,
  fn: async () => {
    assertTools(netns.missing);
    const readme = await Deno.readTextFile(`${ROOT}/README.md`);
    const quick = readme.slice(readme.indexOf("## Quick start"), readme.indexOf("## Using it in your tests"));
    const blocks = [...quick.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]);
    assertEquals(blocks.length, 2, "the listener's terminal, then the other terminal's block");
    const devLine = blocks[0].split("\n")[0].replace(/#.*$/, "").trim();
    assertEquals(devLine, "deno task dev");
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-quickstart-" });
    try {
      const r = await inPrivateNetwork(
        `${START_DEV}
start_dev "$1/dev.log" ${devLine} || exit 99
bash -e -c "$2" > "$1/block.log" 2>&1; rc=$?
kill -INT %1; wait %1
exit $rc`,
        [dir, blocks[1]],
      );
      const block = await Deno.readTextFile(`${dir}/block.log`).catch(() => "");
      const dev = await Deno.readTextFile(`${dir}/dev.log`).catch(() => "");
      assertEquals(r.code, 0, `${r.stdout}${r.stderr}\n--- block:\n${block}\n--- dev:\n${dev}`);
      assertMatch(block, /<- {2}250 2\.0\.0 Message accepted/, "swaks delivered in accept, first time");
      assertMatch(dev, / mode "accept" \(was "defer"\) from control\n/);
      assertMatch(dev, / attempt 1 of <[^>]+> → <anything@sinkhole\.test>: 250 at eod \[accept\]/);
      assertMatch(dev, / mode "defer reply="451 4\.7\.1 try later"" \(was "accept"\) from control\n/);
      assertMatch(dev, /control on http:\/\/127\.0\.0\.1:2580,/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "control: two deno task dev on different SMTP ports start side by side (free liveness and control ports)",
  ignore: netns.ignore || Deno.uid() !== 0,
  fn: async () => {
    assertTools(netns.missing);
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-twodev-" });
    try {
      const r = await inPrivateNetwork(
        `${START_DEV}
start_dev "$1/a.log" deno task dev || exit 98
SINKHOLE_BIND_PORT=2600 start_dev "$1/b.log" deno task dev || exit 99
kill -INT %1 %2; wait`,
        [dir],
      );
      const [a, b] = [await Deno.readTextFile(`${dir}/a.log`), await Deno.readTextFile(`${dir}/b.log`)];
      assertEquals(r.code, 0, `${r.stdout}${r.stderr}\n--- a:\n${a}\n--- b:\n${b}`);
      const start = (log: string) =>
        / start: SMTP on ([\d.:]+), health on ([\d.:]+), control on http:\/\/([\d.:]+),/.exec(log);
      const [sa, sb] = [start(a), start(b)];
      assert(sa && sb, `both started:\n${a}\n${b}`);
      assertEquals([sa[1], sa[3]], ["127.0.0.1:2525", "127.0.0.1:2580"], "the first: dev's ports");
      assertEquals(sb[1], "127.0.0.1:2600");
      assert(sb[3] !== sa[3] && sb[2] !== sa[2], `its own liveness and control ports: ${sb[2]}, ${sb[3]}`);
      assert(!/ 8025\b/.test(a + b), "never the image's fixed liveness port");
      for (const log of [a, b]) assertMatch(log, / stopped signal="SIGINT"/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "control: the container examples' environment works with the image's entrypoint command (tasks.start)",
  ignore: netns.ignore || Deno.uid() !== 0,
  fn: async () => {
    assertTools(netns.missing);
    const doc = await Deno.readTextFile(`${ROOT}/docs/control.md`);
    const yaml = /```yaml\n([\s\S]*?)```/.exec(doc)?.[1];
    const docker = /^docker run .*$/m.exec(doc)?.[0];
    assert(yaml && docker, "docs/control.md has the services block and the docker run line");
    const service = parse(yaml).services.sinkhole as { env: Record<string, string>; ports: string[] };
    const dockerEnv = Object.fromEntries([...docker.matchAll(/ -e ([A-Z_]+)=(\S+)/g)].map((m) => [m[1], m[2]]));
    assertEquals(dockerEnv, service.env, "the two examples set the same environment");
    assertEquals(service.ports, ["127.0.0.1:2525:2525", "127.0.0.1:2580:2580"]);
    // Off in the image's own environment: the Dockerfile sets none of it, and no variable means no port.
    assert(!(await Deno.readTextFile(`${ROOT}/Dockerfile`)).includes("SINKHOLE_CONTROL"), "the image leaves it off");
    assertEquals(configFromEnv(() => undefined).controlPort, undefined);
    // The image runs the compiled tasks.start with no argument (ENTRYPOINT ["/sinkhole"]) and only this environment.
    const entry = startCommand().map((w) => `'${w}'`).join(" ");
    const envArgs = Object.entries(service.env).map(([k, v]) => `'${k}=${v}'`).join(" ");
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-container-" });
    try {
      const r = await inPrivateNetwork(
        `env -i ${envArgs} ${entry} > "$1/listener.log" 2>&1 &
for _ in $(seq 1 1200); do grep -q '"event":"start"' "$1/listener.log" && break; sleep 0.05; done
set -e
curl -sf -X PUT --data 'defer first=1' http://127.0.0.1:2580/mode
swaks --server 127.0.0.1:2525 --to ci@sinkhole.test > /dev/null || true
swaks --server 127.0.0.1:2525 --to ci@sinkhole.test > /dev/null
curl -sf 'http://127.0.0.1:2580/attempts?rcpt=ci@sinkhole.test' > "$1/attempts.json"
env -i ${envArgs} ${entry} --healthcheck
kill -TERM %1; wait %1`,
        [dir],
      );
      const log = await Deno.readTextFile(`${dir}/listener.log`).catch(() => "");
      assertEquals(r.code, 0, `${r.stdout}${r.stderr}\n--- listener:\n${log}`);
      const start = log.split("\n").map((l) => JSON.parse(l || "null")).find((e) => e?.event === "start");
      assertEquals([start.bind, start.control, start.health], ["0.0.0.0:2525", "0.0.0.0:2580", "127.0.0.1:8025"]);
      assertEquals(start.source, "static:defer", "the mode from the environment, no SSM");
      const attempts = JSON.parse(await Deno.readTextFile(`${dir}/attempts.json`));
      assertEquals(attempts[0].attempts.map((a: { code: number }) => a.code), [421, 250]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
