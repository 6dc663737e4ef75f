/**
 * `deno task ctl`: the sinkhole control CLI. The GitHub Actions buttons are thin wrappers
 * over it. Production is refused twice: by name before any client exists, and by what it is
 * (the cluster's environment tag) in the first request, a read, before any other.
 *
 * The grammar (commands, options, help, validation) is data in cli.ts; `deno task ctl
 * --help` and `deno task ctl COMMAND --help` print it. Exit codes (cli.ts, EXIT): 0 done,
 * 1 done but not as wanted, 2 refused before anything changed, 3 failed.
 */
import * as commands from "./commands.ts";
import {
  commandHelp,
  type CommandSpec,
  EXIT,
  numberOption,
  optionValue,
  overview,
  parseCommandLine,
  type Parsed,
  UsageError,
} from "./cli.ts";
import {
  DEFAULT_ENVIRONMENTS_FILE,
  parseEnvironments,
  RefusedError,
  refuseProductionName,
  resolveEnvironment,
} from "./environments.ts";
import { deploy, deployTag } from "./deploy.ts";
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

export function render(report: commands.Report, json: boolean): string {
  if (json) return JSON.stringify({ title: report.title, ok: report.ok, ...report.data }, null, 2);
  return [report.title, ...report.lines.map((l) => `  ${l}`)].join("\n");
}

export function markdown(report: commands.Report): string {
  const icon = report.failed ? "❌" : report.ok ? "✅" : "⚠️";
  return `### ${icon} ${report.title}\n\n${report.lines.map((l) => `- ${l}`).join("\n")}\n\n`;
}

/** Where main prints and what it reads of its environment (the process's, or a test's). */
export interface Io {
  out(text: string): void;
  err(text: string): void;
  env(name: string): string | undefined;
}

const processIo: Io = {
  out: (t) => console.log(t),
  err: (t) => console.error(t),
  env: (n) => Deno.env.get(n),
};

/** Appends to the job summary (GITHUB_STEP_SUMMARY) when there is one: on success, refusal and failure alike. */
async function summarize(io: Io, text: string): Promise<void> {
  const path = io.env("GITHUB_STEP_SUMMARY");
  if (path) await Deno.writeTextFile(path, text, { append: true });
}

export async function main(argv: string[], io: Io = processIo): Promise<number> {
  let parsed: Parsed;
  try {
    parsed = parseCommandLine(argv);
  } catch (err) {
    return await refused(io, `ctl ${argv.filter((a) => !a.startsWith("-")).slice(0, 2).join(" ")}`.trim(), err);
  }
  const { command, values: o } = parsed;
  if (parsed.help) {
    io.out(command ? commandHelp(command) : overview());
    return EXIT.ok;
  }
  if (!command) {
    io.err(overview());
    return EXIT.refused;
  }
  const title = `sinkhole ${command.name}${o.env && o.env !== true ? `: ${o.env}` : ""}`;
  try {
    return await runCommand(command, parsed, io, title);
  } catch (err) {
    if (err instanceof RefusedError || err instanceof commands.InvalidModeError || err instanceof UsageError) {
      return await refused(io, title, err);
    }
    const e = err as Error;
    const text = `${e.name === "Error" ? "" : `${e.name}: `}${e.message}`;
    io.err(`ctl: failed: ${text}`);
    await summarize(io, `### ❌ ${title}: failed\n\n- ${text}\n\n`);
    return EXIT.failed;
  }
}

async function refused(io: Io, title: string, err: unknown): Promise<number> {
  const message = (err as Error).message;
  io.err(`ctl: refused: ${message}`);
  await summarize(io, `### ⛔ ${title}: refused\n\n- ${message}\n\n`);
  return EXIT.refused;
}

