/** The bench's arithmetic (the bench itself is run by `deno task bench`, not here: no timed assertion in a test). */
import { assertEquals } from "../rig/assert.ts";
import { spread } from "../bench/bench.ts";

Deno.test("bench: the listener to the floor is taken repetition by repetition, then its median, least and most", () => {
  // Repetition 2 was slow for both: paired, it is a ratio like the others; medians taken apart would say 0.5.
  const listener = [800, 400, 820];
  const floor = [1000, 500, 1600];
  assertEquals(spread(listener, floor), { median: 0.8, min: 0.5125, max: 0.8 });
  assertEquals(spread([900, 450, 880], [1000, 500, 1000]), { median: 0.9, min: 0.88, max: 0.9 });
});
