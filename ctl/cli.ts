/**
 * The control CLI's grammar, as data: every command, every option, what each takes and how
 * it is checked. Help, usage errors and validation are all derived from these tables, so a
 * command's `--help` cannot forget an option and no option escapes validation. Pure: no I/O.
 */

/** Exit codes, the contract docs/ctl.md states. */
export const EXIT = {
  /** Done, as wanted. */
  ok: 0,
  /** Done, but not as wanted: an expectation unmet, findings, a mode not confirmed. */
  unwanted: 1,
  /** Refused before anything was changed: bad usage, an invalid value or mode, production, an unknown environment. */
  refused: 2,
  /** Failed: AWS, ECS Exec, GitHub or a file could not do what was asked; what was done before is said. */
  failed: 3,
} as const;

export const EXIT_TEXT = `exit codes:
  0  done, as wanted
  1  done, but not as wanted (an expectation unmet, findings, the mode not confirmed)
  2  refused before anything changed (usage, an invalid value or mode, production, an unknown environment)
  3  failed (AWS, ECS Exec, GitHub or a file); the output says what was done before the failure`;

/** A usage mistake: refused, with the command's help pointer. */
export class UsageError extends Error {
  override name = "UsageError";
}

export interface NumberRule {
  /** Exclusive lower bound. */
  above: number;
  /** Inclusive upper bound. */
  atMost: number;
  unit: string;
}

export interface OptionSpec {
  /** A flag (no value) or an option with one value. */
  kind: "flag" | "value";
  /** The value's placeholder in help. */
  arg?: string;
  help: string;
  /** The value when the option is absent (shown in help). */
  default?: string;
  /** Values allowed, when the option is a choice. */
  choices?: readonly string[];
  /** A number within bounds. */
  number?: NumberRule;
}

/** The longest probe wait, mode age, queue age or look-back an option may ask for. */
export const MAX_PROBE_TIMEOUT_S = 3600;
export const MAX_AGE_MINUTES = 7 * 24 * 60;
export const MAX_SINCE_MINUTES = 14 * 24 * 60;
/** How far back `report` and `expect` read the log group when --since is not given. */
export const DEFAULT_SINCE_MINUTES = 24 * 60;

export const OPTIONS = {
  env: { kind: "value", arg: "NAME", help: "the environment, as named in the environments file (never production)" },
  environments: {
    kind: "value",
    arg: "FILE",
    help: "the environments file (default: $SINKHOLE_ENVIRONMENTS, else ctl/environments.json)",
  },
  json: { kind: "flag", help: "print the result as JSON instead of text" },
  tier: {
    kind: "value",
    arg: "on|off",
    choices: ["on", "off"],
    help:
      "whether the environment's SINKHOLE variable says the tier should run (check flags a tier that runs when off)",
  },
  wait: { kind: "flag", help: "wait until the listener logs the new mode (up to the cache TTL + 10 s)" },
  expect: {
    kind: "value",
    arg: "OUTCOME",
    choices: ["queued", "delivered", "bounced"],
    help: "the outcome every MTA task's probe must reach; without it, any settled outcome",
  },
  timeout: {
    kind: "value",
    arg: "SECONDS",
    default: "60",
    number: { above: 0, atMost: MAX_PROBE_TIMEOUT_S, unit: "seconds" },
    help: "how long each probe may take to settle",
  },
  "purge-queue": {
    kind: "flag",
    help: "also remove queued mail for sinkhole.test from every MTA task's queue (ECS Exec)",
  },
  "mode-age": {
    kind: "value",
    arg: "MINUTES",
    default: "120",
    number: { above: -1, atMost: MAX_AGE_MINUTES, unit: "minutes" },
    help: "a mode other than the default for longer than this is a finding (0: any)",
  },
  "queue-age": {
    kind: "value",
    arg: "MINUTES",
    default: "60",
    number: { above: -1, atMost: MAX_AGE_MINUTES, unit: "minutes" },
    help: "mail for sinkhole.test queued for longer than this is a finding (0: any)",
  },
  "no-github": { kind: "flag", help: "report only: do not open, update or close the GitHub issue" },
  file: {
    kind: "value",
    arg: "FILE|-",
    help: "read the listener's JSON log lines from a file (or - for standard input) instead of CloudWatch",
  },
  since: {
    kind: "value",
    arg: "MINUTES",
    number: { above: 0, atMost: MAX_SINCE_MINUTES, unit: "minutes" },
    help:
      `only attempts this recent: with --env, how far back to read the log group (default ${DEFAULT_SINCE_MINUTES}); ` +
      "with --file, older lines are left out (default: none)",
  },
  "message-id": {
    kind: "value",
    arg: "ID",
    help: "only the messages that carry this Message-ID (angle brackets optional)",
  },
  attempts: { kind: "value", arg: "N|MIN..MAX", help: "the number of attempts the message must have seen (whole)" },
  interval: { kind: "value", arg: "S..S", help: "every interval between attempts, in seconds, must be in this range" },
  "delivered-once": { kind: "flag", help: "the message must have been accepted exactly once" },
  within: {
    kind: "value",
    arg: "SECONDS",
    number: { above: -1, atMost: 30 * 24 * 3600, unit: "seconds" },
    help: "the delivery must come within this long of the first attempt",
  },
  tag: {
    kind: "value",
    arg: "sha-XXXXXXXX",
    help: "the image tag already pushed to cabal-sinkhole, to roll the tier to",
  },
  local: {
    kind: "flag",
    help: "a listener on this machine, over its control port (docs/control.md) instead of an environment",
  },
  url: { kind: "value", arg: "URL", help: "with --local: the control port (default http://127.0.0.1:2580)" },
  help: { kind: "flag", help: "print this help" },
} as const satisfies Record<string, OptionSpec>;

