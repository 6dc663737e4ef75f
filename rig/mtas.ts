/**
 * The world's MTAs beside sendmail, one interface: Debian's sendmail (tests/sendmail.ts),
 * Postfix, Exim and OpenSMTPD, each with its own configuration, spool, users and log, in
 * its own `unshare --mount --uts` namespaces, routing each test domain to a loopback
 * address of this run's own.
 *
 * Postfix, Exim and OpenSMTPD conflict with sendmail as Debian packages, so they are never
 * installed: scripts/mtas.sh (run by .ci/run) unpacks each into a directory of its own
 * (`mtasDir()`), and this rig makes each one's compiled-in world appear inside its mount
 * namespace:
 * - users: a private /etc/passwd and /etc/group with the MTA's own users added, as Debian
 *   builds each (Postfix: `postconf -d` mail_owner `postfix`, setgid_group `postdrop`; Exim:
 *   `Debian-exim`, set again in its configuration; OpenSMTPD: `opensmtpd` and `opensmtpq`,
 *   which smtpd asks for by name at start), so the machine's user database is not touched
 *   and each of the three drops privileges to them as it does in production;
 * - /etc/hosts and /etc/resolv.conf: the MTA's qualified name, a resolver on loopback;
 * - its log: every MTA logs through syslog(3) to /dev/log; /dev is a private tmpfs whose
 *   nodes link to the real ones and whose `log` links to a socket this process serves
 *   (glibc falls back to a stream socket, NUL-terminated messages). Each line is stamped
 *   when it arrives, in milliseconds: the MTA's own stamps have whole seconds;
 * - Exim: a private /etc/ld.so.cache that also lists the unpacked libidn12 (its setuid
 *   binary re-executes itself, and the loader ignores LD_LIBRARY_PATH then);
 * - OpenSMTPD: its compiled-in /var/spool/smtpd, /run/smtpd.sock and chroot
 *   /var/lib/opensmtpd/empty, from private directories bound over /var/spool, /run, /var/lib.
 *
 * Every process an MTA starts stays in its mount namespace; `stop()` ends them all by id
 * (the processes whose /proc/PID/ns/mnt is the MTA's) and waits, bounded, until none is left.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  eventually,
  type Listener,
  REPLY_WAIT_MS,
  ROOT,
  run,
  startListener,
  tempModeFile,
  transaction,
  uniqueLoopback,
} from "./helpers.ts";
import { makeSendmail, MTA_NAME, SMTP_PORT } from "./sendmail.ts";

export const MTA_NAMES = ["sendmail", "postfix", "exim", "opensmtpd"] as const;
export type MtaName = typeof MTA_NAMES[number];

/** Where scripts/mtas.sh unpacked Postfix, Exim and OpenSMTPD. */
export function mtasDir(): string {
  return Deno.env.get("SINKHOLE_MTAS_DIR") ?? `${ROOT.replace(/\/$/, "")}/.mtas`;
}

/** The binary each MTA needs, to tell whether it is here (sendmail is installed; the others unpacked). */
export function mtaBinary(name: MtaName): string {
  const d = mtasDir();
  return {
    sendmail: "/usr/sbin/sendmail",
    postfix: `${d}/postfix/usr/lib/postfix/sbin/master`,
    exim: `${d}/exim/usr/sbin/exim4`,
    opensmtpd: `${d}/opensmtpd/usr/sbin/smtpd`,
  }[name];
}

/** How each MTA is made to retry within seconds, as the rig configures it (for reports and docs). */
export const RETRY_SETTINGS: Record<MtaName, string> = {
  sendmail: "daemon `-q5s` (a queue run every 5 s; MinQueueAge 0; QueueLA and RefuseLA 1000: no load shedding)",
  postfix: "`queue_run_delay = 2s`, `minimal_backoff_time = 4s`, `maximal_backoff_time = 4s`",
  exim: "retry rule `* * F,5m,4s`, daemon `-q1s`",
  opensmtpd: "backoff fixed at build time (not settable): the rig forces retries with `smtpctl schedule all`",
};

/** The MTA's own queue interval for sendmail, in seconds. */
const SENDMAIL_QUEUE_INTERVAL = "5s";
/** How often the rig forces OpenSMTPD's retries (`smtpctl schedule all`) while a test waits: a pace, not a measure. */
export const OPENSMTPD_KICK_MS = 4_000;
/** A bounded wait for an MTA's processes to end after it was told to stop, before SIGKILL. */
const STOP_WAIT_MS = 30_000;

