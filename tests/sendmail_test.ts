/**
 * Real sendmail end to end: the reason this project exists.
 *
 * A private sendmail (tests/sendmail.ts) routes `sinkhole.test` to the listener and
 * `origin.test` (the sender's domain, where bounces go) to a second listener, each on
 * port 25 of a loopback address of this run's own. The mailertable lines have no port,
 * as in production.
 */
import { assert, assertEquals, assertMatch } from "./assert.ts";
import {
  assertTools,
  type EventOf,
  eventually,
  type Listener,
  needs,
  REPLY_WAIT_MS,
  startListener,
  tempModeFile,
  transaction,
} from "./helpers.ts";
import { makeSendmail, rigAddresses, rigMailertable, SMTP_PORT } from "./sendmail.ts";

const queued = (mailq: string) => Number(/Total requests: (\d+)/.exec(mailq)?.[1] ?? "0");

const tools = needs("/usr/sbin/sendmail", "makemap", "m4", "unshare", "/usr/share/sendmail/cf/m4/cf.m4");
const isRoot = Deno.uid() === 0;

type Tx = { rcpts: { to: string; code: number }[]; result?: number; size?: number };

/** The MTA, the sinkhole (mode from a file) and the sender's domain (accept-log), for one test. */
interface Rig {
  mta: Awaited<ReturnType<typeof makeSendmail>>;
  sink: Listener;
  origin: Listener;
  /** Writes the mode file and waits until the sinkhole logged it. */
  setMode(mode: string): Promise<void>;
  /** Restarts the sinkhole with more environment (e.g. STARTTLS on). */
  restartSink(env: Record<string, string>): Promise<void>;
  /** Submits a message to the MTA over SMTP, as an application would. */
  submit(to: string[], subject: string): Promise<number[]>;
  sessions(): EventOf<"session">[];
  /** The sinkhole session that saw a recipient, the latest. */
  sessionFor(rcpt: string): EventOf<"session"> | undefined;
}

function mtaTest(name: string, initialMode: string, fn: (rig: Rig, t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name,
    ignore: tools.ignore || (!isRoot && !Deno.env.get("CI")),
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async (t) => {
      assertTools(tools.missing);
      assert(isRoot, "the sendmail suite binds port 25 and uses namespaces: run it as root (CI does)");
      const dir = await Deno.makeTempDir({ prefix: "sinkhole-sendmail-" });
      const modeFile = await tempModeFile(initialMode);
      const at = rigAddresses();
      const mta = await makeSendmail(dir, at.mta, rigMailertable(at));
      const startSink = (env: Record<string, string> = {}) =>
        startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2", ...env }, {
          host: at.sink,
          port: SMTP_PORT,
        });
      let sink: Listener | undefined;
      let origin: Listener | undefined;
      try {
        sink = await startSink();
        origin = await startListener({ SINKHOLE_MODE: "accept-log" }, { host: at.origin, port: SMTP_PORT });
        const sessions = () => sink!.events("session");
        const rig: Rig = {
          mta,
          get sink() {
            return sink!;
          },
          origin,
          setMode: async (mode) => {
            await Deno.writeTextFile(modeFile, `${mode}\n`);
            await eventually(() => sink!.logs.findLast((x) => x.event === "mode")?.mode === mode);
          },
          restartSink: async (env) => {
            await sink!.stop();
            sink = await startSink(env);
          },
          submit: (to, subject) =>
            transaction(mta.port, {
              host: mta.host,
              from: "tester@origin.test",
              to,
              body: `Subject: ${subject}\r\n\r\ntest`,
            }),
          sessions,
          sessionFor: (rcpt) =>
            sessions().findLast((s) => (s.transactions as Tx[]).some((tx) => tx.rcpts.some((r) => r.to === rcpt))),
        };
        await fn(rig, t);
      } finally {
        await mta.kill().catch(() => {});
        await sink?.stop();
        await origin?.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
        await Deno.remove(modeFile).catch(() => {});
      }
    },
  });
}

