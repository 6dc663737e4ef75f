/**
 * The retry ledger against the world's MTAs: sendmail, Postfix, Exim and OpenSMTPD (tests/mtas.ts)
 * each drive a sinkhole through the stateful scenarios, and the ledger's report
 * (`deno task ctl report --file … --json` over the listener's attempt lines) must say what the
 * MTA's own log says: as many attempts, the same outcomes, every interval within 1 s.
 *
 * The four MTAs run at once (each with its own sinkhole and sender's domain on addresses of
 * this run's own); each runs its scenarios one after the other, one recipient each.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  assertTools,
  type EventOf,
  eventually,
  IN_CI,
  type Listener,
  logsFile,
  needs,
  runCtl,
  startListener,
  tempModeFile,
  uniqueLoopback,
} from "./helpers.ts";
import {
  attemptInLine,
  makeMta,
  type Mta,
  MTA_NAMES,
  type MtaAttempt,
  mtaBinary,
  type MtaName,
  syslogText,
} from "./mtas.ts";
import { SMTP_PORT } from "./sendmail.ts";
import type { MessageHistory } from "../ctl/report.ts";

/** How far the ledger's interval between two attempts may be from the MTA log's: the brief's 1 s. */
const INTERVAL_TOLERANCE_S = 1;
/** A hang guard for one scenario's whole history (several retries), generous on a busy machine. */
const SCENARIO_WITHIN_MS = 240_000;
/** `defer for=` in the outage scenario: long enough for at least one retry by every MTA's schedule. */
const OUTAGE_S = 6;
/** `greylist min=`: a retry sooner than this is deferred again. */
const GREYLIST_MIN_S = 5;

const tools = needs("/usr/sbin/sendmail", "makemap", "m4", "unshare", "nsenter", "ldconfig");
const missingMtas = MTA_NAMES.filter((n) => {
  try {
    return !Deno.statSync(mtaBinary(n)).isFile;
  } catch {
    return true;
  }
});
const isRoot = Deno.uid() === 0;
const ignore = !IN_CI && (tools.ignore || !isRoot || missingMtas.length > 0);
if (ignore && missingMtas.length > 0) {
  console.error(`note: skipping the MTA suite locally, missing ${missingMtas.join(", ")} (run scripts/mtas.sh)`);
}

/** The listener's attempt outcome in the MTA's words: a drop or 4yz defers, 2yz sends, 5yz bounces. */
export function outcomeOf(a: { code?: number; dropped?: true }): MtaAttempt["outcome"] {
  if (a.dropped || a.code === undefined || (a.code >= 400 && a.code < 500)) return "deferred";
  return a.code < 300 ? "sent" : "bounced";
}

/** The intervals (s) between consecutive times (ms). */
const intervals = (times: number[]) => times.slice(1).map((t, i) => (t - times[i]) / 1000);

interface Rig {
  mta: Mta;
  sink: Listener;
  origin: Listener;
  setMode(mode: string): Promise<void>;
}

/** One scenario's evidence, for the assertions and for docs/mtas.md. */
export interface Observed {
  mta: MtaName;
  scenario: string;
  mode: string;
  outcomes: MtaAttempt["outcome"][];
  mtaIntervalsS: number[];
  ledgerIntervalsS: number[];
  deliveries: number;
  duplicate: boolean;
  bounced: boolean;
  /** Seconds from the first attempt to the DSN reaching the sender's domain, when one did. */
  dsnAfterS?: number;
}

/** Attempts the listener logged for `rcpt`. */
const sinkAttempts = (sink: Listener, rcpt: string) => sink.events("attempt").filter((a) => a.rcpt === rcpt);

/**
 * The ledger's report (ctl report --json over the listener's log) for `rcpt`, checked against the
 * MTA's own log: the same number of attempts, the same outcomes, every interval within 1 s.
 */
