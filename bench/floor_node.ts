/**
 * bench/floor.ts on node:net instead of Deno.listen: the same least SMTP responder (no policy,
 * no limits, no logs), to see which of Deno's two socket paths leaves more for the listener.
 * Not a product: bench only.
 *
 *   deno run --allow-net bench/floor_node.ts HOST PORT
 */
import { createServer } from "node:net";
import { responder } from "./floor.ts";

if (import.meta.main) {
  createServer((sock) => {
    const respond = responder();
    sock.setEncoding("latin1");
    sock.on("error", () => {/* client gone */});
    sock.write("220 floor\r\n");
    sock.on("data", (chunk: string) => {
      const { out, quit } = respond(chunk);
      if (quit) sock.end(out);
      else if (out) sock.write(out);
    });
  }).listen(Number(Deno.args[1]), Deno.args[0]);
}
