/**
 * A private test MTA: Debian sendmail with its own .cf, queue, pid file and mailertable.
 * Each sendmail runs in its own mount and UTS namespace with a qualified host name, a
 * private /etc/hosts and a resolver on loopback, so it neither waits to qualify the
 * machine's name nor sends a DNS query off the machine.
 */
import { assertEquals } from "./assert.ts";
import { eventually, run, uniqueLoopback } from "./helpers.ts";

export const MTA_NAME = "mta.sinkhole-test.test";
/** The port every server of a rig listens on: a mailertable entry takes no port, as in production. */
export const SMTP_PORT = 25;
/** How long forced queue runs may take to get a message through: a hang guard, not a measure. */
export const QUEUE_RUNS_WITHIN_MS = 120_000;

/**
 * Where one rig's servers listen, each on a loopback address of this run's own (two runs
 * at once never share one): the sinkhole (`sinkhole.test`), the sender's domain
 * (`origin.test`, where bounces go) and the MTA.
 */
export interface RigAddresses {
  sink: string;
  origin: string;
  mta: { host: string; port: number };
}

export function rigAddresses(): RigAddresses {
  return {
    sink: uniqueLoopback([SMTP_PORT]),
    origin: uniqueLoopback([SMTP_PORT]),
    mta: { host: uniqueLoopback([SMTP_PORT]), port: SMTP_PORT },
  };
}

/** The mailertable of a rig: both test domains routed by address, without a port. */
export const rigMailertable = (a: RigAddresses) => `sinkhole.test smtp:[${a.sink}]\norigin.test smtp:[${a.origin}]\n`;

/**
 * The test MTA: a sendmail .cf from m4, like Cabalmail's smtp-out but private to this test.
 * `datafinal`: sendmail's Timeout.datafinal (`confTO_DATAFINAL`; its default is 1h), for a test of a
 * client that gives up waiting for the end-of-data reply.
 */
/** sendmail's QueueLA and RefuseLA in the rig: a load average no test machine reaches. */
const SENDMAIL_LOAD_LIMIT = 1000;

