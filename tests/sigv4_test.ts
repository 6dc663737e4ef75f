/**
 * The listener's own SSM client (Signature Version 4 signed with Web Crypto, no SDK),
 * checked by a verifier that is not ours: moto with authentication on
 * (INITIAL_NO_AUTH_ACTION_COUNT) recomputes every signature with botocore's signer and
 * evaluates IAM policies, as AWS does. Credentials come from the environment or, as in
 * an ECS task, from the container credentials endpoint; that endpoint is the ECS agent's
 * and cannot run here, so a loopback HTTP server stands in for it, serving temporary
 * credentials that moto's STS issued.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, needs, transaction } from "../rig/helpers.ts";
import { AWS_ENV, awsCliAs, PARAM, ssmEnv, startMoto } from "../rig/aws.ts";
import { startListener } from "../rig/helpers.ts";
import { credentialChain, signV4 } from "../listener.ts";

const tools = needs("moto_server", "aws");
/** Requests moto serves before it checks signatures and policies: the set-up below, as root. */
const SETUP_ACTIONS = 7;
const ACCEPTED = [220, 250, 250, 250, 354, 250, 221];

const READ_MODE_POLICY = JSON.stringify({
  Version: "2012-10-17",
  Statement: [{ Effect: "Allow", Action: "ssm:GetParameter", Resource: "*" }],
});
const TRUST_ANYONE = JSON.stringify({
  Version: "2012-10-17",
  Statement: [{ Effect: "Allow", Principal: { AWS: "*" }, Action: "sts:AssumeRole" }],
});

Deno.test({
  name: "sigv4: moto with authentication on accepts the listener's signature (keys and a task role's)",
  ignore: tools.ignore,
  fn: async (t) => {
    assertTools(tools.missing);
    const moto = await startMoto({ INITIAL_NO_AUTH_ACTION_COUNT: String(SETUP_ACTIONS) });
    const as = (env: Record<string, string>, ...args: string[]) => awsCliAs(env, moto.url, ...args);
    const root = {};
    try {
      // The set-up: exactly SETUP_ACTIONS requests, before authentication starts.
      await as(root, "ssm", "put-parameter", "--name", PARAM, "--value", "accept", "--type", "String");
      await as(root, "iam", "create-user", "--user-name", "sinkhole");
      const key = (await as(root, "iam", "create-access-key", "--user-name", "sinkhole")).AccessKey as Record<
        string,
        string
      >;
      await as(
        root,
        "iam",
        "put-user-policy",
        "--user-name",
        "sinkhole",
        "--policy-name",
        "read-mode",
        "--policy-document",
        READ_MODE_POLICY,
      );
      await as(
        root,
        "iam",
        "create-role",
        "--role-name",
        "sinkhole-task",
        "--assume-role-policy-document",
        TRUST_ANYONE,
      );
      await as(
        root,
        "iam",
        "put-role-policy",
        "--role-name",
        "sinkhole-task",
        "--policy-name",
        "read-mode",
        "--policy-document",
        READ_MODE_POLICY,
      );
      const keys = { AWS_ACCESS_KEY_ID: key.AccessKeyId, AWS_SECRET_ACCESS_KEY: key.SecretAccessKey };
      const role = (await as(
        keys,
        "sts",
        "assume-role",
        "--role-arn",
        "arn:aws:iam::123456789012:role/sinkhole-task",
        "--role-session-name",
        "task",
      )).Credentials as Record<string, string>;

      await t.step("moto now refuses a wrong signature (so the steps below prove something)", async () => {
        const wrong = { ...keys, AWS_SECRET_ACCESS_KEY: "not-the-secret" };
        const res = await as(wrong, "ssm", "get-parameter", "--name", PARAM).catch((e) => String(e));
        assertMatch(String(res), /SignatureDoesNotMatch/);
      });

      await t.step("keys in the environment: the mode is read", async () => {
        const l = await startListener({ ...ssmEnv(moto.url), ...keys });
        try {
          assertEquals(l.logs.find((x) => x.event === "start")?.mode, "accept");
          assertEquals(await transaction(l.port), ACCEPTED);
        } finally {
          await l.stop();
        }
      });

      await t.step("a wrong secret: SignatureDoesNotMatch logged, defer kept", async () => {
        const l = await startListener({ ...ssmEnv(moto.url), ...keys, AWS_SECRET_ACCESS_KEY: "not-the-secret" });
        try {
          const error = await l.waitFor("mode_error");
          assertMatch(String(error.reason), /SignatureDoesNotMatch/);
          assertEquals(error.keeping, "defer");
        } finally {
          await l.stop();
        }
      });

      await t.step("a task role: temporary credentials from the container endpoint, with its token", async () => {
        const token = crypto.randomUUID();
        let served = 0;
        const agent = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
          if (req.headers.get("authorization") !== token) return new Response("no", { status: 401 });
          served++;
          return Response.json({
            AccessKeyId: role.AccessKeyId,
            SecretAccessKey: role.SecretAccessKey,
            Token: role.SessionToken,
            Expiration: role.Expiration,
          });
        });
        const env = {
          ...ssmEnv(moto.url),
          AWS_ACCESS_KEY_ID: "",
          AWS_SECRET_ACCESS_KEY: "",
          AWS_CONTAINER_CREDENTIALS_FULL_URI: `http://127.0.0.1:${agent.addr.port}/v2/credentials/task`,
          AWS_CONTAINER_AUTHORIZATION_TOKEN: token,
        };
        const l = await startListener(env);
        try {
          assertEquals(l.logs.find((x) => x.event === "start")?.mode, "accept");
          assertEquals(await transaction(l.port), ACCEPTED);
          assert(served >= 1);
        } finally {
          await l.stop();
          await agent.shutdown();
        }
      });
    } finally {
      await moto.close();
    }
  },
});

Deno.test("sigv4: the AWS documentation's example request signs to its published signature", async () => {
  // AWS's "Signature Version 4 test suite", case post-vanilla: POST / to example.amazonaws.com,
  // service "service", region us-east-1, 2015-08-30T12:36:00Z, no body (the signer only POSTs).
  const headers = await signV4(
    {
      url: new URL("https://example.amazonaws.com/"),
      headers: {},
      body: "",
      service: "service",
      region: "us-east-1",
    },
    { accessKeyId: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY" },
    new Date("2015-08-30T12:36:00Z"),
  );
  assertEquals(
    headers.authorization,
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, " +
      "SignedHeaders=host;x-amz-date, " +
      "Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
  );
});

Deno.test("sigv4: credentials — the environment first, no source is a clear error, no request sent", async () => {
  const none = credentialChain(() => undefined);
  const err = await none(new AbortController().signal).then(() => undefined, (e: Error) => e.message);
  assertMatch(String(err), /no AWS credentials: set AWS_ACCESS_KEY_ID/);
  const env: Record<string, string> = { ...AWS_ENV, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI: "/never" };
  const fromEnv = await credentialChain((k) => env[k])(new AbortController().signal);
  assertEquals(fromEnv.accessKeyId, "testing");
  const plain = credentialChain((k) => ({ AWS_CONTAINER_CREDENTIALS_FULL_URI: "http://198.51.100.7/creds" })[k]);
  const refused = await plain(new AbortController().signal).then(() => undefined, (e: Error) => e.message);
  assertMatch(String(refused), /plain HTTP must name loopback or the ECS agent/);
});
