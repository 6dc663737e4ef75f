/**
 * `deno task ctl`: the sinkhole control CLI. The GitHub Actions buttons are thin wrappers
 * over it. Production is refused twice: by name before any client exists, and by what it is
 * (the cluster's environment tag) in the first request, a read, before any other.
 *
 *   ctl status                                   --env NAME [--json]
 *   ctl mode get                                 --env NAME
 *   ctl mode set VALUE [--wait]                  --env NAME
 *   ctl probe [--expect queued|delivered|bounced] [--timeout SECONDS] --env NAME
 *   ctl cleanup [--scale-to-zero] [--purge-queue] --env NAME
 *   ctl check [--mode-age MINUTES] [--queue-age MINUTES] [--no-github] --env NAME
 *   ctl report (--file FILE|- | --env NAME [--since MINUTES])
 *   ctl expect MESSAGE [--attempts N|MIN..MAX] [--interval S..S] [--delivered-once] [--within SECONDS]
 *              (--file FILE|- | --env NAME [--since MINUTES])
 *
 * Exit: 0 done, 1 done but not as wanted (expectation unmet, findings, mode not confirmed),
 * 2 refused (production, unknown environment, invalid mode, bad usage).
 */
import { parseArgs } from "node:util";
import * as commands from "./commands.ts";
import { DEFAULT_ENVIRONMENTS_FILE, parseEnvironments, RefusedError, resolveEnvironment } from "./environments.ts";
import { ecsExec } from "./exec.ts";
import { github } from "./github.ts";
import {
  type AttemptLine,
  histories,
  markdownReport,
  parseRange,
  readAttempts,
  renderReport,
  unmet,
} from "./report.ts";

const USAGE =
  `usage: deno task ctl <status | mode get | mode set VALUE [--wait] | probe [--expect queued|delivered|bounced]
       | cleanup [--scale-to-zero] [--purge-queue] | check [--mode-age MIN] [--queue-age MIN] [--no-github]>
       --env NAME [--tier on|off] [--json] [--environments FILE]
       deno task ctl report (--file FILE|- | --env NAME [--since MIN])
       deno task ctl expect MESSAGE [--attempts N|MIN..MAX] [--interval S..S] [--delivered-once] [--within S]
                        (--file FILE|- | --env NAME [--since MIN])`;

const OUTCOMES = ["queued", "delivered", "bounced"] as const;

export function render(report: commands.Report, json: boolean): string {
  if (json) return JSON.stringify({ title: report.title, ok: report.ok, ...report.data }, null, 2);
  return [report.title, ...report.lines.map((l) => `  ${l}`)].join("\n");
}

