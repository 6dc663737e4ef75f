/**
 * sinkhole — an SMTP failure-injection fixture.
 *
 * One file, one job: answer every SMTP transaction the way the operator's current mode
 * says. Typed configuration at the top, pure policy in the middle, thin I/O below, `main`
 * at the bottom. The image holds this file compiled (`deno compile`, scripts/compile.ts).
 *
 * Contents
 *   1. Limits and configuration   every bound the listener enforces, and the environment
 *   2. The mode language          parseScenario: what an operator can ask for
 *   3. Replies                    every fixed reply text, in one table
 *   4. Policy: the decision table decide(): every answer the scenario gives, and what it changes (pure)
 *   5. Protocol                   one handler a command: syntax and sequence, then decide()
 *   6. Framing                    LineFramer and MessageReader: lines, dots, sizes (pure)
 *   7. Transcript and log events  the typed JSON lines that ctl, the tests and the runbook read
 *   8. The greylist and attempt tables   first attempts and attempt counts, bounded, off the V8 heap
 *   9. The AWS client             credentials, Signature Version 4, AWS errors (no SDK)
 *  10. Mode sources and the cache SSM, a file or a fixed value, refreshed every TTL
 *  11. Transports                 Deno TCP, or node:net upgradable with STARTTLS
 *  12. The STARTTLS certificate   a self-signed X.509 certificate, its DER written here
 *  13. Session and server         the I/O: carries out what the policy decided
 *  14. The control port           optional JSON over HTTP: the mode set and confirmed, the ledger, a clean slate
 *  15. Health check and main
 *
 * "How the listener is built" in docs/design.md walks through these layers.
 */

// ---------------------------------------------------------------------------
// 1. Limits and configuration
// ---------------------------------------------------------------------------

/** RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF. */
export const MAX_COMMAND_LINE = 512;
/** RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with CRLF. */
export const MAX_TEXT_LINE = 1000;
/** RFC 5321 §4.5.3.1.8 asks servers to take at least 100 recipients. */
export const MAX_RECIPIENTS = 100;
/** Largest message accepted (advertised with SIZE; the body is discarded). */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
/** RFC 5321 §4.5.3.1.3: a path is at most 256 octets. */
export const MAX_PATH_LENGTH = 256;
/** Protocol errors tolerated in one session before it is closed with 421. */
export const MAX_ERRORS_PER_SESSION = 20;
/** Concurrent sessions; one more is greeted with 421 and closed. */
export const DEFAULT_MAX_SESSIONS = 400;
/**
 * The most SINKHOLE_MAX_SESSIONS may ask for: what the process's V8 flags (a 24 MB old
 * space) carry at the budget's worst case without a crash (tests/memory_test.ts runs it);
 * the default keeps the whole worst case under 96 MiB (docs/protocol.md, "Memory budget").
 */
export const MAX_SESSIONS_CAP = 600;
/** Seconds a session may wait for the client between reads. */
export const DEFAULT_IDLE_TIMEOUT_S = 120;
/** Seconds a whole session may last, whatever the client does. */
export const DEFAULT_SESSION_TIMEOUT_S = 600;
/**
 * Header section logged in accept-log mode (the body is never logged): octets kept in one
 * buffer of this size while the message is read (whatever the header's shape: folded, many
 * short lines, one long field), each field charged one octet more for its separator. Fields
 * are kept whole, in order, up to the first one that does not fit.
 */
export const MAX_LOGGED_HEADER_BYTES = 4 * 1024;
/** Transactions and replies kept for one session's log line. */
export const MAX_LOGGED_TRANSACTIONS = 20;
export const MAX_LOGGED_REPLIES = 64;
/**
 * Octets of text one session's transcript keeps (modes, senders, recipients), each entry
 * charged KEPT_ENTRY_COST more for its object; past it entries are counted, not kept.
 */
export const MAX_TRANSCRIPT_BYTES = 4 * 1024;
/**
 * Octets a transaction keeps of its own for its accepted recipients (each address charged
 * KEPT_ENTRY_COST more): what goes beyond it is drawn from the shared RCPT_POOL_BYTES.
 */
export const MAX_KEPT_RCPT_BYTES = 2 * 1024;
/**
 * Octets of accepted recipients kept beyond their transaction's own MAX_KEPT_RCPT_BYTES, shared
 * by every session: a recipient that fits in neither is answered `452 4.5.3` (RFC 5321
 * §4.5.3.1.10), never accepted and left out of the ledger. 1 MiB holds a full transaction
 * (MAX_RECIPIENTS paths of MAX_PATH_LENGTH) at once for 39 sessions, or of 30-octet addresses
 * for 250 (docs/protocol.md, "Memory budget"); SINKHOLE_RCPT_POOL_BYTES may make it smaller.
 */
export const RCPT_POOL_BYTES = 1024 * 1024;
/** What a kept string or entry is charged on top of its octets (V8's object and string headers). */
export const KEPT_ENTRY_COST = 32;
/** Replies queued and not yet written, in octets: past it the session writes before it reads on. */
export const MAX_PENDING_REPLY_BYTES = 8 * 1024;
/** The longest log line written: CloudWatch Logs takes events up to 256 KiB (262,144 octets less 26). */
export const MAX_LOG_LINE_BYTES = 256 * 1024 - 26;
/**
 * Log lines waiting for stdout, in octets at most: two buffers made once, each room for the longest
 * line and the one that says what was dropped. Lines are written in the background, so a slow
 * reader of stdout never stops the event loop. Past it lines are
 * counted, not kept, until the writer catches up; then one `log_dropped` line says how many.
 */
export const MAX_LOG_QUEUE_BYTES = 2 * (MAX_LOG_LINE_BYTES + 1024);
/**
 * How long an orderly stop waits for the queued log lines to be written. A stdout nobody reads
 * must not keep a stopping listener alive until it is killed (ECS sends SIGKILL 30 s after
 * SIGTERM); what is still queued then is lost, and stderr says how many octets.
 */
export const LOG_DRAIN_ON_STOP_MS = 5_000;
/**
 * How long log lines gather before they are written, at most: one write (and one timer) for
 * every line of that time, not one a timer turn (at thousands of messages a second a write a turn
 * cost a tenth of the listener's time). A line reaches stdout at most this late; a queue half
 * filled past LOG_WRITE_AT_BYTES is written at once, long before it could overflow.
 */
export const LOG_GATHER_MS = 20;
/** Octets queued that end the gathering at once (about an eighth of a queue half: it never waits to fill). */
export const LOG_WRITE_AT_BYTES = 32 * 1024;
/** Octets read from a mode file at most (a value is at most MAX_SCENARIO_LENGTH characters). */
export const MAX_MODE_FILE_BYTES = 4 * 1024;
/** Octets of an AWS answer read at most (an SSM parameter value is at most 8 KiB; credentials are smaller). */
export const MAX_AWS_RESPONSE_BYTES = 64 * 1024;
/** Temporary credentials (the ECS task role's) are fetched again this long before they expire. */
export const CREDENTIAL_REFRESH_MARGIN_MS = 5 * 60_000;
/** Distinct greylist keys remembered; the oldest is forgotten past it. */
export const MAX_GREYLIST_ENTRIES = 100_000;
/**
 * Ring slots per table entry (DigestTable): room for deleted slots between compactions. Each
 * slot is three float64 (24 octets), and the index two to four int32 an entry: at most 24 × 1.25 + 16 = 46.
 */
export const RING_SLACK = 1.25;
/** What one greylist entry holds in memory, whatever its key: a digest, a time, a window, an index slot. */
export const GREYLIST_ENTRY_BYTES = 48;
/**
 * Sessions upgraded to TLS, or upgrading, at once at most: past it STARTTLS is answered
 * `454 4.7.0` (REPLIES.tlsBusy) and the session goes on in plaintext. A TLS session costs
 * node:tls and rustls state (about 100 KiB) and its records' buffers on top of a plain one,
 * more than the byte budget has for every session at the default cap (docs/protocol.md).
 */
export const MAX_TLS_SESSIONS = 64;
/** Bytes read from a socket at once (one buffer per session: 1000 sessions hold 4 MiB). */
export const READ_BUFFER_BYTES = 4 * 1024;
/** Read buffers kept from ended sessions for new ones, at most (256 KiB; open sessions hold theirs anyway). */
export const MAX_SPARE_READ_BUFFERS = 64;
/** Timeouts are checked by one sweep at most this far apart (not a timer per read). */
export const TIMEOUT_SWEEP_MAX_MS = 1_000;
/** A mode-source request is abandoned after this long. */
export const MODE_FETCH_TIMEOUT_MS = 5_000;
/** Start-up waits at most this long for the first mode before listening. */
export const MODE_INITIAL_WAIT_MS = 2_000;
/** On SIGTERM, sessions inside DATA get this long to finish. */
export const SHUTDOWN_GRACE_MS = 10_000;
/** After a failed accept (out of file descriptors, say), wait this long before the next. */
export const ACCEPT_ERROR_BACKOFF_MS = 100;
/** A last reply (421 on timeout or shutdown) gets this long to be written. */
export const GOODBYE_WRITE_MS = 1_000;
/**
 * A drop's lingering close (Apache httpd's lingering_close, nginx's `lingering_close`): the
 * write side is shut (FIN) at once, then what the client still sends is read and discarded,
 * unanswered, until its own FIN, for at most this long and LINGER_MAX_BYTES (nginx's
 * `lingering_time` is 30 s; a drop holds a session slot meanwhile, so shorter). Closing with
 * input unread would send RST, and a peer's TCP may then discard replies written before the drop.
 */
export const LINGER_MAX_MS = 5_000;
/** Octets a lingering close reads and discards at most: a whole message's worth (MAX_MESSAGE_BYTES). */
export const LINGER_MAX_BYTES = 64 * 1024 * 1024;
/** The health check gives up after this long. */
export const HEALTHCHECK_TIMEOUT_MS = 3_000;
/** The liveness port's default (SINKHOLE_HEALTH_PORT), on SINKHOLE_HEALTH_HOST (127.0.0.1): never the SMTP port. */
export const DEFAULT_HEALTH_PORT = 8025;
/** The longest answer the liveness port gives (`ok 1000/1000`, or `down`). */
export const MAX_HEALTH_ANSWER = 64;
/** The control port `deno task dev` opens on 127.0.0.1 (SINKHOLE_CONTROL_PORT; off in every other default). */
export const DEV_CONTROL_PORT = 2580;
/**
 * Octets of a control request's body read at most (a mode value is at most MAX_SCENARIO_LENGTH
 * characters): a longer body is answered 413 as soon as its length says so, never read whole.
 */
export const MAX_CONTROL_BODY_BYTES = 4 * 1024;
/**
 * Octets of attempt events the control port keeps for `GET /attempts` (each charged
 * KEPT_ENTRY_COST more; two octets a character when not Latin-1); past it the oldest go.
 * Kept only while the control port is on. The answer is built from them: about four times this.
 */
export const MAX_CONTROL_LEDGER_BYTES = 256 * 1024;

/** The longest mode value (scenario) accepted. */
export const MAX_SCENARIO_LENGTH = 512;
/** The longest delay a scenario may ask for (also bounded by SINKHOLE_SESSION_TIMEOUT). */
export const MAX_DELAY_MS = 10 * 60_000;
/** The longest greylist window or minimum retry delay a scenario may ask for. */
export const MAX_GREYLIST_MS = 7 * 24 * 3_600_000;
/** The longest text of a custom reply. */
export const MAX_REPLY_TEXT = 200;
/** The largest count of attempts a stateful mode may name (`first=N`: the most failing attempts). */
export const MAX_FIRST_ATTEMPTS = 100;
/** The longest outage window `for=` may ask for. */
export const MAX_OUTAGE_MS = 30 * 24 * 3_600_000;
/** Messages (sender and recipient) whose attempts are counted; the least recently first seen is forgotten past it. */
export const MAX_ATTEMPT_ENTRIES = 100_000;
/** What one counted message holds in memory, whatever its addresses (a digest, a time, a count, an index slot). */
export const ATTEMPT_ENTRY_BYTES = 48;
/** Attempts counted per message at most (then the count stays at ATTEMPT_COUNT_SPAN - 1): 11 bits of an entry. */
export const ATTEMPT_COUNT_SPAN = 2048;
/**
 * Times an attempt entry can hold (ms since the epoch, below 2^42: until the year 2109): the
 * first sighting shares its 53 bits with the envelope's earlier attempts (below ATTEMPT_COUNT_SPAN).
 */
export const FIRST_SEEN_SPAN = 2 ** 42;
/** The longest Message-ID kept for an attempt event. */
export const MAX_MESSAGE_ID_LENGTH = 256;
/** Characters of a Message-ID field read at most, folded lines unfolded (past it no ID is taken). */
export const MAX_MESSAGE_ID_FIELD = 1000;
/** Comments nested inside a Message-ID field at most (RFC 5322 §3.2.2 sets none). */
export const MAX_COMMENT_DEPTH = 16;

export const MODES = [
  "defer",
  "bounce",
  "accept",
  "accept-log",
  "greylist",
] as const;
export type Mode = typeof MODES[number];
export const DEFAULT_MODE: Mode = "defer";

export interface Config {
  bindHost: string;
  bindPort: number;
  /** The liveness port: loopback only, answered by the event loop whatever the scenario or the cap. */
  healthHost: string;
  healthPort: number;
  serverName: string;
  /** SSM parameter name (used when source is "ssm"). */
  modeParam: string;
  modeSource: "ssm" | "file" | "static";
  /** Path of the mode file (source "file") or the mode (source "static"). */
  modeFile: string;
  staticMode: string;
  cacheTtlMs: number;
  greylistWindowMs: number;
  maxSessions: number;
  idleTimeoutMs: number;
  sessionTimeoutMs: number;
  /** Offer STARTTLS (SINKHOLE_STARTTLS=on) with this certificate and key (PEM files), or a generated one. */
  startTls: boolean;
  tlsCertFile: string;
  tlsKeyFile: string;
  /** `json` (one JSON object a line: CloudWatch, ctl, the tests) or `text` (one readable line an event: a terminal). */
  logFormat: LogFormat;
  /** The control port (section 14): off when undefined; 0 is any free port, said in the start line. */
  controlHost: string;
  controlPort?: number;
  /** The shared recipient pool's octets: RCPT_POOL_BYTES, or less (SINKHOLE_RCPT_POOL_BYTES, for tests). */
  rcptPoolBytes?: number;
}

export type LogFormat = "json" | "text";

/**
 * Every environment variable the listener reads, its default and its meaning: `--help`
 * prints this table, and docs/environment.md must name each (tests/docs_test.ts).
 */
export const ENVIRONMENT_VARIABLES: readonly { name: string; default: string; help: string }[] = [
  { name: "SINKHOLE_BIND_HOST", default: "0.0.0.0", help: "address to accept SMTP on" },
  { name: "SINKHOLE_BIND_PORT", default: "25", help: "SMTP port (0: any free port, said in the start line)" },
  { name: "SINKHOLE_HEALTH_HOST", default: "127.0.0.1", help: "liveness port's address (--healthcheck asks it)" },
  { name: "SINKHOLE_HEALTH_PORT", default: String(DEFAULT_HEALTH_PORT), help: "liveness port (never the SMTP port)" },
  { name: "SINKHOLE_SERVER_NAME", default: "sinkhole.cabal.internal", help: "name in the greeting and EHLO reply" },
  { name: "SINKHOLE_MODE", default: "", help: "a fixed mode (no SSM, no file); refused at start if invalid" },
  {
    name: "SINKHOLE_MODE_FILE",
    default: "",
    help: "read the mode from this file every TTL (relative to where you stand); wins over SINKHOLE_MODE",
  },
  { name: "SINKHOLE_MODE_PARAM", default: "/cabal/sinkhole_mode", help: "SSM parameter read when neither is set" },
  { name: "SINKHOLE_CACHE_TTL", default: "30", help: "seconds between reads of the mode source" },
  { name: "SINKHOLE_GREYLIST_WINDOW", default: "1800", help: "seconds a greylist entry lives (window= overrides)" },
  {
    name: "SINKHOLE_MAX_SESSIONS",
    default: String(DEFAULT_MAX_SESSIONS),
    help: `open sessions at most (up to ${MAX_SESSIONS_CAP}); then 421`,
  },
  { name: "SINKHOLE_IDLE_TIMEOUT", default: String(DEFAULT_IDLE_TIMEOUT_S), help: "seconds without a command" },
  {
    name: "SINKHOLE_SESSION_TIMEOUT",
    default: String(DEFAULT_SESSION_TIMEOUT_S),
    help: "seconds a session may last in all",
  },
  { name: "SINKHOLE_STARTTLS", default: "off", help: "on: offer STARTTLS (upgraded by node:tls)" },
  { name: "SINKHOLE_TLS_CERT", default: "", help: "PEM certificate for STARTTLS (with the key; else generated)" },
  { name: "SINKHOLE_TLS_KEY", default: "", help: "PEM private key for STARTTLS (with the certificate)" },
  { name: "SINKHOLE_LOG_FORMAT", default: "json", help: "json (CloudWatch, ctl) or text (a terminal; --dev's)" },
  {
    name: "SINKHOLE_CONTROL_PORT",
    default: "",
    help: `HTTP control port (docs/control.md); off when unset (--dev: ${DEV_CONTROL_PORT}; 0: any free port)`,
  },
  {
    name: "SINKHOLE_CONTROL_HOST",
    default: "127.0.0.1",
    help: "control port's address; another than loopback lets other hosts in (a container: 0.0.0.0)",
  },
  { name: "SINKHOLE_HEALTHCHECK_MEMORY", default: "", help: "1: --healthcheck prints its own peak memory (tests)" },
  {
    name: "SINKHOLE_RCPT_POOL_BYTES",
    default: "1048576",
    help: "shared octets for recipients past a transaction's own 2 KiB; only smaller (tests)",
  },
  { name: "AWS_REGION", default: "", help: "SSM's region (else AWS_DEFAULT_REGION)" },
  { name: "AWS_DEFAULT_REGION", default: "", help: "SSM's region when AWS_REGION is unset" },
  { name: "AWS_ENDPOINT_URL_SSM", default: "", help: "SSM endpoint override (else AWS_ENDPOINT_URL)" },
  { name: "AWS_ENDPOINT_URL", default: "", help: "endpoint override for every AWS service (tests: moto)" },
  { name: "AWS_ACCESS_KEY_ID", default: "", help: "static credentials (first in the chain)" },
  { name: "AWS_SECRET_ACCESS_KEY", default: "", help: "static credentials" },
  { name: "AWS_SESSION_TOKEN", default: "", help: "static credentials' session token" },
  {
    name: "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    default: "",
    help: "the ECS task role's credentials (set by ECS)",
  },
  { name: "AWS_CONTAINER_CREDENTIALS_FULL_URI", default: "", help: "container credentials at a full URI" },
  { name: "AWS_CONTAINER_AUTHORIZATION_TOKEN", default: "", help: "token for the full URI" },
  { name: "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", default: "", help: "file holding that token" },
  { name: "INIT_CWD", default: "", help: "set by deno task: where you stand, for a relative SINKHOLE_MODE_FILE" },
];

/** `deno task dev` (`--dev`): these where the environment does not set them; the environment always wins. */
export const DEV_DEFAULTS: Readonly<Record<string, string>> = {
  SINKHOLE_BIND_HOST: "127.0.0.1",
  SINKHOLE_BIND_PORT: "2525",
  SINKHOLE_HEALTH_PORT: "0",
  SINKHOLE_CACHE_TTL: "1",
  SINKHOLE_LOG_FORMAT: "text",
  SINKHOLE_CONTROL_PORT: String(DEV_CONTROL_PORT),
};
/** `--dev`'s mode file, in the repository, when neither SINKHOLE_MODE nor SINKHOLE_MODE_FILE is set. */
export const DEV_MODE_FILE = "sinkhole.mode";

/** The environment as `--dev` sees it: its defaults under whatever is set (an empty value counts as set). */
export function devEnvironment(
  env: (name: string) => string | undefined,
  repository: string,
): (name: string) => string | undefined {
  return (name) => {
    const set = env(name);
    if (set !== undefined) return set;
    if (name === "SINKHOLE_MODE_FILE" && env("SINKHOLE_MODE") === undefined) return `${repository}/${DEV_MODE_FILE}`;
    // Another SMTP port is another listener beside the first: its control port is a free one, said at start.
    if (name === "SINKHOLE_CONTROL_PORT" && env("SINKHOLE_BIND_PORT") !== undefined) return "0";
    return DEV_DEFAULTS[name];
  };
}

/** A path as the user meant it: relative to where they stand (INIT_CWD under deno task), made absolute. */
export function absolutePath(path: string, cwd: string): string {
  const parts: string[] = [];
  for (const part of `${path.startsWith("/") ? "" : `${cwd}/`}${path}`.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") parts.pop();
    else parts.push(part);
  }
  return `/${parts.join("/")}`;
}

/**
 * Reads the configuration from environment variables; throws on bad values. A relative
 * SINKHOLE_MODE_FILE is taken from where the user stands (INIT_CWD, which deno task sets,
 * else `cwd`) and kept absolute, so the logs say which file.
 */
export function configFromEnv(env: (name: string) => string | undefined, cwd = "/"): Config {
  const seconds = (name: string, fallback: number): number => {
    const raw = env(name);
    if (raw === undefined || raw === "") return fallback * 1000;
    const n = Number(raw);
    if (!Number.isFinite(n) || n <= 0) {
      throw new Error(`${name} must be a positive number of seconds, got ${JSON.stringify(raw)}`);
    }
    return Math.round(n * 1000);
  };
  const integer = (name: string, fallback: number, max: number, min = 1): number => {
    const raw = env(name);
    if (raw === undefined || raw === "") return fallback;
    const n = Number(raw);
    if (!/^\d+$/.test(raw) || n < min || n > max) {
      throw new Error(`${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(raw)}`);
    }
    return n;
  };
  const onOff = (name: string): boolean => {
    const raw = (env(name) ?? "off").toLowerCase();
    if (raw !== "on" && raw !== "off" && raw !== "") {
      throw new Error(`${name} must be on or off, got ${JSON.stringify(raw)}`);
    }
    return raw === "on";
  };
  const rawModeFile = env("SINKHOLE_MODE_FILE") ?? "";
  const modeFile = rawModeFile === "" ? "" : absolutePath(rawModeFile, env("INIT_CWD") || cwd);
  const logFormat = (env("SINKHOLE_LOG_FORMAT") || "json").toLowerCase();
  if (logFormat !== "json" && logFormat !== "text") {
    throw new Error(`SINKHOLE_LOG_FORMAT must be json or text, got ${JSON.stringify(env("SINKHOLE_LOG_FORMAT"))}`);
  }
  const staticMode = env("SINKHOLE_MODE") ?? "";
  const invalid = staticMode === "" ? undefined : parseScenario(staticMode);
  if (typeof invalid === "string") throw new Error(`SINKHOLE_MODE ${JSON.stringify(staticMode)}: ${invalid}`);
  if ((env("SINKHOLE_TLS_CERT") ?? "") === "" !== ((env("SINKHOLE_TLS_KEY") ?? "") === "")) {
    throw new Error("SINKHOLE_TLS_CERT and SINKHOLE_TLS_KEY go together (PEM files), or neither for a generated one");
  }
  return {
    bindHost: env("SINKHOLE_BIND_HOST") || "0.0.0.0",
    bindPort: integer("SINKHOLE_BIND_PORT", 25, 65535, 0), // 0: any free port
    healthHost: env("SINKHOLE_HEALTH_HOST") || "127.0.0.1",
    healthPort: integer("SINKHOLE_HEALTH_PORT", DEFAULT_HEALTH_PORT, 65535, 0),
    serverName: env("SINKHOLE_SERVER_NAME") || "sinkhole.cabal.internal",
    modeParam: env("SINKHOLE_MODE_PARAM") || "/cabal/sinkhole_mode",
    modeSource: modeFile !== "" ? "file" : staticMode !== "" ? "static" : "ssm",
    modeFile,
    staticMode,
    cacheTtlMs: seconds("SINKHOLE_CACHE_TTL", 30),
    greylistWindowMs: seconds("SINKHOLE_GREYLIST_WINDOW", 1800),
    maxSessions: integer("SINKHOLE_MAX_SESSIONS", DEFAULT_MAX_SESSIONS, MAX_SESSIONS_CAP),
    idleTimeoutMs: seconds("SINKHOLE_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT_S),
    sessionTimeoutMs: seconds("SINKHOLE_SESSION_TIMEOUT", DEFAULT_SESSION_TIMEOUT_S),
    startTls: onOff("SINKHOLE_STARTTLS"),
    tlsCertFile: env("SINKHOLE_TLS_CERT") ?? "",
    tlsKeyFile: env("SINKHOLE_TLS_KEY") ?? "",
    logFormat,
    controlHost: env("SINKHOLE_CONTROL_HOST") || "127.0.0.1",
    controlPort: (env("SINKHOLE_CONTROL_PORT") ?? "") === ""
      ? undefined
      : integer("SINKHOLE_CONTROL_PORT", 0, 65535, 0),
    rcptPoolBytes: integer("SINKHOLE_RCPT_POOL_BYTES", RCPT_POOL_BYTES, RCPT_POOL_BYTES, 0),
  };
}

// ---------------------------------------------------------------------------
// 2. The mode language
// ---------------------------------------------------------------------------

/** The SMTP stages a scenario can act at. */
export const STAGES = ["connect", "helo", "mail", "rcpt", "data", "eod"] as const;
export type Stage = typeof STAGES[number];
/** The bases of a scenario: the five modes, and dropping the connection without a reply. */
export const BASES = [...MODES, "drop"] as const;
export type Base = typeof BASES[number];

/**
 * A parsed mode value. Plain `defer`, `bounce`, `accept`, `accept-log`, `greylist` are
 * scenarios with their defaults; options refine them (docs/modes.md).
 */
export interface Scenario {
  base: Base;
  /** defer/bounce/drop: where the failure happens; all bases: where `delay` applies. */
  at: Stage;
  /** defer (4xx) or bounce (5xx): the reply instead of the default one. */
  reply?: Reply;
  delayMs: number;
  greylist: { key: "ip" | "triplet"; minMs: number; windowMs?: number };
  /**
   * STARTTLS: `default` offers it when the listener has TLS (SINKHOLE_STARTTLS=on); `off` never;
   * `refuse` offers it and answers 454; `break` offers it, says 220, and closes before any handshake.
   */
  starttls: "default" | "off" | "refuse" | "break";
  /**
   * Stateful failure (defer, bounce, drop at RCPT): the failure applies to the first N attempts
   * of each message, or to every Nth, or within an outage window from its first sighting, or at
   * a seeded rate; otherwise `then` applies. A message is its sender and recipient (`attemptKey`).
   */
  stateful?: Stateful;
  then: "accept" | "defer" | "bounce";
  /** The value as written, whitespace folded: what the logs show. */
  text: string;
}

export type Stateful =
  | { kind: "first"; attempts: number }
  | { kind: "every"; attempts: number }
  | { kind: "for"; ms: number }
  | { kind: "rate"; percent: number; seed: number };

const FAILING: readonly Base[] = ["defer", "bounce", "drop"];

/** `30s`, `1500ms`, `2m`, `1h`, `3d` → milliseconds. */
function parseDuration(raw: string): number | undefined {
  const m = /^(\d{1,9})(ms|s|m|h|d)$/.exec(raw);
  if (!m) return undefined;
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as "ms"];
}

