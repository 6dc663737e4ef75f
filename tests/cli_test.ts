/**
 * The control CLI's grammar and contract, run in-process (ctl/ctl.ts `main` with captured
 * output): help for every command, usage errors, validation before any request, the exit
 * codes and the job summary on refusal and failure. What needs AWS is in ctl_test.ts
 * (moto); `rehearse --help` runs the task itself.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { run, taskCommand } from "../rig/helpers.ts";
import { main } from "../ctl/ctl.ts";
import { COMMANDS, EXIT, OPTIONS } from "../ctl/cli.ts";

/** Runs `ctl argv…` in-process; `env` is all it sees of its environment. */
async function ctl(argv: string[], env: Record<string, string> = {}) {
  const out: string[] = [];
  const err: string[] = [];
  const code = await main(argv, { out: (t) => out.push(t), err: (t) => err.push(t), env: (n) => env[n] });
  return { code, stdout: out.join("\n"), stderr: err.join("\n") };
}

/** What each command must offer, written out here rather than read from the table it tests. */
const EXPECTED_OPTIONS: Record<string, string[]> = {
  "status": ["--env", "--environments", "--json", "--tier", "--help"],
  "mode get": ["--env", "--environments", "--json", "--local", "--url", "--help"],
  "mode set": ["--env", "--environments", "--json", "--wait", "--local", "--url", "--help"],
  "probe": ["--env", "--environments", "--json", "--expect", "--timeout", "--help"],
  "cleanup": ["--env", "--environments", "--json", "--purge-queue", "--help"],
  "check": ["--env", "--environments", "--json", "--tier", "--mode-age", "--queue-age", "--no-github", "--help"],
  "report": ["--env", "--environments", "--json", "--file", "--since", "--message-id", "--local", "--url", "--help"],
  "expect": [
    "--env",
    "--environments",
    "--json",
    "--file",
    "--since",
    "--message-id",
    "--attempts",
    "--interval",
    "--delivered-once",
    "--within",
    "--local",
    "--url",
    "--help",
  ],
  "deploy": ["--env", "--environments", "--json", "--tag", "--help"],
};

Deno.test("ctl: --help and -h, for the CLI and for every command, list every option and the exit codes", async () => {
  for (const flag of ["--help", "-h"]) {
    const top = await ctl([flag]);
    assertEquals(top.code, EXIT.ok, top.stderr);
    for (const c of COMMANDS) assertMatch(top.stdout, new RegExp(`^  ${c.name}`, "m"));
    assertMatch(top.stdout, /^ {2}3 {2}failed/m);
  }
  assertEquals(Object.keys(EXPECTED_OPTIONS).sort(), COMMANDS.map((c) => c.name).sort());
  for (const c of COMMANDS) {
    for (const flag of ["--help", "-h"]) {
      const h = await ctl([...c.name.split(" "), flag]);
      assertEquals(h.code, EXIT.ok, `${c.name} ${flag}: ${h.stderr}`);
      assertMatch(h.stdout, new RegExp(`^usage: deno task ctl ${c.name}`));
      for (const o of EXPECTED_OPTIONS[c.name]) {
        assertMatch(h.stdout, new RegExp(`^  ${o}\\b`, "m"), `${c.name} --help lists ${o}`);
      }
      const listed = [...h.stdout.matchAll(/^ {2}(--[a-z-]+)/gm)].map((m) => m[1]);
      assertEquals(listed.sort(), [...EXPECTED_OPTIONS[c.name]].sort(), `${c.name}: no option beyond its own`);
      assertMatch(h.stdout, /^exit codes:/m);
    }
  }
  // Every option of the table belongs to some command (none is accepted and then ignored).
  for (const name of Object.keys(OPTIONS)) {
    assert(COMMANDS.some((c) => (c.options as readonly string[]).includes(name)), `--${name} belongs to a command`);
  }
});

