/**
 * The deployed half against Cabalmail's account as its own Terraform leaves it. The account is
 * made by tests/cabal-infra/main.tf (cabal-infra's resources translated, each citing its file
 * and lines) applied into moto_server with the real hashicorp/aws provider, in us-west-1
 * (cabal-infra's default region, terraform/infra/variables.tf:6-9; not us-east-1). On it, both
 * paths run exactly as the workflows run them:
 *
 * - Cabalmail's tier exists (var.sinkhole on): this project's root, with SINKHOLE unset, makes
 *   nothing of the tier (with SINKHOLE=true its plan stops, naming Cabalmail's tier); the image
 *   is pushed to cabal-sinkhole and `ctl deploy` rolls Cabalmail's service to it.
 * - No tier (var.sinkhole off): the root makes the tier from what is missing only, and
 *   `ctl deploy` plus the next apply run the pushed image.
 *
 * After either, the fixture's own plan shows no change to anything Cabalmail's Terraform owns.
 *
 * IAM is enforced (moto's reset-auth): everything this project runs (terraform, ctl, the aws
 * CLI standing in for the image push) runs as a user whose only policy is the one
 * docs/deploy.md prints, every call recorded by moto (its request recorder); the last test
 * holds each statement of that policy to an action the runs needed and no other statement
 * grants. Cabalmail's own Terraform runs as an administrator, as its CI role is (docs/aws.md).
 *
 * moto's gaps, said where they show: CreateService drops the capacity provider strategy and
 * enable_execute_command (every plan of a service wants to replace it for that alone: the
 * "no change" checks allow exactly that replacement, by the plan's replace_paths); moto
 * authorizes every non-S3 action against the resource "*" only (resource scoping and
 * conditions are not enforced: only which actions a statement grants); it does not enforce
 * ECR repository policies, iam:PassRole, ECS Exec or ssm:StartSession.
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
import {
  AWS_ENV,
  awsCliAs,
  enforceIam,
  recordedActions,
  shipLogs,
  ssmEnv,
  startMoto,
  startRecording,
  userWithPolicy,
} from "../rig/aws.ts";
import { parse } from "yaml";
import { CABALMAIL_TIER_MESSAGE } from "../terraform/sinkhole.ts";

const tools = needs("terraform", "moto_server", "aws");
/** Where machine images keep the provider mirror; the first that has it wins. */
const MIRROR_ROOTS = ["/opt/tf-plugins", "/usr/share/terraform/plugins", "/usr/local/share/terraform/plugins"];
const PROVIDER_DIR = "registry.terraform.io/hashicorp/aws";
const ENVIRONMENT = "development";
/** cabal-infra's default region (terraform/infra/variables.tf:6-9). */
const REGION = "us-west-1";
const ACCOUNT = "123456789012";
const STATE_BUCKET = "sinkhole-state";
const ENV = { ...JSON.parse(Deno.readTextFileSync(`${ROOT}/ctl/environments.json`))[ENVIRONMENT], region: REGION };
/** The environments file the workspace and ctl read: the repository's entry, in this region. */
const ENVIRONMENTS_TEXT = JSON.stringify({ [ENVIRONMENT]: ENV }, null, 2);
/** The legacy global tag, hand-provisioned at account genesis (cabal-infra terraform/infra/main.tf:23-32). */
const LEGACY_TAG = "sha-1111aaaa";
const IMAGE_TAG = "sha-0123abcd";
const SERVICES = ["ec2", "ecs", "ecr", "iam", "ssm", "sts", "logs", "cloudwatch", "servicediscovery"];
/** moto's gap in CreateService (see the header). */
const MOTO_DROPS = JSON.stringify([["capacity_provider_strategy"]]);
/** Every action this project's runs called, across the tests of this file (the policy test reads it). */
const CALLED = new Set<string>();
let runsCompleted = 0;

// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;

function mirror(): string {
  const root = MIRROR_ROOTS.find((r) => {
    try {
      return Deno.statSync(`${r}/${PROVIDER_DIR}`).isDirectory;
    } catch {
      return false;
    }
  });
  if (!root) throw new Error(`the hashicorp/aws provider mirror is missing (${PROVIDER_DIR} under ${MIRROR_ROOTS})`);
  return root;
}

