/** The runbook and its rehearsal: same step names, and `deno task rehearse` passes with real sendmail. */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, needs, ROOT, run, taskCommand } from "../rig/helpers.ts";
import { preflight, procedure } from "../rehearse/rehearse.ts";

const runbook = Deno.readTextFileSync(`${ROOT}/docs/runbook.md`);
const headings = [...runbook.matchAll(/^## Step (\d+): (.+)$/gm)].map((m) => ({ n: Number(m[1]), name: m[2].trim() }));
const noWork = { dir: "/nonexistent", modeFile: "/nonexistent/mode" };

Deno.test("rehearse: every runbook step heading has a rehearsal step of the same name, in order", () => {
  assert(headings.length >= 9, `runbook steps found: ${headings.length}`);
  assertEquals(headings.map((h) => h.n), headings.map((_, i) => i + 1), "steps are numbered 1..n");
  const rehearsed = procedure("defer", false, noWork).steps.map((s) => s.name);
  assertEquals(rehearsed, headings.map((h) => h.name));
  const offline = procedure("defer", true, noWork).steps.map((s) => s.name);
  assertEquals(offline.filter((n) => rehearsed.includes(n)), rehearsed, "the offline variant keeps every step");
});

Deno.test("rehearse: refuses politely without sendmail, saying how to install it", () => {
  const msg = preflight([["/nonexistent/sendmail", "sendmail-bin"], ["/nonexistent/cf.m4", "sendmail-cf"]], 0);
  assertMatch(msg ?? "", /not installed/);
  assertMatch(msg ?? "", /sudo apt-get install sendmail-bin sendmail-cf/);
  assertMatch(preflight([], 1000) ?? "", /run it as root/);
  assertEquals(preflight([], 0), undefined);
});

const tools = needs("/usr/sbin/sendmail", "makemap", "m4", "unshare", "/usr/share/sendmail/cf/m4/cf.m4");

for (const args of [[], ["--mode", "greylist"], ["--mode", "bounce"], ["--offline"]]) {
  Deno.test({
    name: `rehearse: deno task rehearse ${args.join(" ")} passes and cleans up`,
    ignore: tools.ignore || (Deno.uid() !== 0 && !Deno.env.get("CI")),
    fn: async () => {
      assertTools(tools.missing);
      const [cmd, ...rest] = taskCommand("rehearse");
      const res = await run(cmd, [...rest, ...args]);
      assertEquals(res.code, 0, res.stdout + res.stderr);
      assertMatch(res.stdout, /rehearsal: \d+ passed, 0 failed/);
      assert(!/\[FAIL\]|\[SKIP\]/.test(res.stdout), res.stdout);
      if (args.includes("--offline")) assertMatch(res.stdout, /Connection refused/);
      const dir = /in (\/\S+sinkhole-rehearsal-\S+)/.exec(res.stdout)?.[1];
      assert(dir, "the work directory is named");
      let gone = false;
      try {
        Deno.statSync(dir!);
      } catch {
        gone = true;
      }
      assert(gone, "the work directory is removed");
    },
  });
}