async function runCommand(command: CommandSpec, parsed: Parsed, io: Io, title: string): Promise<number> {
  const o = parsed.values;
  const json = o.json === true;
  // Every option is checked before any file is read or any request made.
  const since = numberOption("since", o.since)!;
  const timeout = numberOption("timeout", o.timeout)!;
  const modeAge = numberOption("mode-age", o["mode-age"])!;
  const queueAge = numberOption("queue-age", o["queue-age"])!;
  const within = numberOption("within", o.within);
  const expect = optionValue("expect", o.expect) as commands.Outcome | undefined;
  const tier = optionValue("tier", o.tier);
  const file = optionValue("file", o.file);
  const envName = optionValue("env", o.env);
  const environmentsFile = optionValue("environments", o.environments);
  const ranges = {
    attempts: range("attempts", optionValue("attempts", o.attempts)),
    interval: range("interval", optionValue("interval", o.interval)),
  };
  const mode = command.name === "mode set" ? commands.validateMode(parsed.arg!) : undefined;
  if (command.target === "env-or-file" && (file === undefined) === (envName === undefined)) {
    throw new UsageError(`${command.name} reads either --file FILE|- or --env NAME, exactly one`);
  }
  const ledgerOptions = { json, message: parsed.arg, ...ranges, deliveredOnce: o["delivered-once"] === true, within };
  if (file !== undefined) {
    let events: AttemptLine[];
    try {
      events = await readAttempts(file);
    } catch (err) {
      throw new Error(`reading ${file === "-" ? "standard input" : file}: ${(err as Error).message}`);
    }
    if (events.length === 0) {
      io.err(
        `ctl: no attempt line in ${file === "-" ? "standard input" : file}: the ledger reads the listener's JSON ` +
          "lines (SINKHOLE_LOG_FORMAT=json), not its text rendering",
      );
    }
    return await ledger(command.name as "report" | "expect", ledgerOptions, events, io);
  }

  // Everything that can refuse does so here, before any client or request exists.
  if (envName === undefined) throw new UsageError(`${command.name} needs --env NAME`);
  refuseProductionName(envName);
  const path = environmentsFile ?? io.env("SINKHOLE_ENVIRONMENTS") ?? DEFAULT_ENVIRONMENTS_FILE;
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new Error(`cannot read the environments file ${path}: ${(err as Error).message}`);
  }
  const env = resolveEnvironment(envName, parseEnvironments(text, path));

  let run: (d: commands.Deps) => Promise<commands.Report>;
  if (command.name === "status") run = commands.status;
  else if (command.name === "mode get") run = commands.modeGet;
  else if (command.name === "mode set") run = (d) => commands.modeSet(d, mode!, o.wait === true);
  else if (command.name === "probe") run = (d) => commands.probe(d, expect, timeout * 1000);
  else if (command.name === "cleanup") {
    run = (d) =>
      commands.cleanup(d, { scaleToZero: o["scale-to-zero"] === true, purgeQueue: o["purge-queue"] === true });
  } else if (command.name === "check") {
    run = (d) => commands.check(d, { modeAgeMs: modeAge * 60_000, queueAgeMs: queueAge * 60_000 });
  } else if (command.name === "deploy") {
    const tag = deployTag(o.tag);
    run = (d) => deploy(d, tag);
  } else {
    run = async (d) => {
      const lines = await commands.listenerLines(d, d.now() - since * 60_000, "attempt");
      const events = lines.filter((l) => l.event === "attempt") as AttemptLine[];
      const code = await ledger(command.name as "report" | "expect", ledgerOptions, events, io);
      return { title, ok: code === 0, lines: [], data: { printed: true } };
    };
  }

  const token = io.env("GITHUB_TOKEN");
  const repository = io.env("GITHUB_REPOSITORY");
  const gh = o["no-github"] !== true && token && repository
    ? github({ token, repository, baseUrl: io.env("GITHUB_API_URL") })
    : undefined;
  const deps: commands.Deps = {
    env,
    tier: tier === undefined ? undefined : tier === "on",
    ...commands.clients(env),
    exec: ecsExec({ region: env.region, cluster: env.cluster, container: env.mtaContainer }),
    issue: gh?.reconcile,
    issueSkipped: gh
      ? undefined
      : o["no-github"] === true
      ? "--no-github given"
      : "GITHUB_TOKEN or GITHUB_REPOSITORY is not set",
    now: Date.now,
    sleep: (ms) => new Promise((ok) => setTimeout(ok, ms)),
    pollMs: Number(io.env("SINKHOLE_CTL_POLL_MS") ?? "2000"),
  };
  await commands.refuseProduction(deps);
  const report = await run(deps);
  if (report.data.printed) return report.ok ? EXIT.ok : EXIT.unwanted;
  io.out(render(report, json));
  await summarize(io, markdown(report));
  return report.failed ? EXIT.failed : report.ok ? EXIT.ok : EXIT.unwanted;
}

function range(name: "attempts" | "interval", raw: string | undefined) {
  if (raw === undefined) return undefined;
  const r = parseRange(raw);
  if (!r) throw new UsageError(`--${name} must be N or MIN..MAX, got ${JSON.stringify(raw)}`);
  return r;
}

interface LedgerOptions {
  json: boolean;
  message?: string;
  attempts?: [number, number];
  interval?: [number, number];
  deliveredOnce: boolean;
  within?: number;
}

/**
 * `report`: every message's attempts (text, and a Markdown summary with a Mermaid timeline
 * when GITHUB_STEP_SUMMARY is set). `expect`: 0 when every expectation holds, 1 naming each
 * that does not.
 */
async function ledger(command: "report" | "expect", o: LedgerOptions, events: AttemptLine[], io: Io): Promise<number> {
  const hs = histories(events);
  if (command === "report") {
    io.out(o.json ? JSON.stringify(hs, null, 2) : renderReport(hs).join("\n"));
    await summarize(io, markdownReport(hs));
    return EXIT.ok;
  }
  const problems = unmet(hs, {
    message: o.message!,
    attempts: o.attempts,
    intervalS: o.interval,
    deliveredOnce: o.deliveredOnce,
    withinS: o.within,
  });
  const text = problems.length ? problems.map((p) => `unmet: ${p}`) : [`met: every expectation for ${o.message}`];
  io.out(text.join("\n"));
  await summarize(
    io,
    `### sinkhole expect: ${problems.length ? "⚠️ unmet" : "✅ met"}\n\n` + text.map((t) => `- ${t}`).join("\n") +
      "\n\n",
  );
  return problems.length ? EXIT.unwanted : EXIT.ok;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
