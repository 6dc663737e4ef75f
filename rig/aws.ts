/**
 * AWS emulation for tests and benchmarks: the real moto_server, the real aws CLI, and a
 * small HTTP proxy in front of moto that counts GetParameter calls and injects faults
 * (hang, delay, 5xx, throttling, access denied, connection refused).
 */
import { assertEquals } from "./assert.ts";
import { assertTools, eventually, type Listener, needs, privateAddress, run, startListener } from "./helpers.ts";

export const PARAM = "/cabal/sinkhole_mode";

/** Static test credentials; the metadata endpoints are switched off so nothing leaves loopback. */
export const AWS_ENV = {
  AWS_ACCESS_KEY_ID: "testing",
  AWS_SECRET_ACCESS_KEY: "testing",
  AWS_REGION: "us-east-1",
  AWS_DEFAULT_REGION: "us-east-1",
  AWS_EC2_METADATA_DISABLED: "true",
};

/** moto's port, on a loopback address of this run's own (moto cannot report a port it chose). */
const MOTO_PORT = 5000;
/** moto's start-up (a Python import of every service): a hang guard, generous on a busy machine. */
const MOTO_START_WITHIN_MS = 120_000;

/** moto_server on a loopback address of its own, stopped by `close`. */
export async function startMoto(
  env: Record<string, string> = {},
): Promise<{ url: string; close: () => Promise<void> }> {
  const { host, port } = privateAddress(MOTO_PORT);
  const child = new Deno.Command("moto_server", {
    args: ["-H", host, "-p", String(port)],
    env,
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let exited: Deno.CommandStatus | undefined;
  const status = child.status.then((s) => exited = s);
  let stderr = "";
  const errPump = (async () => {
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
      if (stderr.length < 64 * 1024) stderr += chunk;
    }
  })();
  const url = `http://${host}:${port}`;
  await eventually(
    async () => {
      if (exited) throw new Error(`moto_server exited with ${exited.code} before it answered: ${stderr}`);
      try {
        const res = await fetch(`${url}/moto-api/data.json`);
        await res.body?.cancel();
        return res.ok;
      } catch {
        return false;
      }
    },
    MOTO_START_WITHIN_MS,
    100,
  );
  return {
    url,
    close: async () => {
      if (!exited) child.kill("SIGTERM");
      await status;
      await errPump.catch(() => {});
    },
  };
}

export type Fault = "none" | "hang" | "5xx" | "throttle" | "deny";

const AWS_JSON = { "content-type": "application/x-amz-json-1.1" };

/** Canned AWS JSON-protocol error answers, as SSM sends them. */
const FAULT_RESPONSES: Record<Exclude<Fault, "none" | "hang">, () => Response> = {
  "5xx": () =>
    new Response(JSON.stringify({ __type: "InternalServerError", message: "injected" }), {
      status: 500,
      headers: AWS_JSON,
    }),
  throttle: () =>
    new Response(JSON.stringify({ __type: "ThrottlingException", message: "Rate exceeded" }), {
      status: 400,
      headers: AWS_JSON,
    }),
  deny: () =>
    new Response(
      JSON.stringify({ __type: "AccessDeniedException", message: "not authorized to perform: ssm:GetParameter" }),
      { status: 400, headers: AWS_JSON },
    ),
};

/** Forwards to `target`, counting GetParameter calls; `fault` and `delayMs` change its answers. */
export function faultProxy(target: string) {
  let getParameter = 0;
  let total = 0;
  const state = { fault: "none" as Fault, delayMs: 0 };
  const hung = new Set<() => void>();
  /** While set, requests wait here (then are forwarded as usual): an SSM that is slow on demand. */
  let gate: PromiseWithResolvers<void> | undefined;
  let waiting = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    total++;
    if (req.headers.get("x-amz-target") === "AmazonSSM.GetParameter") getParameter++;
    if (state.fault === "hang") {
      // Never answers until the proxy shuts down (the listener must give up on its own).
      await new Promise<void>((ok) => hung.add(ok));
      return new Response(null, { status: 503 });
    }
    if (state.delayMs > 0) await new Promise((ok) => setTimeout(ok, state.delayMs));
    if (gate) {
      waiting++;
      await gate.promise.finally(() => waiting--);
    }
    if (state.fault !== "none") {
      await req.body?.cancel();
      return FAULT_RESPONSES[state.fault]();
    }
    const url = new URL(req.url);
    const res = await fetch(`${target}${url.pathname}${url.search}`, {
      method: req.method,
      headers: req.headers,
      body: req.body,
    });
    return new Response(res.body, { status: res.status, headers: res.headers });
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    get count() {
      return getParameter;
    },
    /** Every request, of any service. */
    get total() {
      return total;
    },
    state,
    /** Holds every request from now on until `release` (a slow SSM, for as long as a test needs). */
    hold() {
      gate ??= Promise.withResolvers<void>();
    },
    release() {
      gate?.resolve();
      gate = undefined;
    },
    /** Requests waiting at the gate now. */
    get held() {
      return waiting;
    },
    /** Stops answering at all: connections are refused from now on. */
    down: async () => {
      gate?.resolve();
      for (const release of hung) release();
      hung.clear();
      await server.shutdown();
    },
  };
}

