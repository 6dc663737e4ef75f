/**
 * The deployed half, for real as far as this machine allows: the root the infra workflow
 * runs (terraform/live), with the variables the workflow sets and nothing else, `init` from
 * the real hashicorp/aws provider (a filesystem mirror) into an S3 backend, applied into
 * moto_server on top of an account prepared as Cabalmail's is (cluster cabal-mail tagged by
 * its environment, capacity provider cabal-ec2, VPC cabal-vpc with cabal-private-subnet-*,
 * the cabal.internal namespace, smtp-out's log group). Then the control CLI runs against
 * what Terraform created, by the names Terraform reports.
 *
 * One gap of moto's, said where it shows: moto's CreateService drops the capacity provider
 * strategy, so every later plan wants to replace the service for that attribute alone.
 * The "no changes" check allows exactly that replacement (by the plan's replace_paths) and
 * nothing else.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import {
  assertTools,
  eventually,
  needs,
  REPLY_WAIT_MS,
  ROOT,
  run,
  runCtl,
  startListener,
  transaction,
} from "../rig/helpers.ts";
import { AWS_ENV, awsCli, shipLogs, ssmEnv, startMoto } from "../rig/aws.ts";
import { parse } from "yaml";

const tools = needs("terraform", "moto_server", "aws");
/** Where machine images keep the provider mirror (the issue's `find`); the first that has it wins. */
const MIRROR_ROOTS = ["/opt/tf-plugins", "/usr/share/terraform/plugins", "/usr/local/share/terraform/plugins"];
const PROVIDER_DIR = "registry.terraform.io/hashicorp/aws";
const ENVIRONMENT = "development";
const STATE_BUCKET = "sinkhole-state";
const ENVIRONMENTS = JSON.parse(Deno.readTextFileSync(`${ROOT}/ctl/environments.json`));
const ENV = ENVIRONMENTS[ENVIRONMENT];
const IMAGE_TAG = "sha-0123abcd";
/** The services the root talks to, pointed at moto by an override file (terraform's `*_override.tf`). */
const SERVICES = ["ec2", "ecs", "ecr", "iam", "ssm", "sts", "logs", "cloudwatch", "servicediscovery"];
/** moto's one gap in what the root uses (see the header). */
const MOTO_DROPS = JSON.stringify([["capacity_provider_strategy"]]);

function mirror(): string | undefined {
  return MIRROR_ROOTS.find((root) => {
    try {
      return Deno.statSync(`${root}/${PROVIDER_DIR}`).isDirectory;
    } catch {
      return false;
    }
  });
}

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

/** An account as Cabalmail's infrastructure leaves it, before sinkhole. */
async function prepareAccount(endpoint: string): Promise<void> {
  const aws = (...a: string[]) => awsCli(endpoint, ...a);
  const vpc = (await aws(
    "ec2",
    "create-vpc",
    "--cidr-block",
    "10.0.0.0/16",
    "--tag-specifications",
    `ResourceType=vpc,Tags=[{Key=Name,Value=${ENV.vpcName}}]`,
  )).Vpc as { VpcId: string };
  for (const [i, name] of ["cabal-private-subnet-0", "cabal-private-subnet-1", "cabal-public-subnet-0"].entries()) {
    await aws(
      "ec2",
      "create-subnet",
      "--vpc-id",
      vpc.VpcId,
      "--cidr-block",
      `10.0.${i}.0/24`,
      "--tag-specifications",
      `ResourceType=subnet,Tags=[{Key=Name,Value=${name}}]`,
    );
  }
  await aws("ecs", "create-cluster", "--cluster-name", ENV.cluster, "--tags", `key=environment,value=${ENVIRONMENT}`);
  await aws(
    "ecs",
    "create-capacity-provider",
    "--name",
    ENV.capacityProvider,
    "--auto-scaling-group-provider",
    "autoScalingGroupArn=arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:1:autoScalingGroupName/cabal-ecs",
  );
  await aws("servicediscovery", "create-private-dns-namespace", "--name", ENV.namespace, "--vpc", vpc.VpcId);
  await aws("logs", "create-log-group", "--log-group-name", ENV.mtaLogGroup);
  await aws("s3api", "create-bucket", "--bucket", STATE_BUCKET);
}

