/**
 * The control CLI against moto_server with the real AWS SDK (SSM, ECS, CloudWatch Logs,
 * Cloud Map). Fakes, said so: ECS Exec is replaced by a local shell in front of a real
 * sendmail (moto has no ExecuteCommand); GitHub's API is a local HTTP double that records
 * requests (@octokit/rest with a custom base URL). Listener log lines reach CloudWatch Logs
 * through a small shipper standing in for the awslogs driver.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, eventually, needs, ROOT, run, runCtl } from "../rig/helpers.ts";
import { AWS_ENV, awsCli, awsCliAs, awsTest, seedCabalAccount, shipLogs } from "../rig/aws.ts";
import { makeSendmail, rigAddresses, SMTP_PORT } from "../rig/sendmail.ts";
import * as commands from "../ctl/commands.ts";
import { parseEnvironments } from "../ctl/environments.ts";
import { ecsExec, type Exec, EXEC_NO_RESULT } from "../ctl/exec.ts";
import { github } from "../ctl/github.ts";

const sendmailTools = needs("/usr/sbin/sendmail", "makemap", "m4", "unshare", "/usr/share/sendmail/cf/m4/cf.m4");
const CLUSTER = "cabal-test";
const ENVIRONMENTS = {
  development: {
    region: "us-east-1",
    cluster: CLUSTER,
    capacityProvider: "cabal-ec2",
    vpcName: "cabal-vpc",
    privateSubnetNames: "cabal-private-subnet-*",
    sinkholeService: "cabal-sinkhole",
    imageTagParameter: "/cabal/deployed_image_tag/sinkhole",
    mtaService: "cabal-smtp-out",
    mtaContainer: "smtp-out",
    mtaQueueDir: "/var/spool/mqueue",
    parameter: "/cabal/sinkhole_mode",
    sinkholeLogGroup: "/ecs/cabal-sinkhole",
    mtaLogGroup: "/ecs/cabal-smtp-out",
    namespace: "cabal.internal",
    cacheTtlSeconds: 1,
  },
};

/** Cabalmail's account (rig/aws.ts, cited there) in development, with two MTA tasks and the tier in defer. */
const seed = (endpoint: string) =>
  seedCabalAccount((...a: string[]) => awsCli(endpoint, ...a), {
    cluster: CLUSTER,
    region: "us-east-1",
    environment: "development",
    mode: "defer",
    imageTag: "sha-1234abcd",
    mtaTasks: 2,
  });

/**
 * An environments file; `cacheTtlSeconds` sets how long `mode set --wait` waits (TTL + 10 s).
 * The listener under test polls every second whatever the file says, so a wait that must
 * succeed gets a long TTL (a wide margin on a busy machine: logs reach moto through the
 * aws CLI), and the wait that must time out keeps a short one.
 */
async function envFile(cacheTtlSeconds = ENVIRONMENTS.development.cacheTtlSeconds): Promise<string> {
  const path = await Deno.makeTempFile({ prefix: "sinkhole-envs-", suffix: ".json" });
  await Deno.writeTextFile(
    path,
    JSON.stringify({ development: { ...ENVIRONMENTS.development, cacheTtlSeconds } }),
  );
  return path;
}
/** The TTL the file claims when a `--wait` must succeed. */
const PATIENT_TTL_S = 110;

/** Runs `deno task ctl …` as a subprocess, as a workflow does. */
function ctl(endpoint: string, file: string, ...args: string[]) {
  return runCtl(args, {
    ...AWS_ENV,
    AWS_ENDPOINT_URL: endpoint,
    SINKHOLE_ENVIRONMENTS: file,
    SINKHOLE_CTL_POLL_MS: "200",
    GITHUB_TOKEN: "",
  });
}