/** The real aws CLI against `endpoint` (moto), JSON out; fails the test on a non-zero exit. */
export function awsCli(endpoint: string, ...args: string[]): Promise<Record<string, unknown>> {
  return awsCliAs({}, endpoint, ...args);
}

/** The same, with credentials (or other environment) of the caller's choosing over AWS_ENV's. */
export async function awsCliAs(
  env: Record<string, string>,
  endpoint: string,
  ...args: string[]
): Promise<Record<string, unknown>> {
  const res = await run("aws", ["--endpoint-url", endpoint, "--output", "json", ...args], {
    env: { ...AWS_ENV, ...env },
  });
  assertEquals(res.code, 0, `aws ${args.join(" ")}: ${res.stderr}`);
  return res.stdout.trim() ? JSON.parse(res.stdout) : {};
}

/** `aws ssm …` against `endpoint`. */
export const aws = (endpoint: string, ...args: string[]) => awsCli(endpoint, "ssm", ...args);

export const putMode = (endpoint: string, value: string, name = PARAM) =>
  aws(endpoint, "put-parameter", "--name", name, "--value", value, "--type", "String", "--overwrite");

/** Environment for a listener whose mode comes from SSM at `endpoint`. */
export function ssmEnv(endpoint: string, ttl = "1", name = PARAM): Record<string, string> {
  return {
    ...AWS_ENV,
    AWS_ENDPOINT_URL: endpoint,
    SINKHOLE_MODE: "",
    SINKHOLE_MODE_FILE: "",
    SINKHOLE_MODE_PARAM: name,
    SINKHOLE_CACHE_TTL: ttl,
  };
}

/** moto, the fault proxy in front of it, and the listeners a test started: all torn down after. */
export interface World {
  moto: { url: string };
  proxy: ReturnType<typeof faultProxy>;
  /** Starts a listener that is stopped when the test ends. */
  listen(env: Record<string, string>, opts?: Parameters<typeof startListener>[1]): Promise<Listener>;
}

const awsTools = needs("moto_server", "aws");

/** A test that needs moto and the aws CLI (skipped locally without them, failing under CI). */
export function awsTest(
  name: string,
  fn: (w: World, t: Deno.TestContext) => Promise<void>,
  opts: { ignore?: boolean; sanitize?: boolean } = {},
): void {
  Deno.test({
    name,
    ignore: awsTools.ignore || (opts.ignore ?? false),
    sanitizeOps: opts.sanitize ?? true,
    sanitizeResources: opts.sanitize ?? true,
    fn: async (t) => {
      assertTools(awsTools.missing);
      const moto = await startMoto();
      const proxy = faultProxy(moto.url);
      const listeners: Listener[] = [];
      try {
        await fn({
          moto,
          proxy,
          listen: async (env, o) => {
            const l = await startListener(env, o);
            listeners.push(l);
            return l;
          },
        }, t);
      } finally {
        for (const l of listeners) await l.stop();
        await proxy.down().catch(() => {});
        await moto.close();
      }
    },
  });
}

/**
 * Ships a listener's log lines to CloudWatch Logs (standing in for the awslogs driver); `env` over AWS_ENV
 * (e.g. another region).
 */
export function shipLogs(l: Listener, endpoint: string, group: string, env: Record<string, string> = {}) {
  let shipped = 0;
  let running = true;
  const done = (async () => {
    const stream = `sinkhole/${crypto.randomUUID()}`;
    await awsCliAs(env, endpoint, "logs", "create-log-stream", "--log-group-name", group, "--log-stream-name", stream);
    while (running) {
      const batch = l.logs.slice(shipped);
      if (batch.length > 0) {
        const now = Date.now();
        await awsCliAs(
          env,
          endpoint,
          "logs",
          "put-log-events",
          "--log-group-name",
          group,
          "--log-stream-name",
          stream,
          "--log-events",
          JSON.stringify(batch.map((b) => ({ timestamp: now, message: JSON.stringify(b) }))),
        );
        shipped += batch.length;
      }
      await new Promise((ok) => setTimeout(ok, 200));
    }
  })();
  return { stop: async () => (running = false, await done) };
}

