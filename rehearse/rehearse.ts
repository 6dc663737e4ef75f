/**
 * `deno task rehearse`: the runbook's queue-persistence procedure on one machine, with real
 * sendmail (routed by the integration snippet) and the listener. Each step carries the
 * runbook's heading, prints PASS or FAIL, and everything is cleaned up afterwards.
 *
 *   deno task rehearse [--mode defer|greylist|bounce] [--offline]
 *
 * Needs root (the listener binds port 25 as in production, without a port in the
 * mailertable, on a loopback address of this run's own; sendmail runs in its own
 * namespaces) and Debian's sendmail.
 */
import { parseArgs } from "node:util";
import { eventually, type Listener, type LogLine, ROOT, run, startListener, transaction } from "../rig/helpers.ts";
import { type AttemptLine, histories, renderReport, unmet } from "../ctl/report.ts";
import { makeSendmail, rigAddresses, SMTP_PORT } from "../rig/sendmail.ts";

export interface Step {
  name: string;
  run: () => Promise<string>;
}

export type Variant = "defer" | "greylist" | "bounce";

/**
 * The greylist variant's minimum retry delay. The new MTA task retries at once when it
 * starts (sendmail runs its queue at start-up), so the hand-over steps must end before a
 * retry can pass: an operator sets `min` longer than the replacement takes (minutes in
 * ECS: the runbook says 15m); here the hand-over takes a second or two, so 30 s is a wide
 * margin, and the delivery step waits it out.
 */
export const REHEARSAL_GREYLIST_MIN_S = 30;
export const REHEARSAL_GREYLIST_MODE = `greylist min=${REHEARSAL_GREYLIST_MIN_S}s`;
/** Bounds on waiting for what each step expects: hang guards, generous on a busy machine. */
const STEP_WAIT_MS = 60_000;

export const REQUIRED: readonly (readonly [string, string])[] = [
  ["/usr/sbin/sendmail", "sendmail-bin"],
  ["/usr/sbin/makemap", "sendmail-bin"],
  ["/usr/share/sendmail/cf/m4/cf.m4", "sendmail-cf"],
  ["/usr/bin/m4", "m4"],
  ["/usr/bin/unshare", "util-linux"],
];

/** Says what is missing and how to install it, or undefined when all is there. */
export function preflight(required = REQUIRED, uid = Deno.uid()): string | undefined {
  const missing = required.filter(([path]) => {
    try {
      return !Deno.statSync(path).isFile;
    } catch {
      return true;
    }
  });
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map(([, pkg]) => pkg))].join(" ");
    return `The rehearsal needs Debian's sendmail, which is not installed here (missing ${
      missing.map(([p]) => p).join(", ")
    }).\nInstall it with:  sudo apt-get install ${pkgs}\n(It does not start a daemon of its own that the rehearsal needs; the rehearsal runs a private one.)`;
  }
  if (uid !== 0) {
    return "The rehearsal binds port 25 on a loopback address and runs sendmail in its own namespaces: run it as root " +
      "(sudo deno task rehearse).";
  }
  return undefined;
}