export type OptionName = keyof typeof OPTIONS;

export interface CommandSpec {
  /** The command's words: `status`, `mode set`. */
  name: string;
  /** The positional argument it takes, if any. */
  arg?: { name: string; help: string };
  summary: string;
  /** Where it reads from: an environment (AWS), or an environment or a log file; `local`: or --local too. */
  target: "env" | "env-or-file";
  local?: true;
  options: readonly OptionName[];
  /** What "done, but not as wanted" (exit 1) means for this command, if it can happen. */
  unwanted?: string;
  example: string;
}

const COMMON: readonly OptionName[] = ["env", "environments", "json", "help"];

/** Every command, in the order help lists them; ctl.ts dispatches by these names (CommandName). */
const COMMAND_TABLE = [
  {
    name: "status",
    summary: "the tier's service, tasks, Cloud Map instances, and the mode: stored and in effect",
    target: "env",
    options: [...COMMON, "tier"],
    example: "deno task ctl status --env stage",
  },
  {
    name: "mode get",
    summary: "the mode stored in SSM and the mode the listener last logged as in effect",
    target: "env",
    local: true,
    options: [...COMMON, "local", "url"],
    example: "deno task ctl mode get --env stage",
  },
  {
    name: "mode set",
    arg: { name: "VALUE", help: "the new mode, checked by the listener's own parser before it is stored" },
    summary: "store a new mode in SSM; the listener picks it up within its cache TTL",
    target: "env",
    local: true,
    options: [...COMMON, "wait", "local", "url"],
    unwanted: "with --wait, the listener did not log the new mode in time (the mode was stored)",
    example: "deno task ctl mode set 'defer reply=\"451 4.7.1 try later\"' --wait --env stage",
  },
  {
    name: "probe",
    summary: "send one probe message through every MTA task (ECS Exec) and follow it to its outcome",
    target: "env",
    options: [...COMMON, "expect", "timeout"],
    unwanted: "no MTA task ran, or a probe did not reach the --expect outcome",
    example: "deno task ctl probe --expect queued --timeout 120 --env stage",
  },
  {
    name: "cleanup",
    summary: "set the mode back to the default (defer); optionally purge probe mail (stopping the tier is QUIESCED)",
    target: "env",
    options: [...COMMON, "purge-queue"],
    example: "deno task ctl cleanup --purge-queue --env stage",
  },
  {
    name: "check",
    summary: "look for a forgotten mode, a tier running against its flag, stale probe mail; reconcile the issue",
    target: "env",
    options: [...COMMON, "tier", "mode-age", "queue-age", "no-github"],
    unwanted: "there are findings",
    example: "deno task ctl check --tier on --env stage",
  },
  {
    name: "report",
    summary: "every message's attempts from the retry ledger: count, intervals, outcome",
    target: "env-or-file",
    local: true,
    options: [...COMMON, "file", "since", "message-id", "local", "url"],
    unwanted: "no attempt in the log: no message reached the listener",
    example: "deno task ctl report --file sinkhole.log",
  },
  {
    name: "expect",
    arg: { name: "MESSAGE", help: 'the message: its recipient, or "sender > recipient"' },
    summary: "assert how a message was retried (attempts, intervals, exactly-once delivery)",
    target: "env-or-file",
    local: true,
    options: [
      ...COMMON,
      "file",
      "since",
      "message-id",
      "attempts",
      "interval",
      "delivered-once",
      "within",
      "local",
      "url",
    ],
    unwanted: "an expectation is not met",
    example: "deno task ctl expect user@example.test --attempts 3 --delivered-once --file sinkhole.log",
  },
  {
    name: "deploy",
    summary: "roll the tier's service to a pushed image (a new task-definition revision), wait, store the tag",
    target: "env",
    options: [...COMMON, "tag"],
    example: "deno task ctl deploy --tag sha-0123abcd --env stage",
  },
] as const satisfies readonly CommandSpec[];

