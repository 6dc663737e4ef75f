/**
 * The environments file (ctl/environments.json): the one description of each environment,
 * read by ctl, by the Terraform root (terraform/live) and by the workflows. Production is
 * never in it, and is refused by what it is as well as by its name (commands.ts,
 * refuseProduction: the cluster's environment tag).
 */

export interface Environment {
  name: string;
  region: string;
  cluster: string;
  capacityProvider: string;
  vpcName: string;
  privateSubnetNames: string;
  sinkholeService: string;
  imageTagParameter: string;
  mtaService: string;
  mtaContainer: string;
  mtaQueueDir: string;
  parameter: string;
  sinkholeLogGroup: string;
  mtaLogGroup: string;
  namespace: string;
  cacheTtlSeconds: number;
}

/** The longest mode cache TTL an environment may declare (`mode set --wait` waits about this long). */
export const MAX_CACHE_TTL_SECONDS = 3600;

export const DEFAULT_ENVIRONMENTS_FILE = new URL("./environments.json", import.meta.url).pathname;

/** Refused before any request: the CLI must not be able to touch production. */
export class RefusedError extends Error {
  override name = "RefusedError";
}

/**
 * Whether a name (an environment's, or a cluster's environment tag) says production: in
 * lower case with everything but letters dropped, it starts with "prod" (prod, PROD,
 * Production, prod-eu, " prod"). The module's guard applies the same rule in HCL.
 */
export function isProduction(name: string): boolean {
  return name.toLowerCase().replace(/[^a-z]/g, "").startsWith("prod");
}

const FIELDS: [keyof Environment, "string" | "number"][] = [
  ["region", "string"],
  ["cluster", "string"],
  ["capacityProvider", "string"],
  ["vpcName", "string"],
  ["privateSubnetNames", "string"],
  ["sinkholeService", "string"],
  ["imageTagParameter", "string"],
  ["mtaService", "string"],
  ["mtaContainer", "string"],
  ["mtaQueueDir", "string"],
  ["parameter", "string"],
  ["sinkholeLogGroup", "string"],
  ["mtaLogGroup", "string"],
  ["namespace", "string"],
  ["cacheTtlSeconds", "number"],
];

/** Parses and checks an environments file; a production entry makes the whole file invalid. */
export function parseEnvironments(text: string, source = "environments file"): Map<string, Environment> {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new RefusedError(`${source} is not JSON: ${(err as Error).message}`);
  }
  const isObject = (v: unknown): v is Record<string, unknown> =>
    typeof v === "object" && v !== null && !Array.isArray(v);
  if (!isObject(raw)) throw new RefusedError(`${source} must be an object of environments by name`);
  const out = new Map<string, Environment>();
  for (const [name, entry] of Object.entries(raw)) {
    if (isProduction(name)) throw new RefusedError(`${source}: "${name}" is production; it may not be listed at all`);
    if (!name.trim()) throw new RefusedError(`${source}: an environment's name is empty`);
    if (!isObject(entry)) throw new RefusedError(`${source}: ${name} must be an object of fields`);
    const unknown = Object.keys(entry).filter((k) => !FIELDS.some(([f]) => f === k));
    if (unknown.length) throw new RefusedError(`${source}: ${name}: unknown field(s) ${unknown.join(", ")}`);
    for (const [field, type] of FIELDS) {
      const value = entry[field];
      if (typeof value !== type || (type === "string" && !(value as string).trim())) {
        throw new RefusedError(`${source}: ${name}.${field} must be a non-empty ${type}`);
      }
    }
    const ttl = entry.cacheTtlSeconds as number;
    if (!Number.isFinite(ttl) || ttl <= 0 || ttl > MAX_CACHE_TTL_SECONDS) {
      throw new RefusedError(`${source}: ${name}.cacheTtlSeconds must be in (0, ${MAX_CACHE_TTL_SECONDS}], got ${ttl}`);
    }
    out.set(name, { name, ...entry } as unknown as Environment);
  }
  return out;
}

/** Refuses a name that says production; the first check on `--env`, before the environments file is read. */
export function refuseProductionName(name: string): void {
  if (isProduction(name)) throw new RefusedError(`"${name}" is production: sinkhole is never operated there`);
}

/** The named environment, or a clear refusal; called before any client exists. */
export function resolveEnvironment(name: string | undefined, environments: Map<string, Environment>): Environment {
  if (!name) throw new RefusedError(`--env is required: one of ${[...environments.keys()].join(", ")}`);
  refuseProductionName(name);
  const env = environments.get(name);
  if (!env) throw new RefusedError(`unknown environment "${name}": one of ${[...environments.keys()].join(", ")}`);
  return env;
}
