/**
 * Builds the image's single binary with exactly the flags of `deno task start`
 * (the one source of truth, also what every test runs).
 *
 *   deno run --allow-read --allow-run scripts/compile.ts --output /out/sinkhole [--arch amd64|arm64] [--dry-run]
 */

/** Docker's TARGETARCH → Deno's compile target. */
export const TARGETS: Record<string, string> = {
  amd64: "x86_64-unknown-linux-gnu",
  arm64: "aarch64-unknown-linux-gnu",
};

/** `deno run FLAGS… listener.ts` → `deno compile FLAGS… [--target T] --output O listener.ts`. */
export function compileArgs(start: string, output: string, arch?: string): string[] {
  const words = start.trim().split(/\s+/);
  if (words[0] !== "deno" || words[1] !== "run" || !words.at(-1)!.endsWith(".ts")) {
    throw new Error(`tasks.start must be "deno run FLAGS… SCRIPT.ts", got ${JSON.stringify(start)}`);
  }
  let target: string[] = [];
  if (arch) {
    if (!TARGETS[arch]) throw new Error(`unknown arch ${arch}: one of ${Object.keys(TARGETS).join(", ")}`);
    target = ["--target", TARGETS[arch]];
  }
  return ["compile", ...words.slice(2, -1), ...target, "--output", output, words.at(-1)!];
}

function option(name: string): string | undefined {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : undefined;
}

if (import.meta.main) {
  const root = new URL("..", import.meta.url).pathname;
  const start = JSON.parse(await Deno.readTextFile(`${root}/deno.json`)).tasks.start as string;
  const output = option("--output");
  if (!output) {
    console.error("compile: --output PATH is required");
    Deno.exit(2);
  }
  const args = compileArgs(start, output, option("--arch"));
  if (Deno.args.includes("--dry-run")) {
    console.log(JSON.stringify(["deno", ...args]));
    Deno.exit(0);
  }
  const { code } = await new Deno.Command(Deno.execPath(), { args, cwd: root }).spawn().status;
  Deno.exit(code);
}
