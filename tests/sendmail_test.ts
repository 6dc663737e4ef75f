/**
 * Real sendmail end to end: the reason this project exists.
 *
 * A private sendmail (tests/sendmail.ts) routes `sinkhole.test` to the listener and
 * `origin.test` (the sender's domain, where bounces go) to a second listener, each on
 * port 25 of a loopback address of this run's own. The mailertable lines have no port,
 * as in production.
 */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import {
  assertTools,
  type EventOf,
  eventually,
  type Listener,
  logsFile,
  needs,
  REPLY_WAIT_MS,
  runCtl,
  startListener,
  tempModeFile,
  transaction,
} from "../rig/helpers.ts";
import { makeSendmail, rigAddresses, rigMailertable, SMTP_PORT } from "../rig/sendmail.ts";

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

function mtaTest(
  name: string,
  initialMode: string,
  fn: (rig: Rig, t: Deno.TestContext) => Promise<void>,
  opts: { datafinal?: string } = {},
): void {
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
      const mta = await makeSendmail(dir, at.mta, rigMailertable(at), opts);
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

/** The daemon's queue interval in the ledger test: short, so a retry comes every few seconds. */
const QUEUE_INTERVAL_S = 5;
/** How far a retry may stray from the queue interval on a busy machine: a queue run waits for the one before. */
const INTERVAL_TOLERANCE: [number, number] = [QUEUE_INTERVAL_S * 0.5, QUEUE_INTERVAL_S * 4];
/** A hang guard for a message's whole history (several queue runs), generous on a busy machine. */
const HISTORY_WITHIN_MS = 180_000;

mtaTest(
  "sendmail: the retry ledger sees each attempt: defer twice then accept, a lost final reply, an outage into a bounce",
  "defer first=2",
  async ({ mta, sink, origin, setMode, submit }, t) => {
    await mta.start(`${QUEUE_INTERVAL_S}s`);
    const attempts = (rcpt: string) => sink.events("attempt").filter((a) => a.rcpt === rcpt);
    const ledger = () => logsFile(sink.logs);
    const ctl = (...args: string[]) => runCtl(args);

    await t.step(
      `defer first=2: three attempts, ${QUEUE_INTERVAL_S} s apart (sendmail's queue runs), delivered once`,
      async () => {
        const rcpt = "twice@sinkhole.test";
        assertEquals((await submit([rcpt], "twice")).at(-2), 250);
        await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.code === 250, HISTORY_WITHIN_MS);
        assertEquals(attempts(rcpt).map((a) => [a.attempt, a.code]), [[1, 421], [2, 421], [3, 250]]);
        const file = await ledger();
        try {
          const interval = `${INTERVAL_TOLERANCE[0]}..${INTERVAL_TOLERANCE[1]}`;
          // The first retry comes at the first queue run after the submission (anywhere up to one
          // interval later); the second a whole interval after it.
          const second = attempts(rcpt)[2];
          const gap = (Date.parse(second.ts) - Date.parse(attempts(rcpt)[1].ts)) / 1000;
          assert(gap >= INTERVAL_TOLERANCE[0] && gap <= INTERVAL_TOLERANCE[1], `#2 → #3 took ${gap} s`);
          const expect = await ctl(
            "expect",
            rcpt,
            "--attempts",
            "3",
            "--delivered-once",
            "--interval",
            `0..${INTERVAL_TOLERANCE[1]}`,
            "--file",
            file,
          );
          assertEquals(expect.code, 0, expect.stdout + expect.stderr);
          const report = await ctl("report", "--file", file);
          assertMatch(report.stdout, /twice@sinkhole\.test: 3 attempt\(s\), delivered once/);
          console.log(`sendmail -q${QUEUE_INTERVAL_S}s, defer first=2 (tolerance ${interval} s):\n${report.stdout}`);
        } finally {
          await Deno.remove(file);
        }
      },
    );

    await t.step("drop at=eod: sendmail never hears the 250 and sends the message again: a duplicate", async () => {
      const rcpt = "lost@sinkhole.test";
      await setMode("drop at=eod");
      assertEquals((await submit([rcpt], "lost reply")).at(-2), 250);
      await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.dropped === true, HISTORY_WITHIN_MS);
      await setMode("accept");
      await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.code === 250, HISTORY_WITHIN_MS);
      const file = await ledger();
      try {
        const report = await ctl("report", "--file", file);
        assertMatch(report.stdout, /lost@sinkhole\.test: \d+ attempt\(s\), DELIVERED \d+ TIMES \(duplicate\)/);
        const once = await ctl("expect", rcpt, "--delivered-once", "--file", file);
        assertEquals(once.code, 1);
        assertMatch(
          once.stdout,
          /unmet: .*lost@sinkhole\.test: DELIVERED \d+ TIMES \(duplicate\), expected delivered exactly once/,
        );
      } finally {
        await Deno.remove(file);
      }
    });

    await t.step(
      "defer for=3s then=bounce: deferred, then refused for good; sendmail's DSN reaches the sender",
      async () => {
        const rcpt = "outage@sinkhole.test";
        await setMode("defer for=3s then=bounce");
        assertEquals((await submit([rcpt], "outage")).at(-2), 250);
        await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.code === 550, HISTORY_WITHIN_MS);
        const codes = attempts(rcpt).map((a) => a.code);
        assertEquals(codes[0], 421, "deferred during the outage");
        assertEquals(codes.at(-1), 550, "then bounced");
        // The DSN: sendmail tells the sender (origin.test, the second listener) with a null sender.
        await origin.waitFor(
          "message",
          (m) => m.from === "" && m.rcpts.includes("tester@origin.test"),
          HISTORY_WITHIN_MS,
        );
        const file = await ledger();
        try {
          const report = await ctl("report", "--file", file);
          assertMatch(report.stdout, /outage@sinkhole\.test: \d+ attempt\(s\), bounced/);
          assertMatch(report.stdout, /421 at rcpt[\s\S]*550 at rcpt/);
        } finally {
          await Deno.remove(file);
        }
      },
    );
  },
);

