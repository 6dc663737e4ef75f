/**
 * Rewrites the "Every command" section of docs/ctl.md from ctl/cli.ts: each command's
 * `--help` as printed (tests/docs_test.ts fails when the two differ).
 *
 *   deno run --allow-read --allow-write scripts/docs-ctl.ts
 */
import { commandHelp, COMMANDS } from "../ctl/cli.ts";

const path = new URL("../docs/ctl.md", import.meta.url);
const doc = await Deno.readTextFile(path);
const at = doc.indexOf("## Every command");
if (at < 0) throw new Error('docs/ctl.md has no section "Every command"');
const section = `## Every command

Each block is that command's \`--help\`, as printed (\`tests/docs_test.ts\` holds the two together; after changing
\`ctl/cli.ts\`, \`deno run --allow-read --allow-write scripts/docs-ctl.ts\` rewrites this section).

${COMMANDS.map((c) => `### ${c.name}\n\n\`\`\`text\n${commandHelp(c)}\n\`\`\``).join("\n\n")}
`;
await Deno.writeTextFile(path, doc.slice(0, at) + section);
