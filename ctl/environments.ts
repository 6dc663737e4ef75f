/** The environments file, and the rule that production is never a target. */

export interface Environment {
  name: string;
  region: string;
  cluster: string;
  sinkholeService: string;
  mtaService: string;
  mtaContainer: string;
  mtaQueueDir: string;
  parameter: string;
  sinkholeLogGroup: string;
  mtaLogGroup: string;
  namespace: string;
  cacheTtlSeconds: number;
  /** Whether the tier is meant to run here (TF_VAR_SINKHOLE). */
  sinkhole: boolean;
}

export const DEFAULT_ENVIRONMENTS_FILE = new URL("./environments.json", import.meta.url).pathname;

/** Refused before any request: the CLI must not be able to touch production. */
export class RefusedError extends Error {
  override name = "RefusedError";
}

const PRODUCTION = /^\s*prod(uction)?\s*$/i;

export function isProduction(name: string): boolean {
  return PRODUCTION.test(name);
}

const FIELDS: [keyof Environment, "string" | "number" | "boolean"][] = [
  ["region", "string"],
  ["cluster", "string"],
  ["sinkholeService", "string"],
  ["mtaService", "string"],
  ["mtaContainer", "string"],
  ["mtaQueueDir", "string"],
  ["parameter", "string"],
  ["sinkholeLogGroup", "string"],
  ["mtaLogGroup", "string"],
  ["namespace", "string"],
  ["cacheTtlSeconds", "number"],
  ["sinkhole", "boolean"],
];

/** Parses and checks an environments file; a production entry makes the whole file invalid. */
export function parseEnvironments(text: string, source = "environments file"): Map<string, Environment> {
  const raw = JSON.parse(text) as Record<string, Record<string, unknown>>;
  const out = new Map<string, Environment>();
  for (const [name, entry] of Object.entries(raw)) {
    if (isProduction(name)) throw new RefusedError(`${source}: "${name}" is production; it may not be listed at all`);
    for (const [field, type] of FIELDS) {
      const actual: string = typeof entry[field];
      if (actual !== type) throw new Error(`${source}: ${name}.${field} must be a ${type}`);
    }
    out.set(name, { name, ...entry } as Environment);
  }
  return out;
}

/** The named environment, or a clear refusal; called before any client exists. */
export function resolveEnvironment(name: string | undefined, environments: Map<string, Environment>): Environment {
  if (!name) throw new RefusedError(`--env is required: one of ${[...environments.keys()].join(", ")}`);
  if (isProduction(name)) throw new RefusedError(`"${name}" is production: sinkhole is never operated there`);
  const env = environments.get(name);
  if (!env) throw new RefusedError(`unknown environment "${name}": one of ${[...environments.keys()].join(", ")}`);
  return env;
}
