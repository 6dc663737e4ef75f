/** The bench's arithmetic (the bench itself is run by `deno task bench`, not here: no timed assertion in a test). */
import { assertEquals } from "../rig/assert.ts";
import { spread } from "../bench/bench.ts";
import { responder } from "../bench/floor.ts";
import { ledger } from "../bench/floor_ledger.ts";
import { startListener, transaction } from "../rig/helpers.ts";

Deno.test("bench: the listener to the floor is taken repetition by repetition, then its median, least and most", () => {
  // Repetition 2 was slow for both: paired, it is a ratio like the others; medians taken apart would say 0.5.
  const listener = [800, 400, 820];
  const floor = [1000, 500, 1600];
  assertEquals(spread(listener, floor), { median: 0.8, min: 0.5125, max: 0.8 });
  assertEquals(spread([900, 450, 880], [1000, 500, 1000]), { median: 0.9, min: 0.88, max: 0.9 });
});

Deno.test("bench: the ledger floor logs each attempt as the listener does, field for field (the real listener's lines, ts aside)", async () => {
  const body = "Subject: t\r\nMessage-ID: <m1.2@origin.test>\r\n\r\nbody";
  const to = ["A@sinkhole.test", "b@sinkhole.test"];
  const l = await startListener({ SINKHOLE_MODE: "accept" });
  try {
    await transaction(l.port, { host: l.host, from: "Sender@origin.test", to, body });
    await l.waitFor("attempt", (a) => a.rcpt === to[1]);
    const floorLines: string[] = [];
    const respond = responder(ledger(l.host, (line) => floorLines.push(line)));
    respond(
      `EHLO client.test\r\nMAIL FROM:<Sender@origin.test>\r\n${to.map((t) => `RCPT TO:<${t}>\r\n`).join("")}DATA\r\n`,
    );
    respond(`${body}\r\n.\r\nQUIT\r\n`);
    const withoutTs = ({ ts: _, ...rest }: Record<string, unknown>) => rest;
    assertEquals(
      floorLines.map((line) => withoutTs(JSON.parse(line))),
      l.events("attempt").map((a) => withoutTs(a as unknown as Record<string, unknown>)),
    );
    assertEquals(floorLines.every((line) => line.endsWith("}\n") && line.indexOf("\n") === line.length - 1), true);
  } finally {
    await l.stop();
  }
});