export async function makeSendmail(
  dir: string,
  listen: { host: string; port: number },
  mailertable: string,
  /**
   * `setup`: more shell commands (no single quote) run in the namespace first (rig/mtas.ts: its users, its log).
   * `defines`: more m4 `define`s, by name (e.g. Cabalmail's `confMIN_QUEUE_AGE`, `5m`).
   */
  opts: { setup?: string; defines?: Record<string, string>; datafinal?: string } = {},
) {
  const { host, port } = listen;
  await Deno.mkdir(`${dir}/mqueue`, { mode: 0o700 });
  await Deno.writeTextFile(`${dir}/mailertable`, mailertable);
  await Deno.writeTextFile(`${dir}/service.switch`, "hosts files\naliases files\n");
  await Deno.writeTextFile(`${dir}/hosts`, `127.0.0.1 localhost\n${host} ${MTA_NAME} mta\n`);
  await Deno.writeTextFile(`${dir}/resolv.conf`, "nameserver 127.0.0.1\n");
  // The m4 defines: the rig's own, sendmail's Timeout.datafinal when asked, then the caller's (a later define wins).
  const defines: Record<string, string> = {
    confDOMAIN_NAME: MTA_NAME,
    QUEUE_DIR: `${dir}/mqueue`,
    confPID_FILE: `${dir}/sendmail.pid`,
    STATUS_FILE: `${dir}/statistics`,
    confSERVICE_SWITCH_FILE: `${dir}/service.switch`,
    confDONT_PROBE_INTERFACES: "True",
    confDONT_BLAME_SENDMAIL: "TrustStickyBit,MapInUnsafeDirPath",
    confTO_ICONNECT: "5s",
    confTO_CONNECT: "5s",
    confTO_QUEUEWARN: "0",
    // Load shedding off: above QueueLA (default 8) sendmail only queues and skips its queue runs, above RefuseLA (12)
    // it refuses connections (proto.m4 of sendmail 8.17; Cabalmail's out-sendmail.mc sets neither). On this 2-core
    // machine, two suites beside with-busy-cores reach a load of 17, and sendmail stopped retrying for 4 minutes; what
    // the tests prove is the retry schedule, not the load at which sendmail stops.
    confQUEUE_LA: String(SENDMAIL_LOAD_LIMIT),
    confREFUSE_LA: String(SENDMAIL_LOAD_LIMIT),
    ...(opts.datafinal ? { confTO_DATAFINAL: opts.datafinal } : {}),
    ...opts.defines,
  };
  const mc = `divert(-1)dnl
divert(0)dnl
include(\`/usr/share/sendmail/cf/m4/cf.m4')dnl
VERSIONID(\`sinkhole test MTA')dnl
OSTYPE(\`debian')dnl
${
    Object.entries(defines).map(([k, v]) => `define(\`${k}', \`${v}')dnl\n`).join("")
  }undefine(\`confHOST_STATUS_DIRECTORY')dnl
FEATURE(\`nocanonify')dnl
dnl No MSA daemon: Debian's default one binds 0.0.0.0:587, which any other sendmail on the machine may hold (another
dnl rig, another run); sendmail then retries that bind at each queue run and, after about 45 s, exits ("server SMTP
dnl socket wedged"), taking the rig's own daemon with it. Submissions here go to port 25 of the rig's own address.
FEATURE(\`no_default_msa')dnl
FEATURE(\`accept_unresolvable_domains')dnl
FEATURE(\`mailertable', \`hash -o ${dir}/mailertable')dnl
DAEMON_OPTIONS(\`Family=inet, Name=MTA-test, Port=${port}, Addr=${host}')dnl
MAILER_DEFINITIONS
MAILER(\`local')dnl
MAILER(\`smtp')dnl
`;
  await Deno.writeTextFile(`${dir}/test.mc`, mc);
  const m4 = await run("m4", [`${dir}/test.mc`]);
  assertEquals(m4.code, 0, m4.stderr);
  await Deno.writeTextFile(`${dir}/test.cf`, m4.stdout);
  /** Rebuilds the mailertable map from its text file. */
  const makemap = async () => {
    const map = await run("makemap", ["hash", `${dir}/mailertable`], {
      stdin: await Deno.readTextFile(`${dir}/mailertable`),
    });
    assertEquals(map.code, 0, map.stderr);
  };
  await makemap();

  // `bin/sendmail` and `bin/mailq`: this MTA's commands, as they are named inside an MTA container.
  await Deno.mkdir(`${dir}/bin`);
  await Deno.writeTextFile(
    `${dir}/bin/sendmail`,
    `#!/bin/sh\nexec unshare --mount --uts sh -c '${opts.setup ? `${opts.setup} && ` : ""}hostname ${MTA_NAME} && ` +
      `mount --bind "$0/hosts" /etc/hosts && mount --bind "$0/resolv.conf" /etc/resolv.conf && ` +
      `exec /usr/sbin/sendmail -C "$0/test.cf" "$@"' '${dir}' "$@"\n`,
    { mode: 0o755 },
  );
  await Deno.writeTextFile(`${dir}/bin/mailq`, `#!/bin/sh\nexec '${dir}/bin/sendmail' -bp "$@"\n`, { mode: 0o755 });

  /** Runs sendmail with this .cf inside its own namespaces (`stdin`: what to type at it). */
  const sendmailWith = (stdin: string | undefined, ...args: string[]) => run(`${dir}/bin/sendmail`, args, { stdin });
  const sendmail = (...args: string[]) => sendmailWith(undefined, ...args);

  const daemonPid = async () => Number((await Deno.readTextFile(`${dir}/sendmail.pid`)).split("\n")[0]);
  const alive = (pid: number) => {
    try {
      Deno.kill(pid, "SIGCONT");
      return true;
    } catch {
      return false;
    }
  };
  return {
    host,
    port,
    /** Directory holding `sendmail` and `mailq` for this MTA (put it first on PATH). */
    bin: `${dir}/bin`,
    queueDir: `${dir}/mqueue`,
    sendmail,
    sendmailWith,
    makemap,
    /** Starts the daemon (the MTA task); background delivery, queue runs every `queueInterval` (hourly). */
    async start(queueInterval = "1h") {
      await Deno.remove(`${dir}/sendmail.pid`).catch(() => {});
      const r = await sendmail("-bd", `-q${queueInterval}`);
      assertEquals(r.code, 0, r.stderr);
      await eventually(async () => {
        try {
          return alive(await daemonPid());
        } catch {
          return false;
        }
      });
      await eventually(async () => {
        try {
          (await Deno.connect({ hostname: host, port })).close();
          return true;
        } catch {
          return false;
        }
      });
      return await daemonPid();
    },
    /**
     * Kills the daemon the way a task replacement does (SIGKILL, no clean-up), with every
     * process it forked (a queue run in progress): the daemon leads its own process group.
     */
    async kill() {
      const pid = await daemonPid().catch(() => 0);
      if (pid > 0 && alive(pid)) {
        try {
          Deno.kill(-pid, "SIGKILL");
        } catch {
          Deno.kill(pid, "SIGKILL");
        }
        await eventually(() => !alive(pid));
      }
      return pid;
    },
    async mailq(): Promise<string> {
      const r = await sendmail("-bp");
      return r.stdout + r.stderr;
    },
    async queueRun(): Promise<string> {
      const r = await sendmail("-q", "-v");
      return r.stdout + r.stderr;
    },
    /**
     * Forces queue runs until `done(output of every run so far)` holds; returns that output.
     * One run may legitimately pass a message over: the daemon's own queue run (at start,
     * or the delivery attempt right after submission) can still hold its lock. Bounded by
     * `ms`, which is generous: it guards against a hang, it is not what is tested.
     */
    async queueRunsUntil(done: (output: string) => boolean | Promise<boolean>, ms = QUEUE_RUNS_WITHIN_MS) {
      let output = "";
      let runs = 0;
      await eventually(
        async () => {
          const r = await sendmail("-q", "-v");
          output += r.stdout + r.stderr;
          runs++;
          return await done(output);
        },
        ms,
        200,
      );
      return { output, runs };
    },
    alive,
  };
}