/**
 * The AWS actions a caller made, as IAM names them (`ecs:DescribeServices`), read from moto's
 * own request recording (MOTO_RECORDER_FILEPATH, started by startRecording): the caller by the
 * access key in each request's SigV4 credential, the service from its credential scope, the
 * action from X-Amz-Target (JSON protocols), the Action parameter (query protocols) or, for S3,
 * the method and path (GetObject, PutObject, DeleteObject, ListBucket).
 */
export async function recordedActions(file: string, accessKeyId: string): Promise<Set<string>> {
  const actions = new Set<string>();
  const text = await Deno.readTextFile(file).catch(() => "");
  for (const line of text.split("\n").filter(Boolean)) {
    const entry = JSON.parse(line) as {
      headers: Record<string, string>;
      method: string;
      url: string;
      body?: string;
      body_encoded?: boolean;
    };
    const header = (name: string) => Object.entries(entry.headers).find(([k]) => k.toLowerCase() === name)?.[1] ?? "";
    const credential = /Credential=([^/]+)\/[^/]+\/[^/]+\/([^/]+)\//.exec(header("authorization"));
    if (!credential || credential[1] !== accessKeyId) continue;
    // CloudWatch signs as "monitoring"; IAM names its actions cloudwatch:*.
    const scope = credential[2] === "monitoring" ? "cloudwatch" : credential[2];
    const url = new URL(entry.url);
    const body = entry.body_encoded
      ? new TextDecoder().decode(Uint8Array.from(atob(entry.body ?? ""), (c) => c.charCodeAt(0)))
      : entry.body ?? "";
    let action: string | undefined;
    if (scope === "s3") {
      const key = url.pathname.split("/").slice(2).join("/");
      action = key
        ? ({ GET: "GetObject", HEAD: "GetObject", PUT: "PutObject", DELETE: "DeleteObject" } as Record<string, string>)[
          entry.method
        ]
        : ["GET", "HEAD"].includes(entry.method)
        ? "ListBucket"
        : `${entry.method}Bucket`;
    } else if (header("x-amz-target")) action = header("x-amz-target").split(".").pop();
    else {action = new URLSearchParams(body).get("Action") ?? url.searchParams.get("Action") ??
        `${entry.method} ${url.pathname}`;}
    actions.add(`${scope}:${action}`);
  }
  return actions;
}

/** moto records every request from now on (into its MOTO_RECORDER_FILEPATH). */
export async function startRecording(endpoint: string): Promise<void> {
  const res = await fetch(`${endpoint}/moto-api/recorder/start-recording`, { method: "POST" });
  assertEquals(res.status, 200, await res.text());
}

/** Credentials of a new IAM user in moto whose only policy is `policy`, made with the credentials in `as`. */
export async function userWithPolicy(
  endpoint: string,
  name: string,
  policy: unknown,
  as: Record<string, string> = {},
): Promise<{ AWS_ACCESS_KEY_ID: string; AWS_SECRET_ACCESS_KEY: string }> {
  await awsCliAs(as, endpoint, "iam", "create-user", "--user-name", name);
  await awsCliAs(
    as,
    endpoint,
    "iam",
    "put-user-policy",
    "--user-name",
    name,
    "--policy-name",
    "only",
    "--policy-document",
    JSON.stringify(policy),
  );
  const key = (await awsCliAs(as, endpoint, "iam", "create-access-key", "--user-name", name)).AccessKey as {
    AccessKeyId: string;
    SecretAccessKey: string;
  };
  return { AWS_ACCESS_KEY_ID: key.AccessKeyId, AWS_SECRET_ACCESS_KEY: key.SecretAccessKey };
}

/** From now on moto checks every request's signature and the caller's policies (moto's reset-auth). */
export async function enforceIam(endpoint: string): Promise<void> {
  const res = await fetch(`${endpoint}/moto-api/reset-auth`, { method: "POST", body: "0" });
  assertEquals(res.status, 200, await res.text());
}

/** The aws CLI as a seeding function: `(...args) => JSON` against one endpoint, in one region. */
export type AwsCall = (...a: string[]) => Promise<Record<string, unknown>>;

/** Where and how `seedCabalAccount` lays out Cabalmail's account; the rest is Cabalmail's own. */
export interface CabalAccount {
  cluster: string;
  region: string;
  /** default_tags environment=<env> (cabal-infra terraform/infra/main.tf's provider). */
  environment: string;
  /** The value /cabal/sinkhole_mode holds. */
  mode: string;
  /** What /cabal/deployed_image_tag/sinkhole holds (the deploy writes it; terraform/infra/main.tf makes it). */
  imageTag: string;
  /** How many smtp-out tasks run (moto starts none for a service). */
  mtaTasks: number;
}