/** A command's name, as the table spells it: `status`, `mode set`. */
export type CommandName = typeof COMMAND_TABLE[number]["name"];
export const COMMANDS: readonly CommandSpec[] = COMMAND_TABLE;

function optionLine(name: OptionName): string {
  const o: OptionSpec = OPTIONS[name];
  const head = `--${name}${o.arg ? ` ${o.arg}` : ""}${name === "help" ? ", -h" : ""}`;
  const tail = o.default !== undefined ? ` (default ${o.default})` : "";
  return `  ${head.padEnd(26)} ${o.help}${tail}`;
}

function synopsis(c: CommandSpec): string {
  const target = c.target === "env"
    ? (c.local ? "(--env NAME | --local)" : "--env NAME")
    : `(--env NAME | --file FILE|-${c.local ? " | --local" : ""})`;
  return `deno task ctl ${c.name}${c.arg ? ` ${c.arg.name}` : ""} ${target} [options]`;
}

/** `ctl --help`: every command, one line each, and the exit codes. */
export function overview(): string {
  return [
    "usage: deno task ctl COMMAND [ARG] --env NAME [options]",
    "",
    "The sinkhole control CLI. Production is always refused: by name, and by its cluster's environment tag.",
    "",
    "commands:",
    ...COMMANDS.map((c) => `  ${`${c.name}${c.arg ? ` ${c.arg.name}` : ""}`.padEnd(18)} ${c.summary}`),
    "",
    "Run `deno task ctl COMMAND --help` for a command's options.",
    "",
    EXIT_TEXT,
  ].join("\n");
}

/** `ctl COMMAND --help`: the synopsis, the argument, every option the command takes, the exit codes. */
export function commandHelp(c: CommandSpec): string {
  return [
    `usage: ${synopsis(c)}`,
    "",
    c.summary,
    "",
    ...(c.arg ? [`argument:`, `  ${c.arg.name.padEnd(26)} ${c.arg.help}`, ""] : []),
    "options:",
    ...c.options.map(optionLine),
    "",
    `example: ${c.example}`,
    "",
    EXIT_TEXT + (c.unwanted ? `\n  (1 here: ${c.unwanted})` : ""),
  ].join("\n");
}

/** A parsed command line: the command, its argument, its options' raw values. */
export interface Parsed {
  command?: CommandSpec;
  arg?: string;
  values: Partial<Record<OptionName, string | true>>;
  help: boolean;
}

const see = (c?: CommandSpec) => `; see deno task ctl ${c ? `${c.name} ` : ""}--help`;