/** The procedure for one variant, as steps named like the runbook's headings. */
export function procedure(
  variant: Variant,
  offline: boolean,
  work: { dir: string; modeFile: string },
): { steps: Step[]; cleanup: () => Promise<void> } {
  const rcpt = "anything@sinkhole.test";
  let sink: Listener | undefined;
  let origin: Listener | undefined;
  let mta: Awaited<ReturnType<typeof makeSendmail>> | undefined;
  let queueId = "";
  let at: ReturnType<typeof rigAddresses> | undefined;

  /** Log lines of sinkholes stopped earlier (the offline variant restarts it): the ledger needs them all. */
  const earlier: LogLine[] = [];
  const startSink = async () => {
    if (sink) earlier.push(...sink.logs);
    sink = await startListener(
      { SINKHOLE_MODE_FILE: work.modeFile, SINKHOLE_CACHE_TTL: "0.2" },
      { host: at!.sink, port: SMTP_PORT },
    );
  };
  const setMode = async (mode: string) => {
    await Deno.writeTextFile(work.modeFile, `${mode}\n`);
    await eventually(() => sink!.logs.findLast((x) => x.event === "mode")?.mode === mode, STEP_WAIT_MS);
    return `mode ${mode}: the listener logged it`;
  };
  /** When the sinkhole first saw the test recipient (its first session's start). */
  const firstAttemptAt = () => {
    const s = sink!.events("session").find((x) => x.transactions.some((t) => t.rcpts.some((r) => r.to === rcpt)));
    return s ? Date.parse(s.ts) - s.durationMs : undefined;
  };
  const queued = async () => {
    const q = await mta!.mailq();
    return { q, count: Number(/Total requests: (\d+)/.exec(q)?.[1] ?? "0") };
  };
  const expectQueued = async (reason: RegExp) => {
    let q = "";
    await eventually(async () => reason.test(q = (await queued()).q) && q.includes(rcpt), STEP_WAIT_MS, 200);
    queueId = /^(\w{14})\S*\s/m.exec(q.split("\n").find((l) => /^\w{14}/.test(l)) ?? "")?.[1] ?? "";
    return `${rcpt} queued as ${queueId}: ${reason.exec(q)?.[0]}`;
  };

  const enable: Step = {
    name: "Enable the tier",
    run: async () => {
      at = rigAddresses();
      await startSink();
      origin = await startListener({ SINKHOLE_MODE: "accept-log" }, { host: at.origin, port: SMTP_PORT });
      mta = await makeSendmail(work.dir, at.mta, `origin.test smtp:[${at.origin}]\n`);
      const snippet = await run("sh", ["-c", `. "${ROOT}/integration/sinkhole-mailertable.sh"`], {
        env: { MAILERTABLE: `${work.dir}/mailertable`, SINKHOLE_ENABLED: "true", SINKHOLE_HOST: at.sink },
      });
      if (snippet.code !== 0) throw new Error(`integration snippet failed: ${snippet.stderr}`);
      await mta.makemap();
      await mta.start();
      const line = (await Deno.readTextFile(`${work.dir}/mailertable`)).split("\n").find((l) =>
        l.startsWith("sinkhole.test")
      );
      return `listener on ${at.sink}:${SMTP_PORT}; sendmail on ${mta.host}:${mta.port}; mailertable: ${line}`;
    },
  };
  const send: Step = {
    name: "Send a test message",
    run: async () => {
      const codes = await transaction(mta!.port, {
        host: mta!.host,
        from: "tester@origin.test",
        to: [rcpt],
        body: "Subject: queue-persistence rehearsal\r\n\r\nrehearsal",
      });
      if (codes.at(-2) !== 250) throw new Error(`sendmail did not take the message: ${codes.join(" ")}`);
      return "sendmail accepted it for delivery";
    },
  };
  const seeQueued = (reason: RegExp): Step => ({
    name: "See it queued on every MTA task",
    run: () => expectQueued(reason),
  });
  const replace: Step = {
    name: "Replace an MTA task",
    run: async () => {
      const old = await mta!.kill();
      const fresh = await mta!.start();
      return `sendmail ${old} killed (SIGKILL); ${fresh} started on the same spool`;
    },
  };
  const handedOver: Step = {
    name: "See the queue handed over",
    run: async () => {
      const { q, count } = await queued();
      if (count !== 1 || !q.includes(queueId)) {
        const first = firstAttemptAt();
        const since = first === undefined
          ? ""
          : ` (${Math.round((Date.now() - first) / 1000)} s after the first attempt)`;
        throw new Error(`expected ${queueId} in the new MTA's queue${since}:\n${q}`);
      }
      return `${queueId} is in the new MTA's queue`;
    },
  };
  const delivered: Step = {
    name: "See it delivered and the queue empty",
    run: async () => {
      // A greylisting destination lets the retry through only after its minimum delay:
      // "wait for the next queue run" after it, as an operator would.
      let waited = "";
      if (variant === "greylist") {
        const passAt = (firstAttemptAt() ?? Date.now()) + REHEARSAL_GREYLIST_MIN_S * 1000;
        const wait = Math.max(0, passAt - Date.now());
        await new Promise((ok) => setTimeout(ok, wait));
        waited = `waited ${Math.round(wait / 1000)} s for the greylist minimum; `;
      }
      // Then trigger runs until it is gone (the new MTA's own queue run may hold the
      // message's lock, or have delivered it already).
      const deliveredLogged = () =>
        sink!.logs.some((x) =>
          x.event === "session" &&
          (x.transactions as { rcpts: { to: string; code: number }[]; result?: number }[]).some((t) =>
            t.result === 250 && t.rcpts.some((r) => r.to === rcpt && r.code === 250)
          )
        );
      let runs = 0;
      await eventually(
        async () => {
          if ((await queued()).count === 0 && deliveredLogged()) return true;
          runs++;
          await mta!.queueRun();
          return false;
        },
        STEP_WAIT_MS,
        200,
      );
      return `${waited}delivered (250) after ${runs} queue run(s); mailq is empty`;
    },
  };
  const putBack: Step = { name: "Put the mode back", run: () => setMode("defer") };
  const report: Step = {
    name: "Report the retries",
    run: () => {
      const events = [...earlier, ...sink!.logs].filter((x) => x.event === "attempt") as AttemptLine[];
      const hs = histories(events);
      // Queued at the first attempt, delivered after the replacement: at least two attempts, one delivery.
      const problems = unmet(hs, { message: rcpt, attempts: [2, Infinity], deliveredOnce: true });
      if (problems.length) {
        return Promise.reject(new Error(problems.join("; ") + "\n" + renderReport(hs).join("\n")));
      }
      return Promise.resolve(`expectations met (2.. attempts, delivered once):\n${renderReport(hs).join("\n")}`);
    },
  };

  const offlineSteps: Step[] = offline
    ? [
      {
        name: "Take the sinkhole offline",
        run: async () => {
          await sink!.stop();
          // A forced run may find the message locked by the MTA's own run: force until one tried it.
          const { output: out } = await mta!.queueRunsUntil((o) => /Connection refused/.test(o), STEP_WAIT_MS);
          const { q, count } = await queued();
          if (count !== 1) throw new Error(`expected the message to stay queued:\n${q}`);
          const why = /Deferred: [^\n)]*/.exec(q)?.[0] ?? out.split("\n").find((l) => /refused|Deferred/i.test(l));
          return `listener stopped; a queue run leaves it queued (${why})`;
        },
      },
      {
        name: "Bring the sinkhole back",
        run: async () => {
          await startSink();
          return "listener started again";
        },
      },
    ]
    : [];

  let steps: Step[];
  if (variant === "defer") {
    steps = [
      enable,
      { name: "Set the mode to defer", run: () => setMode("defer") },
      send,
      seeQueued(/Deferred: 421 4\.3\.2 Service temporarily unavailable/),
      replace,
      handedOver,
      ...offlineSteps,
      { name: "Set the mode to accept", run: () => setMode("accept") },
      delivered,
      report,
      putBack,
    ];
  } else if (variant === "greylist") {
    steps = [
      enable,
      { name: "Set the mode to greylist", run: () => setMode(REHEARSAL_GREYLIST_MODE) },
      send,
      seeQueued(/Deferred: 451 4\.7\.1 Greylisted[^\n)]*/),
      replace,
      handedOver,
      ...offlineSteps,
      delivered,
      report,
      putBack,
    ];
  } else {
    steps = [
      enable,
      { name: "Set the mode to bounce", run: () => setMode("bounce") },
      send,
      {
        name: "See it bounced, not queued",
        run: async () => {
          const dsn = await origin!.waitForLog((x) => x.event === "message", STEP_WAIT_MS);
          await eventually(async () => (await queued()).count === 0, STEP_WAIT_MS, 200);
          const subject = (dsn.headers as string[]).find((h) => h.startsWith("Subject:"));
          return `the sender got a DSN (${subject}); nothing is queued`;
        },
      },
      putBack,
    ];
  }
  return {
    steps,
    cleanup: async () => {
      await mta?.kill().catch(() => {});
      await sink?.stop().catch(() => {});
      await origin?.stop().catch(() => {});
    },
  };
}

