/**
 * Fault injection on the SSM mode source (real SDK, moto behind a fault-injecting proxy):
 * the listener keeps serving with the last good mode and logs each change of state once.
 */
import { assert, assertEquals, assertMatch } from "./assert.ts";
import { eventually, type Listener, type LogLine, transaction } from "./helpers.ts";
import { aws, awsTest, type Fault, PARAM, putMode, ssmEnv } from "./aws.ts";
import { MODE_FETCH_TIMEOUT_MS } from "../listener.ts";

const ACCEPTED = [220, 250, 250, 250, 354, 250, 221];
const TTL_MS = 300;

const errors = (l: Listener) => l.logs.filter((x) => x.event === "mode_error");
const sleep = (ms: number) => new Promise((ok) => setTimeout(ok, ms));

awsTest(
  "faults: hang, 5xx, throttling, access denied, deleted parameter: last good mode kept, each logged once",
  async ({ moto, proxy, listen }, t) => {
    await putMode(moto.url, "accept");
    const l = await listen(ssmEnv(proxy.url, String(TTL_MS / 1000)));
    assertEquals(l.logs.find((x) => x.event === "start")?.mode, "accept");

    const inject = async (fault: Fault, reason: RegExp, waitMs: number) => {
      const before = errors(l).length;
      proxy.state.fault = fault;
      const line: LogLine = await l.waitForLog(
        (x) => x.event === "mode_error" && reason.test(String(x.reason)),
        waitMs,
      );
      assertEquals(line.keeping, "accept");
      // Sessions are served at once, in the last good mode, while the fault lasts.
      const t0 = Date.now();
      assertEquals(await transaction(l.port), ACCEPTED);
      assert(Date.now() - t0 < 1000, "the fault does not stall sessions");
      await sleep(TTL_MS * 4);
      assertEquals(errors(l).length, before + 1, `${fault}: one line for the change of state, not one per fetch`);
    };

    await t.step(
      "an endpoint that never answers is abandoned after the fetch timeout",
      () => inject("hang", new RegExp(`no answer in ${MODE_FETCH_TIMEOUT_MS} ms`), MODE_FETCH_TIMEOUT_MS * 3),
    );
    await t.step("5xx", () => inject("5xx", /InternalServerError/, 10_000));
    await t.step("throttling", () => inject("throttle", /ThrottlingException/, 10_000));
    await t.step("access denied", () => inject("deny", /AccessDeniedException/, 10_000));

    await t.step("recovery is logged once, as a mode line", async () => {
      proxy.state.fault = "none";
      await l.waitForLog((x) => x.event === "mode" && x.previous === "accept");
      await sleep(TTL_MS * 4);
      assertEquals(l.logs.filter((x) => x.event === "mode").length, 2, "start, then recovery");
    });

    await t.step("parameter deleted while running", async () => {
      await aws(moto.url, "delete-parameter", "--name", PARAM);
      const line = await l.waitForLog((x) => x.event === "mode_error" && /ParameterNotFound/.test(String(x.reason)));
      assertEquals(line.keeping, "accept");
      assertEquals(await transaction(l.port), ACCEPTED);
    });

    await t.step("slow SSM: sessions never wait for it", async () => {
      await putMode(moto.url, "bounce");
      proxy.state.delayMs = 2000;
      const t0 = Date.now();
      for (let i = 0; i < 10; i++) await transaction(l.port);
      assert(Date.now() - t0 < 2000, "ten sessions finished while one fetch was still waiting");
      await l.waitForLog((x) => x.event === "mode" && x.mode === "bounce", 10_000);
      proxy.state.delayMs = 0;
    });
  },
);

awsTest("faults: no credentials: defer kept, logged once, no request sent", async ({ moto, proxy, listen }) => {
  const nowhere = await Deno.makeTempDir({ prefix: "sinkhole-nocreds-" });
  try {
    await putMode(moto.url, "accept");
    const l = await listen({
      ...ssmEnv(proxy.url, "0.3"),
      AWS_ACCESS_KEY_ID: "",
      AWS_SECRET_ACCESS_KEY: "",
      AWS_SESSION_TOKEN: "",
      AWS_PROFILE: "",
      AWS_CONFIG_FILE: `${nowhere}/config`,
      AWS_SHARED_CREDENTIALS_FILE: `${nowhere}/credentials`,
      AWS_CONTAINER_CREDENTIALS_RELATIVE_URI: "",
      AWS_CONTAINER_CREDENTIALS_FULL_URI: "",
      AWS_WEB_IDENTITY_TOKEN_FILE: "",
      AWS_EC2_METADATA_DISABLED: "true",
    });
    const line = await l.waitForLog((x) => x.event === "mode_error");
    assertMatch(String(line.reason), /credentials/i);
    assertEquals(line.keeping, "defer");
    assertEquals(await transaction(l.port), [220, 250, 250, 421]);
    await sleep(1500);
    assertEquals(errors(l).length, 1);
    assertEquals(proxy.count, 0, "nothing was sent without credentials");
  } finally {
    await Deno.remove(nowhere, { recursive: true });
  }
});

awsTest("faults: SSM failing at start: defer, and the first good answer switches", async ({ moto, proxy, listen }) => {
  await putMode(moto.url, "accept");
  proxy.state.fault = "5xx";
  const l = await listen(ssmEnv(proxy.url, "0.3"));
  assertEquals(l.logs.find((x) => x.event === "start")?.mode, "defer", "defer before any good answer");
  assertEquals(await transaction(l.port), [220, 250, 250, 421]);
  proxy.state.fault = "none";
  await l.waitForLog((x) => x.event === "mode" && x.mode === "accept");
  await eventually(async () => (await transaction(l.port)).at(-2) === 250);
});