awsTest("ctl: production is refused by every command before any request (zero requests at moto)", async ({ proxy }) => {
  const file = await envFile();
  const prodFile = await Deno.makeTempFile({ suffix: ".json" });
  await Deno.writeTextFile(prodFile, JSON.stringify({ ...ENVIRONMENTS, production: ENVIRONMENTS.development }));
  try {
    const commandsToTry = [
      ["status"],
      ["mode", "get"],
      ["mode", "set", "accept", "--wait"],
      ["probe", "--expect", "queued"],
      ["cleanup", "--purge-queue"],
      ["check"],
    ];
    for (const c of commandsToTry) {
      for (const name of ["prod", "production", "Production", " PROD "]) {
        const res = await ctl(proxy.url, file, ...c, "--env", name);
        assertEquals(res.code, 2, `${c.join(" ")} --env ${name}: ${res.stderr}`);
        assertMatch(res.stderr, /refused: .* is production/);
      }
      const viaFile = await ctl(proxy.url, prodFile, ...c, "--env", "development");
      assertEquals(viaFile.code, 2, "an environments file that lists production is refused whole");
      assertMatch(viaFile.stderr, /"production" is production; it may not be listed at all/);
    }
    assertEquals(proxy.total, 0, "no request reached AWS");
    const invalid = await ctl(proxy.url, file, "mode", "set", "accept;drop", "--env", "development");
    assertEquals(invalid.code, 2);
    assertMatch(invalid.stderr, /not a mode the listener accepts/);
    assertEquals(proxy.total, 0, "an invalid mode is refused before SSM too");
  } finally {
    await Deno.remove(file);
    await Deno.remove(prodFile);
  }
});