/**
 * Cabalmail's account as its Terraform leaves it, for what ctl and the runbook touch (cabal-infra, cited):
 * the cluster on one EC2 container instance, the sinkhole tier and smtp-out, the mode and image-tag
 * parameters, their log groups, Cloud Map `sinkhole` in cabal.internal with one instance.
 */
export async function seedCabalAccount(aws: AwsCall, at: CabalAccount): Promise<void> {
  // The cluster with default_tags environment=<env> (terraform/infra/main.tf's provider; ecs module).
  await aws("ecs", "create-cluster", "--cluster-name", at.cluster, "--tags", `key=environment,value=${at.environment}`);
  const ec2 = await aws(
    "ec2",
    "run-instances",
    "--image-id",
    "ami-12c6146b",
    "--count",
    "1",
    "--instance-type",
    "t2.micro",
  );
  const instanceId = (ec2.Instances as { InstanceId: string }[])[0].InstanceId;
  const identity = JSON.stringify({ instanceId, region: at.region });
  await aws("ecs", "register-container-instance", "--cluster", at.cluster, "--instance-identity-document", identity);
  // The sinkhole tier (terraform/infra/modules/ecs/sinkhole.tf) running this project's image from cabal-sinkhole
  // (terraform/infra/modules/ecr/main.tf), and smtp-out. (bridge here: moto's awsvpc needs a network to place into.)
  const image = `123456789012.dkr.ecr.${at.region}.amazonaws.com/cabal-sinkhole:${at.imageTag}`;
  for (const [family, container, img] of [["cabal-sinkhole", "sinkhole", image], ["cabal-smtp-out", "smtp-out", "x"]]) {
    const containers = [{ name: container, image: img, memory: 128, portMappings: [{ containerPort: 25 }] }];
    await aws(
      "ecs",
      "register-task-definition",
      "--family",
      family,
      "--container-definitions",
      JSON.stringify(containers),
    );
    const service = ["--service-name", family, "--task-definition", family, "--desired-count", "1"];
    await aws("ecs", "create-service", "--cluster", at.cluster, ...service);
  }
  await startMtaTasks(aws, at.cluster, at.mtaTasks);
  // /cabal/sinkhole_mode (sinkhole.tf), the tag (terraform/infra/main.tf, written by the deploy), the log groups
  // (sinkhole.tf; smtp-out's in the ecs module).
  await aws("ssm", "put-parameter", "--name", PARAM, "--value", at.mode, "--type", "String");
  const tag = ["--value", at.imageTag, "--type", "String"];
  await aws("ssm", "put-parameter", "--name", "/cabal/deployed_image_tag/sinkhole", ...tag);
  for (const group of ["/ecs/cabal-sinkhole", "/ecs/cabal-smtp-out"]) {
    await aws("logs", "create-log-group", "--log-group-name", group);
  }
  // Cloud Map `sinkhole` in namespace cabal.internal (sinkhole.tf, service_discovery.tf).
  const vpc = await aws("ec2", "create-vpc", "--cidr-block", "10.9.0.0/16");
  const vpcId = (vpc.Vpc as { VpcId: string }).VpcId;
  await aws("servicediscovery", "create-private-dns-namespace", "--name", "cabal.internal", "--vpc", vpcId);
  const ns = await aws("servicediscovery", "list-namespaces");
  const dns = { NamespaceId: (ns.Namespaces as { Id: string }[])[0].Id, DnsRecords: [{ Type: "A", TTL: 10 }] };
  const config = JSON.stringify({ ...dns, RoutingPolicy: "MULTIVALUE" });
  const svc = await aws("servicediscovery", "create-service", "--name", "sinkhole", "--dns-config", config);
  const serviceId = (svc.Service as { Id: string }).Id;
  const attributes = ["--attributes", "AWS_INSTANCE_IPV4=10.9.0.5"];
  await aws(
    "servicediscovery",
    "register-instance",
    "--service-id",
    serviceId,
    "--instance-id",
    "sinkhole-task",
    ...attributes,
  );
}

/** What ECS does for the smtp-out service (moto does not): `count` running tasks of it. */
export function startMtaTasks(aws: AwsCall, cluster: string, count = 1): Promise<Record<string, unknown>> {
  const started = ["--count", String(count), "--started-by", "ecs-svc/cabal-smtp-out"];
  return aws("ecs", "run-task", "--cluster", cluster, "--task-definition", "cabal-smtp-out", ...started);
}
