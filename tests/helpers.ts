/** Moved to rig/helpers.ts (the rig bench/ and rehearse/ share): this re-export goes once the tests import it there. */
export * from "../rig/helpers.ts";
