/**
 * The control commands, thin over the AWS SDK (SSM, ECS, CloudWatch Logs, Cloud Map) and
 * GitHub. Each returns a Report that ctl.ts prints as text, JSON or a Markdown summary.
 */
import { GetParameterCommand, GetParameterHistoryCommand, PutParameterCommand, SSMClient } from "@aws-sdk/client-ssm";
import {
  DescribeClustersCommand,
  DescribeServicesCommand,
  DescribeTasksCommand,
  ECSClient,
  ListTasksCommand,
} from "@aws-sdk/client-ecs";
import { CloudWatchLogsClient, FilterLogEventsCommand } from "@aws-sdk/client-cloudwatch-logs";
import { ListInstancesCommand, ListServicesCommand, ServiceDiscoveryClient } from "@aws-sdk/client-servicediscovery";
import { DEFAULT_MODE, type LogLine, parseLogLine, parseScenario, type SessionEvent } from "../listener.ts";
import { type Environment, isProduction, RefusedError } from "./environments.ts";
import { type Exec, mtaCommands, type Task } from "./exec.ts";
import type { IssueResult } from "./github.ts";
import { type AttemptLine, histories, unmet } from "./report.ts";

export interface Report {
  title: string;
  ok: boolean;
  /** Something could not be done (exit 3); `lines` say what was done before. */
  failed?: boolean;
  lines: string[];
  data: Record<string, unknown>;
}

export interface Deps {
  env: Environment;
  /** Whether the tier is meant to run (the environment's SINKHOLE variable); undefined: not known here. */
  tier?: boolean;
  ssm: SSMClient;
  ecs: ECSClient;
  logs: CloudWatchLogsClient;
  discovery: ServiceDiscoveryClient;
  exec: Exec;
  /** For `check`: reconciles the GitHub issue (absent: report only). */
  issue?: (environment: string, findings: string[]) => Promise<IssueResult>;
  /** Why there is no `issue` (no token, --no-github): said in check's output, never silently skipped. */
  issueSkipped?: string;
  now: () => number;
  sleep: (ms: number) => Promise<void>;
  /** How often `--wait` and `probe` poll. */
  pollMs: number;
}

/** An AWS request failed: the message names the call, what it was about, the region and AWS's own words. */
export class AwsCallError extends Error {
  override name = "AwsCallError";
}

/** The input fields that say what a request was about, in the order they are named. */
const SUBJECTS = ["cluster", "Name", "logGroupName", "service", "services", "ServiceId", "clusters", "tasks"] as const;

/** What a request was about, from its input: `cluster cabal-mail`, `Name /cabal/sinkhole_mode`. */
export function subjectOf(input: Record<string, unknown>): string {
  const parts: string[] = [];
  for (const key of SUBJECTS) {
    const v = input[key];
    if (v === undefined) continue;
    const text = Array.isArray(v) ? v.map((x) => String(x).split("/").pop()).join(",") : String(v);
    parts.push(`${key} ${text}`);
    if (parts.length === 2) break;
  }
  return parts.join(", ");
}

/** What is used here of an SDK client's middleware stack (the SDK's MiddlewareStack.add). */
interface MiddlewareStack {
  add(
    middleware: (
      next: (args: { input: object }) => Promise<unknown>,
      context: { commandName?: string },
    ) => (args: { input: object }) => Promise<unknown>,
    options: { step: "initialize"; name: string },
  ): void;
}

/**
 * A client whose failures say what they were about (AwsCallError; the SDK's error is the
 * cause), by a middleware at the first step of the SDK's stack, so it sees every failure
 * of every command, retries included.
 */
function described<C extends { middlewareStack: MiddlewareStack }>(client: C, service: string, region: string): C {
  client.middlewareStack.add(
    (next, context) => async (args) => {
      try {
        return await next(args);
      } catch (err) {
        const e = err as Error;
        const call = (context.commandName ?? "").replace(/Command$/, "");
        const about = subjectOf(args.input as Record<string, unknown>);
        throw new AwsCallError(
          `${service} ${call}${about ? ` (${about})` : ""} in ${region}: ${e.name}: ${e.message}`,
          {
            cause: err,
          },
        );
      }
    },
    { step: "initialize", name: "sinkholeDescribedErrors" },
  );
  return client;
}

