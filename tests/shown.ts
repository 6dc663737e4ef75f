/**
 * The commands a page of the docs shows, as printed: every line of a ```sh block (one command a line; a line
 * that starts with # is a comment), and every inline code span that is a whole `deno task …` or `aws …` command
 * (`deno task ctl` alone names the CLI, it is not a command). tests/runbook_test.ts runs
 * each exactly so; tests/docs_test.ts checks them against ctl's grammar and the aws CLI's operations.
 */
export interface Shown {
  /** The command's text, exactly as printed. */
  text: string;
  /** The section (## heading) it is in. */
  section: string;
  /** A fenced ```sh line, or an inline code span. */
  fenced: boolean;
}

export function commandsShown(markdown: string): Shown[] {
  const out: Shown[] = [];
  let section = "";
  let inSh = false;
  let inOther = false;
  for (const line of markdown.split("\n")) {
    const fence = /^\s*```(\w*)\s*$/.exec(line);
    if (fence) {
      if (inSh || inOther) inSh = inOther = false;
      else if (fence[1] === "sh") inSh = true;
      else inOther = true;
      continue;
    }
    if (inSh) {
      const text = line.trim();
      if (text && !text.startsWith("#")) out.push({ text, section, fenced: true });
      continue;
    }
    if (inOther) continue;
    const heading = /^## (.+)$/.exec(line);
    if (heading) section = heading[1];
  }
  // Inline spans, outside fenced blocks, across line breaks (a span may wrap).
  const prose = markdown.replace(/^\s*```\w*\s*\n[\s\S]*?^\s*```\s*$/gm, "");
  let at = "";
  for (const part of prose.split(/^(?=## )/m)) {
    const heading = /^## (.+)$/m.exec(part);
    if (heading && part.startsWith("## ")) at = heading[1];
    for (const [, code] of part.replace(/\n\s*/g, " ").matchAll(/`([^`]+)`/g)) {
      const words = code.trim().split(/\s+/);
      const command = (words[0] === "deno" && words[1] === "task" && words.length >= 3 &&
        (words[2] !== "ctl" || words.length >= 4)) ||
        (words[0] === "aws" && words.length >= 3);
      if (command) out.push({ text: code.trim(), section: at, fenced: false });
    }
  }
  return out;
}
