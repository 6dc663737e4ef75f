/**
 * ctl deploy's decisions as pure functions, table-tested: which container gets the image, what
 * else of the task definition stays, which tags are taken. The roll itself runs against moto
 * in tests/infra_test.ts, on a task definition made as cabal-infra's sinkhole.tf makes it.
 */
import { assertEquals } from "../rig/assert.ts";
import {
  deploy,
  deployTag,
  isStable,
  nextRevision,
  repositoryBasename,
  repositoryUri,
  STABLE_WITHIN_MS,
} from "../ctl/deploy.ts";
import type { TaskDefinition } from "@aws-sdk/client-ecs";

Deno.test("deploy: an image reference's repository basename (cabal-infra deploy-ecs-service.sh's rule)", () => {
  const cases: [string, string][] = [
    ["123456789012.dkr.ecr.eu-west-1.amazonaws.com/cabal-sinkhole:sha-0123abcd", "cabal-sinkhole"],
    ["123456789012.dkr.ecr.eu-west-1.amazonaws.com/cabal-sinkhole@sha256:abcd", "cabal-sinkhole"],
    ["public.ecr.aws/nginx/nginx:stable", "nginx"],
    ["registry:5000/cabal-sinkhole", "cabal-sinkhole"],
    ["cabal-sinkhole-old:sha-1", "cabal-sinkhole-old"],
  ];
  for (const [image, base] of cases) assertEquals(repositoryBasename(image), base, image);
  assertEquals(
    repositoryUri("arn:aws:ecs:eu-west-1:123456789012:service/cabal-mail/cabal-sinkhole"),
    "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cabal-sinkhole",
  );
});

Deno.test("deploy: --tag takes what the image workflow pushes and nothing else", () => {
  assertEquals(deployTag("sha-0123abcd"), "sha-0123abcd");
  for (const bad of [undefined, true, "", "latest", "sha-XYZ", "sha-0123ABCD", "0123abcd", "sha-0123abcd;rm"]) {
    assertThrows(() => deployTag(bad as string), "--tag", String(bad));
  }
});

/** Runs fn, which must throw an Error whose message includes `part`. */
function assertThrows(fn: () => unknown, part: string, what = ""): void {
  let message: string | undefined;
  try {
    fn();
  } catch (err) {
    message = (err as Error).message;
  }
  assertEquals(message?.includes(part), true, `${what}: threw ${JSON.stringify(message)}, wanted ${part}`);
}

/** As cabal-infra's sinkhole.tf:225-260 registers it, described back (read-only fields included). */
const cabalmails = (image: string): TaskDefinition => ({
  taskDefinitionArn: "arn:aws:ecs:eu-west-1:123456789012:task-definition/cabal-sinkhole:3",
  family: "cabal-sinkhole",
  revision: 3,
  status: "ACTIVE",
  requiresCompatibilities: ["EC2"],
  compatibilities: ["EC2"],
  networkMode: "awsvpc",
  executionRoleArn: "arn:aws:iam::123456789012:role/cabal-ecs-execution-role",
  taskRoleArn: "arn:aws:iam::123456789012:role/cabal-ecs-sinkhole-task-role",
  registeredBy: "arn:aws:sts::123456789012:assumed-role/cicd/x",
  containerDefinitions: [{
    name: "sinkhole",
    image,
    essential: true,
    memoryReservation: 64,
    memory: 128,
    portMappings: [{ containerPort: 25, protocol: "tcp" }],
    environment: [
      { name: "TIER", value: "sinkhole" },
      { name: "AWS_REGION", value: "eu-west-1" },
      { name: "SINKHOLE_MODE_PARAM", value: "/cabal/sinkhole_mode" },
    ],
  }],
});