/** Runs the steps in order; after a failure the rest are skipped. Returns [passed, failed]. */
export async function runSteps(steps: Step[], print: (line: string) => void): Promise<[number, number]> {
  let passed = 0;
  let failed = 0;
  for (const [i, step] of steps.entries()) {
    const label = `Step ${i + 1}: ${step.name}`;
    if (failed > 0) {
      print(`[SKIP] ${label}`);
      continue;
    }
    const t0 = Date.now();
    try {
      const detail = await step.run();
      passed++;
      print(`[PASS] ${label} (${Date.now() - t0} ms): ${detail}`);
    } catch (err) {
      failed++;
      print(`[FAIL] ${label}: ${(err as Error).message}`);
    }
  }
  return [passed, failed];
}

export const REHEARSE_USAGE = `usage: deno task rehearse [--mode defer|greylist|bounce] [--offline]

Rehearses docs/runbook.md's queue-persistence procedure on this machine: real sendmail routed to the
listener, the MTA replaced mid-test, the queue checked to survive, and the retry ledger read back.

options:
  --mode MODE   the sinkhole's mode during the test: defer, greylist or bounce (default defer)
  --offline     take the sinkhole away mid-test (the MTA must queue, not bounce)
  --help, -h    print this help

Needs root (port 25 on a loopback address of its own; sendmail in its own namespaces) and
Debian's sendmail-bin, sendmail-cf and m4.

exit codes: 0 every step passed, 1 a step failed, 2 refused (usage, missing tools, not root)`;