async function compare(rig: Rig, scenario: string, mode: string, rcpt: string): Promise<Observed> {
  const file = await logsFile(rig.sink.logs);
  let history: MessageHistory | undefined;
  try {
    const r = await runCtl(["report", "--file", file, "--json"]);
    assertEquals(r.code, 0, r.stderr);
    history = (JSON.parse(r.stdout) as MessageHistory[]).find((h) => h.rcpt === rcpt);
  } finally {
    await Deno.remove(file);
  }
  assert(history, `${rig.mta.name}: the report has no message to ${rcpt}`);
  const mtaSide = rig.mta.attempts(rcpt);
  const said = `${rig.mta.name} ${scenario}: MTA log\n${mtaSide.map((a) => `${a.at} ${a.text}`).join("\n")}\nledger\n${
    history.attempts.map((a) => `${a.ts} #${a.attempt} ${a.code ?? "dropped"} at ${a.stage}`).join("\n")
  }`;
  assertEquals(history.attempts.length, mtaSide.length, `attempts: ${said}`);
  assertEquals(history.attempts.map(outcomeOf), mtaSide.map((a) => a.outcome), `outcomes: ${said}`);
  const ledgerIntervals = history.attempts.slice(1).map((a) => a.intervalS!);
  const mtaIntervals = intervals(mtaSide.map((a) => a.at));
  ledgerIntervals.forEach((s, i) =>
    assert(
      Math.abs(s - mtaIntervals[i]) <= INTERVAL_TOLERANCE_S,
      `interval #${i + 2}: ledger ${s} s, MTA ${mtaIntervals[i]} s: ${said}`,
    )
  );
  return {
    mta: rig.mta.name,
    scenario,
    mode,
    outcomes: mtaSide.map((a) => a.outcome),
    mtaIntervalsS: mtaIntervals,
    ledgerIntervalsS: ledgerIntervals,
    deliveries: history.deliveries,
    duplicate: history.duplicate,
    bounced: history.bounced,
  };
}

/** Waits (forcing OpenSMTPD's retries) until the listener and the MTA's log both show `done`. */
function until(rig: Rig, rcpt: string, done: (sink: EventOf<"attempt">[], mta: MtaAttempt[]) => boolean) {
  return rig.mta.retryUntil(() => done(sinkAttempts(rig.sink, rcpt), rig.mta.attempts(rcpt)), SCENARIO_WITHIN_MS);
}

/** Both sides saw the last attempt end with `outcome`, and the MTA logged as many attempts as the listener. */
const endedWith = (outcome: MtaAttempt["outcome"]) => (sink: EventOf<"attempt">[], mta: MtaAttempt[]) =>
  sink.length > 0 && outcomeOf(sink.at(-1)!) === outcome && mta.at(-1)?.outcome === outcome &&
  mta.length === sink.length;

/** The scenarios, in order, against one MTA; what each showed. */
async function scenarios(rig: Rig): Promise<Observed[]> {
  const { mta } = rig;
  const seen: Observed[] = [];
  const submit = async (rcpt: string, id: string) => {
    const codes = await mta.submit([rcpt], { messageId: `${id}.${mta.name}@origin.test` });
    assertEquals(codes.at(-2), 250, `${mta.name} took the message: ${codes}`);
  };

  {
    const mode = "defer first=2";
    const rcpt = "first2@sinkhole.test";
    await rig.setMode(mode);
    await submit(rcpt, "first2");
    await until(rig, rcpt, endedWith("sent"));
    const o = await compare(rig, "defer first=2", mode, rcpt);
    assertEquals(o.outcomes, ["deferred", "deferred", "sent"], `${mta.name}: 3 attempts, delivered at the third`);
    assertEquals([o.deliveries, o.duplicate], [1, false], `${mta.name}: delivered once`);
    seen.push(o);
  }

  {
    const rcpt = "lost@sinkhole.test";
    await rig.setMode("drop at=eod");
    await submit(rcpt, "lost");
    await until(rig, rcpt, (s, m) => s.some((a) => a.dropped) && m.some((a) => a.outcome === "deferred"));
    await rig.setMode("accept");
    await until(rig, rcpt, endedWith("sent"));
    const o = await compare(rig, "drop at=eod, then accept", "drop at=eod → accept", rcpt);
    assert(
      o.deliveries >= 2 && o.duplicate,
      `${mta.name}: the lost final reply made a duplicate: ${JSON.stringify(o)}`,
    );
    seen.push(o);
  }

  {
    const mode = `defer for=${OUTAGE_S}s then=bounce`;
    const rcpt = "outage@sinkhole.test";
    await rig.setMode(mode);
    const before = rig.origin.events("message").length;
    await submit(rcpt, "outage");
    await until(rig, rcpt, endedWith("bounced"));
    // The DSN: the MTA tells the sender (origin.test, the second listener), with the null sender.
    await rig.mta.retryUntil(
      () =>
        rig.origin.events("message").slice(before).some((m) => m.from === "" && m.rcpts.includes("tester@origin.test")),
      SCENARIO_WITHIN_MS,
    );
    const o = await compare(rig, `defer for=${OUTAGE_S}s then=bounce`, mode, rcpt);
    assertEquals(o.outcomes[0], "deferred", `${mta.name}: deferred during the outage`);
    assertEquals(o.outcomes.at(-1), "bounced", `${mta.name}: then bounced`);
    assert(o.bounced, `${mta.name}: the report says bounced`);
    const first = Date.parse(sinkAttempts(rig.sink, rcpt)[0].ts);
    const dsn = rig.origin.events("message").slice(before).find((m) => m.from === "")!;
    const dsnAt = rig.origin.logs.indexOf(dsn as never) >= 0 ? Date.parse((dsn as { ts?: string }).ts ?? "") : NaN;
    seen.push({ ...o, dsnAfterS: Number.isNaN(dsnAt) ? undefined : (dsnAt - first) / 1000 });
  }

  {
    const mode = `greylist key=triplet min=${GREYLIST_MIN_S}s`;
    const rcpt = "grey@sinkhole.test";
    await rig.setMode(mode);
    await submit(rcpt, "grey");
    await until(rig, rcpt, endedWith("sent"));
    const o = await compare(rig, `greylist min=${GREYLIST_MIN_S}s`, mode, rcpt);
    assert(o.outcomes.length >= 2, `${mta.name}: greylisted first`);
    const total = o.mtaIntervalsS.reduce((a, b) => a + b, 0);
    assert(total >= GREYLIST_MIN_S - INTERVAL_TOLERANCE_S, `${mta.name}: delivered ${total} s after the first attempt`);
    seen.push(o);
  }
  return seen;
}