/** The policy docs/deploy.md prints, parsed. */
function documentedPolicy(): Json {
  const doc = Deno.readTextFileSync(`${ROOT}/docs/deploy.md`);
  const m = /```json\n(\{\n {2}"Version"[\s\S]*?)```/.exec(doc);
  assert(m, "docs/deploy.md prints the deploy role's policy");
  return JSON.parse(m[1]);
}

/**
 * That policy as moto can hold it: ACCOUNT and STATE_BUCKET filled in; every non-S3 statement's
 * resource "*" and no condition (moto authorizes those actions against "*" only, so a scoped
 * statement would grant nothing there); S3 statements as printed (moto checks their resources);
 * each cloudwatch:X also as monitoring:X, the name moto checks.
 */
function motoPolicy(policy: Json, without?: string): Json {
  const text = JSON.stringify(policy).replaceAll("ACCOUNT", ACCOUNT).replaceAll("STATE_BUCKET", STATE_BUCKET);
  const statements = (JSON.parse(text).Statement as Json[]).filter((s) => s.Sid !== without).map((s) => {
    const actions = [s.Action].flat() as string[];
    if (actions.every((a) => a.startsWith("s3:"))) return s;
    const { Condition: _, ...rest } = s;
    // moto names CloudWatch's actions by its signing name, monitoring:*, where IAM says cloudwatch:*.
    const named = actions.flatMap((a) =>
      a.startsWith("cloudwatch:") ? [a, a.replace("cloudwatch:", "monitoring:")] : [a]
    );
    return { ...rest, Action: named, Resource: "*" };
  });
  return { Version: "2012-10-17", Statement: statements };
}

type Creds = Record<string, string>;

/** Terraform's CLI configuration: the hashicorp/aws provider from the machine's mirror, nothing downloaded. */
const cliConfig = () =>
  `provider_installation {
  filesystem_mirror {
    path    = "${mirror()}"
    include = ["registry.terraform.io/hashicorp/aws"]
  }
  direct {
    exclude = ["registry.terraform.io/hashicorp/aws"]
  }
}
`;

/** Terraform in a workspace of its own: the CLI config (the provider mirror) and an override pointing at `endpoint`. */
async function terraformDir(source: string, endpoint: string, creds: Creds, extra = "") {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-infra-" });
  await run("cp", ["-r", source, `${dir}/root`]);
  await pointAtMoto(dir, `${dir}/root`, endpoint, extra);
  return terraform(dir, `${dir}/root`, endpoint, creds);
}

/** A root's provider pointed at `endpoint` (an override file, `extra` before it) and the CLI config in `dir`. */
async function pointAtMoto(dir: string, root: string, endpoint: string, extra = "") {
  const endpoints = SERVICES.map((s) => `    ${s} = "${endpoint}"`).join("\n");
  await Deno.writeTextFile(
    `${root}/moto_override.tf`,
    `${extra}provider "aws" {
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  endpoints {
${endpoints}
  }
}
`,
  );
  await Deno.writeTextFile(`${dir}/cli.tfrc`, cliConfig());
}

