/**
 * A drop with pipelined input unread: the listener shuts its write side (FIN) and reads and
 * discards what the client still sends (a lingering close, as Apache httpd's lingering_close
 * and nginx's `lingering_close`), so the connection ends in FIN, not RST: a reply written just
 * before the drop reaches the client, and the log's account of it is what happened on the wire.
 *
 * Linux on loopback keeps data it had already received when a RST comes (tried with a raw
 * client: the 550 arrived, then EOF, with or without the lingering close), so this test
 * observes the RST itself: after a RST the client's socket is closed and its next write fails
 * (EPIPE); after a FIN it may still write, and the listener reads (and discards) it.
 */
import { assert, assertEquals } from "../rig/assert.ts";
import { startListener } from "../rig/helpers.ts";
import { configFromEnv, tlsMaterial } from "../listener.ts";

const enc = new TextEncoder();
/** Pipelined commands the listener has not read when it drops: more than one READ_BUFFER_BYTES read. */
const BLOB = "NOOP\r\n".repeat(64 * 1024 / 6);

for (const [transport, env] of [["Deno's", {}], ["STARTTLS-capable", { SINKHOLE_STARTTLS: "on" }]] as const) {
  Deno.test(`linger: a drop at RCPT with pipelined input unread ends in FIN, the replies before it delivered; ${transport} transport`, async () => {
    const l = await startListener({ SINKHOLE_MODE: "accept", ...env });
    try {
      for (const drop of ["drop+x@sinkhole.test", "drop1+y@sinkhole.test"]) {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: l.port });
        const script = "EHLO client.test\r\nMAIL FROM:<a@origin.test>\r\nRCPT TO:<bounce+x@sinkhole.test>\r\n" +
          `RCPT TO:<${drop}>\r\n` + BLOB;
        let sent = 0;
        const write = async (bytes: Uint8Array) => {
          for (let b = bytes; b.length > 0; b = b.subarray(await conn.write(b)));
          sent += bytes.length;
        };
        await write(enc.encode(script));
        // Only now read: every reply the listener wrote before the drop, then its end.
        let got = "";
        const buf = new Uint8Array(65536);
        let end: string;
        for (;;) {
          let n: number | null;
          try {
            n = await conn.read(buf);
          } catch (err) {
            end = (err as Error).name;
            break;
          }
          if (n === null) {
            end = "EOF";
            break;
          }
          got += new TextDecoder().decode(buf.subarray(0, n));
        }
        await assertOrderlyEnd(got, end, write);
        await conn.closeWrite();
        conn.close();
        const session = await l.waitFor("session", (s) => s.dropped === true && s.bytesIn === sent);
        assert(session.discarded! > 0, "the session line says what was discarded");
        assertEquals(session.replies.at(-1), 550, "nothing read after the drop was answered");
      }
    } finally {
      await l.stop();
    }
  });
}

/** Reads until the end: the text read and how it ended (EOF, or the error's name). */
/**
 * The end of a dropped session as the client sees it: the replies written before the drop (the sender's 250, the
 * refused recipient's 550), then EOF (FIN; TLS: close_notify first), and a write after it still taken: after a RST
 * the socket is gone and that write fails; after a FIN the listener is still reading.
 */
async function assertOrderlyEnd(
  got: string,
  end: string,
  write: (bytes: Uint8Array) => Promise<unknown>,
): Promise<void> {
  assertEquals(end, "EOF", "the connection ends in FIN, not RST");
  const replies = got.split("\r\n").filter((x) => /^\d{3} /.test(x));
  assertEquals(
    replies.slice(-2),
    ["250 2.1.0 Sender OK", "550 5.1.1 User unknown"],
    "the reply before the drop arrived",
  );
  let afterwards = "written";
  try {
    await write(enc.encode("NOOP\r\n"));
  } catch (err) {
    afterwards = (err as Error).name;
  }
  assertEquals(afterwards, "written", "the listener was still reading after its FIN: no RST");
}

async function readToEnd(conn: { read(b: Uint8Array): Promise<number | null> }): Promise<{ got: string; end: string }> {
  let got = "";
  const buf = new Uint8Array(65536);
  for (;;) {
    let n: number | null;
    try {
      n = await conn.read(buf);
    } catch (err) {
      return { got, end: (err as Error).name };
    }
    if (n === null) return { got, end: "EOF" };
    got += new TextDecoder().decode(buf.subarray(0, n));
  }
}

Deno.test("linger: a drop in a TLS-upgraded session with pipelined input unread: close_notify, then FIN, the replies before it delivered", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-linger-tls-" });
  const { cert, key } = await tlsMaterial(
    configFromEnv((k) => ({ SINKHOLE_SERVER_NAME: "localhost" } as Record<string, string>)[k]),
  );
  await Deno.writeTextFile(`${dir}/cert.pem`, cert);
  await Deno.writeTextFile(`${dir}/key.pem`, key);
  const l = await startListener({
    SINKHOLE_MODE: "accept",
    SINKHOLE_STARTTLS: "on",
    SINKHOLE_TLS_CERT: `${dir}/cert.pem`,
    SINKHOLE_TLS_KEY: `${dir}/key.pem`,
    SINKHOLE_SERVER_NAME: "localhost",
  });
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: l.port });
    const plain = async (line: string, want: RegExp) => {
      if (line) await conn.write(enc.encode(line + "\r\n"));
      let text = "";
      const buf = new Uint8Array(4096);
      while (!want.test(text)) {
        const n = await conn.read(buf);
        assert(n !== null, `closed before ${want}: ${text}`);
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
    };
    await plain("", /^220 .*\r\n/m);
    await plain("EHLO client.test", /^250 .*\r\n/m);
    await plain("STARTTLS", /^220 2\.0\.0 .*\r\n/m);
    const tls = await Deno.startTls(conn, { hostname: "localhost", caCerts: [cert] });
    const script = "EHLO client.test\r\nMAIL FROM:<a@origin.test>\r\nRCPT TO:<bounce+x@sinkhole.test>\r\n" +
      "RCPT TO:<drop+x@sinkhole.test>\r\n" + BLOB;
    const bytes = enc.encode(script);
    for (let b = bytes; b.length > 0; b = b.subarray(await tls.write(b)));
    const { got, end } = await readToEnd(tls);
    await assertOrderlyEnd(got, end, async (more) => {
      for (let b = more; b.length > 0; b = b.subarray(await tls.write(b)));
    });
    tls.close();
    const session = await l.waitFor("session", (s) => s.dropped === true);
    assertEquals([session.tls, session.replies.at(-1)], [true, 550]);
    // What the client pipelined after the drop was read (and discarded), not left unread for a RST.
    assert(session.discarded! > 0, "the lingering close read what the client still sent");
  } finally {
    await l.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
