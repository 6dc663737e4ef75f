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
 *
 * Exit: 0 done, 1 done but not as wanted (expectation unmet, findings, mode not confirmed),
 * 2 refused (production, unknown environment, invalid mode, bad usage).
 */
import { parseArgs } from "node:util";
import * as commands from "./commands.ts";
import { DEFAULT_ENVIRONMENTS_FILE, parseEnvironments, RefusedError, resolveEnvironment } from "./environments.ts";
import { ecsExec } from "./exec.ts";
import { github } from "./github.ts";

const USAGE =
  `usage: deno task ctl <status | mode get | mode set VALUE [--wait] | probe [--expect queued|delivered|bounced]
       | cleanup [--scale-to-zero] [--purge-queue] | check [--mode-age MIN] [--queue-age MIN] [--no-github]>
       --env NAME [--tier on|off] [--json] [--environments FILE]`;

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

if (import.meta.main) Deno.exit(await main(Deno.args));