/** Splits argv by the tables: unknown, repeated, misplaced or valueless options are usage errors. */
export function parseCommandLine(argv: readonly string[]): Parsed {
  const words: string[] = [];
  const values: Parsed["values"] = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--") {
      words.push(...argv.slice(i + 1));
      break;
    }
    if (a === "-h") {
      values.help = true;
      continue;
    }
    if (!a.startsWith("-") || a === "-") {
      words.push(a);
      continue;
    }
    if (!a.startsWith("--")) throw new UsageError(`unknown option ${a}${see()}`);
    const eq = a.indexOf("=");
    const name = (eq < 0 ? a.slice(2) : a.slice(2, eq)) as OptionName;
    const spec: OptionSpec | undefined = Object.hasOwn(OPTIONS, name) ? OPTIONS[name] : undefined;
    if (!spec) throw new UsageError(`unknown option --${name}${see()}`);
    if (values[name] !== undefined) throw new UsageError(`--${name} is given twice`);
    if (spec.kind === "flag") {
      if (eq >= 0) throw new UsageError(`--${name} takes no value`);
      values[name] = true;
      continue;
    }
    let value: string | undefined = eq >= 0 ? a.slice(eq + 1) : argv[i + 1];
    if (eq < 0) {
      if (value === undefined || (value.startsWith("--") && value.length > 2)) {
        throw new UsageError(`--${name} needs a value (${spec.arg})`);
      }
      i++;
    }
    value = value ?? "";
    values[name] = value;
  }
  const help = values.help === true;
  if (words.length === 0) return { values, help };
  const [first, second] = words;
  let command = COMMANDS.find((c) => c.name === first);
  let rest = words.slice(1);
  if (first === "mode") {
    if (second === undefined) {
      if (help) return { values, help };
      throw new UsageError(`mode needs get or set: deno task ctl mode get|set …${see()}`);
    }
    command = COMMANDS.find((c) => c.name === `mode ${second}`);
    if (!command) throw new UsageError(`unknown command: mode ${second} (mode get, mode set)${see()}`);
    rest = words.slice(2);
  }
  if (!command) {
    throw new UsageError(`unknown command: ${first} (one of ${COMMANDS.map((c) => c.name).join(", ")})${see()}`);
  }
  if (help) return { command, values, help };
  for (const name of Object.keys(values) as OptionName[]) {
    if (!command.options.includes(name)) {
      throw new UsageError(`--${name} does not apply to ${command.name}${see(command)}`);
    }
  }
  if (command.arg && rest.length === 0) {
    throw new UsageError(`${command.name} needs ${command.arg.name}: ${command.arg.help}${see(command)}`);
  }
  const extra = rest.slice(command.arg ? 1 : 0);
  if (extra.length) {
    throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])} to ${command.name}${see(command)}`);
  }
  return { command, arg: command.arg ? rest[0] : undefined, values, help };
}

/** An option's value checked against its spec: a choice, or a finite number within bounds. */
export function optionValue(name: OptionName, raw: string | true | undefined): string | undefined {
  const spec: OptionSpec = OPTIONS[name];
  const value = raw === undefined ? spec.default : raw === true ? undefined : raw;
  if (value === undefined) return undefined;
  if (!value.trim()) throw new UsageError(`--${name} must not be empty (${spec.arg})`);
  if (spec.choices && !spec.choices.includes(value)) {
    throw new UsageError(`--${name} must be one of ${spec.choices.join(", ")}, got ${JSON.stringify(value)}`);
  }
  return value;
}

/** A numeric option, in its unit: finite, above its lower bound, at most its upper. */
export function numberOption(name: OptionName, raw: string | true | undefined): number | undefined {
  const value = optionValue(name, raw);
  const rule = (OPTIONS[name] as OptionSpec).number;
  if (value === undefined || !rule) return undefined;
  const n = /^\s*[+]?(\d+(\.\d*)?|\.\d+)\s*$/.test(value) ? Number(value) : NaN;
  if (!Number.isFinite(n) || n <= rule.above || n > rule.atMost) {
    const low = rule.above < 0 ? `[0` : `(${rule.above}`;
    throw new UsageError(
      `--${name} must be a number of ${rule.unit} in ${low}, ${rule.atMost}], got ${JSON.stringify(value)}`,
    );
  }
  return n;
}
