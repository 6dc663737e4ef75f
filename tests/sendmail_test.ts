/**
 * Real sendmail end to end: the reason this project exists.
 *
 * A private sendmail (tests/sendmail.ts) routes `sinkhole.test` to the listener on
 * 127.0.0.2:25 and `origin.test` (the sender's domain, where bounces go) to a second
 * listener on 127.0.0.3:25. The mailertable lines have no port, as in production.
 */
import { assert, assertEquals, assertMatch } from "./assert.ts";
import {
  assertTools,
  eventually,
  freePort,
  type Listener,
  needs,
  startListener,
  tempModeFile,
  transaction,
} from "./helpers.ts";
import { makeSendmail, ORIGIN_IP, SINKHOLE_IP } from "./sendmail.ts";

const queued = (mailq: string) => Number(/Total requests: (\d+)/.exec(mailq)?.[1] ?? "0");

const tools = needs("/usr/sbin/sendmail", "makemap", "m4", "unshare", "/usr/share/sendmail/cf/m4/cf.m4");
const isRoot = Deno.uid() === 0;

Deno.test({
  name: "sendmail: defer queues, survives the MTA's replacement, accept delivers; bounce bounces; greylist retries",
  ignore: tools.ignore || (!isRoot && !Deno.env.get("CI")),
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    assertTools(tools.missing);
    assert(isRoot, "the sendmail suite binds 127.0.0.2:25 and uses namespaces: run it as root (CI does)");
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-sendmail-" });
    const modeFile = await tempModeFile("defer");
    const mta = await makeSendmail(dir, freePort());
    let sink: Listener | undefined;
    let origin: Listener | undefined;
    const submit = (to: string, subject: string) =>
      transaction(mta.port, { from: "tester@origin.test", to: [to], body: `Subject: ${subject}\r\n\r\nqueue test` });
    const sinkSessions = () => sink!.logs.filter((x) => x.event === "session");
    try {
      sink = await startListener(
        { SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2" },
        { host: SINKHOLE_IP, port: 25 },
      );
      origin = await startListener({ SINKHOLE_MODE: "accept-log" }, { host: ORIGIN_IP, port: 25 });
      const firstPid = await mta.start();

      await t.step("defer: the message is queued with the 421", async () => {
        assertEquals((await submit("anything@sinkhole.test", "defer phase")).at(-2), 250, "sendmail took it");
        await eventually(() => sinkSessions().length >= 1, 20_000);
        const [tx] = sinkSessions()[0].transactions as { rcpts: { to: string; code: number }[] }[];
        assertEquals(tx.rcpts, [{ to: "anything@sinkhole.test", code: 421 }]);
        let mailq = "";
        await eventually(async () => /Deferred: 421 4\.3\.2/.test(mailq = await mta.mailq()), 20_000, 200);
        assertEquals(queued(mailq), 1);
        assertMatch(mailq, /anything@sinkhole\.test/);
      });

      await t.step("replace the MTA: kill it, start a new one on the same spool", async () => {
        const killed = await mta.kill();
        assertEquals(killed, firstPid);
        assert(!mta.alive(firstPid));
        const secondPid = await mta.start();
        assert(secondPid !== firstPid, "a new process");
        assertEquals(queued(await mta.mailq()), 1, "the queue was handed over");
      });

      await t.step("accept: a queue run delivers it and the queue is empty", async () => {
        await Deno.writeTextFile(modeFile, "accept\n");
        await sink!.waitForLog((x) => x.event === "mode" && x.mode === "accept");
        const out = await mta.queueRun();
        assertMatch(out, /<anything@sinkhole\.test>\.\.\. Sent \(Message accepted and discarded\)/);
        assertEquals(queued(await mta.mailq()), 0);
        const delivered = sinkSessions().at(-1)!.transactions as { rcpts: { code: number }[]; result: number }[];
        assertEquals(delivered[0].result, 250);
      });

      await t.step("bounce: a bounce to the sender, not a queued message", async () => {
        await Deno.writeTextFile(modeFile, "bounce\n");
        await sink!.waitForLog((x) => x.event === "mode" && x.mode === "bounce");
        assertEquals((await submit("nobody@sinkhole.test", "bounce phase")).at(-2), 250);
        const dsn = await origin!.waitForLog((x) => x.event === "message", 20_000);
        assertEquals(dsn.from, "", "a DSN has the null sender");
        assertEquals(dsn.rcpts, ["tester@origin.test"]);
        assert((dsn.headers as string[]).some((h) => /^Subject: Returned mail/.test(h)), JSON.stringify(dsn.headers));
        await eventually(async () => queued(await mta.mailq()) === 0, 10_000, 200);
      });

      await t.step("greylist: queued at the first attempt, delivered at the next queue run", async () => {
        await Deno.writeTextFile(modeFile, "greylist\n");
        await sink!.waitForLog((x) => x.event === "mode" && x.mode === "greylist");
        const before = sinkSessions().length;
        assertEquals((await submit("grey@sinkhole.test", "greylist phase")).at(-2), 250);
        let mailq = "";
        await eventually(async () => /Deferred: 451 4\.7\.1 Greylisted/.test(mailq = await mta.mailq()), 20_000, 200);
        assertEquals(queued(mailq), 1);
        assert(sinkSessions().length > before);
        const out = await mta.queueRun();
        assertMatch(out, /<grey@sinkhole\.test>\.\.\. Sent/);
        assertEquals(queued(await mta.mailq()), 0);
      });
    } finally {
      await mta.kill().catch(() => {});
      await sink?.stop();
      await origin?.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      await Deno.remove(modeFile).catch(() => {});
    }
  },
});