export function markdown(report: commands.Report): string {
  return `### ${report.ok ? "✅" : "⚠️"} ${report.title}\n\n${report.lines.map((l) => `- ${l}`).join("\n")}\n\n`;
}

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        env: { type: "string" },
        json: { type: "boolean", default: false },
        environments: { type: "string" },
        wait: { type: "boolean", default: false },
        expect: { type: "string" },
        timeout: { type: "string", default: "60" },
        "scale-to-zero": { type: "boolean", default: false },
        "purge-queue": { type: "boolean", default: false },
        "mode-age": { type: "string", default: "120" },
        "queue-age": { type: "string", default: "60" },
        "no-github": { type: "boolean", default: false },
        tier: { type: "string" },
        file: { type: "string" },
        since: { type: "string", default: "1440" },
        attempts: { type: "string" },
        interval: { type: "string" },
        "delivered-once": { type: "boolean", default: false },
        within: { type: "string" },
        help: { type: "boolean", default: false },
      },
    });
  } catch (err) {
    console.error(`ctl: ${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  const { values: o, positionals: [command, sub, arg] } = parsed;
  if (o.help || !command) {
    console.log(USAGE);
    return o.help ? 0 : 2;
  }
  const number = (name: string, raw: string) => {
    const n = Number(raw);
    if (!Number.isFinite(n) || n < 0) throw new RefusedError(`--${name} must be a number ≥ 0, got ${raw}`);
    return n;
  };
  try {
    if ((command === "report" || command === "expect") && o.file !== undefined) {
      return await ledger(command, sub, o, await readAttempts(o.file));
    }
    // Everything that can refuse does so here, before any client or request exists.
    const file = o.environments ?? Deno.env.get("SINKHOLE_ENVIRONMENTS") ?? DEFAULT_ENVIRONMENTS_FILE;
    const env = resolveEnvironment(o.env, parseEnvironments(await Deno.readTextFile(file), file));
    let run: (d: commands.Deps) => Promise<commands.Report>;
    if (command === "status") run = commands.status;
    else if (command === "mode" && sub === "get") run = commands.modeGet;
    else if (command === "mode" && sub === "set" && arg) {
      const mode = commands.validateMode(arg);
      run = (d) => commands.modeSet(d, mode, o.wait);
    } else if (command === "probe") {
      const expect = o.expect as commands.Outcome | undefined;
      if (expect && !(OUTCOMES as readonly string[]).includes(expect)) {
        throw new RefusedError(`--expect must be one of ${OUTCOMES.join(", ")}`);
      }
      const timeout = number("timeout", o.timeout) * 1000;
      run = (d) => commands.probe(d, expect, timeout);
    } else if (command === "cleanup") {
      run = (d) => commands.cleanup(d, { scaleToZero: o["scale-to-zero"], purgeQueue: o["purge-queue"] });
    } else if (command === "report" || command === "expect") {
      const sinceMs = number("since", o.since) * 60_000;
      run = async (d) => {
        const lines = await commands.listenerLines(d, d.now() - sinceMs, "attempt");
        const events = lines.filter((l) => l.event === "attempt") as AttemptLine[];
        const code = await ledger(command, sub, o, events);
        return { title: `sinkhole ${command}: ${d.env.name}`, ok: code === 0, lines: [], data: { printed: true } };
      };
    } else if (command === "check") {
      const modeAgeMs = number("mode-age", o["mode-age"]) * 60_000;
      const queueAgeMs = number("queue-age", o["queue-age"]) * 60_000;
      run = (d) => commands.check(d, { modeAgeMs, queueAgeMs });
    } else {
      throw new RefusedError(`unknown command: ${[command, sub].filter(Boolean).join(" ")}\n${USAGE}`);
    }

    if (o.tier !== undefined && o.tier !== "on" && o.tier !== "off") {
      throw new RefusedError(`--tier must be on or off (the environment's SINKHOLE variable), got ${o.tier}`);
    }
    const token = Deno.env.get("GITHUB_TOKEN");
    const repository = Deno.env.get("GITHUB_REPOSITORY");
    const gh = !o["no-github"] && token && repository
      ? github({ token, repository, baseUrl: Deno.env.get("GITHUB_API_URL") })
      : undefined;
    const deps: commands.Deps = {
      env,
      tier: o.tier === undefined ? undefined : o.tier === "on",
      ...commands.clients(env),
      exec: ecsExec({ region: env.region, cluster: env.cluster, container: env.mtaContainer }),
      issue: gh?.reconcile,
      now: Date.now,
      sleep: (ms) => new Promise((ok) => setTimeout(ok, ms)),
      pollMs: Number(Deno.env.get("SINKHOLE_CTL_POLL_MS") ?? "2000"),
    };
    await commands.refuseProduction(deps);
    const report = await run(deps);
    if (report.data.printed) return report.ok ? 0 : 1;
    console.log(render(report, o.json));
    const summary = Deno.env.get("GITHUB_STEP_SUMMARY");
    if (summary) await Deno.writeTextFile(summary, markdown(report), { append: true });
    return report.ok ? 0 : 1;
  } catch (err) {
    if (err instanceof RefusedError || err instanceof commands.InvalidModeError) {
      console.error(`ctl: refused: ${err.message}`);
      return 2;
    }
    console.error(`ctl: ${(err as Error).name}: ${(err as Error).message}`);
    return 1;
  }
}

/**
 * `report`: every message's attempts (text, and a Markdown summary with a Mermaid timeline
 * when GITHUB_STEP_SUMMARY is set). `expect`: 0 when every expectation holds, 1 naming each
 * that does not.
 */
async function ledger(
  command: "report" | "expect",
  message: string | undefined,
  o: Record<string, string | boolean | undefined>,
  events: AttemptLine[],
): Promise<number> {
  const hs = histories(events);
  const summary = Deno.env.get("GITHUB_STEP_SUMMARY");
  if (command === "report") {
    console.log(o.json ? JSON.stringify(hs, null, 2) : renderReport(hs).join("\n"));
    if (summary) await Deno.writeTextFile(summary, markdownReport(hs), { append: true });
    return 0;
  }
  if (!message) throw new RefusedError(`expect needs the message: its recipient, or "sender > recipient"`);
  const range = (name: string) => {
    const raw = o[name];
    if (raw === undefined) return undefined;
    const r = parseRange(String(raw));
    if (!r) throw new RefusedError(`--${name} must be N or MIN..MAX, got ${raw}`);
    return r;
  };
  const within = o.within === undefined ? undefined : Number(o.within);
  if (within !== undefined && !(within >= 0)) throw new RefusedError(`--within must be seconds ≥ 0, got ${o.within}`);
  const problems = unmet(hs, {
    message,
    attempts: range("attempts"),
    intervalS: range("interval"),
    deliveredOnce: o["delivered-once"] === true,
    withinS: within,
  });
  const text = problems.length ? problems.map((p) => `unmet: ${p}`) : [`met: every expectation for ${message}`];
  console.log(text.join("\n"));
  if (summary) {
    await Deno.writeTextFile(
      summary,
      `### sinkhole expect: ${problems.length ? "⚠️ unmet" : "✅ met"}\n\n` +
        text.map((t) => `- ${t}`).join("\n") + "\n\n",
      { append: true },
    );
  }
  return problems.length ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