/** Runs `fn` with an MTA, its sinkhole (mode from a file) and the sender's domain (accept-log). */
async function withRig<T>(name: MtaName, fn: (rig: Rig) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: `sinkhole-${name}-` });
  const modeFile = await tempModeFile("accept");
  const sinkHost = uniqueLoopback([SMTP_PORT]);
  const originHost = uniqueLoopback([SMTP_PORT]);
  let sink: Listener | undefined;
  let origin: Listener | undefined;
  let mta: Mta | undefined;
  try {
    sink = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2" }, {
      host: sinkHost,
      port: SMTP_PORT,
    });
    origin = await startListener({ SINKHOLE_MODE: "accept-log" }, { host: originHost, port: SMTP_PORT });
    mta = await makeMta(name, dir, { "sinkhole.test": sinkHost, "origin.test": originHost });
    await mta.start();
    const s = sink;
    return await fn({
      mta,
      sink,
      origin,
      setMode: async (mode) => {
        await Deno.writeTextFile(modeFile, `${mode}\n`);
        await eventually(() => s.logs.findLast((x) => x.event === "mode")?.mode === mode);
      },
    });
  } catch (e) {
    // What each side saw, to tell the MTA's doing from the listener's.
    console.error(`${name}'s log:\n${mta?.log().map((l) => `${l.at} ${l.text}`).join("\n")}`);
    console.error(`sinkhole attempts:\n${sink?.events("attempt").map((a) => JSON.stringify(a)).join("\n")}`);
    throw e;
  } finally {
    await mta?.stop();
    await sink?.stop();
    await origin?.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    await Deno.remove(modeFile).catch(() => {});
  }
}

Deno.test({
  name: "mtas: sendmail, Postfix, Exim and OpenSMTPD drive the sinkhole; the ledger's report matches each MTA's log",
  ignore,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    assertTools(tools.missing);
    assert(isRoot, "the MTA suite binds port 25 and uses namespaces: run it as root (CI does)");
    assertEquals(missingMtas, [], "scripts/mtas.sh unpacks Postfix, Exim and OpenSMTPD (.ci/run runs it)");
    // SINKHOLE_MTAS=postfix,exim runs some of them (while working on one); CI runs all four.
    const only = Deno.env.get("SINKHOLE_MTAS")?.split(",");
    const names = MTA_NAMES.filter((n) => !only || only.includes(n));
    const results = await Promise.all(names.map((name) =>
      t.step({
        name,
        sanitizeOps: false,
        sanitizeResources: false,
        sanitizeExit: false,
        fn: async () => {
          const seen = await withRig(name, scenarios);
          console.log(`${name}: ${JSON.stringify(seen)}`);
        },
      })
    ));
    assert(results.every((ok) => ok), "every MTA's scenarios held");
  },
});

Deno.test("mtas: each MTA's log line is read as the attempt it records", () => {
  // Lines as each MTA logged them through this rig (addresses shortened).
  const cases: [MtaName, string, ReturnType<typeof attemptInLine>][] = [];
  for (const [name, line, want] of cases) assertEquals(attemptInLine(name, syslogText(line)), want, line);
});