/** sendmail's Timeout.datafinal for the test below, and an end-of-data delay well past it. */
const DATAFINAL_S = 3;
const EOD_DELAY_S = 20;

mtaTest(
  "sendmail: a client that gives up during the end-of-data delay is not logged as served; its retry is delivered once",
  `accept delay=${EOD_DELAY_S}s`,
  async ({ mta, sink, setMode, submit }) => {
    await mta.start(`${QUEUE_INTERVAL_S}s`);
    const rcpt = "patient@sinkhole.test";
    assertEquals((await submit([rcpt], "gave up")).at(-2), 250);
    // sendmail's Timeout.datafinal expires first: it closes the connection, keeps the message.
    await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.unheard === true, HISTORY_WITHIN_MS);
    await setMode("accept");
    await sink.waitFor("attempt", (a) => a.rcpt === rcpt && a.code === 250, HISTORY_WITHIN_MS);
    const attempts = sink.events("attempt").filter((a) => a.rcpt === rcpt);
    assertEquals(attempts.map((a) => [a.attempt, a.code, a.unheard]), [[1, undefined, true], [2, 250, undefined]]);
    assertEquals(
      sink.events("session").filter((s) => s.error?.includes("reply was held")).length,
      1,
      "the first session says the client left",
    );
    const file = await logsFile(sink.logs);
    try {
      const report = await runCtl(["report", "--file", file]);
      assertMatch(report.stdout, /patient@sinkhole\.test: 2 attempt\(s\), delivered once/);
      const once = await runCtl(["expect", rcpt, "--delivered-once", "--attempts", "2", "--file", file]);
      assertEquals(once.code, 0, once.stdout + once.stderr);
      console.log(`sendmail Timeout.datafinal=${DATAFINAL_S}s against accept delay=${EOD_DELAY_S}s:\n${report.stdout}`);
    } finally {
      await Deno.remove(file);
    }
  },
  { datafinal: `${DATAFINAL_S}s` },
);
