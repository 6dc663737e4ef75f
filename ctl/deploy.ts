/**
 * `ctl deploy --tag sha-XXXXXXXX`: delivers an image already pushed to ECR into the tier that
 * runs in the account, whoever's Terraform made it, the way Cabalmail rolls its own tiers
 * (cabal-infra .github/scripts/deploy-ecs-service.sh, called by .github/workflows/app.yml's
 * docker job): a new task-definition revision cloned from the one the service runs with only
 * the sinkhole container's image changed, the service updated to it, the wait for a stable
 * rollout, and the check that the service landed on that revision. Then the tag goes to
 * `/cabal/deployed_image_tag/sinkhole`, as cabal-infra's refresh-ssm-from-running.sh would write
 * it from the running service, so a later Terraform re-registration re-pins the same image.
 *
 * What it never does: create, delete or re-shape anything (no Terraform-owned attribute but the
 * task definition revision, which both Terraform states ignore: sinkhole.tf's ignore_changes on
 * container_definitions and task_definition, and this project's module the same).
 */
import {
  DescribeServicesCommand,
  DescribeTaskDefinitionCommand,
  RegisterTaskDefinitionCommand,
  type RegisterTaskDefinitionCommandInput,
  type Service,
  type TaskDefinition,
  UpdateServiceCommand,
} from "@aws-sdk/client-ecs";
import { PutParameterCommand } from "@aws-sdk/client-ssm";
import type { Deps, Report } from "./commands.ts";
import { UsageError } from "./cli.ts";

/** The ECR repository every account holds (cabal-infra terraform/infra/modules/ecr/main.tf:51-52, always created). */
export const REPOSITORY_NAME = "cabal-sinkhole";
/** The container's name in both task definitions (cabal-infra modules/ecs/sinkhole.tf:234; terraform/sinkhole.ts). */
export const CONTAINER_NAME = "sinkhole";
/** How long a roll may take to become stable: the aws CLI's services-stable waiter (40 polls of 15 s). */
export const STABLE_WITHIN_MS = 10 * 60_000;
/** The tags the image workflow pushes: sha- and the commit's first 8 hex digits (and Cabalmail's lifecycle prefix). */
export const TAG_PATTERN = /^sha-[0-9a-f]{7,40}$/;

/** Read-only fields of a described task definition, which RegisterTaskDefinition does not take (deploy-ecs-service.sh:122-130). */
const READ_ONLY = [
  "taskDefinitionArn",
  "revision",
  "status",
  "requiresAttributes",
  "compatibilities",
  "registeredAt",
  "registeredBy",
  "deregisteredAt",
] as const;

/** The --tag value, checked before any request. */
export function deployTag(raw: string | true | undefined): string {
  if (typeof raw !== "string" || raw === "") throw new UsageError("deploy needs --tag sha-XXXXXXXX");
  if (!TAG_PATTERN.test(raw)) {
    throw new UsageError(
      `--tag must be sha- and 7 to 40 lower-case hex digits (what the image workflow pushes), got ${
        JSON.stringify(raw)
      }`,
    );
  }
  return raw;
}

/** An image reference's repository basename: the path after the last '/', without tag or digest (deploy-ecs-service.sh:112-113). */
export function repositoryBasename(image: string): string {
  return image.split("@")[0].replace(/:[^/:]*$/, "").split("/").pop() ?? "";
}

/** `ACCOUNT.dkr.ecr.REGION.amazonaws.com/cabal-sinkhole`, from an ARN of the same account and region. */
export function repositoryUri(arn: string): string {
  const [, , , region, account] = arn.split(":");
  return `${account}.dkr.ecr.${region}.amazonaws.com/${REPOSITORY_NAME}`;
}

/**
 * The next revision: the running one with only the sinkhole container's image changed. Every
 * container whose image is in cabal-sinkhole is rewritten (Cabalmail's rule); when none is (the
 * bootstrap placeholder, public.ecr.aws/nginx/nginx: cabal-infra modules/ecs/locals.tf:45-57), the
 * container named sinkhole is. Nothing else changes. Throws when there is no such container.
 */
