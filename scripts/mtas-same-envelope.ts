/**
 * What stays ambiguous (docs/ledger.md): two different messages with one envelope in flight at
 * once. Each real MTA takes two messages from one sender to one recipient back to back under
 * `defer first=2`, so both are queued when the first is deferred; this prints, per MTA, each
 * message's attempts as the MTA logged them (by its queue id) beside the messages the ledger's
 * report makes of the same attempts (it cuts the envelope's one sequence at each delivery).
 *
 *   deno run --allow-all scripts/mtas-same-envelope.ts [sendmail,postfix,exim,opensmtpd]
 *
 * Needs root and scripts/mtas.sh (as tests/mtas_test.ts does). Two messages one after the other
 * (the first delivered before the second is sent) are a test: tests/mtas_test.ts.
 */
import { MTA_NAMES, type MtaName, withMtaRig } from "../rig/mtas.ts";
import { logsFile, runCtl } from "../rig/helpers.ts";
import type { MessageHistory } from "../ctl/report.ts";

const names = (Deno.args[0]?.split(",") ?? [...MTA_NAMES]) as MtaName[];
/** A hang guard for both messages' histories. */
const WITHIN_MS = 240_000;

const results = await Promise.all(names.map((name) =>
  withMtaRig(name, async ({ mta, sink, setMode }) => {
    const rcpt = "inflight@sinkhole.test";
    await setMode("defer first=2");
    for (const id of ["one", "two"]) await mta.submit([rcpt], { messageId: `${id}.${name}@origin.test` });
    await mta.retryUntil(
      () =>
        mta.attempts(rcpt).filter((a) => a.outcome === "sent").length === 2 &&
        sink.events("attempt").filter((a) => a.rcpt === rcpt && a.code === 250).length === 2,
      WITHIN_MS,
    );
    const t0 = mta.attempts(rcpt)[0].at;
    const byQueueId = new Map<string, string[]>();
    for (const a of mta.attempts(rcpt)) {
      byQueueId.set(a.queueId, [
        ...(byQueueId.get(a.queueId) ?? []),
        `${a.outcome} +${((a.at - t0) / 1000).toFixed(1)} s`,
      ]);
    }
    const file = await logsFile(sink.logs);
    const r = await runCtl(["report", "--file", file, "--json"]);
    await Deno.remove(file);
    const ledger = (JSON.parse(r.stdout) as MessageHistory[]).filter((h) => h.rcpt === rcpt);
    const lines = [
      ...[...byQueueId].map(([id, seen], i) =>
        `  MTA message ${i + 1} (${id}): ${seen.length} attempts: ${seen.join(", ")}`
      ),
      ...ledger.map((h, i) =>
        `  ledger message ${i + 1}: ${h.attempts.length} attempts, delivered ${h.deliveries}: ${
          h.attempts.map((a) => `#${a.attempt} ${a.code ?? "dropped"} ${a.messageId ?? "(no id)"}`).join(", ")
        }`
      ),
    ];
    return `${name}:\n${lines.join("\n")}`;
  })
));
console.log(results.join("\n\n"));
