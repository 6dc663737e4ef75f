/**
 * The terraform-cdk construct: cdktf Testing assertions on every resource, the committed
 * module against a fresh synth, and the production guard evaluated by the real terraform
 * binary (offline: the guard is extracted onto a built-in terraform_data resource).
 */
import { Testing } from "cdktf";
import { assert, assertEquals, assertMatch } from "./assert.ts";
import { assertTools, needs, ROOT, run } from "./helpers.ts";
import {
  GUARD_MESSAGE,
  MEMORY_HARD_CAP_MB,
  MEMORY_RESERVATION_MB,
  MODULE_PATH,
  moduleText,
  SinkholeStack,
  synthModule,
} from "../terraform/sinkhole.ts";

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

const synthesized = Testing.synth(new SinkholeStack(Testing.app(), "sinkhole"));
const mod = synthModule() as Json;
const res = (type: string, name: string) => mod.resource[type][name] as Json;
const has = (type: string, props: Record<string, unknown>) =>
  assert(Testing.toHaveResourceWithProperties(synthesized, type, props), `${type} with ${JSON.stringify(props)}`);
const GATED = "${var.sinkhole ? 1 : 0}";

Deno.test("terraform: ECR repository exists whatever the flag, protected, immutable, scanned, expiring", () => {
  has("aws_ecr_repository", {
    name: "cabal-sinkhole",
    image_tag_mutability: "IMMUTABLE",
    image_scanning_configuration: { scan_on_push: true },
  });
  const repo = res("aws_ecr_repository", "repository");
  assertEquals(repo.lifecycle, { prevent_destroy: true });
  assertEquals(repo.count, undefined, "not gated: toggling the flag never destroys images");
  const policy = JSON.parse(res("aws_ecr_lifecycle_policy", "repository_expiry").policy);
  assert(policy.rules.every((r: Json) => r.action.type === "expire"));
});

Deno.test("terraform: SSM parameter defaults to defer and ignores operator changes", () => {
  has("aws_ssm_parameter", { name: "${var.mode_parameter_name}", type: "String", value: "defer" });
  const p = res("aws_ssm_parameter", "mode");
  assertEquals(p.lifecycle, { ignore_changes: ["value"] });
  assertEquals(p.count, undefined);
  assertEquals(mod.variable.mode_parameter_name.default, "/cabal/sinkhole_mode");
});