export function nextRevision(td: TaskDefinition, image: string): RegisterTaskDefinitionCommandInput {
  const containers = td.containerDefinitions ?? [];
  const inRepo = containers.filter((c) => repositoryBasename(c.image ?? "") === REPOSITORY_NAME);
  const targets = inRepo.length > 0 ? inRepo : containers.filter((c) => c.name === CONTAINER_NAME);
  if (targets.length === 0) {
    throw new Error(
      `task definition ${td.taskDefinitionArn} has no container in ${REPOSITORY_NAME} and none named ` +
        `${CONTAINER_NAME}: not a sinkhole tier, not deployed`,
    );
  }
  const copy = structuredClone(td) as Record<string, unknown>;
  for (const key of READ_ONLY) delete copy[key];
  copy.containerDefinitions = containers.map((c) => targets.includes(c) ? { ...structuredClone(c), image } : c);
  return copy as unknown as RegisterTaskDefinitionCommandInput;
}

/** Stable as the aws CLI's services-stable waiter says it: one deployment, running = desired. */
export function isStable(s: Service | undefined): boolean {
  return !!s && (s.deployments?.length ?? 0) === 1 && s.runningCount === s.desiredCount;
}

async function describe(d: Deps): Promise<Service | undefined> {
  const res = await d.ecs.send(
    new DescribeServicesCommand({ cluster: d.env.cluster, services: [d.env.sinkholeService] }),
  );
  return res.services?.find((s) => s.status === "ACTIVE" || s.status === "DRAINING");
}

async function storeTag(d: Deps, tag: string): Promise<void> {
  await d.ssm.send(
    new PutParameterCommand({ Name: d.env.imageTagParameter, Value: tag, Type: "String", Overwrite: true }),
  );
}

export async function deploy(d: Deps, tag: string): Promise<Report> {
  const title = `sinkhole deploy: ${d.env.name}`;
  const lines: string[] = [];
  const svc = await describe(d);
  if (!svc) {
    // No tier in the account yet: the tag is what this project's module creates its task
    // definition with (terraform/sinkhole.ts reads the parameter), on the next infra apply.
    await storeTag(d, tag);
    lines.push(
      `no service ${d.env.sinkholeService} in ${d.env.cluster}: nothing to roll`,
      `${d.env.imageTagParameter} = ${tag}: the next infra apply creates the tier with it`,
    );
    return { title, ok: true, lines, data: { rolled: false, tag } };
  }
  const previous = svc.taskDefinition!;
  const described = await d.ecs.send(new DescribeTaskDefinitionCommand({ taskDefinition: previous }));
  const image = `${repositoryUri(svc.serviceArn!)}:${tag}`;
  const input = nextRevision(described.taskDefinition!, image);
  const registered = await d.ecs.send(new RegisterTaskDefinitionCommand(input));
  const next = registered.taskDefinition!.taskDefinitionArn!;
  lines.push(`service ${d.env.sinkholeService} ran ${previous}`, `registered ${next}: image ${image}`);
  await d.ecs.send(
    new UpdateServiceCommand({ cluster: d.env.cluster, service: d.env.sinkholeService, taskDefinition: next }),
  );
  lines.push(`service ${d.env.sinkholeService} rolling to ${next}`);
  const deadline = d.now() + STABLE_WITHIN_MS;
  let now = await describe(d);
  while (!isStable(now) && d.now() < deadline) {
    await d.sleep(d.pollMs);
    now = await describe(d);
  }
  if (!isStable(now) || now?.taskDefinition !== next) {
    // A task that cannot start must not hold Cabalmail's pipeline (its refresh-ssm-from-running.sh
    // waits for every cabal-* service to be stable): back to the revision that ran, tag untouched.
    await d.ecs.send(
      new UpdateServiceCommand({ cluster: d.env.cluster, service: d.env.sinkholeService, taskDefinition: previous }),
    );
    lines.push(
      `not stable on ${next} within ${STABLE_WITHIN_MS / 60_000} min (running ${now?.runningCount} of ` +
        `${now?.desiredCount}, ${now?.deployments?.length} deployment(s), on ${now?.taskDefinition})`,
      `rolled back to ${previous}; ${d.env.imageTagParameter} left as it was`,
    );
    return { title, ok: false, failed: true, lines, data: { rolled: false, previous, next, tag } };
  }
  await storeTag(d, tag);
  lines.push(
    `stable on ${next}: running ${now!.runningCount} of ${now!.desiredCount}`,
    `${d.env.imageTagParameter} = ${tag}`,
  );
  return { title, ok: true, lines, data: { rolled: true, previous, next, image, tag } };
}
