/**
 * The image. No Docker engine runs here, so these tests run what the Dockerfile runs: its
 * build stage's COPY lines laid out in a directory of their own, its RUN line executed as
 * written on an empty DENO_DIR (the real `deno check` and `deno compile`), and the image's
 * health check run through `deno task start`'s command against a live listener.
 *
 * What cannot run here: `deno compile` fetches the runtime it embeds the program in
 * (`denort`, from dl.deno.land) and only the npm registry is reachable. So the build is run
 * twice: once exactly as written, where it must stop at that download and nowhere else (a
 * proxy of the test's own on loopback refuses it at once: no traffic leaves the machine, no
 * hang); and once with `DENORT_BIN` (Deno's documented override of that runtime) set to a
 * stand-in executable, so the compile finishes and the test reads back what the binary
 * embeds. When the runtime is in the local Deno cache, the first run seeds it and must
 * succeed outright.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { privateAddress, ROOT, run, startCommand, startListener, taskText, which } from "../rig/helpers.ts";
import { DEFAULT_HEALTH_PORT } from "../listener.ts";
import {
  checkArgs,
  compileArgs,
  type Embedded,
  embeddedMetadata,
  embeddedProblems,
  GRAPH_ONLY,
  runtimeOnly,
  TARGETS,
  v8Flags,
} from "../scripts/compile.ts";
import { synthModule } from "../terraform/sinkhole.ts";

const dockerfile = Deno.readTextFileSync(`${ROOT}/Dockerfile`);
const start = taskText("start");
/** The runtime stage: everything after the last FROM. */
const runtime = dockerfile.slice(dockerfile.lastIndexOf("\nFROM "));

// ---------------------------------------------------------------------------------------
// The Dockerfile, read as Docker reads the parts this project uses.