function terraform(dir: string, chdir: string, endpoint: string, creds: Creds) {
  const baseEnv = {
    ...AWS_ENV,
    ...creds,
    AWS_REGION: REGION,
    AWS_DEFAULT_REGION: REGION,
    // The local-exec drain commands run the aws CLI: it follows the same endpoint (v1: no pager flag).
    AWS_ENDPOINT_URL: endpoint,
    AWS_PAGER: "",
    TF_CLI_CONFIG_FILE: `${dir}/cli.tfrc`,
    TF_IN_AUTOMATION: "1",
    TF_INPUT: "0",
    CHECKPOINT_DISABLE: "1",
    HOME: dir,
  };
  const tf = async (env: Record<string, string>, ...args: string[]) => {
    const res = await run("terraform", [`-chdir=${chdir}`, ...args, "-no-color"], { env: { ...baseEnv, ...env } });
    return { ...res, out: res.stdout + res.stderr };
  };
  const apply = async (env: Record<string, string>, ...args: string[]) => {
    const res = await tf(env, "apply", "-auto-approve", ...args);
    assertEquals(res.code, 0, res.out);
    return res;
  };
  /** A plan's changes, less moto's one gap: a service replaced for capacity_provider_strategy alone. */
  const changes = async (env: Record<string, string>, ...args: string[]) => {
    const plan = await tf(env, "plan", "-out=tfplan", ...args);
    assertEquals(plan.code, 0, plan.out);
    const shown = await tf(env, "show", "-json", "tfplan");
    const all = ((JSON.parse(shown.stdout) as Json).resource_changes ?? []) as Json[];
    return all.filter((c) => c.change.actions.join() !== "no-op").filter((c) =>
      !(c.type === "aws_ecs_service" && JSON.stringify(c.change.replace_paths ?? []) === MOTO_DROPS)
    ).map((c) => `${c.address}: ${c.change.actions.join("+")}`);
  };
  return { dir, tf, apply, changes, env: baseEnv };
}

/**
 * Cabalmail's account in moto: its Terraform applied (as an administrator), then IAM enforced,
 * with an administrator for Cabalmail's later plans and a deploy user holding docs/deploy.md's
 * policy for everything this project runs, its calls recorded by moto.
 */
async function cabalmailAccount(sinkhole: boolean) {
  const recording = await Deno.makeTempFile({ prefix: "sinkhole-moto-recording-" });
  const moto = await startMoto({ MOTO_IAM_LOAD_MANAGED_POLICIES: "true", MOTO_RECORDER_FILEPATH: recording });
  const cleanup: (() => Promise<unknown>)[] = [() => moto.close(), () => Deno.remove(recording)];
  try {
    const region = { AWS_REGION: REGION, AWS_DEFAULT_REGION: REGION };
    const legacyTag = ["--name", "/cabal/deployed_image_tag", "--value", LEGACY_TAG, "--type", "String"];
    await awsCliAs(region, moto.url, "ssm", "put-parameter", ...legacyTag);
    const cabal = await terraformDir(`${ROOT}/tests/cabal-infra`, moto.url, {});
    cleanup.push(() => Deno.remove(cabal.dir, { recursive: true }));
    const cabalVars = [
      "-var",
      `environment=${ENVIRONMENT}`,
      "-var",
      `aws_region=${REGION}`,
      "-var",
      `sinkhole=${sinkhole}`,
    ];
    const init = await cabal.tf({}, "init");
    assertEquals(init.code, 0, init.out);
    await cabal.apply({}, ...cabalVars);
    const admin = await userWithPolicy(moto.url, "cabal-admin", {
      Version: "2012-10-17",
      Statement: [{ Effect: "Allow", Action: "*", Resource: "*" }],
    }, region);
    const deploy = await userWithPolicy(moto.url, "sinkhole-deploy", motoPolicy(documentedPolicy()), region);
    await enforceIam(moto.url);
    await startRecording(moto.url);
    /** Inspection, as the administrator, straight to moto (not recorded). */
    const aws = (...a: string[]) => awsCliAs({ ...admin, ...region }, moto.url, ...a);
    /** The fixture's own plan, as Cabalmail's CI runs it. */
    const cabalChanges = () => cabal.changes(admin, ...cabalVars);
    return {
      moto,
      /** What the deploy user called so far. */
      called: () => recordedActions(recording, deploy.AWS_ACCESS_KEY_ID),
      admin,
      deploy,
      region,
      aws,
      cabalChanges,
      close: async () => {
        for (const c of cleanup.reverse()) await c().catch(() => {});
      },
    };
  } catch (err) {
    for (const c of cleanup.reverse()) await c().catch(() => {});
    throw err;
  }
}

type Account = Awaited<ReturnType<typeof cabalmailAccount>>;