/** One delivery attempt as the MTA logged it: when the line arrived, to whom, of which queued message, and what came of it. */
export interface MtaAttempt {
  at: number;
  rcpt: string;
  /** The MTA's own id of the queued message (OpenSMTPD: of the envelope): two messages to one recipient differ here. */
  queueId: string;
  outcome: "deferred" | "sent" | "bounced";
  text: string;
}

/** A log line from the MTA's syslog, stamped on arrival (ms), without its `<pri>date host` prefix. */
export interface MtaLogLine {
  at: number;
  text: string;
}

/**
 * The delivery attempts in an MTA's log line, one per recipient (sendmail names every recipient
 * of one outcome in one line), or none when the line is about something else (reception, queue
 * runs, a retry skipped before its time, which made no connection).
 * Each MTA's wording, from its own logs as this rig saw them (tests/mtas_test.ts holds samples).
 */
export function attemptsInLine(name: MtaName, text: string): Omit<MtaAttempt, "at">[] {
  const outcome = (s: string): MtaAttempt["outcome"] | undefined =>
    s === "sent" ? "sent" : s === "deferred" ? "deferred" : s === "bounced" ? "bounced" : undefined;
  const one = (rcpt: string, queueId: string, o: MtaAttempt["outcome"] | undefined) =>
    o ? [{ rcpt: rcpt.toLowerCase(), queueId, outcome: o, text }] : [];
  switch (name) {
    case "sendmail": {
      // sendmail[pid]: qid: to=<r>[,<r2>...], ..., mailer=smtp, ..., relay=[a] [a], dsn=4.3.2, stat=Deferred: 421 ...
      const m = /^sendmail\[\d+\]: (\w+): to=(\S+?), .* mailer=(?:e?smtp|relay),.* dsn=(\d)\.\d+\.\d+, .*stat=/
        .exec(text);
      if (!m) return [];
      const kind = m[3] === "2" ? "sent" : m[3] === "4" ? "deferred" : "bounced";
      return m[2].split(",").flatMap((r) => one(r.replace(/^<|>$/g, ""), m[1], kind));
    }
    case "postfix": {
      // postfix/smtp[pid]: QID: to=<r>, relay=h[a]:25, delay=..., dsn=4.3.2, status=deferred (...)
      // (relay=none: no connection was made; postfix/error lines: a retry skipped, no connection)
      const m = /^postfix\/smtp\[\d+\]: (\w+): to=<([^>]+)>, relay=(?!none)\S+, .* status=(\w+)/.exec(text);
      return m ? one(m[2], m[1], outcome(m[3])) : [];
    }
    case "exim": {
      // qid => r R=... T=remote_smtp H=...; qid -> r2 (another recipient of that delivery);
      // qid == r R=... defer (n) H=... (a host was tried); qid ** r ... (bounced)
      const m = /^exim\[\d+\]: (\S+) (=>|->|==|\*\*) (\S+) .*\bT=remote_smtp\b(.*)$/.exec(text);
      if (!m) return [];
      if (m[2] === "==" && !/\bH=/.test(m[4])) return []; // "retry time not reached": no connection
      return one(m[3], m[1], m[2] === "=>" || m[2] === "->" ? "sent" : m[2] === "==" ? "deferred" : "bounced");
    }
    case "opensmtpd": {
      // smtpd[pid]: <id> mta delivery evpid=... from=<s> to=<r> rcpt=<-> source="..." relay="..." delay=.. result="TempFail" stat="..."
      const m = /^smtpd\[\d+\]: \S+ mta delivery evpid=(\w+) .* to=<([^>]+)> .*result="(\w+)"/.exec(text);
      if (!m) return [];
      const kind = m[3] === "Ok"
        ? "sent"
        : m[3] === "TempFail"
        ? "deferred"
        : m[3] === "PermFail"
        ? "bounced"
        : undefined;
      return one(m[2], m[1], kind);
    }
  }
}

/** A syslog message as glibc sends it (`<pri>Mmm dd hh:mm:ss tag[pid]: text`) → `tag[pid]: text`. */
export function syslogText(message: string): string {
  return message.replace(/^<\d+>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d /, "").replace(/\s+$/, "");
}