/** Shell words of a RUN line (`sh -c`): quotes and `$VAR`/`${VAR}` from `vars`; anything else is refused. */
export function shellWords(text: string, vars: Record<string, string>): string[] {
  if (/[;&|<>`\\]|\$\(/.test(text)) throw new Error(`more shell than this test reads: ${text}`);
  const words: string[] = [];
  for (const m of text.matchAll(/"([^"]*)"|'([^']*)'|(\S+)/g)) {
    const expand = (s: string) =>
      s.replace(/\$\{?(\w+)\}?/g, (_, name) => {
        if (!(name in vars)) throw new Error(`RUN uses $${name}, which the build stage does not declare`);
        return vars[name];
      });
    words.push(m[2] !== undefined ? m[2] : expand(m[1] ?? m[3]));
  }
  return words;
}

interface BuildStage {
  /** ARG names the stage declares (TARGETARCH's value comes from buildx). */
  args: string[];
  /** ENV NAME=VALUE lines of the stage. */
  env: Record<string, string>;
  workdir: string;
  copies: { sources: string[]; dest: string }[];
  /** The RUN line's text after `RUN `. */
  run: string;
}

/** The build stage: from the first FROM to the next; one WORKDIR, COPY from the context, one RUN. */
function buildStage(text: string): BuildStage {
  const lines = text.split("\n");
  const from = lines.findIndex((l) => l.startsWith("FROM "));
  const end = lines.findIndex((l, i) => i > from && l.startsWith("FROM "));
  const stage = lines.slice(from + 1, end);
  const runs = stage.filter((l) => l.startsWith("RUN "));
  assertEquals(runs.length, 1, "one RUN in the build stage");
  return {
    args: stage.filter((l) => l.startsWith("ARG ")).map((l) => l.slice(4).split("=")[0].trim()),
    env: Object.fromEntries(
      stage.filter((l) => l.startsWith("ENV ")).map((l) => l.slice(4).trim().split(/=(.*)/s).slice(0, 2)),
    ),
    workdir: stage.find((l) => l.startsWith("WORKDIR "))!.slice(8).trim(),
    copies: stage.filter((l) => l.startsWith("COPY ") && !l.includes("--from")).map((l) => {
      const words = l.split(/\s+/).slice(1);
      return { sources: words.slice(0, -1), dest: words.at(-1)! };
    }),
    run: runs[0].slice(4),
  };
}

const stage = buildStage(dockerfile);
const DENO_VERSION = dockerfile.match(/^ARG DENO_VERSION=(\S+)$/m)?.[1];

/**
 * Lays the build context's COPY sources under `root` + WORKDIR as Docker would (a destination
 * ending in `/` is a directory; otherwise the one source's new path). `edit` may change a
 * file's text on the way (to break a copy).
 */
async function layBuildStage(root: string, edit: (path: string, text: string) => string = (_, t) => t) {
  const workdir = `${root}${stage.workdir}`;
  for (const { sources, dest } of stage.copies) {
    for (const source of sources) {
      const relative = dest.endsWith("/") ? `${dest}${source.split("/").at(-1)}` : dest;
      const target = `${workdir}/${relative.replace(/^(\.\/)+/, "")}`;
      await Deno.mkdir(target.slice(0, target.lastIndexOf("/")), { recursive: true });
      await Deno.writeTextFile(target, edit(source, await Deno.readTextFile(`${ROOT}/${source}`)));
    }
  }
  return workdir;
}

// ---------------------------------------------------------------------------------------
// Running the build stage.

/** How long a build may take before the test calls it hung: a bound, not an expectation (it takes seconds). */
const BUILD_WATCHDOG_MS = 300_000;

/** Where `deno compile` looks for a runtime it downloaded: `$DENO_DIR/dl/release/vX/denort-T.zip`. */
function denortCachePath(denoDir: string, target: string): string {
  return `${denoDir}/dl/release/v${Deno.version.deno}/denort-${target}.zip`;
}

/** The developer's own Deno cache (where a runtime downloaded once would be). */
async function ownDenoDir(): Promise<string> {
  const info = await run(Deno.execPath(), ["info", "--json"]);
  return JSON.parse(info.stdout).denoDir as string;
}

/**
 * A proxy on loopback that reads a request line and hangs up: every download the build tries
 * fails at once, and the test sees what it tried to reach.
 */
function refusingProxy() {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: string[] = [];
  const done = (async () => {
    for await (const conn of listener) {
      const buf = new Uint8Array(4096);
      const n = await conn.read(buf).catch(() => null);
      if (n) requests.push(new TextDecoder().decode(buf.subarray(0, n)).split("\r\n")[0]);
      conn.close();
    }
  })();
  const url = `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`;
  return {
    url,
    requests,
    async close() {
      listener.close();
      await done.catch(() => {});
    },
  };
}

interface Build {
  code: number;
  stdout: string;
  stderr: string;
  /** Request lines the build sent out (through the refusing proxy). */
  requests: string[];
  /** Where the binary was to be written (the RUN line's `--output`, under the temp root). */
  output: string;
  workdir: string;
}

/**
 * The build stage's RUN line, exactly as written, `$TARGETARCH` = `arch`: in a fresh
 * directory holding only what the stage COPYs, with an empty DENO_DIR. The stage's absolute
 * paths (WORKDIR, `--output /out/…`) are taken under a temp root instead of this machine's
 * `/`, and `deno` is this Deno (the test checks it is the Dockerfile's version).
 */
async function runBuildStage(
  arch: string,
  opts: { edit?: (path: string, text: string) => string; denortBin?: string; seedDenort?: string } = {},
): Promise<Build> {
  const root = await Deno.makeTempDir({ prefix: "sinkhole-image-" });
  const proxy = refusingProxy();
  try {
    const workdir = await layBuildStage(root, opts.edit);
    const denoDir = `${root}/deno-dir`;
    await Deno.mkdir(denoDir);
    if (opts.seedDenort) {
      const cached = denortCachePath(denoDir, TARGETS[arch]);
      await Deno.mkdir(cached.slice(0, cached.lastIndexOf("/")), { recursive: true });
      await Deno.copyFile(opts.seedDenort, cached);
    }
    const words = shellWords(stage.run, { TARGETARCH: arch });
    assertEquals(words[0], "deno");
    const argv = words.slice(1).map((w) => w.startsWith("/") ? `${root}${w}` : w);
    const output = argv[argv.indexOf("--output") + 1];
    await Deno.mkdir(output.slice(0, output.lastIndexOf("/")), { recursive: true });
    // The environment of a build: this one, without anything that would change what Deno
    // fetches or how it runs, then the stage's ENV, the empty cache and the proxy.
    const env = Deno.env.toObject();
    for (const k of Object.keys(env)) {
      if (/^(DENORT_BIN|DENO_V8_FLAGS|DENO_DIR|NO_PROXY|(HTTPS?|ALL)_PROXY)$/i.test(k)) delete env[k];
    }
    Object.assign(env, stage.env, { DENO_DIR: denoDir, NO_COLOR: "1", HTTPS_PROXY: proxy.url, HTTP_PROXY: proxy.url });
    if (opts.denortBin) env.DENORT_BIN = opts.denortBin;
    const child = new Deno.Command(Deno.execPath(), {
      args: argv,
      cwd: workdir,
      env,
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    let hung = false;
    const watchdog = setTimeout(() => {
      hung = true;
      child.kill("SIGKILL");
    }, BUILD_WATCHDOG_MS);
    const out = await child.output();
    clearTimeout(watchdog);
    await proxy.close();
    const dec = new TextDecoder();
    const result = {
      code: out.code,
      stdout: dec.decode(out.stdout),
      stderr: dec.decode(out.stderr),
      requests: proxy.requests,
      output,
      workdir,
    };
    assert(!hung, `the build did not end within ${BUILD_WATCHDOG_MS} ms:\n${result.stderr}`);
    return result;
  } catch (e) {
    await proxy.close();
    await Deno.remove(root, { recursive: true }).catch(() => {});
    throw e;
  }
}

async function removeBuild(b: Build) {
  await Deno.remove(b.workdir.slice(0, -stage.workdir.length), { recursive: true });
}

/** The one way `deno compile` may fail here: fetching its runtime for `arch` (nothing else went wrong before). */
function stoppedOnlyAtDenortDownload(b: Build, arch: string): void {
  const url = `https://dl.deno.land/release/v${Deno.version.deno}/denort-${TARGETS[arch]}.zip`;
  const out = b.stderr;
  assertMatch(out, /^Check listener\.ts$/m, "the module graph was type-checked");
  assertMatch(out, /^Compile listener\.ts to \S*\/out\/sinkhole$/m, "the check passed and the compile began");
  assertMatch(out, new RegExp(`^Download ${url.replaceAll(".", "\\.")}$`, "m"));
  assertMatch(out, /^error: Writing deno compile executable to temporary file '[^']*\/out\/sinkhole\.tmp-\w+'$/m);
  assertMatch(out, /^\s+0: Setting up base binary\.$/m);
  assertMatch(out, new RegExp(`^\\s+1: error sending request for url \\(${url.replaceAll(".", "\\.")}\\)`, "m"));
  assertEquals((out.match(/^error/gm) ?? []).length, 1, `one error, the download's:\n${out}`);
  // Deno retries a failed download; every try is for the runtime's host, nothing else was fetched.
  assert(b.requests.length > 0, "the runtime's download was tried");
  assertEquals(new Set(b.requests), new Set(["CONNECT dl.deno.land:443 HTTP/1.1"]), "the only thing fetched");
  assert(b.code !== 0);
}

const HERE = Deno.build.arch === "aarch64" ? "arm64" : "amd64";
const OTHER = HERE === "arm64" ? "amd64" : "arm64";

Deno.test("image: the Dockerfile's build stage on an empty DENO_DIR type-checks and bundles listener.ts", async (t) => {
  assertEquals(Deno.version.deno, DENO_VERSION, "this Deno is the build stage's (ARG DENO_VERSION)");
  const own = await ownDenoDir();
  for (const arch of [HERE, OTHER]) {
    await t.step(`--arch ${arch}`, async () => {
      const cached = denortCachePath(own, TARGETS[arch]);
      const seed = await Deno.stat(cached).then(() => cached, () => undefined);
      const b = await runBuildStage(arch, { seedDenort: seed });
      try {
        assert(!/out of memory/i.test(b.stderr), `the compiler ran out of memory:\n${b.stderr}`);
        if (seed) {
          // The runtime is cached: the build must finish, and the binary embed the task's flags.
          assertEquals(b.code, 0, b.stderr);
          assertEquals(b.requests, []);
          assertEquals(embeddedProblems(start, embeddedMetadata(await Deno.readFile(b.output))), []);
          if (arch === HERE) {
            // The real runtime runs the listener: its usage names the binary.
            const help = await run(b.output, ["--help"]);
            assertEquals(help.code, 0, help.stderr);
            assertMatch(help.stdout + help.stderr, /usage: .*sinkhole \[--dev \| --healthcheck/);
          }
        } else {
          console.log(`--arch ${arch}: stopped only because denort cannot be downloaded here (not in ${own})`);
          stoppedOnlyAtDenortDownload(b, arch);
        }
      } finally {
        await removeBuild(b);
      }
    });
  }
});

Deno.test("image: a type error in what the build stage copies fails the build before anything is compiled", async () => {
  const b = await runBuildStage(HERE, {
    edit: (path, text) => path === "listener.ts" ? `${text}\nexport const broken: number = "not a number";\n` : text,
  });
  try {
    assert(b.code !== 0, "the build failed");
    assertMatch(b.stderr, /TS2322 \[ERROR\]: Type 'string' is not assignable to type 'number'/);
    assert(!/^Compile /m.test(b.stderr), `nothing compiled:\n${b.stderr}`);
    assertEquals(b.requests, [], "nothing fetched");
  } finally {
    await removeBuild(b);
  }
});

/** A stand-in for the runtime `deno compile` embeds the program in: any executable will carry the trailer. */
const STAND_IN_RUNTIME = which("true") ?? Deno.execPath();

Deno.test("image: the binary embeds listener.ts alone, the task's permissions, and its V8 flags for run time", async () => {
  const b = await runBuildStage(OTHER, { denortBin: STAND_IN_RUNTIME });
  try {
    assertEquals(b.code, 0, b.stderr);
    assertEquals(b.requests, [], "with a runtime at hand, nothing is fetched");
    const embedded = embeddedMetadata(await Deno.readFile(b.output)) as Embedded;
    assert(embedded, "the binary carries deno compile's metadata");
    // The run-time heap bound: the binary starts V8 with the task's flags (after Deno's own defaults).
    const want = v8Flags(start);
    assertEquals(want.includes("--max-old-space-size=24"), true, "tasks.start bounds the old space");
    assertEquals(embedded.v8_flags.slice(-want.length), want);
    assertEquals(embeddedProblems(start, embedded), []);
    assertEquals(embedded.entrypoint_key, "listener.ts");
    assertEquals(embedded.node_modules, null, "no node_modules directory");
    // The permissions are the task's --allow-* flags, each unrestricted ([]), and nothing more.
    const allowed = start.split(/\s+/).filter((w) => w.startsWith("--allow-")).map((w) => w.slice(2).replace("-", "_"))
      .sort();
    const granted = Object.entries(embedded.permissions).filter(([k, v]) => k.startsWith("allow_") && v !== null)
      .map(([k]) => k).filter((k) => k !== "allow_import").sort();
    assertEquals(granted, allowed);
    // What deno compile lists as embedded: listener.ts and nothing else (no npm package, no other file).
    const listing = b.stderr.slice(b.stderr.indexOf("Embedded Files"), b.stderr.indexOf("Files:"));
    const files = [...listing.matchAll(/[└├]── (\S+) \(/g)].map((m) => m[1]);
    assertEquals(files, ["listener.ts"], b.stderr);
  } finally {
    await removeBuild(b);
  }
});

// ---------------------------------------------------------------------------------------
// The Dockerfile held to the tested command.

Deno.test("image: the binary is compiled with exactly the flags the tests run; the check runs without the V8 flags", () => {
  const tested = startCommand().slice(1); // what helpers.startListener spawns, without the deno path
  const compiled = compileArgs(start, "/out/sinkhole", "arm64");
  assertEquals(tested[0], "run");
  assertEquals(compiled[0], "compile");
  const flags = (argv: string[]) => argv.filter((a) => a.startsWith("--allow") || a.startsWith("--v8-flags"));
  assertEquals(flags(compiled), flags(tested));
  assertEquals(compiled.at(-1), tested.at(-1), "same entry file");
  assertEquals(compiled.slice(compiled.indexOf("--target"), compiled.indexOf("--target") + 2), [
    "--target",
    "aarch64-unknown-linux-gnu",
  ]);
  assertEquals(Object.keys(TARGETS).sort(), ["amd64", "arm64"], "both cluster architectures");
  // The compiler never runs under the listener's heap: its type check is a step of its own.
  const check = checkArgs(start);
  assertEquals(check[0], "check");
  assertEquals(check.filter(runtimeOnly), [], "no --v8-flags, no --allow-*");
  assertEquals(check.at(-1), compiled.at(-1), "the same entry file");
  for (const flag of GRAPH_ONLY) assert(check.includes(flag) && compiled.includes(flag), `both resolve with ${flag}`);
  assert(compiled.includes("--no-check"), "the compile does not check again under the listener's heap");
});

Deno.test("image: the Dockerfile compiles through scripts/compile.ts, which checks, then compiles", async () => {
  assertEquals(
    shellWords(stage.run, { TARGETARCH: "amd64" }),
    "deno run --allow-read --allow-run --allow-env scripts/compile.ts --output /out/sinkhole --arch amd64".split(" "),
  );
  assertEquals(stage.args, ["TARGETARCH"]);
  assertMatch(dockerfile, /FROM --platform=\$BUILDPLATFORM denoland\/deno:\$\{DENO_VERSION\} AS build/);
  // The same script, asked what it would run:
  const dry = await run(Deno.execPath(), [
    "run",
    "--allow-read",
    "--allow-run",
    "--allow-env",
    `${ROOT}/scripts/compile.ts`,
    "--output",
    "/out/sinkhole",
    "--arch",
    "amd64",
    "--dry-run",
  ]);
  assertEquals(dry.code, 0, dry.stderr);
  assertEquals(dry.stdout.trim().split("\n").map((l) => JSON.parse(l)), [
    ["deno", ...checkArgs(start)],
    ["deno", ...compileArgs(start, "/out/sinkhole", "amd64")],
  ]);
});

Deno.test("image: embeddedProblems names a binary that would not run as tasks.start does", () => {
  const good: Embedded = {
    v8_flags: ["UNUSED_BUT_NECESSARY_ARG0", "--stack-size=1024", ...v8Flags(start)],
    entrypoint_key: "listener.ts",
    permissions: {},
    node_modules: null,
  };
  assertEquals(embeddedProblems(start, good), []);
  const table: [string, Embedded | undefined, RegExp][] = [
    ["no metadata", undefined, /no deno compile metadata/],
    ["no heap bound", { ...good, v8_flags: good.v8_flags.slice(0, 2) }, /would start V8 with/],
    ["another bound", { ...good, v8_flags: [...good.v8_flags, "--max-old-space-size=4096"] }, /would start V8/],
    ["another entry", { ...good, entrypoint_key: "ctl/ctl.ts" }, /entry point is ctl\/ctl\.ts/],
    ["node_modules", { ...good, node_modules: { type: "managed" } }, /node_modules/],
  ];
  for (const [name, embedded, problem] of table) {
    assertMatch(embeddedProblems(start, embedded).join("\n"), problem, name);
  }
  assertEquals(embeddedMetadata(new TextEncoder().encode("d3n0l4nd is not followed by metadata")), undefined);
});

Deno.test("image: runtime stage is distroless, root (port 25 in Cabalmail's task definition), the binary alone, exec-form entrypoint and health check", () => {
  assertMatch(runtime, /^\nFROM gcr\.io\/distroless\/cc-debian12\n/);
  assertMatch(runtime, /\nCOPY --from=build \/out\/sinkhole \/sinkhole\n/);
  assertEquals((runtime.match(/\nCOPY /g) ?? []).length, 1, "only the binary");
  // Cabalmail's task definition binds 25 with no systemControls and no user: only root may (docs/cabalmail.md).
  assertMatch(runtime, /\nUSER root\n/);
  assertMatch(runtime, /\nENTRYPOINT \["\/sinkhole"\]\n/);
  assertMatch(runtime, /HEALTHCHECK [^\n]*CMD \["\/sinkhole", "--healthcheck"\]/);
  assert(!/\nRUN /.test(runtime), "no RUN in the runtime stage: it has no shell");
});

/** `["/sinkhole", ARGS…]` (the binary the build stage writes) → tasks.start's command with ARGS. */
function asTaskStart(exec: string[]): string[] {
  assertEquals(exec[0], "/sinkhole", "the check runs the image's binary");
  return [...startCommand(), ...exec.slice(1)];
}

Deno.test("image: the image's and the ECS task's health checks, run through tasks.start, tell up from down", async () => {
  const image = JSON.parse(runtime.match(/\nHEALTHCHECK [^\n]*CMD (\[[^\n]*\])\n/)![1]) as string[];
  const defs = (synthModule() as { resource: Record<string, Record<string, { container_definitions: string }>> })
    .resource.aws_ecs_task_definition.task.container_definitions;
  const ecs = JSON.parse(defs.match(/command = (\["CMD", [^\]]*\])/)![1]) as string[];
  assertEquals(ecs[0], "CMD", "exec form: no shell");
  const checks = { image, ecs: ecs.slice(1) };
  // The liveness port at its default, as in the image, on an address of this run's own: once the
  // listener stops, nobody else answers there. Only the address differs from the container's.
  const at = privateAddress(DEFAULT_HEALTH_PORT);
  const l = await startListener({ SINKHOLE_MODE: "defer", SINKHOLE_HEALTH_PORT: String(at.port) }, { host: at.host });
  assertEquals(l.logs.find((x) => x.event === "start")!.health, `${at.host}:${DEFAULT_HEALTH_PORT}`);
  const env = { SINKHOLE_HEALTH_HOST: at.host, SINKHOLE_MODE: "defer" };
  const runCheck = (exec: string[]) => {
    const [cmd, ...args] = asTaskStart(exec);
    return run(cmd, args, { env });
  };
  try {
    for (const [name, exec] of Object.entries(checks)) {
      const up = await runCheck(exec);
      assertEquals(up.code, 0, `${name} check against a live listener: ${up.stderr}`);
    }
  } finally {
    await l.stop();
  }
  for (const [name, exec] of Object.entries(checks)) {
    const down = await runCheck(exec);
    assertEquals(down.code, 1, `${name} check once the listener stopped: ${down.stderr}`);
    assertMatch(down.stderr, /^healthcheck: /m);
  }
});

Deno.test("image: .dockerignore admits exactly what the build stage copies", () => {
  const admitted = Deno.readTextFileSync(`${ROOT}/.dockerignore`).split("\n").filter((l) => l.startsWith("!"))
    .map((l) => l.slice(1)).sort();
  const copied = stage.copies.flatMap((c) => c.sources).sort();
  assertEquals(admitted, copied);
});