/** This project's root (terraform/live) as infra.yml runs it, as the deploy user. */
async function sinkholeRoot(account: Account) {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-live-" });
  await run("cp", ["-r", `${ROOT}/terraform`, `${dir}/terraform`]);
  await Deno.remove(`${dir}/terraform/live/.terraform`, { recursive: true }).catch(() => {});
  await Deno.mkdir(`${dir}/ctl`);
  await Deno.writeTextFile(`${dir}/ctl/environments.json`, ENVIRONMENTS_TEXT);
  const live = `${dir}/terraform/live`;
  await pointAtMoto(dir, live, account.moto.url);
  const t = terraform(dir, live, account.moto.url, account.deploy);
  // The state in a local file: moto's S3 signature check fails on any query value holding ':' or '/'
  // (SignatureDoesNotMatch; the aws CLI's own list-objects-v2 --prefix env:/ fails the same), and the S3
  // backend lists its workspaces with the prefix env:/ on every init, whoever signs. The S3 backend with
  // the workflow's -backend-config is tested without enforcement (the test after these).
  await Deno.writeTextFile(`${live}/backend_override.tf`, 'terraform {\n  backend "local" {}\n}\n');
  const init = () => t.tf({}, "init");
  const outputs = async () => {
    const res = await t.tf({}, "output", "-json");
    assertEquals(res.code, 0, res.out);
    return (JSON.parse(res.stdout) as Json).sinkhole.value as Json;
  };
  return { ...t, dir, live, init, outputs };
}

/** The three variables infra.yml sets, and nothing else. */
const vars = (sinkhole: boolean, quiesced = false, environment = ENVIRONMENT) => ({
  TF_VAR_environment: environment,
  TF_VAR_sinkhole: String(sinkhole),
  TF_VAR_quiesced: String(quiesced),
});

/** ctl as a button runs it, as the deploy user. */
function ctlAs(account: Account, envFile: string, creds: Creds = account.deploy) {
  return (...args: string[]) =>
    runCtl([...args, "--env", ENVIRONMENT], {
      ...AWS_ENV,
      ...creds,
      ...account.region,
      AWS_ENDPOINT_URL: account.moto.url,
      SINKHOLE_ENVIRONMENTS: envFile,
      SINKHOLE_CTL_POLL_MS: "200",
      GITHUB_TOKEN: "",
    });
}

/** The image push, as the deploy user: `aws ecr put-image` stands in for docker push (no engine here). */
async function pushImage(account: Account, tag: string): Promise<void> {
  const config = JSON.stringify({ architecture: "arm64", os: "linux" });
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(config));
  const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  const manifest = {
    schemaVersion: 2,
    mediaType: "application/vnd.docker.distribution.manifest.v2+json",
    config: {
      mediaType: "application/vnd.docker.container.image.v1+json",
      size: config.length,
      digest: `sha256:${hex}`,
    },
    layers: [],
  };
  const as = { ...account.deploy, ...account.region };
  await awsCliAs(as, account.moto.url, "ecr", "describe-images", "--repository-name", "cabal-sinkhole");
  await awsCliAs(
    as,
    account.moto.url,
    "ecr",
    "put-image",
    "--repository-name",
    "cabal-sinkhole",
    "--image-tag",
    tag,
    "--image-manifest",
    JSON.stringify(manifest),
  );
}

async function service(account: Account): Promise<Json | undefined> {
  const res = await account.aws(
    "ecs",
    "describe-services",
    "--cluster",
    ENV.cluster,
    "--services",
    ENV.sinkholeService,
  );
  return (res.services as Json[]).find((s) => s.status !== "INACTIVE");
}

async function taskDefinition(account: Account, arn: string): Promise<Json> {
  return (await account.aws("ecs", "describe-task-definition", "--task-definition", arn)).taskDefinition as Json;
}

/** A task definition less what registering it again sets anew, and less its sinkhole container's image. */
function shape(td: Json): Json {
  const copy = structuredClone(td);
  for (const k of ["taskDefinitionArn", "revision", "registeredAt", "registeredBy", "status"]) delete copy[k];
  for (const c of copy.containerDefinitions as Json[]) if (c.name === "sinkhole") delete c.image;
  return copy;
}

async function repositoryCount(account: Account): Promise<number> {
  return ((await account.aws("ecr", "describe-repositories")).repositories as Json[]).length;
}

/**
 * One run on Cabalmail's account (with its sinkhole tier or without): the account, this project's root and ctl
 * as the deploy user; what the deploy user called is kept for the policy test, and the run counted when it ends.
 */
