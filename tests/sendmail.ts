/** Moved to rig/sendmail.ts (the rig bench/ and rehearse/ share): this re-export goes once the tests import it there. */
export * from "../rig/sendmail.ts";
