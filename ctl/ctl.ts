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
  type CommandName,
  type CommandSpec,
  DEFAULT_SINCE_MINUTES,
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
import { Ledger, type LedgerAnswer, ledgerAnswer, parseRange, readLedger } from "./report.ts";
import { DEFAULT_LOCAL_URL, localLedger, localModeGet, localModeSet } from "./local.ts";

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

/** A command's options and argument, every one checked (cli.ts's rules) before any file is read or request made. */
interface Checked {
  command: CommandSpec;
  parsed: Parsed;
  title: string;
  io: Io;
  since?: number;
  timeout: number;
  modeAge: number;
  queueAge: number;
  expect?: commands.Outcome;
  mode?: commands.ValidMode;
  messageId?: string;
  /** deploy's image tag, checked (deploy.ts's pattern). */
  tag?: string;
  ledger: LedgerOptions;
}

/** What each command of the grammar (cli.ts, COMMANDS) does with an environment: one runner a name. */
const RUNNERS: Record<CommandName, (d: commands.Deps, c: Checked) => Promise<commands.Report>> = {
  status: (d) => commands.status(d),
  "mode get": (d) => commands.modeGet(d),
  "mode set": (d, c) => commands.modeSet(d, c.mode!, c.parsed.values.wait === true),
  probe: (d, c) => commands.probe(d, c.expect, c.timeout * 1000),
  cleanup: (d, c) => commands.cleanup(d, { purgeQueue: c.parsed.values["purge-queue"] === true }),
  check: (d, c) => commands.check(d, { modeAgeMs: c.modeAge * 60_000, queueAgeMs: c.queueAge * 60_000 }),
  deploy: (d, c) => deploy(d, c.tag!),
  report: ledgerFromLogs,
  expect: ledgerFromLogs,
};

/** `report` and `expect` with --env: the attempt lines of the sinkhole's log group since --since. */
async function ledgerFromLogs(d: commands.Deps, c: Checked): Promise<commands.Report> {
  const minutes = c.since ?? DEFAULT_SINCE_MINUTES;
  const ledger = new Ledger({ messageId: c.messageId });
  for (const line of await commands.listenerLines(d, d.now() - minutes * 60_000, "attempt")) ledger.addEvent(line);
  const source = { name: `${d.env.sinkholeLogGroup} (last ${minutes} min)`, isFile: false };
  const code = await answer(c.io, ledgerAnswer(ledgerCommand(c), ledger, source, ledgerOutput(c)));
  return { title: c.title, ok: code === 0, lines: [], data: { printed: true } };
}

const ledgerCommand = (c: Checked) => c.command.name as "report" | "expect";

/** What report and expect print, and what expect holds the ledger to. */
function ledgerOutput(c: Checked) {
  const o = c.ledger;
  const expectation = {
    message: o.message!,
    attempts: o.attempts,
    intervalS: o.interval,
    deliveredOnce: o.deliveredOnce,
    withinS: o.within,
  };
  return { json: o.json, expectation };
}

async function runCommand(command: CommandSpec, parsed: Parsed, io: Io, title: string): Promise<number> {
  const o = parsed.values;
  const json = o.json === true;
  // Every option is checked before any file is read or any request made.
  const checked: Checked = {
    command,
    parsed,
    title,
    io,
    since: numberOption("since", o.since),
    timeout: numberOption("timeout", o.timeout)!,
    modeAge: numberOption("mode-age", o["mode-age"])!,
    queueAge: numberOption("queue-age", o["queue-age"])!,
    expect: optionValue("expect", o.expect) as commands.Outcome | undefined,
    messageId: optionValue("message-id", o["message-id"]),
    ledger: {
      json,
      message: parsed.arg,
      attempts: range("attempts", optionValue("attempts", o.attempts)),
      interval: range("interval", optionValue("interval", o.interval)),
      deliveredOnce: o["delivered-once"] === true,
      within: numberOption("within", o.within),
    },
  };
  const tier = optionValue("tier", o.tier);
  const file = optionValue("file", o.file);
  const envName = optionValue("env", o.env);
  const environmentsFile = optionValue("environments", o.environments);
  if (command.name === "mode set") checked.mode = commands.validateMode(parsed.arg!);
  if (command.name === "deploy") checked.tag = deployTag(o.tag);
  const url = optionValue("url", o.url);
  if (url !== undefined && o.local !== true) throw new UsageError("--url goes with --local");
  if (o.local === true) return await runLocal(checked, url ?? DEFAULT_LOCAL_URL, [file, envName]);
  if (command.target === "env-or-file" && (file === undefined) === (envName === undefined)) {
    throw new UsageError(`${command.name} reads either --file FILE|- or --env NAME, exactly one`);
  }
  if (file !== undefined) {
    const name = file === "-" ? "standard input" : file;
    let ledger: Ledger;
    try {
      // With --file, --since leaves out older attempts only when given.
      ledger = await readLedger(file, {
        sinceMs: checked.since === undefined ? undefined : Date.now() - checked.since * 60_000,
        messageId: checked.messageId,
      });
    } catch (err) {
      throw new Error(`reading ${name}: ${(err as Error).message}`);
    }
    return await answer(
      io,
      ledgerAnswer(ledgerCommand(checked), ledger, { name, isFile: true }, ledgerOutput(checked)),
    );
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

  const run = RUNNERS[command.name as CommandName];

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
  const report = await run(deps, checked);
  if (report.data.printed) return report.ok ? EXIT.ok : EXIT.unwanted;
  io.out(render(report, json));
  await summarize(io, markdown(report));
  return report.failed ? EXIT.failed : report.ok ? EXIT.ok : EXIT.unwanted;
}

/** A command with --local: over the control port of a listener on this machine (ctl/local.ts). */
async function runLocal(c: Checked, url: string, others: (string | undefined)[]): Promise<number> {
  if (others.some((x) => x !== undefined)) {
    throw new UsageError(`${c.command.name} reads exactly one of --env NAME, --file FILE|- and --local`);
  }
  if (c.command.name === "report" || c.command.name === "expect") {
    const since = c.since === undefined ? undefined : Date.now() - c.since * 60_000;
    const ledger = await localLedger(url, { sinceMs: since, messageId: c.messageId });
    const source = { name: `the listener at ${url}`, isFile: false };
    return await answer(c.io, ledgerAnswer(ledgerCommand(c), ledger, source, ledgerOutput(c)));
  }
  const report = c.command.name === "mode set"
    ? await localModeSet(url, c.mode!, `${c.title}: local`)
    : await localModeGet(url, `${c.title}: local`);
  c.io.out(render(report, c.ledger.json));
  await summarize(c.io, markdown(report));
  return EXIT.ok;
}

function range(name: "attempts" | "interval", raw: string | undefined) {
  if (raw === undefined) return undefined;
  const r = parseRange(raw, name === "attempts");
  if (!r) {
    const whole = name === "attempts" ? " (whole numbers)" : "";
    throw new UsageError(`--${name} must be N or MIN..MAX, got ${JSON.stringify(raw)}${whole}`);
  }
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

/** `report` or `expect`'s answer carried out: printed, said, summarized; its exit code. */
async function answer(io: Io, a: LedgerAnswer): Promise<number> {
  if (a.out) io.out(a.out);
  for (const line of a.err) io.err(line);
  await summarize(io, a.summary);
  return a.code;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