awsTest("ctl: status and mode set --wait against moto and a running listener", async ({ moto, listen }) => {
  const file = await envFile(PATIENT_TTL_S);
  const impatient = await envFile();
  let shipper: { stop: () => Promise<void> } | undefined;
  try {
    await seed(moto.url);
    const st = await ctl(moto.url, file, "status", "--env", "development", "--json");
    assertEquals(st.code, 0, st.stderr);
    const status = JSON.parse(st.stdout);
    assertEquals(status.tier.exists, true);
    assertEquals(status.tier.desired, 1);
    assertEquals(status.mode.value, "defer");
    assertEquals(status.cloudMapInstances, 1);
    assert(Array.isArray(status.health), "task health is reported");
    assert(typeof status.mode.changedBy === "string");

    const l = await listen({
      ...AWS_ENV,
      AWS_ENDPOINT_URL: moto.url,
      SINKHOLE_MODE: "",
      SINKHOLE_MODE_FILE: "",
      SINKHOLE_CACHE_TTL: "1",
    });
    shipper = shipLogs(l, moto.url, "/ecs/cabal-sinkhole");
    const set = await ctl(moto.url, file, "mode", "set", "accept", "--wait", "--env", "development");
    assertEquals(set.code, 0, set.stdout + set.stderr);
    assertMatch(set.stdout, /the listener logged mode accept after \d+ s/);
    const get = await ctl(moto.url, file, "mode", "get", "--env", "development");
    assertMatch(get.stdout, /mode stored: "accept" \(version 2, changed .* by /);
    // Stored and in effect side by side: a value the listener refuses is never shown as in effect.
    await awsCli(moto.url, "ssm", "put-parameter", "--name", PARAM_NAME, "--value", "bogus", "--overwrite");
    await l.waitFor("mode_invalid", (x) => x.value === "bogus");
    await eventually(
      async () => {
        const r = await ctl(moto.url, file, "status", "--env", "development");
        return /mode in effect: "accept" .*; it refused "bogus"/.test(r.stdout);
      },
      120_000,
      500,
    );
    const both = await ctl(moto.url, file, "mode", "get", "--env", "development");
    assertMatch(both.stdout, /mode stored: "bogus" \(version 3, .*\) — the listener refuses it: /);
    assertMatch(both.stdout, /mode in effect: "accept" \(the listener's line at .*\); it refused "bogus": /);
    // The MTA tasks here cannot be reached by ECS Exec (no session-manager-plugin): the check says what it
    // found before that, and fails (exit 3) instead of calling the rest clean.
    const flagged = await ctl(moto.url, file, "check", "--no-github", "--env", "development");
    assertEquals(flagged.code, 3, flagged.stdout + flagged.stderr);
    assertMatch(flagged.stdout, /the stored mode "bogus" .* is refused by the listener, which keeps its previous mode/);
    assertMatch(flagged.stdout, /failed: ExecError: counting in /);

    await shipper.stop();
    shipper = undefined;
    const summary = await Deno.makeTempFile();
    const unseen = await run(
      Deno.execPath(),
      ["run", "--allow-all", `${ROOT}/ctl/ctl.ts`, "mode", "set", "bounce", "--wait", "--env", "development"],
      {
        env: {
          ...AWS_ENV,
          AWS_ENDPOINT_URL: moto.url,
          SINKHOLE_ENVIRONMENTS: impatient,
          SINKHOLE_CTL_POLL_MS: "500",
          GITHUB_STEP_SUMMARY: summary,
        },
      },
    );
    assertEquals(unseen.code, 1, "not confirmed: said so");
    assertMatch(unseen.stdout, /not seen in \/ecs\/cabal-sinkhole within 11 s/);
    assertMatch(await Deno.readTextFile(summary), /^### ⚠️ sinkhole mode: development\n\n- mode set to bounce/);
    await Deno.remove(summary);
  } finally {
    await shipper?.stop();
    await Deno.remove(file);
    await Deno.remove(impatient);
  }
});

/** A local HTTP double of GitHub's issues API that records requests. */
function githubDouble() {
  const issues: { number: number; title: string; body: string; state: string; labels: { name: string }[] }[] = [];
  const requests: string[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const url = new URL(req.url);
    requests.push(`${req.method} ${url.pathname}`);
    const body = req.body ? await req.json().catch(() => ({})) : {};
    const m = /^\/repos\/cabal\/mail\/issues(?:\/(\d+)(\/comments)?)?$/.exec(url.pathname);
    if (!m) return new Response("not found", { status: 404 });
    const json = (data: unknown, status = 200) => Response.json(data, { status });
    if (req.method === "GET" && !m[1]) {
      const label = url.searchParams.get("labels");
      return json(
        issues.filter((i) => i.state === url.searchParams.get("state") && i.labels.some((l) => l.name === label)),
      );
    }
    if (req.method === "POST" && !m[1]) {
      const issue = {
        number: issues.length + 1,
        title: body.title,
        body: body.body,
        state: "open",
        labels: (body.labels ?? []).map((name: string) => ({ name })),
      };
      issues.push(issue);
      return json(issue, 201);
    }
    const issue = issues.find((i) => i.number === Number(m[1]));
    if (!issue) return new Response("not found", { status: 404 });
    if (req.method === "POST" && m[2]) return json({ id: 1, body: body.body }, 201);
    if (req.method === "PATCH") {
      Object.assign(issue, body);
      return json(issue);
    }
    return new Response("unexpected", { status: 400 });
  });
  return { url: `http://127.0.0.1:${server.addr.port}`, issues, requests, close: () => server.shutdown() };
}

/**
 * How long a probe may wait for its expected state: logs reach CloudWatch (moto) through
 * the aws CLI, slow on a busy machine. A met expectation returns at once.
 */
const PROBE_WAIT_MS = 120_000;

awsTest(
  "ctl: probe, cleanup and check with real sendmail behind the exec interface and a GitHub double",
  async ({ moto, listen }, t) => {
    assertTools(sendmailTools.missing);
    assert(Deno.uid() === 0, "the sendmail part needs root (CI runs as root)");
    const gh = githubDouble();
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-ctl-" });
    let shipper: { stop: () => Promise<void> } | undefined;
    const at = rigAddresses();
    const mta = await makeSendmail(dir, at.mta, `sinkhole.test smtp:[${at.sink}]\n`);
    try {
      await seed(moto.url);
      await mta.start();
      Deno.env.set("AWS_ENDPOINT_URL", moto.url);
      for (const [k, val] of Object.entries(AWS_ENV)) Deno.env.set(k, val);
      const l = await listen(
        {
          ...AWS_ENV,
          AWS_ENDPOINT_URL: moto.url,
          SINKHOLE_MODE: "",
          SINKHOLE_MODE_FILE: "",
          SINKHOLE_CACHE_TTL: "0.3",
        },
        { host: at.sink, port: SMTP_PORT },
      );
      shipper = shipLogs(l, moto.url, "/ecs/cabal-sinkhole");
      const env = {
        ...parseEnvironments(JSON.stringify(ENVIRONMENTS)).get("development")!,
        mtaQueueDir: mta.queueDir,
      };
      /** Stands in for ECS Exec: every MTA task is the local test sendmail. */
      const exec: Exec = {
        run: async (_task, command) => {
          const res = await run("sh", ["-c", command], {
            env: { PATH: `${mta.bin}:${Deno.env.get("PATH")}` },
          });
          return { code: res.code, output: res.stdout + res.stderr };
        },
      };
      const deps: commands.Deps = {
        env,
        ...commands.clients(env),
        exec,
        issue: github({ token: "test-token", repository: "cabal/mail", baseUrl: gh.url }).reconcile,
        now: Date.now,
        sleep: (ms) => new Promise((ok) => setTimeout(ok, ms)),
        pollMs: 300,
      };
      const setMode = async (mode: string) => {
        await commands.modeSet(deps, commands.validateMode(mode), false);
        await eventually(() => l.logs.findLast((x) => x.event === "mode")?.mode === mode);
      };

      await t.step("probe --expect queued in defer", async () => {
        const r = await commands.probe(deps, "queued", PROBE_WAIT_MS);
        assert(r.ok, r.lines.join("\n"));
        const results = r.data.results as { outcome: string; sinkholeCodes: number[] }[];
        assertEquals(results.length, 2, "one probe through each running MTA task");
        assert(results.every((x) => x.sinkholeCodes.includes(421)), JSON.stringify(results));
      });

      await t.step("probe --expect delivered in accept, bounced in bounce", async () => {
        await setMode("accept");
        const delivered = await commands.probe(deps, "delivered", PROBE_WAIT_MS);
        assert(delivered.ok, delivered.lines.join("\n"));
        assert(
          delivered.lines.some((x) => /; [1-9]\d* attempt\(s\) in the ledger$/.test(x)),
          `the probe reads the retry ledger (delivered exactly once): ${delivered.lines.join("\n")}`,
        );
        await setMode("bounce");
        const bounced = await commands.probe(deps, "bounced", PROBE_WAIT_MS);
        assert(bounced.ok, bounced.lines.join("\n"));
        const wrong = await commands.probe(deps, "delivered", 1_000);
        assert(!wrong.ok, "an unmet expectation is reported");
        assertMatch(wrong.lines.at(-1)!, /expected delivered on every task: not met/);
      });

      await t.step("check: findings open one issue, a second run updates it", async () => {
        await setMode("defer");
        await mta.sendmailWith("Subject: stale\n\nold\n", "-oi", "-f", "t@sinkhole.test", "stale@sinkhole.test");
        await eventually(async () => (await mta.mailq()).includes("stale@sinkhole.test"), 60_000, 200);
        await run("sh", ["-c", `touch -d '3 hours ago' '${mta.queueDir}'/qf*`]);
        await commands.modeSet(deps, commands.validateMode("accept"), false);
        const first = await commands.check(deps, { modeAgeMs: 0, queueAgeMs: 60 * 60_000 });
        assert(!first.ok);
        const findings = first.data.findings as string[];
        assert(findings.some((f) => /mode is `accept`/.test(f)), findings.join("\n"));
        assert(
          findings.some((f) => /sinkhole\.test message\(s\) queued for more than 60 min/.test(f)),
          findings.join("\n"),
        );
        assertEquals((first.data.issue as { action: string }).action, "opened");
        const second = await commands.check(deps, { modeAgeMs: 0, queueAgeMs: 60 * 60_000 });
        assertEquals((second.data.issue as { action: string }).action, "updated");
        assertEquals(gh.issues.length, 1, "updated, not duplicated");
        assertEquals(gh.issues[0].labels.map((x) => x.name), ["sinkhole-check"]);
        assertMatch(gh.issues[0].body, /queued for more than 60 min/);
        const flagOff = await commands.check({ ...deps, tier: false, issue: undefined }, {
          modeAgeMs: 0,
          queueAgeMs: 60 * 60_000,
        });
        assert(
          (flagOff.data.findings as string[]).some((f) => /runs \(desired 1.*although the flag is off/.test(f)),
          flagOff.lines.join("\n"),
        );
      });

      await t.step(
        "cleanup --purge-queue, then check closes the issue; the tier's desired count is left alone",
        async () => {
          const r = await commands.cleanup(deps, { purgeQueue: true });
          assert(r.ok);
          assert(r.lines.some((x) => /removed [1-9]\d* queued sinkhole\.test message/.test(x)), r.lines.join("\n"));
          assert(!(await mta.mailq()).includes("sinkhole.test"), "the queue holds no sinkhole.test mail");
          assertEquals(((await commands.modeGet(deps)).data.mode as { value: string }).value, "defer");
          // The desired count belongs to the Terraform that owns the service (QUIESCED): cleanup never changes it.
          assertEquals(((await commands.status(deps)).data.tier as { desired: number }).desired, 1);
          const clean = await commands.check(deps, { modeAgeMs: 0, queueAgeMs: 0 });
          assert(clean.ok, clean.lines.join("\n"));
          assertEquals((clean.data.issue as { action: string }).action, "closed");
          assertEquals(gh.issues[0].state, "closed");
          assertEquals(gh.requests.filter((x) => x === "POST /repos/cabal/mail/issues").length, 1, "opened once");
        },
      );
    } finally {
      for (const k of ["AWS_ENDPOINT_URL", ...Object.keys(AWS_ENV)]) Deno.env.delete(k);
      await shipper?.stop();
      await mta.kill().catch(() => {});
      await gh.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
  { ignore: sendmailTools.ignore || (Deno.uid() !== 0 && !Deno.env.get("CI")), sanitize: false },
);

awsTest("ctl: a cluster tagged as production is refused under any name, after one read", async ({ moto, proxy }) => {
  await awsCli(
    moto.url,
    "ecs",
    "create-cluster",
    "--cluster-name",
    "cabal-mail",
    "--tags",
    "key=environment,value=prod",
  );
  const path = await Deno.makeTempFile({ prefix: "sinkhole-envs-", suffix: ".json" });
  // A harmless name mapped onto the production cluster: the file cannot make it harmless.
  await Deno.writeTextFile(
    path,
    JSON.stringify({ development: { ...ENVIRONMENTS.development, cluster: "cabal-mail" } }),
  );
  try {
    for (const c of [["status"], ["mode", "set", "accept"], ["cleanup", "--purge-queue"], ["check"]]) {
      const before = proxy.total;
      const res = await ctl(proxy.url, path, ...c, "--env", "development");
      assertEquals(res.code, 2, `${c.join(" ")}: ${res.stderr}`);
      assertMatch(res.stderr, /cluster cabal-mail in us-east-1 is tagged environment=prod: that is production/);
      assertEquals(proxy.total - before, 1, `${c.join(" ")}: only the cluster was read`);
    }
    const param = await run("aws", ["--endpoint-url", moto.url, "ssm", "get-parameter", "--name", PARAM_NAME], {
      env: AWS_ENV,
    });
    assert(param.code !== 0, "mode set wrote nothing");
  } finally {
    await Deno.remove(path);
  }
});

const PARAM_NAME = ENVIRONMENTS.development.parameter;

awsTest("ctl: failures exit 3, name what they were about, and say what was done before them", async ({ moto }) => {
  const file = await envFile();
  const summary = await Deno.makeTempFile();
  const withSummary = (...args: string[]) =>
    runCtl(args, {
      ...AWS_ENV,
      AWS_ENDPOINT_URL: moto.url,
      SINKHOLE_ENVIRONMENTS: file,
      SINKHOLE_CTL_POLL_MS: "200",
      GITHUB_TOKEN: "",
      GITHUB_STEP_SUMMARY: summary,
    });
  try {
    // A cluster, and nothing else: no parameter, no log group, no MTA task.
    await awsCli(moto.url, "ecs", "create-cluster", "--cluster-name", CLUSTER);
    const get = await withSummary("mode", "get", "--env", "development");
    assertEquals(get.code, 3, get.stdout + get.stderr);
    assertMatch(
      get.stderr,
      /^ctl: failed: AwsCallError: SSM GetParameter \(Name \/cabal\/sinkhole_mode\) in us-east-1: ParameterNotFound/,
    );

    await awsCli(moto.url, "ssm", "put-parameter", "--name", PARAM_NAME, "--value", "defer", "--type", "String");
    const set = await withSummary("mode", "set", "accept", "--wait", "--env", "development");
    assertEquals(set.code, 3, "the confirmation failed: exit 3, not 1");
    assertMatch(set.stdout, /mode set to accept \(\/cabal\/sinkhole_mode version 2\)/);
    assertMatch(
      set.stdout,
      /not confirmed: waiting for the listener's line failed: CloudWatch Logs FilterLogEvents \(logGroupName \/ecs\/cabal-sinkhole\) in us-east-1: ResourceNotFoundException/,
    );
    const stored = await awsCli(moto.url, "ssm", "get-parameter", "--name", PARAM_NAME);
    assertEquals((stored.Parameter as { Value: string }).Value, "accept", "the mode was changed, and said so");

    const purge = await withSummary("cleanup", "--purge-queue", "--env", "development");
    assertEquals(purge.code, 0, purge.stdout + purge.stderr);
    assertMatch(purge.stdout, /no running cabal-smtp-out task: no queue purged/);

    // No sinkhole service in this cluster: the tier was never deployed, which check says (exit 0).
    const noToken = await withSummary("check", "--env", "development");
    assertEquals(noToken.code, 0, noToken.stdout + noToken.stderr);
    assertMatch(
      noToken.stdout,
      /not deployed: no ECS service cabal-sinkhole .*\n.*GitHub issue not reconciled: GITHUB_TOKEN or GITHUB_REPOSITORY is not set/,
    );
    const noGithub = await withSummary("check", "--no-github", "--env", "development");
    assertMatch(noGithub.stdout, /GitHub issue not reconciled: --no-github given/);

    const text = await Deno.readTextFile(summary);
    assertMatch(text, /### ❌ sinkhole mode get: development: failed\n\n- AwsCallError: SSM GetParameter/);
    assertMatch(text, /### ❌ sinkhole mode: development\n\n- mode set to accept .*\n- not confirmed: /);
    assertMatch(
      text,
      /### ✅ sinkhole cleanup: development\n\n- mode set to defer .*\n- no running cabal-smtp-out task/,
    );
  } finally {
    await Deno.remove(file);
    await Deno.remove(summary);
  }
});

awsTest("ctl: ECS Exec failures are errors, never results (cleanup, check, probe)", async ({ moto }) => {
  await seed(moto.url);
  const env = parseEnvironments(await Deno.readTextFile(await envFile())).get("development")!;
  Deno.env.set("AWS_ENDPOINT_URL", moto.url);
  for (const [k, v] of Object.entries(AWS_ENV)) Deno.env.set(k, v);
  // The aws CLI as it ends when the session manager cannot start (a non-TTY stdin under
  // Actions): exit 0, the plugin's words, no output of the command. A stand-in script,
  // since moto has no ExecuteCommand; ecsExec reads its output as it would the real one's.
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-exec-" });
  const fakeAws = `${dir}/aws`;
  await Deno.writeTextFile(fakeAws, "#!/bin/sh\necho 'Cannot perform start session: EOF'\nexit 0\n");
  await Deno.chmod(fakeAws, 0o755);
  try {
    const viaPlugin = ecsExec({ region: "us-east-1", cluster: CLUSTER, container: "smtp-out", aws: fakeAws });
    const r = await viaPlugin.run({ arn: "arn:task/1", id: "1" }, "mailq");
    assertEquals(r.code, EXEC_NO_RESULT);
    assertMatch(r.output, /no result from ECS Exec: Cannot perform start session: EOF/);
    const base = {
      env,
      ...commands.clients(env),
      now: Date.now,
      sleep: (ms: number) => new Promise<void>((ok) => setTimeout(ok, ms)),
      pollMs: 100,
    };
    const deps: commands.Deps = { ...base, exec: viaPlugin };
    // cleanup says what it did (the mode) and then what failed: a failed report (exit 3), never "removed".
    const purge = await commands.cleanup(deps, { purgeQueue: true });
    assert(purge.failed && !purge.ok, purge.lines.join("\n"));
    assertMatch(purge.lines[0], /^mode set to defer/);
    assertMatch(
      purge.lines.at(-1)!,
      /^failed: ExecError: purging the queue in .* failed \(exit 255\): no result from ECS Exec/,
    );
    const check = await commands.check(deps, { modeAgeMs: 0, queueAgeMs: 0 });
    assert(check.failed && !check.ok, `check must not say "all clean": ${check.lines.join("\n")}`);
    assert(!check.lines.includes("all clean"));
    assertMatch(check.lines.join("\n"), /failed: ExecError: counting in .* no result from ECS Exec/);
    const probe = await commands.probe(deps, "queued", 1000).catch((e) => e);
    assert(probe instanceof commands.ExecError, String(probe));
    // A command that ran and printed something that is not what was asked for.
    const garbage: Exec = { run: () => Promise.resolve({ code: 0, output: "error: queue directory missing\n" }) };
    const count = await commands.check({ ...deps, exec: garbage }, { modeAgeMs: 0, queueAgeMs: 0 });
    assertMatch(count.lines.join("\n"), /failed: ExecError: counting queued mail in .*: not a count/);
    const ids = await commands.cleanup({ ...deps, exec: garbage }, { purgeQueue: true });
    assertMatch(ids.lines.at(-1)!, /^failed: ExecError: purging the queue in .*: not a queue id/);
  } finally {
    for (const k of ["AWS_ENDPOINT_URL", ...Object.keys(AWS_ENV)]) Deno.env.delete(k);
    await Deno.remove(dir, { recursive: true });
  }
}, { sanitize: false });

Deno.test("ctl: deployment() — not deployed is no service, or Cabalmail's bootstrap tag; nothing else decides", () => {
  const env = parseEnvironments(JSON.stringify(ENVIRONMENTS)).get("development")!;
  const cases: [commands.DeploymentFacts, boolean, RegExp?][] = [
    [{ service: false }, false, /^no ECS service cabal-sinkhole in cluster cabal-test$/],
    [{ service: false, imageTag: "sha-1234abcd" }, false, /^no ECS service/],
    [{ service: true, imageTag: "bootstrap-placeholder" }, false, /is bootstrap-placeholder: no sinkhole image/],
    [{ service: true, imageTag: " bootstrap-placeholder\n" }, false, /bootstrap-placeholder/],
    [{ service: true, imageTag: "sha-1234abcd" }, true],
    [{ service: true }, true],
    [{ service: true, imageTag: "bootstrap-placeholder-2" }, true],
  ];
  for (const [facts, deployed, reason] of cases) {
    const d = commands.deployment(facts, env);
    assertEquals(d.deployed, deployed, JSON.stringify(facts));
    if (!d.deployed) assertMatch(d.reason, reason!);
  }
});

/** A region other than us-east-1 (the SDK's and the aws CLI's ambient region in these tests, AWS_ENV). */
const OTHER_REGION = "eu-west-1";

awsTest(
  "ctl: check where the tier was never deployed says so and exits 0, in the environment's own region (eu-west-1)",
  async ({ moto }) => {
    // Everything lives in eu-west-1; the process's AWS_REGION stays us-east-1 (AWS_ENV): only the file says eu-west-1.
    const inRegion = (...a: string[]) => awsCliAs({ AWS_DEFAULT_REGION: OTHER_REGION }, moto.url, ...a);
    const file = await Deno.makeTempFile({ prefix: "sinkhole-envs-", suffix: ".json" });
    const usFile = await Deno.makeTempFile({ prefix: "sinkhole-envs-", suffix: ".json" });
    const dev = { ...ENVIRONMENTS.development, cluster: "cabal-mail" };
    await Deno.writeTextFile(file, JSON.stringify({ development: { ...dev, region: OTHER_REGION } }));
    await Deno.writeTextFile(usFile, JSON.stringify({ development: dev }));
    try {
      // Cabalmail's account with var.sinkhole false: the cluster (tagged by default_tags), and the tag parameter
      // seeded with the sentinel for every tier, sinkhole included (cabal-infra terraform/infra/main.tf,
      // aws_ssm_parameter.tier_image_tag); no sinkhole service, log group or mode parameter (sinkhole.tf's count).
      await inRegion(
        "ecs",
        "create-cluster",
        "--cluster-name",
        "cabal-mail",
        "--tags",
        "key=environment,value=development",
      );
      const tag = (value: string) =>
        inRegion(
          "ssm",
          "put-parameter",
          "--name",
          dev.imageTagParameter,
          "--value",
          value,
          "--type",
          "String",
          "--overwrite",
        );
      await tag("bootstrap-placeholder");

      // The region is the file's: with us-east-1 in the file the same account is not found there (refused, exit 2).
      const elsewhere = await ctl(moto.url, usFile, "check", "--tier", "on", "--env", "development");
      assertEquals(elsewhere.code, 2, elsewhere.stdout + elsewhere.stderr);
      assertMatch(elsewhere.stderr, /cluster cabal-mail not found in us-east-1/);

      const none = await ctl(moto.url, file, "check", "--tier", "on", "--env", "development");
      assertEquals(none.code, 0, none.stdout + none.stderr);
      assertMatch(none.stdout, /not deployed: no ECS service cabal-sinkhole in cluster cabal-mail; nothing to check/);
      assertMatch(none.stdout, /the flag for development is on: the tier is meant to run but is not deployed/);
      const json = JSON.parse((await ctl(moto.url, file, "check", "--json", "--env", "development")).stdout);
      assertEquals([json.ok, json.deployed, json.findings], [true, false, []]);

      // var.sinkhole on, no image deployed yet: the service runs Cabalmail's placeholder.
      await inRegion(
        "ecs",
        "register-task-definition",
        "--family",
        "cabal-sinkhole",
        "--container-definitions",
        JSON.stringify([{ name: "sinkhole", image: "public.ecr.aws/nginx/nginx:stable", memory: 128 }]),
      );
      await inRegion(
        "ecs",
        "create-service",
        "--cluster",
        "cabal-mail",
        "--service-name",
        "cabal-sinkhole",
        "--task-definition",
        "cabal-sinkhole",
        "--desired-count",
        "1",
      );
      const placeholder = await ctl(moto.url, file, "check", "--tier", "on", "--env", "development");
      assertEquals(placeholder.code, 0, placeholder.stdout + placeholder.stderr);
      assertMatch(placeholder.stdout, /not deployed: \/cabal\/deployed_image_tag\/sinkhole is bootstrap-placeholder/);

      // A deployed tag: the check runs, and a tier without its mode parameter is a failure (exit 3), not "not deployed".
      await tag("sha-1234abcd");
      const broken = await ctl(moto.url, file, "check", "--tier", "on", "--env", "development");
      assertEquals(broken.code, 3, broken.stdout + broken.stderr);
      assertMatch(broken.stderr, /SSM GetParameter \(Name \/cabal\/sinkhole_mode\) in eu-west-1: ParameterNotFound/);
      await inRegion("ssm", "put-parameter", "--name", dev.parameter, "--value", "defer", "--type", "String");
      const clean = await ctl(moto.url, file, "check", "--tier", "on", "--env", "development");
      assertEquals(clean.code, 0, clean.stdout + clean.stderr);
      assertMatch(clean.stdout, /all clean/);
      // Nothing was made in the ambient region.
      const usClusters = await awsCli(moto.url, "ecs", "list-clusters");
      assertEquals(usClusters.clusterArns, []);
    } finally {
      await Deno.remove(file);
      await Deno.remove(usFile);
    }
  },
);
