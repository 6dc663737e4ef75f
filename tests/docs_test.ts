/**
 * The documentation against what it documents: every variable the listener reads and every
 * option of `ctl` is in the docs; each command's help is in docs/ctl.md as printed; every
 * file or anchor the docs cite exists; the README is a front door; and the runbook is walked
 * step by step against the buttons' inputs (the workflow files), `ctl`'s grammar, the
 * environments file, and the real AWS CLI's own operations and parameters.
 */
import { parse } from "yaml";
import { assert, assertEquals } from "../rig/assert.ts";
import { needs, ROOT, run, variablesInSource } from "../rig/helpers.ts";
import { commandHelp, COMMANDS, type OptionName, OPTIONS, parseCommandLine } from "../ctl/cli.ts";
import { numberOption, optionValue } from "../ctl/cli.ts";
import { validateMode } from "../ctl/commands.ts";
import { ENVIRONMENT_VARIABLES } from "../listener.ts";
import { parseEnvironments } from "../ctl/environments.ts";
import { rehearseArgs } from "../rehearse/rehearse.ts";
import { commandsShown } from "./shown.ts";

const read = (path: string) => Deno.readTextFileSync(`${ROOT}/${path}`);
const DOCS = ["README.md", ...[...Deno.readDirSync(`${ROOT}/docs`)].map((e) => `docs/${e.name}`).sort()];
/** Files the docs name that are Cabalmail's (cabal-infra), not this repository's. */
const CABALMAIL_FILES = new Set(["terraform/infra/modules/ecs/sinkhole.tf", "generate-config.sh"]);
/** cabal-infra's mirror on this machine (a bare git directory); absent elsewhere, where its citations go unchecked. */
const CABAL_INFRA_MIRROR = "/work/.mirror/cabalmail+cabal-infra/repo";
const exists = (path: string) => {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
};

/** GitHub's anchor for a heading. */
const slug = (heading: string) =>
  heading.trim().toLowerCase().replace(/`/g, "").replace(/[^\p{L}\p{N} _-]/gu, "").replace(/ /g, "-");

Deno.test("docs: every environment variable the listener reads is in docs/environment.md", () => {
  const doc = read("docs/environment.md");
  for (const name of variablesInSource()) assert(doc.includes(`\`${name}\``), `docs/environment.md names ${name}`);
  // Each row says the table's default (scripts/docs-environment.ts writes the page from it).
  for (const v of ENVIRONMENT_VARIABLES) {
    const row = doc.split("\n").find((l) => l.startsWith(`| \`${v.name}\``)) ?? "";
    assert(
      row.includes(v.default ? `\`${v.default}\`` : "unset"),
      `docs/environment.md: ${v.name} defaults to ${v.default}`,
    );
  }
});

Deno.test("docs: docs/ctl.md has every option and each command's --help exactly as printed", () => {
  const doc = read("docs/ctl.md");
  for (const name of Object.keys(OPTIONS)) assert(doc.includes(`--${name}`), `docs/ctl.md names --${name}`);
  for (const c of COMMANDS) assert(doc.includes(commandHelp(c)), `docs/ctl.md has \`ctl ${c.name} --help\` as printed`);
});

Deno.test("docs: every file, link and anchor the README and docs/ cite exists", () => {
  const problems: string[] = [];
  for (const doc of DOCS) {
    const text = read(doc);
    const dir = doc.includes("/") ? doc.slice(0, doc.lastIndexOf("/")) : ".";
    // Markdown links to files of the repository, with their anchors.
    for (const [, target] of text.matchAll(/\]\(([^)\s]+)\)/g)) {
      if (/^[a-z]+:/.test(target)) continue;
      const [file, anchor] = target.split("#");
      const path = file === "" ? doc : `${dir}/${file}`.replace(/^\.\//, "");
      if (!exists(`${ROOT}/${path}`)) {
        problems.push(`${doc}: link ${target}: no file ${path}`);
        continue;
      }
      if (anchor !== undefined && path.endsWith(".md")) {
        const anchors = [...read(path).matchAll(/^#+ (.+)$/gm)].map((m) => slug(m[1]));
        if (!anchors.includes(anchor)) problems.push(`${doc}: link ${target}: no heading #${anchor} in ${path}`);
      }
    }
    // Cabalmail's files, cited as `cabal-infra:PATH`: each exists in cabal-infra's mirror, where there is one.
    for (const [, path] of text.matchAll(/`cabal-infra:([^`\s]+)`/g)) {
      if (!exists(CABAL_INFRA_MIRROR)) break;
      const r = new Deno.Command("git", { args: ["-C", CABAL_INFRA_MIRROR, "cat-file", "-e", `HEAD:${path}`] })
        .outputSync();
      if (r.code !== 0) problems.push(`${doc}: \`cabal-infra:${path}\` is no file of cabal-infra`);
    }
    // Paths in code spans that name the repository's files: `docs/x.md`, `tests/y_test.ts`, `listener.ts`.
    for (const [, span] of text.matchAll(/`([^`\s]+)`/g)) {
      const path = span.replace(/^\.\//, "").replace(/[:,]$/, "");
      const repoPath =
        /^(docs|tests|ctl|terraform|scripts|bench|rehearse|integration|\.github|\.ci)\/[\w./-]*[\w-]$/.test(path) ||
        /^[\w-]+\.(ts|md|json|sh|yml|lock)$/.test(path);
      if (!repoPath || path.startsWith("bench/.cache") || CABALMAIL_FILES.has(path)) continue;
      if (/^[\w-]+\.(ts|md|json|sh|yml|lock)$/.test(path) && !exists(`${ROOT}/${path}`)) {
        // A bare file name: it must exist somewhere the docs point (root, docs/, tests/, ctl/, integration/).
        const somewhere = ["", "docs/", "tests/", "ctl/", "integration/", "scripts/", "terraform/", "rehearse/"]
          .some((d) => exists(`${ROOT}/${d}${path}`));
        if (!somewhere && !["sinkhole.jsonl", "main.tf.json"].includes(path)) {
          problems.push(`${doc}: \`${path}\` names no file`);
        }
        continue;
      }
      if (!/^[\w-]+\.(ts|md|json|sh|yml|lock)$/.test(path) && !exists(`${ROOT}/${path}`)) {
        problems.push(`${doc}: \`${path}\` names no file`);
      }
    }
  }
  assertEquals(problems, [], problems.join("\n"));
});

