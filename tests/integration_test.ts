/** The smtp-out integration snippet with real sendmail: routing, idempotence, removal. */
import { assert, assertEquals, assertMatch } from "../rig/assert.ts";
import { assertTools, needs, ROOT, run } from "../rig/helpers.ts";
import { makeSendmail, rigAddresses } from "../rig/sendmail.ts";

const SNIPPET = `${ROOT}/integration/sinkhole-mailertable.sh`;
const OTHER = "example.test smtp:[relay.example.test]\n";

/** Sources the snippet with POSIX sh, as generate-config.sh does. */
async function source(mailertable: string, enabled: string): Promise<void> {
  const res = await run("sh", ["-c", `. "${SNIPPET}"`], {
    env: { MAILERTABLE: mailertable, SINKHOLE_ENABLED: enabled },
  });
  assertEquals(res.code, 0, res.stderr);
}

Deno.test("integration: the snippet adds the line exactly once, removes it when off, keeps other lines", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sinkhole-snippet-" });
  const file = `${dir}/mailertable`;
  try {
    await Deno.writeTextFile(file, OTHER);
    await source(file, "true");
    await source(file, "true");
    const on = await Deno.readTextFile(file);
    assertEquals(on, OTHER + "sinkhole.test smtp:[sinkhole.cabal.internal]\n");
    assert(!/:25\b/.test(on), "no port in the line");
    await source(file, "false");
    assertEquals(await Deno.readTextFile(file), OTHER);
    await source(file, "");
    assertEquals(await Deno.readTextFile(file), OTHER, "unset means off");
    await Deno.remove(file);
    await source(file, "true");
    assertEquals(
      await Deno.readTextFile(file),
      "sinkhole.test smtp:[sinkhole.cabal.internal]\n",
      "a missing file is made",
    );
    assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), ["mailertable"], "no temporary file left");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const tools = needs("/usr/sbin/sendmail", "makemap", "m4", "unshare", "/usr/share/sendmail/cf/m4/cf.m4");

Deno.test({
  name: "integration: after the snippet and makemap, sendmail routes sinkhole.test to the Cloud Map host",
  ignore: tools.ignore || (Deno.uid() !== 0 && !Deno.env.get("CI")),
  fn: async () => {
    assertTools(tools.missing);
    assert(Deno.uid() === 0, "sendmail runs in its own namespaces: run as root (CI does)");
    const dir = await Deno.makeTempDir({ prefix: "sinkhole-route-" });
    try {
      const mta = await makeSendmail(dir, rigAddresses().mta, OTHER);
      /** Sendmail's own address test: ruleset 3 then 0 resolves the mailer and host. */
      const bt = async (address: string) => {
        const res = await mta.sendmailWith(`3,0 ${address}\n`, "-bt");
        const out = res.stdout + res.stderr;
        const line = out.split("\n").find((l) => l.startsWith("parse ") && l.includes("returns:")) ?? out;
        return line.replace(/\s+/g, " ");
      };
      await source(`${dir}/mailertable`, "true");
      await mta.makemap();
      assertMatch(await bt("anything@sinkhole.test"), /\$# smtp \$@ \[ sinkhole \. cabal \. internal \]/);
      assertMatch(await bt("someone@example.test"), /\$# smtp \$@ \[ relay \. example \. test \]/, "other routes kept");
      await source(`${dir}/mailertable`, "false");
      await mta.makemap();
      const off = await bt("anything@sinkhole.test");
      assert(!off.includes("cabal . internal"), `flag off: no sinkhole route (${off})`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
