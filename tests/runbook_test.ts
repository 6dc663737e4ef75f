/**
 * Every command docs/runbook.md and docs/cabalmail.md show, run exactly as printed: each line goes to
 * `bash -c` unchanged, in one operator session at the root of the repository (a line that sets a variable,
 * `export AWS_DEFAULT_REGION=…` or `TASK=…`, is run the same way and its value kept for the lines after it,
 * as a shell keeps it). The account is moto's, prepared as Cabalmail's Terraform leaves it (see `seed`), in
 * eu-west-1: the environments file the session names (SINKHOLE_ENVIRONMENTS) puts `stage` there, while the
 * ambient AWS_REGION says us-east-1, so a command that took its region from anywhere but the file would miss.
 *
 * Real: `deno task ctl` (the AWS SDK), the aws CLI (v1 here) for every other `aws …` line, jq, bash; the
 * listener reading its mode from SSM; a Debian sendmail built from m4 with Cabalmail's `confMIN_QUEUE_AGE 5m`
 * (cabal-infra docker/templates/out-sendmail.mc), routing sinkhole.test to the listener as smtp-out does.
 *
 * Stood in for, said so: ECS Exec. moto has no ExecuteCommand and this machine has no session-manager-plugin.
 * An `aws` first on the session's PATH passes every call to the real CLI except `ecs execute-command`: that
 * one the real CLI still parses in full (it must stop at the missing plugin, which it checks after parsing,
 * not at a usage error), and then the `--command` text runs "in the container": `sh -c TEXT` with the test
 * MTA's `sendmail` and `mailq` first on PATH (the agent splits the text into words; for these commands, which
 * quote with single quotes only, sh's splitting is the same). ctl's own ECS Exec (probe, cleanup, check) goes
 * through the same stand-in, since ctl runs `aws ecs execute-command` too. moto's ECS starts no task for a
 * service and reports none running, so the test starts the smtp-out task itself (run-task), replaces it at
 * step 5 as ECS would (the old MTA killed, a new one started on the same queue), and moto is told services
 * run (MOTO_ECS_SERVICE_RUNNING=1) so that `aws ecs wait services-stable` can end.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, eventually, type Listener, needs, ROOT, startListener, which } from "../rig/helpers.ts";
import { AWS_ENV, type AwsCall, awsCliAs, seedCabalAccount, shipLogs, startMoto, startMtaTasks } from "../rig/aws.ts";
import { makeSendmail, rigAddresses, SMTP_PORT } from "../rig/sendmail.ts";
import { commandsShown } from "./shown.ts";

const REGION = "eu-west-1";
const PAGES = ["docs/runbook.md", "docs/cabalmail.md"];
const TAG = "sha-1234abcd";
const tools = needs(
  "moto_server",
  "aws",
  "jq",
  "bash",
  "/usr/sbin/sendmail",
  "makemap",
  "m4",
  "unshare",
  "/usr/share/sendmail/cf/m4/cf.m4",
);
/** How long a waited-for state may take (logs reach moto through the aws CLI): a hang guard, not a measure. */
const WITHIN_MS = 120_000;

const shown = PAGES.flatMap((page) =>
  commandsShown(Deno.readTextFileSync(`${ROOT}/${page}`)).map((c) => ({ ...c, page }))
);

/** The `deno task rehearse` runs tests/rehearse_test.ts makes (the rehearsal itself is proven there). */
function rehearsedArgs(): string[] {
  const src = Deno.readTextFileSync(`${ROOT}/tests/rehearse_test.ts`);
  const list = /for \(const args of (\[.*\])\)/.exec(src)?.[1];
  assert(list, "tests/rehearse_test.ts names the argument lists it rehearses");
  return (JSON.parse(list) as string[][]).map((a) => ["deno", "task", "rehearse", ...a].join(" "));
}

/** Cabalmail's account as its Terraform leaves it (rig/aws.ts, cited there): stage, the tier left in accept. */
const seed = (aws: AwsCall) =>
  seedCabalAccount(aws, {
    cluster: "cabal-mail",
    region: REGION,
    environment: "stage",
    mode: "accept",
    imageTag: TAG,
    mtaTasks: 1,
  });