/** A copy of the repository's terraform/ and ctl/environments.json, as the workflow checks them out. */
async function workspace(endpoint: string, mirrorRoot: string): Promise<{ dir: string; live: string }> {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-infra-" });
  await run("cp", ["-r", `${ROOT}/terraform`, `${dir}/terraform`]);
  await Deno.mkdir(`${dir}/ctl`);
  await Deno.copyFile(`${ROOT}/ctl/environments.json`, `${dir}/ctl/environments.json`);
  const live = `${dir}/terraform/live`;
  await Deno.remove(`${live}/.terraform`, { recursive: true }).catch(() => {});
  const endpoints = SERVICES.map((s) => `    ${s} = "${endpoint}"`).join("\n");
  await Deno.writeTextFile(
    `${live}/moto_override.tf`,
    `provider "aws" {
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  endpoints {
${endpoints}
  }
}
`,
  );
  await Deno.writeTextFile(
    `${dir}/cli.tfrc`,
    `provider_installation {
  filesystem_mirror {
    path    = "${mirrorRoot}"
    include = ["registry.terraform.io/hashicorp/aws"]
  }
  direct {
    exclude = ["registry.terraform.io/hashicorp/aws"]
  }
}
`,
  );
  return { dir, live };
}

/** The three variables infra.yml sets, and nothing else. */
const vars = (sinkhole: boolean, quiesced = false, environment = ENVIRONMENT) => ({
  TF_VAR_environment: environment,
  TF_VAR_sinkhole: String(sinkhole),
  TF_VAR_quiesced: String(quiesced),
});

/** The root in a workspace of its own, and the terraform commands a test runs on it. */
async function terraformRoot(endpoint: string, mirrorRoot: string) {
  const { dir, live } = await workspace(endpoint, mirrorRoot);
  const baseEnv = {
    ...AWS_ENV,
    // The local-exec drain commands use the aws CLI: it follows the same override.
    AWS_ENDPOINT_URL: endpoint,
    TF_CLI_CONFIG_FILE: `${dir}/cli.tfrc`,
    TF_IN_AUTOMATION: "1",
    TF_INPUT: "0",
    CHECKPOINT_DISABLE: "1",
    HOME: dir,
  };
  const tf = async (env: Record<string, string>, ...args: string[]) => {
    const res = await run("terraform", [`-chdir=${live}`, ...args, "-no-color"], { env: { ...baseEnv, ...env } });
    return { ...res, out: res.stdout + res.stderr };
  };
  const apply = async (env: Record<string, string>) => {
    const res = await tf(env, "apply", "-auto-approve");
    assertEquals(res.code, 0, res.out);
    return res;
  };
  const outputs = async () => {
    const res = await tf({}, "output", "-json");
    assertEquals(res.code, 0, res.out);
    return (JSON.parse(res.stdout) as Json).sinkhole.value as Json;
  };
  /** A plan's changes, less moto's one gap: a service replaced for capacity_provider_strategy alone. */
  const changes = async (env: Record<string, string>) => {
    const plan = await tf(env, "plan", "-out=tfplan");
    assertEquals(plan.code, 0, plan.out);
    const shown = await tf(env, "show", "-json", "tfplan");
    const all = ((JSON.parse(shown.stdout) as Json).resource_changes ?? []) as Json[];
    return all.filter((c) => c.change.actions.join() !== "no-op").filter((c) =>
      !(c.type === "aws_ecs_service" && JSON.stringify(c.change.replace_paths ?? []) === MOTO_DROPS)
    ).map((c) => `${c.address}: ${c.change.actions.join("+")}`);
  };
  /** `init` with the workflow's -backend-config, and the backend's own endpoint at moto. */
  const init = () =>
    tf(
      {},
      "init",
      `-backend-config=bucket=${STATE_BUCKET}`,
      `-backend-config=key=sinkhole/${ENVIRONMENT}.tfstate`,
      `-backend-config=region=${ENV.region}`,
      // The backend's own endpoint and checks: moto instead of S3 (not set by the workflow).
      `-backend-config=endpoints={s3="${endpoint}"}`,
      "-backend-config=use_path_style=true",
      "-backend-config=skip_credentials_validation=true",
      "-backend-config=skip_requesting_account_id=true",
      "-backend-config=access_key=testing",
      "-backend-config=secret_key=testing",
    );
  return { dir, live, tf, apply, outputs, changes, init };
}

