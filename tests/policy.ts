/** The pure policy's test rig: command lines played through `respond`, without TCP. */
import {
  type GreylistVerdict,
  initialState,
  type Inputs,
  type Outcome,
  respond,
  scenario,
  type SessionState,
} from "../listener.ts";

export const SERVER = "sinkhole.test.internal";

/**
 * Plays command lines through `respond` in `mode` until the session would close. The
 * greylist table holds a live first attempt for every key when `greylist` is "pass", none
 * when "defer"; `asked` lists the keys the policy looked up.
 */
export function play(
  mode: string,
  lines: string[],
  greylist: GreylistVerdict = "defer",
  more: Partial<Inputs> = {},
) {
  let state: SessionState = initialState();
  const outs: Outcome[] = [];
  const asked: string[] = [];
  const sc = scenario(mode);
  for (const line of lines) {
    const out = respond(state, line, {
      scenario: sc,
      serverName: SERVER,
      client: "192.0.2.1",
      greylist: (key) => (asked.push(key), greylist === "pass" ? { at: 0, windowMs: Infinity } : undefined),
      ...more,
    });
    outs.push(out);
    state = out.state;
    if (out.after === "close" || out.after === "drop") break;
  }
  return { outs, state, codes: outs.map((o) => o.reply.code), last: outs.at(-1)!, asked };
}
