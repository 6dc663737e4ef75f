/**
 * The retry ledger against the world's MTAs: sendmail, Postfix, Exim and OpenSMTPD (rig/mtas.ts)
 * each drive a sinkhole through the stateful scenarios, and the ledger's report
 * (`deno task ctl report --file … --json` over the listener's attempt lines) must say what the
 * MTA's own log says: as many attempts, the same outcomes, every interval within 1 s.
 *
 * The four MTAs run at once (each with its own sinkhole and sender's domain on addresses of
 * this run's own); each runs its scenarios one after the other, one recipient each.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import { assertTools, type EventOf, IN_CI, type Listener, logsFile, needs, runCtl } from "../rig/helpers.ts";
import {
  attemptInLine,
  MTA_NAMES,
  type MtaAttempt,
  mtaBinary,
  type MtaName,
  type MtaRig,
  type Observed,
  syslogText,
  withMtaRig,
} from "../rig/mtas.ts";
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

/** SINKHOLE_MTAS_KEEP=DIR keeps each MTA's log (NAME.log) and what it showed (NAME.json) there: scripts/mtas-doc.ts reads them. */
const keep = Deno.env.get("SINKHOLE_MTAS_KEEP");

/** Attempts the listener logged for `rcpt`. */
const sinkAttempts = (sink: Listener, rcpt: string) => sink.events("attempt").filter((a) => a.rcpt === rcpt);

/**
 * The ledger's report (ctl report --json over the listener's log) for `rcpt`, checked against the
 * MTA's own log: the same number of attempts, the same outcomes, every interval within 1 s.
 */
async function compare(rig: MtaRig, scenario: string, mode: string, rcpt: string): Promise<Observed> {
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
function until(rig: MtaRig, rcpt: string, done: (sink: EventOf<"attempt">[], mta: MtaAttempt[]) => boolean) {
  return rig.mta.retryUntil(() => done(sinkAttempts(rig.sink, rcpt), rig.mta.attempts(rcpt)), SCENARIO_WITHIN_MS);
}

/**
 * Both sides saw the last attempt end with `outcome` (the MTA logs an attempt once its session is over, so
 * its last line comes after the listener's; `compare` then holds the two histories together).
 */
const endedWith = (outcome: MtaAttempt["outcome"]) => (sink: EventOf<"attempt">[], mta: MtaAttempt[]) =>
  sink.length > 0 && outcomeOf(sink.at(-1)!) === outcome && mta.at(-1)?.outcome === outcome;

/** The scenarios, in order, against one MTA; what each showed. */
async function scenarios(rig: MtaRig): Promise<Observed[]> {
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
    const dsnAt = Date.parse((dsn as { ts?: string }).ts ?? ""); // every log line carries its time
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
          const seen = await withMtaRig(name, scenarios, { keep });
          console.log(`${name}: ${JSON.stringify(seen)}`);
          if (keep) await Deno.writeTextFile(`${keep}/${name}.json`, JSON.stringify(seen, null, 2) + "\n");
        },
      })
    ));
    assert(results.every((ok) => ok), "every MTA's scenarios held");
  },
});