/** Builds the SDK clients for an environment; the SDK honours AWS_ENDPOINT_URL (tests: moto). */
export function clients(env: Environment) {
  const config = { region: env.region, maxAttempts: 3 };
  return {
    ssm: described(new SSMClient(config), "SSM", env.region),
    ecs: described(new ECSClient(config), "ECS", env.region),
    logs: described(new CloudWatchLogsClient(config), "CloudWatch Logs", env.region),
    discovery: described(new ServiceDiscoveryClient(config), "Cloud Map", env.region),
  };
}

/** Refuses a mode the listener would not accept, before anything is sent. */
export class InvalidModeError extends Error {
  override name = "InvalidModeError";
}

/** A mode value the listener accepts, in its canonical text: only `validateMode` makes one. */
export type ValidMode = string & { readonly validated: unique symbol };

/** The value as the listener will read it, or a refusal with the listener's own reason (parsed once, here). */
export function validateMode(value: string): ValidMode {
  const sc = parseScenario(value);
  if (typeof sc === "string") throw new InvalidModeError(`"${value}" is not a mode the listener accepts: ${sc}`);
  return sc.text as ValidMode;
}

/**
 * Refuses production by what it is, not only by name: the target cluster's environment tag
 * (Cabalmail's default_tags put `environment` on every resource of an account). The first
 * request every command makes, and a read; a refusal stops the command before any other.
 */
export async function refuseProduction(d: Deps): Promise<void> {
  const res = await d.ecs.send(new DescribeClustersCommand({ clusters: [d.env.cluster], include: ["TAGS"] }));
  const cluster = res.clusters?.find((c) => c.status !== "INACTIVE");
  if (!cluster) {
    throw new RefusedError(
      `cluster ${d.env.cluster} not found in ${d.env.region}: environment ${d.env.name} is not here`,
    );
  }
  for (const tag of cluster.tags ?? []) {
    if (["environment", "env"].includes((tag.key ?? "").toLowerCase()) && isProduction(tag.value ?? "")) {
      throw new RefusedError(
        `cluster ${d.env.cluster} in ${d.env.region} is tagged ${tag.key}=${tag.value}: that is production, ` +
          `whatever the environments file calls it; sinkhole is never operated there`,
      );
    }
  }
}

/** An ECS Exec result read as what it is: a failure is an error, never output. */
async function execOk(d: Deps, task: Task, command: string, what: string): Promise<string> {
  const res = await d.exec.run(task, command);
  if (res.code !== 0) {
    throw new ExecError(`${what} in ${task.id} failed (exit ${res.code}): ${res.output.trim().slice(0, 300)}`);
  }
  return res.output;
}

/** A command in an MTA task could not run, or failed. */
export class ExecError extends Error {
  override name = "ExecError";
}

async function currentMode(d: Deps) {
  const p = (await d.ssm.send(new GetParameterCommand({ Name: d.env.parameter }))).Parameter;
  const history = await d.ssm.send(new GetParameterHistoryCommand({ Name: d.env.parameter, MaxResults: 50 }));
  const last = history.Parameters?.at(-1);
  return {
    value: p?.Value ?? "",
    version: p?.Version,
    changedAt: p?.LastModifiedDate?.toISOString(),
    changedBy: last?.LastModifiedUser ?? "unknown",
  };
}

async function service(d: Deps, name: string) {
  const res = await d.ecs.send(new DescribeServicesCommand({ cluster: d.env.cluster, services: [name] }));
  const s = res.services?.find((x) => x.status !== "INACTIVE");
  return s
    ? {
      exists: true,
      desired: s.desiredCount ?? 0,
      running: s.runningCount ?? 0,
      pending: s.pendingCount ?? 0,
      deployments: s.deployments?.length ?? 0,
    }
    : { exists: false, desired: 0, running: 0, pending: 0, deployments: 0 };
}