Deno.test({
  name: "infra: the workflow's root applies into moto on Cabalmail's account; ctl drives what it made; prod refused",
  ignore: tools.ignore,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    assertTools(tools.missing);
    const mirrorRoot = mirror();
    if (!mirrorRoot) {
      throw new Error(
        `the hashicorp/aws provider mirror is missing (looked for ${PROVIDER_DIR} under ` +
          `${MIRROR_ROOTS.join(", ")}); the machine image carries it`,
      );
    }
    const moto = await startMoto();
    const { dir, live, tf, apply, outputs, changes, init } = await terraformRoot(moto.url, mirrorRoot);
    const aws = (...a: string[]) => awsCli(moto.url, ...a);
    const service = async () =>
      ((await aws("ecs", "describe-services", "--cluster", ENV.cluster, "--services", ENV.sinkholeService))
        .services as Json[]).find((s) => s.status !== "INACTIVE");
    const ctl = (...args: string[]) =>
      runCtl([...args, "--env", ENVIRONMENT], {
        ...AWS_ENV,
        AWS_ENDPOINT_URL: moto.url,
        SINKHOLE_CTL_POLL_MS: "200",
        GITHUB_TOKEN: "",
      });
    try {
      await prepareAccount(moto.url);

      await t.step("init from the mirror into the S3 backend, with the workflow's -backend-config", async () => {
        const res = await init();
        assertEquals(res.code, 0, res.out);
        const lock = await Deno.readTextFile(`${live}/.terraform.lock.hcl`);
        const committed = await Deno.readTextFile(`${ROOT}/terraform/live/.terraform.lock.hcl`);
        assertEquals(lock, committed, "init agrees with the committed lock file (the pinned provider's checksum)");
      });

      await t.step("apply with the tier on and no image yet: everything made, no task asked for", async () => {
        await apply(vars(true));
        const out = await outputs();
        assertEquals(out.parameter_name, ENV.parameter);
        assertEquals(out.image_tag_parameter, ENV.imageTagParameter);
        assertEquals(out.ecs_service, ENV.sinkholeService);
        assertEquals(out.sinkhole_log_group, ENV.sinkholeLogGroup);
        assertEquals(out.hostname, `sinkhole.${ENV.namespace}`);
        assertEquals(out.image, "", "no image pushed yet");
        assertEquals((await service())?.desiredCount, 0);
        const alarms = await aws("cloudwatch", "describe-alarms", "--alarm-names", "sinkhole-test-mail-forgotten");
        assertEquals((alarms.MetricAlarms as Json[]).length, 1, "the forgotten-mail alarm on smtp-out's log group");
      });

      await t.step("deploy: the image workflow writes the tag, the apply rolls the service to it", async () => {
        await aws("ssm", "put-parameter", "--name", ENV.imageTagParameter, "--value", IMAGE_TAG, "--overwrite");
        await apply(vars(true));
        const out = await outputs();
        assertEquals(out.image, `${out.repository_url}:${IMAGE_TAG}`);
        const svc = await service();
        assertEquals(svc?.desiredCount, 1);
        const td = await aws("ecs", "describe-task-definition", "--task-definition", svc!.taskDefinition);
        const container = (td.taskDefinition as Json).containerDefinitions[0];
        assertEquals(container.image, out.image, "the service runs the task definition of the new tag");
        assertEquals(container.logConfiguration.options.mode, "non-blocking");
        assertEquals(await changes(vars(true)), [], "a second plan shows no changes");
      });

      await t.step("ctl status, mode get, mode set --wait, check and probe on what Terraform made", async () => {
        const l = await startListener(ssmEnv(moto.url, "1", ENV.parameter));
        const shipper = shipLogs(l, moto.url, ENV.sinkholeLogGroup);
        try {
          const status = await ctl("status", "--tier", "on");
          assertEquals(status.code, 0, status.stderr);
          assertMatch(status.stdout, new RegExp(`sinkhole service ${ENV.sinkholeService}: desired 1`));
          assertMatch(status.stdout, /mode stored: "defer"/);
          const set = await ctl("mode", "set", "accept", "--wait");
          assertEquals(set.code, 0, set.stdout + set.stderr);
          assertMatch(set.stdout, /the listener logged mode accept/);
          const get = await ctl("mode", "get");
          assertMatch(get.stdout, /mode stored: "accept"/);
          assertMatch(get.stdout, /mode in effect: "accept"/);
          // The retry ledger from CloudWatch Logs: an attempt made now, read back by `ctl report --env`.
          assertEquals((await transaction(l.port, { to: ["ledger@sinkhole.test"] })).at(-2), 250);
          let report = "";
          await eventually(
            async () =>
              /ledger@sinkhole\.test: 1 attempt\(s\), delivered once/.test(
                report = (await ctl("report", "--since", "60")).stdout,
              ),
            REPLY_WAIT_MS,
            500,
          ).catch(() => assertEquals(report, "a report naming ledger@sinkhole.test"));
          const check = await ctl("check", "--tier", "on", "--no-github", "--mode-age", "0");
          assertEquals(check.code, 1, "a non-default mode is a finding");
          assertMatch(check.stdout, /mode is `accept`/);
          const probe = await ctl("probe", "--timeout", "1");
          assertEquals(probe.code, 1, "no smtp-out task runs in this account: nothing to probe through");
          assertMatch(probe.stdout, new RegExp(`no running ${ENV.mtaService} task`));
        } finally {
          await shipper.stop();
          await l.stop();
        }
      });

      await t.step("quiesced: the drain runs, the service scales to zero, the Cloud Map name stays", async () => {
        const res = await apply(vars(true, true));
        assertMatch(res.out, /cloud_map_lifecycle\[0\] \(local-exec\)|cloud_map_lifecycle\[0\]: Destroying/);
        assertEquals((await service())?.desiredCount, 0);
        const names = ((await aws("servicediscovery", "list-services")).Services as Json[]).map((s) => s.Name);
        assert(names.includes("sinkhole"), names.join());
        assertEquals(await changes(vars(true, true)), []);
      });

      await t.step("sinkhole=false removes the tier; the repository, the parameters and the alarm stay", async () => {
        await apply(vars(false));
        assertEquals(await service(), undefined);
        const names = ((await aws("servicediscovery", "list-services")).Services as Json[]).map((s) => s.Name);
        assert(!names.includes("sinkhole"), names.join());
        await aws("ecr", "describe-repositories", "--repository-names", "cabal-sinkhole");
        await aws("ssm", "get-parameter", "--name", ENV.parameter);
        const tag = await aws("ssm", "get-parameter", "--name", ENV.imageTagParameter);
        assertEquals((tag.Parameter as Json).Value, IMAGE_TAG, "the deployed tag survives for the next time");
        assertEquals(await changes(vars(false)), []);
      });

      await t.step("production refused at plan: by name (prod, production), and by the cluster's tag", async () => {
        for (const name of ["prod", "production", "Prod"]) {
          const plan = await tf(vars(true, false, name), "plan");
          assertEquals(plan.code, 1, plan.out);
          assertMatch(plan.out.replace(/\s+/g, " "), /sinkhole has none in production/);
        }
        await aws(
          "ecs",
          "tag-resource",
          "--resource-arn",
          `arn:aws:ecs:${ENV.region}:123456789012:cluster/${ENV.cluster}`,
          "--tags",
          "key=environment,value=prod",
        );
        for (const on of [true, false]) {
          const plan = await tf(vars(on), "plan");
          assertEquals(plan.code, 1, plan.out);
          assertMatch(plan.out.replace(/\s+/g, " "), /never deployed to production/);
        }
      });
    } finally {
      await moto.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test("infra: every required variable of every root and module call has a source in what runs it", () => {
  const workflow = parse(Deno.readTextFileSync(`${ROOT}/.github/workflows/infra.yml`)) as Json;
  const job = workflow.jobs.terraform as Json;
  const liveText = Deno.readTextFileSync(`${ROOT}/terraform/live/main.tf`);
  const required = [...liveText.matchAll(/^variable "(\w+)" \{([\s\S]*?)^\}/gm)]
    .filter((m) => !/^\s*default\s*=/m.test(m[2])).map((m) => m[1]);
  assertEquals(required, ["environment"]);
  const setByWorkflow = Object.keys(job.env ?? {}).filter((k) => k.startsWith("TF_VAR_")).map((k) => k.slice(7));
  for (const v of required) assert(setByWorkflow.includes(v), `infra.yml sets TF_VAR_${v}`);
  for (const v of setByWorkflow) {
    assert(liveText.includes(`variable "${v}"`), `TF_VAR_${v} names a variable of the root`);
  }
  // The module: every variable without a default is an argument of the root's module block.
  const mod = JSON.parse(Deno.readTextFileSync(`${ROOT}/terraform/module/main.tf.json`)) as Json;
  const call = /module "sinkhole" \{([\s\S]*?)^\}/m.exec(liveText)![1];
  for (const [name, def] of Object.entries(mod.variable as Record<string, Json>)) {
    if (!("default" in def)) assertMatch(call, new RegExp(`^\\s*${name}\\s*=`, "m"), `the root passes ${name}`);
  }
});

/** The tier as Cabalmail's own terraform/infra/modules/ecs/sinkhole.tf makes it, by its names. */
async function cabalmailsTier(endpoint: string): Promise<void> {
  const aws = (...a: string[]) => awsCli(endpoint, ...a);
  const vpcs = (await aws("ec2", "describe-vpcs", "--filters", `Name=tag:Name,Values=${ENV.vpcName}`)).Vpcs as Json[];
  const subnets = (await aws("ec2", "describe-subnets", "--filters", "Name=tag:Name,Values=cabal-private-subnet-*"))
    .Subnets as Json[];
  await aws("ecr", "create-repository", "--repository-name", "cabal-sinkhole");
  await aws("ssm", "put-parameter", "--name", ENV.parameter, "--value", "defer", "--type", "String");
  await aws("logs", "create-log-group", "--log-group-name", ENV.sinkholeLogGroup);
  await aws(
    "iam",
    "create-role",
    "--role-name",
    "cabal-ecs-sinkhole-task-role",
    "--assume-role-policy-document",
    JSON.stringify({
      Version: "2012-10-17",
      Statement: [{ Action: "sts:AssumeRole", Effect: "Allow", Principal: { Service: "ecs-tasks.amazonaws.com" } }],
    }),
  );
  const sg = (await aws(
    "ec2",
    "create-security-group",
    "--group-name",
    "cabal-ecs-sinkhole-sg",
    "--description",
    "Allow sinkhole inbound port 25 from VPC",
    "--vpc-id",
    vpcs[0].VpcId,
  )).GroupId as string;
  const ns = ((await aws("servicediscovery", "list-namespaces")).Namespaces as Json[])[0].Id;
  const cm = (await aws(
    "servicediscovery",
    "create-service",
    "--name",
    "sinkhole",
    "--dns-config",
    JSON.stringify({ NamespaceId: ns, DnsRecords: [{ Type: "A", TTL: 10 }], RoutingPolicy: "MULTIVALUE" }),
  )).Service as Json;
  await aws(
    "ecs",
    "register-task-definition",
    "--family",
    ENV.sinkholeService,
    "--network-mode",
    "awsvpc",
    "--requires-compatibilities",
    "EC2",
    "--container-definitions",
    JSON.stringify([{ name: "sinkhole", image: "public.ecr.aws/nginx/nginx:stable", memory: 128 }]),
  );
  await aws(
    "ecs",
    "create-service",
    "--cluster",
    ENV.cluster,
    "--service-name",
    ENV.sinkholeService,
    "--task-definition",
    ENV.sinkholeService,
    "--desired-count",
    "1",
    "--network-configuration",
    JSON.stringify({ awsvpcConfiguration: { subnets: subnets.map((s) => s.SubnetId), securityGroups: [sg] } }),
    "--service-registries",
    JSON.stringify([{ registryArn: cm.Arn }]),
  );
}

Deno.test({
  name: "infra: adopting the tier Cabalmail's Terraform made, with docs/deploy.md's import block: nothing duplicated",
  ignore: tools.ignore,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    assertTools(tools.missing);
    const mirrorRoot = mirror();
    if (!mirrorRoot) throw new Error(`the hashicorp/aws provider mirror is missing (${PROVIDER_DIR})`);
    const moto = await startMoto();
    const { dir, live, apply, changes, init } = await terraformRoot(moto.url, mirrorRoot);
    const aws = (...a: string[]) => awsCli(moto.url, ...a);
    try {
      await prepareAccount(moto.url);
      await cabalmailsTier(moto.url);
      const doc = await Deno.readTextFile(`${ROOT}/docs/deploy.md`);
      const section = doc.slice(doc.indexOf("## Adopting"));
      const [names, imports] = [...section.matchAll(/```hcl\n([\s\S]*?)```/g)].map((m) => m[1]);
      await Deno.writeTextFile(`${live}/adopt_override.tf`, names);
      await Deno.writeTextFile(`${live}/adopt.tf`, imports);
      const initialized = await init();
      assertEquals(initialized.code, 0, initialized.out);
      const applied = await apply(vars(true));
      assertMatch(applied.out, /Apply complete! Resources: \d+ imported/);
      const groups =
        (await aws("ec2", "describe-security-groups", "--filters", "Name=group-name,Values=cabal-*sinkhole*"))
          .SecurityGroups as Json[];
      assertEquals(groups.map((g) => g.GroupName), ["cabal-ecs-sinkhole-sg"], "adopted, not duplicated");
      const services = ((await aws("servicediscovery", "list-services")).Services as Json[]).filter((s) =>
        s.Name === "sinkhole"
      );
      assertEquals(services.length, 1, "one Cloud Map service sinkhole");
      const ecs = (await aws("ecs", "describe-services", "--cluster", ENV.cluster, "--services", ENV.sinkholeService))
        .services as Json[];
      assertEquals(ecs.filter((s) => s.status === "ACTIVE").length, 1, "one ECS service");
      assertEquals(await changes(vars(true)), [], "after adoption, a plan shows no changes");
    } finally {
      await moto.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