Deno.test("deploy: the next revision changes the sinkhole container's image and nothing else", () => {
  const image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cabal-sinkhole:sha-0123abcd";
  for (
    const running of [
      "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cabal-sinkhole:sha-ffffffff", // Cabalmail's own image
      "public.ecr.aws/nginx/nginx:stable", // its bootstrap placeholder (modules/ecs/locals.tf:46)
    ]
  ) {
    const td = cabalmails(running);
    const next = nextRevision(td, image) as unknown as Record<string, unknown>;
    const expected = structuredClone(td) as Record<string, unknown>;
    for (const k of ["taskDefinitionArn", "revision", "status", "compatibilities", "registeredBy"]) delete expected[k];
    (expected.containerDefinitions as { image: string }[])[0].image = image;
    assertEquals(next, expected, running);
    assertEquals(td.containerDefinitions![0].image, running, "the described one is not mutated");
  }
  const sidecar = cabalmails("public.ecr.aws/nginx/nginx:stable");
  sidecar.containerDefinitions!.push({ name: "other", image: "public.ecr.aws/x/y:1" });
  const next = nextRevision(sidecar, image);
  assertEquals(next.containerDefinitions!.map((c) => c.image), [image, "public.ecr.aws/x/y:1"]);
  const foreign = cabalmails("x");
  foreign.containerDefinitions![0].name = "imap";
  assertThrows(() => nextRevision(foreign, image), "not a sinkhole tier");
});

Deno.test("deploy: stable as the services-stable waiter says", () => {
  assertEquals(isStable(undefined), false);
  assertEquals(isStable({ deployments: [{}], runningCount: 1, desiredCount: 1 }), true);
  assertEquals(isStable({ deployments: [{}], runningCount: 0, desiredCount: 0 }), true);
  assertEquals(isStable({ deployments: [{}, {}], runningCount: 1, desiredCount: 1 }), false);
  assertEquals(isStable({ deployments: [{}], runningCount: 0, desiredCount: 1 }), false);
});

/**
 * A roll that never becomes stable. moto reports every service stable at once, so this one
 * decision runs against a scripted ECS (a fake: nothing real here can hold a task unstarted),
 * recording the calls the deploy makes.
 */
Deno.test("deploy: a roll that never becomes stable goes back to the revision that ran; the tag stays", async () => {
  const calls: [string, Record<string, unknown>][] = [];
  const running = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cabal-sinkhole:3";
  const registered = "arn:aws:ecs:eu-west-1:123456789012:task-definition/cabal-sinkhole:4";
  let clock = 0;
  const send = (cmd: { constructor: { name: string }; input: Record<string, unknown> }) => {
    const name = cmd.constructor.name.replace(/Command$/, "");
    calls.push([name, cmd.input]);
    if (name === "DescribeServices") {
      const onNew = calls.some(([n, i]) => n === "UpdateService" && i.taskDefinition === registered);
      return Promise.resolve({
        services: [{
          status: "ACTIVE",
          serviceArn: "arn:aws:ecs:eu-west-1:123456789012:service/cabal-mail/cabal-sinkhole",
          taskDefinition: onNew ? registered : running,
          desiredCount: 1,
          runningCount: 0,
          deployments: onNew ? [{}, {}] : [{}],
        }],
      });
    }
    if (name === "DescribeTaskDefinition") {
      return Promise.resolve({ taskDefinition: cabalmails("x/cabal-sinkhole:sha-1") });
    }
    if (name === "RegisterTaskDefinition") {
      return Promise.resolve({ taskDefinition: { taskDefinitionArn: registered } });
    }
    return Promise.resolve({});
  };
  const d = {
    env: { name: "stage", cluster: "cabal-mail", sinkholeService: "cabal-sinkhole", imageTagParameter: "/p" },
    ecs: { send },
    ssm: { send },
    now: () => clock,
    sleep: (ms: number) => (clock += ms, Promise.resolve()),
    pollMs: 15_000,
  } as unknown as Parameters<typeof deploy>[0];
  const report = await deploy(d, "sha-0123abcd");
  assertEquals(report.failed, true);
  const updates = calls.filter(([n]) => n === "UpdateService").map(([, i]) => i.taskDefinition);
  assertEquals(updates, [registered, running], "rolled to the new revision, then back to the one that ran");
  assertEquals(calls.filter(([n]) => n === "PutParameter").length, 0, "the tag parameter is left as it was");
  assertEquals(clock >= STABLE_WITHIN_MS, true, "it waited the whole window");
});
