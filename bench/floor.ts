/**
 * The floor for the benchmark: the least SMTP responder Deno can run (no policy, no limits,
 * no logs), on the same Deno.listen I/O as the listener. It shows how much of the gap to
 * smtp-sink is Deno's own I/O and how much is sinkhole's work. Not a product: bench only.
 *
 *   deno run --allow-net bench/floor.ts HOST PORT
 */
export const REPLIES: Record<string, string> = {
  EHLO: "250-floor\r\n250 PIPELINING\r\n",
  HELO: "250 floor\r\n",
  MAIL: "250 ok\r\n",
  RCPT: "250 ok\r\n",
  DATA: "354 go\r\n",
  RSET: "250 ok\r\n",
  NOOP: "250 ok\r\n",
  QUIT: "221 bye\r\n",
};
const encoder = new TextEncoder();
const decoder = new TextDecoder("latin1");

/** What the ledger floor (bench/floor_ledger.ts) is told: the envelope, the header lines, each message's end. */
export interface Ledger {
  mail(line: string): void;
  rcpt(line: string): void;
  /** A line of the message's header section (up to its first empty line). */
  header(line: string): void;
  /** The message's final dot: its attempt, accepted. */
  end(): void;
}

/**
 * One session's replies: fed what the client sent (as latin1 text), answers what to write back
 * and whether the client said QUIT. The whole of the floor's SMTP; every floor uses it (the
 * ledger floor passes a `ledger`; without one, no line is looked at beyond its verb).
 */
export function responder(ledger?: Ledger): (text: string) => { out: string; quit: boolean } {
  let pending = "";
  let inData = false;
  let inHeaders = false;
  return (text) => {
    pending += text;
    let out = "";
    let quit = false;
    for (let nl = pending.indexOf("\n"); nl >= 0 && !quit; nl = pending.indexOf("\n")) {
      const line = pending.slice(0, nl).replace(/\r$/, "");
      pending = pending.slice(nl + 1);
      if (inData) {
        if (line === ".") (inData = false, out += "250 ok\r\n", ledger?.end());
        else if (ledger && inHeaders) {
          if (line === "") inHeaders = false;
          else ledger.header(line);
        }
        continue;
      }
      const verb = line.slice(0, 4).toUpperCase();
      inData = verb === "DATA";
      quit = verb === "QUIT";
      if (ledger) {
        if (verb === "MAIL") ledger.mail(line);
        else if (verb === "RCPT") ledger.rcpt(line);
        inHeaders = inData;
      }
      out += REPLIES[verb] ?? "500 unrecognized\r\n";
    }
    return { out, quit };
  };
}

/** One connection, start to end: the greeting, then read, answer, write (`respond` is its `responder`). */
export async function session(conn: Deno.Conn, respond = responder()): Promise<void> {
  const buf = new Uint8Array(4096);
  try {
    await conn.write(encoder.encode("220 floor\r\n"));
    for (let quit = false; !quit;) {
      const n = await conn.read(buf);
      if (n === null) break;
      const r = respond(decoder.decode(buf.subarray(0, n)));
      quit = r.quit;
      if (r.out) await conn.write(encoder.encode(r.out));
    }
  } catch {
    /* client gone */
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

if (import.meta.main) {
  for await (const conn of Deno.listen({ hostname: Deno.args[0], port: Number(Deno.args[1]) })) session(conn);
}