Deno.test("terraform: task definition: EC2, awsvpc, 64/128 MB, health check without a shell, port-25 sysctl, awslogs", () => {
  has("aws_ecs_task_definition", {
    family: "cabal-sinkhole",
    network_mode: "awsvpc",
    requires_compatibilities: ["EC2"],
  });
  const task = res("aws_ecs_task_definition", "task");
  assertEquals(task.count, GATED);
  assertEquals(task.lifecycle.ignore_changes, ["container_definitions"]);
  const defs: string = task.container_definitions;
  assertMatch(defs, new RegExp(`memory = ${MEMORY_HARD_CAP_MB}\\n`));
  assertMatch(defs, new RegExp(`memoryReservation = ${MEMORY_RESERVATION_MB}\\n`));
  assertMatch(defs, /command = \["CMD", "\/sinkhole", "--healthcheck"\]/, "exec form: no shell");
  assertMatch(defs, /namespace = "net\.ipv4\.ip_unprivileged_port_start", value = "25"/);
  assertMatch(defs, /logDriver = "awslogs"/);
  assertMatch(defs, /"awslogs-group" = one\(aws_cloudwatch_log_group\.logs\[\*\]\.name\)/);
  assertMatch(defs, /SINKHOLE_MODE_PARAM", value = aws_ssm_parameter\.mode\.name/);
  has("aws_cloudwatch_log_group", { name: "/ecs/cabal-sinkhole", retention_in_days: "${var.log_retention_days}" });
});

Deno.test("terraform: task role may do exactly ssm:GetParameter on exactly the mode parameter", () => {
  const policy: string = res("aws_iam_role_policy", "task_policy").policy;
  assertEquals(
    policy,
    '${jsonencode({Version = "2012-10-17", Statement = [{Effect = "Allow", Action = "ssm:GetParameter", ' +
      "Resource = aws_ssm_parameter.mode.arn}]})}",
  );
  assertEquals((policy.match(/Action/g) ?? []).length, 1, "one statement, one action");
  assertEquals(JSON.parse(res("aws_iam_role", "task_role").assume_role_policy).Statement[0].Principal, {
    Service: "ecs-tasks.amazonaws.com",
  });
  const exec: string = res("aws_iam_role_policy", "execution_policy").policy;
  assertMatch(exec, /ecr:BatchGetImage.*Resource = aws_ecr_repository\.repository\.arn/);
  assertMatch(exec, /logs:PutLogEvents.*aws_cloudwatch_log_group\.logs/);
});

Deno.test("terraform: service, Cloud Map, security group, drain-before-deregister", () => {
  const svc = res("aws_ecs_service", "service");
  assertEquals(svc.count, GATED);
  assertEquals(svc.desired_count, "${var.quiesced ? 0 : 1}");
  assertEquals(svc.load_balancer, undefined, "no load balancer");
  assertMatch(svc.service_registries.registry_arn, /aws_service_discovery_service\.discovery/);
  assertEquals(svc.capacity_provider_strategy, [{ capacity_provider: "${var.capacity_provider}", weight: 1 }]);
  has("aws_service_discovery_service", {
    name: "sinkhole",
    dns_config: {
      namespace_id: "${var.namespace_id}",
      routing_policy: "MULTIVALUE",
      dns_records: [{ ttl: 10, type: "A" }],
    },
  });
  const sg = res("aws_security_group", "security_group");
  assertEquals(sg.ingress.length, 1);
  assertEquals(sg.ingress[0].from_port, 25);
  assertEquals(sg.ingress[0].to_port, 25);
  assertEquals(sg.ingress[0].cidr_blocks, ["${var.vpc_cidr}"]);
  const recon = res("terraform_data", "cloud_map_lifecycle");
  assertEquals(recon.count, GATED);
  const [create, destroy] = recon.provisioner.map((p: Json) => p["local-exec"]);
  assertMatch(create.command, /--force-new-deployment/);
  assertEquals(destroy.when, "destroy");
  assertMatch(destroy.command, /--desired-count 0 .*wait services-stable/);
});

Deno.test("terraform: forgotten-mail alarm on the MTA's log group, and the outputs", () => {
  has("aws_cloudwatch_log_metric_filter", { pattern: '"sinkhole.test"', log_group_name: "${var.mta_log_group_name}" });
  has("aws_cloudwatch_metric_alarm", { metric_name: "SinkholeTestMailLogged", threshold: 1 });
  assertEquals(mod.output.mailertable_line.value, "sinkhole.test smtp:[sinkhole.${var.namespace_name}]");
  assert(!mod.output.mailertable_line.value.includes(":25"), "no port: sendmail would read it as a second host");
  for (const o of ["repository_url", "hostname", "parameter_name", "parameter_arn", "smtp_out_environment"]) {
    assert(mod.output[o], o);
  }
});

Deno.test("terraform: every variable and output of the module and of the live root says what it is", () => {
  for (const kind of ["variable", "output"] as const) {
    for (const [name, def] of Object.entries(mod[kind] as Record<string, { description?: string }>)) {
      assert((def.description ?? "").length > 10, `module ${kind} ${name} has a description`);
    }
  }
  const live = Deno.readTextFileSync(`${ROOT}/terraform/live/main.tf`);
  for (const block of live.matchAll(/^(variable|output) "(\w+)" \{([\s\S]*?)^\}/gm)) {
    assert(/description\s*=\s*"[^"]{10,}"/.test(block[3]), `live ${block[1]} ${block[2]} has a description`);
  }
});

Deno.test("terraform: the committed module is what a fresh synth writes (run `deno task synth`)", async () => {
  assertEquals(await Deno.readTextFile(MODULE_PATH), moduleText(), "terraform/module/main.tf.json is stale");
  assert(!JSON.stringify(mod).includes("cdktf"), "the module does not depend on cdktf");
  assertEquals(mod.terraform.backend, undefined);
});

// --- The production guard, evaluated by terraform ----------------------------------------

const tf = needs("terraform");

/** A built-in-only configuration carrying one guard layer of the synthesized module. */
function guardConfig(layer: "validation" | "precondition"): Json {
  const variables = structuredClone(mod.variable) as Json;
  const keep = ["environment", "allowed_environments", "sinkhole"];
  for (const k of Object.keys(variables)) if (!keep.includes(k)) delete variables[k];
  const task = res("aws_ecs_task_definition", "task");
  if (layer === "precondition") delete variables.sinkhole.validation;
  return {
    variable: variables,
    resource: {
      terraform_data: {
        guard: {
          count: task.count,
          input: "guard",
          ...(layer === "precondition" ? { lifecycle: { precondition: task.lifecycle.precondition } } : {}),
        },
      },
    },
  };
}

const CASES: [string, boolean, boolean][] = [
  ["prod", true, false],
  ["production", true, false],
  ["Prod", true, false],
  ["PRODUCTION", true, false],
  ["qa", true, false],
  ["stage", true, true],
  ["development", true, true],
  ["prod", false, true],
  ["production", false, true],
  ["stage", false, true],
];

for (const layer of ["validation", "precondition"] as const) {
  Deno.test({
    name: `terraform: guard layer "${layer}": refuses prod/production/unlisted, allows stage, off passes anywhere`,
    ignore: tf.ignore,
    fn: async () => {
      assertTools(tf.missing);
      const dir = await Deno.makeTempDir({ prefix: `sinkhole-guard-${layer}-` });
      try {
        await Deno.writeTextFile(`${dir}/main.tf.json`, JSON.stringify(guardConfig(layer), null, 2));
        const env = { TF_IN_AUTOMATION: "1", TF_CLI_ARGS: "-no-color", CHECKPOINT_DISABLE: "1" };
        const init = await run("terraform", [`-chdir=${dir}`, "init", "-input=false", "-backend=false"], { env });
        assertEquals(init.code, 0, init.stdout + init.stderr);
        for (const [environment, on, passes] of CASES) {
          const plan = await run("terraform", [
            `-chdir=${dir}`,
            "plan",
            "-input=false",
            "-lock=false",
            `-var=environment=${environment}`,
            `-var=sinkhole=${on}`,
          ], { env });
          const out = (plan.stdout + plan.stderr).replace(/\s+/g, " ");
          assertEquals(plan.code === 0, passes, `${layer}: environment=${environment} sinkhole=${on}: ${out}`);
          if (!passes) {
            assertMatch(out, /must never run in production/, `${layer} says why`);
            assertMatch(out, layer === "validation" ? /Invalid value for variable/ : /Resource precondition failed/);
          }
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

Deno.test("terraform: the guard message names the rule", () => {
  assertMatch(GUARD_MESSAGE, /never prod or production/);
  assertMatch(GUARD_MESSAGE, /allowed_environments/);
});