/** Health of the sinkhole's own tasks (the container health check: /sinkhole --healthcheck). */
async function sinkholeHealth(d: Deps): Promise<string[]> {
  const list = await d.ecs.send(
    new ListTasksCommand({ cluster: d.env.cluster, serviceName: d.env.sinkholeService, desiredStatus: "RUNNING" }),
  );
  if (!list.taskArns?.length) return [];
  const desc = await d.ecs.send(new DescribeTasksCommand({ cluster: d.env.cluster, tasks: list.taskArns }));
  return (desc.tasks ?? []).map((t) =>
    `${t.taskArn?.split("/").pop()}: ${t.lastStatus ?? "?"}, ${t.healthStatus ?? "UNKNOWN"}`
  );
}

async function mtaTasks(d: Deps): Promise<Task[]> {
  const list = await d.ecs.send(
    new ListTasksCommand({ cluster: d.env.cluster, serviceName: d.env.mtaService, desiredStatus: "RUNNING" }),
  );
  const arns = list.taskArns ?? [];
  if (arns.length === 0) return [];
  const desc = await d.ecs.send(new DescribeTasksCommand({ cluster: d.env.cluster, tasks: arns }));
  return (desc.tasks ?? []).map((t) => ({ arn: t.taskArn!, id: t.taskArn!.split("/").pop()! }));
}

export async function status(d: Deps): Promise<Report> {
  const [tier, health, mode, instances, effect] = await Promise.all([
    service(d, d.env.sinkholeService),
    sinkholeHealth(d),
    currentMode(d),
    cloudMapInstances(d),
    modeInEffect(d),
  ]);
  const lines = [
    `sinkhole service ${d.env.sinkholeService}: ${
      tier.exists
        ? `desired ${tier.desired}, running ${tier.running}, ` +
          `pending ${tier.pending}, deployments ${tier.deployments}`
        : "not found"
    }`,
    `tasks: ${health.length ? health.join("; ") : "none running"}`,
    `Cloud Map sinkhole.${d.env.namespace}: ${instances ?? "no service"} instance(s)`,
    ...modeLines(mode, effect),
    `flag for ${d.env.name}: sinkhole ${d.tier === undefined ? "not given (--tier on|off)" : d.tier ? "on" : "off"}`,
  ];
  return {
    title: `sinkhole status: ${d.env.name}`,
    ok: true,
    lines,
    data: { tier, health, mode, inEffect: effect, cloudMapInstances: instances },
  };
}

async function cloudMapInstances(d: Deps): Promise<number | undefined> {
  const services = await d.discovery.send(new ListServicesCommand({}));
  const svc = services.Services?.find((s) => s.Name === "sinkhole");
  if (!svc?.Id) return undefined;
  const inst = await d.discovery.send(new ListInstancesCommand({ ServiceId: svc.Id }));
  return inst.Instances?.length ?? 0;
}

export async function modeGet(d: Deps): Promise<Report> {
  const [mode, effect] = await Promise.all([currentMode(d), modeInEffect(d)]);
  return {
    title: `sinkhole mode: ${d.env.name}`,
    ok: true,
    lines: modeLines(mode, effect),
    data: { mode, inEffect: effect },
  };
}

/** How far back `status` and `mode get` look for the listener's last word on its mode. */
export const IN_EFFECT_LOOKBACK_MS = 7 * 24 * 3_600_000;
/** The listener's events that say which mode is in effect. */
const MODE_EVENTS: readonly string[] = ["start", "mode", "mode_invalid", "mode_error"];
/** The same as a CloudWatch JSON filter pattern (moto ignores it, so the lines are read back by event too). */
const MODE_EVENTS_PATTERN = `{ ${MODE_EVENTS.map((e) => `($.event = "${e}")`).join(" || ")} }`;

/** The mode in effect, from the listener's last start, mode, mode_invalid or mode_error line. */
export interface InEffect {
  mode?: string;
  at?: string;
  /** What the last line said beyond the mode (a refused value, an unreadable source), or why nothing is known. */
  note?: string;
}