Deno.test("mtas: each MTA's log line is read as the attempt it records", () => {
  // Lines as each MTA logged them through this rig (addresses and queue ids as they came), syslog prefix and all.
  const r = "first2@sinkhole.test";
  const cases: [MtaName, string, MtaAttempt["outcome"] | undefined][] = [
    [
      "sendmail",
      "<22>Nov 29 20:34:02 sendmail[22508]: 6ATKY27P022506: to=<first2@sinkhole.test>, delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30085, relay=[127.50.210.66] [127.50.210.66], dsn=4.3.2, reply=421 4.3.2 Service temporarily unavailable, stat=Deferred: 421 4.3.2 Service temporarily unavailable",
      "deferred",
    ],
    [
      "sendmail",
      "sendmail[23292]: 6ATKYCQc023290: to=<first2@sinkhole.test>, delay=00:00:00, xdelay=00:00:00, mailer=smtp, pri=30081, relay=[127.50.210.66] [127.50.210.66], dsn=4.4.2, stat=Deferred",
      "deferred",
    ],
    [
      "sendmail",
      "sendmail[23275]: 6ATKY27P022506: to=<first2@sinkhole.test>, delay=00:00:10, xdelay=00:00:00, mailer=smtp, pri=210085, relay=[127.50.210.66] [127.50.210.66], dsn=2.0.0, stat=Sent (Message accepted and discarded)",
      "sent",
    ],
    [
      "sendmail",
      "sendmail[23630]: 6ATKYHRn023469: to=<first2@sinkhole.test>, delay=00:00:10, xdelay=00:00:00, mailer=smtp, pri=210085, relay=[127.50.210.66] [127.50.210.66], dsn=5.1.1, reply=550 5.1.1 User unknown, stat=User unknown",
      "bounced",
    ],
    [
      "sendmail",
      "sendmail[22506]: 6ATKY27P022506: from=<tester@origin.test>, size=85, class=0, nrcpts=1, msgid=<first2.sendmail@origin.test>, proto=ESMTP, daemon=MTA-test, relay=localhost [127.0.0.1]",
      undefined,
    ],
    [
      "postfix",
      "<22>Nov 29 20:34:02 postfix/smtp[22724]: 268E820C7D1: to=<first2@sinkhole.test>, relay=127.197.107.206[127.197.107.206]:25, delay=0.05, delays=0.02/0.01/0/0.02, dsn=4.3.2, status=deferred (host 127.197.107.206[127.197.107.206] said: 421 4.3.2 Service temporarily unavailable (in reply to RCPT TO command))",
      "deferred",
    ],
    [
      "postfix",
      "postfix/smtp[22724]: 268E820C7D1: to=<first2@sinkhole.test>, relay=127.197.107.206[127.197.107.206]:25, delay=7.1, delays=7.1/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Message accepted and discarded)",
      "sent",
    ],
    [
      "postfix",
      "postfix/smtp[22724]: 3B2DD20C009: to=<first2@sinkhole.test>, relay=127.197.107.206[127.197.107.206]:25, delay=7, delays=7/0/0/0.01, dsn=5.1.1, status=bounced (host 127.197.107.206[127.197.107.206] said: 550 5.1.1 User unknown (in reply to RCPT TO command))",
      "bounced",
    ],
    [
      "postfix",
      "postfix/smtp[8738]: A32C520C39F: to=<first2@sinkhole.test>, relay=none, delay=0.02, delays=0.01/0.01/0/0, dsn=4.4.1, status=deferred (connect to 127.0.0.2[127.0.0.2]:25: Connection refused)",
      undefined,
    ],
    [
      "exim",
      "exim[22513]: 1xXlb0-0005r6-2G == first2@sinkhole.test R=test_domains T=remote_smtp defer (-44) H=127.221.174.79 [127.221.174.79]: SMTP error from remote mail server after RCPT TO:<first2@sinkhole.test>: 421 4.3.2 Service temporarily unavailable",
      "deferred",
    ],
    [
      "exim",
      'exim[23183]: 1xXlb0-0005r6-2G => first2@sinkhole.test R=test_domains T=remote_smtp H=127.221.174.79 [127.221.174.79] C="250 2.0.0 Message accepted and discarded"',
      "sent",
    ],
    [
      "exim",
      "exim[23230]: 1xXlb9-00062f-0l ** first2@sinkhole.test R=test_domains T=remote_smtp H=127.221.174.79 [127.221.174.79]: SMTP error from remote mail server after RCPT TO:<first2@sinkhole.test>: 550 5.1.1 User unknown",
      "bounced",
    ],
    [
      "exim",
      "exim[22619]: 1xXlb0-0005r6-2G == first2@sinkhole.test routing defer (-52): retry time not reached",
      undefined,
    ],
    [
      "exim",
      "exim[23239]: 1xXlb9-00062f-0l == first2@sinkhole.test R=test_domains T=remote_smtp defer (-54): retry time not reached for any host for 'sinkhole.test'",
      undefined,
    ],
    [
      "opensmtpd",
      'smtpd[22476]: 3431c8d6b22c1d7a mta delivery evpid=fec8a95a8e0f1a48 from=<tester@origin.test> to=<first2@sinkhole.test> rcpt=<-> source="127.0.0.1" relay="127.91.176.114 (127.91.176.114)" delay=0s result="TempFail" stat="421 4.3.2 Service temporarily unavailable"',
      "deferred",
    ],
    [
      "opensmtpd",
      'smtpd[22476]: 3431c8daf21b2f51 mta delivery evpid=fec8a95a8e0f1a48 from=<tester@origin.test> to=<first2@sinkhole.test> rcpt=<-> source="127.0.0.1" relay="127.91.176.114 (127.91.176.114)" delay=15s result="Ok" stat="250 2.0.0 Message accepted and discarded"',
      "sent",
    ],
    [
      "opensmtpd",
      'smtpd[22476]: 3431c8de4f411f4f mta delivery evpid=233f05a3891e31fd from=<tester@origin.test> to=<first2@sinkhole.test> rcpt=<-> source="127.0.0.1" relay="127.91.176.114 (127.91.176.114)" delay=10s result="PermFail" stat="550 5.1.1 User unknown"',
      "bounced",
    ],
    [
      "opensmtpd",
      "smtpd[22476]: 3431c8d35a7bbc08 smtp envelope evpid=fec8a95a8e0f1a48 from=<tester@origin.test> to=<first2@sinkhole.test>",
      undefined,
    ],
  ];
  for (const [name, line, want] of cases) {
    const got = attemptInLine(name, syslogText(line));
    assertEquals(got && [got.rcpt, got.outcome], want && [r, want], `${name}: ${line}`);
  }
  assertEquals(syslogText("<22>Nov  9 20:34:02 postfix/smtp[1]: x\n"), "postfix/smtp[1]: x");
  assertEquals([
    outcomeOf({ dropped: true }),
    outcomeOf({ code: 421 }),
    outcomeOf({ code: 250 }),
    outcomeOf({ code: 550 }),
  ], [
    "deferred",
    "deferred",
    "sent",
    "bounced",
  ]);
});
