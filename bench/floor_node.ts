/**
 * bench/floor.ts on node:net instead of Deno.listen: the same least SMTP responder (no policy,
 * no limits, no logs), to see which of Deno's two socket paths leaves more for the listener.
 * Not a product: bench only.
 *
 *   deno run --allow-net bench/floor_node.ts HOST PORT
 */
import { createServer } from "node:net";
import { REPLIES } from "./floor.ts";

if (import.meta.main) {
  createServer((sock) => {
    let pending = "";
    let inData = false;
    sock.setEncoding("latin1");
    sock.on("error", () => {/* client gone */});
    sock.write("220 floor\r\n");
    sock.on("data", (chunk: string) => {
      pending += chunk;
      let out = "";
      for (let nl = pending.indexOf("\n"); nl >= 0; nl = pending.indexOf("\n")) {
        const line = pending.slice(0, nl).replace(/\r$/, "");
        pending = pending.slice(nl + 1);
        if (inData) {
          if (line === ".") (inData = false, out += "250 ok\r\n");
          continue;
        }
        const verb = line.slice(0, 4).toUpperCase();
        inData = verb === "DATA";
        out += REPLIES[verb] ?? "500 unrecognized\r\n";
        if (verb === "QUIT") return void sock.end(out);
      }
      if (out) sock.write(out);
    });
  }).listen(Number(Deno.args[1]), Deno.args[0]);
}