export async function modeInEffect(d: Deps): Promise<InEffect> {
  let lines: LogLine[];
  try {
    lines = await listenerLines(d, d.now() - IN_EFFECT_LOOKBACK_MS, undefined, MODE_EVENTS_PATTERN);
  } catch (err) {
    return { note: `not known: ${(err as Error).message}` };
  }
  const last = lines.filter((l) => MODE_EVENTS.includes(l.event))
    .sort((a, b) => a.ts.localeCompare(b.ts)).at(-1);
  if (!last) return { note: `not known: the listener logged no mode in ${d.env.sinkholeLogGroup} in the last 7 days` };
  if (last.event === "start" || last.event === "mode") return { mode: last.mode, at: last.ts };
  if (last.event === "mode_invalid") {
    return { mode: last.keeping, at: last.ts, note: `it refused ${JSON.stringify(last.value)}: ${last.reason}` };
  }
  if (last.event === "mode_error") {
    return { mode: last.keeping, at: last.ts, note: `its source failed: ${last.reason}` };
  }
  return {};
}

/** Why the listener would refuse a stored value, or undefined when it accepts it. */
function storedProblem(value: string): string | undefined {
  const sc = parseScenario(value);
  return typeof sc === "string" ? sc : undefined;
}

/** The stored value and the mode in effect, side by side: an invalid stored value is never shown as in effect. */
function modeLines(mode: Awaited<ReturnType<typeof currentMode>>, effect: InEffect): string[] {
  const problem = storedProblem(mode.value);
  return [
    `mode stored: ${
      JSON.stringify(mode.value)
    } (version ${mode.version}, changed ${mode.changedAt} by ${mode.changedBy})` +
    (problem ? ` — the listener refuses it: ${problem}` : ""),
    effect.mode === undefined
      ? `mode in effect: ${effect.note}`
      : `mode in effect: ${JSON.stringify(effect.mode)} (the listener's line at ${effect.at})` +
        (effect.note ? `; ${effect.note}` : ""),
  ];
}

/** The listener's log events (its typed JSON lines) in the sinkhole log group since `since`, matching a term. */
/** Pages of log events read at most per query (each up to 1 MB or 10,000 events). */
const MAX_LOG_PAGES = 20;

export async function listenerLines(d: Deps, since: number, term?: string, pattern?: string): Promise<LogLine[]> {
  const out: LogLine[] = [];
  let nextToken: string | undefined;
  for (let page = 0; page < MAX_LOG_PAGES; page++) {
    const res = await d.logs.send(
      new FilterLogEventsCommand({
        logGroupName: d.env.sinkholeLogGroup,
        startTime: since,
        filterPattern: pattern ?? JSON.stringify(term),
        nextToken,
      }),
    );
    for (const e of res.events ?? []) {
      const line = parseLogLine(e.message ?? "");
      if (line) out.push(line);
    }
    nextToken = res.nextToken;
    if (!nextToken) break;
  }
  return out;
}

export async function modeSet(d: Deps, mode: ValidMode, wait: boolean): Promise<Report> {
  const title = `sinkhole mode: ${d.env.name}`;
  const since = d.now() - 1000;
  const put = await d.ssm.send(
    new PutParameterCommand({ Name: d.env.parameter, Value: mode, Type: "String", Overwrite: true }),
  );
  const lines = [`mode set to ${mode} (${d.env.parameter} version ${put.Version})`];
  const data: Record<string, unknown> = { mode, version: put.Version };
  if (!wait) return { title, ok: true, lines, data };
  const limit = (d.env.cacheTtlSeconds + 10) * 1000;
  const t0 = d.now();
  try {
    while (d.now() - t0 <= limit) {
      const seen = (await listenerLines(d, since, mode)).some((l) =>
        (l.event === "mode" || l.event === "start") && l.mode === mode
      );
      if (seen) {
        lines.push(`the listener logged mode ${mode} after ${Math.round((d.now() - t0) / 1000)} s`);
        return { title, ok: true, lines, data: { ...data, confirmed: true } };
      }
      await d.sleep(d.pollMs);
    }
  } catch (err) {
    // The mode was stored: say so, and that only the confirmation failed.
    lines.push(`not confirmed: waiting for the listener's line failed: ${(err as Error).message}`);
    return { title, ok: false, failed: true, lines, data: { ...data, confirmed: false } };
  }
  lines.push(
    `not confirmed: not seen in ${d.env.sinkholeLogGroup} within ${limit / 1000} s ` +
      `(TTL ${d.env.cacheTtlSeconds} s + 10 s): is the tier running? (ctl status)`,
  );
  return { title, ok: false, lines, data: { ...data, confirmed: false } };
}