/** Splits `base key=value key="quoted value"` into tokens. */
function tokenize(raw: string): string[] | string {
  const open = /(?:^|\s)([^\s"=]+)="[^"]*$/.exec(raw);
  if (open) return `unterminated quote in ${open[1]}=`;
  const tokens: string[] = [];
  const re = /\s*([^\s"=]+)(?:=(?:"([^"]*)"|([^\s"]*)))?/y;
  let pos = 0;
  const text = raw.trim();
  while (pos < text.length) {
    re.lastIndex = pos;
    const m = re.exec(text);
    if (!m || m.index !== pos) return `cannot read the value at ${JSON.stringify(text.slice(pos, pos + 20))}`;
    tokens.push(m[2] !== undefined ? `${m[1]}=${m[2]}` : m[3] !== undefined ? `${m[1]}=${m[3]}` : m[1]);
    pos = re.lastIndex;
    while (pos < text.length && /\s/.test(text[pos])) pos++;
  }
  return tokens;
}

/** Parses `CODE X.Y.Z text` into a reply; the classes of code and status must agree. */
function parseReply(raw: string): Reply | string {
  const m = /^([245])(\d\d) ([245])\.(\d{1,3})\.(\d{1,3}) ([\x20-\x7e]+)$/.exec(raw.trim());
  if (!m) return `reply must be "CODE X.Y.Z text" (e.g. "451 4.7.1 Try again later"), got ${JSON.stringify(raw)}`;
  if (m[1] !== m[3]) return `reply code ${m[1]}${m[2]} and status ${m[3]}.${m[4]}.${m[5]} disagree on the class`;
  if (m[6].length > MAX_REPLY_TEXT) return `reply text is over ${MAX_REPLY_TEXT} characters`;
  return r(Number(m[1] + m[2]), `${m[3]}.${m[4]}.${m[5]} ${m[6]}`);
}

/** Parses and validates a mode value; a string is the reason it was refused. */
export function parseScenario(raw: string): Scenario | string {
  if (raw.length > MAX_SCENARIO_LENGTH) return `the value is over ${MAX_SCENARIO_LENGTH} characters`;
  const tokens = tokenize(raw);
  if (typeof tokens === "string") return tokens;
  const [first, ...rest] = tokens;
  const base = (first ?? "").toLowerCase() as Base;
  if (!(BASES as readonly string[]).includes(base)) {
    return `unknown mode ${JSON.stringify(first ?? "")}: one of ${BASES.join(", ")}`;
  }
  const sc: Scenario = {
    base,
    at: FAILING.includes(base) ? "rcpt" : "eod",
    delayMs: 0,
    greylist: { key: "ip", minMs: 0 },
    starttls: "default",
    then: "accept",
    text: base, // completed below
  };
  let seed: number | undefined;
  // Canonical text: what the logs show, and parseable again (lower case but a reply's text; spaces quoted).
  const canonical: string[] = [base];
  const seen = new Set<string>();
  for (const token of rest) {
    const eq = token.indexOf("=");
    if (eq < 0) return `expected key=value, got ${JSON.stringify(token)}`;
    const key = token.slice(0, eq).toLowerCase();
    // Case is ignored everywhere but in a custom reply's text, which is sent as written.
    const value = key === "reply" ? token.slice(eq + 1) : token.slice(eq + 1).toLowerCase();
    canonical.push(`${key}=${value.includes(" ") ? `"${value}"` : value}`);
    if (seen.has(key)) return `${key} is given twice`;
    seen.add(key);
    const greylistOnly = () => base === "greylist" ? undefined : `${key}= applies to greylist only`;
    const duration = (max: number) => {
      const ms = parseDuration(value);
      if (ms === undefined) return `${key} must be a duration like 30s, 500ms, 5m, 1h, got ${JSON.stringify(value)}`;
      if (ms > max) return `${key} is over the maximum of ${max / 1000} s`;
      return ms;
    };
    let problem: string | undefined;
    switch (key) {
      case "at":
        if (!(STAGES as readonly string[]).includes(value)) problem = `at must be one of ${STAGES.join(", ")}`;
        else sc.at = value as Stage;
        break;
      case "reply": {
        if (base !== "defer" && base !== "bounce") {
          problem = "reply= applies to defer (4xx) and bounce (5xx) only";
          break;
        }
        const reply = parseReply(value);
        if (typeof reply === "string") problem = reply;
        else if (base === "defer" && (reply.code < 400 || reply.code >= 500)) problem = "defer takes a 4xx reply";
        else if (base === "bounce" && reply.code < 500) problem = "bounce takes a 5xx reply";
        else sc.reply = reply;
        break;
      }
      case "delay": {
        const ms = duration(MAX_DELAY_MS);
        if (typeof ms === "string") problem = ms;
        else sc.delayMs = ms;
        break;
      }
      case "key":
        problem = greylistOnly() ??
          (value === "ip" || value === "triplet" ? undefined : "key must be ip or triplet");
        if (!problem) sc.greylist.key = value as "ip" | "triplet";
        break;
      case "min":
      case "window": {
        problem = greylistOnly();
        if (problem) break;
        const ms = duration(MAX_GREYLIST_MS);
        if (typeof ms === "string") problem = ms;
        else if (key === "min") sc.greylist.minMs = ms;
        else sc.greylist.windowMs = ms;
        break;
      }
      case "starttls":
        if (value === "off" || value === "refuse" || value === "break") sc.starttls = value;
        else problem = "starttls must be off, refuse or break";
        break;
      case "first":
      case "every":
      case "for":
      case "rate": {
        if (!FAILING.includes(base)) {
          problem = `${key}= applies to defer, bounce and drop only`;
          break;
        }
        if (sc.stateful) {
          problem = "one of first=, every=, for= and rate= at a time";
          break;
        }
        if (key === "first") {
          const n = /^\d{1,3}$/.test(value) ? Number(value) : NaN;
          if (!(n >= 1 && n <= MAX_FIRST_ATTEMPTS)) problem = `first must be a count from 1 to ${MAX_FIRST_ATTEMPTS}`;
          else sc.stateful = { kind: "first", attempts: n };
        } else if (key === "every") {
          const n = /^\d{1,3}$/.test(value) ? Number(value) : NaN;
          if (!(n >= 2 && n <= MAX_FIRST_ATTEMPTS)) problem = `every must be a count from 2 to ${MAX_FIRST_ATTEMPTS}`;
          else sc.stateful = { kind: "every", attempts: n };
        } else if (key === "for") {
          const ms = duration(MAX_OUTAGE_MS);
          if (typeof ms === "string") problem = ms;
          else sc.stateful = { kind: "for", ms };
        } else {
          const m = /^(\d{1,3}(?:\.\d{1,2})?)%$/.exec(value);
          const percent = m ? Number(m[1]) : NaN;
          if (!(percent >= 0 && percent <= 100)) problem = "rate must be a percentage like 30%";
          else sc.stateful = { kind: "rate", percent, seed: 0 };
        }
        break;
      }
      case "seed":
        if (!/^\d{1,9}$/.test(value)) problem = "seed must be a whole number (up to 9 digits)";
        else seed = Number(value);
        break;
      case "then":
        if (value === "accept" || value === "defer" || value === "bounce") sc.then = value;
        else problem = "then must be accept, defer or bounce";
        break;
      default:
        problem = `unknown option ${JSON.stringify(key)}: ` +
          "at, reply, delay, key, min, window, starttls, first, every, for, rate, seed, then";
    }
    if (problem) return problem;
  }
  if (seed !== undefined) {
    if (sc.stateful?.kind !== "rate") return "seed= goes with rate=";
    sc.stateful.seed = seed;
  }
  if (seen.has("then") && !sc.stateful) return "then= goes with first=, every=, for= or rate=";
  if (sc.stateful && sc.at !== "rcpt") {
    return "first=, every=, for= and rate= act at rcpt (a message is known by its recipient)";
  }
  if (base === "drop" && sc.at === "connect" && sc.delayMs > 0) return "drop at=connect cannot delay: nothing is sent";
  sc.text = canonical.join(" ");
  return sc;
}

/** The scenario of a plain mode name (for tests and defaults). */
export function scenario(value: string): Scenario {
  const sc = parseScenario(value);
  if (typeof sc === "string") throw new Error(sc);
  return sc;
}

// ---------------------------------------------------------------------------
// 3. Replies
// ---------------------------------------------------------------------------

export interface Reply {
  code: number;
  /** Lines of text after the code; the enhanced status code is part of them. */
  lines: string[];
}

const r = (code: number, ...lines: string[]): Reply => ({ code, lines });

/** Renders a reply as it goes on the wire (multi-line with `-`). */
export function formatReply(reply: Reply): string {
  const last = reply.lines.length - 1;
  return reply.lines.map((line, i) => `${reply.code}${i === last ? " " : "-"}${line}\r\n`).join("");
}

/** Replies whose text is fixed; one place to read what each situation says. */
export const REPLIES = {
  ok: r(250, "2.0.0 OK"),
  senderOk: r(250, "2.1.0 Sender OK"),
  rcptOk: r(250, "2.1.5 Recipient OK"),
  queued: r(250, "2.0.0 Message accepted and discarded"),
  reset: r(250, "2.0.0 Reset state"),
  dataGo: r(354, "End data with <CR><LF>.<CR><LF>"),
  bye: r(221, "2.0.0 Bye"),
  vrfy: r(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery"),
  help: r(214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS"),
  defer: r(421, "4.3.2 Service temporarily unavailable"),
  deferRcpt: r(451, "4.3.2 Service temporarily unavailable"),
  bounceStage: r(554, "5.3.2 Transaction failed"),
  refused: r(503, "5.5.1 No SMTP service here"),
  tlsReady: r(220, "2.0.0 Ready to start TLS"),
  tlsRefused: r(454, "4.7.0 TLS not available due to temporary reason"),
  tlsBusy: r(454, `4.7.0 TLS not available due to temporary reason: ${MAX_TLS_SESSIONS} TLS sessions at most at once`),
  alreadyTls: r(503, "5.5.1 TLS already active"),
  needEhlo: r(503, "5.5.1 Send EHLO first"),
  bounce: r(550, "5.1.1 User unknown"),
  greylisted: r(451, "4.7.1 Greylisted, please try again later"),
  tooManyRcpts: r(452, "4.5.3 Too many recipients"),
  unknown: r(500, "5.5.2 Command unrecognized"),
  lineTooLong: r(500, "5.5.2 Line too long"),
  badChars: r(500, "5.5.2 Command contains invalid characters"),
  notImplemented: r(502, "5.5.1 Command not implemented"),
  heloSyntax: r(501, "5.5.4 Syntax: HELO hostname"),
  ehloSyntax: r(501, "5.5.4 Syntax: EHLO hostname"),
  mailSyntax: r(501, "5.5.4 Syntax: MAIL FROM:<address>"),
  rcptSyntax: r(501, "5.5.4 Syntax: RCPT TO:<address>"),
  badSender: r(501, "5.1.7 Bad sender address syntax"),
  badRcpt: r(501, "5.1.3 Bad recipient address syntax"),
  noArgs: r(501, "5.5.4 Syntax error, no parameters allowed"),
  badParam: r(555, "5.5.4 Unsupported parameter"),
  sizeExceeded: r(552, "5.3.4 Message size exceeds fixed limit"),
  needHelo: r(503, "5.5.1 Send HELO or EHLO first"),
  nestedMail: r(503, "5.5.1 Sender already specified"),
  needMail: r(503, "5.5.1 Need MAIL before RCPT"),
  needRcpt: r(503, "5.5.1 Need RCPT before DATA"),
  noValidRcpts: r(554, "5.5.1 No valid recipients"),
  dataLineTooLong: r(554, "5.6.0 Message has a line over 1000 octets"),
  bareLineEnd: r(550, "5.5.2 Bare <LF> or <CR> in message content, lines must end in <CRLF>"),
  tooManyErrors: r(421, "4.7.0 Too many errors, closing connection"),
  tooManySessions: r(421, "4.3.2 Too many concurrent sessions, try again later"),
  timeout: r(421, "4.4.2 Timeout, closing connection"),
  shutdown: r(421, "4.3.2 Service shutting down"),
} as const;
// ---------------------------------------------------------------------------
// 4. Policy: the decision table
// ---------------------------------------------------------------------------

export type GreylistVerdict = "pass" | "defer";

/** What the greylist table remembers of a key: its first attempt, and the window that opened. */
export interface GreylistEntry {
  at: number;
  windowMs: number;
}

/** The greylist table as the policy sees it: a live entry for a key, or none. Read, never written. */
export type GreylistLookup = (key: string) => GreylistEntry | undefined;

/**
 * A first attempt to remember: the policy says so, the I/O layer writes it into the table.
 * Without `windowMs` the table's own window (SINKHOLE_GREYLIST_WINDOW) applies.
 */
export interface GreylistRecord {
  key: string;
  at: number;
  windowMs?: number;
}

/** The greylist answer for a key's entry at `now`: a retry at least `minMs` after a live first attempt passes. */
export function greylistVerdict(entry: GreylistEntry | undefined, now: number, minMs: number): GreylistVerdict {
  return entry !== undefined && now - entry.at <= entry.windowMs && now - entry.at >= minMs ? "pass" : "defer";
}

export interface Transaction {
  /** The scenario read when the transaction began (MAIL): it holds to the end. */
  scenario: Scenario;
  from: string;
  /** RCPT commands answered so far (whatever the answer; past MAX_RECIPIENTS each is 452). */
  rcptCount: number;
  /** The address of the latest RCPT, for the transcript. */
  lastRcpt?: string;
  /**
   * Accepted recipients (any 2yz reply, RFC 5321 §4.2.1), every one: within MAX_KEPT_RCPT_BYTES
   * of the transaction's own, beyond it drawn from the shared pool (RCPT_POOL_BYTES).
   */
  accepted: string[];
  /** The attempt number (the envelope's, as logged) of each accepted recipient (same order as `accepted`). */
  acceptedAttempts: number[];
  acceptedCount: number;
  /** Octets charged for `accepted` (`keptRecipientCost` each), `pooled` of them drawn from the shared pool. */
  acceptedBytes: number;
  pooled?: number;
  /** Greylist answer for this transaction when keyed by IP, asked once at its first RCPT. */
  greylist?: GreylistVerdict;
}

export interface SessionState {
  helo?: string;
  esmtp: boolean;
  tx?: Transaction;
  errors: number;
  /** Refused at connect with 554: every command but QUIT gets 503 (RFC 5321 §3.1). */
  refused?: boolean;
  /** The session runs over TLS (after STARTTLS). */
  tls?: boolean;
  /** The client said QUIT: a transaction still open was abandoned so (the ledger). */
  quit?: boolean;
}

export const initialState = (): SessionState => ({ esmtp: false, errors: 0 });

/** Everything the policy knows besides the session state: handed in, never read from the world. */
export interface Inputs {
  /** The current scenario (read by MAIL to start a transaction; used before MAIL too). */
  scenario: Scenario;
  serverName: string;
  /** The client's address, for greylist keys. */
  client?: string;
  /** The time, in ms since the epoch: the policy reads no clock. */
  now?: number;
  /** The greylist table's live entries; without it every attempt is a first one. */
  greylist?: GreylistLookup;
  /** The listener can upgrade sessions to TLS (SINKHOLE_STARTTLS=on, a certificate loaded). */
  tlsAvailable?: boolean;
  /** MAX_TLS_SESSIONS sessions are upgraded or upgrading: STARTTLS is offered but answered 454 now. */
  tlsBusy?: boolean;
  /** The attempt table: what is known of a message's earlier attempts; without it every attempt is a first. */
  attempts?: AttemptLookup;
  /** Octets free in the shared recipient pool (RCPT_POOL_BYTES); without it the pool is not bounded. */
  rcptPoolFree?: number;
}

/**
 * What the attempt table knows of a message (an envelope, `attemptKey`): its attempts so far,
 * and when it was first seen (ms). A message ends when it is delivered (handed over at the end
 * of data: 2yz, or dropped there) or bounced (5yz): `ended`. The next attempt with its envelope
 * opens a new message, counted from 1; `before` keeps the envelope's attempts before it, so
 * the log numbers every attempt with the envelope in one sequence and `every=` counts them.
 */
export interface AttemptEntry {
  count: number;
  first: number;
  ended?: true;
  /** The envelope's attempts before this message opened (its ended messages'), up to ATTEMPT_COUNT_SPAN - 1. */
  before?: number;
}
export type AttemptLookup = (key: string) => AttemptEntry | undefined;

/**
 * A message's identity across attempts, sessions, client addresses and MTA tasks: its sender
 * and one recipient, as the envelope gives them (case folded). Known at RCPT, so a message
 * refused before DATA is still recognised on its retry. A message ends when it is delivered or
 * bounced (`AttemptEntry`); two messages with the same sender and recipient in flight at once
 * count as one until one of them ends (docs/ledger.md, "What stays ambiguous").
 */
export function attemptKey(from: string, rcpt: string): string {
  if (from !== lastKeyFrom || rcpt !== lastKeyRcpt) {
    lastKeyFrom = from;
    lastKeyRcpt = rcpt;
    lastKey = `${from.toLowerCase()} > ${rcpt.toLowerCase()}`;
  }
  return lastKey;
}
/** The last envelope attemptKey was asked for, and its key: a message asks again and again (RCPT, end of data, its end). */
let lastKeyFrom = "";
let lastKeyRcpt = "";
let lastKey = " > ";

/**
 * This attempt of a message: its number (1 for the first), when the message was first seen, and
 * the envelope's attempts before the message opened (`every=` counts the envelope's attempts).
 */
export interface Attempt {
  key: string;
  n: number;
  first: number;
  before?: number;
}

/**
 * The attempt table's entry once one more attempt is counted at `now`: the first opens it; after
 * an end a new message opens, counted from 1 (the envelope's attempts so far kept in `before`);
 * else the count goes on (up to ATTEMPT_COUNT_SPAN - 1).
 */
export function counted(seen: AttemptEntry | undefined, now: number): AttemptEntry {
  if (seen === undefined) return { count: 1, first: now };
  if (seen.ended) return { count: 1, first: now, before: envelopeAttempts(seen) };
  const e: AttemptEntry = { count: Math.min(seen.count + 1, ATTEMPT_COUNT_SPAN - 1), first: seen.first };
  if (seen.before !== undefined) e.before = seen.before;
  return e;
}

/** The attempts made with a message's envelope: its ended messages' and its own (up to ATTEMPT_COUNT_SPAN - 1). */
export const envelopeAttempts = (e: { count?: number; n?: number; before?: number }): number =>
  Math.min((e.before ?? 0) + (e.count ?? e.n ?? 0), ATTEMPT_COUNT_SPAN - 1);

/** The attempt table's entry once its message ended (delivered or bounced). */
export function ended(seen: AttemptEntry | undefined, now: number): AttemptEntry {
  const e: AttemptEntry = seen ? { count: seen.count, first: seen.first } : { count: 1, first: now };
  if (seen?.before !== undefined) e.before = seen.before;
  e.ended = true;
  return e;
}

/** A reproducible number in [0, 1) for (seed, message, attempt): FNV-1a over the three. */
export function seededUnit(seed: number, key: string, n: number): number {
  let h = 0x811c9dc5;
  for (const ch of `${seed}|${key}|${n}`) {
    h ^= ch.charCodeAt(0);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b) >>> 0;
  h ^= h >>> 13;
  return (h >>> 0) / 4294967296;
}

/** Whether a stateful scenario still fails this attempt of a message (pure: the clock is an argument). */
export function inFailingPhase(st: Stateful, a: Attempt, now: number): boolean {
  switch (st.kind) {
    case "first":
      return a.n <= st.attempts;
    case "every": // the envelope's attempts: a message ends at its delivery, so its own attempt 1 always passes
      return envelopeAttempts(a) % st.attempts === 0;
    case "for":
      return now - a.first < st.ms;
    case "rate":
      return seededUnit(st.seed, a.key, a.n) < st.percent / 100;
  }
}

/**
 * What happens after a reply: the session goes on; it closes; it closes without sending the
 * reply; it reads a message; it upgrades to TLS (RFC 3207).
 */
export type After = "continue" | "close" | "drop" | "data" | "starttls";

/**
 * The policy's whole answer to one event: what to say, what to do next, and everything it
 * changes. The session carries it out and decides nothing: it writes `remember` into the
 * greylist table, counts `attempt` in the attempt table, and logs `events` once the reply
 * was written (at once when the connection is dropped).
 */
export interface Outcome {
  /** The reply (not sent when `after` is "drop"). */
  reply: Reply;
  state: SessionState;
  after: After;
  /** Wait this long before the reply. */
  delayMs: number;
  /** A last reply after `reply`, before the close: the 421 when the error limit is reached. */
  farewell?: Reply;
  /** Greylist first attempts for the table. */
  remember?: GreylistRecord[];
  /** At RCPT: the attempt of the recipient's message, for the attempt table. */
  attempt?: Attempt;
  /** The messages (`attemptKey`) that ended, delivered or bounced, for the attempt table. */
  ends?: string[];
  /** At DATA: keep the message's header section for the log (accept-log). */
  captureHeaders?: boolean;
  /** What to log once the reply is said: the ledger's attempt events, accept-log's message event. */
  events?: LogEvent[];
  /**
   * What to log instead when the client leaves (its FIN) while the reply is held: the reply
   * was never given, so nothing was delivered (`unheard`).
   */
  unheard?: LogEvent[];
}

/**
 * The points where the policy decides: the scenario's stages, STARTTLS, `abandon`: a
 * transaction with accepted recipients ends without its end of data (RSET, HELO/EHLO, QUIT,
 * the connection closed), which ends those recipients' attempts; and `errors`: after each
 * reply to a command, whether the session has made too many errors.
 */
export type Point = Stage | "starttls" | "abandon" | "errors";

/**
 * How a transaction was abandoned after its recipients were accepted: the client said RSET,
 * HELO/EHLO or QUIT, or the connection closed (the client left, a timeout, a drop or a 421).
 */
export type Abandon = "rset" | "helo" | "quit" | "close";

/**
 * What the policy is deciding about: a point, the inputs (the world as the policy may read
 * it), the session's state before the event (its transaction, HELO name, TLS), the recipient
 * at RCPT, the message's summary at its end. The scenario in effect is the transaction's
 * (fixed at MAIL), before MAIL the current one (`scenarioOf`).
 */
export interface Moment {
  point: Point;
  inputs: Inputs;
  state?: SessionState;
  rcpt?: string;
  data?: DataSummary;
  /** At `abandon`: how the transaction ended. */
  how?: Abandon;
  /** At `errors`: what the reply to the command does next (one that closes needs no farewell). */
  after?: After;
}

/** The scenario a moment is decided under. */
export const scenarioOf = (m: Moment): Scenario => m.state?.tx?.scenario ?? m.inputs.scenario;

/**
 * A decision at one point: the reply instead of the point's own (`fail`), or a drop, a delay,
 * what comes after, and what the tables must remember.
 */
export interface Decision {
  fail?: Reply;
  drop?: boolean;
  delayMs: number;
  after?: After;
  /** The reply ends the session: a 421 does (RFC 5321 §3.8). */
  close?: boolean;
  /** At connect: the session is refused; every command but QUIT gets 503 (RFC 5321 §3.1). */
  refuse?: boolean;
  /** At `errors`: a last reply after the command's, before the close (the 421 past the error limit). */
  farewell?: Reply;
  /** The transaction's greylist answer when keyed by IP (asked once per transaction). */
  greylist?: GreylistVerdict;
  remember?: GreylistRecord[];
  /** At RCPT: which attempt of the recipient's message this is. */
  attempt?: Attempt;
  /** The messages (`attemptKey`) this ends, delivered or bounced, for the attempt table. */
  ends?: string[];
  /** At HELO/EHLO and STARTTLS: STARTTLS is offered (EHLO lists it; STARTTLS is otherwise refused). */
  offersTls?: boolean;
  /** At DATA: keep the header section for the log (accept-log). */
  captureHeaders?: boolean;
  /** What to log once the reply is said: the ledger's attempt events, accept-log's message line. */
  events?: LogEvent[];
  /** What to log instead if the client leaves while the reply is held (`unheard`). */
  unheard?: LogEvent[];
}

const PASS: Decision = { delayMs: 0 };

/** A recipient address that asks for its own outcome: `bounce+x@…`, `defer+x@…`, `451-4.7.1+x@…`. */
export type RecipientOutcome =
  | { kind: "accept" | "bounce" | "defer" | "greylist" | "drop" }
  | { kind: "reply"; reply: Reply }
  /** `defer2+x@…`: the first N attempts of this recipient's message fail so, then it is accepted. */
  | { kind: "first"; base: "defer" | "bounce" | "drop"; attempts: number };

const RCPT_KINDS = ["accept", "bounce", "defer", "greylist", "drop"] as const;

export function recipientOutcome(address: string): RecipientOutcome | undefined {
  const local = address.slice(0, address.lastIndexOf("@"));
  const plus = local.indexOf("+");
  if (plus <= 0) return undefined;
  const tag = local.slice(0, plus).toLowerCase();
  if ((RCPT_KINDS as readonly string[]).includes(tag)) return { kind: tag as typeof RCPT_KINDS[number] };
  const first = /^(defer|bounce|drop)(\d{1,2})$/.exec(tag);
  if (first && Number(first[2]) >= 1) {
    return { kind: "first", base: first[1] as "defer" | "bounce" | "drop", attempts: Number(first[2]) };
  }
  const m = /^([245]\d\d)(?:-([245]\.\d{1,3}\.\d{1,3}))?$/.exec(tag);
  if (!m || (m[2] && m[2][0] !== m[1][0])) return undefined;
  const status = m[2] ?? `${m[1][0]}.0.0`;
  return { kind: "reply", reply: r(Number(m[1]), `${status} Per-recipient reply ${m[1]} from sinkhole`) };
}

/**
 * Why a recipient that looks like a per-recipient form is not taken as one (then the mode
 * answers it), or undefined: it is one (`recipientOutcome`), or an ordinary `user+tag@` that
 * names no form. Only tags shaped like a form get a reason: a reply code, or a kind with a count.
 */
export function recipientFormProblem(address: string): string | undefined {
  if (recipientOutcome(address) !== undefined) return undefined;
  const local = address.slice(0, address.lastIndexOf("@"));
  const plus = local.indexOf("+");
  if (plus <= 0) return undefined;
  const tag = local.slice(0, plus).toLowerCase();
  const counted = /^(accept|bounce|defer|greylist|drop)(\d+)$/.exec(tag);
  if (counted) {
    return counted[1] === "accept" || counted[1] === "greylist"
      ? `${tag}: only defer, bounce and drop take an attempt count`
      : `${tag}: the attempt count is 1 to 99`;
  }
  if (!/^\d/.test(tag)) return undefined;
  const m = /^(\d+)(?:-(.*))?$/.exec(tag);
  if (!m || !/^[245]\d\d$/.test(m[1])) return `${tag}: a reply code is three digits, 2yz, 4yz or 5yz`;
  if (!/^[245]\.\d{1,3}\.\d{1,3}$/.test(m[2]!)) {
    return `${tag}: the enhanced status is class.subject.detail (RFC 3463), e.g. ${m[1][0]}.7.1`;
  }
  return `${tag}: the code's class (${m[1][0]}) and the status's (${m[2]![0]}) disagree (RFC 3463 §2)`;
}

/** RCPT's row, and the reason a recipient form that was not taken was not (it gets the mode's answer). */
function rcptWithFormReason(m: Moment, sc: Scenario): Decision {
  const d = rcptRow(m, sc);
  const reason = recipientFormProblem(m.rcpt!);
  if (reason === undefined) return d;
  const e: RcptFormEvent = { event: "rcpt_form", client: m.inputs.client ?? "", rcpt: m.rcpt!, reason };
  return { ...d, events: [...(d.events ?? []), e] };
}

// The rows of the table. Each is a constant or a pure function of the moment; decide() picks
// and composes them, and nothing outside this section says what the fixture answers.

/** A recipient's own failures (`defer+x@`, `bounce+x@`, `drop+x@`, and their `defer2+x@` forms): no delay. */
const RECIPIENT_FAILS: Record<"defer" | "bounce" | "drop", Decision> = {
  defer: { fail: REPLIES.deferRcpt, delayMs: 0 },
  bounce: { fail: REPLIES.bounce, delayMs: 0 },
  drop: { drop: true, delayMs: 0 },
};

/** What a stateful scenario answers once a message is out of its failing phase (`then=`). */
const THEN: Record<Scenario["then"], Decision> = {
  accept: PASS,
  defer: { fail: REPLIES.defer, delayMs: 0 },
  bounce: { fail: REPLIES.bounce, delayMs: 0 },
};

const TLS_REFUSED: Decision = { fail: REPLIES.tlsRefused, delayMs: 0 };
const TLS_BUSY: Decision = { fail: REPLIES.tlsBusy, delayMs: 0 };
const TLS_BREAK: Decision = { fail: REPLIES.tlsReady, delayMs: 0, after: "close" };
const TLS_GO: Decision = { delayMs: 0, after: "starttls" };

/** Asks the greylist about a key: the verdict, and the first attempt to remember when there is none. */
function greylisted(m: Moment, sc: Scenario, key: string): { verdict: GreylistVerdict; remember?: GreylistRecord[] } {
  const now = m.inputs.now ?? 0;
  const { minMs, windowMs } = sc.greylist;
  const entry = m.inputs.greylist?.(key);
  const verdict = greylistVerdict(entry, now, minMs);
  const live = entry !== undefined && now - entry.at <= entry.windowMs;
  return live ? { verdict } : { verdict, remember: [{ key, at: now, windowMs }] };
}

/** The scenario's failure at its stage (`at=`), with its delay; elsewhere nothing. */
function scenarioAt(sc: Scenario, point: Point): Decision {
  if (sc.at !== point) return PASS;
  const delayMs = sc.delayMs;
  switch (sc.base) {
    case "drop":
      return { drop: true, delayMs };
    case "defer":
      return { fail: sc.reply ?? REPLIES.defer, delayMs };
    case "bounce":
      return { fail: sc.reply ?? (point === "rcpt" ? REPLIES.bounce : REPLIES.bounceStage), delayMs };
    default:
      return delayMs === 0 ? PASS : { delayMs };
  }
}

/**
 * What a recipient's message gets at RCPT, in one shape whether the scenario or the address
 * (`defer2+x@`, `greylist+x@`) asks: an answer; for the stateful forms, the phase it holds in
 * and what follows (`then`); for greylisting, the key to ask the table about.
 */
interface RcptRule {
  answer: Decision;
  /** While the message is in this phase (first N attempts, an outage, a rate) `answer` holds, after it `then`. */
  phase?: Stateful;
  then?: Decision;
  /** Greylisted by this key (unless the answer fails already). */
  greylistKey?: string;
  /** The key is the client's address: the verdict is the transaction's, asked once. */
  byIp?: boolean;
}

/** The rule of a recipient nothing refuses (a constant: no allocation on the common path). */
const PASS_RULE: RcptRule = { answer: PASS };

/** A recipient's own outcome (`bounce+x@…`): it wins over the scenario, without its delay. */
function recipientRule(m: Moment, own: RecipientOutcome): RcptRule {
  switch (own.kind) {
    case "accept":
      return PASS_RULE;
    case "bounce":
    case "defer":
    case "drop":
      return { answer: RECIPIENT_FAILS[own.kind] };
    case "greylist":
      return { answer: PASS, greylistKey: `${m.inputs.client}|${m.rcpt}` };
    case "reply":
      return { answer: { fail: own.reply, delayMs: 0 } };
    case "first":
      return { answer: RECIPIENT_FAILS[own.base], phase: { kind: "first", attempts: own.attempts }, then: PASS };
  }
}

/** The scenario at RCPT: its failure there, its stateful phase and `then=`, or greylisting by IP or triplet. */
function scenarioRule(m: Moment, sc: Scenario): RcptRule {
  const answer = scenarioAt(sc, "rcpt");
  if (sc.stateful) return { answer, phase: sc.stateful, then: THEN[sc.then] };
  if (sc.base !== "greylist") return answer === PASS ? PASS_RULE : { answer };
  if (sc.greylist.key === "triplet") {
    return { answer, greylistKey: `${m.inputs.client}|${m.state!.tx!.from}|${m.rcpt}` };
  }
  return { answer, greylistKey: `${m.inputs.client}`, byIp: true };
}

/** The greylist's word on an answer that does not fail already: deferred (451 4.7.1) until a retry passes. */
function greylistAt(m: Moment, sc: Scenario, rule: RcptRule, d: Decision): Decision {
  if (rule.greylistKey === undefined || d.fail || d.drop) return d;
  const asked = rule.byIp ? m.state!.tx!.greylist : undefined;
  const g = asked !== undefined ? { verdict: asked } : greylisted(m, sc, rule.greylistKey);
  const fail = g.verdict === "pass" ? undefined : REPLIES.greylisted;
  return rule.byIp ? { ...d, fail, greylist: g.verdict, remember: g.remember } : { ...d, fail, remember: g.remember };
}

/** This attempt of the RCPT's message, from the attempt table's answer (`counted`: an ended message's envelope opens a new one). */
function attemptOf(m: Moment): Attempt {
  const key = attemptKey(m.state!.tx!.from, m.rcpt!);
  const next = counted(m.inputs.attempts?.(key), m.inputs.now ?? 0);
  const a: Attempt = { key, n: next.count, first: next.first };
  if (next.before) a.before = next.before;
  return a;
}

/** Whether STARTTLS is offered: not twice, never with starttls=off, by default when the listener has TLS. */
function offersTls(m: Moment, sc: Scenario): boolean {
  if (m.state?.tls) return false;
  return sc.starttls === "refuse" || sc.starttls === "break" || (sc.starttls === "default" && !!m.inputs.tlsAvailable);
}

/** mail: the scenario's failure at its stage. */
const stageRow = (m: Moment, sc: Scenario): Decision => scenarioAt(sc, m.point);

/** connect: the scenario's failure there; a 5yz greeting refuses the session (554 then 503s: RFC 5321 §3.1). */
function connectRow(_m: Moment, sc: Scenario): Decision {
  const d = scenarioAt(sc, "connect");
  return d.fail && d.fail.code >= 500 ? { ...d, refuse: true } : d;
}

const TOO_MANY_ERRORS: Decision = { delayMs: 0, farewell: REPLIES.tooManyErrors, after: "close" };

/**
 * After a command's reply: at MAX_ERRORS_PER_SESSION errors the session ends, the reply
 * followed by 421 4.7.0; a reply that closes or drops the session already needs none.
 */
const errorsRow = (m: Moment): Decision =>
  m.state!.errors < MAX_ERRORS_PER_SESSION || m.after === "close" || m.after === "drop" ? PASS : TOO_MANY_ERRORS;

/** HELO and EHLO: the scenario's failure at helo; EHLO lists STARTTLS when it is offered. */
const heloRow = (m: Moment, sc: Scenario): Decision =>
  offersTls(m, sc) ? { ...scenarioAt(sc, "helo"), offersTls: true } : scenarioAt(sc, "helo");

/**
 * RCPT: the recipient's own outcome or the scenario's, the stateful phase of this attempt of
 * the message ("fail while in the phase, then …": one implementation for `first=`, `for=`,
 * `rate=` and `defer2+x@`), then the greylist. Every attempt is counted (the ledger).
 */
function rcptRow(m: Moment, sc: Scenario): Decision {
  const attempt = attemptOf(m);
  // Past MAX_RECIPIENTS a transaction takes no more (RFC 5321 §4.5.3.1.10): 452, this attempt ends deferred.
  if (m.state!.tx!.rcptCount >= MAX_RECIPIENTS) return noRoom(m, attempt);
  const own = recipientOutcome(m.rcpt!);
  const rule = own ? recipientRule(m, own) : scenarioRule(m, sc);
  const inPhase = !rule.phase || inFailingPhase(rule.phase, attempt, m.inputs.now ?? 0);
  const d = greylistAt(m, sc, rule, inPhase ? rule.answer : rule.then!);
  if (acceptsRecipient(d)) {
    if (recipientRoom(m.state!.tx!, m.rcpt!, m.inputs.rcptPoolFree)) return { ...d, attempt };
    return noRoom(m, attempt); // no room to keep it
  }
  // Refused or dropped here, this attempt of the message ends: the ledger says so. A dropped
  // recipient is recorded as deferred (451): it was not delivered, and nothing was said.
  // The log numbers the envelope's attempts in one sequence (its messages split where one ended).
  const events = attemptEvents(m, [[m.rcpt!, envelopeAttempts(attempt)]], "rcpt", d.drop ? undefined : d.fail!.code);
  if (d.drop) return { ...d, fail: REPLIES.deferRcpt, attempt, events };
  return d.fail!.code >= 500 ? { ...d, attempt, events, ends: [attempt.key] } : { ...d, attempt, events };
}

/**
 * An accepted recipient neither its transaction's own MAX_KEPT_RCPT_BYTES nor the shared pool
 * can hold: an implementation limit on recipients, 452 4.5.3 (RFC 5321 §4.5.3.1.10, RFC 3463
 * X.5.3). Like any refusal at RCPT it is an attempt of its message, counted and logged at once
 * (Postfix logs it `status=deferred` and sends it again in a later transaction).
 */
const NO_ROOM: Decision = { fail: REPLIES.tooManyRcpts, delayMs: 0 };

/** 452 4.5.3 at RCPT (the transaction is full): this attempt of its message ends deferred, as the MTA logs it; nothing is kept. */
function noRoom(m: Moment, attempt: Attempt): Decision {
  const events = attemptEvents(m, [[m.rcpt!, envelopeAttempts(attempt)]], "rcpt", NO_ROOM.fail!.code);
  return { ...NO_ROOM, attempt, events };
}

/** What keeping an accepted recipient costs: its octets and its entry (KEPT_ENTRY_COST). */
export const keptRecipientCost = (box: string): number => box.length + KEPT_ENTRY_COST;

/**
 * Octets an accepted recipient draws from the shared pool: none while the transaction's own
 * MAX_KEPT_RCPT_BYTES holds it, else its whole cost.
 */
export function poolDraw(tx: Transaction, box: string): number {
  const cost = keptRecipientCost(box);
  return tx.acceptedBytes - (tx.pooled ?? 0) + cost <= MAX_KEPT_RCPT_BYTES ? 0 : cost;
}

/** Whether an accepted recipient can be kept: by its transaction, or from the pool's free octets (unbounded without). */
function recipientRoom(tx: Transaction, box: string, poolFree: number | undefined): boolean {
  const draw = poolDraw(tx, box);
  return draw === 0 || poolFree === undefined || draw <= poolFree;
}

/** Whether a decision at RCPT accepts the recipient: any 2yz reply (RFC 5321 §4.2.1), and no drop. */
export function acceptsRecipient(d: Decision): boolean {
  const code = (d.fail ?? REPLIES.rcptOk).code;
  return !d.drop && code >= 200 && code < 300;
}

/**
 * DATA: the scenario's failure at data, which ends the attempt of every accepted recipient's
 * message (the ledger); accept-log keeps the header section.
 */
function dataRow(m: Moment, sc: Scenario): Decision {
  const d = scenarioAt(sc, "data");
  if (d.drop) return { ...d, events: attemptEvents(m, zip(m.state!.tx!), "data") };
  if (d.fail && d.fail.code >= 400) {
    const rcpts = zip(m.state!.tx!);
    const events = attemptEvents(m, rcpts, "data", d.fail.code);
    const tx = m.state!.tx!;
    return d.fail.code >= 500 ? { ...d, events, ends: rcpts.map(([r]) => attemptKey(tx.from, r)) } : { ...d, events };
  }
  return sc.base === "accept-log" ? { ...d, captureHeaders: true } : d;
}

const NO_DATA: DataSummary = { size: 0, longLine: false };
const TOO_BIG: Decision = { fail: REPLIES.sizeExceeded, delayMs: 0 };
/**
 * A bare LF or CR in message content (RFC 5321 §2.3.8): the message is refused and the
 * session closed, as Postfix's smtpd_forbid_bare_newline=reject and sendmail's 'g'/'u'
 * do, so nothing after it can be read as a command (SMTP smuggling, CVE-2023-51764/5).
 */
const BARE: Decision = { fail: REPLIES.bareLineEnd, delayMs: 0, after: "close" };
const LONG_LINE: Decision = { fail: REPLIES.dataLineTooLong, delayMs: 0 };

/**
 * End of data: a message over MAX_MESSAGE_BYTES or with a line over MAX_TEXT_LINE is refused,
 * else the scenario's failure at eod. Every accepted recipient's attempt ends here (the
 * ledger); accept-log logs the message it accepted.
 */
function eodRow(m: Moment, sc: Scenario): Decision {
  const data = m.data ?? NO_DATA;
  const d = data.bare
    ? BARE
    : data.size > MAX_MESSAGE_BYTES
    ? TOO_BIG
    : data.longLine
    ? LONG_LINE
    : scenarioAt(sc, "eod");
  const tx = m.state!.tx!;
  const code = d.drop ? undefined : (d.fail ?? REPLIES.queued).code;
  const ends = messagesEnded(tx, code);
  const events: LogEvent[] = attemptEvents(m, zip(tx), "eod", code);
  if (sc.base === "accept-log" && !d.fail && !d.drop) {
    // Field by field in the line's order (no object spread a message).
    const e = { event: "message", client: m.inputs.client ?? "", helo: m.state!.helo, from: tx.from } as MessageEvent;
    e.rcpts = tx.accepted;
    e.rcptCount = tx.acceptedCount;
    if (tx.accepted.length < tx.acceptedCount) e.rcptsTruncated = true;
    e.size = data.size;
    e.headers = data.headers ?? [];
    e.truncated = data.truncated ?? false;
    events.push(e);
  }
  return ends.length > 0 ? { ...d, events, ends } : { ...d, events };
}

/**
 * The end of data ends each accepted recipient's message when it was handed over (2yz, or
 * dropped: the sinkhole has it) or bounced (5yz); a 4yz leaves it to its retry.
 */
function messagesEnded(tx: Transaction, code: number | undefined): string[] {
  if (code !== undefined && code >= 300 && code < 500) return [];
  return tx.accepted.map((rcpt) => attemptKey(tx.from, rcpt));
}

/**
 * A transaction abandoned after its recipients were accepted (`Abandon`): every accepted
 * recipient's attempt ends here, at the stage it reached (`data` once 354 was said, else
 * `rcpt`) with the last reply it was given (354, or its RCPT's 2yz), and how it ended.
 */
function abandonRow(m: Moment): Decision {
  const tx = m.state?.tx;
  if (!tx || tx.acceptedCount === 0) return PASS;
  const how = m.how ?? "close";
  if (m.data) return { delayMs: 0, events: attemptEvents(m, zip(tx), "data", REPLIES.dataGo.code, how) };
  const events = zip(tx).map(([rcpt, n]) => {
    const own = recipientOutcome(rcpt);
    const code = own?.kind === "reply" ? own.reply.code : REPLIES.rcptOk.code;
    return attemptEvents(m, [[rcpt, n]], "rcpt", code, how)[0];
  });
  return { delayMs: 0, events };
}

/**
 * The retry ledger's events for the recipients `rcpts` (address, attempt number) of the
 * moment's transaction, their attempt ended at `stage` with the reply `code` (none: dropped),
 * or abandoned after it (`how`).
 */
function attemptEvents(
  m: Moment,
  rcpts: [string, number][],
  stage: AttemptEvent["stage"],
  code?: number,
  how?: Abandon,
) {
  const tx = m.state!.tx!;
  const messageId = m.data?.messageId;
  // Fields set in the line's order, the optional ones only when present: no object spread an event.
  return rcpts.map(([rcpt, attempt]): AttemptEvent => {
    const e = { event: "attempt", key: attemptKey(tx.from, rcpt), attempt, from: tx.from, rcpt, stage } as AttemptEvent;
    if (code === undefined) e.dropped = true;
    else e.code = code;
    if (how) e.abandoned = how;
    if (messageId) e.messageId = messageId;
    e.client = m.inputs.client ?? "";
    e.tls = !!m.state!.tls;
    e.mode = tx.scenario.text;
    return e;
  });
}

/** A transaction's kept accepted recipients with their attempt numbers. */
function zip(tx: Transaction): [string, number][] {
  return tx.accepted.map((rcpt, i) => [rcpt, tx.acceptedAttempts[i] ?? 1]);
}

/** STARTTLS: refused (454), broken (220 and close), or the upgrade; refused as unknown where not offered. */
function starttlsRow(m: Moment, sc: Scenario): Decision {
  const d = sc.starttls === "refuse"
    ? TLS_REFUSED
    : sc.starttls === "break"
    ? TLS_BREAK
    : m.inputs.tlsBusy
    ? TLS_BUSY
    : TLS_GO;
  return offersTls(m, sc) ? { ...d, offersTls: true } : d;
}

/** The table: one row a point. */
const TABLE: Record<Point, (m: Moment, sc: Scenario) => Decision> = {
  connect: connectRow,
  helo: heloRow,
  mail: stageRow,
  rcpt: rcptWithFormReason,
  data: dataRow,
  eod: eodRow,
  starttls: starttlsRow,
  abandon: abandonRow,
  errors: errorsRow,
};

/**
 * THE decision table: what the fixture answers at each point of a session, and what that
 * changes. Protocol checks (syntax, sequence) are done before this is asked; a new scenario is
 * a new row, or a new case in a row. Last, a 421 closes the session (RFC 5321 §3.8).
 */
export function decide(m: Moment): Decision {
  const d = TABLE[m.point](m, scenarioOf(m));
  const held = d.delayMs > 0 && d.events && !d.drop ? { ...d, unheard: unheard(d.events) } : d;
  return held.fail?.code === 421 ? { ...held, close: true } : held;
}

/**
 * A held reply's events for a client that left before it was said (its FIN during the delay:
 * e.g. sendmail's `Timeout.datafinal` expired; it keeps the message and tries again): each
 * attempt ends with no reply given (`unheard`, not delivered), and no message was accepted.
 */
export function unheard(events: LogEvent[]): LogEvent[] {
  return events.flatMap((e): LogEvent[] => {
    if (e.event !== "attempt") return [];
    const { code: _code, dropped: _dropped, ...rest } = e;
    return [{ ...rest, unheard: true }];
  });
}

/**
 * Turns a decision into an outcome: its failure reply in `failed` state, or the point's own
 * reply in `ok`'s state; a drop sends nothing.
 */
export function outcome(d: Decision, ok: Omit<Outcome, "delayMs">, failed: SessionState = ok.state): Outcome {
  const base: Outcome = d.fail
    ? { reply: d.fail, state: failed, after: d.after ?? "continue", delayMs: d.delayMs }
    : { ...ok, after: d.after ?? ok.after, delayMs: d.delayMs };
  if (d.remember) base.remember = d.remember;
  if (d.attempt) base.attempt = d.attempt;
  if (d.ends) base.ends = d.ends;
  if (d.events) base.events = d.events;
  if (d.unheard) base.unheard = d.unheard;
  if (d.drop) return { ...base, state: failed, after: "drop" };
  if (d.close) base.after = "close";
  return base;
}

/** The greeting: 220, or the scenario's failure at connect (554 then 503s, or 421 and close). */
export function greeting(sc: Scenario, serverName: string): Outcome {
  const d = decide({ point: "connect", inputs: { scenario: sc, serverName } });
  const state = initialState();
  const ok: Omit<Outcome, "delayMs"> = { reply: greetingReply(serverName), state, after: "continue" };
  return outcome(d, ok, d.refuse ? { ...state, refused: true } : state);
}

/** The reply at end of data, and what the ledger and accept-log record; the transaction ends either way. */
export function endOfData(state: SessionState, data: DataSummary, inputs?: Inputs): Outcome {
  const done: Outcome = { reply: REPLIES.queued, state: { ...state, tx: undefined }, after: "continue", delayMs: 0 };
  if (!state.tx) return done;
  return outcome(
    decide({ point: "eod", state, data, inputs: inputs ?? { scenario: state.tx.scenario, serverName: "" } }),
    done,
  );
}

/**
 * The retry ledger's events for a transaction that ends without its end of data (`how`),
 * `data` the message when one was being read: none when no recipient was accepted.
 */
export function abandoned(state: SessionState, inputs: Inputs, how: Abandon, data?: DataSummary): LogEvent[] {
  return decide({ point: "abandon", state, inputs, how, data }).events ?? [];
}

/** What the framing knew of a message at its end (a MessageReader is one). */
export interface DataSummary {
  /** The message ended in a bare LF or CR (refused, and the session closed). */
  bare?: boolean;
  size: number;
  /** A line of the message exceeded MAX_TEXT_LINE. */
  longLine: boolean;
  /** The Message-ID header, the header section kept for accept-log, and whether some was left out. */
  messageId?: string;
  headers?: string[];
  truncated?: boolean;
}

// ---------------------------------------------------------------------------
// 5. Protocol: syntax and sequence, one handler a command
// ---------------------------------------------------------------------------

const DOMAIN = String
  .raw`(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[^\]\s\\]+\])`;
const LOCAL = String
  .raw`(?:[A-Za-z0-9!#$%&'*+/=?^_\x60{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_\x60{|}~-]+)*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")`;
const MAILBOX_RE = new RegExp(`^${LOCAL}@${DOMAIN}$`);
/** Source route prefix (`@a,@b:`), which RFC 5321 §4.1.2 says to accept and ignore. */
const SOURCE_ROUTE_RE = new RegExp(`^@${DOMAIN}(?:,@${DOMAIN})*:`);
/** `FROM:<` or `TO:<`, a space after the colon tolerated; the path and its parameters follow. */
const PATH_HEAD_RE = /^(FROM|TO):\s?</i;

/** Validates a mailbox; returns it without a source route, or undefined. */
export function parseMailbox(raw: string): string | undefined {
  if (raw.length > MAX_PATH_LENGTH - 2) return undefined;
  const box = raw.replace(SOURCE_ROUTE_RE, "");
  if (!MAILBOX_RE.test(box)) return undefined;
  const at = box.lastIndexOf("@");
  if (at > 64 || box.length - at - 1 > 255) return undefined;
  return box;
}

/**
 * Where a path's closing `>` is, from `from` (just after its `<`), by RFC 5321 §4.1.2: inside a
 * Quoted-string (`"x > y"@…`) `>` and `<` are text and `\` quotes the next character; outside
 * one `<` cannot occur. -1 when the path does not close.
 */
export function pathEnd(arg: string, from: number): number {
  let quoted = false;
  for (let i = from; i < arg.length; i++) {
    const c = arg.charCodeAt(i);
    if (quoted) {
      if (c === 92) i++; // "\\"
      else if (c === 34) quoted = false; // '"'
    } else if (c === 34) quoted = true;
    else if (c === 62) return i; // ">"
    else if (c === 60) return -1; // "<"
  }
  return -1;
}

/** A path without ESMTP parameters (most of them): one map for all, never written. */
const NO_PARAMS: ReadonlyMap<string, string> = new Map();

/** Parses `MAIL`/`RCPT` arguments into a path and ESMTP parameters (the path by `pathEnd`, checked by `parseMailbox`). */
export function parsePathArg(
  arg: string,
  keyword: "FROM" | "TO",
): { path: string; params: ReadonlyMap<string, string> } | undefined {
  const head = PATH_HEAD_RE.exec(arg);
  if (!head || head[1].toUpperCase() !== keyword) return undefined;
  const start = head[0].length;
  const end = pathEnd(arg, start);
  if (end < 0) return undefined;
  const rest = arg.slice(end + 1);
  if (rest === "") return { path: arg.slice(start, end), params: NO_PARAMS };
  if (!/^\s/.test(rest)) return undefined;
  const params = new Map<string, string>();
  for (const p of rest.trim().split(" ")) {
    if (p === "") continue;
    const eq = p.indexOf("=");
    params.set((eq < 0 ? p : p.slice(0, eq)).toUpperCase(), eq < 0 ? "" : p.slice(eq + 1));
  }
  return { path: arg.slice(start, end), params };
}

/** Checks MAIL parameters: SIZE and BODY are implemented, nothing else. */
function mailParamsReply(params: ReadonlyMap<string, string>): Reply | undefined {
  for (const [key, value] of params) {
    if (key === "SIZE") {
      if (!/^\d{1,20}$/.test(value)) return REPLIES.mailSyntax;
      if (Number(value) > MAX_MESSAGE_BYTES) return REPLIES.sizeExceeded;
    } else if (key === "BODY") {
      if (!/^(7BIT|8BITMIME)$/i.test(value)) return REPLIES.badParam;
    } else {
      return REPLIES.badParam;
    }
  }
  return undefined;
}

/** EHLO keywords: only what this file implements. The same reply object as the last time for the same names (see replyBytes). */
function ehloReply(serverName: string, clientName: string, startTls = false): Reply {
  const last = lastEhlo;
  if (last?.serverName === serverName && last.clientName === clientName && last.startTls === startTls) {
    return last.reply;
  }
  return (lastEhlo = { serverName, clientName, startTls, reply: ehloReplyOf(serverName, clientName, startTls) }).reply;
}
let lastEhlo: { serverName: string; clientName: string; startTls: boolean; reply: Reply } | undefined;

function ehloReplyOf(serverName: string, clientName: string, startTls: boolean): Reply {
  return r(
    250,
    `${serverName} greets ${clientName}`,
    "PIPELINING",
    `SIZE ${MAX_MESSAGE_BYTES}`,
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    ...(startTls ? ["STARTTLS"] : []),
  );
}

/** The greeting, one reply object a server name (its octets are encoded once: replyBytes). */
function greetingReply(serverName: string): Reply {
  const last = lastGreeting;
  if (last?.serverName === serverName) return last.reply;
  return (lastGreeting = { serverName, reply: r(220, `${serverName} ESMTP sinkhole`) }).reply;
}
let lastGreeting: { serverName: string; reply: Reply } | undefined;

/** Splits a command line into its verb (upper case) and argument. */
function splitCommand(line: string): { verb: string; arg: string } {
  const sp = line.indexOf(" ");
  if (sp < 0) return { verb: line.toUpperCase(), arg: "" };
  return { verb: line.slice(0, sp).toUpperCase(), arg: line.slice(sp + 1).trim() };
}

/** Recognised commands that this fixture deliberately does not implement. */
const NOT_IMPLEMENTED = new Set(["EXPN", "TURN", "ETRN", "ATRN", "AUTH", "BDAT", "SEND", "SOML", "SAML"]);

type Handler = (state: SessionState, arg: string, inputs: Inputs) => Outcome;

const noArgs = (arg: string): boolean => arg === "";

/** A protocol error: the reply, one more error counted, nothing else changes. */
const refuse = (state: SessionState, reply: Reply): Outcome => ({
  reply,
  state: { ...state, errors: state.errors + 1 },
  after: "continue",
  delayMs: 0,
});
/** A reply that changes nothing and decides nothing. */
const answer = (state: SessionState, reply: Reply, after: After = "continue"): Outcome => ({
  reply,
  state,
  after,
  delayMs: 0,
});

/**
 * The transaction after one RCPT: counted, and kept when it was accepted (the policy made
 * room: its own bytes, or `poolDraw` from the shared pool, which the session reserves).
 */
function withRecipient(
  tx: Transaction,
  box: string,
  accepted: boolean,
  greylist?: GreylistVerdict,
  attempt = 1,
): Transaction {
  const next = { ...tx, rcptCount: tx.rcptCount + 1, lastRcpt: box, greylist: greylist ?? tx.greylist };
  if (!accepted) return next;
  const draw = poolDraw(tx, box);
  return {
    ...next,
    acceptedCount: tx.acceptedCount + 1,
    accepted: [...tx.accepted, box],
    acceptedAttempts: [...tx.acceptedAttempts, attempt],
    acceptedBytes: tx.acceptedBytes + keptRecipientCost(box),
    pooled: (tx.pooled ?? 0) + draw,
  };
}

/** Octets a session's open transaction holds of the shared recipient pool. */
export const pooledOf = (state: SessionState): number => state.tx?.pooled ?? 0;

/** An outcome that ends the transaction open before it (RSET, HELO/EHLO): its accepted recipients' attempts end. */
function ending(out: Outcome, before: SessionState, inputs: Inputs, how: Abandon): Outcome {
  if (!before.tx || out.state.tx || out.after === "drop") return out;
  const events = abandoned(before, inputs, how);
  return events.length === 0 ? out : { ...out, events: [...out.events ?? [], ...events] };
}

/**
 * The per-command action table, as in Postfix's smtp-sink: each handler checks syntax and
 * sequence, and hands what passed to `decide` at its point.
 */
const COMMANDS: Record<string, Handler> = {
  HELO: (state, arg, inputs) => {
    if (!/^\S+$/.test(arg)) return refuse(state, REPLIES.heloSyntax);
    const ok = answer({ ...state, helo: arg, esmtp: false, tx: undefined }, r(250, "2.0.0 Hello " + arg));
    return ending(outcome(decide({ point: "helo", inputs, state }), ok, state), state, inputs, "helo");
  },
  EHLO: (state, arg, inputs) => {
    if (!/^\S+$/.test(arg)) return refuse(state, REPLIES.ehloSyntax);
    const d = decide({ point: "helo", inputs, state });
    const ok = answer(
      { ...state, helo: arg, esmtp: true, tx: undefined },
      ehloReply(inputs.serverName, arg, d.offersTls),
    );
    return ending(outcome(d, ok, state), state, inputs, "helo");
  },
  MAIL: (state, arg, inputs) => {
    if (state.helo === undefined) return refuse(state, REPLIES.needHelo);
    if (state.tx) return refuse(state, REPLIES.nestedMail);
    const parsed = parsePathArg(arg, "FROM");
    if (!parsed) return refuse(state, REPLIES.mailSyntax);
    const from = parsed.path === "" ? "" : parseMailbox(parsed.path);
    if (from === undefined) return refuse(state, REPLIES.badSender);
    const bad = mailParamsReply(parsed.params);
    if (bad) return refuse(state, bad);
    const tx: Transaction = {
      scenario: inputs.scenario,
      from,
      rcptCount: 0,
      accepted: [],
      acceptedAttempts: [],
      acceptedCount: 0,
      acceptedBytes: 0,
    };
    const ok = answer({ ...state, tx }, REPLIES.senderOk);
    return outcome(decide({ point: "mail", inputs, state }), ok, state);
  },
  RCPT: (state, arg, inputs) => {
    const tx = state.tx;
    if (!tx) return refuse(state, REPLIES.needMail);
    const parsed = parsePathArg(arg, "TO");
    if (!parsed) return refuse(state, REPLIES.rcptSyntax);
    const box = /^postmaster$/i.test(parsed.path) ? parsed.path : parseMailbox(parsed.path);
    if (box === undefined) return refuse(state, REPLIES.badRcpt);
    if (parsed.params.size > 0) return refuse(state, REPLIES.badParam);
    const d = decide({ point: "rcpt", state, rcpt: box, inputs });
    const reply = d.fail ?? REPLIES.rcptOk;
    const n = d.attempt && envelopeAttempts(d.attempt);
    const next = { ...state, tx: withRecipient(tx, box, acceptsRecipient(d), d.greylist, n) };
    return outcome(d, answer(next, reply), next);
  },
  DATA: (state, arg, inputs) => {
    if (!noArgs(arg)) return refuse(state, REPLIES.noArgs);
    if (!state.tx) return refuse(state, REPLIES.needMail);
    if (state.tx.rcptCount === 0) return refuse(state, REPLIES.needRcpt);
    if (state.tx.acceptedCount === 0) return answer(state, REPLIES.noValidRcpts);
    const d = decide({ point: "data", state, inputs });
    const ok: Outcome = { ...answer(state, REPLIES.dataGo, "data"), captureHeaders: d.captureHeaders };
    return outcome(d, ok, { ...state, tx: undefined });
  },
  RSET: (state, arg, inputs) =>
    noArgs(arg)
      ? ending(answer({ ...state, tx: undefined }, REPLIES.reset), state, inputs, "rset")
      : refuse(state, REPLIES.noArgs),
  STARTTLS: (state, arg, inputs) => {
    const d = decide({ point: "starttls", inputs, state });
    if (!d.offersTls) return refuse(state, state.tls ? REPLIES.alreadyTls : REPLIES.notImplemented);
    if (!noArgs(arg)) return refuse(state, REPLIES.noArgs);
    if (!state.esmtp) return refuse(state, REPLIES.needEhlo);
    if (state.tx) return refuse(state, REPLIES.nestedMail);
    // RFC 3207 §4.2: after the handshake the session starts over.
    const fresh = { ...initialState(), errors: state.errors, tls: true };
    return outcome(d, answer(fresh, REPLIES.tlsReady), state);
  },
  NOOP: (state) => answer(state, REPLIES.ok),
  // A transaction still open is abandoned when the session closes (the ledger's `abandoned()`).
  QUIT: (state) => answer({ ...state, quit: true }, REPLIES.bye, "close"),
  VRFY: (state, arg) => arg === "" ? refuse(state, r(501, "5.5.4 Syntax: VRFY address")) : answer(state, REPLIES.vrfy),
  HELP: (state) => answer(state, REPLIES.help),
};

/**
 * The reply to one command line: the whole protocol state machine, pure.
 * A session that has made too many errors is closed with 421.
 */
export function respond(state: SessionState, line: string, inputs: Inputs): Outcome {
  const { verb, arg } = splitCommand(line);
  const handler = COMMANDS[verb];
  let out: Outcome;
  if (state.refused && verb !== "QUIT") out = refuse(state, REPLIES.refused);
  else if (handler) out = handler(state, arg, inputs);
  else if (NOT_IMPLEMENTED.has(verb)) out = refuse(state, REPLIES.notImplemented);
  else out = refuse(state, REPLIES.unknown);
  return limitErrors(out, inputs);
}

/** The error limit, as the table says (`errors`): past it, the reply is followed by its farewell and the close. */
function limitErrors(out: Outcome, inputs: Inputs): Outcome {
  const d = decide({ point: "errors", state: out.state, after: out.after, inputs });
  return d.farewell ? { ...out, after: d.after ?? "close", farewell: d.farewell } : out;
}

/** A command line the engine could not even read: too long or not ASCII. */
export function respondToBadLine(state: SessionState, kind: "long" | "chars", inputs: Inputs): Outcome {
  return limitErrors(refuse(state, kind === "long" ? REPLIES.lineTooLong : REPLIES.badChars), inputs);
}

// ---------------------------------------------------------------------------
// 6. Framing: lines, dot-unstuffing and sizes (pure)
// ---------------------------------------------------------------------------

const LF = 10;
const CR = 13;
const DOT = 46;

/** Where framed lines go (the session). */
export interface LineSink {
  /** The limit for the line being read: MAX_COMMAND_LINE for commands, MAX_TEXT_LINE inside DATA. */
  limit(): number;
  /** The line being read crossed the limit: said once a line, as soon as it is seen. */
  overflow(): void;
  /**
   * A complete line with its line end, `buf[start, start + length)`; `buf` undefined when it was over
   * the limit (`length` counts every octet); `bare` when it ends in a bare LF or holds a bare CR
   * (RFC 5321 §2.3.8: lines end in CRLF). Offsets, not a view: no object made a line.
   */
  line(buf: Uint8Array | undefined, start: number, length: number, bare: boolean): void;
  /** False stops the framing (a reply must wait first, or the session ends). */
  more(): boolean;
}

/**
 * Splits a byte stream into lines at LF. A line that spans reads is kept in one buffer of
 * MAX_TEXT_LINE octets (allocated the first time one does); a longer line is counted, not
 * kept. Pure: no I/O, no clock. The octets handed to `line` are valid until the next `feed`.
 */
export class LineFramer {
  #partial: Uint8Array | undefined;
  #lineBytes = 0;
  /** The line being read has held a bare CR so far. */
  #bare = false;
  /** The line's last piece ended in CR (a CRLF may span two reads). */
  #lastCR = false;

  /** Octets of a line begun and not yet ended (0 between lines). */
  get pending(): number {
    return this.#lineBytes;
  }

  /** Frames `chunk[from, to)` until it is read or `sink.more()` is false; returns where it stopped. */
  feed(chunk: Uint8Array, sink: LineSink, from = 0, to = chunk.length): number {
    let pos = from;
    while (pos < to && sink.more()) {
      const found = chunk.indexOf(LF, pos);
      const nl = found < to ? found : -1;
      const end = nl < 0 ? to : nl + 1;
      const start = pos;
      pos = end;
      const limit = sink.limit();
      if (this.#lineBytes === 0 && nl >= 0) {
        // The common case: a whole line inside this read, used in place. LF comes only last,
        // so the line is clean exactly when its first CR is the one right before the LF.
        const length = end - start;
        const bare = length < 2 || chunk.indexOf(CR, start) !== end - 2;
        if (length <= limit) sink.line(chunk, start, length, bare);
        else {
          sink.overflow();
          sink.line(undefined, start, length, bare);
        }
        continue;
      }
      // A line that spans reads: its pieces are kept (rare; a view a piece).
      const piece = chunk.subarray(start, end);
      this.#scanBare(piece, nl >= 0);
      const total = this.#lineBytes + piece.length;
      if (total <= limit) (this.#partial ??= new Uint8Array(MAX_TEXT_LINE)).set(piece, this.#lineBytes);
      else if (this.#lineBytes <= limit) sink.overflow();
      this.#lineBytes = total;
      if (nl >= 0) {
        const bare = this.#bare;
        this.#lineBytes = 0;
        this.#bare = false;
        this.#lastCR = false;
        sink.line(total <= limit ? this.#partial : undefined, 0, total, bare);
      }
    }
    return pos;
  }

  /** Notes bare CRs in one piece of a line that spans reads, and a bare LF if the piece ends the line. */
  #scanBare(piece: Uint8Array, final: boolean): void {
    if (piece.length === 0) return;
    if (this.#lastCR && piece[0] !== LF) this.#bare = true;
    for (let i = piece.indexOf(CR); i >= 0; i = piece.indexOf(CR, i + 1)) {
      if (i + 1 < piece.length && piece[i + 1] !== LF) this.#bare = true;
    }
    if (final) {
      const crlf = piece.length >= 2 ? piece[piece.length - 2] === CR : this.#lastCR;
      if (!crlf) this.#bare = true;
    }
    this.#lastCR = piece[piece.length - 1] === CR;
  }
}

/** Octets of the line `buf[start, start + length)` without its LF and an optional CR before it. */
function lineEnd(buf: Uint8Array, start: number, length: number): number {
  let len = length;
  if (len > 0 && buf[start + len - 1] === LF) len--;
  if (len > 0 && buf[start + len - 1] === CR) len--;
  return len;
}

/**
 * Decodes a command line; undefined when it holds a NUL, a control or a non-ASCII byte. Checked
 * first, then made in one string (not one string a character).
 */
function decodeCommand(bytes: Uint8Array): string | undefined {
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b > 126 || (b < 32 && b !== 9)) return undefined;
  }
  // Every octet is ASCII, at most MAX_COMMAND_LINE of them: one character each.
  return String.fromCharCode.apply(null, bytes as unknown as number[]);
}

const headerDecoder = new TextDecoder();

/** RFC 5322 §3.2.3 atext, with RFC 6532's UTF-8 (any character past U+007F, U+2028 and U+2029 too). */
const isAtext = (c: number): boolean =>
  (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) ||
  "!#$%&'*+-/=?^_`{|}~".includes(String.fromCharCode(c)) || c > 0x7f;
/** qtext (§3.2.4) and dtext (§3.4.1), with RFC 6532's UTF-8. */
const isQtext = (c: number): boolean => c === 33 || (c >= 35 && c <= 91) || (c >= 93 && c <= 126) || c > 0x7f;
const isDtext = (c: number): boolean => (c >= 33 && c <= 90) || (c >= 94 && c <= 126) || c > 0x7f;
const isWsp = (c: number): boolean => c === 32 || c === 9 || c === 13 || c === 10;

/** `[WSP] "<" dot-atom "@" dot-atom ">" [WSP]` in ASCII: a msg-id with nothing to take out (parseMessageId's fast path). */
const SIMPLE_MSG_ID =
  /^[ \t\r\n]*(<[\w!#$%&'*+\-/=?^`{|}~]+(?:\.[\w!#$%&'*+\-/=?^`{|}~]+)*@[\w!#$%&'*+\-/=?^`{|}~]+(?:\.[\w!#$%&'*+\-/=?^`{|}~]+)*>)[ \t\r\n]*$/;

/**
 * A Message-ID field's value by RFC 5322's grammar (§3.6.4 and the obsolete forms of §4.5.4):
 * `[CFWS] "<" id-left "@" id-right ">" [CFWS]`, id-left a dot-atom, a quoted-string or words
 * with CFWS around their dots, id-right a dot-atom, a no-fold-literal (`[…]`) or atoms with
 * CFWS; comments nest (at most MAX_COMMENT_DEPTH) and take quoted-pairs; RFC 6532's UTF-8 is
 * text. The answer is `<id-left@id-right>` without the CFWS, at most MAX_MESSAGE_ID_LENGTH
 * characters; undefined when the value is no msg-id. Pure, linear in the value.
 */
export function parseMessageId(value: string): string | undefined {
  if (value.length > MAX_MESSAGE_ID_FIELD) return undefined;
  // The common form, `<dot-atom@dot-atom>` in ASCII with whitespace around at most, is the grammar's answer as written.
  const simple = SIMPLE_MSG_ID.exec(value);
  return simple ? simple[1].slice(0, MAX_MESSAGE_ID_LENGTH) : messageIdByGrammar(value);
}

/** parseMessageId's answer by the whole grammar (every form; the fast path answers the common one the same). */
export function messageIdByGrammar(value: string): string | undefined {
  if (value.length > MAX_MESSAGE_ID_FIELD) return undefined;
  let i = 0;
  const at = (): number => (i < value.length ? value.charCodeAt(i) : -1);
  /** Skips whitespace and comments; false on a comment that does not close or nests too deep. */
  const cfws = (): boolean => {
    for (;;) {
      while (isWsp(at())) i++;
      if (at() !== 40) return true; // "("
      let depth = 0;
      do {
        const c = at();
        if (c < 0) return false;
        i++;
        if (c === 92) i++; // a quoted-pair
        else if (c === 40 && ++depth > MAX_COMMENT_DEPTH) return false;
        else if (c === 41) depth--;
      } while (depth > 0);
    }
  };
  const atom = (): string | undefined => {
    const from = i;
    while (isAtext(at())) i++;
    return i > from ? value.slice(from, i) : undefined;
  };
  /** A quoted-string as written (its quotes and quoted-pairs), folding whitespace inside kept. */
  const quotedString = (): string | undefined => {
    const from = i;
    i++;
    for (let c = at(); c !== 34; c = at()) {
      if (c === 92 && i + 1 < value.length && value.charCodeAt(i + 1) >= 32) i += 2;
      else if (isQtext(c) || c === 32 || c === 9) i++;
      else return undefined;
    }
    i++;
    return value.slice(from, i);
  };
  /** Words (atoms, or quoted-strings when `quoted`) joined by dots, CFWS allowed around each. */
  const dotted = (quoted: boolean): string | undefined => {
    const words: string[] = [];
    for (;;) {
      if (!cfws()) return undefined;
      const word = quoted && at() === 34 ? quotedString() : atom();
      if (word === undefined || !cfws()) return undefined;
      words.push(word);
      if (at() !== 46) return words.join(".");
      i++;
    }
  };
  const literal = (): string | undefined => {
    const from = i;
    i++;
    for (let c = at(); c !== 93; c = at()) {
      if (c === 92 && i + 1 < value.length) i += 2;
      else if (isDtext(c)) i++;
      else return undefined;
    }
    i++;
    return value.slice(from, i);
  };
  if (!cfws() || at() !== 60) return undefined; // "<"
  i++;
  const left = dotted(true);
  if (left === undefined || at() !== 64) return undefined; // "@"
  i++;
  if (!cfws()) return undefined;
  const right = at() === 91 ? literal() : dotted(false);
  if (right === undefined || !cfws() || at() !== 62) return undefined; // ">"
  i++;
  if (!cfws() || i !== value.length) return undefined;
  return `<${left}@${right}>`.slice(0, MAX_MESSAGE_ID_LENGTH);
}

/**
 * A message being received after DATA: the end-of-data line, dot-unstuffing (RFC 5321
 * §4.5.2), the size, whether a line was over MAX_TEXT_LINE, and the header section (up to
 * MAX_LOGGED_HEADER_BYTES) when the policy asked to capture it. Pure.
 */
export class MessageReader {
  size = 0;
  longLine = false;
  /** Header fields were left out (over MAX_LOGGED_HEADER_BYTES, or a header line over MAX_TEXT_LINE). */
  truncated = false;
  /** The first Message-ID field's value as read so far (folded lines unfolded), until it is parsed. */
  #idField: string | undefined;
  #idSeen = false;
  #messageId: string | undefined;
  #inHeaders = true;
  /**
   * The captured fields, unfolded, LF between them: MAX_LOGGED_HEADER_BYTES octets, the session's
   * (given) or allocated at the first header line (outside the V8 heap); no string is made before
   * `headers` is read. Only its first #keptEnd octets are this message's.
   */
  #kept: Uint8Array | undefined;
  /** Octets of #kept in use, and where the field being read began in it. */
  #keptEnd = 0;
  #fieldStart = 0;
  /** Capture has stopped: a field did not fit (it and every field after it are left out). */
  #full = false;

  /** `buffer`: MAX_LOGGED_HEADER_BYTES octets to capture into (a session's, reused message after message). */
  constructor(readonly captureHeaders = false, buffer?: Uint8Array) {
    this.#kept = buffer;
  }

  /** The captured header fields, whole and apart, each unfolded. */
  get headers(): string[] {
    if (!this.#kept || this.#keptEnd === 0) return [];
    return headerDecoder.decode(this.#kept.subarray(0, this.#keptEnd)).split("\n");
  }

  /**
   * One line with its line end, `buf[start, start + length)` (`buf` undefined when it was over
   * MAX_TEXT_LINE; `length` counts its octets all the same): "end" at the
   * end-of-data line, "bare" when the line has a bare LF or CR, else "more". The end is
   * only ".<CRLF>" after a line that ended in CRLF (RFC 5321 §4.1.1.4): a bare line end
   * never ends the message, and answering it at once leaves nothing to smuggle behind it.
   */
  line(buf: Uint8Array | undefined, start: number, length: number, bare = false): "more" | "end" | "bare" {
    if (bare) return "bare";
    if (buf === undefined) {
      this.size += length;
      this.longLine = true;
      if (this.#inHeaders) this.#stopCapture(true); // it may continue the last field: taken back
      if (this.#idField !== undefined) this.#idField = "\0"; // a part of the field was not read: no msg-id
      return "more";
    }
    if (buf[start] === DOT && length === 3) return "end"; // ".\r\n" (not bare: CR LF)
    const stuffed = buf[start] === DOT ? 1 : 0;
    this.size += length - stuffed;
    if (!this.#inHeaders) return "more";
    const bytes = buf.subarray(start, start + length); // a header line (a few a message): one view
    const len = lineEnd(bytes, 0, length);
    if (len === 0) {
      this.#inHeaders = false;
      return "more";
    }
    const folded = bytes[stuffed] === 32 || bytes[stuffed] === 9;
    if (this.#idField !== undefined) {
      // The Message-ID field goes on in a folded line (unfolded: its CRLF removed), or it ended.
      if (folded && this.#idField.length <= MAX_MESSAGE_ID_FIELD) {
        this.#idField += headerDecoder.decode(bytes.subarray(stuffed, len));
      } else if (!folded) this.#parseId();
    }
    if (!this.#idSeen && len >= 11 && (bytes[stuffed] | 0x20) === 0x6d) {
      const head = headerDecoder.decode(bytes.subarray(stuffed, len));
      if (/^message-id:/i.test(head)) {
        this.#idSeen = true;
        this.#idField = head.slice(11);
      }
    }
    if (this.captureHeaders && !this.#full) this.#capture(bytes.subarray(stuffed, len));
    return "more";
  }

  /**
   * Keeps one header line: a field's first line after an LF, a continuation line (it starts
   * with WSP, RFC 5322 §2.2.3) appended to its field as " " and its text trimmed. A field
   * that does not fit is taken back whole, and capture stops there.
   */
  #capture(text: Uint8Array): void {
    const folded = (text[0] === 32 || text[0] === 9) && this.#keptEnd > 0;
    let from = 0, to = text.length;
    if (folded) {
      while (from < to && (text[from] === 32 || text[from] === 9)) from++;
      while (to > from && (text[to - 1] === 32 || text[to - 1] === 9)) to--;
    }
    const sep = this.#keptEnd > 0 ? 1 : 0; // LF between fields, or the space of an unfolded line
    if (this.#keptEnd + sep + (to - from) > MAX_LOGGED_HEADER_BYTES) return this.#stopCapture(folded);
    const kept = this.#kept ??= new Uint8Array(MAX_LOGGED_HEADER_BYTES);
    if (!folded) this.#fieldStart = this.#keptEnd + sep;
    if (sep) kept[this.#keptEnd++] = folded ? 32 : LF;
    kept.set(text.subarray(from, to), this.#keptEnd);
    this.#keptEnd += to - from;
  }

  /**
   * A field did not fit, or a header line was over MAX_TEXT_LINE: nothing more is kept, and the
   * last field kept is taken back whole when the line may have continued it (`takeBack`).
   */
  #stopCapture(takeBack: boolean): void {
    this.truncated = true;
    if (this.#full || !this.captureHeaders) return;
    this.#full = true;
    if (takeBack) this.#keptEnd = Math.max(0, this.#fieldStart - 1); // the field and the LF before it
  }

  /** The first Message-ID field's msg-id (`parseMessageId`), whatever the mode; undefined when there is none. */
  get messageId(): string | undefined {
    if (this.#idField !== undefined) this.#parseId();
    return this.#messageId;
  }

  #parseId(): void {
    const field = this.#idField!;
    this.#idField = undefined;
    this.#messageId = parseMessageId(field);
  }

  get summary(): DataSummary {
    return { size: this.size, longLine: this.longLine };
  }
}

// ---------------------------------------------------------------------------
// 7. Transcript and log events: the contract that ctl, the tests and the rehearsal read
// ---------------------------------------------------------------------------

export interface TransactionLog {
  /** The scenario's text (the mode name for a plain mode). */
  mode: string;
  from: string;
  rcpts: { to: string; code: number }[];
  /** Message size and the end-of-data reply, when DATA was reached. */
  size?: number;
  result?: number;
}

/** One line per session, at its end (health checks excepted). */
export interface SessionEvent {
  event: "session";
  client: string;
  helo?: string;
  modes: string[];
  transactions: TransactionLog[];
  transactionCount: number;
  replies: number[];
  replyCount: number;
  commands: number;
  bytesIn: number;
  bytesOut: number;
  durationMs: number;
  /** The scenario dropped the connection without a reply. */
  dropped?: true;
  /** The session was upgraded with STARTTLS. */
  tls?: true;
  /** The session ended on an I/O error. */
  error?: string;
  /** Octets the client sent after a drop, read and discarded unanswered by the lingering close. */
  discarded?: number;
  /** Transactions or recipients were left out of the line (MAX_TRANSCRIPT_BYTES, MAX_LOGGED_TRANSACTIONS). */
  transcriptTruncated?: true;
}

/**
 * One attempt to deliver a message to one recipient (the retry ledger): logged once the
 * attempt's outcome was said (or, for a drop, once nothing was said). `ctl report` and
 * `ctl expect` read these.
 */
export interface AttemptEvent {
  event: "attempt";
  /** The message's identity across attempts (`attemptKey`: sender > recipient). */
  key: string;
  /**
   * The envelope's attempt number since the listener started (1 for the first), one sequence
   * across its messages: a message ends at its delivery or bounce, and `ctl report` splits the
   * sequence there (docs/ledger.md).
   */
  attempt: number;
  from: string;
  rcpt: string;
  /** Where the attempt ended: refused at rcpt or data, or answered at the end of data. */
  stage: "rcpt" | "data" | "eod";
  /** The reply the client was given; absent when the connection was dropped instead, or the client left first. */
  code?: number;
  dropped?: true;
  /** The client left (its FIN) while the reply was held: no reply was given, nothing was delivered. */
  unheard?: true;
  /**
   * The attempt was abandoned after that reply, before its end of data: the client said
   * RSET, HELO/EHLO or QUIT, or the connection closed (`Abandon`).
   */
  abandoned?: Abandon;
  /** The Message-ID header, when the attempt reached the message (at most MAX_MESSAGE_ID_LENGTH). */
  messageId?: string;
  client: string;
  tls: boolean;
  /** The mode the transaction ran under. */
  mode: string;
}

/** accept-log: one line per accepted message, with its envelope and header section. */
export interface MessageEvent {
  event: "message";
  client: string;
  helo?: string;
  from: string;
  /** The recipients that were accepted (any 2yz), up to MAX_KEPT_RCPT_BYTES of them. */
  rcpts: string[];
  /** How many were accepted, and whether `rcpts` left some out. */
  rcptCount: number;
  rcptsTruncated?: true;
  size: number;
  headers: string[];
  truncated: boolean;
}

export interface StartEvent {
  event: "start";
  bind: string;
  /** The liveness port (`--healthcheck` asks it). */
  health: string;
  serverName: string;
  source: string;
  mode: string;
  cacheTtlMs: number;
  greylistWindowMs: number;
  maxSessions: number;
  starttls: string;
  pid: number;
  /** The control port (section 14), when on. */
  control?: string;
}

/** The mode in effect changed (also at start, from the default `defer`). */
export interface ModeEvent {
  event: "mode";
  source: string;
  mode: string;
  previous: string;
}

/** The source holds a value the listener refuses; `keeping` stays in effect. */
export interface ModeInvalidEvent {
  event: "mode_invalid";
  source: string;
  keeping: string;
  value: string;
  reason: string;
}

/** The source could not be read; `keeping` stays in effect. */
export interface ModeErrorEvent {
  event: "mode_error";
  source: string;
  keeping: string;
  reason: string;
}

export interface RefusedEvent {
  event: "refused";
  client: string;
  reason: string;
  limit: number;
}

export interface ErrorEvent {
  event: "error";
  where: "accept" | "listen" | "log";
  reason: string;
}

/** Lines that did not fit in MAX_LOG_QUEUE_BYTES while stdout was slow: counted, then said here, where they were. */
export interface LogDroppedEvent {
  event: "log_dropped";
  lines: number;
  octets: number;
  reason: string;
}

export interface StopEvent {
  event: "stop";
  signal: string;
  sessions: number;
}

export interface StoppedEvent {
  event: "stopped";
  signal: string;
}

/** A recipient shaped like a per-recipient form (`452-5.2.2+q@…`) that is not one: why; the mode answered it. */
export interface RcptFormEvent {
  event: "rcpt_form";
  client: string;
  rcpt: string;
  reason: string;
}

/** Every event the listener logs: one JSON line each on stdout (CloudWatch Logs via awslogs). */
export type LogEvent =
  | RcptFormEvent
  | SessionEvent
  | AttemptEvent
  | MessageEvent
  | StartEvent
  | ModeEvent
  | ModeInvalidEvent
  | ModeErrorEvent
  | RefusedEvent
  | ErrorEvent
  | LogDroppedEvent
  | StopEvent
  | StoppedEvent;

/** A log line as it is read back: the event and when it was written. */
export type LogLine = LogEvent & { ts: string };

const logEncoder = new TextEncoder();

/** Reads one line of the listener's output back: its event, or undefined when it is not one. */
export function parseLogLine(text: string): LogLine | undefined {
  try {
    const v = JSON.parse(text);
    return typeof v === "object" && v !== null && typeof v.event === "string" && typeof v.ts === "string"
      ? v as LogLine
      : undefined;
  } catch {
    return undefined;
  }
}

/** Characters JSON leaves raw that some readers take for line ends: escaped, so an event stays one line. */
const LINE_BREAKERS = /[\u0085\u2028\u2029]/g;

/** An event's JSON line, with its line-breaking characters escaped. */
function encodeLine(e: LogEvent, ts: string): Uint8Array {
  return logEncoder.encode(jsonText(e, ts));
}

/** An event's JSON line as text, with its line-breaking characters escaped (bench/floor_ledger.ts writes its lines with it too). */
export function jsonText(e: LogEvent, ts: string): string {
  const body = JSON.stringify(e);
  // `ts` first, then the event's own fields: spliced in, not a copy of the event (ts is ISO 8601: nothing to escape).
  const line = `{"ts":"${ts}",${body.slice(1)}\n`;
  // Looked for before the replace (three searches, no match object): almost no line holds one.
  return body.indexOf("\u0085") < 0 && body.indexOf("\u2028") < 0 && body.indexOf("\u2029") < 0
    ? line
    : line.replace(LINE_BREAKERS, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/** The time now in ISO 8601 (`isoTime`): lines written in one turn share it. */
function isoNow(): string {
  return isoTime(Date.now());
}

/**
 * `new Date(ms).toISOString()` for ms since the epoch, made once a second: within it only the
 * milliseconds change (toISOString a line was ~1 µs, most of an attempt line's making).
 */
export function isoTime(ms: number): string {
  if (ms === isoAt) return isoText;
  const second = ms - ms % 1000;
  if (second !== isoSecond) (isoSecond = second, isoPrefix = new Date(second).toISOString().slice(0, 20));
  const milli = ms - second;
  isoAt = ms;
  return isoText = `${isoPrefix}${milli < 10 ? "00" : milli < 100 ? "0" : ""}${milli}Z`;
}
let isoAt = NaN;
let isoText = "";
/** The second isoTime last made, and its text up to the milliseconds ("2026-11-30T05:18:11."). */
let isoSecond = NaN;
let isoPrefix = "";

/**
 * An event's line, at most MAX_LOG_LINE_BYTES (what CloudWatch Logs takes as one event; a
 * longer line would be split, and its pieces would not be JSON). The bounds on what a
 * session keeps make the fallback unreachable in practice; it drops the lists, says so.
 */
export function logLine(e: LogEvent, now?: Date): Uint8Array {
  const ts = now ? now.toISOString() : isoNow();
  const line = encodeLine(e, ts);
  if (line.length <= MAX_LOG_LINE_BYTES) return line;
  const smaller: LogEvent = e.event === "session"
    ? { ...e, transactions: [], transcriptTruncated: true }
    : e.event === "message"
    ? { ...e, rcpts: [], rcptsTruncated: true, headers: [], truncated: true }
    : e;
  const again = encodeLine(smaller, ts);
  return again.length <= MAX_LOG_LINE_BYTES ? again : encodeLine(
    { event: "error", where: "log", reason: `a ${e.event} line was over ${MAX_LOG_LINE_BYTES} octets` },
    ts,
  );
}

/** An event's JSON line as text when it is surely within MAX_LOG_LINE_BYTES (UTF-8 takes at most 3 octets a UTF-16 unit); else logLine's. */
function lineText(e: LogEvent): string | Uint8Array {
  const text = jsonText(e, isoNow());
  return text.length * 3 <= MAX_LOG_LINE_BYTES ? text : logLine(e);
}

/** Control characters and line breakers in wire text, shown escaped in a text line (one event, one line). */
// deno-lint-ignore no-control-regex -- control characters are exactly what it finds
const UNPRINTABLE = /[\u0000-\u001f\u007f\u0085\u2028\u2029]/g;
const printable = (t: string) => t.replace(UNPRINTABLE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
const quoted = (t: string) => `"${printable(t)}"`;

/** The event in a person's words: what `SINKHOLE_LOG_FORMAT=text` (and `deno task dev`) prints. Pure. */
export function textLine(e: LogEvent, now = new Date()): string {
  const time = now.toISOString().slice(11, 23);
  const body = (() => {
    switch (e.event) {
      case "session": {
        const txs = e.transactions.map((t) => {
          const rcpts = t.rcpts.map((r) => `${printable(r.to)} ${r.code}`).join(", ");
          const data = t.result === undefined ? "" : `; DATA ${t.size ?? 0} B → ${t.result}`;
          return `[${t.mode}] <${printable(t.from)}> → ${rcpts || "no RCPT"}${data}`;
        });
        const more = e.transactionCount > e.transactions.length || e.transcriptTruncated ? " …" : "";
        return [
          `session ${e.client}`,
          e.helo === undefined ? "" : ` helo=${quoted(e.helo)}`,
          e.tls ? " tls" : "",
          txs.length ? `: ${txs.join(" | ")}${more}` : ": no transaction",
          ` — replies ${e.replies.join(" ")}${e.replyCount > e.replies.length ? " …" : ""}`,
          e.dropped ? ", dropped" : "",
          e.error ? `, error ${quoted(e.error)}` : "",
          ` (${e.commands} commands, ${e.durationMs} ms)`,
        ].join("");
      }
      case "attempt":
        return `attempt ${e.attempt} of <${printable(e.from)}> → <${printable(e.rcpt)}>: ${
          e.dropped ? "dropped" : e.code
        } at ${e.stage}${e.abandoned ? `, then ${e.abandoned}` : ""} [${e.mode}] from ${e.client}${
          e.messageId ? ` ${printable(e.messageId)}` : ""
        }`;
      case "message":
        return `message <${printable(e.from)}> → ${e.rcpts.map(printable).join(", ")}${
          e.rcptsTruncated ? " …" : ""
        } (${e.size} B, ${e.headers.length} header lines${e.truncated ? ", more not kept" : ""})`;
      case "start":
        return `start: SMTP on ${e.bind}, health on ${e.health}${
          e.control ? `, control on http://${e.control}` : ""
        }, mode ${quoted(e.mode)} from ${e.source} ` +
          `(read every ${
            e.cacheTtlMs / 1000
          } s), STARTTLS ${e.starttls}, at most ${e.maxSessions} sessions, pid ${e.pid}`;
      case "mode":
        return `mode ${quoted(e.mode)} (was ${quoted(e.previous)}) from ${e.source}`;
      case "mode_invalid":
        return `mode refused: ${quoted(e.value)} from ${e.source}: ${e.reason}; keeping ${quoted(e.keeping)}`;
      case "mode_error":
        return `mode source failed: ${e.source}: ${e.reason}; keeping ${quoted(e.keeping)}`;
      default: {
        const { event, ...rest } = e;
        return `${event} ${
          Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "string" ? quoted(v) : JSON.stringify(v)}`)
            .join(" ")
        }`;
      }
    }
  })();
  const line = `${time} ${body}`;
  // The same bound as a JSON line (in UTF-16 units here, at most 3 octets each: a third of it).
  const max = Math.floor(MAX_LOG_LINE_BYTES / 3);
  return line.length <= max ? line : `${line.slice(0, max - 1)}…`;
}

/** Where attempt events also go as they are logged: the control port's ledger (section 14), when it is on. */
let attemptTap: ((e: AttemptEvent) => void) | undefined;
export function setAttemptTap(tap: ((e: AttemptEvent) => void) | undefined): void {
  attemptTap = tap;
}

/** How lines are written (SINKHOLE_LOG_FORMAT): JSON unless main says otherwise. */
let logFormat: LogFormat = "json";
export function setLogFormat(format: LogFormat): void {
  logFormat = format;
}

/**
 * Log lines on their way to stdout, whole and in order, encoded straight into one of two buffers
 * made once (`max` octets in all), so a line costs no buffer of its own: while one half is being
 * written the other fills. A line that does not fit is counted, not kept, and so is every line
 * after it until the queue is taken: the gap is one place in the output, where `take` puts the
 * line saying how many went missing (room for it is kept in each half). Pure.
 */
export class LogQueue {
  readonly #halves: [Uint8Array, Uint8Array];
  #filling = 0;
  /** Octets queued in the half being filled. */
  bytes = 0;
  droppedLines = 0;
  droppedBytes = 0;

  constructor(readonly max = MAX_LOG_QUEUE_BYTES, readonly noteRoom = 1024) {
    this.#halves = [new Uint8Array(max / 2), new Uint8Array(max / 2)];
  }

  /** Queues a line (text is encoded as UTF-8 in place); false when it was counted as dropped instead. */
  push(line: string | Uint8Array): boolean {
    const half = this.#halves[this.#filling];
    const room = half.length - this.noteRoom - this.bytes;
    if (this.droppedLines === 0) {
      if (typeof line !== "string") {
        if (line.length <= room) {
          half.set(line, this.bytes);
          this.bytes += line.length;
          return true;
        }
      } else {
        const { read, written } = logEncoder.encodeInto(
          line,
          half.subarray(this.bytes, this.bytes + Math.max(0, room)),
        );
        if (read === line.length) {
          this.bytes += written;
          return true;
        }
      }
    }
    this.droppedLines++;
    this.droppedBytes += typeof line === "string" ? utf8Length(line) : line.length;
    return false;
  }

  /**
   * What is queued, then `said(lines, octets)` for what was dropped after it; undefined when there
   * is nothing to write. The view stays valid until the next `take` (the other half fills meanwhile).
   */
  take(said: (lines: number, octets: number) => string): Uint8Array | undefined {
    const half = this.#halves[this.#filling];
    let n = this.bytes;
    if (this.droppedLines > 0) {
      n += logEncoder.encodeInto(said(this.droppedLines, this.droppedBytes), half.subarray(n)).written;
    }
    if (n === 0) return undefined;
    this.#filling ^= 1;
    this.bytes = 0;
    this.droppedLines = 0;
    this.droppedBytes = 0;
    return half.subarray(0, n);
  }
}

/** Octets of `s` in UTF-8, counted without encoding it (a lone surrogate counts 2, not the 3 of its U+FFFD). */
export function utf8Length(s: string): number {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    n += c < 0x80 ? 0 : c < 0x800 || (c >= 0xd800 && c <= 0xdfff) ? 1 : 2;
  }
  return n;
}

const logQueue = new LogQueue();
/** The background write in progress (or gathering its lines), if any. */
let logWriting: Promise<void> | undefined;
/** Ends the gathering now (the queue is past LOG_WRITE_AT_BYTES), while it lasts. */
let logGathered: (() => void) | undefined;
/** stdout failed (its reader closed it): said once on stderr; nothing more is queued. */
let logBroken = false;

/** The line that says what the queue dropped (in the format of every other line). */
function droppedLine(lines: number, octets: number): string {
  const e: LogDroppedEvent = {
    event: "log_dropped",
    lines,
    octets,
    reason: `stdout was read too slowly: ${MAX_LOG_QUEUE_BYTES} octets were waiting to be written`,
  };
  return logFormat === "json" ? jsonText(e, isoNow()) : textLine(e) + "\n";
}

/**
 * Writes one event on stdout, whole, in the background: lines gathered while a write is in
 * progress (or for LOG_GATHER_MS) go in the next write, so a busy listener writes its log a
 * few times in LOG_GATHER_MS, not once a line, and a stdout nobody reads holds up nothing but the log
 * (MAX_LOG_QUEUE_BYTES). Order is kept; `drainLog` (or `flushLog`) before every exit.
 */
export function log(e: LogEvent): void {
  if (e.event === "attempt") attemptTap?.(e);
  if (logBroken) return;
  logQueue.push(logFormat === "json" ? lineText(e) : textLine(e) + "\n"); // text is encoded in the queue
  if (logWriting === undefined) logWriting = writeLog();
  else if (logGathered !== undefined && logQueue.bytes >= LOG_WRITE_AT_BYTES) logGathered();
}

async function writeLog(): Promise<void> {
  try {
    // Lines gather for LOG_GATHER_MS (or until LOG_WRITE_AT_BYTES wait), then go in one write; again while more wait.
    for (let all; (await gathered(), all = logQueue.take(droppedLine));) {
      for (let off = 0; off < all.length;) off += await Deno.stdout.write(all.subarray(off));
    }
  } catch (err) {
    // stdout is gone (its reader closed it): nowhere left to log; said once on stderr.
    logBroken = true;
    logQueue.take(droppedLine);
    console.error(`sinkhole: the log cannot be written on stdout: ${describeError(err)}`);
  } finally {
    logWriting = undefined;
  }
}

/** Settles after LOG_GATHER_MS, or as soon as LOG_WRITE_AT_BYTES are queued. */
function gathered(): Promise<void> {
  if (logQueue.bytes >= LOG_WRITE_AT_BYTES) return SETTLED;
  let timer: ReturnType<typeof setTimeout> | undefined;
  return new Promise<void>((ok) => (logGathered = ok, timer = setTimeout(ok, LOG_GATHER_MS))).then(() => {
    clearTimeout(timer);
    logGathered = undefined;
  });
}

/**
 * Waits until every queued line is written (before an orderly exit), at most `limitMs`; answers
 * whether all was written (else a write is still in progress and `logQueue.bytes` wait behind it).
 */
export async function drainLog(limitMs = LOG_DRAIN_ON_STOP_MS): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<"expired">((ok) => timer = setTimeout(() => ok("expired"), limitMs));
  try {
    while (logWriting) if (await Promise.race([logWriting, expired]) === "expired") break;
  } finally {
    clearTimeout(timer);
  }
  return logWriting === undefined;
}

/** Writes what is queued now, blocking (only before an exit that cannot wait: a refused start). */
export function flushLog(): void {
  const all = logQueue.take(droppedLine);
  for (let off = 0; all && off < all.length;) off += Deno.stdout.writeSync(all.subarray(off));
}

/**
 * What a session's log line reports: what was said on the wire, recorded as it is written.
 * Bounded by MAX_LOGGED_TRANSACTIONS, MAX_LOGGED_REPLIES and MAX_TRANSCRIPT_BYTES; past a
 * bound entries are counted, not kept, and the line says `transcriptTruncated`.
 */
export class Transcript {
  transactions: TransactionLog[] = [];
  transactionCount = 0;
  /** Octets charged to the kept entries (see MAX_TRANSCRIPT_BYTES). */
  keptBytes = 0;
  truncated = false;
  replies: number[] = [];
  replyCount = 0;
  bytesIn = 0;
  bytesOut = 0;
  commands = 0;
  /** The first command's verb (a health check says QUIT and nothing else). */
  firstVerb: string | undefined;
  dropped = false;
  /** Octets read after a drop and discarded unanswered (the lingering close). */
  discarded = 0;
  tls = false;

  constructor(readonly client: string, readonly started: number) {}

  command(verb: string | undefined): void {
    if (++this.commands === 1) this.firstVerb = verb;
  }

  reply(code: number): void {
    this.replyCount++;
    if (this.replies.length < MAX_LOGGED_REPLIES) this.replies.push(code);
  }

  /** Whether `octets` more fit the byte bound; past it the transcript is marked truncated. */
  #charge(octets: number): boolean {
    if (this.keptBytes + octets + KEPT_ENTRY_COST > MAX_TRANSCRIPT_BYTES) {
      this.truncated = true;
      return false;
    }
    this.keptBytes += octets + KEPT_ENTRY_COST;
    return true;
  }

  /** Keeps the logged transactions in step with one outcome whose reply was written. */
  record(before: Transaction | undefined, out: Outcome): void {
    const tx = out.state.tx;
    if (!tx) return;
    if (!before) {
      this.transactionCount++;
      if (this.transactions.length >= MAX_LOGGED_TRANSACTIONS) this.truncated = true;
      else if (this.#charge(tx.scenario.text.length + tx.from.length)) {
        this.transactions.push({ mode: tx.scenario.text, from: tx.from, rcpts: [] });
      }
    } else if (tx.rcptCount > before.rcptCount && this.#current && this.#charge(tx.lastRcpt!.length)) {
      this.#current.rcpts.push({ to: tx.lastRcpt!, code: out.reply.code });
    }
  }

  /** The end-of-data size and reply of the current transaction. */
  endOfData(size: number, code: number): void {
    const t = this.#current;
    if (!t) return;
    t.size = size;
    t.result = code;
  }

  /** The logged transaction in progress; none when the current one was only counted. */
  get #current(): TransactionLog | undefined {
    return this.transactionCount === this.transactions.length ? this.transactions.at(-1) : undefined;
  }

  /** A health check (loopback, QUIT and nothing else) is not logged. */
  get worthLogging(): boolean {
    const loopback = this.client.startsWith("127.") || this.client === "::1";
    return !(loopback && this.commands === 1 && this.firstVerb === "QUIT");
  }

  event(helo: string | undefined, now: number, error?: string): SessionEvent {
    // Field by field in the line's order, the optional ones only when set (no object spread a session).
    const e = {
      event: "session",
      client: this.client,
      helo,
      modes: [...new Set(this.transactions.map((t) => t.mode))],
      transactions: this.transactions,
      transactionCount: this.transactionCount,
    } as SessionEvent;
    if (this.truncated) e.transcriptTruncated = true;
    e.replies = this.replies;
    if (this.dropped) e.dropped = true;
    if (this.tls) e.tls = true;
    e.replyCount = this.replyCount;
    e.commands = this.commands;
    e.bytesIn = this.bytesIn;
    e.bytesOut = this.bytesOut;
    e.durationMs = now - this.started;
    if (error) e.error = error;
    if (this.discarded > 0) e.discarded = this.discarded;
    return e;
  }
}

/** A short, stable description of why a fetch failed, for the state log. */
function describeError(err: unknown): string {
  if (err instanceof Error) {
    const code = (err as { code?: string }).code;
    const name = err.name !== "Error" ? err.name : code ?? "Error";
    return `${name}: ${err.message.split("\n")[0].slice(0, 200)}`;
  }
  return String(err).slice(0, 200);
}

// ---------------------------------------------------------------------------
// 8. The greylist and attempt tables
// ---------------------------------------------------------------------------

/**
 * A 53-bit digest of a greylist key (cyrb53). The table keeps digests, not keys, so an entry
 * costs the same whatever the key's length (a triplet key can be 560 octets). Two keys
 * share a digest about once in 2^53 pairs: that key's retry would pass early.
 */
export function keyDigest(key: string): number {
  let h1 = 0xdeadbeef;
  let h2 = 0x41c6ce57;
  for (let i = 0; i < key.length; i++) {
    const c = key.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 2654435761);
    h2 = Math.imul(h2 ^ c, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return 4294967296 * (2097151 & h2) + (h1 >>> 0);
}

/**
 * A bounded, insertion-ordered map from 53-bit digests to two numbers, held outside the V8
 * heap in typed arrays: a ring of slots (oldest first) and an open-addressing index over it
 * (linear probing, backward-shift deletion). Past `capacity` live entries the oldest goes.
 * A deleted slot stays in the ring, dead, until the ring is compacted (when it fills), so
 * every operation is O(1) amortized and the memory is fixed at construction: per entry
 * RING_SLACK ring slots of three float64 (24 octets each) and two Int32 in the index.
 */
export class DigestTable {
  readonly #ring: number;
  readonly #digest: Float64Array;
  readonly #a: Float64Array;
  readonly #b: Float64Array;
  readonly #index: Int32Array;
  readonly #mask: number;
  /** Ring positions: the oldest slot, the next free one (head ≤ tail ≤ ring). */
  #head = 0;
  #tail = 0;
  #live = 0;

  constructor(readonly capacity: number) {
    this.#ring = Math.ceil(capacity * RING_SLACK) + 1;
    this.#digest = new Float64Array(this.#ring);
    this.#a = new Float64Array(this.#ring);
    this.#b = new Float64Array(this.#ring);
    let size = 2;
    while (size < capacity * 2) size *= 2;
    this.#index = new Int32Array(size);
    this.#mask = size - 1;
  }

  get size(): number {
    return this.#live;
  }

  #home(digest: number): number {
    return (digest >>> 0) & this.#mask;
  }

  /** The index position holding `digest`, or -1. */
  #find(digest: number): number {
    for (let i = this.#home(digest);; i = (i + 1) & this.#mask) {
      const slot = this.#index[i];
      if (slot === 0) return -1;
      if (this.#digest[slot - 1] === digest) return i;
    }
  }

  /** The live values for a digest, or undefined. */
  get(digest: number): [number, number] | undefined {
    const i = this.#find(digest);
    if (i < 0) return undefined;
    const slot = this.#index[i] - 1;
    return [this.#a[slot], this.#b[slot]];
  }

  /** Changes a live entry's values in place (its age stays); false when there is none. */
  update(digest: number, a: number, b: number): boolean {
    const i = this.#find(digest);
    if (i < 0) return false;
    const slot = this.#index[i] - 1;
    this.#a[slot] = a;
    this.#b[slot] = b;
    return true;
  }

  /** Adds or replaces an entry as the newest; past `capacity` the oldest goes. */
  set(digest: number, a: number, b: number): void {
    this.delete(digest);
    while (this.#live >= this.capacity) this.delete(this.#digest[this.#oldestSlot()]);
    if (this.#tail === this.#ring) this.#compact();
    const slot = this.#tail++;
    this.#digest[slot] = digest;
    this.#a[slot] = a;
    this.#b[slot] = b;
    let i = this.#home(digest);
    while (this.#index[i] !== 0) i = (i + 1) & this.#mask;
    this.#index[i] = slot + 1;
    this.#live++;
  }

  delete(digest: number): void {
    let i = this.#find(digest);
    if (i < 0) return;
    this.#digest[this.#index[i] - 1] = -1; // dead
    this.#live--;
    // Backward-shift deletion: later entries of the probe run move up into the hole.
    for (let j = (i + 1) & this.#mask;; j = (j + 1) & this.#mask) {
      const slot = this.#index[j];
      if (slot === 0) break;
      const k = this.#home(this.#digest[slot - 1]);
      const between = i <= j ? i < k && k <= j : i < k || k <= j;
      if (!between) {
        this.#index[i] = slot;
        i = j;
      }
    }
    this.#index[i] = 0;
  }

  /** The oldest live slot (the table is not empty); dead slots before it are passed for good. */
  #oldestSlot(): number {
    while (this.#digest[this.#head] < 0) this.#head++;
    return this.#head;
  }

  /** The oldest live entry, or undefined. */
  oldest(): { digest: number; a: number; b: number } | undefined {
    if (this.#live === 0) return undefined;
    const slot = this.#oldestSlot();
    return { digest: this.#digest[slot], a: this.#a[slot], b: this.#b[slot] };
  }

  /** Forgets every entry (DELETE /attempts). */
  clear(): void {
    this.#head = this.#tail = this.#live = 0;
    this.#index.fill(0);
  }

  /** Moves the live slots to the front of the ring, in order, and rebuilds the index. */
  #compact(): void {
    let to = 0;
    for (let from = this.#head; from < this.#tail; from++) {
      if (this.#digest[from] < 0) continue;
      this.#digest[to] = this.#digest[from];
      this.#a[to] = this.#a[from];
      this.#b[to] = this.#b[from];
      to++;
    }
    this.#head = 0;
    this.#tail = to;
    this.#index.fill(0);
    for (let slot = 0; slot < to; slot++) {
      let i = this.#home(this.#digest[slot]);
      while (this.#index[i] !== 0) i = (i + 1) & this.#mask;
      this.#index[i] = slot + 1;
    }
  }
}

/**
 * Remembers first attempts per key digest, for their window: at most MAX_GREYLIST_ENTRIES
 * entries of a fixed size (GREYLIST_ENTRY_BYTES), whatever the keys, outside the V8 heap.
 */
export class GreylistTable {
  /** Digest → time of the first attempt, and its window (NaN: the table's), oldest first. */
  readonly #entries: DigestTable;
  constructor(readonly windowMs: number, readonly maxEntries = MAX_GREYLIST_ENTRIES) {
    this.#entries = new DigestTable(maxEntries);
  }

  get size(): number {
    return this.#entries.size;
  }

  /** The live entry for a key at `now`, or none. A read: nothing changes. */
  lookup(key: string, now: number): GreylistEntry | undefined {
    const found = this.#entries.get(keyDigest(key));
    if (found === undefined) return undefined;
    const [at, window] = found;
    const windowMs = Number.isNaN(window) ? this.windowMs : window;
    return now - at <= windowMs ? { at, windowMs } : undefined;
  }

  /** Writes a first attempt the policy asked for; expired entries go, and past the cap the oldest. */
  remember(rec: GreylistRecord): void {
    this.#sweep(rec.at);
    const window = rec.windowMs !== undefined && rec.windowMs !== this.windowMs ? rec.windowMs : NaN;
    this.#entries.set(keyDigest(rec.key), rec.at, window);
  }

  /** The policy's question and the table's answer in one step: lookup, verdict, remember. */
  check(key: string, now: number, minMs = 0, windowMs?: number): GreylistVerdict {
    const entry = this.lookup(key, now);
    if (entry === undefined) this.remember({ key, at: now, windowMs });
    return greylistVerdict(entry, now, minMs);
  }

  /** Forgets every entry. */
  clear(): void {
    this.#entries.clear();
  }

  /** Forgets expired entries, oldest first, up to the first live one (the cap bounds the rest). */
  #sweep(now: number): void {
    for (let e = this.#entries.oldest(); e !== undefined; e = this.#entries.oldest()) {
      if (now - e.a <= (Number.isNaN(e.b) ? this.windowMs : e.b)) break;
      this.#entries.delete(e.digest);
    }
  }
}

/**
 * The retry ledger's memory: per message (`attemptKey`), the attempts seen and when it was
 * first seen. Like the greylist table it keeps a 53-bit digest, never the key, outside the
 * V8 heap, so an entry costs ATTEMPT_ENTRY_BYTES whatever the addresses; past
 * MAX_ATTEMPT_ENTRIES the message first seen longest ago is forgotten. A restart forgets
 * everything: attempt numbers start again at 1 (the report still shows every logged attempt).
 */
export class AttemptTable {
  /** Digest → first seen, attempts, in first-seen order. */
  readonly #entries: DigestTable;
  constructor(readonly maxEntries = MAX_ATTEMPT_ENTRIES) {
    this.#entries = new DigestTable(maxEntries);
  }

  get size(): number {
    return this.#entries.size;
  }

  /** The key digested last and its digest: a message's key is digested once for its lookup, count and end. */
  #lastKey = "";
  #lastDigest = keyDigest("");

  #digest(key: string): number {
    if (key !== this.#lastKey) (this.#lastKey = key, this.#lastDigest = keyDigest(key));
    return this.#lastDigest;
  }

  lookup(key: string): AttemptEntry | undefined {
    const found = this.#entries.get(this.#digest(key));
    return found === undefined ? undefined : unpackAttempt(found[0], found[1]);
  }

  /** Counts one attempt of a message at `now` (`counted`: after an end, a new message opens). */
  count(key: string, now: number): void {
    this.#write(key, (seen) => counted(seen, Math.floor(now)));
  }

  /** Marks a message ended (delivered or bounced, `ended`). */
  end(key: string, now: number): void {
    this.#write(key, (seen) => ended(seen, Math.floor(now)));
  }

  /** Writes a message's next entry in place (its age stays), or as the newest when it had none. */
  #write(key: string, next: (seen: AttemptEntry | undefined) => AttemptEntry): void {
    const digest = this.#digest(key);
    const found = this.#entries.get(digest);
    const [a, b] = packAttempt(next(found === undefined ? undefined : unpackAttempt(found[0], found[1])));
    if (found === undefined) this.#entries.set(digest, a, b);
    else this.#entries.update(digest, a, b);
  }

  /** Forgets every count: every message's next attempt is its first. */
  clear(): void {
    this.#entries.clear();
  }
}

/**
 * An attempt entry in the DigestTable's two numbers (each an integer below 2^53, exact in a
 * float64): the first sighting (below FIRST_SEEN_SPAN) and the envelope's earlier attempts
 * (below ATTEMPT_COUNT_SPAN); the count and the ended flag.
 */
export function packAttempt(e: AttemptEntry): [number, number] {
  const first = Math.min(Math.max(0, e.first), FIRST_SEEN_SPAN - 1);
  return [(e.before ?? 0) * FIRST_SEEN_SPAN + first, (e.ended ? ATTEMPT_COUNT_SPAN : 0) + e.count];
}

export function unpackAttempt(a: number, b: number): AttemptEntry {
  const before = Math.floor(a / FIRST_SEEN_SPAN);
  const e: AttemptEntry = { count: b % ATTEMPT_COUNT_SPAN, first: a % FIRST_SEEN_SPAN };
  if (b >= ATTEMPT_COUNT_SPAN) e.ended = true;
  if (before) e.before = before;
  return e;
}

// ---------------------------------------------------------------------------
// 9. The AWS client: credentials, Signature Version 4, errors
// ---------------------------------------------------------------------------

/** AWS credentials, as the signer needs them; `expiresAt` (epoch ms) only for temporary ones. */
export interface AwsCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
  expiresAt?: number;
}

/** An AWS error answer: `name` is its type (ParameterNotFound, AccessDeniedException, …). */
export class AwsError extends Error {
  constructor(readonly type: string, message: string, readonly status: number) {
    super(message);
    this.name = type;
  }
}

/** The ECS agent's credentials endpoint, and the only hosts a plain-HTTP FULL_URI may name. */
const ECS_CREDENTIALS_URL = "http://169.254.170.2";
const CONTAINER_CREDENTIAL_HOSTS = ["169.254.170.2", "169.254.170.23", "[fd00:ec2::23]"];

const hex = (bytes: ArrayBuffer) => Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
const sha256 = async (text: string) => hex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
async function hmac(key: ArrayBuffer | Uint8Array<ArrayBuffer>, text: string): Promise<ArrayBuffer> {
  const k = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return crypto.subtle.sign("HMAC", k, new TextEncoder().encode(text));
}

/** An AWS request to sign: a POST of `body` to `url` (no query string), with its own headers. */
export interface AwsRequest {
  url: URL;
  headers: Record<string, string>;
  body: string;
  service: string;
  region: string;
}

/**
 * Signature Version 4 for one request (the AWS documentation's "Create a signed AWS API
 * request"): returns the headers to send, `host`, `x-amz-date`, the session token and
 * `authorization` added. Pure but for the clock, which is an argument.
 */
export async function signV4(req: AwsRequest, creds: AwsCredentials, now: Date): Promise<Record<string, string>> {
  const amzDate = now.toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, "");
  const day = amzDate.slice(0, 8);
  const headers: Record<string, string> = { ...req.headers, host: req.url.host, "x-amz-date": amzDate };
  if (creds.sessionToken) headers["x-amz-security-token"] = creds.sessionToken;
  const names = Object.keys(headers).map((k) => k.toLowerCase()).sort();
  const lower = Object.fromEntries(Object.entries(headers).map(([k, val]) => [k.toLowerCase(), val.trim()]));
  const signedHeaders = names.join(";");
  const canonical = [
    "POST",
    req.url.pathname || "/",
    "",
    ...names.map((n) => `${n}:${lower[n]}`),
    "",
    signedHeaders,
    await sha256(req.body),
  ].join("\n");
  const scope = `${day}/${req.region}/${req.service}/aws4_request`;
  const toSign = ["AWS4-HMAC-SHA256", amzDate, scope, await sha256(canonical)].join("\n");
  let key = await hmac(new TextEncoder().encode(`AWS4${creds.secretAccessKey}`), day);
  for (const part of [req.region, req.service, "aws4_request"]) key = await hmac(key, part);
  const signature = hex(await hmac(key, toSign));
  return {
    ...headers,
    authorization: `AWS4-HMAC-SHA256 Credential=${creds.accessKeyId}/${scope}, SignedHeaders=${signedHeaders}, ` +
      `Signature=${signature}`,
  };
}

/** A response body read up to MAX_AWS_RESPONSE_BYTES; a longer one is refused, not loaded. */
async function boundedText(res: Response): Promise<string> {
  const chunks: Uint8Array[] = [];
  let n = 0;
  for await (const chunk of res.body ?? []) {
    n += chunk.length;
    if (n > MAX_AWS_RESPONSE_BYTES) {
      await res.body?.cancel().catch(() => {});
      throw new Error(`an AWS answer over ${MAX_AWS_RESPONSE_BYTES} octets (HTTP ${res.status})`);
    }
    chunks.push(chunk);
  }
  const all = new Uint8Array(n);
  let at = 0;
  for (const c of chunks) all.set(c, (at += c.length) - c.length);
  return new TextDecoder().decode(all);
}

/**
 * Where the credentials come from, in the order the AWS SDKs look: the environment
 * (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), then the container
 * credentials endpoint (an ECS task role: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI, or
 * AWS_CONTAINER_CREDENTIALS_FULL_URI with AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]).
 * Temporary credentials are kept until CREDENTIAL_REFRESH_MARGIN_MS before they expire.
 */
export function credentialChain(
  env: (k: string) => string | undefined,
): (signal: AbortSignal) => Promise<AwsCredentials> {
  let cached: AwsCredentials | undefined;
  return async (signal) => {
    const accessKeyId = env("AWS_ACCESS_KEY_ID");
    const secretAccessKey = env("AWS_SECRET_ACCESS_KEY");
    if (accessKeyId && secretAccessKey) return { accessKeyId, secretAccessKey, sessionToken: env("AWS_SESSION_TOKEN") };
    if (cached && (cached.expiresAt === undefined || cached.expiresAt - CREDENTIAL_REFRESH_MARGIN_MS > Date.now())) {
      return cached;
    }
    const relative = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
    const full = env("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    let url: URL;
    const headers: Record<string, string> = {};
    if (relative) url = new URL(relative, ECS_CREDENTIALS_URL);
    else if (full) {
      url = new URL(full);
      const local = url.hostname === "localhost" || /^127\./.test(url.hostname) || url.hostname === "[::1]";
      if (url.protocol !== "https:" && !local && !CONTAINER_CREDENTIAL_HOSTS.includes(url.hostname)) {
        throw new Error(`AWS_CONTAINER_CREDENTIALS_FULL_URI over plain HTTP must name loopback or the ECS agent`);
      }
      const tokenFile = env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE");
      const token = tokenFile ? (await Deno.readTextFile(tokenFile)).trim() : env("AWS_CONTAINER_AUTHORIZATION_TOKEN");
      if (token) headers.authorization = token;
    } else {
      throw new Error(
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run as an ECS task with a task role",
      );
    }
    const res = await fetch(url, { headers, signal });
    const text = await boundedText(res);
    if (!res.ok) throw new Error(`the container credentials endpoint answered HTTP ${res.status}`);
    const c = JSON.parse(text) as {
      AccessKeyId?: string;
      SecretAccessKey?: string;
      Token?: string;
      Expiration?: string;
    };
    if (!c.AccessKeyId || !c.SecretAccessKey) throw new Error("the container credentials endpoint gave no keys");
    cached = {
      accessKeyId: c.AccessKeyId,
      secretAccessKey: c.SecretAccessKey,
      sessionToken: c.Token,
      expiresAt: c.Expiration ? Date.parse(c.Expiration) : undefined,
    };
    return cached;
  };
}

/** The error an AWS answer carries: JSON (`__type`, `message`) or the query protocol's XML. */
function awsError(status: number, text: string): AwsError {
  try {
    const j = JSON.parse(text) as { __type?: string; message?: string; Message?: string };
    const type = (j.__type ?? "").split("#").pop() || `HTTP${status}`;
    return new AwsError(type, j.message ?? j.Message ?? "", status);
  } catch {
    const code = /<Code>([^<]{1,100})<\/Code>/.exec(text)?.[1] ?? `HTTP${status}`;
    const message = /<Message>([^<]{0,200})/.exec(text)?.[1] ?? text.slice(0, 200);
    return new AwsError(code, message, status);
  }
}

// ---------------------------------------------------------------------------
// 10. Mode sources and the mode cache
// ---------------------------------------------------------------------------

/**
 * The source says there is no mode (the mode file does not exist): the default is in effect
 * until there is one, not the last mode. A test that removes its file gets what a fresh
 * start gives; an unreachable SSM, which says nothing of the operator's wish, keeps the last.
 */
export class AbsentSource extends Error {
  /** Named as the error it stands for (Deno.errors.NotFound), so the log reads as before. */
  override name = "NotFound";
}

/** Where the mode comes from: returns the raw value, or throws. */
export interface ModeSource {
  readonly describe: string;
  fetch(signal: AbortSignal): Promise<string>;
}

function staticSource(value: string): ModeSource {
  return { describe: `static:${value}`, fetch: () => Promise.resolve(value) };
}

/** A mode file, read up to MAX_MODE_FILE_BYTES: a larger file is refused, not loaded. */
function fileSource(path: string): ModeSource {
  return {
    describe: `file:${path}`,
    fetch: async () => {
      const file = await Deno.open(path).catch((err) => {
        throw err instanceof Deno.errors.NotFound ? new AbsentSource(`no file ${path}`) : err;
      });
      try {
        const buf = new Uint8Array(MAX_MODE_FILE_BYTES + 1);
        let n = 0;
        for (let got; n < buf.length && (got = await file.read(buf.subarray(n))) !== null;) n += got;
        if (n > MAX_MODE_FILE_BYTES) throw new Error(`the mode file is over ${MAX_MODE_FILE_BYTES} octets`);
        return new TextDecoder().decode(buf.subarray(0, n));
      } finally {
        file.close();
      }
    },
  };
}

/**
 * SSM Parameter Store's GetParameter over HTTPS, signed here (Signature Version 4 with
 * Web Crypto): no SDK, so the listener's memory and image hold none of it. The endpoint
 * is AWS_ENDPOINT_URL_SSM or AWS_ENDPOINT_URL when set (tests point them at moto), else
 * the region's.
 */
function ssmSource(name: string, env: (k: string) => string | undefined): ModeSource {
  const credentials = credentialChain(env);
  return {
    describe: `ssm:${name}`,
    fetch: async (signal) => {
      const region = env("AWS_REGION") || env("AWS_DEFAULT_REGION");
      if (!region) throw new Error("no region: set AWS_REGION");
      const endpoint = env("AWS_ENDPOINT_URL_SSM") || env("AWS_ENDPOINT_URL") || `https://ssm.${region}.amazonaws.com`;
      const req: AwsRequest = {
        url: new URL("/", endpoint),
        headers: { "content-type": "application/x-amz-json-1.1", "x-amz-target": "AmazonSSM.GetParameter" },
        body: JSON.stringify({ Name: name }),
        service: "ssm",
        region,
      };
      const headers = await signV4(req, await credentials(signal), new Date());
      const res = await fetch(req.url, { method: "POST", headers, body: req.body, signal });
      const text = await boundedText(res);
      if (!res.ok) throw awsError(res.status, text);
      const value = (JSON.parse(text) as { Parameter?: { Value?: string } }).Parameter?.Value;
      if (value === undefined) throw new Error("parameter has no value");
      return value;
    },
  };
}

/** Builds the mode source the configuration names. */
function sourceFor(config: Config, env: (k: string) => string | undefined): ModeSource {
  switch (config.modeSource) {
    case "file":
      return fileSource(config.modeFile);
    case "static":
      return staticSource(config.staticMode);
    case "ssm":
      return ssmSource(config.modeParam, env);
  }
}

/**
 * The current mode, refreshed from the source every TTL by one timer:
 * sessions read `current` and never wait; at most one request is in flight;
 * failures keep the last good mode, and each change of state is logged once.
 */
export class ModeCache {
  current: Scenario = scenario(DEFAULT_MODE);
  /** What the source last gave: its mode, or why there is none (GET /mode shows it beside the mode in effect). */
  stored: { mode?: string; error?: string } = {};
  /** A mode set over the control port: in effect, whatever the source says, until `release`. */
  #override: Scenario | undefined;
  /** The source's mode, in effect again once the override is released. */
  #fromSource: Scenario = this.current;
  /** Last logged state (mode or error); a new line is logged only on change. */
  #state = "";
  #timer: Timer | undefined;
  #stopped = false;

  constructor(readonly source: ModeSource, readonly ttlMs: number, readonly logger: (e: LogEvent) => void = log) {}

  /** One fetch, bounded by MODE_FETCH_TIMEOUT_MS. Never throws. */
  async refresh(): Promise<void> {
    const ctrl = new AbortController();
    const timer = setTimeout(
      () => ctrl.abort(new Error(`no answer in ${MODE_FETCH_TIMEOUT_MS} ms`)),
      MODE_FETCH_TIMEOUT_MS,
    );
    try {
      const raw = await Promise.race([
        this.source.fetch(ctrl.signal),
        new Promise<never>((_, reject) => ctrl.signal.addEventListener("abort", () => reject(ctrl.signal.reason))),
      ]);
      const parsed = parseScenario(raw);
      const source = this.source.describe;
      if (typeof parsed === "string") {
        const keeping = this.current.text;
        this.#report(`invalid:${raw}`, {
          event: "mode_invalid",
          source,
          keeping,
          value: raw.slice(0, 100),
          reason: parsed,
        });
      } else {
        this.stored = { mode: parsed.text };
        this.#fromSource = parsed;
        if (this.#override) return;
        const previous = this.current.text;
        this.current = parsed;
        this.#report(`ok:${parsed.text}`, { event: "mode", source, mode: parsed.text, previous });
      }
    } catch (err) {
      const reason = describeError(err);
      this.stored = { error: reason };
      if (err instanceof AbsentSource) this.#fromSource = scenario(DEFAULT_MODE);
      if (this.#override) return;
      if (err instanceof AbsentSource) this.current = this.#fromSource;
      this.#report(`error:${reason}`, {
        event: "mode_error",
        source: this.source.describe,
        keeping: this.current.text,
        reason: err instanceof AbsentSource ? `${reason}: ${DEFAULT_MODE} until it exists` : reason,
      });
    } finally {
      clearTimeout(timer);
    }
  }

  /** Where the mode in effect comes from: `control` while overridden, else the source. */
  get from(): string {
    return this.#override ? "control" : this.source.describe;
  }

  /** PUT /mode: in effect from this call on (the next session reads it), until `release`. */
  override(sc: Scenario): void {
    const previous = this.current.text;
    this.#override = this.current = sc;
    this.#state = "control";
    this.logger({ event: "mode", source: "control", mode: sc.text, previous });
  }

  /** DELETE /mode: the source's mode again, as last read. */
  release(): void {
    if (!this.#override) return;
    const previous = this.current.text;
    this.#override = undefined;
    this.current = this.#fromSource;
    this.#state = `ok:${this.current.text}`;
    this.logger({ event: "mode", source: this.source.describe, mode: this.current.text, previous });
  }

  /** Logs an event when the state changed since the last one. */
  #report(state: string, e: ModeEvent | ModeInvalidEvent | ModeErrorEvent): void {
    if (state === this.#state) return;
    this.#state = state;
    this.logger(e);
  }

  /** Fetches once (waiting at most `initialWaitMs`), then every TTL. */
  async start(initialWaitMs = MODE_INITIAL_WAIT_MS): Promise<void> {
    const first = this.refresh();
    let waited: Timer | undefined;
    await Promise.race([first, new Promise((ok) => waited = setTimeout(ok, initialWaitMs))]);
    clearTimeout(waited);
    first.then(() => this.#schedule());
  }

  #schedule(): void {
    if (this.#stopped) return;
    this.#timer = setTimeout(() => this.refresh().then(() => this.#schedule()), this.ttlMs);
  }

  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
  }
}

// ---------------------------------------------------------------------------
// 11. Transports: Deno TCP, and node:net upgradable to TLS
// ---------------------------------------------------------------------------

/** What a session reads and writes: a Deno TCP connection, or a node socket that can turn to TLS. */
export interface Transport {
  read(buf: Uint8Array): Promise<number | null>;
  write(bytes: Uint8Array): Promise<number>;
  close(): void;
  /** Shuts the write side (FIN; on TLS, close_notify first): reads go on. */
  closeWrite?(): Promise<void>;
  /** Upgrades to TLS as the server (RFC 3207); only the STARTTLS-capable transport has it. */
  startTls?(): Promise<void>;
}

/**
 * Plaintext an upgraded session holds decrypted before its ciphertext stops being read: the
 * connection is read (one READ_BUFFER_BYTES read at a time) only while less than this waits.
 */
const TLS_PLAINTEXT_HIGH_WATER = READ_BUFFER_BYTES;
/** A TLS handshake must finish within this long. */
export const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

type NodeTls = typeof import("node:tls");
type NodeDuplex = typeof import("node:stream").Duplex;

/**
 * A Deno TCP connection that can turn to TLS in place (RFC 3207). Deno's own TLS cannot upgrade
 * a server-side connection, node:tls can (docs/modes.md, "STARTTLS"): after the upgrade a
 * node:tls socket reads its ciphertext from a stream of ours, which this transport fills from
 * the connection one READ_BUFFER_BYTES read at a time, and only while the session has less than
 * TLS_PLAINTEXT_HIGH_WATER decrypted and unread: the kernel's buffer holds the rest. Before the
 * upgrade it is the connection itself: a plain session costs what it costs on Deno's transport.
 */
class UpgradableConn implements Transport {
  #secure: import("node:tls").TLSSocket | undefined;
  #cipher: import("node:stream").Duplex | undefined;
  /** The handshake is over: closing sends close_notify (before it, the connection is closed silently). */
  #upgraded = false;
  #queue: Uint8Array[] = [];
  #queued = 0;
  #ended = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;
  /** The ciphertext pump is reading the connection. */
  #pumping = false;
  #readBuf: Uint8Array | undefined;

  constructor(
    readonly conn: Deno.TcpConn,
    readonly tls: NodeTls,
    readonly context: import("node:tls").SecureContext,
    readonly Duplex: NodeDuplex,
  ) {}

  async read(buf: Uint8Array): Promise<number | null> {
    if (!this.#secure) return this.conn.read(buf);
    while (this.#queue.length === 0) {
      if (this.#error) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((ok) => this.#wake = ok);
      this.#wake = undefined;
    }
    const head = this.#queue[0];
    const n = Math.min(head.length, buf.length);
    buf.set(head.subarray(0, n));
    if (n === head.length) this.#queue.shift();
    else this.#queue[0] = head.subarray(n);
    this.#queued -= n;
    this.#pump();
    return n;
  }

  /** Shuts the write side: TLS's close_notify, then FIN (the cipher stream's end), or FIN alone before the upgrade. */
  closeWrite(): Promise<void> {
    const secure = this.#secure;
    if (!secure || !this.#upgraded) return this.conn.closeWrite();
    return new Promise((ok) => secure.end(ok));
  }

  write(bytes: Uint8Array): Promise<number> {
    const secure = this.#secure;
    if (!secure) return this.conn.write(bytes);
    return new Promise((ok, fail) => secure.write(bytes, (e) => e ? fail(e) : ok(bytes.length)));
  }

  /** Feeds the TLS socket ciphertext while the plaintext waiting is under TLS_PLAINTEXT_HIGH_WATER. */
  async #pump(): Promise<void> {
    if (this.#pumping || this.#ended || !this.#cipher) return;
    this.#pumping = true;
    const cipher = this.#cipher;
    const buf = this.#readBuf ??= new Uint8Array(READ_BUFFER_BYTES);
    try {
      while (this.#queued < TLS_PLAINTEXT_HIGH_WATER && !this.#ended) {
        const n = await this.conn.read(buf);
        if (n === null) {
          cipher.push(null);
          return;
        }
        cipher.push(buf.slice(0, n));
      }
    } catch (err) {
      if (!this.#ended) cipher.destroy(err as Error);
    } finally {
      this.#pumping = false;
    }
  }

  #onData = (d: Uint8Array) => {
    this.#queue.push(d);
    this.#queued += d.length;
    this.#wake?.();
  };
  #onEnd = () => {
    this.#ended = true;
    this.#wake?.();
  };
  #onError = (e: Error) => {
    this.#error = e;
    this.#wake?.();
  };

  /**
   * Closes: a TLS session with close_notify first (RFC 8446 §6.1), then the connection,
   * within GOODBYE_WRITE_MS whether or not the client reads it.
   */
  close(): void {
    const secure = this.#secure;
    const closeConn = () => closeQuietly(this.conn);
    if (secure && this.#upgraded && !secure.destroyed && !this.#ended) {
      const done = () => {
        clearTimeout(timer);
        secure.destroy();
        closeConn();
      };
      const timer = setTimeout(done, GOODBYE_WRITE_MS);
      secure.once("error", done);
      secure.end(done);
    } else {
      secure?.destroy();
      closeConn();
    }
    this.#ended = true;
    this.#wake?.();
  }

  async startTls(): Promise<void> {
    const conn = this.conn;
    // The ciphertext's way in: pushed by #pump; out: written to the connection in order.
    const cipher = new this.Duplex({
      read() {},
      write: (chunk: Uint8Array, _enc: string, done: (e?: Error | null) => void) =>
        writeAll(conn, chunk).then(() => done(), (e) => done(e)),
      final: (done: () => void) => (conn.closeWrite().catch(() => {}), done()),
    });
    this.#cipher = cipher;
    const secure = new this.tls.TLSSocket(cipher as unknown as import("node:net").Socket, {
      isServer: true,
      secureContext: this.context,
    });
    this.#secure = secure;
    this.#pump();
    await withTimeout(
      new Promise<void>((ok, fail) => {
        secure.once("secure", () => ok());
        secure.once("error", fail);
        secure.once("close", () => fail(new Error("closed during the TLS handshake")));
      }),
      TLS_HANDSHAKE_TIMEOUT_MS,
    );
    secure.removeAllListeners("error");
    secure.removeAllListeners("close");
    this.#upgraded = true;
    secure.on("data", this.#onData);
    secure.on("end", this.#onEnd);
    secure.on("close", this.#onEnd);
    secure.on("error", this.#onError);
  }
}

// ---------------------------------------------------------------------------
// 12. The STARTTLS certificate: a self-signed X.509 writer
// ---------------------------------------------------------------------------

/** DER (X.690): a tag, its length, its content. */
function der(tag: number, ...content: Uint8Array[]): Uint8Array {
  const length = content.reduce((n, c) => n + c.length, 0);
  const lengthBytes: number[] = [];
  for (let n = length; n > 0; n = Math.floor(n / 256)) lengthBytes.unshift(n % 256);
  const head = length < 128 ? [tag, length] : [tag, 0x80 | lengthBytes.length, ...lengthBytes];
  const out = new Uint8Array(head.length + length);
  out.set(head);
  let at = head.length;
  for (const c of content) out.set(c, (at += c.length) - c.length);
  return out;
}
const derSequence = (...c: Uint8Array[]) => der(0x30, ...c);
const derText = (tag: number, text: string) => der(tag, new TextEncoder().encode(text));
function derOid(dotted: string): Uint8Array {
  const [a, b, ...rest] = dotted.split(".").map(Number);
  const bytes = [40 * a + b];
  for (const n of rest) {
    const groups = [n & 0x7f];
    for (let v = Math.floor(n / 128); v > 0; v = Math.floor(v / 128)) groups.unshift((v & 0x7f) | 0x80);
    bytes.push(...groups);
  }
  return der(0x06, new Uint8Array(bytes));
}
/** UTCTime, YYMMDDHHMMSSZ (RFC 5280 §4.1.2.5.1, years before 2050). */
const derTime = (d: Date) => derText(0x17, d.toISOString().replace(/[-:T]/g, "").slice(2, 14) + "Z");

/**
 * A self-signed X.509 v3 certificate (RFC 5280) for `name`: RSA 2048, SHA-256, one year, the
 * name as subject and as its DNS subjectAltName. Built from node:crypto alone (keys and the
 * signature; the DER is written here), so the listener carries no third-party code.
 */
export async function selfSignedCertificate(name: string, now = new Date()): Promise<{ cert: string; key: string }> {
  const { generateKeyPairSync, sign } = await import("node:crypto");
  const { publicKey, privateKey } = generateKeyPairSync("rsa", {
    modulusLength: 2048,
    publicKeyEncoding: { type: "spki", format: "der" },
    privateKeyEncoding: { type: "pkcs8", format: "pem" },
  });
  const sha256WithRsa = derSequence(derOid("1.2.840.113549.1.1.11"), der(0x05));
  const rdn = derSequence(der(0x31, derSequence(derOid("2.5.4.3"), derText(0x0c, name))));
  const serial = crypto.getRandomValues(new Uint8Array(16));
  serial[0] &= 0x7f; // a positive INTEGER
  serial[0] |= 0x01;
  const san = derSequence(derOid("2.5.29.17"), der(0x04, derSequence(derText(0x82, name))));
  const tbs = derSequence(
    der(0xa0, der(0x02, new Uint8Array([2]))), // v3
    der(0x02, serial),
    sha256WithRsa,
    rdn,
    derSequence(derTime(new Date(now.getTime() - 60_000)), derTime(new Date(now.getTime() + 365 * 86_400_000))),
    rdn,
    new Uint8Array(publicKey),
    der(0xa3, derSequence(san)),
  );
  const signature = new Uint8Array(sign("sha256", tbs, privateKey));
  const cert = derSequence(tbs, sha256WithRsa, der(0x03, new Uint8Array([0]), signature));
  const base64 = btoa(String.fromCharCode(...cert)).replace(/.{64}/g, "$&\n").replace(/\n$/, "");
  return { cert: `-----BEGIN CERTIFICATE-----\n${base64}\n-----END CERTIFICATE-----\n`, key: privateKey };
}

/** The certificate and key: from PEM files, or a self-signed one made at start (RSA 2048, 1 year). */
export async function tlsMaterial(config: Config): Promise<{ cert: string; key: string; generated: boolean }> {
  if (config.tlsCertFile) {
    return {
      cert: await Deno.readTextFile(config.tlsCertFile),
      key: await Deno.readTextFile(config.tlsKeyFile),
      generated: false,
    };
  }
  return { ...(await selfSignedCertificate(config.serverName)), generated: true };
}

// ---------------------------------------------------------------------------
// 13. Session and server
// ---------------------------------------------------------------------------

type Timer = ReturnType<typeof setTimeout>;

const encoder = new TextEncoder();

interface ServerDeps {
  config: Config;
  modes: { readonly current: Scenario };
  greylist: GreylistTable;
  /** The retry ledger's counts; absent: every attempt is a first (tests of other things). */
  attempts?: AttemptTable;
  /** Sessions upgraded to TLS or upgrading (MAX_TLS_SESSIONS); the server keeps the count. */
  tls?: { sessions: number };
  /** The shared recipient pool's free octets (RCPT_POOL_BYTES): each session takes and gives back its transaction's draw. */
  rcptPool?: { free: number };
}

/** Replies queued from `from` on wait: for a delay, for good (a drop), or behind the TLS handshake. */
interface Hold {
  from: number;
  delayMs: number;
  after: "continue" | "drop" | "starttls";
}

/** A reply queued: its text, its code for the transcript, what runs once it is written, or if it never can be. */
type Queued = { bytes: Uint8Array; code: number; then?: () => void; unheard?: () => void };

/**
 * Each reply's octets, encoded once: most replies are the same few objects (REPLIES, a mode's,
 * the greeting and the last EHLO reply), and a reply is never changed once made. Weak: a reply
 * made for one session goes with it.
 */
const replyOctets = new WeakMap<Reply, Uint8Array>();
function replyBytes(reply: Reply): Uint8Array {
  let bytes = replyOctets.get(reply);
  if (bytes === undefined) replyOctets.set(reply, bytes = encoder.encode(formatReply(reply)));
  return bytes;
}

/** A promise already settled: what a flush with nothing to write returns. */
const SETTLED: Promise<void> = Promise.resolve();

/**
 * The replies on their way to one client: queued, held when an outcome waits, drops or
 * upgrades, written in one write (writes never overlap), recorded once they were written.
 */
export class Outbox {
  /** Replies queued and not yet written; `then` runs once the reply is on the wire. */
  #out: Queued[] = [];
  /** Octets queued (see MAX_PENDING_REPLY_BYTES). */
  bytes = 0;
  #writing: Promise<void> = SETTLED;
  hold: Hold | undefined;

  constructor(readonly conn: Transport, readonly transcript: Transcript) {}

  /**
   * Queues a reply; `then` runs (and the transcript records it) only once it was written;
   * `unheard` if the client left while it was held.
   */
  push(reply: Reply, then?: () => void, unheard?: () => void): void {
    const bytes = replyBytes(reply);
    this.#out.push({ bytes, code: reply.code, then, unheard });
    this.bytes += bytes.length;
  }

  /** Holds the replies queued from now on. */
  holdFrom(delayMs: number, after: Hold["after"]): void {
    this.hold = { from: this.#out.length, delayMs, after };
  }

  /** Ends the hold: the replies queued behind it come out of the queue, to be put back or never sent. */
  takeHeld(): { hold: Hold; later: Queued[] } | undefined {
    const hold = this.hold;
    if (!hold) return undefined;
    this.hold = undefined;
    const later = this.#out.splice(hold.from);
    this.bytes = this.#out.reduce((n, b) => n + b.bytes.length, 0);
    return { hold, later };
  }

  putBack(later: Queued[]): void {
    this.#out.push(...later);
    this.bytes += later.reduce((n, b) => n + b.bytes.length, 0);
  }

  /**
   * Writes the queued replies in one write; records them once written (a client that left was
   * told nothing of this batch: nothing is recorded). Not an async function: no frame a reply.
   */
  flush(): Promise<void> {
    if (this.#out.length === 0) return SETTLED;
    const batch = this.#out;
    this.#out = [];
    this.bytes = 0;
    const bytes = batch.length === 1 ? batch[0].bytes : concatBytes(batch);
    // Writes never overlap: one waits for the write in flight (a goodbye meanwhile); with none, it goes at once.
    const write = this.#inFlight === 0
      ? writeSome(this.conn, bytes)
      : this.#writing.then(() => writeSome(this.conn, bytes));
    this.#inFlight++;
    // One continuation a write (the rest of a partial write is written first), then the batch recorded (or the failure passed on).
    const done = write.then(
      (n) =>
        n < bytes.length
          ? writeAll(this.conn, bytes.subarray(n)).then(() => this.#written(batch, bytes.length))
          : this.#written(batch, bytes.length),
      this.#failed,
    );
    this.#writing = done;
    return done;
  }

  /** A batch is on the wire: one write fewer in flight, its replies recorded and their `then` run. */
  #written(batch: Queued[], octets: number): void {
    this.#inFlight--;
    this.transcript.bytesOut += octets;
    for (const b of batch) {
      this.transcript.reply(b.code);
      b.then?.();
    }
  }

  /** A write failed: one fewer in flight, the failure passed on (made once an outbox, not once a write). */
  readonly #failed = (err: unknown): never => {
    this.#inFlight--;
    throw err;
  };

  /** Writes in flight or waiting (see flush). */
  #inFlight = 0;
}

/** The queued replies' octets in one buffer, for one write. */
function concatBytes(batch: Queued[]): Uint8Array {
  const all = new Uint8Array(batch.reduce((n, b) => n + b.bytes.length, 0));
  let at = 0;
  for (const b of batch) all.set(b.bytes, (at += b.bytes.length) - b.bytes.length);
  return all;
}

/**
 * A session's reads: into one READ_BUFFER_BYTES buffer, and, while a reply is held, one read
 * ahead into a second (made then), so the client's FIN is seen during the delay while the
 * bytes left in the first wait to be framed. At most one read is in flight.
 */
class Reads {
  #bufs: Uint8Array[] = [spareReadBuffers.pop() ?? new Uint8Array(READ_BUFFER_BYTES)];
  /** The buffer whose bytes are being framed. */
  #cur = 0;
  #pending: { at: number; read: Promise<number | null> } | undefined;

  constructor(readonly conn: Transport) {}

  /** Reads ahead into the other buffer (once; the read in flight if there is one): its count, or null at the client's end. */
  ahead(): Promise<number | null> {
    if (!this.#pending) {
      const at = this.#cur ^ 1;
      const read = this.conn.read(this.#bufs[at] ??= new Uint8Array(READ_BUFFER_BYTES));
      read.catch(() => {}); // a session closed meanwhile: nobody asks for it
      this.#pending = { at, read };
    }
    return this.#pending.read;
  }

  /**
   * How many octets the client sent next (the read ahead, if one was made), or null at its end;
   * `current` holds them. A count, not a view: no closure or promise a read beyond the read's own.
   */
  next(): Promise<number | null> {
    const pending = this.#pending;
    if (pending) {
      this.#pending = undefined;
      this.#cur = pending.at;
      return pending.read;
    }
    return this.conn.read(this.#bufs[this.#cur]);
  }

  /** A read of `next` was left in flight (a linger timed out): no buffer of this session is kept. */
  forsake(): void {
    this.#forsaken = true;
  }
  #forsaken = false;

  /** The buffer the last `next` read into (its count of octets from the start). */
  get current(): Uint8Array {
    return this.#bufs[this.#cur];
  }

  /**
   * The session is over: its buffers are kept for the next sessions (MAX_SPARE_READ_BUFFERS at
   * most), but one a read ahead may still fill, and none when a read of `next` was left in flight.
   */
  release(): void {
    if (this.#forsaken) return;
    this.#bufs.forEach((buf, at) => {
      if (at !== this.#pending?.at && spareReadBuffers.length < MAX_SPARE_READ_BUFFERS) spareReadBuffers.push(buf);
    });
    this.#bufs = [];
  }
}

/**
 * Read buffers of ended sessions, each taken by a new one: a connection a message makes no
 * ArrayBuffer of its own (each is memory outside the V8 heap that its collector tracks and frees).
 */
const spareReadBuffers: Uint8Array[] = [];

/**
 * One SMTP session's I/O: reads, frames what the client sent, asks the policy, carries out
 * its outcome (tables, replies, holds, log events), keeps the transcript. It decides nothing.
 */
class Session implements LineSink {
  state = initialState();
  closed = false;
  readonly transcript: Transcript;
  readonly started = Date.now();
  lastRead = this.started; // when the client last sent anything (the idle timeout's sweep reads it)
  #closing = false;
  #saidGoodbye = false;
  /** Between `220 Ready to start TLS` and the handshake's end: no plaintext may be written (RFC 3207 §4). */
  #handshaking = false;
  #left = false; // the client closed its side while a reply was held: that reply was never given
  #tlsSlot = false; // holds one of MAX_TLS_SESSIONS, from its `220 Ready to start TLS` to its close
  #lingering = false; // a drop's lingering close: nothing more is written
  #gone = Promise.withResolvers<void>(); // settles when the session is closed: a delay in progress ends there
  #framer = new LineFramer();
  /** The message being received, between DATA's 354 and the end-of-data line. */
  #message: MessageReader | undefined;
  /** Where a message's header fields are captured (accept-log), made at the first such message. */
  #headerBuffer: Uint8Array | undefined;
  readonly #outbox: Outbox;
  readonly #reads: Reads;
  readonly #lookups: Lookups;

  constructor(readonly conn: Transport, readonly deps: ServerDeps, readonly client: string) {
    this.transcript = new Transcript(client, this.started);
    this.#outbox = new Outbox(conn, this.transcript);
    this.#reads = new Reads(conn);
    this.#lookups = lookupsOf(deps);
  }

  /** Runs the session to its end: the greeting, then read, frame, answer; returns why it failed, if it did. */
  async run(shuttingDown: () => boolean): Promise<string | undefined> {
    try {
      this.#apply(greeting(this.deps.modes.current, this.deps.config.serverName));
      await this.#release();
      while (!this.closed && !this.#closing) {
        const n = await this.#reads.next();
        if (n === null) break;
        const buf = this.#reads.current; // its first n octets: what the client sent (no view made)
        this.lastRead = Date.now();
        this.transcript.bytesIn += n;
        // Framing stops when a reply must wait or MAX_PENDING_REPLY_BYTES wait to be written: write, then go on.
        for (let pos = 0, more = true; more;) {
          pos = this.#framer.feed(buf, this, pos, n);
          more = !this.#closing && pos < n;
          // Nothing held (the common case): write, no #release frame a command.
          const upgraded = this.#outbox.hold ? await this.#release() : (await this.#outbox.flush(), false);
          if (upgraded || this.#closing) break; // RFC 3207: bytes pipelined after STARTTLS are discarded
        }
        if (this.#closing) break;
        if (shuttingDown() && this.idle) {
          await this.goodbye(REPLIES.shutdown);
          break;
        }
      }
      return this.#left ? CLIENT_LEFT : undefined;
    } catch (err) {
      return this.#left ? CLIENT_LEFT : this.closed ? undefined : describeError(err);
    } finally {
      this.close();
      this.#reads.release(); // every read of `next` was awaited here (but a linger's that timed out: forsaken)
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.#tlsSlot) this.deps.tls!.sessions--;
    this.#moveTo(abandonOpen(this.state, policyInputs(this.deps, this.client, this.#lookups), this.#message));
    this.#gone.resolve();
    closeQuietly(this.conn);
  }

  // LineSink: what the framer calls.
  limit(): number {
    return this.#message ? MAX_TEXT_LINE : MAX_COMMAND_LINE;
  }
  more(): boolean {
    return !this.#closing && !this.#outbox.hold && this.#outbox.bytes < MAX_PENDING_REPLY_BYTES;
  }
  overflow(): void {
    if (!this.#message) this.#badLine("long"); // a command is answered at once; the rest is discarded to LF
  }
  line(buf: Uint8Array | undefined, start: number, length: number, bare: boolean): void {
    if (!this.#message) {
      // Commands: a bare LF ends the line too (as Postfix's "normalize"); a bare CR is an invalid character.
      if (buf !== undefined) this.#commandLine(buf.subarray(start, start + lineEnd(buf, start, length)));
      return;
    }
    const read = this.#message.line(buf, start, length, bare);
    if (read !== "more") this.#endData(read === "bare");
  }

  /** Writes the queued replies; a held reply is written after its delay, or the session dropped. True: upgraded. */
  async #release(): Promise<boolean> {
    const held = this.#outbox.takeHeld();
    await this.#outbox.flush();
    if (!held) return false;
    const { hold, later } = held;
    if (hold.after === "starttls") {
      await upgrade(this.conn, (on) => this.#handshaking = on);
      this.transcript.tls = true;
      return true;
    }
    if (hold.delayMs > 0) {
      this.lastRead = Date.now() + hold.delayMs; // our own wait is not the client's idleness
      const left = await holdUnlessLeft(this.#reads, this.#gone.promise, hold.delayMs);
      this.lastRead = Date.now();
      if (!this.closed && left) {
        this.#left = true;
        for (const q of later) q.unheard?.();
        this.#closing = true;
        this.close();
        return false;
      }
      if (this.closed) return false; // shut down, or timed out, during the delay: nothing was said
    }
    if (hold.after === "drop") {
      this.transcript.dropped = true;
      this.#closing = true;
      await this.#linger();
      this.close();
      return false;
    }
    this.#outbox.putBack(later);
    await this.#outbox.flush();
    return false;
  }

  /**
   * A drop's lingering close: FIN at once, then what the client still sends (pipelined commands
   * it wrote before it saw the FIN) read and discarded, unanswered, until its FIN, LINGER_MAX_MS
   * or LINGER_MAX_BYTES; closing with that input unread would send RST instead of FIN.
   */
  async #linger(): Promise<void> {
    this.#lingering = true;
    const deadline = Date.now() + LINGER_MAX_MS;
    try {
      await withTimeout(this.conn.closeWrite?.() ?? SETTLED, GOODBYE_WRITE_MS);
      while (!this.closed && this.transcript.discarded < LINGER_MAX_BYTES) {
        const n = await withTimeout(this.#reads.next(), Math.max(0, deadline - Date.now()));
        if (n === null) return;
        this.transcript.discarded += n;
        this.transcript.bytesIn += n;
      }
    } catch {
      // The client reset, or the linger timed out: close now. A read may still be in flight: its buffer is not kept.
      this.#reads.forsake();
    }
  }

  #badLine(kind: "long" | "chars"): void {
    this.transcript.command(undefined);
    this.#apply(respondToBadLine(this.state, kind, policyInputs(this.deps, this.client, this.#lookups)));
  }

  /** A command line, its line end taken off. */
  #commandLine(line: Uint8Array): void {
    const text = decodeCommand(line);
    if (text === undefined) return this.#badLine("chars");
    // Only the first command's verb is kept (a health check says QUIT and nothing else): no split for the rest.
    this.transcript.command(this.transcript.commands === 0 ? splitCommand(text).verb : undefined);
    const before = this.state.tx;
    const out = respond(this.state, text, policyInputs(this.deps, this.client, this.#lookups));
    this.#apply(out, () => this.transcript.record(before, out));
  }

  /**
   * Carries out an outcome: the tables' writes, the reply (held when it waits), what comes
   * after, and its log events once the reply is written (at once when nothing will be said).
   */
  #apply(out: Outcome, written?: () => void): void {
    this.#moveTo(out.state);
    writeTables(this.deps, out);
    const { events, unheard } = out;
    if (out.after === "drop") {
      this.#outbox.holdFrom(out.delayMs, "drop");
      for (const e of events ?? []) log(e);
      return;
    }
    if (out.delayMs > 0) this.#outbox.holdFrom(out.delayMs, "continue");
    this.#outbox.push(
      out.reply,
      events ? () => (written?.(), events.forEach(log)) : written,
      unheard ? () => unheard.forEach(log) : undefined,
    );
    if (out.farewell) this.#outbox.push(out.farewell);
    if (out.after === "close") this.#closing = true;
    else if (out.after === "data") {
      // accept-log's header capture: one buffer a session, not one a message (read before the next DATA).
      const buffer = out.captureHeaders ? this.#headerBuffer ??= new Uint8Array(MAX_LOGGED_HEADER_BYTES) : undefined;
      this.#message = new MessageReader(out.captureHeaders, buffer);
    } else if (out.after === "starttls") {
      this.#outbox.holdFrom(0, "starttls");
      this.#tlsSlot = !!this.deps.tls && (this.deps.tls.sessions++, true); // given back in close()
    }
  }

  /**
   * The session's next state, its transaction's draw on the shared recipient pool carried with
   * it: reserved as recipients are accepted, given back whenever the transaction ends (end of
   * data, RSET, HELO/EHLO, a drop, the close however it comes).
   */
  #moveTo(next: SessionState): void {
    const pool = this.deps.rcptPool;
    if (pool) pool.free += pooledOf(this.state) - pooledOf(next);
    this.state = next;
  }

  /** The message's end: its lone dot, or a bare LF or CR (refused, and the session closed: no smuggling). */
  #endData(bare: boolean): void {
    const message = this.#message!;
    this.#message = undefined;
    // The reader is its own summary (size, long line, Message-ID, headers).
    const summary: DataSummary = bare ? { ...message.summary, messageId: message.messageId, bare } : message;
    const out = endOfData(this.state, summary, policyInputs(this.deps, this.client, this.#lookups));
    this.#apply(out, () => this.transcript.endOfData(message.size, out.reply.code));
  }

  /** Not inside DATA: may be told 421 on shutdown (a command half sent counts as idle). */
  get idle(): boolean {
    return !this.#message;
  }

  /** Sends a final reply and closes, after any write in progress (bounded). */
  async goodbye(reply: Reply): Promise<void> {
    if (this.closed) return;
    // Mid-handshake (RFC 3207 §4), asked again, or lingering after a drop (nothing more is said).
    if (this.#handshaking || this.#saidGoodbye || this.#lingering) return this.close();
    this.#saidGoodbye = true;
    this.#closing = true;
    this.#outbox.push(reply);
    try {
      await withTimeout(this.#outbox.flush(), GOODBYE_WRITE_MS);
    } catch { /* the client is gone or not reading */ }
    this.close();
  }
}

/** A session ending with a transaction open: the ledger logs the attempts it abandons (the policy says which). */
function abandonOpen(state: SessionState, inputs: Inputs, message: MessageReader | undefined): SessionState {
  if (!state.tx) return state;
  for (const e of abandoned(state, inputs, state.quit ? "quit" : "close", message)) log(e);
  return { ...state, tx: undefined };
}

/** Upgrades a transport to TLS after `220 Ready to start TLS`; `handshaking` says while it lasts. */
async function upgrade(conn: Transport, handshaking: (on: boolean) => void): Promise<void> {
  if (!conn.startTls) throw new Error("STARTTLS accepted on a transport that cannot upgrade");
  handshaking(true);
  try {
    await conn.startTls();
  } finally {
    handshaking(false);
  }
}

/** Closes what may be closed already. */
function closeQuietly(c: { close(): void }): void {
  try {
    c.close();
  } catch { /* already closed */ }
}

/** An outcome's writes to the tables: greylist entries, attempt counts, messages ended. */
function writeTables(deps: ServerDeps, out: Outcome): void {
  for (const rec of out.remember ?? []) deps.greylist.remember(rec);
  if (out.attempt) deps.attempts?.count(out.attempt.key, out.attempt.first);
  for (const key of out.ends ?? []) deps.attempts?.end(key, Date.now());
}

/** A session's read-only lookups into the tables, made once: `at` is the moment's time (policyInputs sets it). */
interface Lookups {
  at: number;
  greylist: GreylistLookup;
  attempts: AttemptLookup;
}

function lookupsOf(deps: ServerDeps): Lookups {
  const l: Lookups = {
    at: 0,
    greylist: (key) => deps.greylist.lookup(key, l.at),
    attempts: (key) => deps.attempts?.lookup(key),
  };
  return l;
}

/** The policy's inputs now: the mode in effect, the time, the tables (read only, through the session's lookups). */
function policyInputs(deps: ServerDeps, client: string, lookups: Lookups): Inputs {
  const now = lookups.at = Date.now();
  return {
    scenario: deps.modes.current,
    serverName: deps.config.serverName,
    client,
    now,
    greylist: lookups.greylist,
    tlsAvailable: deps.config.startTls,
    tlsBusy: (deps.tls?.sessions ?? 0) >= MAX_TLS_SESSIONS,
    attempts: lookups.attempts,
    rcptPoolFree: deps.rcptPool?.free,
  };
}

/**
 * Waits out a held reply's delay, or until the session is gone, or until the client's FIN:
 * true when the client left first (a reply it can no longer hear is not given). Bytes it
 * pipelines instead wait, read ahead, for the framer; its FIN is then seen at the next read.
 */
async function holdUnlessLeft(reads: Reads, gone: Promise<void>, delayMs: number): Promise<boolean> {
  let timer: Timer | undefined;
  let left = false;
  const fin = reads.ahead().then((n) => left = n === null, () => left = true);
  await Promise.race([
    new Promise((ok) => timer = setTimeout(ok, delayMs)),
    gone,
    fin.then((end) => end ? undefined : new Promise(() => {})),
  ]);
  clearTimeout(timer);
  return left;
}

/** The session line's error when the client left while its reply was held. */
const CLIENT_LEFT = "the client closed the connection while its reply was held";

/** Writes every octet (a write may take fewer). Not an async function: no frame a write. */
function writeAll(conn: Transport, bytes: Uint8Array): Promise<void> {
  return writeSome(conn, bytes).then((n) => n < bytes.length ? writeAll(conn, bytes.subarray(n)) : undefined);
}

/** One write: the octets it took (maybe fewer than all); a connection already closed is a rejection, as from an async function. */
function writeSome(conn: Transport, bytes: Uint8Array): Promise<number> {
  try {
    return conn.write(bytes);
  } catch (err) {
    return Promise.reject(err);
  }
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: Timer | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => t = setTimeout(() => reject(new Error("timeout")), ms)),
  ]).finally(() => clearTimeout(t));
}

function clientAddress(conn: Deno.Conn): string {
  const addr = conn.remoteAddr as Deno.NetAddr;
  return (addr.hostname ?? "unknown").replace(/^::ffff:/, "");
}

/** The TCP server: accepts, caps concurrency, runs sessions, shuts down gracefully. */
class Server {
  readonly sessions = new Set<Session>();
  #listener: Deno.TcpListener | undefined;
  /** With STARTTLS on: a connection as a transport that can upgrade. */
  #upgradable: ((conn: Deno.TcpConn) => Transport) | undefined;
  #health: Deno.TcpListener | undefined;
  #healthDone: Promise<void> = Promise.resolve();
  #address: Deno.NetAddr | undefined;
  #done: Promise<void> | undefined;
  #shuttingDown = false;
  #sweeper: Timer | undefined;

  readonly deps: ServerDeps;

  constructor(deps: ServerDeps) {
    this.deps = {
      ...deps,
      tls: deps.tls ?? { sessions: 0 },
      rcptPool: deps.rcptPool ?? { free: deps.config.rcptPoolBytes ?? RCPT_POOL_BYTES },
    };
  }

  get addr(): Deno.NetAddr {
    return this.#address!;
  }

  /**
   * Listens with Deno.listen; when STARTTLS is on, each connection is an UpgradableConn, since
   * only node:tls can upgrade a server-side connection in place.
   */
  async listen(tls?: { cert: string; key: string }): Promise<void> {
    const { bindHost, bindPort, idleTimeoutMs, sessionTimeoutMs } = this.deps.config;
    if (tls) {
      const nodeTls = await import("node:tls");
      const nodeStream = await import("node:stream");
      const context = nodeTls.createSecureContext({ cert: tls.cert, key: tls.key });
      this.#upgradable = (conn) => new UpgradableConn(conn, nodeTls, context, nodeStream.Duplex);
    }
    try {
      this.#listener = Deno.listen({ hostname: bindHost, port: bindPort, transport: "tcp" });
    } catch (err) {
      throw bindError("SMTP", bindHost, bindPort, "SINKHOLE_BIND_PORT", err);
    }
    this.#address = this.#listener.addr;
    this.#done = this.#acceptLoop();
    const every = Math.max(50, Math.min(TIMEOUT_SWEEP_MAX_MS, Math.min(idleTimeoutMs, sessionTimeoutMs) / 4));
    this.#sweeper = setInterval(() => this.#sweep(Date.now()), every);
    const { healthHost, healthPort } = this.deps.config;
    try {
      this.#health = Deno.listen({ hostname: healthHost, port: healthPort, transport: "tcp" });
    } catch (err) {
      this.#listener?.close();
      clearInterval(this.#sweeper);
      throw bindError("the liveness port", healthHost, healthPort, "SINKHOLE_HEALTH_PORT", err);
    }
    this.#healthDone = this.#answerHealth(this.#health);
  }

  get healthAddr(): Deno.NetAddr {
    return this.#health!.addr;
  }

  /**
   * The liveness port: each connection gets one line from the event loop and is closed:
   * `ok SESSIONS/CAP` while SMTP connections are being accepted, `down` once shutting down.
   * No scenario, delay or cap applies here, and nothing is logged: ECS replaces the task
   * only when the process stops answering, never because of the mode an operator chose.
   */
  async #answerHealth(listener: Deno.TcpListener): Promise<void> {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch {
        if (this.#shuttingDown) return;
        await new Promise((ok) => setTimeout(ok, ACCEPT_ERROR_BACKOFF_MS));
        continue;
      }
      const answer = this.#shuttingDown ? "down\n" : `ok ${this.sessions.size}/${this.deps.config.maxSessions}\n`;
      withTimeout(writeAll(conn, encoder.encode(answer)), GOODBYE_WRITE_MS).catch(() => {}).finally(() => {
        try {
          conn.close();
        } catch { /* gone */ }
      });
    }
  }

  /** Ends sessions past the idle or the total timeout with 421 4.4.2. */
  #sweep(now: number): void {
    const { idleTimeoutMs, sessionTimeoutMs } = this.deps.config;
    for (const s of this.sessions) {
      if (now - s.lastRead >= idleTimeoutMs || now - s.started >= sessionTimeoutMs) s.goodbye(REPLIES.timeout);
    }
  }

  async #acceptLoop(): Promise<void> {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener!.accept();
      } catch (err) {
        if (this.#shuttingDown) return;
        log({ event: "error", where: "accept", reason: describeError(err) });
        await new Promise((ok) => setTimeout(ok, ACCEPT_ERROR_BACKOFF_MS)); // e.g. out of descriptors
        continue;
      }
      if (this.sessions.size >= this.deps.config.maxSessions) {
        this.#refuse(conn, clientAddress(conn));
        continue;
      }
      this.#run(this.#upgradable?.(conn) ?? conn, clientAddress(conn));
    }
  }

  /** Past the session cap: a 421 without waiting for the client, then close. */
  #refuse(conn: Transport, client: string): void {
    const bytes = replyBytes(REPLIES.tooManySessions);
    withTimeout(writeAll(conn, bytes), GOODBYE_WRITE_MS).catch(() => {}).finally(() => {
      try {
        conn.close();
      } catch { /* gone */ }
    });
    log({ event: "refused", client, reason: "too many sessions", limit: this.deps.config.maxSessions });
  }

  async #run(conn: Transport, client: string): Promise<void> {
    const session = new Session(conn, this.deps, client);
    this.sessions.add(session);
    const failure = await session.run(() => this.#shuttingDown);
    this.sessions.delete(session);
    if (session.transcript.worthLogging) log(session.transcript.event(session.state.helo, Date.now(), failure));
  }

  /** Stops accepting, says 421 to idle sessions, lets DATA finish up to a bound. */
  async shutdown(graceMs = SHUTDOWN_GRACE_MS): Promise<void> {
    this.#shuttingDown = true;
    if (this.#listener) closeQuietly(this.#listener);
    if (this.#health) closeQuietly(this.#health);
    await this.#healthDone;
    await this.#done;
    for (const s of this.sessions) if (s.idle) s.goodbye(REPLIES.shutdown);
    const deadline = Date.now() + graceMs;
    while (this.sessions.size > 0 && Date.now() < deadline) {
      await new Promise((ok) => setTimeout(ok, 50));
    }
    for (const s of this.sessions) s.close();
    while (this.sessions.size > 0) await new Promise((ok) => setTimeout(ok, 10));
    clearInterval(this.#sweeper);
  }
}

// ---------------------------------------------------------------------------
// 14. The control port: JSON over HTTP (docs/control.md)
// ---------------------------------------------------------------------------

/** An attempt event as the control port serves it (and `ctl report --json` prints it): with its time. */
export type ControlAttempt = AttemptEvent & { ts: string; intervalS?: number };

/** One message's attempts, the shape of `ctl report --json` (ctl/report.ts, MessageHistory). */
export interface ControlHistory {
  key: string;
  from: string;
  rcpt: string;
  attempts: ControlAttempt[];
  deliveries: number;
  duplicate: boolean;
  bounced: boolean;
}

/** What `GET /attempts` keeps: `rcpt` (exact), attempts at or after `sinceMs`, messages that carry `messageId`. */
export interface AttemptFilter {
  rcpt?: string;
  sinceMs?: number;
  messageId?: string;
}

/** An attempt as kept for grouping: its own fields (its envelope's are the `Envelope`'s) and its time in ms. */
export type KeptAttempt = Omit<AttemptEvent, "event" | "key" | "from" | "rcpt"> & { ts: string; t: number };

/** One envelope's attempts (any order), or one message's once `messagesOf` has split them. */
export interface Envelope {
  key: string;
  from: string;
  rcpt: string;
  attempts: KeptAttempt[];
}

/** The message reached the sinkhole whole at this attempt (said 2yz, or dropped after the final dot). */
export const handedOver = (a: Pick<AttemptEvent, "stage" | "dropped" | "code">): boolean =>
  a.stage === "eod" && (a.dropped === true || (a.code !== undefined && a.code < 300));

/** `<id>` as the listener logs it: angle brackets added when the operator left them out. */
export function normalMessageId(id: string): string {
  const t = id.trim();
  return t.startsWith("<") ? t : `<${t}>`;
}

/**
 * An envelope's attempts (any order) as its messages, as the attempt table counts them: in time
 * order, a message ends at an attempt that handed it over (2yz or dropped at the end of data) or
 * bounced it (5yz); the next attempt opens a new one. A message handed over with the Message-ID
 * the one that ended before it was delivered with is that one sent again (the final reply lost):
 * its attempts join it, a duplicate. Linear but the sort.
 */
export function messagesOf(envelope: Envelope): Envelope[] {
  const sorted = [...envelope.attempts].sort((a, b) => a.t - b.t);
  const messages: Envelope[] = [];
  let open: KeptAttempt[] = [];
  let last: { message: Envelope; deliveredId?: string } | undefined;
  for (const a of sorted) {
    open.push(a);
    const delivered = handedOver(a);
    if (!delivered && !(a.code !== undefined && a.code >= 500)) continue;
    if (delivered && a.messageId !== undefined && last?.deliveredId === a.messageId) {
      for (const b of open) last.message.attempts.push(b);
    } else {
      const message = { ...envelope, attempts: open };
      messages.push(message);
      last = { message, deliveredId: delivered ? a.messageId : undefined };
    }
    open = [];
  }
  if (open.length > 0) messages.push({ ...envelope, attempts: open });
  return messages;
}

/** A message's history from its attempts in time order (as `messagesOf` gives them): intervals, deliveries; linear. */
export function messageHistory({ key, from, rcpt, attempts: sorted }: Envelope): ControlHistory {
  const attempts = sorted.map(({ t, code, dropped, unheard, abandoned, messageId, ...rest }, i) => ({
    event: "attempt" as const,
    key,
    from,
    rcpt,
    ...rest,
    ...(code !== undefined ? { code } : {}),
    ...(dropped ? { dropped } : {}),
    ...(unheard ? { unheard } : {}),
    ...(abandoned ? { abandoned } : {}),
    ...(messageId !== undefined ? { messageId } : {}),
    ...(i > 0 ? { intervalS: (t - sorted[i - 1].t) / 1000 } : {}),
  }));
  const seen = new Set<string>();
  let deliveries = 0;
  let duplicate = false;
  for (const a of attempts) {
    if (!handedOver(a)) continue;
    deliveries++;
    const id = a.messageId ?? "";
    if (seen.has(id)) duplicate = true;
    seen.add(id);
  }
  const last = attempts.at(-1)!;
  return { key, from, rcpt, attempts, deliveries, duplicate, bounced: last.code !== undefined && last.code >= 500 };
}

/**
 * The attempts grouped per message (`messagesOf`), in time order, with intervals and outcomes
 * (`messageHistory`): ctl/report.ts's `Ledger` makes its histories with the same two functions.
 */
export function controlHistories(events: readonly ControlAttempt[], f: AttemptFilter = {}): ControlHistory[] {
  const byKey = new Map<string, Envelope>();
  for (const { event: _event, key, from, rcpt, intervalS: _intervalS, ...own } of events) {
    if (f.rcpt !== undefined && rcpt !== f.rcpt) continue;
    const t = Date.parse(own.ts);
    if (f.sinceMs !== undefined && t < f.sinceMs) continue;
    let envelope = byKey.get(key);
    if (!envelope) byKey.set(key, envelope = { key, from, rcpt, attempts: [] });
    envelope.attempts.push({ ...own, t });
  }
  const want = f.messageId === undefined ? undefined : normalMessageId(f.messageId);
  const out: ControlHistory[] = [];
  for (const envelope of byKey.values()) {
    for (const message of messagesOf(envelope)) {
      if (want !== undefined && !message.attempts.some((a) => a.messageId === want)) continue;
      out.push(messageHistory(message));
    }
  }
  return out.sort((a, b) => Date.parse(a.attempts[0].ts) - Date.parse(b.attempts[0].ts));
}

/**
 * The attempt events the control port serves, newest kept: bounded by MAX_CONTROL_LEDGER_BYTES
 * (each held as its JSON text), the oldest forgotten past it.
 */
export class ControlLedger {
  #lines: string[] = [];
  #sizes: number[] = [];
  #head = 0;
  bytes = 0;
  /** Attempts forgotten for room since the last clear (GET /attempts says so). */
  forgotten = 0;

  constructor(readonly maxBytes = MAX_CONTROL_LEDGER_BYTES) {}

  get size(): number {
    return this.#lines.length - this.#head;
  }

  add(e: AttemptEvent, now = new Date()): void {
    const line = JSON.stringify({ ...e, ts: now.toISOString() });
    // deno-lint-ignore no-control-regex -- Latin-1 is one octet a character in V8
    const size = line.length * (/^[\x00-\xff]*$/.test(line) ? 1 : 2) + KEPT_ENTRY_COST;
    if (size > this.maxBytes) return void this.forgotten++;
    this.#lines.push(line);
    this.#sizes.push(size);
    this.bytes += size;
    while (this.bytes > this.maxBytes) {
      this.bytes -= this.#sizes[this.#head];
      this.#head++;
      this.forgotten++;
    }
    if (this.#head > 1024 && this.#head * 2 > this.#lines.length) {
      this.#lines = this.#lines.slice(this.#head);
      this.#sizes = this.#sizes.slice(this.#head);
      this.#head = 0;
    }
  }

  events(): ControlAttempt[] {
    return this.#lines.slice(this.#head).map((l) => JSON.parse(l));
  }

  clear(): void {
    this.#lines = [];
    this.#sizes = [];
    this.#head = this.bytes = this.forgotten = 0;
  }
}

/** A loopback address (127.0.0.0/8, ::1, an IPv4-mapped loopback) or `localhost`. */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase().replace(/^::ffff:/, "");
  return h === "localhost" || h === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** Whether the control port answers a client: bound to loopback (the default), loopback clients only. */
export function controlAllows(bindHost: string, client: string): boolean {
  return !isLoopback(bindHost) || isLoopback(client);
}

/** A control answer: its status and JSON body. */
export interface ControlAnswer {
  status: number;
  body: unknown;
}

/** A request body's length as its header says, and whether it is over the bound (413 before any of it is read). */
export function bodyTooLarge(contentLength: string | null): boolean {
  return contentLength !== null && !(Number(contentLength) <= MAX_CONTROL_BODY_BYTES);
}

/** What the control port can change: the mode cache, the decision state, the served ledger. */
export interface ControlDeps {
  modes: ModeCache;
  greylist: GreylistTable;
  attempts: AttemptTable;
  ledger: ControlLedger;
}

const CONTROL_ROUTES: Record<string, readonly string[]> = {
  "/mode": ["GET", "PUT", "DELETE"],
  "/attempts": ["GET", "DELETE"],
};

/**
 * One control request, its body already read (at most MAX_CONTROL_BODY_BYTES): the answer.
 * `PUT /mode` puts the value in effect before it answers, so a session opened after the 200
 * reads it (sessions read `ModeCache.current` when they start, on the same thread).
 */
export function controlAnswer(d: ControlDeps, method: string, url: URL, body: string): ControlAnswer {
  const allowed = CONTROL_ROUTES[url.pathname];
  if (!allowed) return { status: 404, body: { error: `no ${url.pathname}: /mode, /attempts (docs/control.md)` } };
  if (!allowed.includes(method)) {
    return { status: 405, body: { error: `${method} ${url.pathname}: one of ${allowed.join(", ")}` } };
  }
  const mode = () => ({ mode: d.modes.current.text, source: d.modes.from, stored: d.modes.stored });
  switch (`${method} ${url.pathname}`) {
    case "GET /mode":
      return { status: 200, body: mode() };
    case "PUT /mode": {
      const parsed = parseScenario(body.trim());
      if (typeof parsed === "string") return { status: 400, body: { error: parsed, mode: d.modes.current.text } };
      d.modes.override(parsed);
      return { status: 200, body: mode() };
    }
    case "DELETE /mode":
      d.modes.release();
      return { status: 200, body: mode() };
    case "GET /attempts": {
      const q = url.searchParams;
      const since = q.get("since");
      const sinceMs = since === null ? undefined : Date.parse(since);
      if (sinceMs !== undefined && !Number.isFinite(sinceMs)) {
        return { status: 400, body: { error: `since must be an ISO 8601 time, got ${JSON.stringify(since)}` } };
      }
      const filter = { rcpt: q.get("rcpt") ?? undefined, sinceMs, messageId: q.get("messageId") ?? undefined };
      return { status: 200, body: controlHistories(d.ledger.events(), filter) };
    }
    default: { // DELETE /attempts
      const forgot = { attempts: d.attempts.size, greylist: d.greylist.size, events: d.ledger.size };
      d.attempts.clear();
      d.greylist.clear();
      d.ledger.clear();
      return { status: 200, body: { forgot } };
    }
  }
}

/** Reads a request body up to MAX_CONTROL_BODY_BYTES: its text, or undefined once it is longer (then cancelled). */
async function boundedBody(req: Request): Promise<string | undefined> {
  if (!req.body) return "";
  const reader = req.body.getReader();
  const parts: Uint8Array[] = [];
  let n = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    n += value.length;
    if (n > MAX_CONTROL_BODY_BYTES) {
      reader.cancel().catch(() => {});
      return undefined;
    }
    parts.push(value);
  }
  const all = new Uint8Array(n);
  let at = 0;
  for (const p of parts) all.set(p, (at += p.length) - p.length);
  return new TextDecoder().decode(all);
}

/** Starts the control port (Deno.serve): its address, and how to stop it. Throws a StartError when it cannot bind. */
export function serveControl(
  host: string,
  port: number,
  d: ControlDeps,
): { addr: Deno.NetAddr; shutdown: () => Promise<void> } {
  const json = (a: ControlAnswer) =>
    new Response(JSON.stringify(a.body, null, 2) + "\n", {
      status: a.status,
      headers: { "content-type": "application/json" },
    });
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({ hostname: host, port, onListen: () => {} }, async (req, info) => {
      if (!controlAllows(host, info.remoteAddr.hostname)) {
        return json({ status: 403, body: { error: "the control port answers loopback clients only" } });
      }
      const tooLarge = { status: 413, body: { error: `a body is at most ${MAX_CONTROL_BODY_BYTES} octets` } };
      if (bodyTooLarge(req.headers.get("content-length"))) return json(tooLarge);
      const body = await boundedBody(req).catch(() => "");
      if (body === undefined) return json(tooLarge);
      return json(controlAnswer(d, req.method, new URL(req.url), body));
    });
  } catch (err) {
    throw bindError("the control port", host, port, "SINKHOLE_CONTROL_PORT", err);
  }
  return { addr: server.addr, shutdown: () => server.shutdown() };
}

// ---------------------------------------------------------------------------
// 15. Health check and main
// ---------------------------------------------------------------------------

/**
 * `--healthcheck`: asks the liveness port (SINKHOLE_HEALTH_HOST:SINKHOLE_HEALTH_PORT) and
 * exits 0 on `ok …`, 1 otherwise. It never touches the SMTP port, so no scenario (a refusal
 * or a delay at connect, a drop), the session cap, or the logs depend on it.
 */
export async function healthcheck(config: Config): Promise<number> {
  try {
    const conn = await withTimeout(
      Deno.connect({ hostname: config.healthHost, port: config.healthPort }),
      HEALTHCHECK_TIMEOUT_MS,
    );
    try {
      const buf = new Uint8Array(MAX_HEALTH_ANSWER);
      const n = await withTimeout(conn.read(buf), HEALTHCHECK_TIMEOUT_MS);
      const answer = n === null ? "" : new TextDecoder().decode(buf.subarray(0, n)).trim();
      if (!answer.startsWith("ok")) {
        console.error(`healthcheck: ${config.healthHost}:${config.healthPort} answered ${JSON.stringify(answer)}`);
        return 1;
      }
      return 0;
    } finally {
      conn.close();
    }
  } catch (err) {
    console.error(`healthcheck: ${config.healthHost}:${config.healthPort}: ${describeError(err)}`);
    return 1;
  } finally {
    if (Deno.env.get("SINKHOLE_HEALTHCHECK_MEMORY") === "1") {
      // The check's own memory, for tests/memory_test.ts (it runs beside the listener in the task).
      const status = await Deno.readTextFile("/proc/self/status").catch(() => "");
      const kb = (k: string) => new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? "?";
      console.error(`healthcheck memory: VmHWM ${kb("VmHWM")} kB, RssAnon ${kb("RssAnon")} kB`);
    }
  }
}

/** The listener's usage (`--help`): its arguments, then every environment variable it reads. */
export function usage(): string {
  const width = Math.max(...ENVIRONMENT_VARIABLES.map((v) => v.name.length));
  return [
    "usage: deno task start [--dev] | deno task dev | sinkhole [--dev | --healthcheck | --help]",
    "",
    "sinkhole: an SMTP listener that answers every transaction as the operator's mode says.",
    "",
    "arguments:",
    "  --dev           defaults for a laptop where the environment sets nothing: 127.0.0.1:2525, the mode",
    `                  from ./${DEV_MODE_FILE} read every second, text logs (deno task dev passes it)`,
    "  --healthcheck   ask a running listener's liveness port; exit 0 when it answers ok, else 1",
    "  --help, -h      print this help",
    "",
    "environment (default in brackets):",
    ...ENVIRONMENT_VARIABLES.map((v) => `  ${v.name.padEnd(width)}  ${v.help}${v.default ? ` [${v.default}]` : ""}`),
    "",
    "The mode source is SINKHOLE_MODE_FILE if set, else SINKHOLE_MODE, else SSM (SINKHOLE_MODE_PARAM).",
    "The mode language, logs and limits: docs/modes.md, docs/logs.md, docs/protocol.md.",
    "",
    "exit codes: 0 stopped on a signal (or healthy), 1 unhealthy (--healthcheck), 2 refused at start (usage or",
    "configuration), 3 could not start (an address in use or not permitted, a TLS file unreadable)",
  ].join("\n");
}

/** The listener could not start: what, at which address, why, and what to do (exit 2 refused, 3 could not). */
export class StartError extends Error {
  constructor(message: string, readonly hint: string, readonly exitCode: 2 | 3) {
    super(message);
    this.name = "StartError";
  }
}

/** A failed bind, said with its address and the variable that sets it. */
export function bindError(what: string, host: string, port: number, variable: string, err: unknown): StartError {
  const e = err as Error & { code?: string };
  const kind = e.name === "AddrInUse" || e.code === "EADDRINUSE"
    ? "in use"
    : e.name === "PermissionDenied" || e.code === "EACCES" || e.code === "EPERM"
    ? "not permitted"
    : e.name === "AddrNotAvailable" || e.code === "EADDRNOTAVAIL"
    ? "not available"
    : "error";
  const hint = kind === "in use"
    ? `another process listens on ${host}:${port} (ss -ltnp 'sport = :${port}' says which); ` +
      `stop it or set ${variable} to another port`
    : kind === "not permitted"
    ? `ports below 1024 need root or CAP_NET_BIND_SERVICE; set ${variable} to 1024 or above ` +
      `(deno task dev uses 2525)`
    : kind === "not available"
    ? `${host} is not an address of this machine; set ${variable.replace(/PORT$/, "HOST")} to one that is`
    : `check ${variable.replace(/PORT$/, "HOST")} and ${variable}`;
  return new StartError(`cannot listen for ${what} on ${host}:${port}: ${describeError(err)}`, hint, 3);
}

/** Says why the listener cannot start, one format for every cause, and exits with its code. */
function refuseStart(err: StartError): never {
  flushLog();
  console.error(`sinkhole: ${err.message}\nsinkhole: hint: ${err.hint}`);
  Deno.exit(err.exitCode);
}

async function main(): Promise<void> {
  const args = Deno.args;
  if (args.includes("--help") || args.includes("-h")) {
    console.log(usage());
    Deno.exit(0);
  }
  const unknownArgs = args.filter((a) => a !== "--healthcheck" && a !== "--dev");
  if (unknownArgs.length > 0) {
    refuseStart(new StartError(`unknown argument ${unknownArgs[0]}`, "see sinkhole --help", 2));
  }
  const processEnv = (k: string) => Deno.env.get(k);
  const repository = new URL(".", import.meta.url).pathname.replace(/\/$/, "");
  const env = args.includes("--dev") ? devEnvironment(processEnv, repository) : processEnv;
  let config: Config;
  try {
    config = configFromEnv(env, Deno.cwd());
  } catch (err) {
    refuseStart(new StartError((err as Error).message, "see sinkhole --help for every variable and its values", 2));
  }
  if (args.includes("--healthcheck")) Deno.exit(await healthcheck(config));
  setLogFormat(config.logFormat);
  const modes = new ModeCache(sourceFor(config, env), config.cacheTtlMs);
  const greylist = new GreylistTable(config.greylistWindowMs);
  const attempts = new AttemptTable();
  const server = new Server({ config, modes, greylist, attempts });
  let control: ReturnType<typeof serveControl> | undefined;
  await modes.start();
  let tls: Awaited<ReturnType<typeof tlsMaterial>> | undefined;
  try {
    if (config.startTls) {
      tls = await tlsMaterial(config).catch((err) => {
        throw new StartError(
          `cannot read the STARTTLS certificate or key (${config.tlsCertFile}, ${config.tlsKeyFile}): ${
            describeError(err)
          }`,
          "set SINKHOLE_TLS_CERT and SINKHOLE_TLS_KEY to readable PEM files, or neither for a generated certificate",
          3,
        );
      });
    }
    await server.listen(tls);
    if (config.controlPort !== undefined) {
      const ledger = new ControlLedger();
      control = serveControl(config.controlHost, config.controlPort, { modes, greylist, attempts, ledger });
      setAttemptTap((e) => ledger.add(e));
    }
  } catch (err) {
    refuseStart(
      err instanceof StartError ? err : new StartError(describeError(err), "see sinkhole --help", 3),
    );
  }
  log({
    event: "start",
    bind: `${server.addr.hostname}:${server.addr.port}`,
    health: `${server.healthAddr.hostname}:${server.healthAddr.port}`,
    serverName: config.serverName,
    source: modes.source.describe,
    mode: modes.current.text,
    cacheTtlMs: config.cacheTtlMs,
    greylistWindowMs: config.greylistWindowMs,
    maxSessions: config.maxSessions,
    starttls: tls ? (tls.generated ? "on, generated certificate" : "on, certificate from files") : "off",
    pid: Deno.pid,
    ...(control ? { control: `${control.addr.hostname}:${control.addr.port}` } : {}),
  });
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log({ event: "stop", signal, sessions: server.sessions.size });
    modes.stop();
    await control?.shutdown();
    await server.shutdown();
    log({ event: "stopped", signal });
    if (!await drainLog()) {
      console.error(
        `sinkhole: stopping with log lines unwritten: stdout was not read for ${LOG_DRAIN_ON_STOP_MS} ms ` +
          `(${logQueue.bytes} octets queued behind the write in progress)`,
      );
    }
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
}

if (import.meta.main) await main();