Deno.test("ctl: usage mistakes are refused (exit 2) with a precise message, before anything is read", async () => {
  const cases: [string[], RegExp][] = [
    [[], /^usage: deno task ctl COMMAND/],
    [["bogus"], /refused: unknown command: bogus \(one of status, mode get, mode set/],
    [["bogus", "--env", "stage"], /unknown command: bogus/],
    [["mode"], /refused: mode needs get or set/],
    [["mode", "put", "x"], /unknown command: mode put \(mode get, mode set\)/],
    [["mode", "set", "--env", "stage"], /refused: mode set needs VALUE: the new mode/],
    [["expect", "--file", "x.jsonl"], /refused: expect needs MESSAGE/],
    [["status", "--env"], /refused: --env needs a value \(NAME\)/],
    [["status", "--env", "--json"], /refused: --env needs a value \(NAME\)/],
    [["status", "-x"], /refused: unknown option -x; see deno task ctl --help/],
    [["status", "--bogus"], /refused: unknown option --bogus/],
    [
      ["status", "--wait", "--env", "stage"],
      /refused: --wait does not apply to status; see deno task ctl status --help/,
    ],
    [["status", "--env", "a", "--env", "b"], /refused: --env is given twice/],
    [["status", "--json=yes", "--env", "a"], /refused: --json takes no value/],
    [["status", "extra", "--env", "a"], /refused: unexpected argument "extra" to status/],
    [["status"], /refused: status needs --env NAME/],
    [["report"], /refused: report reads either --file FILE\|- or --env NAME, exactly one/],
    [["report", "--file", "-", "--env", "stage"], /exactly one/],
    [["probe", "--timeout", "", "--env", "stage"], /refused: --timeout must not be empty \(SECONDS\)/],
    [["probe", "--timeout", " ", "--env", "stage"], /refused: --timeout must not be empty/],
    [
      ["probe", "--timeout", "abc", "--env", "stage"],
      /--timeout must be a number of seconds in \(0, 3600\], got "abc"/,
    ],
    [["probe", "--timeout", "0", "--env", "stage"], /--timeout must be a number of seconds in \(0, 3600\]/],
    [["probe", "--timeout", "-5", "--env", "stage"], /--timeout needs a value|--timeout must be a number/],
    [["probe", "--timeout=-5", "--env", "stage"], /--timeout must be a number of seconds in \(0, 3600\], got "-5"/],
    [["probe", "--timeout", "1e999", "--env", "stage"], /--timeout must be a number/],
    [["probe", "--timeout", "Infinity", "--env", "stage"], /--timeout must be a number/],
    [["probe", "--timeout", "3601", "--env", "stage"], /--timeout must be a number/],
    [["probe", "--expect", "lost", "--env", "stage"], /--expect must be one of queued, delivered, bounced, got "lost"/],
    [["check", "--mode-age", "NaN", "--env", "stage"], /--mode-age must be a number of minutes/],
    [["check", "--queue-age", "0x10", "--env", "stage"], /--queue-age must be a number of minutes/],
    [["check", "--tier", "maybe", "--env", "stage"], /--tier must be one of on, off, got "maybe"/],
    [["report", "--since", "0", "--file", "-"], /--since must be a number of minutes in \(0, 20160\]/],
    [["expect", "m", "--attempts", "3..1", "--file", "-"], /--attempts must be N or MIN\.\.MAX, got "3\.\.1"/],
    [["expect", "m", "--within", "-1", "--file", "-"], /--within needs a value|--within must be a number/],
    [["mode", "set", "accept;drop", "--env", "stage"], /refused: "accept;drop" is not a mode the listener accepts/],
  ];
  // An environments file that does not exist: a usage error must be found before it is read.
  const env = { SINKHOLE_ENVIRONMENTS: "/nonexistent/environments.json" };
  for (const [argv, want] of cases) {
    const r = await ctl(argv, env);
    assertEquals(r.code, EXIT.refused, `ctl ${argv.join(" ")}: ${r.stdout}${r.stderr}`);
    assertMatch(r.stderr, want, `ctl ${argv.join(" ")}`);
  }
});

Deno.test("ctl: the environments file is checked whole before any request; production and bad fields refused", async () => {
  const good = {
    region: "us-east-1",
    cluster: "cabal-mail",
    capacityProvider: "cp",
    vpcName: "v",
    privateSubnetNames: "s",
    sinkholeService: "s",
    imageTagParameter: "/p",
    mtaService: "m",
    mtaContainer: "c",
    mtaQueueDir: "/q",
    parameter: "/cabal/sinkhole_mode",
    sinkholeLogGroup: "/l",
    mtaLogGroup: "/m",
    namespace: "cabal.internal",
    cacheTtlSeconds: 30,
  };
  const cases: [unknown, RegExp][] = [
    ["{", /is not JSON/],
    [[], /must be an object of environments by name/],
    [{ stage: null }, /stage must be an object of fields/],
    [{ stage: { ...good, region: " " } }, /stage\.region must be a non-empty string/],
    [{ stage: { ...good, cacheTtlSeconds: "30" } }, /stage\.cacheTtlSeconds must be a non-empty number/],
    [{ stage: { ...good, cacheTtlSeconds: 1e9 } }, /cacheTtlSeconds must be in \(0, 3600\], got 1000000000/],
    [{ stage: { ...good, cacheTtlSeconds: 0 } }, /cacheTtlSeconds must be in \(0, 3600\]/],
    [{ stage: { ...good, sinkhole: true } }, /stage: unknown field\(s\) sinkhole/],
    [{ stage: good, prod: good }, /"prod" is production; it may not be listed at all/],
  ];
  const path = await Deno.makeTempFile({ prefix: "sinkhole-envs-", suffix: ".json" });
  try {
    for (const [content, want] of cases) {
      await Deno.writeTextFile(path, typeof content === "string" ? content : JSON.stringify(content));
      // No AWS endpoint is reachable from here: a request would fail with exit 3, not 2.
      const r = await ctl(["status", "--env", "stage"], { SINKHOLE_ENVIRONMENTS: path });
      assertEquals(r.code, EXIT.refused, `${JSON.stringify(content).slice(0, 80)}: ${r.stderr}`);
      assertMatch(r.stderr, want);
    }
    await Deno.writeTextFile(path, JSON.stringify({ stage: good }));
    const unknown = await ctl(["status", "--env", "staging"], { SINKHOLE_ENVIRONMENTS: path });
    assertEquals(unknown.code, EXIT.refused);
    assertMatch(unknown.stderr, /unknown environment "staging": one of stage/);
  } finally {
    await Deno.remove(path);
  }
});

Deno.test("ctl: exit codes 0, 1, 2 and 3, and a job summary on success, refusal and failure alike", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-cli-" });
  const summary = `${dir}/summary.md`;
  const log = `${dir}/sinkhole.jsonl`;
  const attempt = (n: number, stage: string, code: number, ts: string) =>
    JSON.stringify({
      ts,
      event: "attempt",
      key: "a@x.test > b@y.test",
      attempt: n,
      from: "a@x.test",
      rcpt: "b@y.test",
      stage,
      code,
      client: "127.0.0.1:1",
      mode: "x",
    });
  await Deno.writeTextFile(
    log,
    [attempt(1, "rcpt", 451, "2026-01-01T00:00:00.000Z"), attempt(2, "eod", 250, "2026-01-01T00:05:00.000Z")].join(
      "\n",
    ) + "\n",
  );
  const env = { GITHUB_STEP_SUMMARY: summary, SINKHOLE_ENVIRONMENTS: `${dir}/missing.json` };
  try {
    const ok = await ctl(["expect", "b@y.test", "--attempts", "2", "--delivered-once", "--file", log], env);
    assertEquals(ok.code, EXIT.ok, ok.stdout + ok.stderr);
    const unwanted = await ctl(["expect", "b@y.test", "--attempts", "3", "--file", log], env);
    assertEquals(unwanted.code, EXIT.unwanted, unwanted.stdout);
    assertMatch(unwanted.stdout, /^unmet: /m);
    const refused = await ctl(["status", "--env", "prod"], env);
    assertEquals(refused.code, EXIT.refused, refused.stderr);
    const missing = await ctl(["status", "--env", "stage"], env);
    assertEquals(missing.code, EXIT.failed, missing.stderr);
    assertMatch(missing.stderr, /^ctl: failed: cannot read the environments file .*missing\.json: /);
    const unreadable = await ctl(["report", "--file", `${dir}/nope.jsonl`], env);
    assertEquals(unreadable.code, EXIT.failed);
    assertMatch(unreadable.stderr, /failed: reading .*nope\.jsonl: /);
    const usage = await ctl(["probe", "--timeout", "", "--env", "stage"], env);
    assertEquals(usage.code, EXIT.refused);

    const text = await Deno.readTextFile(summary);
    assertMatch(text, /### sinkhole expect: ✅ met/);
    assertMatch(text, /### sinkhole expect: ⚠️ unmet/);
    assertMatch(text, /### ⛔ sinkhole status: prod: refused\n\n- "prod" is production/);
    assertMatch(text, /### ❌ sinkhole status: stage: failed\n\n- cannot read the environments file/);
    assertMatch(text, /### ❌ sinkhole report: failed\n\n- reading /);
    assertMatch(text, /### ⛔ sinkhole probe: stage: refused\n\n- --timeout must not be empty/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("rehearse: --help and -h print its usage; a bad option is refused with exit 2 and no stack trace", async () => {
  const [cmd, ...args] = taskCommand("rehearse");
  for (const flag of ["--help", "-h"]) {
    const r = await run(cmd, [...args, flag]);
    assertEquals(r.code, 0, r.stderr);
    assertMatch(r.stdout, /^usage: deno task rehearse \[--mode defer\|greylist\|bounce\] \[--offline\]/);
    assertMatch(r.stdout, /--offline/);
  }
  for (
    const [argv, want] of [[["--bogus"], /unknown option --bogus/], [["--mode", "drop"], /--mode must be/]] as const
  ) {
    const r = await run(cmd, [...args, ...argv]);
    assertEquals(r.code, 2);
    assertMatch(r.stderr, want);
    assert(!/ at |TypeError/.test(r.stderr), `no stack trace: ${r.stderr}`);
  }
});

Deno.test("ctl report/expect --file: a file of text-format lines is refused, saying the ledger reads JSON lines", async () => {
  const path = await Deno.makeTempFile({ suffix: ".log" });
  await Deno.writeTextFile(
    path,
    "22:42:47.937 attempt 1 of <a@x.test> → <b@y.test>: 250 at eod [accept] from 127.0.0.1\n",
  );
  try {
    // Not the listener's JSON log: nothing was measured, so neither 0 nor 1 (the MTA is not to blame): refused.
    for (const argv of [["report"], ["expect", "b@y.test", "--attempts", "1"]]) {
      const r = await ctl([...argv, "--file", path]);
      assertEquals(r.code, EXIT.refused, argv.join(" "));
      assertMatch(
        r.stderr,
        /holds no line of the listener's JSON log \(1 other line\(s\)\): the ledger reads the listener's JSON lines \(SINKHOLE_LOG_FORMAT=json\)/,
      );
    }
  } finally {
    await Deno.remove(path);
  }
});
