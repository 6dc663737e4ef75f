/**
 * Writes docs/environment.md from listener.ts (ENVIRONMENT_VARIABLES, DEV_DEFAULTS): every variable the
 * listener reads, its default and meaning (tests/docs_test.ts holds the two together).
 *
 *   deno run --allow-read --allow-write scripts/docs-environment.ts && deno fmt docs/environment.md
 */
import { DEV_DEFAULTS, DEV_MODE_FILE, ENVIRONMENT_VARIABLES } from "../listener.ts";
const rows = ENVIRONMENT_VARIABLES.map((v) =>
  `| \`${v.name}\` | ${v.default ? `\`${v.default}\`` : "unset"} | ${v.help} |`
);
const doc = `# Environment

Everything the listener reads from its environment; \`listener.ts --help\` (or \`deno task start --help\`) prints the
same table from the same source (\`ENVIRONMENT_VARIABLES\` in \`listener.ts\`), and \`tests/terminal_test.ts\` fails when
the source reads a variable that is not in it.

| variable | default | meaning |
| --- | --- | --- |
${rows.join("\n")}

A bad value stops the listener at start, naming the variable, with exit code 2 (\`sinkhole: SINKHOLE_BIND_PORT must be
an integer from 0 to 65535, got "99999"\` and a hint). An address it cannot bind (in use, a privileged port without the
capability, an address not on the machine) or a TLS file it cannot read stops it with exit code 3, naming the address and
the variable that sets it. Both are written to standard error in one format: \`sinkhole: WHAT\` then \`sinkhole: hint: …\`.

The first six \`SINKHOLE_\` names (bind host and port, mode parameter, cache TTL, greylist window, server name) keep the
upstream fixture's names, so the image is a drop-in replacement.

## Where the mode comes from

\`SINKHOLE_MODE_FILE\` if it is set and not empty, else \`SINKHOLE_MODE\`, else SSM (\`SINKHOLE_MODE_PARAM\`). A relative
\`SINKHOLE_MODE_FILE\` is taken from where you stand (\`INIT_CWD\`, which \`deno task\` sets, else the working directory)
and logged as an absolute path. Details: [modes.md](modes.md), "Where the mode comes from".

## \`deno task dev\`

\`deno task dev\` is \`deno task start --dev\`. \`--dev\` supplies these where the environment does not set them (a value
set in the environment, even empty, always wins):

| variable | \`--dev\` default |
| --- | --- |
${Object.entries(DEV_DEFAULTS).map(([k, v]) => `| \`${k}\` | \`${v}\` |`).join("\n")}
| \`SINKHOLE_MODE_FILE\` | \`${DEV_MODE_FILE}\` in the repository, when neither it nor \`SINKHOLE_MODE\` is set |

So \`SINKHOLE_BIND_PORT=2600 deno task dev\` listens on 2600, and \`SINKHOLE_LOG_FORMAT=json deno task dev\` prints JSON.
The liveness port is any free one (\`0\`), so two dev listeners never collide on it; the image keeps \`8025\`. The
control port ([control.md](control.md)) is \`2580\`; with \`SINKHOLE_BIND_PORT\` set (another listener beside the
first) it is any free one unless \`SINKHOLE_CONTROL_PORT\` says which. The start line says every port it took:
\`start: SMTP on 127.0.0.1:2600, health on 127.0.0.1:41234, control on http://127.0.0.1:39817, …\`.
`;
await Deno.writeTextFile(new URL("../docs/environment.md", import.meta.url), doc.trimStart());