mtaTest(
  "sendmail: defer queues, survives the MTA's replacement, accept delivers; bounce bounces; greylist retries",
  "defer",
  async ({ mta, origin, setMode, submit, sessions }, t) => {
    const firstPid = await mta.start();

    await t.step("defer: the message is queued with the 421", async () => {
      assertEquals((await submit(["anything@sinkhole.test"], "defer phase")).at(-2), 250, "sendmail took it");
      await eventually(() => sessions().length >= 1);
      const [tx] = sessions()[0].transactions as Tx[];
      assertEquals(tx.rcpts, [{ to: "anything@sinkhole.test", code: 421 }]);
      let mailq = "";
      await eventually(async () => /Deferred: 421 4\.3\.2/.test(mailq = await mta.mailq()), REPLY_WAIT_MS, 200);
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
      await setMode("accept");
      // Whichever run delivers it (a forced one, or the new MTA's start-up run if it was still
      // going when the mode changed), the sinkhole saw it accepted and the queue is empty.
      const accepted = () =>
        sessions().some((s) =>
          (s.transactions as Tx[]).some((tx) =>
            tx.result === 250 && tx.rcpts.some((r) => r.to === "anything@sinkhole.test" && r.code === 250)
          )
        );
      await mta.queueRunsUntil(async () => queued(await mta.mailq()) === 0);
      await eventually(accepted);
    });

    await t.step("bounce: a bounce to the sender, not a queued message", async () => {
      await setMode("bounce");
      assertEquals((await submit(["nobody@sinkhole.test"], "bounce phase")).at(-2), 250);
      const dsn = await origin.waitForLog((x) => x.event === "message");
      assertEquals(dsn.from, "", "a DSN has the null sender");
      assertEquals(dsn.rcpts, ["tester@origin.test"]);
      assert((dsn.headers as string[]).some((h) => /^Subject: Returned mail/.test(h)), JSON.stringify(dsn.headers));
      await eventually(async () => queued(await mta.mailq()) === 0, REPLY_WAIT_MS, 200);
    });

    await t.step("greylist: queued at the first attempt, delivered at the next queue run", async () => {
      await setMode("greylist");
      const before = sessions().length;
      assertEquals((await submit(["grey@sinkhole.test"], "greylist phase")).at(-2), 250);
      let mailq = "";
      await eventually(
        async () => /Deferred: 451 4\.7\.1 Greylisted/.test(mailq = await mta.mailq()),
        REPLY_WAIT_MS,
        200,
      );
      assertEquals(queued(mailq), 1);
      await eventually(() => sessions().length > before); // the first attempt's session line is read
      const { output } = await mta.queueRunsUntil(async () => queued(await mta.mailq()) === 0);
      assertMatch(output, /<grey@sinkhole\.test>\.\.\. Sent/);
    });
  },
);

