/**
 * Fault injection on the SSM mode source (real SDK, moto behind a fault-injecting proxy):
 * the listener keeps serving with the last good mode and logs each change of state once.
 */
import { assertEquals, assertMatch } from "../rig/assert.ts";
import { eventually, type Listener, transaction } from "../rig/helpers.ts";
import { aws, awsTest, type Fault, PARAM, putMode, ssmEnv } from "../rig/aws.ts";
import { MODE_FETCH_TIMEOUT_MS } from "../listener.ts";

const ACCEPTED = [220, 250, 250, 250, 354, 250, 221];
const TTL_MS = 300;

/**
 * How long a fault may take to show in the log: a hang guard. A fault that follows a hang
 * first waits out the hung fetch (MODE_FETCH_TIMEOUT_MS), then the SDK's own retries.
 */
const FAULT_SEEN_WITHIN_MS = 60_000;

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
      const line = await l.waitFor("mode_error", (x) => reason.test(x.reason), waitMs);
      assertEquals(line.keeping, "accept");
      // Sessions are served in the last good mode while the fault lasts (that they never
      // wait for a fetch is the "slow SSM" step's proof).
      assertEquals(await transaction(l.port), ACCEPTED);
      await sleep(TTL_MS * 4);
      assertEquals(errors(l).length, before + 1, `${fault}: one line for the change of state, not one per fetch`);
    };

    await t.step(
      "an endpoint that never answers is abandoned after the fetch timeout",
      () => inject("hang", new RegExp(`no answer in ${MODE_FETCH_TIMEOUT_MS} ms`), FAULT_SEEN_WITHIN_MS),
    );
    await t.step("5xx", () => inject("5xx", /InternalServerError/, FAULT_SEEN_WITHIN_MS));
    await t.step("throttling", () => inject("throttle", /ThrottlingException/, FAULT_SEEN_WITHIN_MS));
    await t.step("access denied", () => inject("deny", /AccessDeniedException/, FAULT_SEEN_WITHIN_MS));

    await t.step("recovery is logged once, as a mode line", async () => {
      proxy.state.fault = "none";
      await l.waitForLog((x) => x.event === "mode" && x.previous === "accept");
      await sleep(TTL_MS * 4);
      assertEquals(l.logs.filter((x) => x.event === "mode").length, 2, "start, then recovery");
    });

    await t.step("parameter deleted while running", async () => {
      await aws(moto.url, "delete-parameter", "--name", PARAM);
      const line = await l.waitFor("mode_error", (x) => /ParameterNotFound/.test(x.reason));
      assertEquals(line.keeping, "accept");
      assertEquals(await transaction(l.port), ACCEPTED);
    });

    await t.step("slow SSM: sessions never wait for it", async () => {
      // A fetch is held at the proxy, unanswered, for as long as the sessions take: they
      // are served in the last good mode, and only then is the new mode let through.
      const timeouts = () => errors(l).filter((x) => /no answer in/.test(String(x.reason))).length;
      const timedOutBefore = timeouts();
      proxy.hold();
      await eventually(() => proxy.held > 0);
      await putMode(moto.url, "bounce"); // straight to moto: the held fetch will read it when let through
      for (let i = 0; i < 10; i++) assertEquals(await transaction(l.port), ACCEPTED, "the last good mode");
      // The held fetch was still outstanding: the listener had not given up on it (it gives
      // up after MODE_FETCH_TIMEOUT_MS, a hundred times what ten sessions take).
      assertEquals(timeouts(), timedOutBefore, "the sessions did not wait out the fetch");
      proxy.release();
      await l.waitForLog((x) => x.event === "mode" && x.mode === "bounce");
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
