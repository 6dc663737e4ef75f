/**
 * Writes docs/mtas.md from a run of tests/mtas_test.ts: what each MTA did under each stateful
 * scenario, as its own log and the retry ledger both recorded it.
 *
 *   SINKHOLE_MTAS_KEEP=.tmp/mtas deno test --allow-all --v8-flags=--expose-gc tests/mtas_test.ts
 *   deno run --allow-all scripts/mtas-doc.ts .tmp/mtas
 *
 * (the directory must exist before the test run: `mkdir -p .tmp/mtas`).
 */
import { MTA_NAMES, mtasDir, type Observed, RETRY_SETTINGS } from "../rig/mtas.ts";

const dir = Deno.args[0];
if (!dir) {
  console.error("usage: deno run --allow-all scripts/mtas-doc.ts DIR (where SINKHOLE_MTAS_KEEP wrote)");
  Deno.exit(2);
}

/** Each MTA's package version, as scripts/mtas.sh unpacked it (sendmail: the installed package). */
async function version(name: string): Promise<string> {
  if (name === "sendmail") {
    const out = await new Deno.Command("dpkg-query", { args: ["-W", "-f", "${Version}", "sendmail-bin"] }).output();
    return `sendmail-bin ${new TextDecoder().decode(out.stdout)}`;
  }
  const stamp = await Deno.readTextFile(`${mtasDir()}/${name}/.stamp`).catch(() => "");
  return stamp.trim().split(/\s+/)[0]?.replace("=", " ") ?? "";
}

const s = (n: number) => `${n.toFixed(1)} s`;
const rows: string[] = [];
const versions: string[] = [];
let when = "";
/** The MTAs that named a recipient after the drop in this run (they log attempts the sinkhole never heard). */
const namedAfterDrop: string[] = [];
/** The scenario, and its mode where the name does not already say it. */
const named = (o: Observed) => o.scenario.startsWith(o.mode) ? `\`${o.mode}\`` : `${o.scenario}: \`${o.mode}\``;
for (const name of MTA_NAMES) {
  const path = `${dir}/${name}.json`;
  const seen = JSON.parse(await Deno.readTextFile(path)) as Observed[];
  when = when || (await Deno.stat(path)).mtime?.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  versions.push(`| ${name} | ${await version(name)} | ${RETRY_SETTINGS[name]} |`);
  for (const o of seen) rows.push(row(name, o));
  if (seen.some((o) => o.unheard)) namedAfterDrop.push(name);
}

/** One row of the table: a message, or (`messages`) several summed up. */
function row(name: string, o: Observed): string {
  const diff = (o.maxDiffS ?? Math.max(0, ...o.ledgerIntervalsS.map((x, i) => Math.abs(x - o.mtaIntervalsS[i]))))
    .toFixed(3);
  if (o.messages !== undefined) {
    const per = o.attemptsPerMessage ?? [];
    const tally = [...new Set(per)].sort((a, b) => a - b).map((n) => `${per.filter((x) => x === n).length}×${n}`);
    const iv = o.mtaIntervalsS;
    return `| ${name} | ${named(o)} | ${o.messages} messages, ${
      per.reduce((a, b) => a + b, 0)
    } attempts (messages×attempts: ${tally.join(", ")}) | ${
      iv.length ? `${s(Math.min(...iv))} – ${s(Math.max(...iv))}` : "–"
    } | ${o.deliveries === o.messages && !o.duplicate ? "each delivered once" : `${o.deliveries} deliveries`}${
      o.deliveredOverS === undefined ? "" : `; first to last delivery ${s(o.deliveredOverS)}`
    }${
      o.ledgerAttemptsPerMessage
        ? `; the MTA's messages had ${per.join(" + ")} attempts, the report's ${o.ledgerAttemptsPerMessage.join(" + ")}`
        : ""
    } | – | ${diff} s |`;
  }
  const fate = o.bounced
    ? `bounced at attempt ${o.outcomes.length}, ${s(o.mtaIntervalsS.reduce((a, b) => a + b, 0))} after the first`
    : o.deliveries === 1
    ? "delivered once"
    : `delivered ${o.deliveries} times${o.duplicate ? " (duplicate: same Message-ID)" : ""}`;
  const unheard = o.unheard
    ? `; ${o.unheard} of them never named on the wire (after the drop), so not in the ledger`
    : "";
  return `| ${name} | ${named(o)} | ${o.outcomes.length} (${o.outcomes.join(", ")})${unheard} | ${
    o.mtaIntervalsS.map(s).join(", ") || "–"
  } | ${fate} | ${
    o.dsnAfterS === undefined ? "–" : `to the sender, ${s(o.dsnAfterS)} after the first attempt`
  } | ${diff} s |`;
}

