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

/**
 * Python's ssl as the client (a TLS stack other than the listener's): STARTTLS, EHLO, QUIT,
 * then what ends the connection. `suppress_ragged_eofs=False`: a TCP close without
 * close_notify is an error (SSLEOFError), a close_notify an orderly end (RFC 8446 §6.1).
 */
const PY_QUIT = `
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
def reply():
    while True:
        line = f.readline()
        if line[3:4] != b"-":
            return line
reply(); s.sendall(b"EHLO py.test\\r\\n"); reply()
s.sendall(b"STARTTLS\\r\\n"); assert reply().startswith(b"220 ")
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, suppress_ragged_eofs=False)
g = t.makefile("rb")
t.sendall(b"EHLO py.test\\r\\n")
while True:
    line = g.readline()
    if line[3:4] != b"-": break
t.sendall(b"QUIT\\r\\n"); print(g.readline().decode().strip())
try:
    rest = t.recv(100)
    print("close_notify" if rest == b"" else "more: %r" % rest)
except ssl.SSLEOFError:
    print("no close_notify")
`;

Deno.test("starttls: after QUIT's 221 the session ends with close_notify (Python's ssl)", () =>
  withListener({ SINKHOLE_MODE: "accept", SINKHOLE_STARTTLS: "on" }, async (l) => {
    const py = await run("python3", ["-c", PY_QUIT, String(l.port)]);
    assertEquals(py.stdout.trim().split("\n"), ["221 2.0.0 Bye", "close_notify"], py.stderr);
  }));

/** After `220 Ready to start TLS`, sends no ClientHello; returns every byte the server sends until it closes. */
async function afterReady(port: number, then: () => Promise<unknown>): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const c = new RawClient(conn);
  await c.reply();
  await c.cmd("EHLO c.test");
  assertEquals((await c.cmd("STARTTLS")).lines, ["220 2.0.0 Ready to start TLS"]);
  await then();
  const got: number[] = [];
  const buf = new Uint8Array(1024);
  for (;;) {
    const n = await conn.read(buf).catch(() => null);
    if (n === null) break;
    got.push(...buf.subarray(0, n));
  }
  conn.close();
  return new TextDecoder().decode(new Uint8Array(got));
}

Deno.test("starttls: between 220 Ready and the handshake, the idle timeout and SIGTERM close without a plaintext 421", async () => {
  await withListener({ SINKHOLE_MODE: "accept", SINKHOLE_STARTTLS: "on", SINKHOLE_IDLE_TIMEOUT: "1" }, async (l) => {
    assertEquals(await afterReady(l.port, async () => {}), "", "idle timeout: closed, nothing written");
  });
  await withListener({ SINKHOLE_MODE: "accept", SINKHOLE_STARTTLS: "on" }, async (l) => {
    let stopped: Promise<Deno.CommandStatus> | undefined;
    const seen = await afterReady(l.port, async () => {
      stopped = l.stop();
      await l.waitForLog((x) => x.event === "session" || x.event === "stop");
    });
    assertEquals(seen, "", "SIGTERM: closed, nothing written");
    assertEquals((await stopped!).code, 0);
  });
});
