/** Each feature of the mode language end to end over TCP, with nodemailer and raw SMTP. */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { failure, type Listener, mailer as smtpClient, RawClient, transaction, withListener } from "../rig/helpers.ts";

/** The client's socket timeout, when a test is about the client giving up first. */
const mailer = (port: number, socketTimeout?: number) => smtpClient(port, { socketTimeout });

const MESSAGE = { from: "a@origin.test", subject: "scenario", text: "body\n" };

const withMode = (mode: string, fn: (l: Listener) => Promise<void>) => withListener({ SINKHOLE_MODE: mode }, fn);

Deno.test("scenario: a custom 451 at end of data, after the whole body was received", () =>
  withMode('defer at=eod reply="451 4.3.0 Queue full, try later"', async (l) => {
    const err = await failure(mailer(l.port).sendMail({ ...MESSAGE, to: "x@sinkhole.test" }));
    assertEquals(err.responseCode, 451);
    assertMatch(err.message, /4\.3\.0 Queue full, try later/);
    const session = await l.waitForLog((x) => x.event === "session");
    const [tx] = session.transactions as { rcpts: { code: number }[]; size: number; result: number }[];
    assertEquals(tx.rcpts[0].code, 250, "recipients were accepted");
    assertEquals(tx.result, 451);
    assert(tx.size > 0, "the body was received before the failure");
    assertEquals(session.modes, ['defer at=eod reply="451 4.3.0 Queue full, try later"']);
  }));

Deno.test("scenario: drop at RCPT closes without a reply", () =>
  withMode("drop at=rcpt", async (l) => {
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).code, 220);
    await c.cmd("EHLO c.test");
    await c.cmd("MAIL FROM:<a@origin.test>");
    await c.send("RCPT TO:<b@sinkhole.test>\r\n");
    assert(await c.closedByServer(), "closed, and nothing was said");
    c.close();
    const session = await l.waitForLog((x) => x.event === "session");
    assertEquals(session.dropped, true);
    assertEquals(session.replies, [220, 250, 250]);
    const err = await failure(mailer(l.port).sendMail({ ...MESSAGE, to: "x@sinkhole.test" }));
    assert(err.code === "ECONNECTION" || /closed/i.test(err.message), `${err.code}: ${err.message}`);
  }));

Deno.test("scenario: a delay at end of data trips the client's timeout; other sessions go on", () =>
  // The client waits 1 s, the listener 10 s: the client gives up first on any machine.
  withMode("accept delay=10s", async (l) => {
    const err = await failure(mailer(l.port, 1000).sendMail({ ...MESSAGE, to: "x@sinkhole.test" }));
    assertEquals(err.code, "ETIMEDOUT", "the client gave up first");
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).code, 220, "the listener is not blocked by a delayed session");
    c.close();
    const codes = await transaction(l.port);
    assertEquals(codes.slice(0, 5), [220, 250, 250, 250, 354]);
  }));

Deno.test("scenario: a delay shorter than the client's timeout is waited out", () =>
  withMode("accept at=rcpt delay=700ms", async (l) => {
    const t0 = Date.now();
    const info = await mailer(l.port).sendMail({ ...MESSAGE, to: "x@sinkhole.test" });
    assertEquals(info.accepted, ["x@sinkhole.test"]);
    assert(Date.now() - t0 >= 650, `took ${Date.now() - t0} ms`);
  }));

Deno.test("scenario: failures at connect, HELO and MAIL", async () => {
  await withMode("defer at=connect", async (l) => {
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).lines, ["421 4.3.2 Service temporarily unavailable"]);
    assert(await c.closedByServer());
    c.close();
  });
  await withMode("bounce at=connect", async (l) => {
    const c = await RawClient.connect(l.port);
    assertEquals((await c.reply()).lines, ["554 5.3.2 Transaction failed"]);
    assertEquals((await c.cmd("EHLO c.test")).lines, ["503 5.5.1 No SMTP service here"]);
    assertEquals((await c.cmd("QUIT")).code, 221);
    c.close();
  });
  await withMode("drop at=connect", async (l) => {
    const c = await RawClient.connect(l.port);
    assert(await c.closedByServer(), "no greeting at all");
    c.close();
  });
  await withMode('defer at=helo reply="421 4.7.0 Too busy"', async (l) => {
    const c = await RawClient.connect(l.port);
    await c.reply();
    assertEquals((await c.cmd("EHLO c.test")).lines, ["421 4.7.0 Too busy"]);
    assert(await c.closedByServer());
    c.close();
  });
  await withMode('bounce at=mail reply="553 5.7.1 Sender rejected"', async (l) => {
    const err = await failure(mailer(l.port).sendMail({ ...MESSAGE, to: "x@sinkhole.test" }));
    assertEquals(err.responseCode, 553);
  });
});

Deno.test("scenario: per-recipient outcomes in one message, the global mode for the rest", () =>
  withMode("accept", async (l) => {
    const info = await mailer(l.port).sendMail({
      ...MESSAGE,
      to: [
        "accept+1@sinkhole.test",
        "bounce+2@sinkhole.test",
        "defer+3@sinkhole.test",
        "452-4.2.2+4@sinkhole.test",
        "plain@sinkhole.test",
      ],
    });
    assertEquals(info.accepted.sort(), ["accept+1@sinkhole.test", "plain@sinkhole.test"]);
    assertEquals(info.rejected.sort(), [
      "452-4.2.2+4@sinkhole.test",
      "bounce+2@sinkhole.test",
      "defer+3@sinkhole.test",
    ]);
    const session = await l.waitForLog((x) => x.event === "session");
    const [tx] = session.transactions as { rcpts: { to: string; code: number }[] }[];
    assertEquals(tx.rcpts.map((r) => r.code), [250, 550, 451, 452, 250]);
  }));

Deno.test("scenario: greylist key=triplet min=…: early retries deferred, later ones pass, per recipient", async () => {
  // "Sooner than min" with a min no machine can reach (1 h); "after min" with 1 s, waited
  // out: a slower machine only retries later, which gives the same answer.
  await withMode("greylist key=triplet min=1h window=2h", async (l) => {
    const send = (to: string) => mailer(l.port).sendMail({ ...MESSAGE, to });
    assertEquals((await failure(send("x@sinkhole.test"))).responseCode, 451, "first attempt");
    assertEquals((await failure(send("x@sinkhole.test"))).responseCode, 451, "a retry sooner than min");
  });
  await withMode("greylist key=triplet min=1s window=1h", async (l) => {
    const send = (to: string) => mailer(l.port).sendMail({ ...MESSAGE, to });
    assertEquals((await failure(send("x@sinkhole.test"))).responseCode, 451, "first attempt");
    await new Promise((ok) => setTimeout(ok, 1100));
    assertEquals((await send("x@sinkhole.test")).accepted, ["x@sinkhole.test"], "a retry after min passes");
    assertEquals((await failure(send("y@sinkhole.test"))).responseCode, 451, "another recipient is another triplet");
  });
});
