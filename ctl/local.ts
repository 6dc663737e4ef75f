/**
 * `--local`: the commands that have a meaning on a listener this machine runs (`deno task dev`,
 * a container with its control port published), over its control port (docs/control.md)
 * instead of SSM and CloudWatch: `mode set` (answered once the mode is in effect), `mode get`,
 * and the ledger for `report` and `expect`.
 */
import { DEV_CONTROL_PORT } from "../listener.ts";
import type { Report } from "./commands.ts";
import { Ledger, type LedgerFilter } from "./report.ts";

/** Where `--local` looks when `--url` is not given: `deno task dev`'s control port. */
export const DEFAULT_LOCAL_URL = `http://127.0.0.1:${DEV_CONTROL_PORT}`;
/** A control request is abandoned after this long (the listener answers at once; this guards a wrong port). */
export const LOCAL_TIMEOUT_MS = 10_000;

/** One call to the control port: its status and JSON, or an error that says where and what to check. */
async function call(url: string, method: string, path: string, body?: string) {
  let res: Response;
  try {
    res = await fetch(new URL(path, url), { method, body, signal: AbortSignal.timeout(LOCAL_TIMEOUT_MS) });
  } catch (err) {
    throw new Error(
      `no control port answers at ${url} (${(err as Error).message}): is the listener running with ` +
        "SINKHOLE_CONTROL_PORT set (deno task dev: 2580, or the port its start line says; --url for another)?",
    );
  }
  const text = await res.text();
  try {
    return { status: res.status, body: JSON.parse(text) };
  } catch {
    throw new Error(`${url}${path} answered ${res.status} with no JSON: is that the listener's control port?`);
  }
}

const modeLines = (b: { mode: string; source: string; stored: { mode?: string; error?: string } }) => [
  `in effect: ${b.mode} (from ${b.source})`,
  `stored:    ${b.stored.mode ?? `none (${b.stored.error ?? "not read yet"})`}`,
];

/** `mode set VALUE --local`: answered once the listener has the mode in effect. */
export async function localModeSet(url: string, value: string, title: string): Promise<Report> {
  const r = await call(url, "PUT", "/mode", value);
  if (r.status !== 200) throw new Error(`${url} refused the mode (${r.status}): ${r.body.error}`);
  return { title, ok: true, lines: modeLines(r.body), data: r.body };
}

/** `mode get --local`: the mode in effect, where it comes from, what the source holds. */
export async function localModeGet(url: string, title: string): Promise<Report> {
  const r = await call(url, "GET", "/mode");
  if (r.status !== 200) throw new Error(`${url}/mode answered ${r.status}: ${r.body.error}`);
  return { title, ok: true, lines: modeLines(r.body), data: r.body };
}

/** `report` and `expect` with --local: the attempts the listener serves, read into a ledger like a log file's. */
export async function localLedger(url: string, filter: LedgerFilter): Promise<Ledger> {
  const query = filter.sinceMs === undefined ? "" : `?since=${new Date(filter.sinceMs).toISOString()}`;
  const r = await call(url, "GET", `/attempts${query}`);
  if (r.status !== 200) throw new Error(`${url}/attempts answered ${r.status}: ${r.body.error}`);
  const ledger = new Ledger({ messageId: filter.messageId });
  for (const message of r.body as { attempts: Record<string, unknown>[] }[]) {
    for (const { intervalS: _, ...attempt } of message.attempts) ledger.addEvent(attempt);
  }
  return ledger;
}
