/**
 * The SSM mode source with the real AWS SDK against moto_server, driven by the real aws CLI.
 * A small counting proxy sits between the listener and moto to count GetParameter calls
 * and to make the endpoint unreachable on demand.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { MAX_SESSIONS_CAP } from "../listener.ts";
import { eventually, type Listener, transaction } from "../rig/helpers.ts";
import { aws, awsTest, PARAM, putMode as put, ssmEnv } from "../rig/aws.ts";

const lastMode = (l: Listener) => l.logs.findLast((x) => x.event === "mode")?.mode;

awsTest(
  "ssm: aws ssm put-parameter flips a running listener at its next fetch; bad states keep the last good mode",
  async ({ moto, proxy, listen }) => {
    await put(moto.url, "defer");
    const l = await listen(ssmEnv(proxy.url, "1"));
    assertEquals(l.logs.find((x) => x.event === "start")?.mode, "defer");
    assertEquals(await transaction(l.port), [220, 250, 250, 421]);

    // How soon (within the TTL) is measured by `deno task bench`, not asserted here.
    await put(moto.url, "accept");
    await eventually(() => lastMode(l) === "accept");
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221]);

    await put(moto.url, "accept;rm -rf");
    const invalid = await l.waitForLog((x) => x.event === "mode_invalid");
    assertEquals(invalid.keeping, "accept");
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221]);

    await aws(moto.url, "delete-parameter", "--name", PARAM);
    const missing = await l.waitForLog((x) => x.event === "mode_error");
    assertMatch(String(missing.reason), /ParameterNotFound/);
    assertEquals(missing.keeping, "accept");
    await new Promise((ok) => setTimeout(ok, 2500)); // more fetches, each failing the same way
    assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221]);

    await put(moto.url, "bounce");
    await eventually(() => lastMode(l) === "bounce");
    assertEquals(l.logs.filter((x) => x.event === "mode_error").length, 1, "logged once, not once per fetch");
    assertEquals(l.logs.filter((x) => x.event === "mode_invalid").length, 1);
    await proxy.down();
    const unreachable = await l.waitFor("mode_error", (x) => !/ParameterNotFound/.test(x.reason));
    assertEquals(unreachable.keeping, "bounce");
    assertEquals(await transaction(l.port), [220, 250, 250, 550, 554, 221], "sessions keep the last good mode");
  },
);

/** Sessions a wave opens at once: well under half the highest session cap. */
const WAVE = 250;
if (2 * WAVE >= MAX_SESSIONS_CAP) throw new Error("two waves must fit under the cap");

awsTest(
  "ssm: waves of concurrent connections cost at most one GetParameter per TTL",
  async ({ moto, proxy, listen }) => {
    await put(moto.url, "accept");
    // The cap holds two waves: the previous wave's sessions may still be closing when the next one connects.
    const l = await listen({ ...ssmEnv(proxy.url, "1"), SINKHOLE_MAX_SESSIONS: String(MAX_SESSIONS_CAP) });
    const before = proxy.count;
    const t0 = Date.now();
    const results: number[][] = [];
    // Waves of WAVE concurrent sessions for at least 3.5 TTLs (bounded to 40 waves).
    for (let w = 0; w < 40 && Date.now() - t0 < 3500; w++) {
      results.push(...await Promise.all(Array.from({ length: WAVE }, () => transaction(l.port))));
    }
    const elapsed = Date.now() - t0;
    const calls = proxy.count - before;
    const allowed = Math.ceil(elapsed / 1000) + 1;
    console.log(`ssm: ${results.length} sessions in ${elapsed} ms made ${calls} GetParameter calls (TTL 1 s)`);
    assert(results.every((c) => c.at(-2) === 250), "every session was accepted");
    assert(calls <= allowed, `${calls} calls in ${elapsed} ms, at most ${allowed} allowed`);
    assert(calls >= 1, "the mode was refreshed from SSM during the run");
  },
);
