/** STARTTLS: off by default, a real upgrade when on, and the two ways a mode can make it fail. */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, needs, RawClient, run, transaction, withListener } from "../rig/helpers.ts";
import { configFromEnv, tlsMaterial } from "../listener.ts";

const swaks = needs("swaks");

/** A certificate and key written to files, made the way the listener makes its own. */
async function certFiles(): Promise<{ dir: string; cert: string; key: string; pem: string }> {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-tls-" });
  const { cert, key } = await tlsMaterial(
    configFromEnv((k) => ({ SINKHOLE_SERVER_NAME: "localhost" } as Record<string, string>)[k]),
  );
  await Deno.writeTextFile(`${dir}/cert.pem`, cert);
  await Deno.writeTextFile(`${dir}/key.pem`, key);
  return { dir, cert: `${dir}/cert.pem`, key: `${dir}/key.pem`, pem: cert };
}

Deno.test("starttls: off by default, not offered, the command is not implemented", () =>
  withListener({ SINKHOLE_MODE: "accept" }, async (l) => {
    const c = await RawClient.connect(l.port);
    await c.reply();
    assert(!(await c.cmd("EHLO c.test")).text.includes("STARTTLS"));
    assertEquals((await c.cmd("STARTTLS")).code, 502);
    c.close();
    assertEquals(l.logs.find((x) => x.event === "start")?.starttls, "off");
  }));

Deno.test("starttls: on, with a certificate from files: a Deno TLS client upgrades; pipelined plaintext is discarded", async () => {
  const files = await certFiles();
  try {
    await withListener(
      {
        SINKHOLE_MODE: "accept-log",
        SINKHOLE_STARTTLS: "on",
        SINKHOLE_TLS_CERT: files.cert,
        SINKHOLE_TLS_KEY: files.key,
        SINKHOLE_SERVER_NAME: "localhost",
      },
      async (l) => {
        assertEquals(l.logs.find((x) => x.event === "start")?.starttls, "on, certificate from files");
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: l.port });
        const plain = new RawClient(conn);
        await plain.reply();
        assertMatch((await plain.cmd("EHLO c.test")).text, /STARTTLS/);
        // RFC 3207 §4.2: a command pipelined after STARTTLS must not be answered after the handshake.
        await plain.send("STARTTLS\r\nRSET\r\n");
        assertEquals((await plain.reply()).lines, ["220 2.0.0 Ready to start TLS"]);
        const tls = await Deno.startTls(conn, { hostname: "localhost", caCerts: [files.pem] });
        const secure = new RawClient(tls as unknown as Deno.TcpConn);
        const ehlo = await secure.cmd("EHLO c.test");
        assertEquals(ehlo.code, 250, "the first reply over TLS answers EHLO, not the discarded RSET");
        assert(!ehlo.text.includes("STARTTLS"), "not offered again");
        assertEquals((await secure.cmd("MAIL FROM:<a@origin.test>")).code, 250);
        assertEquals((await secure.cmd("RCPT TO:<b@sinkhole.test>")).code, 250);
        assertEquals((await secure.cmd("DATA")).code, 354);
        assertEquals((await secure.cmd("Subject: over tls\r\n\r\nsecret\r\n.")).code, 250);
        assertEquals((await secure.cmd("QUIT")).code, 221);
        secure.close();
        const session = await l.waitForLog((x) => x.event === "session");
        assertEquals(session.tls, true);
        assertEquals((await l.waitForLog((x) => x.event === "message")).headers, ["Subject: over tls"]);
        assertEquals(await transaction(l.port), [220, 250, 250, 250, 354, 250, 221], "plain sessions still work");
      },
    );
  } finally {
    await Deno.remove(files.dir, { recursive: true });
  }
});

Deno.test({
  name: "starttls: swaks --tls against a generated certificate; refuse and break make the upgrade fail",
  ignore: swaks.ignore,
  fn: async () => {
    assertTools(swaks.missing);
    const swak = (port: number, ...args: string[]) =>
      run("swaks", ["--server", `127.0.0.1:${port}`, "--from", "a@origin.test", "--to", "b@sinkhole.test", ...args]);
    await withListener({ SINKHOLE_MODE: "accept", SINKHOLE_STARTTLS: "on" }, async (l) => {
      assertEquals(l.logs.find((x) => x.event === "start")?.starttls, "on, generated certificate");
      const ok = await swak(l.port, "--tls");
      assertEquals(ok.code, 0, ok.stdout);
      assertMatch(ok.stdout, /=== TLS started with cipher TLSv1\.[23]/);
      assertMatch(ok.stdout, /<~ {2}250 2\.0\.0 Message accepted and discarded/);
    });
    await withListener({ SINKHOLE_MODE: "accept starttls=refuse" }, async (l) => {
      const required = await swak(l.port, "--tls");
      assert(required.code !== 0, "TLS required: swaks gives up");
      assertMatch(required.stdout, /<\*\* 454 4\.7\.0 TLS not available due to temporary reason/);
      const optional = await swak(l.port, "--tls-optional");
      assertEquals(optional.code, 0, "TLS optional: swaks goes on in plain text");
      assertMatch(optional.stdout, /<- {2}250 2\.0\.0 Message accepted and discarded/);
    });
    await withListener({ SINKHOLE_MODE: "accept starttls=break" }, async (l) => {
      const broken = await swak(l.port, "--tls");
      assert(broken.code !== 0);
      assertMatch(broken.stdout, /<- {2}220 2\.0\.0 Ready to start TLS/);
      assert(!/TLS started/.test(broken.stdout), "the handshake never happened (swaks dies writing its ClientHello)");
    });
  },
});
