/**
 * nodemailer's smtp-server as a plain accept-all sink, for the benchmark: every sender,
 * recipient and message accepted, the message read and discarded, no authentication, no
 * reverse lookups, no logs. Not a product: bench only.
 *
 *   deno run --allow-net --allow-env --allow-read --allow-sys bench/smtp_server_sink.ts HOST PORT
 */
import { SMTPServer } from "smtp-server";

if (import.meta.main) {
  const server = new SMTPServer({
    authOptional: true,
    disableReverseLookup: true,
    logger: false,
    onData(stream, _session, callback) {
      stream.on("end", () => callback());
      stream.resume();
    },
  });
  server.listen(Number(Deno.args[1]), Deno.args[0]);
}