/** The stand-in for ECS Exec (see the top of this file); everything else goes to the real aws CLI. */
const AWS_STAND_IN = `#!/bin/bash
if [ "$1" = ecs ] && [ "$2" = execute-command ]; then
  parsed=$("$REAL_AWS" "$@" 2>&1)
  case "$parsed" in
    *"SessionManagerPlugin is not found"*) ;;
    *) printf '%s\\n' "$parsed" >&2; exit 255 ;;
  esac
  command=; prev=
  for a in "$@"; do [ "$prev" = --command ] && command=$a; prev=$a; done
  printf '%s\\n' "$command" >> "$SINKHOLE_EXEC_LOG"
  PATH="$SINKHOLE_CONTAINER_PATH" exec sh -c "$command"
fi
exec "$REAL_AWS" "$@"
`;

Deno.test({
  name:
    "runbook: every command of docs/runbook.md and docs/cabalmail.md, run as printed (moto in eu-west-1, real sendmail)",
  ignore: tools.ignore || (Deno.uid() !== 0 && !Deno.env.get("CI")),
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    assertTools(tools.missing);
    assert(Deno.uid() === 0, "the MTA binds port 25 and uses namespaces: run as root (CI does)");
    const realAws = which("aws")!;
    const moto = await startMoto({ MOTO_ECS_SERVICE_RUNNING: "1" });
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-runbook-" });
    const at = rigAddresses();
    let listener: Listener | undefined;
    let shipper: { stop: () => Promise<void> } | undefined;
    let mta: Awaited<ReturnType<typeof makeSendmail>> | undefined;
    const inRegion = { AWS_DEFAULT_REGION: REGION, AWS_REGION: REGION };
    const aws = (...a: string[]) => awsCliAs(inRegion, moto.url, ...a);
    try {
      await seed(aws);
      const envs = JSON.parse(await Deno.readTextFile(`${ROOT}/ctl/environments.json`));
      // The file's stage, in another region; a TTL long enough for --wait on a busy machine (it returns when seen).
      envs.stage = { ...envs.stage, region: REGION, cacheTtlSeconds: 110 };
      const envFile = `${dir}/environments.json`;
      await Deno.writeTextFile(envFile, JSON.stringify(envs));

      // smtp-out's queue ages as Cabalmail sets them (cabal-infra docker/templates/out-sendmail.mc).
      await Deno.mkdir(`${dir}/mta`);
      // The mailertable line as cabal-infra docker/shared/generate-config.sh writes it, `:25` included (sendmail
      // reads it as a second host, tried only when the first fails), with the listener's address for the name.
      const line = `sinkhole.test\tsmtp:[${at.sink}]:25\n`;
      mta = await makeSendmail(`${dir}/mta`, at.mta, line, { defines: { confMIN_QUEUE_AGE: "5m" } });
      await mta.start();
      listener = await startListener({
        ...AWS_ENV,
        ...inRegion,
        AWS_ENDPOINT_URL: moto.url,
        TIER: "sinkhole",
        SINKHOLE_MODE: "",
        SINKHOLE_MODE_FILE: "",
        SINKHOLE_MODE_PARAM: "/cabal/sinkhole_mode",
        SINKHOLE_CACHE_TTL: "1",
      }, { host: at.sink, port: SMTP_PORT });
      shipper = shipLogs(listener, moto.url, "/ecs/cabal-sinkhole", inRegion);

      await Deno.mkdir(`${dir}/bin`);
      await Deno.writeTextFile(`${dir}/bin/aws`, AWS_STAND_IN, { mode: 0o755 });
      const execLog = `${dir}/exec.log`;
      await Deno.writeTextFile(execLog, "");
      const path = Deno.env.get("PATH")!;
      const session: Record<string, string> = {
        AWS_ACCESS_KEY_ID: AWS_ENV.AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY: AWS_ENV.AWS_SECRET_ACCESS_KEY,
        AWS_EC2_METADATA_DISABLED: "true",
        // The ambient region is the wrong one on purpose; the aws CLI (v1) does not read AWS_REGION at all.
        AWS_REGION: "us-east-1",
        AWS_ENDPOINT_URL: moto.url,
        AWS_PAGER: "",
        SINKHOLE_ENVIRONMENTS: envFile,
        SINKHOLE_CTL_POLL_MS: "200",
        GITHUB_TOKEN: "",
        PATH: `${dir}/bin:${path}`,
        HOME: Deno.env.get("HOME") ?? "/root",
        ...(Deno.env.get("DENO_DIR") ? { DENO_DIR: Deno.env.get("DENO_DIR")! } : {}),
        REAL_AWS: realAws,
        SINKHOLE_EXEC_LOG: execLog,
        SINKHOLE_CONTAINER_PATH: `${mta.bin}:${path}`,
      };
      const ran = new Set<string>();
      /** The one command the docs show that matches, run as printed; its output and exit code. */
      const sh = async (pattern: RegExp, expectCode = 0) => {
        const texts = [...new Set(shown.filter((c) => pattern.test(c.text)).map((c) => c.text))];
        assertEquals(texts.length, 1, `exactly one command shown matches ${pattern}: ${texts.join(" | ")}`);
        const text = texts[0];
        ran.add(text);
        const assign = /^(?:export )?([A-Z_]+)=/.exec(text);
        // A line that sets a variable: the same text, then its value printed, to carry it to the next lines.
        const script = assign ? `${text}\nprintf '%s' "$${assign[1]}"` : text;
        const out = await new Deno.Command("bash", {
          args: ["-c", script],
          cwd: ROOT,
          env: session,
          clearEnv: true,
          stdin: "null",
        }).output();
        const r = {
          code: out.code,
          stdout: new TextDecoder().decode(out.stdout),
          stderr: new TextDecoder().decode(out.stderr),
        };
        assertEquals(r.code, expectCode, `${text}\n${r.stdout}\n${r.stderr}`);
        if (assign) session[assign[1]] = r.stdout;
        return r;
      };
      const queue = async () => (await mta!.sendmail("-bp")).stdout;
      const sessionsFor = (rcpt: string) =>
        listener!.events("session").flatMap((s) => s.transactions.flatMap((t) => t.rcpts)).filter((r) => r.to === rcpt);

      // Before you start.
      await sh(/^export AWS_DEFAULT_REGION=/);
      assertEquals(session.AWS_DEFAULT_REGION, REGION, "the region is the file's");
      assertMatch((await sh(/^aws sts get-caller-identity$/)).stdout, /"Account"/);
      const describe = /^aws ecs describe-services .*enableExecuteCommand/;
      assertMatch((await sh(describe)).stdout.trim(), /^(null|false)$/);
      await sh(/--enable-execute-command/);
      assertEquals((await sh(describe)).stdout.trim(), "true");
      await sh(/^TASK=/);
      const firstTask = session.TASK;
      assertMatch(firstTask, new RegExp(`^arn:aws:ecs:${REGION}:\\d+:task/cabal-mail/`));
      assertMatch((await sh(/--command "mailq"/)).stdout, /is empty/);

      // Step 1.
      assertMatch((await sh(/^deno task ctl status --env stage$/)).stdout, /desired 1, running 0|desired 1, running 1/);
      // Step 2: the tier was in accept; the listener logs the new mode.
      assertMatch((await sh(/^deno task ctl mode set defer --wait/)).stdout, /the listener logged mode defer/);
      await sh(/^aws ssm put-parameter --name \/cabal\/sinkhole_mode --value defer/);
      assertMatch((await sh(/^deno task ctl mode get --env stage$/)).stdout, /mode stored: "defer"/);
      // Step 3: the probe (through the stand-in for ECS Exec), and the message by hand.
      assertMatch((await sh(/^deno task ctl probe --expect queued/)).stdout, /expectation met: queued/);
      await sh(/sendmail -oi anything@sinkhole\.test/);
      await eventually(() => sessionsFor("anything@sinkhole.test").some((r) => r.code === 421), WITHIN_MS, 100);
      // Step 4, once the attempt is over: after the 421 sendmail still tries the line's second host, `25`.
      await eventually(
        async () => /\(Deferred: 421 4\.3\.2[^\n]*\n\s+anything@sinkhole\.test/.test(await queue()),
        WITHIN_MS,
        100,
      );
      const before = (await sh(/--command "mailq"/)).stdout;
      assertMatch(before, /anything@sinkhole\.test/);
      assertMatch(before, /Deferred: 421 4\.3\.2/);
      const queueId = /^(\w+)\S*\s+\d+ .*\n.*\n\s+anything@sinkhole\.test/m.exec(before)?.[1];
      assert(queueId, before);

      // Step 5: the commands, then what ECS would do: the old task's MTA stops, a new task starts on the same queue.
      await sh(/^aws ecs update-service --cluster cabal-mail --service cabal-smtp-out --force-new-deployment$/);
      await sh(/^aws ecs stop-task /);
      await mta.kill();
      await startMtaTasks(aws, "cabal-mail");
      await mta.start();
      await sh(/^aws ecs wait services-stable /);
      await sh(/^TASK=/);
      assert(session.TASK !== firstTask, "a new task, a new id");
      // Step 6: the message is still queued, with the same queue id.
      assertMatch(
        (await sh(/--command "mailq"/)).stdout,
        new RegExp(`^${queueId}.*\\n.*\\n\\s+anything@sinkhole\\.test`, "m"),
      );
      // Step 7.
      assertMatch((await sh(/^deno task ctl mode set accept --wait/)).stdout, /the listener logged mode accept/);

      // Step 8. First what confMIN_QUEUE_AGE does: a plain queue run skips the message, tried minutes ago at most.
      const qf = [...Deno.readDirSync(mta.queueDir)].find((e) => e.name === `qf${queueId}`);
      assert(qf, `qf${queueId} in the queue`);
      const lastTry = Number(/^K(\d+)$/m.exec(await Deno.readTextFile(`${mta.queueDir}/qf${queueId}`))?.[1]);
      if (Date.now() / 1000 - lastTry < 240) {
        await mta.sendmail("-q", "-v");
        assertMatch(await queue(), /anything@sinkhole\.test/, "MinQueueAge 5m: a plain queue run leaves it queued");
      } else {
        console.log(`the plain queue run's check skipped: the last try was ${Date.now() / 1000 - lastTry} s ago`);
      }
      // The runbook's forced queue run delivers it.
      const forced = await sh(/--command "sendmail -O MinQueueAge=0 -qRsinkhole\.test -v"/);
      assertMatch(forced.stdout, /anything@sinkhole\.test\.\.\. Sent/);
      assert(!(await sh(/--command "mailq"/)).stdout.includes("anything@sinkhole.test"), "the queue holds it no more");
      assert(sessionsFor("anything@sinkhole.test").some((r) => r.code === 250), "the sinkhole accepted it");

      // Step 9.
      // Once the delivery's attempt line has reached CloudWatch (moto), where ctl reads the ledger.
      await eventually(
        async () => {
          const r = await aws("logs", "filter-log-events", "--log-group-name", "/ecs/cabal-sinkhole");
          return (r.events as { message: string }[]).some((e) =>
            e.message.includes('"event":"attempt"') && e.message.includes("anything@sinkhole.test") &&
            e.message.includes('"code":250')
          );
        },
        WITHIN_MS,
        200,
      );
      assertMatch((await sh(/^deno task ctl report --env stage/)).stdout, /anything@sinkhole\.test/);
      assertMatch((await sh(/^deno task ctl expect anything@sinkhole\.test/)).stdout, /^met: every expectation/m);
      // Step 10, the checklist, rolling back, troubleshooting.
      assertMatch((await sh(/^deno task ctl cleanup --purge-queue --env stage$/)).stdout, /mode set to defer/);
      await sh(/^deno task ctl cleanup --env stage$/);
      assertMatch((await sh(/^deno task ctl probe --help$/)).stdout, /^usage: deno task ctl probe/);
      assertMatch((await sh(/^deno task rehearse --help$/)).stdout, /rehearse/);

      // docs/cabalmail.md.
      assertEquals((await sh(/^jq -er \.stage\.region/)).stdout.trim(), REGION);
      assertEquals(
        (await sh(/^aws ssm get-parameter --name \/cabal\/deployed_image_tag\/sinkhole/)).stdout.trim(),
        TAG,
      );
      assertMatch(
        (await sh(/^aws ecs describe-task-definition /)).stdout.trim(),
        new RegExp(`/cabal-sinkhole:${TAG}$`),
      );
      assertMatch((await sh(/^deno task ctl check --tier on --env stage$/)).stdout, /all clean/);

      // The container ran what the docs say, and the old step 3 (nested double quotes) really was broken.
      const execs = (await Deno.readTextFile(execLog)).split("\n");
      assert(execs.includes("sendmail -O MinQueueAge=0 -qRsinkhole.test -v"), execs.join("\n"));
      const old = await new Deno.Command("bash", {
        args: [
          "-c",
          `aws ecs execute-command --cluster cabal-mail --task "$TASK" --container smtp-out --interactive --command ` +
          `"sh -c 'printf "Subject: test\\n\\ntest\\n" | sendmail -oi anything@sinkhole.test'"`,
        ],
        env: session,
        clearEnv: true,
      }).output();
      assert(old.code !== 0, "the old step 3 does not parse");
      assertMatch(new TextDecoder().decode(old.stderr), /Unknown options/);

      // Every command shown was run (the rehearsal's own runs are tests/rehearse_test.ts's).
      const rehearsed = rehearsedArgs();
      const unrun = [...new Set(shown.map((c) => c.text))].filter((t) => !ran.has(t) && !rehearsed.includes(t));
      assertEquals(unrun, [], `shown but not run:\n${unrun.join("\n")}`);
    } finally {
      await shipper?.stop();
      await listener?.stop();
      await mta?.kill().catch(() => {});
      await moto.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
