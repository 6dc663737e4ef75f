/**
 * The terraform-cdk construct: cdktf Testing assertions on every resource, the committed
 * module against a fresh synth, and the production guard evaluated by the real terraform
 * binary (offline: the guard is extracted onto a built-in terraform_data resource).
 */
import { Testing } from "cdktf";
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, needs, ROOT, run } from "../rig/helpers.ts";
import {
  CABALMAIL_TIER_MESSAGE,
  CABALMAIL_TIER_SECURITY_GROUP,
  CABALMAIL_TIER_TASK_ROLE,
  FORGOTTEN_MAIL_PATTERN,
  GUARD_MESSAGE,
  IMAGE_TAG_PARAMETER,
  MEMORY_HARD_CAP_MB,
  MEMORY_RESERVATION_MB,
  MODULE_PATH,
  moduleText,
  OWNER_TAG,
  PLACEHOLDER_IMAGE_TAG,
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

const data = (type: string, name: string) => mod.data[type][name] as Json;

Deno.test("terraform: Cabalmail's repository and image tag parameter are looked up, never created", () => {
  // cabal-infra makes both in every account (terraform/infra/modules/ecr/main.tf:51-67, terraform/infra/main.tf:62-72).
  assertEquals(mod.resource.aws_ecr_repository, undefined, "no repository");
  assertEquals(mod.resource.aws_ecr_lifecycle_policy, undefined, "Cabalmail's lifecycle policy stands");
  assertEquals(data("aws_ecr_repository", "repository"), { name: "cabal-sinkhole" });
  assertEquals(data("aws_ssm_parameter", "image_tag"), { name: "${var.image_tag_parameter_name}" });
  assertEquals(Object.keys(mod.resource.aws_ssm_parameter), ["mode"], "the mode parameter is the only one made");
  assertEquals(mod.variable.image_tag_parameter_name.default, IMAGE_TAG_PARAMETER);
});

Deno.test("terraform: the mode parameter defaults to defer, made with the tier, written by operators", () => {
  has("aws_ssm_parameter", { name: "${var.mode_parameter_name}", type: "String", value: "defer" });
  const p = res("aws_ssm_parameter", "mode");
  assertEquals(p.lifecycle, { ignore_changes: ["value"] });
  assertEquals(p.count, GATED, "made with the tier, as Cabalmail's own (its sinkhole.tf:70-80)");
  assertEquals(mod.variable.mode_parameter_name.default, "/cabal/sinkhole_mode");
});

Deno.test("terraform: a tier of Cabalmail's, or another state's log group or mode parameter, stops the plan", () => {
  const guard = res("terraform_data", "collision_guard");
  assertEquals(guard.count, GATED);
  const [cabal, group, param] = guard.lifecycle.precondition as Json[];
  assertMatch(cabal.condition, /aws_iam_roles\.cabalmail_tier_role\[\*\]\.names/);
  assertMatch(cabal.condition, /aws_security_groups\.cabalmail_tier_security_group\[\*\]\.ids/);
  assertEquals(cabal.error_message, CABALMAIL_TIER_MESSAGE);
  assertEquals(data("aws_iam_roles", "cabalmail_tier_role").name_regex, `^${CABALMAIL_TIER_TASK_ROLE}$`);
  assertEquals(data("aws_security_groups", "cabalmail_tier_security_group").filter[0], {
    name: "group-name",
    values: [CABALMAIL_TIER_SECURITY_GROUP],
  });
  assertMatch(group.condition, new RegExp(`lookup\\(g\\.tags, "${OWNER_TAG.key}", ""\\) == "${OWNER_TAG.value}"`));
  assertMatch(
    param.condition,
    /contains\(flatten\(data\.aws_ssm_parameters_by_path\.existing_parameters\[\*\]\.names\)/,
  );
  for (
    const [type, name] of [
      ["aws_ssm_parameter", "mode"],
      ["aws_cloudwatch_log_group", "logs"],
      ["aws_iam_role", "task_role"],
      ["aws_security_group", "security_group"],
      ["aws_service_discovery_service", "discovery"],
    ]
  ) {
    const r = res(type, name);
    assertEquals(r.depends_on, ["terraform_data.collision_guard"], `${type}.${name} waits for the guard`);
    assertEquals(r.tags, { [OWNER_TAG.key]: OWNER_TAG.value }, `${type}.${name} is tagged as this module's`);
  }
});

Deno.test("terraform: task definition: EC2, awsvpc, 64/128 MB, health check without a shell, port-25 sysctl, awslogs", () => {
  assertEquals(mod.variable.service_name.default, "cabal-sinkhole");
  assertEquals(mod.variable.log_group_name.default, "/ecs/cabal-sinkhole");
  has("aws_ecs_task_definition", {
    family: "${var.service_name}",
    network_mode: "awsvpc",
    requires_compatibilities: ["EC2"],
  });
  const task = res("aws_ecs_task_definition", "task");
  assertEquals(task.count, GATED);
  assertEquals(task.lifecycle.ignore_changes, ["container_definitions"], "ctl deploy rolls; an apply never rolls back");
  assertEquals(
    task.lifecycle.replace_triggered_by,
    ["terraform_data.image_tag_seen"],
    "its own revision follows the tag",
  );
  assertEquals(
    res("terraform_data", "image_tag_seen").input,
    "${nonsensitive(data.aws_ssm_parameter.image_tag.value)}",
  );
  assertEquals(res("aws_ecs_service", "service").lifecycle, { ignore_changes: ["task_definition"] });
  assertEquals(task.execution_role_arn, "${one(data.aws_iam_role.execution_role[*].arn)}");
  assertEquals(
    mod.variable.execution_role_name.default,
    "cabal-ecs-execution-role",
    "the role its repository lets pull",
  );
  const defs: string = task.container_definitions;
  assertMatch(defs, new RegExp(`memory = ${MEMORY_HARD_CAP_MB}\\n`));
  assertMatch(defs, new RegExp(`memoryReservation = ${MEMORY_RESERVATION_MB}\\n`));
  assertMatch(defs, /command = \["CMD", "\/sinkhole", "--healthcheck"\]/, "exec form: no shell");
  assertMatch(defs, /namespace = "net\.ipv4\.ip_unprivileged_port_start", value = "25"/);
  assertMatch(defs, /logDriver = "awslogs"/);
  assertMatch(defs, /"mode" = "non-blocking"/, "a slow CloudWatch never blocks the listener's writes");
  assertMatch(
    defs,
    /image = "\$\{data\.aws_ecr_repository\.repository\.repository_url\}:\$\{nonsensitive\(data\.aws_ssm_parameter\.image_tag\.value\)\}"/,
  );
  assertMatch(defs, /"awslogs-group" = one\(aws_cloudwatch_log_group\.logs\[\*\]\.name\)/);
  assertMatch(defs, /SINKHOLE_MODE_PARAM", value = var\.mode_parameter_name/);
  has("aws_cloudwatch_log_group", { name: "${var.log_group_name}", retention_in_days: "${var.log_retention_days}" });
});

Deno.test("terraform: task role may do exactly ssm:GetParameter on exactly the mode parameter", () => {
  const policy: string = res("aws_iam_role_policy", "task_policy").policy;
  assertEquals(
    policy,
    '${jsonencode({Version = "2012-10-17", Statement = [{Effect = "Allow", Action = "ssm:GetParameter", ' +
      "Resource = one(aws_ssm_parameter.mode[*].arn)}]})}",
  );
  assertEquals((policy.match(/Action/g) ?? []).length, 1, "one statement, one action");
  assertEquals(JSON.parse(res("aws_iam_role", "task_role").assume_role_policy).Statement[0].Principal, {
    Service: "ecs-tasks.amazonaws.com",
  });
  assertEquals(
    mod.resource.aws_iam_role.execution_role,
    undefined,
    "no execution role of its own: it would be denied the pull",
  );
});

Deno.test("terraform: service, Cloud Map, security group, drain-before-deregister", () => {
  const svc = res("aws_ecs_service", "service");
  assertEquals(svc.count, GATED);
  assertEquals(
    svc.desired_count,
    `\${var.quiesced || !(nonsensitive(data.aws_ssm_parameter.image_tag.value) != "${PLACEHOLDER_IMAGE_TAG}") ? 0 : 1}`,
    "no task until an image was pushed; none while quiesced",
  );
  assertEquals(svc.load_balancer, undefined, "no load balancer");
  assertMatch(svc.service_registries.registry_arn, /aws_service_discovery_service\.discovery/);
  assertEquals(svc.capacity_provider_strategy, [{ capacity_provider: "${var.capacity_provider}", weight: 100 }]);
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
  assertEquals(recon.triggers_replace, [
    "${one(aws_service_discovery_service.discovery[*].id)}",
    "${var.quiesced}",
  ], "keyed on the Cloud Map service and the quiesce flag (replacing either runs the drain)");
  const [destroy, create] = recon.provisioner.map((p: Json) => p["local-exec"]);
  assertMatch(create.command, /--desired-count \$\{self\.input\.desired_count\} --force-new-deployment/);
  assertEquals(destroy.when, "destroy");
  assertMatch(destroy.command, /--desired-count 0 .*wait services-stable/);
});

Deno.test("terraform: forgotten-mail alarm on the MTA's log group, and the outputs", () => {
  has("aws_cloudwatch_log_metric_filter", {
    pattern: FORGOTTEN_MAIL_PATTERN,
    log_group_name: "${var.mta_log_group_name}",
  });
  assertMatch(FORGOTTEN_MAIL_PATTERN, /-"sinkhole-probe" -"probe-"/, "the buttons' probes do not fire it");
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
  const keep = ["environment", "cluster_tags", "sinkhole"];
  for (const k of Object.keys(variables)) if (!keep.includes(k)) delete variables[k];
  if (layer === "precondition") { for (const k of keep) delete variables[k].validation; }
  return {
    variable: variables,
    resource: layer === "precondition"
      ? { terraform_data: { production_guard: res("terraform_data", "production_guard") } }
      : {
        terraform_data: { nothing: { input: "x" } },
      },
  };
}

/** environment, cluster tags, flag, passes? Production is refused whatever the flag. */
const CASES: [string, Record<string, string>, boolean, boolean][] = [
  ["prod", {}, true, false],
  ["production", {}, true, false],
  ["Prod", {}, false, false],
  ["PRODUCTION", {}, false, false],
  [" prod-eu ", {}, true, false],
  ["stage", { environment: "prod" }, true, false],
  ["development", { Environment: "Production" }, false, false],
  ["stage", { environment: "stage" }, true, true],
  ["development", {}, true, true],
  ["qa", { team: "prod" }, true, true],
];

for (const layer of ["validation", "precondition"] as const) {
  Deno.test({
    name: `terraform: guard layer "${layer}": refuses production by name and by cluster tag, whatever the flag`,
    ignore: tf.ignore,
    fn: async () => {
      assertTools(tf.missing);
      const dir = await Deno.makeTempDir({ prefix: `sinkhole-guard-${layer}-` });
      try {
        await Deno.writeTextFile(`${dir}/main.tf.json`, JSON.stringify(guardConfig(layer), null, 2));
        const env = { TF_IN_AUTOMATION: "1", TF_CLI_ARGS: "-no-color", CHECKPOINT_DISABLE: "1" };
        const init = await run("terraform", [`-chdir=${dir}`, "init", "-input=false", "-backend=false"], { env });
        assertEquals(init.code, 0, init.stdout + init.stderr);
        for (const [environment, tags, on, passes] of CASES) {
          const plan = await run("terraform", [
            `-chdir=${dir}`,
            "plan",
            "-input=false",
            "-lock=false",
            `-var=environment=${environment}`,
            `-var=cluster_tags=${JSON.stringify(tags)}`,
            `-var=sinkhole=${on}`,
          ], { env });
          const out = (plan.stdout + plan.stderr).replace(/\s+/g, " ");
          const what = `${layer}: environment=${environment} tags=${JSON.stringify(tags)} sinkhole=${on}`;
          assertEquals(plan.code === 0, passes, `${what}: ${out}`);
          if (!passes) {
            assertMatch(out, /never deployed to production/, `${layer} says why`);
            assertMatch(out, layer === "validation" ? /Invalid value for variable/ : /Resource precondition failed/);
          }
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

Deno.test("terraform: the guard message names the rule; no variable can allow production", () => {
  assertMatch(GUARD_MESSAGE, /never deployed to production/);
  assertMatch(GUARD_MESSAGE, /Nothing can allow it/);
  assertEquals(mod.variable.allowed_environments, undefined, "no allow-list to override the refusal");
});