export type Outcome = "queued" | "delivered" | "bounced" | "unknown";

/** What the sinkhole's session logs say about a recipient. */
function sinkholeVerdict(lines: LogLine[], rcpt: string): { codes: number[]; delivered: boolean } {
  const codes: number[] = [];
  let delivered = false;
  for (const l of lines.filter((x): x is SessionEvent & { ts: string } => x.event === "session")) {
    for (const tx of l.transactions) {
      const r = tx.rcpts.find((x) => x.to.toLowerCase() === rcpt.toLowerCase());
      if (!r) continue;
      codes.push(r.code);
      if (r.code === 250 && tx.result === 250) delivered = true;
    }
  }
  return { codes, delivered };
}

/**
 * A probe's state: queued means in the MTA's queue after the sinkhole answered 4xx (a
 * message still on its first attempt is not queued yet); delivered means the sinkhole
 * accepted it and it left the queue; bounced means the sinkhole answered 5xx.
 */
export function classify(queued: boolean, delivered: boolean, codes: number[]): Outcome {
  if (queued) return codes.some((c) => c >= 400 && c < 500) ? "queued" : "unknown";
  if (delivered) return "delivered";
  return codes.some((c) => c >= 500) ? "bounced" : "unknown";
}

export async function probe(d: Deps, expect: Outcome | undefined, timeoutMs: number): Promise<Report> {
  const tasks = await mtaTasks(d);
  const run = `${d.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
  const since = d.now() - 1000;
  const results: {
    task: string;
    rcpt: string;
    outcome: Outcome;
    queued: boolean;
    sinkholeCodes: number[];
    ledger: string[];
  }[] = [];
  const lines: string[] = [];
  if (tasks.length === 0) lines.push(`no running ${d.env.mtaService} task`);
  for (const [i, task] of tasks.entries()) {
    const rcpt = `probe-${run}-${i}@sinkhole.test`;
    await execOk(d, task, mtaCommands.sendProbe(rcpt, `${run}-${i}`), "sending the probe");
    const t0 = d.now();
    let outcome: Outcome = "unknown";
    let queued = false;
    let codes: number[] = [];
    let logged: LogLine[] = [];
    for (;;) {
      queued = (await execOk(d, task, mtaCommands.mailq(), "mailq")).includes(rcpt);
      logged = await listenerLines(d, since, `probe-${run}-${i}`);
      const v = sinkholeVerdict(logged, rcpt);
      codes = v.codes;
      outcome = classify(queued, v.delivered, codes);
      const settled = expect ? outcome === expect : outcome !== "unknown";
      if (settled || d.now() - t0 >= timeoutMs) break;
      await d.sleep(d.pollMs);
    }
    // The retry ledger's view of the probe: its attempts, and a delivery exactly once when delivered.
    const history = histories(logged.filter((l) => l.event === "attempt") as AttemptLine[]);
    const once = outcome === "delivered" ? unmet(history, { message: rcpt, deliveredOnce: true }) : [];
    results.push({ task: task.id, rcpt, outcome, queued, sinkholeCodes: codes, ledger: once });
    lines.push(
      `${task.id}: ${rcpt} ${outcome}${queued ? " (in mailq)" : ""}; sinkhole replies ${
        codes.length ? codes.join(", ") : "none logged"
      }; ${history[0] ? `${history[0].attempts.length} attempt(s) in the ledger` : "no attempt in the ledger"}`,
      ...once.map((p) => `${task.id}: unmet: ${p}`),
    );
  }
  const ok = tasks.length > 0 && (!expect || results.every((r) => r.outcome === expect && r.ledger.length === 0));
  if (expect) lines.push(ok ? `expectation met: ${expect}` : `expected ${expect} on every task: not met`);
  return { title: `sinkhole probe: ${d.env.name}`, ok, lines, data: { run, expect, results } };
}

/** A sendmail queue id (what the purge prints, one a line). */
const QUEUE_ID = /^[A-Za-z0-9]{6,20}$/;

/**
 * Sets the mode back to the default and, with `purgeQueue`, removes sinkhole.test mail from every MTA task.
 * It does not scale the tier: the service's desired count belongs to the Terraform that owns the service
 * (Cabalmail's `desired_count = var.quiesced ? 0 : 1`, cabal-infra terraform/infra/modules/ecs/sinkhole.tf;
 * this project's module the same way with QUIESCED), so an UpdateService to 0 would be undone by the next
 * apply. Stopping the tier is that flag and an apply (docs/runbook.md, docs/cabalmail.md).
 */
export async function cleanup(d: Deps, opts: { purgeQueue: boolean }): Promise<Report> {
  const title = `sinkhole cleanup: ${d.env.name}`;
  const lines: string[] = [];
  const data: Record<string, unknown> = {};
  const put = await d.ssm.send(
    new PutParameterCommand({ Name: d.env.parameter, Value: DEFAULT_MODE, Type: "String", Overwrite: true }),
  );
  lines.push(`mode set to ${DEFAULT_MODE} (${d.env.parameter} version ${put.Version})`);
  data.mode = DEFAULT_MODE;
  try {
    if (opts.purgeQueue) {
      const purged: Record<string, string[]> = {};
      const tasks = await mtaTasks(d);
      if (tasks.length === 0) lines.push(`no running ${d.env.mtaService} task: no queue purged`);
      for (const task of tasks) {
        const out = await execOk(d, task, mtaCommands.purge(d.env.mtaQueueDir), "purging the queue");
        const ids = out.split("\n").map((s) => s.trim()).filter(Boolean);
        const bad = ids.find((id) => !QUEUE_ID.test(id));
        if (bad !== undefined) {
          throw new ExecError(`purging the queue in ${task.id}: not a queue id: ${bad.slice(0, 100)}`);
        }
        purged[task.id] = ids;
        lines.push(`${task.id}: removed ${ids.length} queued sinkhole.test message(s)`);
      }
      data.purged = purged;
    }
  } catch (err) {
    // What was done is said; what failed is the last line (exit 3).
    lines.push(`failed: ${(err as Error).name}: ${(err as Error).message}`);
    return { title, ok: false, failed: true, lines, data };
  }
  return { title, ok: true, lines, data };
}

/**
 * The image tag Cabalmail's Terraform seeds `/cabal/deployed_image_tag/<tier>` with, for every tier, before
 * any image was deployed (cabal-infra terraform/infra/main.tf, `local.bootstrap_sentinel`; the ecs module's
 * `placeholder_image_tag` in terraform/infra/modules/ecs/locals.tf runs a public nginx image in its place).
 */
export const BOOTSTRAP_SENTINEL = "bootstrap-placeholder";

/** What `check` needs to know to say whether the tier was ever deployed. */
export interface DeploymentFacts {
  /** The sinkhole ECS service exists (ACTIVE or DRAINING) in the environment's cluster. */
  service: boolean;
  /** The image tag parameter's value; undefined when the parameter does not exist. */
  imageTag?: string;
}

/**
 * Whether the tier is deployed, and if not, why. Not deployed means exactly one of:
 * - no sinkhole ECS service in the cluster (Cabalmail with `var.sinkhole` false creates none, and then no log
 *   group and no mode parameter either: cabal-infra terraform/infra/modules/ecs/sinkhole.tf, every resource
 *   `count = var.sinkhole ? 1 : 0`);
 * - the service exists but the image tag parameter holds Cabalmail's bootstrap sentinel: no sinkhole image was
 *   ever deployed, the task runs Cabalmail's placeholder image.
 * A missing tag parameter says nothing either way (the service decides); a missing log group is not consulted.
 */
export function deployment(f: DeploymentFacts, env: Environment): { deployed: true } | {
  deployed: false;
  reason: string;
} {
  if (!f.service) {
    return { deployed: false, reason: `no ECS service ${env.sinkholeService} in cluster ${env.cluster}` };
  }
  if (f.imageTag?.trim() === BOOTSTRAP_SENTINEL) {
    return {
      deployed: false,
      reason: `${env.imageTagParameter} is ${BOOTSTRAP_SENTINEL}: no sinkhole image was ever deployed ` +
        `(the service runs Cabalmail's placeholder image)`,
    };
  }
  return { deployed: true };
}

