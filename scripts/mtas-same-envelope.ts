/**
 * Two different messages to one recipient, one after the other, through each real MTA under
 * `defer first=2` (issue 21, point 1): each should be deferred twice and delivered at its third
 * attempt. Kept out of tests/ on purpose: today's listener counts both as one message (its key is
 * `sender > recipient`), so the second is "attempt #4" and accepted at once; this script shows
 * that with real MTAs until the listener is fixed, then becomes a test in tests/mtas_test.ts.
 *
 *   deno run --allow-all scripts/mtas-same-envelope.ts [sendmail,postfix,exim,opensmtpd]
 *
 * Needs root and scripts/mtas.sh (as tests/mtas_test.ts does). Prints, per MTA, the MTA's own
 * attempts for each message and the ledger's attempt lines.
 */
import { MTA_NAMES, type MtaName, withMtaRig } from "../rig/mtas.ts";

const names = (Deno.args[0]?.split(",") ?? [...MTA_NAMES]) as MtaName[];
/** A hang guard for one message's history. */
const WITHIN_MS = 240_000;

const results = await Promise.all(names.map((name) =>
  withMtaRig(name, async ({ mta, sink, setMode }) => {
    const rcpt = "same@sinkhole.test";
    await setMode("defer first=2");
    const lines: string[] = [];
    const counts: number[] = [];
    for (const id of ["one", "two"]) {
      const before = mta.attempts(rcpt).length;
      await mta.submit([rcpt], { messageId: `${id}.${name}@origin.test` });
      await mta.retryUntil(() => mta.attempts(rcpt).slice(before).some((a) => a.outcome === "sent"), WITHIN_MS);
      const mine = mta.attempts(rcpt).slice(before);
      counts.push(mine.length);
      lines.push(`  message ${id}: ${name} made ${mine.length} attempt(s): ${mine.map((a) => a.outcome).join(", ")}`);
    }
    await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.messageId === `<two.${name}@origin.test>`, WITHIN_MS);
    const ledger = sink.events("attempt").filter((a) => a.rcpt === rcpt);
    lines.push(
      ...ledger.map((a) => `  ledger: #${a.attempt} ${a.code ?? "dropped"} at ${a.stage} ${a.messageId ?? ""}`),
    );
    const verdict = counts[1] === 3
      ? "each message deferred twice, then delivered"
      : `ISSUE 21 #1: the second message was accepted at its attempt ${counts[1]}, not deferred twice (one count)`;
    return `${name}: ${verdict}\n${lines.join("\n")}`;
  })
));
console.log(results.join("\n\n"));