function accountRun(
  name: string,
  sinkhole: boolean,
  body: (t: Deno.TestContext, run: { account: Account; root: Root; envFile: string; ctl: Ctl }) => Promise<void>,
) {
  Deno.test({
    name,
    ignore: tools.ignore,
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async (t) => {
      assertTools(tools.missing);
      const account = await cabalmailAccount(sinkhole);
      const root = await sinkholeRoot(account);
      const envFile = `${root.dir}/ctl/environments.json`;
      try {
        await body(t, { account, root, envFile, ctl: ctlAs(account, envFile) });
        runsCompleted++;
      } finally {
        for (const a of await account.called()) CALLED.add(a);
        await account.close();
        await Deno.remove(root.dir, { recursive: true }).catch(() => {});
      }
    },
  });
}
type Root = Awaited<ReturnType<typeof sinkholeRoot>>;
type Ctl = ReturnType<typeof ctlAs>;

const ECR_REPOSITORIES = 13; // cabal-infra modules/ecr/main.tf: 3 core tiers, 9 monitoring, sinkhole

accountRun(
  "infra: Cabalmail's tier exists: the root makes none of it (SINKHOLE=true stops), ctl deploy rolls Cabalmail's " +
    "service to the pushed image, Cabalmail's plan shows no change; every button's ctl command works on it",
  true,
  async (t, { account, root, envFile, ctl }) => {
    await t.step("Cabalmail's own plan is clean before anything of ours runs", async () => {
      assertEquals(await account.cabalChanges(), []);
    });

    await t.step(
      "init; SINKHOLE=true stops at plan naming Cabalmail's tier; SINKHOLE unset makes none of it",
      async () => {
        const init = await root.init();
        assertEquals(init.code, 0, init.out);
        const plan = await root.tf(vars(true), "plan");
        assertEquals(plan.code, 1, plan.out);
        const flat = plan.out.replace(/\s+/g, " ");
        assert(flat.includes(CABALMAIL_TIER_MESSAGE.replace(/\s+/g, " ")), flat);
        assertMatch(flat, /The log group \/ecs\/cabal-sinkhole exists and is not this module's/);
        assertMatch(flat, /The parameter \/cabal\/sinkhole_mode exists and this module's tier does not/);
        const applied = await root.apply(vars(false));
        assertMatch(applied.out, /Apply complete! Resources: 3 added, 0 changed, 0 destroyed/);
        assertEquals(await repositoryCount(account), ECR_REPOSITORIES, "no second repository");
        assertEquals(await root.changes(vars(false)), []);
      },
    );

    const before = await service(account);
    assert(before, "Cabalmail's service cabal-sinkhole runs");
    const cabalTd = await taskDefinition(account, before.taskDefinition);

    await t.step(
      "push, ctl deploy: a new revision from the running one, only the image changed; stable",
      async () => {
        await pushImage(account, IMAGE_TAG);
        const res = await ctl("deploy", "--tag", IMAGE_TAG);
        assertEquals(res.code, 0, res.stdout + res.stderr);
        assertMatch(res.stdout, /stable on .*cabal-sinkhole:2/);
        const after = await service(account);
        assert(after && after.taskDefinition !== before.taskDefinition, "the service runs a new revision");
        const td = await taskDefinition(account, after.taskDefinition);
        const image = `${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com/cabal-sinkhole:${IMAGE_TAG}`;
        assertEquals(td.containerDefinitions[0].image, image, "the image this project pushed");
        assertEquals(shape(td), shape(cabalTd), "everything else of Cabalmail's task definition unchanged");
        // The listener runs in it as it is: port 25, awsvpc, EC2, 128 MiB, no systemControls, no health check.
        const c = td.containerDefinitions[0];
        assertEquals([td.networkMode, td.requiresCompatibilities, c.memory, c.portMappings[0].containerPort], [
          "awsvpc",
          ["EC2"],
          128,
          25,
        ]);
        assertEquals([c.systemControls ?? [], c.healthCheck], [[], undefined]);
        const tag = await account.aws("ssm", "get-parameter", "--name", ENV.imageTagParameter);
        assertEquals(
          (tag.Parameter as Json).Value,
          IMAGE_TAG,
          "the tag, as refresh-ssm-from-running.sh would write it",
        );
      },
    );

    await t.step("after the deploy: Cabalmail's plan and this root's show no change", async () => {
      assertEquals(await account.cabalChanges(), []);
      assertEquals(await root.changes(vars(false)), []);
    });

    await t.step("every button's ctl command on Cabalmail's tier, as the deploy user", async () => {
      for (
        const [args, codes] of [
          [["status", "--tier", "on"], [0]],
          [["mode", "get"], [0]],
          [["mode", "set", "accept"], [0]],
          [["check", "--tier", "on", "--no-github", "--mode-age", "0"], [1]],
          // Nothing was sent here: no attempt in the log group is "done, not as wanted" (docs/ctl.md).
          [["report", "--since", "60"], [1]],
          [["probe", "--timeout", "1"], [1]],
          [["cleanup"], [0]],
        ] as [string[], number[]][]
      ) {
        const res = await ctl(...args);
        assert(codes.includes(res.code), `ctl ${args.join(" ")}: exit ${res.code}\n${res.stdout}${res.stderr}`);
        assert(!/AccessDenied|not authorized/i.test(res.stdout + res.stderr), res.stdout + res.stderr);
      }
    });

    await t.step("a deploy without the Parameters statement is denied (moto enforces the policy)", async () => {
      const creds = await userWithPolicy(
        account.moto.url,
        "sinkhole-deploy-without-parameters",
        motoPolicy(documentedPolicy(), "Parameters"),
        { ...account.admin, ...account.region },
      );
      const res = await ctlAs(account, envFile, creds)("mode", "set", "accept");
      assertEquals(res.code, 3, res.stdout + res.stderr);
      assertMatch(res.stderr, /PutParameter|AccessDenied|not authorized/);
    });
  },
);

accountRun(
  "infra: no tier: the root makes one from what is missing only, ctl deploy and the next apply run the pushed " +
    "image; ctl drives it; quiesce, removal; Cabalmail's plan clean throughout; prod refused",
  false,
  async (t, { account, root, ctl }) => {
    const { aws } = account;
    await t.step("init from the mirror", async () => {
      const res = await root.init();
      assertEquals(res.code, 0, res.out);
    });

    await t.step(
      "apply, tier on, no image yet: made from what is missing, under Cabalmail's execution role",
      async () => {
        await root.apply(vars(true));
        const out = await root.outputs();
        assertEquals(out.parameter_name, ENV.parameter);
        assertEquals(out.image_tag_parameter, ENV.imageTagParameter);
        assertEquals(out.ecs_service, ENV.sinkholeService);
        assertEquals(out.hostname, `sinkhole.${ENV.namespace}`);
        assertEquals(out.image, "", "no image pushed yet");
        assertEquals(await repositoryCount(account), ECR_REPOSITORIES, "Cabalmail's repository, not a second");
        const svc = await service(account);
        assertEquals(
          svc?.desiredCount,
          0,
          "no task until an image is pushed: nothing for Cabalmail's pipeline to wait on",
        );
        const td = await taskDefinition(account, svc!.taskDefinition);
        assertEquals(td.executionRoleArn, `arn:aws:iam::${ACCOUNT}:role/cabal-ecs-execution-role`);
      },
    );

    await t.step(
      "a plan without the DescribeParameters statement is denied (the provider reads the mode parameter it made)",
      async () => {
        const creds = await userWithPolicy(
          account.moto.url,
          "sinkhole-deploy-without-describe",
          motoPolicy(documentedPolicy(), "DescribeParameters"),
          { ...account.admin, ...account.region },
        );
        const plan = await root.tf({ ...creds, ...vars(true) }, "plan");
        assertEquals(plan.code, 1, plan.out);
        assertMatch(plan.out, /DescribeParameters/);
      },
    );

    await t.step("push, ctl deploy, apply: the pushed image runs, desired 1; both plans clean", async () => {
      await pushImage(account, IMAGE_TAG);
      const res = await ctl("deploy", "--tag", IMAGE_TAG);
      assertEquals(res.code, 0, res.stdout + res.stderr);
      await root.apply(vars(true));
      const out = await root.outputs();
      assertEquals(out.image, `${out.repository_url}:${IMAGE_TAG}`);
      const svc = await service(account);
      assertEquals(svc?.desiredCount, 1);
      const td = await taskDefinition(account, svc!.taskDefinition);
      assertEquals(td.containerDefinitions[0].image, out.image, "the service runs the pushed image");
      assertEquals(td.containerDefinitions[0].logConfiguration.options.mode, "non-blocking");
      assertEquals(await root.changes(vars(true)), [], "a second plan shows no changes");
      assertEquals(await account.cabalChanges(), []);
    });

    await t.step(
      "ctl status, mode get, mode set --wait, report, check and probe on what Terraform made",
      async () => {
        // The listener stands in for the task: credentials whose only policy is its task role's.
        const task = await userWithPolicy(account.moto.url, "sinkhole-task", {
          Version: "2012-10-17",
          Statement: [{ Effect: "Allow", Action: "ssm:GetParameter", Resource: "*" }],
        }, { ...account.admin, ...account.region });
        const l = await startListener({
          ...ssmEnv(account.moto.url, "1", ENV.parameter),
          ...task,
          ...account.region,
        });
        const shipper = shipLogs(l, account.moto.url, ENV.sinkholeLogGroup, { ...account.admin, ...account.region });
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
          const cleanup = await ctl("cleanup");
          assertEquals(cleanup.code, 0, cleanup.stdout + cleanup.stderr);
        } finally {
          await shipper.stop();
          await l.stop();
        }
      },
    );

    await t.step("quiesced: the drain runs, the service scales to zero, the Cloud Map name stays", async () => {
      const res = await root.apply(vars(true, true));
      assertMatch(res.out, /cloud_map_lifecycle\[0\] \(local-exec\)|cloud_map_lifecycle\[0\]: Destroying/);
      assertEquals((await service(account))?.desiredCount, 0);
      const names = ((await aws("servicediscovery", "list-services")).Services as Json[]).map((s) => s.Name);
      assert(names.includes("sinkhole"), names.join());
      assertEquals(await root.changes(vars(true, true)), []);
    });

    await t.step("sinkhole=false removes the tier; Cabalmail's repository and tag parameter stay", async () => {
      await root.apply(vars(false));
      assertEquals(await service(account), undefined);
      const names = ((await aws("servicediscovery", "list-services")).Services as Json[]).map((s) => s.Name);
      assert(!names.includes("sinkhole"), names.join());
      assertEquals(await repositoryCount(account), ECR_REPOSITORIES);
      const tag = await aws("ssm", "get-parameter", "--name", ENV.imageTagParameter);
      assertEquals((tag.Parameter as Json).Value, IMAGE_TAG, "the deployed tag survives for the next time");
      assertEquals(await root.changes(vars(false)), []);
      assertEquals(await account.cabalChanges(), [], "Cabalmail's plan: no change after removal");
    });

    await t.step("production refused at plan: by name (prod, Production), and by the cluster's tag", async () => {
      for (const name of ["prod", "Production"]) {
        const plan = await root.tf(vars(true, false, name), "plan");
        assertEquals(plan.code, 1, plan.out);
        assertMatch(plan.out.replace(/\s+/g, " "), /sinkhole has none in production/);
      }
      await aws(
        "ecs",
        "tag-resource",
        "--resource-arn",
        `arn:aws:ecs:${REGION}:${ACCOUNT}:cluster/${ENV.cluster}`,
        "--tags",
        "key=environment,value=prod",
      );
      // Tagged production, with the tier off: refused all the same (tests/terraform_test.ts plans each layer).
      const plan = await root.tf(vars(false), "plan");
      assertEquals(plan.code, 1, plan.out);
      assertMatch(plan.out.replace(/\s+/g, " "), /never deployed to production/);
    });
  },
);

Deno.test({
  name: "infra: init from the mirror into the S3 backend, with the workflow's -backend-config; the committed lock file",
  ignore: tools.ignore,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    assertTools(tools.missing);
    const moto = await startMoto();
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-init-" });
    try {
      const region = { AWS_REGION: REGION, AWS_DEFAULT_REGION: REGION };
      const bucket = ["--bucket", STATE_BUCKET, "--create-bucket-configuration", `LocationConstraint=${REGION}`];
      await awsCliAs(region, moto.url, "s3api", "create-bucket", ...bucket);
      await run("cp", ["-r", `${ROOT}/terraform`, `${dir}/terraform`]);
      await Deno.remove(`${dir}/terraform/live/.terraform`, { recursive: true }).catch(() => {});
      await Deno.writeTextFile(`${dir}/cli.tfrc`, cliConfig());
      const t = terraform(dir, `${dir}/terraform/live`, moto.url, {});
      const res = await t.tf(
        {},
        "init",
        `-backend-config=bucket=${STATE_BUCKET}`,
        `-backend-config=key=sinkhole/${ENVIRONMENT}.tfstate`,
        `-backend-config=region=${REGION}`,
        // The backend's own endpoint and checks: moto instead of S3 (not set by the workflow).
        `-backend-config=endpoints={s3="${moto.url}"}`,
        "-backend-config=use_path_style=true",
        "-backend-config=skip_credentials_validation=true",
        "-backend-config=skip_requesting_account_id=true",
      );
      assertEquals(res.code, 0, res.out);
      assertMatch(res.out, /Successfully configured the backend "s3"/);
      const lock = await Deno.readTextFile(`${dir}/terraform/live/.terraform.lock.hcl`);
      const committed = await Deno.readTextFile(`${ROOT}/terraform/live/.terraform.lock.hcl`);
      assertEquals(lock, committed, "init agrees with the committed lock file (the pinned provider's checksum)");
    } finally {
      await moto.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

/**
 * Statements whose actions moto cannot show a need for, and why. Every other statement must
 * grant an action the runs above called that no other statement grants: without it, that call
 * is denied (the two removal steps above show moto denying).
 */
const NOT_SHOWN_IN_MOTO: Record<string, string> = {
  TerraformState: "the state is a local file under enforcement: moto's S3 signature check fails the backend's listing",
  TerraformStateObjects: "the same (see sinkholeRoot)",
  EcsExec: "moto has no ECS Exec: the probe, cleanup --purge-queue and check's queue look run commands in smtp-out",
  PassTaskRoles: "moto does not check iam:PassRole (RegisterTaskDefinition and CreateService need it in AWS)",
  EcrLogin: "no docker engine here: the image job's docker login calls ecr:GetAuthorizationToken",
  ReadExecutionRole: "moto checks actions only, and TaskRole grants iam:GetRole too (the resource differs in AWS)",
};

/** IAM's wildcard match of an action pattern. */
const grants = (pattern: string, action: string) =>
  new RegExp(`^${pattern.replace(/[.+?^${}()|[\]\\]/g, "\\$&").replaceAll("*", ".*")}$`, "i").test(action);

Deno.test({
  name: "infra: every statement of docs/deploy.md's policy grants a call the runs needed that no other grants",
  ignore: tools.ignore,
  fn: () => {
    assertEquals(runsCompleted, 2, "both runs above completed (this test reads what they called)");
    const statements = documentedPolicy().Statement as Json[];
    const of = (s: Json) => [s.Action].flat() as string[];
    for (const a of CALLED) {
      assert(statements.some((s) => of(s).some((p) => grants(p, a))), `${a} was allowed, yet no statement grants it`);
    }
    for (const s of statements) {
      if (NOT_SHOWN_IN_MOTO[s.Sid]) continue;
      const only = [...CALLED].filter((a) =>
        of(s).some((p) => grants(p, a)) && !statements.some((o) => o !== s && of(o).some((p) => grants(p, a)))
      );
      assert(
        only.length > 0,
        `statement ${s.Sid}: no call of the runs needed it alone (called: ${[...CALLED].sort()})`,
      );
    }
    for (const sid of Object.keys(NOT_SHOWN_IN_MOTO)) {
      assert(statements.some((s) => s.Sid === sid), `${sid} is a statement of the policy`);
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