/** Serves a syslog stream socket at `path`: every message, stamped when it arrived. */
function syslogReceiver(path: string) {
  const lines: MtaLogLine[] = [];
  const listener = Deno.listen({ transport: "unix", path });
  const conns = new Set<Deno.Conn>();
  const readers: Promise<void>[] = [];
  const accepting = (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      readers.push((async () => {
        let rest = "";
        const dec = new TextDecoder();
        try {
          for await (const chunk of conn.readable) {
            rest += dec.decode(chunk, { stream: true });
            let end;
            while ((end = rest.search(/[\0\n]/)) >= 0) {
              const message = rest.slice(0, end);
              rest = rest.slice(end + 1);
              if (message.trim()) lines.push({ at: Date.now(), text: syslogText(message) });
            }
          }
        } catch { /* the MTA went away */ }
        conns.delete(conn);
      })());
    }
  })().catch(() => {});
  return {
    lines,
    async close() {
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      await accepting;
      await Promise.all(readers);
    },
  };
}

/** Users and groups of an MTA's own, with ids free on this machine (a private passwd and group). */
function freeIds(count: number): number[] {
  const taken = new Set<number>();
  for (const f of ["/etc/passwd", "/etc/group"]) {
    for (const line of Deno.readTextFileSync(f).split("\n")) {
      const id = Number(line.split(":")[2]);
      if (Number.isInteger(id)) taken.add(id);
    }
  }
  const ids: number[] = [];
  for (let id = 61_000; ids.length < count && id < 65_000; id++) if (!taken.has(id)) ids.push(id);
  assertEquals(ids.length, count, "free user ids");
  return ids;
}

interface NamespaceSpec {
  dir: string;
  /** The MTA's users (each with a group of its name) and extra groups. */
  users: string[];
  groups?: string[];
  /** Directories of this rig bound over the MTA's compiled-in paths: [ours, theirs]. */
  binds?: [string, string][];
  /** A private /etc/ld.so.cache built with these library directories too. */
  libDirs?: string[];
}

/** The shell commands that make an MTA's world inside its namespace; the uid of each user. */
async function prepareNamespace(spec: NamespaceSpec): Promise<{ setup: string; uid: Record<string, number> }> {
  const { dir } = spec;
  const names = [...spec.users, ...(spec.groups ?? [])];
  const ids = freeIds(names.length);
  const uid: Record<string, number> = {};
  names.forEach((n, i) => uid[n] = ids[i]);
  let passwd = await Deno.readTextFile("/etc/passwd");
  let group = await Deno.readTextFile("/etc/group");
  const nl = (s: string) => s.endsWith("\n") ? s : s + "\n";
  passwd = nl(passwd) + spec.users.map((u) => `${u}:x:${uid[u]}:${uid[u]}::/nonexistent:/usr/sbin/nologin\n`).join("");
  group = nl(group) + names.map((g) => `${g}:x:${uid[g]}:\n`).join("");
  await Deno.mkdir(`${dir}/ns/olddev`, { recursive: true });
  await Deno.writeTextFile(`${dir}/ns/passwd`, passwd);
  await Deno.writeTextFile(`${dir}/ns/group`, group);
  await Deno.writeTextFile(`${dir}/ns/hosts`, `127.0.0.1 localhost\n127.0.0.1 ${MTA_NAME} mta\n`);
  await Deno.writeTextFile(`${dir}/ns/resolv.conf`, "nameserver 127.0.0.1\n");
  const cmds = [
    `hostname ${MTA_NAME}`,
    ...["passwd", "group", "hosts", "resolv.conf"].map((f) => `mount --bind ${dir}/ns/${f} /etc/${f}`),
  ];
  if (spec.libDirs) {
    await Deno.writeTextFile(`${dir}/ns/ld.so.conf`, `include /etc/ld.so.conf\n${spec.libDirs.join("\n")}\n`);
    const r = await run("ldconfig", ["-X", "-C", `${dir}/ns/ld.so.cache`, "-f", `${dir}/ns/ld.so.conf`]);
    assertEquals(r.code, 0, r.stderr);
    cmds.push(`mount --bind ${dir}/ns/ld.so.cache /etc/ld.so.cache`);
  }
  for (const [ours, theirs] of spec.binds ?? []) cmds.push(`mount --bind ${ours} ${theirs}`);
  // /dev: a tmpfs of links to the real nodes, and `log` to this rig's syslog socket.
  const nodes = "null zero full random urandom tty pts shm fd stdin stdout stderr ptmx";
  cmds.push(
    `mount --rbind /dev ${dir}/ns/olddev`,
    "mount -t tmpfs -o mode=755 tmpfs /dev",
    `for n in ${nodes}; do ln -s ${dir}/ns/olddev/$n /dev/$n; done`,
    `ln -s ${dir}/log.sock /dev/log`,
  );
  return { setup: cmds.join(" && "), uid };
}

