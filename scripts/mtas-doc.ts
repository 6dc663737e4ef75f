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
for (const name of MTA_NAMES) {
  const path = `${dir}/${name}.json`;
  const seen = JSON.parse(await Deno.readTextFile(path)) as Observed[];
  when = when || (await Deno.stat(path)).mtime?.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  versions.push(`| ${name} | ${await version(name)} | ${RETRY_SETTINGS[name]} |`);
  for (const o of seen) {
    const maxDiff = Math.max(0, ...o.ledgerIntervalsS.map((x, i) => Math.abs(x - o.mtaIntervalsS[i])));
    const fate = o.bounced
      ? `bounced at attempt ${o.outcomes.length}, ${s(o.mtaIntervalsS.reduce((a, b) => a + b, 0))} after the first`
      : o.deliveries === 1
      ? "delivered once"
      : `delivered ${o.deliveries} times${o.duplicate ? " (duplicate: same Message-ID)" : ""}`;
    rows.push(
      `| ${name} | \`${o.mode}\` | ${o.outcomes.length} (${o.outcomes.join(", ")}) | ${
        o.mtaIntervalsS.map(s).join(", ") || "–"
      } | ${fate} | ${o.dsnAfterS === undefined ? "–" : `to the sender, ${s(o.dsnAfterS)} after the first attempt`} | ${
        maxDiff.toFixed(3)
      } s |`,
    );
  }
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

| MTA | scenario | attempts (MTA log) | intervals (MTA log) | what became of it | DSN | ledger vs MTA |
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
- Not in the table yet: two different messages to one recipient one after the other. Each MTA sends the second as a
  new message, but today's sinkhole counts both as one (issue 21, point 1: a message is \`sender > recipient\`), so under
  \`defer first=2\` the second is accepted at once as "attempt #4"; \`scripts/mtas-same-envelope.ts\` shows it.
- OpenSMTPD's retry schedule is fixed at build time; the rig makes it retry by \`smtpctl schedule all\`, so its
  intervals reflect that pacing and OpenSMTPD's own hold on a destination after an error, not its default backoff.
`;
const out = new URL("../docs/mtas.md", import.meta.url).pathname;
await Deno.writeTextFile(out, doc);
// As `deno task check` wants it (the tables aligned).
const fmt = await new Deno.Command(Deno.execPath(), { args: ["fmt", "--quiet", out] }).output();
if (!fmt.success) throw new Error(`deno fmt ${out}: ${new TextDecoder().decode(fmt.stderr)}`);
console.log("wrote docs/mtas.md");