/** The image tag parameter's value, or undefined when there is none (any other failure is an error). */
async function imageTag(d: Deps): Promise<string | undefined> {
  try {
    return (await d.ssm.send(new GetParameterCommand({ Name: d.env.imageTagParameter }))).Parameter?.Value;
  } catch (err) {
    if ((err as Error).cause instanceof Error && ((err as Error).cause as Error).name === "ParameterNotFound") {
      return undefined;
    }
    throw err;
  }
}

export async function check(d: Deps, opts: { modeAgeMs: number; queueAgeMs: number }): Promise<Report> {
  const title = `sinkhole check: ${d.env.name}`;
  const tier = await service(d, d.env.sinkholeService);
  const deployed = deployment({ service: tier.exists, imageTag: await imageTag(d) }, d.env);
  if (!deployed.deployed) {
    // Nothing of the tier to look at: no finding, and an issue left open from an earlier deployment is closed.
    const issue = d.issue ? await d.issue(d.env.name, []) : { action: "none" as const };
    const lines = [`not deployed: ${deployed.reason}; nothing to check`];
    if (d.tier === true) lines.push(`the flag for ${d.env.name} is on: the tier is meant to run but is not deployed`);
    if (issue.action !== "none") lines.push(`GitHub issue #${issue.number} ${issue.action}`);
    else if (!d.issue) lines.push(`GitHub issue not reconciled: ${d.issueSkipped ?? "no GitHub client"}`);
    return { title, ok: true, lines, data: { deployed: false, reason: deployed.reason, findings: [], issue } };
  }
  const findings: string[] = [];
  const mode = await currentMode(d);
  const problem = storedProblem(mode.value);
  if (problem) {
    findings.push(
      `the stored mode ${JSON.stringify(mode.value)} (set ${mode.changedAt} by ${mode.changedBy}) is refused by ` +
        `the listener, which keeps its previous mode: ${problem}`,
    );
  }
  const age = mode.changedAt ? d.now() - Date.parse(mode.changedAt) : 0;
  if (mode.value.trim() !== DEFAULT_MODE && age > opts.modeAgeMs) {
    findings.push(
      `mode is \`${mode.value}\` since ${mode.changedAt} (${Math.round(age / 60000)} min, set by ${mode.changedBy}); ` +
        `the default is \`${DEFAULT_MODE}\``,
    );
  }
  if (d.tier === false && tier.exists && (tier.desired > 0 || tier.running > 0)) {
    findings.push(
      `the tier runs (desired ${tier.desired}, running ${tier.running}) although the flag is off in ${d.env.name}`,
    );
  }
  let failure: string | undefined;
  try {
    for (const task of await mtaTasks(d)) {
      const out =
        (await execOk(d, task, mtaCommands.staleCount(d.env.mtaQueueDir, opts.queueAgeMs / 60000), "counting"))
          .trim();
      if (!/^\d+$/.test(out)) {
        throw new ExecError(`counting queued mail in ${task.id}: not a count: ${out.slice(0, 100)}`);
      }
      const n = Number(out);
      if (n > 0) {
        findings.push(
          `${task.id}: ${n} sinkhole.test message(s) queued for more than ${Math.round(opts.queueAgeMs / 60000)} min`,
        );
      }
    }
  } catch (err) {
    // The findings so far are said; the issue is left as it is, since the look was not complete.
    failure = `${(err as Error).name}: ${(err as Error).message}`;
  }
  const issue = d.issue && !failure ? await d.issue(d.env.name, findings) : { action: "none" as const };
  const lines = findings.length ? [...findings] : failure ? [] : ["all clean"];
  if (issue.action !== "none") lines.push(`GitHub issue #${issue.number} ${issue.action}`);
  else if (failure) lines.push(`failed: ${failure}`, "GitHub issue left as it was: the check did not complete");
  else if (!d.issue) lines.push(`GitHub issue not reconciled: ${d.issueSkipped ?? "no GitHub client"}`);
  return {
    title,
    ok: findings.length === 0 && !failure,
    failed: failure !== undefined,
    lines,
    data: { deployed: true, findings, issue },
  };
}