/**
 * argv that runs `command` inside a new mount and UTS namespace after `setup`, in a session of
 * its own (`setsid`: a daemon that signals its process group, or a sibling that does, reaches
 * only its own processes, never another MTA's or the test's).
 */
function inNamespace(setup: string, command: string[]): string[] {
  return ["setsid", "unshare", "--mount", "--uts", "sh", "-c", `${setup} && exec "$@"`, "sh", ...command];
}

/** The mount namespace of a process (its /proc link), or undefined once it is gone. */
function mountNamespace(pid: number): string | undefined {
  try {
    return Deno.readLinkSync(`/proc/${pid}/ns/mnt`);
  } catch {
    return undefined;
  }
}

/** Every process in a mount namespace, by id. */
function processesIn(ns: string): number[] {
  const pids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    if (mountNamespace(Number(e.name)) === ns) pids.push(Number(e.name));
  }
  return pids;
}

/** Signals every process of a namespace, then waits (bounded) until none is left, SIGKILL at the end. */
async function endNamespace(ns: string | undefined): Promise<void> {
  if (!ns) return;
  const signal = (s: Deno.Signal) => {
    for (const pid of processesIn(ns)) {
      try {
        Deno.kill(pid, s);
      } catch { /* gone */ }
    }
  };
  signal("SIGTERM");
  try {
    await eventually(() => processesIn(ns).length === 0, STOP_WAIT_MS, 50);
  } catch {
    signal("SIGKILL");
    await eventually(() => processesIn(ns).length === 0, STOP_WAIT_MS, 50);
  }
}

/** An MTA under test. */
export interface Mta {
  name: MtaName;
  /** Where it takes submissions (SMTP, port 25 of an address of this run's own). */
  host: string;
  port: number;
  /** What the rig set to make it retry within seconds (see RETRY_SETTINGS). */
  retry: string;
  start(): Promise<void>;
  /** Submits a message over SMTP, as an application does; the reply codes. */
  submit(to: string[], opts: { from?: string; messageId: string; subject?: string }): Promise<number[]>;
  /**
   * Waits until `done()` holds, bounded by `ms`. OpenSMTPD's backoff cannot be shortened, so
   * meanwhile the rig forces its retries (`smtpctl schedule all`) every OPENSMTPD_KICK_MS;
   * the other MTAs retry on their own schedules.
   */
  retryUntil(done: () => boolean | Promise<boolean>, ms?: number): Promise<void>;
  /** Every line the MTA logged so far. */
  log(): MtaLogLine[];
  /** Every delivery attempt it logged (to `rcpt` when given). */
  attempts(rcpt?: string): MtaAttempt[];
  /** Ends every process of the MTA and waits until they are gone. */
  stop(): Promise<void>;
}

/**
 * Makes an MTA in `dir` (empty, removed by the caller) that takes mail on an address of
 * its own and routes each domain of `routes` to port 25 of the address given.
 */