mtaTest(
  "sendmail: per-recipient outcomes in one message; a 451 at end of data keeps the message queued",
  "accept",
  async ({ mta, origin, setMode, submit, sessions, sessionFor }, t) => {
    await mta.start();

    await t.step("delivered, bounced and queued recipients from one message", async () => {
      const to = ["accept+1@sinkhole.test", "bounce+2@sinkhole.test", "defer+3@sinkhole.test"];
      assertEquals((await submit(to, "mix")).at(-2), 250, "sendmail took it");
      let mailq = "";
      await eventually(
        async () => {
          mailq = await mta.mailq();
          return /defer\+3@sinkhole\.test/.test(mailq) && !/accept\+1|bounce\+2/.test(mailq);
        },
        REPLY_WAIT_MS,
        200,
      );
      assertEquals(queued(mailq), 1, "one queue entry, for the deferred recipient only");
      // mailq shows the envelope's last status (here the bounced recipient's "User unknown"); the
      // sinkhole's log says what the deferred recipient got (once its session line is read).
      const rcpts = () => sessions().flatMap((s) => (s.transactions as Tx[]).flatMap((tx) => tx.rcpts));
      await eventually(() => rcpts().some((r) => r.to === "defer+3@sinkhole.test"));
      assert(rcpts().some((r) => r.to === "defer+3@sinkhole.test" && r.code === 451), JSON.stringify(rcpts()));
      const dsn = await origin.waitForLog((x) => x.event === "message");
      assertEquals(dsn.rcpts, ["tester@origin.test"], "the bounced recipient produced a DSN");
      await eventually(() => sessionFor("accept+1@sinkhole.test") !== undefined);
      const delivered = (sessionFor("accept+1@sinkhole.test")!.transactions as Tx[]).some((tx) =>
        tx.result === 250 && tx.rcpts.some((r) => r.to === "accept+1@sinkhole.test" && r.code === 250)
      );
      assert(delivered, "accept+1 was delivered");
    });

    await t.step("a 451 at end of data, after the body, keeps the message queued", async () => {
      await setMode('defer at=eod reply="451 4.3.0 Queue full"');
      const before = queued(await mta.mailq());
      await submit(["eod@sinkhole.test"], "eod");
      let mailq = "";
      await eventually(
        async () => /Deferred: 451 4\.3\.0 Queue full/.test(mailq = await mta.mailq()),
        REPLY_WAIT_MS,
        200,
      );
      assertEquals(queued(mailq), before + 1);
      await eventually(() => sessionFor("eod@sinkhole.test") !== undefined); // its line may still be in the pipe
      const [tx] = sessionFor("eod@sinkhole.test")!.transactions as Tx[];
      assert(tx.size! > 0 && tx.result === 451, "the whole body was sent before the 451");
    });
  },
);

mtaTest(
  "sendmail and STARTTLS: refused (454) falls back to plain text; broken (220, close) stays queued; on delivers over TLS",
  "accept starttls=refuse",
  async (rig, t) => {
    const { mta, setMode, submit, sessionFor } = rig;
    const sink = () => rig.sink;
    await mta.start();

    await t.step("refused with 454: sendmail goes on in plain text and delivers", async () => {
      await submit(["refused@sinkhole.test"], "tls");
      await eventually(() => sessionFor("refused@sinkhole.test") !== undefined);
      const s = sessionFor("refused@sinkhole.test")!;
      assert((s.replies as number[]).includes(454), JSON.stringify(s.replies));
      assertEquals((s.transactions as Tx[])[0].result, 250);
      assertEquals(s.tls, undefined, "plain text");
      await eventually(async () => queued(await mta.mailq()) === 0, REPLY_WAIT_MS, 200);
    });

    await t.step("broken after 220: sendmail defers (454 4.7.0 TLS handshake failed) and keeps it queued", async () => {
      await setMode("accept starttls=break");
      await submit(["broken@sinkhole.test"], "tls");
      let mailq = "";
      await eventually(async () => /TLS handshake failed/.test(mailq = await mta.mailq()), REPLY_WAIT_MS, 200);
      assertEquals(queued(mailq), 1);
      const { output } = await mta.queueRunsUntil((out) => /Deferred: 454/.test(out));
      assertMatch(output, /Deferred: 454 4\.7\.0 TLS handshake failed/, "and again at the next queue run");
      assertEquals(queued(await mta.mailq()), 1);
    });

    await t.step("on: sendmail upgrades with STARTTLS and delivers", async () => {
      await setMode("accept");
      await rig.restartSink({ SINKHOLE_STARTTLS: "on" });
      const { output } = await mta.queueRunsUntil(async () => queued(await mta.mailq()) === 0);
      assertMatch(output, />>> STARTTLS\n220 2\.0\.0 Ready to start TLS/);
      assertMatch(output, /<broken@sinkhole\.test>\.\.\. Sent/);
      const deliveredBroken = () =>
        sink().events("session").find((s) =>
          s.transactions.some((tx) => tx.result === 250 && tx.rcpts.some((r) => r.to === "broken@sinkhole.test"))
        );
      await eventually(() => deliveredBroken() !== undefined);
      assertEquals(deliveredBroken()!.tls, true, "the delivery ran over TLS");
    });
  },
);
