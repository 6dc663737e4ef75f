/**
 * The outbox: a session's replies, written in one write and recorded only once written. A
 * write may take fewer octets than it was given (a socket's buffer nearly full); loopback
 * does that only when a buffer fills, at no moment a test chooses, so here a transport that
 * takes at most a few octets a write stands in for the socket (the one fake of this file).
 */
import { assertEquals } from "../rig/assert.ts";
import { formatReply, Outbox, REPLIES, type Reply, Transcript, type Transport } from "../listener.ts";

/** A transport whose writes take at most `most` octets each; `fail` makes the next write reject. */
function trickle(most: number) {
  const wire: number[] = [];
  const t = {
    writes: 0,
    fail: false,
    wire,
    read: () => Promise.resolve(null),
    write(bytes: Uint8Array): Promise<number> {
      t.writes++;
      if (t.fail) return Promise.reject(new Error("connection reset"));
      const n = Math.min(most, bytes.length);
      wire.push(...bytes.subarray(0, n));
      return Promise.resolve(n);
    },
    close() {},
  };
  return t as typeof t & Transport;
}

const text = (bytes: number[]) => new TextDecoder().decode(new Uint8Array(bytes));

Deno.test("outbox: a batch written in pieces reaches the wire whole and in order, and is recorded once, after it", async () => {
  for (const most of [1, 3, 7, 1000]) {
    const conn = trickle(most);
    const transcript = new Transcript("127.0.0.1", 0);
    const out = new Outbox(conn, transcript);
    const ran: string[] = [];
    const multi: Reply = { code: 250, lines: ["sinkhole.test", "PIPELINING", "8BITMIME"] };
    out.push(multi, () => ran.push("first"));
    out.push(REPLIES.senderOk, () => ran.push("second"));
    out.push(REPLIES.dataGo);
    const done = out.flush();
    assertEquals([ran, transcript.replyCount], [[], 0], `most ${most}: nothing recorded before the write ends`);
    await done;
    const expected = [multi, REPLIES.senderOk, REPLIES.dataGo];
    assertEquals(text(conn.wire), expected.map(formatReply).join(""), `most ${most}: whole, in order`);
    assertEquals(transcript.replies, [250, 250, 354], `most ${most}: the codes, once each, in order`);
    assertEquals(ran, ["first", "second"], `most ${most}: each reply's then, once, in order`);
    assertEquals(transcript.bytesOut, conn.wire.length, `most ${most}: octets out, counted once`);
    assertEquals(conn.writes, Math.ceil(conn.wire.length / most), `most ${most}: a write a piece`);
  }
});

Deno.test("outbox: a failed write rejects the flush, records nothing, and the next flush is not held behind it", async () => {
  const conn = trickle(2);
  const transcript = new Transcript("127.0.0.1", 0);
  const out = new Outbox(conn, transcript);
  let ran = 0;
  out.push(REPLIES.ok, () => ran++);
  conn.fail = true;
  const failed = await out.flush().then(() => "written", (err: Error) => err.message);
  assertEquals(failed, "connection reset");
  assertEquals([ran, transcript.replyCount, transcript.bytesOut], [0, 0, 0], "a client that left was told nothing");
  conn.fail = false;
  out.push(REPLIES.ok, () => ran++);
  await out.flush();
  assertEquals([ran, transcript.replyCount], [1, 1]);
});