export async function makeMta(name: MtaName, dir: string, routes: Record<string, string>): Promise<Mta> {
  const host = uniqueLoopback([SMTP_PORT]);
  await Deno.chmod(dir, 0o755); // each MTA's own users reach their spool below it
  const syslog = syslogReceiver(`${dir}/log.sock`);
  await Deno.chmod(`${dir}/log.sock`, 0o666);
  const lines = syslog.lines;
  // The attempts read so far, and how many lines that took: each line is read once.
  const parsed: MtaAttempt[] = [];
  let read = 0;
  const attempts = (rcpt?: string) => {
    for (; read < lines.length; read++) {
      for (const a of attemptsInLine(name, lines[read].text)) parsed.push({ at: lines[read].at, ...a });
    }
    return rcpt === undefined ? [...parsed] : parsed.filter((a) => a.rcpt === rcpt.toLowerCase());
  };
  let child: Deno.ChildProcess | undefined;
  let exited: Promise<Deno.CommandOutput> | undefined;
  let ns: string | undefined;
  let kick: () => Promise<void> = async () => {};
  const spawn = async (setup: string, command: string[], env: Record<string, string> = {}) => {
    const [cmd, ...args] = inNamespace(setup, command);
    child = new Deno.Command(cmd, { args, env, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();
    const out = exited = child.output();
    const pid = child.pid;
    // The namespace is the child's once unshare has made it (it differs from ours).
    const ours = mountNamespace(Deno.pid);
    await Promise.race([
      eventually(() => {
        const n = mountNamespace(pid);
        return n !== undefined && n !== ours;
      }),
      out.then((o) => {
        throw new Error(`${name} exited with ${o.code}: ${new TextDecoder().decode(o.stderr)}`);
      }),
    ]);
    ns = mountNamespace(pid);
    main = pid;
    out.then((o) => {
      ended = `exited with ${o.signal ? `signal ${o.signal}` : `code ${o.code}`}: ${
        new TextDecoder().decode(o.stderr).slice(-2000)
      }`;
    });
    await Promise.race([
      eventually(async () => {
        try {
          (await Deno.connect({ hostname: host, port: SMTP_PORT })).close();
          return true;
        } catch {
          return false;
        }
      }),
      out.then((o) => {
        throw new Error(
          `${name} exited with ${o.code}: ${new TextDecoder().decode(o.stderr)}\n${
            lines.map((l) => l.text).join("\n")
          }`,
        );
      }),
    ]);
  };
  let startIt: () => Promise<void>;
  /** The MTA's main process (its daemon), and how it ended if it did. */
  let main: number | undefined;
  let ended: string | undefined;
  /** Throws once the MTA's daemon is gone, so a wait fails at once and says so, instead of at its hang guard. */
  const assertRunning = () => {
    if (main === undefined) return;
    if (ended === undefined && mountNamespace(main) === ns) return;
    throw new Error(`${name}'s daemon (pid ${main}) ended while a test waited on it: ${ended ?? "gone"}`);
  };

  switch (name) {
    case "sendmail": {
      const { setup } = await prepareNamespace({ dir, users: [] });
      const mailertable = Object.entries(routes).map(([d, a]) => `${d} smtp:[${a}]\n`).join("");
      await Deno.mkdir(`${dir}/sendmail`);
      // Load shedding is off in every sendmail of the rig (rig/sendmail.ts: QueueLA and RefuseLA 1000).
      const sm = await makeSendmail(`${dir}/sendmail`, { host, port: SMTP_PORT }, mailertable, {
        setup,
      });
      startIt = async () => {
        const pid = await sm.start(SENDMAIL_QUEUE_INTERVAL);
        ns = mountNamespace(pid);
        main = pid;
      };
      break;
    }
    case "postfix": {
      const pf = `${mtasDir()}/postfix`;
      const { setup, uid } = await prepareNamespace({ dir, users: ["postfix"], groups: ["postdrop"] });
      for (const d of ["conf", "spool", "data"]) await Deno.mkdir(`${dir}/${d}`);
      await Deno.chown(`${dir}/data`, uid.postfix, uid.postfix);
      const transport = Object.entries(routes).map(([d, a]) => `${d}=smtp:[${a}]:${SMTP_PORT}`).join(", ");
      // Parameters: postconf(5) of Postfix 3.7; the directories point into the unpacked package.
      await Deno.writeTextFile(
        `${dir}/conf/main.cf`,
        `compatibility_level = 3.6
myhostname = ${MTA_NAME}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains = ${Object.keys(routes).join(" ")}
transport_maps = inline:{ ${transport} }
smtp_host_lookup = native
disable_dns_lookups = yes
queue_directory = ${dir}/spool
data_directory = ${dir}/data
daemon_directory = ${pf}/usr/lib/postfix/sbin
command_directory = ${pf}/usr/sbin
meta_directory = ${pf}/etc/postfix
shlib_directory = ${pf}/usr/lib/postfix
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH
queue_run_delay = 2s
minimal_backoff_time = 4s
maximal_backoff_time = 4s
smtp_tls_security_level = none
alias_maps =
alias_database =
`,
      );
      // master.cf: Debian's master.cf.dist services this rig uses, without chroot.
      const services = [
        `${host}:${SMTP_PORT} inet n - n - - smtpd`,
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "showq unix n - n - - showq",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
      ];
      await Deno.writeTextFile(`${dir}/conf/master.cf`, services.join("\n") + "\n");
      // The shared libraries' RUNPATH is /usr/lib/postfix; master passes LD_LIBRARY_PATH on (import_environment).
      startIt = () =>
        spawn(setup, [`${pf}/usr/sbin/postfix`, "-c", `${dir}/conf`, "start-fg"], {
          LD_LIBRARY_PATH: `${pf}/usr/lib/postfix`,
        });
      break;
    }
    case "exim": {
      const ex = `${mtasDir()}/exim`;
      const { setup, uid } = await prepareNamespace({
        dir,
        users: ["Debian-exim"],
        libDirs: [`${ex}/usr/lib/x86_64-linux-gnu`],
      });
      await Deno.mkdir(`${dir}/spool`);
      await Deno.chown(`${dir}/spool`, uid["Debian-exim"], uid["Debian-exim"]);
      const routeList = Object.entries(routes).map(([d, a]) => `${d} ${a}`).join(" ; ");
      // Options: Exim 4.96's spec (chapters "Main configuration", "manualroute", "smtp transport", "Retry configuration").
      await Deno.writeTextFile(
        `${dir}/exim.conf`,
        `exim_path = ${ex}/usr/sbin/exim4
primary_hostname = ${MTA_NAME}
local_interfaces = <; ${host}.${SMTP_PORT}
spool_directory = ${dir}/spool
log_file_path = syslog
syslog_timestamp = false
exim_user = Debian-exim
exim_group = Debian-exim
never_users = root
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
acl_smtp_rcpt = acl_check_rcpt
domainlist relay_to_domains = ${Object.keys(routes).join(" : ")}

begin acl
acl_check_rcpt:
  accept hosts = 127.0.0.0/8
  deny

begin routers
test_domains:
  driver = manualroute
  domains = +relay_to_domains
  transport = remote_smtp
  route_list = ${routeList}

begin transports
remote_smtp:
  driver = smtp
  port = ${SMTP_PORT}
  hosts_try_fastopen = :
  hosts_avoid_tls = *

begin retry
* * F,5m,4s
`,
      );
      startIt = () => spawn(setup, [`${ex}/usr/sbin/exim4`, "-C", `${dir}/exim.conf`, "-bdf", "-q1s"]);
      break;
    }
    case "opensmtpd": {
      const os = `${mtasDir()}/opensmtpd`;
      for (const d of ["var-spool/smtpd", "run", "var-lib/opensmtpd/empty"]) {
        await Deno.mkdir(`${dir}/${d}`, { recursive: true });
      }
      await Deno.chmod(`${dir}/var-spool/smtpd`, 0o711); // smtpd refuses any other mode
      const { setup, uid } = await prepareNamespace({
        dir,
        users: ["opensmtpd", "opensmtpq"],
        binds: [[`${dir}/var-spool`, "/var/spool"], [`${dir}/run`, "/run"], [`${dir}/var-lib`, "/var/lib"]],
      });
      // smtpd.conf(5) of OpenSMTPD 6.8: one relay action per routed domain.
      const conf = [
        `listen on ${host} port ${SMTP_PORT}`,
        ...Object.entries(routes).flatMap(([d, a], i) => [
          `action "r${i}" relay host smtp://${a}:${SMTP_PORT}`,
          `match from any for domain "${d}" action "r${i}"`,
        ]),
      ].join("\n") + "\n";
      await Deno.writeTextFile(`${dir}/smtpd.conf`, conf);
      startIt = () => spawn(setup, [`${os}/usr/sbin/smtpd`, "-F", "-f", `${dir}/smtpd.conf`]);
      // smtpctl must be setgid opensmtpq (Debian installs it so): a copy of it, with this rig's gid.
      await Deno.copyFile(`${os}/usr/sbin/smtpctl`, `${dir}/smtpctl`);
      await Deno.chown(`${dir}/smtpctl`, 0, uid.opensmtpq);
      await Deno.chmod(`${dir}/smtpctl`, 0o2555);
      kick = async () => {
        const pid = child?.pid;
        if (pid === undefined) return;
        const r = await run("nsenter", ["--target", String(pid), "--mount", `${dir}/smtpctl`, "schedule", "all"]);
        assertEquals(r.code, 0, `smtpctl schedule all: ${r.stdout}${r.stderr}`);
      };
      break;
    }
  }

  return {
    name,
    host,
    port: SMTP_PORT,
    retry: RETRY_SETTINGS[name],
    start: () => startIt(),
    submit: (to, opts) =>
      transaction(SMTP_PORT, {
        host,
        from: opts.from ?? "tester@origin.test",
        to,
        body: `Message-ID: <${opts.messageId}>\r\nSubject: ${opts.subject ?? opts.messageId}\r\n\r\ntest`,
      }),
    async retryUntil(until, ms = REPLY_WAIT_MS * 3) {
      const done = async () => {
        if (await until()) return true;
        assertRunning();
        return false;
      };
      if (name !== "opensmtpd") return await eventually(done, ms, 100);
      const deadline = Date.now() + ms;
      while (!(await done())) {
        assert(Date.now() < deadline, `${name}: not done within ${ms} ms`);
        await kick();
        await eventually(done, OPENSMTPD_KICK_MS, 100).catch(() => {});
      }
    },
    log: () => lines,
    attempts,
    async stop() {
      // A namespace's id is reused once its last process is gone: signal its processes only while
      // the daemon is still in it (if the daemon died on its own, assertRunning has said so).
      const daemonIn = main !== undefined && mountNamespace(main) === ns;
      main = undefined;
      if (daemonIn) await endNamespace(ns);
      await exited?.catch(() => {});
      await syslog.close();
    },
  };
}

/** One connection through a `WireRecorder`: when it opened and closed (ms), and what the client sent. */
export interface WireSession {
  opened: number;
  closed?: number;
  /** The client's lines, as sent (commands and message text alike), and when each arrived (ms). */
  lines: string[];
  times: number[];
}

/**
 * A relay between an MTA and the sinkhole that records what the MTA sent, line by line: what
 * was on the wire, known without the listener (an MTA names the recipients of one transaction in
 * an order of its own, and a sinkhole that closes at one recipient reads none after it). It
 * passes bytes both ways unchanged and closes each side when the other closes.
 */
export interface WireRecorder {
  /** Where it listens (port SMTP_PORT), an address of this run's own. */
  host: string;
  sessions: WireSession[];
  close(): Promise<void>;
}

/** One transaction on the wire: its recipients in the order sent (lower case), from its MAIL to the next or the close. */
export interface WireTransaction {
  rcpts: string[];
  opened: number;
  closed?: number;
}

/** The transactions of a session (an MTA may send several messages over one connection); message text is skipped. */
export function transactionsOf(session: WireSession): WireTransaction[] {
  const out: WireTransaction[] = [];
  let inData = false;
  session.lines.forEach((line, i) => {
    if (inData) {
      inData = line !== ".";
      return;
    }
    if (/^DATA$/i.test(line)) inData = true;
    else if (/^MAIL FROM:/i.test(line)) {
      const last = out.at(-1);
      if (last) last.closed = session.times[i];
      out.push({ rcpts: [], opened: session.times[i] });
    } else {
      const m = /^RCPT TO:<([^>]*)>/i.exec(line);
      if (m && out.length > 0) out.at(-1)!.rcpts.push(m[1].toLowerCase());
    }
  });
  const last = out.at(-1);
  if (last) last.closed = session.closed;
  return out;
}

export function wireRecorder(target: string): WireRecorder {
  const host = uniqueLoopback([SMTP_PORT]);
  const listener = Deno.listen({ hostname: host, port: SMTP_PORT });
  const sessions: WireSession[] = [];
  const conns = new Set<Deno.Conn>();
  const relays: Promise<void>[] = [];
  const closeQuietly = (c: Deno.Conn) => {
    try {
      c.close();
    } catch { /* closed */ }
    conns.delete(c);
  };
  const relay = async (client: Deno.Conn) => {
    const session: WireSession = { opened: Date.now(), lines: [], times: [] };
    sessions.push(session);
    conns.add(client);
    let server: Deno.Conn;
    try {
      server = await Deno.connect({ hostname: target, port: SMTP_PORT });
    } catch {
      closeQuietly(client);
      return;
    }
    conns.add(server);
    const end = () => {
      session.closed ??= Date.now();
      closeQuietly(client);
      closeQuietly(server);
    };
    const down = (async () => {
      try {
        for await (const chunk of server.readable) await writeAll(client, chunk);
      } catch { /* either side went */ }
      end();
    })();
    const up = (async () => {
      const dec = new TextDecoder();
      let rest = "";
      try {
        for await (const chunk of client.readable) {
          rest += dec.decode(chunk, { stream: true });
          const parts = rest.split("\r\n");
          rest = parts.pop()!;
          const now = Date.now();
          for (const p of parts) session.lines.push(p), session.times.push(now);
          await writeAll(server, chunk);
        }
      } catch { /* either side went */ }
      end();
    })();
    await Promise.all([down, up]);
  };
  const accepting = (async () => {
    for await (const c of listener) relays.push(relay(c));
  })().catch(() => {});
  return {
    host,
    sessions,
    async close() {
      listener.close();
      for (const c of [...conns]) closeQuietly(c);
      await accepting;
      await Promise.all(relays);
    },
  };
}

/** Writes all of `data` to `conn`. */
async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
}

/** An MTA with its sinkhole (mode from a file) and the sender's domain (accept-log), for one test or script. */
export interface MtaRig {
  mta: Mta;
  sink: Listener;
  origin: Listener;
  /** `wire.test` goes to the sinkhole through this recorder: what the MTA sent there, line by line. */
  wire: WireRecorder;
  /** Writes the sinkhole's mode file and waits until the sinkhole logged the new mode. */
  setMode(mode: string): Promise<void>;
}

/**
 * Runs `fn` with an MTA routing `sinkhole.test` to a sinkhole, `wire.test` to the same sinkhole
 * through a `WireRecorder`, and `origin.test` to a second listener (where DSNs go), each on port 25 of an address of this run's own; then stops all
 * three. `keep`: a directory to write the MTA's log to (NAME.log); `sinkEnv`: more of the sinkhole's environment. On a failure, what each side
 * saw goes to standard error.
 */
export async function withMtaRig<T>(
  name: MtaName,
  fn: (rig: MtaRig) => Promise<T>,
  opts: { keep?: string; sinkEnv?: Record<string, string> } = {},
): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: `sinkhole-${name}-` });
  const modeFile = await tempModeFile("accept");
  const sinkHost = uniqueLoopback([SMTP_PORT]);
  const originHost = uniqueLoopback([SMTP_PORT]);
  let sink: Listener | undefined;
  let origin: Listener | undefined;
  let mta: Mta | undefined;
  let wire: WireRecorder | undefined;
  try {
    sink = await startListener({ SINKHOLE_MODE_FILE: modeFile, SINKHOLE_CACHE_TTL: "0.2", ...opts.sinkEnv }, {
      host: sinkHost,
      port: SMTP_PORT,
    });
    origin = await startListener({ SINKHOLE_MODE: "accept-log" }, { host: originHost, port: SMTP_PORT });
    wire = wireRecorder(sinkHost);
    mta = await makeMta(name, dir, { "sinkhole.test": sinkHost, "origin.test": originHost, "wire.test": wire.host });
    await mta.start();
    const s = sink;
    const result = await fn({
      mta,
      sink,
      origin,
      wire,
      setMode: async (mode) => {
        await Deno.writeTextFile(modeFile, `${mode}\n`);
        await eventually(() => s.logs.findLast((x) => x.event === "mode")?.mode === mode);
      },
    });
    if (opts.keep) {
      await Deno.writeTextFile(`${opts.keep}/${name}.log`, mta.log().map((l) => `${l.at} ${l.text}\n`).join(""));
    }
    return result;
  } catch (e) {
    // What each side saw, to tell the MTA's doing from the listener's.
    console.error(`${name}'s log:\n${mta?.log().map((l) => `${l.at} ${l.text}`).join("\n")}`);
    console.error(`sinkhole attempts:\n${sink?.events("attempt").map((a) => JSON.stringify(a)).join("\n")}`);
    throw e;
  } finally {
    await mta?.stop();
    await wire?.close();
    await sink?.stop();
    await origin?.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    await Deno.remove(modeFile).catch(() => {});
  }
}

/** One scenario's evidence, for the assertions and for docs/mtas.md. */
export interface Observed {
  mta: MtaName;
  scenario: string;
  mode: string;
  outcomes: MtaAttempt["outcome"][];
  mtaIntervalsS: number[];
  ledgerIntervalsS: number[];
  /** The largest difference (s) between the ledger's intervals and the MTA's for the same attempts. */
  maxDiffS?: number;
  deliveries: number;
  duplicate: boolean;
  bounced: boolean;
  /** Seconds from the first attempt to the DSN reaching the sender's domain, when one did. */
  dsnAfterS?: number;
  /**
   * A row for several messages (the seeded rate, 50 messages in one queue run): how many, the
   * attempts of each, and seconds from the first delivery to the last (MTA log); `outcomes` and
   * the intervals are then every message's, one message after the other.
   */
  messages?: number;
  attemptsPerMessage?: number[];
  /** How the ledger's report cut the same attempts into messages, when that differs from the MTA's. */
  ledgerAttemptsPerMessage?: number[];
  /** Attempts the MTA logged for a recipient it never named on the wire (a drop cut the session before). */
  unheard?: number;
  deliveredOverS?: number;
}