const doc = `# How the world's MTAs retry: sendmail, Postfix, Exim and OpenSMTPD against sinkhole

Generated from a run of \`tests/mtas_test.ts\` (${when}) by \`scripts/mtas-doc.ts\`; do not edit by hand. To regenerate:

\`\`\`sh
mkdir -p .tmp/mtas
SINKHOLE_MTAS_KEEP=.tmp/mtas deno test --allow-all --v8-flags=--expose-gc tests/mtas_test.ts
deno run --allow-all scripts/mtas-doc.ts .tmp/mtas
\`\`\`

Each MTA runs here as Debian ships it, with its own configuration, spool and users in a namespace of its own
(\`rig/mtas.ts\`; Postfix, Exim and OpenSMTPD unpacked by \`scripts/mtas.sh\`, never installed), routing
\`sinkhole.test\` to a sinkhole and \`origin.test\` (the sender's domain, where DSNs go) to a second one. Its retry timing
is shortened as below, so the **intervals are the rig's settings, not the MTAs' defaults**; what the table shows is
how each MTA behaves within them: how many attempts, what each attempt got, whether it bounced and told the sender,
and whether a lost final reply made it send the message twice.

| MTA | version | retry timing in this rig |
| --- | --- | --- |
${versions.join("\n")}

The attempts and intervals are the MTA's own log (its syslog lines, stamped on arrival); the last column is the
largest difference between those intervals and the retry ledger's (\`deno task ctl report --json\` over the sinkhole's
\`attempt\` lines), which the test holds within 1 s.

| MTA | scenario: mode | attempts (MTA log) | intervals (MTA log) | what became of it | DSN | ledger vs MTA |
| --- | --- | --- | --- | --- | --- | --- |
${rows.join("\n")}

Reading it:

- \`defer first=2\`: every MTA makes three attempts and delivers once; a 421 at RCPT is a temporary failure to all four.
- \`drop at=eod\`, then \`accept\`: the connection closes after the message's final dot without a reply. Every MTA
  treats it as a temporary failure and sends the whole message again, so the sinkhole has it twice with the same
  Message-ID: the duplicate RFC 1047 describes. Postfix says so in its log ("message may be sent more than
  once").
- \`defer for=…s then=bounce\`: a 550 after the outage ends the message at once, and each MTA sends a DSN (null sender)
  to the sender's domain.
- \`greylist min=…s\`: a retry sooner than \`min\` is greylisted again; how many attempts that costs depends on the
  MTA's retry interval against \`min\`.
- Two messages to one recipient, one after the other (under \`defer first=2\`): the first ended at its delivery, so
  the second is a message of its own, counted from 1 and deferred twice again; the report shows two messages, each
  delivered once (its \`attempt\` numbers go on, 4 to 6: they number the envelope's attempts, docs/ledger.md).
- Two messages to one recipient in flight at once (both queued before either was delivered), under \`defer first=2\`:
  what docs/ledger.md calls ambiguous. The sinkhole counts them as one message until a delivery ends it, so they share
  the first two deferrals; the report shows 3 + 3 attempts (3 + 1 when the MTA sent the last two at once: the second
  was counted before the first one's end of data, and accepted too), each MTA's own log another split of the same
  attempts (they match one to one; the last column is then the largest difference between the two sides' intervals
  in time order).
- Per recipient, one message to \`accept+\`, \`bounce+\`, \`defer1+\` and \`drop1+\` (through a recorder of what the MTA
  sent, \`rig/mtas.ts\`): the drop closes the connection at its RCPT, so the recipients named before it were heard (an
  accepted one is logged \`abandoned: close\`) and those after it never reached the sinkhole. Which come after it
  is the MTA's choice: ${
  namedAfterDrop.length
    ? `in this run ${
      namedAfterDrop.join(" and ")
    } named others after \`drop1+\` and logged them "deferred" for a session
  that never named them: an attempt in the MTA's log that no receiving server could count (the "never named on the
  wire" figure; a \`bounce+\` named so is bounced only at the next attempt)`
    : "in this run every MTA named the drop last, so every attempt it logged is one the ledger has"
}. The test checks each recipient against the recording, not against an order.
- \`drop at=data\`: the recipient was accepted, the connection closes at DATA; every MTA retries, and nothing was
  handed over, so it is delivered once, not a duplicate.
- Seeded rate (a 451, which keeps the connection, for 30 % of attempts, seed 4): every MTA makes exactly the attempts
  the seed decides for each of the 20 messages (the test computes them with the listener's own draw).
- 50 messages: all refused (451) at their first attempt, then accepted; the row gives the attempts and how far apart
  the first and last delivery were. Exim's one-second queue runner retried the first ones (every 4 s) while the
  last were still on their way to their first attempt (the switch to \`accept\` waits for every first attempt); OpenSMTPD held the destination after the 451s well past the rig's 4 s \`smtpctl schedule all\`.
- OpenSMTPD's retry schedule is fixed at build time; the rig makes it retry by \`smtpctl schedule all\`, so its
  intervals reflect that pacing and OpenSMTPD's own hold on a destination after an error, not its default backoff.
`;
const out = new URL("../docs/mtas.md", import.meta.url).pathname;
await Deno.writeTextFile(out, doc);
// As `deno task check` wants it (the tables aligned).
const fmt = await new Deno.Command(Deno.execPath(), { args: ["fmt", "--quiet", out] }).output();
if (!fmt.success) throw new Error(`deno fmt ${out}: ${new TextDecoder().decode(fmt.stderr)}`);
console.log("wrote docs/mtas.md");