Deno.test("docs: the README is a front door, linking every reference page; docs/testing.md names every suite", () => {
  const readme = read("README.md");
  const lines = readme.split("\n");
  const wide = lines.map((l, i) => [i + 1, l.length] as const).filter(([, n]) => n > 120);
  assertEquals(wide, [], "no README line over 120 columns");
  assert(lines.length <= 120, `a two-minute read: ${lines.length} lines`);
  const sections = [...readme.matchAll(/^## (.+)$/gm)].map((m) => m[1]);
  assertEquals(sections, ["Quick start", "Using it in your tests", "Operating it in AWS", "Reference", "Tests"]);
  for (const doc of DOCS.filter((d) => d.startsWith("docs/"))) {
    assert(readme.includes(`](${doc})`), `the README links ${doc}`);
  }
  const testing = read("docs/testing.md");
  for (const e of Deno.readDirSync(`${ROOT}/tests`)) {
    if (e.name.endsWith("_test.ts")) assert(testing.includes(`| \`${e.name}\``), `docs/testing.md lists ${e.name}`);
  }
});

// ---------------------------------------------------------------------------
// The runbook, walked
// ---------------------------------------------------------------------------

// deno-lint-ignore no-explicit-any
type Workflow = any;
const workflow = (name: string): Workflow | undefined => {
  const path = `${ROOT}/.github/workflows/${name}.yml`;
  return exists(path) ? parse(Deno.readTextFileSync(path)) : undefined;
};
const environments = parseEnvironments(read("ctl/environments.json"));
/** AWS CLI options that belong to the CLI, not to an operation's input. */
const AWS_GLOBAL = new Set(["query", "output", "region", "profile", "endpoint-url", "no-cli-pager", "debug"]);
const aws = needs("aws");

/** The runbook's sections: each step (and the other sections) with its text. */
function sections(): { title: string; body: string }[] {
  const text = read("docs/runbook.md");
  return [...text.matchAll(/^## (.+)\n([\s\S]*?)(?=^## |(?![\s\S]))/gm)].map((m) => ({ title: m[1], body: m[2] }));
}

/** Checks a button reference (`**name** with k=v, …`): the workflow exists, takes those inputs, and the values. */
function checkButton(step: string, name: string, inputs: string | undefined): string[] {
  const wf = workflow(name);
  if (!wf) return [`${step}: button **${name}**: no .github/workflows/${name}.yml`];
  const dispatch = wf.on?.workflow_dispatch;
  if (dispatch === undefined) return [`${step}: **${name}** cannot be run by hand (no workflow_dispatch)`];
  const problems: string[] = [];
  for (const pair of (inputs ?? "").split(/,\s*/).filter(Boolean)) {
    const m = /^([\w-]+)=(.+)$/.exec(pair.trim());
    if (!m) continue;
    const [, key, value] = m;
    const input = dispatch?.inputs?.[key];
    if (!input) {
      problems.push(`${step}: **${name}** has no input ${key}`);
      continue;
    }
    const ok = input.type === "choice"
      ? (input.options as string[]).includes(value)
      : input.type === "boolean"
      ? value === "true" || value === "false"
      : true;
    if (!ok) problems.push(`${step}: **${name}** input ${key}=${value} is not one it offers`);
    if (key === "environment" && !environments.has(value)) problems.push(`${step}: no environment ${value}`);
  }
  return problems;
}

/** Checks a `deno task ctl …` or `deno task rehearse …` command by the CLI's own grammar and validation. */
function checkDenoTask(step: string, words: string[]): string[] {
  const [, , task, ...args] = words;
  try {
    if (task === "rehearse") {
      rehearseArgs(args);
      return [];
    }
    if (task !== "ctl") return task === "dev" || task === "test" ? [] : [`${step}: unknown task ${task}`];
    // `deno task ctl` alone names the CLI; `deno task ctl COMMAND --help` a placeholder: each command must take it.
    if (args.length === 0) return [];
    if (args[0] === "COMMAND") {
      for (const c of COMMANDS) parseCommandLine([...c.name.split(" "), ...args.slice(1)]);
      return [];
    }
    const parsed = parseCommandLine(args);
    if (!parsed.command) return [`${step}: \`deno task ctl ${args.join(" ")}\` names no command`];
    for (const [name, raw] of Object.entries(parsed.values) as [OptionName, string | true][]) {
      if (OPTIONS[name].kind === "value") (("number" in OPTIONS[name]) ? numberOption : optionValue)(name, raw);
    }
    if (parsed.command.name === "mode set") validateMode(parsed.arg!);
    const env = parsed.values.env;
    if (typeof env === "string" && !environments.has(env)) return [`${step}: no environment ${env}`];
    return [];
  } catch (err) {
    return [`${step}: \`${words.join(" ")}\`: ${(err as Error).message}`];
  }
}

/** Splits a shell command line into words (quotes kept together, then removed). */
function shellWords(command: string): string[] {
  return [...command.matchAll(/'[^']*'|"(?:[^"\\]|\\.)*"|\S+/g)].map((m) => m[0].replace(/^(['"])([\s\S]*)\1$/, "$2"));
}

/** Checks an `aws SERVICE OPERATION --opt …` command against the real CLI, and its names against the environment. */
async function checkAws(step: string, words: string[]): Promise<string[]> {
  const [, service, op, ...rest] = words;
  const sub = service === "ecs" && op === "wait" ? [op, rest.shift()!] : [op];
  const skeleton = await run("aws", [service, ...sub, "--generate-cli-skeleton"], { env: { AWS_PAGER: "" } });
  if (skeleton.code !== 0) return [`${step}: \`aws ${service} ${sub.join(" ")}\` is not an AWS CLI operation`];
  const params = new Set(Object.keys(JSON.parse(skeleton.stdout)).map((k) => k.toLowerCase()));
  const problems: string[] = [];
  const stage = environments.get("stage")!;
  const names: Record<string, string[]> = {
    cluster: [stage.cluster],
    service: [stage.mtaService, stage.sinkholeService],
    services: [stage.mtaService, stage.sinkholeService],
    "service-name": [stage.mtaService, stage.sinkholeService],
    container: [stage.mtaContainer],
    name: [stage.parameter],
  };
  for (let i = 0; i < rest.length; i++) {
    if (!rest[i].startsWith("--")) continue;
    const opt = rest[i].slice(2);
    if (AWS_GLOBAL.has(opt)) continue;
    if (!params.has(opt.replace(/-/g, ""))) problems.push(`${step}: \`aws ${service} ${op}\` takes no --${opt}`);
    const value = rest[i + 1];
    if (names[opt] && value && !value.startsWith("--") && !names[opt].includes(value)) {
      problems.push(`${step}: --${opt} ${value} is not the environment's (${names[opt].join(" or ")})`);
    }
  }
  return problems;
}

Deno.test({
  name: "docs: the runbook walked step by step: each step's buttons, inputs and commands exist and are valid",
  ignore: aws.ignore,
  fn: async () => {
    const problems: string[] = [];
    const walked: string[] = [];
    const all = sections();
    const steps = all.filter((s) => /^Step \d+: /.test(s.title));
    assertEquals(steps.length, 10, "ten steps");
    for (const { title, body } of all) {
      const text = body.replace(/\n\s*/g, " ");
      const buttons = [...text.matchAll(/\*\*([\w-]+)\*\*(?: with ((?:[\w-]+=[^\s,.;:()]+(?:, )?)+))?/g)]
        .filter((m) => workflow(m[1]) !== undefined || m[2] !== undefined);
      for (const [, name, inputs] of buttons) {
        problems.push(...checkButton(title, name, inputs));
        walked.push(`${title}: button ${name}${inputs ? ` with ${inputs}` : ""}`);
      }
      // Every command the section shows (```sh lines and inline commands; tests/runbook_test.ts runs each).
      for (const { text: code } of commandsShown(body)) {
        const words = shellWords(code);
        if (words[0] === "deno" && words[1] === "task") {
          problems.push(...checkDenoTask(title, words));
          walked.push(`${title}: ${code}`);
        } else if (words[0] === "aws" && words.length >= 3) {
          problems.push(...await checkAws(title, words));
          walked.push(`${title}: ${code}`);
        }
      }
      if (/^Step \d+: /.test(title)) {
        const hasButton = buttons.length > 0 || /There is no button on purpose/.test(text);
        if (!hasButton) problems.push(`${title}: no button (or a reason there is none)`);
        if (!/Commands?:/.test(text)) problems.push(`${title}: no commands`);
      }
    }
    console.log(`walked ${walked.length} references:\n${walked.join("\n")}`);
    assertEquals(problems, [], problems.join("\n"));
  },
});