/** The rehearsal's arguments, or a usage error said in one line. */
export function rehearseArgs(args: string[]): { help: true } | { help: false; variant: Variant; offline: boolean } {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      options: {
        mode: { type: "string", default: "defer" },
        offline: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (err) {
    const e = err as Error & { code?: string };
    const m = /'(-[^' ]*)/.exec(e.message);
    throw new Error(
      e.code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" ? `unknown option ${m?.[1] ?? ""}` : e.code ===
          "ERR_PARSE_ARGS_INVALID_OPTION_VALUE"
        ? `${m?.[1] ?? "an option"} needs a value`
        : e.code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL"
        ? "takes no arguments, only options"
        : e.message,
    );
  }
  if (parsed.values.help) return { help: true };
  const variant = parsed.values.mode as Variant;
  if (!["defer", "greylist", "bounce"].includes(variant)) {
    throw new Error(`--mode must be defer, greylist or bounce, got ${JSON.stringify(variant)}`);
  }
  return { help: false, variant, offline: parsed.values.offline };
}

async function main(): Promise<number> {
  let args;
  try {
    args = rehearseArgs(Deno.args);
  } catch (err) {
    console.error(`rehearse: ${(err as Error).message}\n\n${REHEARSE_USAGE}`);
    return 2;
  }
  if (args.help) {
    console.log(REHEARSE_USAGE);
    return 0;
  }
  const { variant, offline } = args;
  const problem = preflight();
  if (problem) {
    console.error(`rehearse: ${problem}`);
    return 2;
  }
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-rehearsal-" });
  const modeFile = `${dir}/mode`;
  await Deno.writeTextFile(modeFile, "defer\n");
  console.log(
    `Rehearsing docs/runbook.md (${variant}${offline ? ", sinkhole offline mid-test" : ""}) in ${dir}`,
  );
  const { steps, cleanup } = procedure(variant, offline, { dir, modeFile });
  try {
    const [passed, failed] = await runSteps(steps, console.log);
    console.log(`rehearsal: ${passed} passed, ${failed} failed`);
    return failed === 0 ? 0 : 1;
  } finally {
    await cleanup();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    console.log("cleaned up: sendmail stopped, listeners stopped, work directory removed");
  }
}

if (import.meta.main) Deno.exit(await main());
