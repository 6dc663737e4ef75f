/** `deno task synth`: writes the plain Terraform module to terraform/module/main.tf.json. */
import { MODULE_PATH, moduleText } from "./sinkhole.ts";

if (import.meta.main) {
  await Deno.writeTextFile(MODULE_PATH, moduleText());
  console.log(`wrote ${MODULE_PATH}`);
}
