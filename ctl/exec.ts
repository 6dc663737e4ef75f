/**
 * Commands inside the sending MTA's tasks. In the cluster this is ECS Exec, as operators
 * run it by hand (`aws ecs execute-command`); moto has no ExecuteCommand, so the tests use
 * another implementation of the same small interface (a local shell in front of a real
 * sendmail). The shell snippets below are what runs in the container either way.
 */

export interface Task {
  arn: string;
  /** Short id for humans (the last part of the ARN). */
  id: string;
}

export interface Exec {
  run(task: Task, command: string): Promise<{ code: number; output: string }>;
}

/** The exit code reported when ECS Exec ran nothing we can read (the session failed). */
export const EXEC_NO_RESULT = 255;

const BEGIN = "__SINKHOLE_BEGIN__";
const END = "__SINKHOLE_END__";

/** Single-quotes a string for POSIX sh. */
export function shQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** ECS Exec through the aws CLI (needs the session-manager-plugin, as for operators). */
export function ecsExec(opts: { region: string; cluster: string; container: string; aws?: string }): Exec {
  return {
    async run(task, command) {
      // Markers separate the command's output from the session manager's chatter.
      const wrapped = `sh -c ${shQuote(`echo ${BEGIN}; ${command}; echo "${END} $?"`)}`;
      // stdin stays open (piped, never written) until the session ends: the plugin reads it,
      // and a closed or non-TTY stdin ends the session at once ("Cannot perform start
      // session: EOF"). Without both markers the output is an error, never a result.
      const child = new Deno.Command(opts.aws ?? "aws", {
        args: [
          "ecs",
          "execute-command",
          "--region",
          opts.region,
          "--cluster",
          opts.cluster,
          "--task",
          task.arn,
          "--container",
          opts.container,
          "--interactive",
          "--command",
          wrapped,
        ],
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      const out = await child.output();
      await child.stdin.close().catch(() => {});
      const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
      const m = new RegExp(`${BEGIN}\\r?\\n([\\s\\S]*?)${END} (\\d+)`).exec(text);
      if (!m) return { code: out.code || EXEC_NO_RESULT, output: `no result from ECS Exec: ${text}` };
      return { code: Number(m[2]), output: m[1] };
    },
  };
}

/** What runs in the MTA container (sendmail's own commands, POSIX sh). */
export const mtaCommands = {
  /** Submits a tagged probe message through the MTA. */
  sendProbe(rcpt: string, tag: string): string {
    const msg = `Subject: sinkhole probe ${tag}\nX-Sinkhole-Probe: ${tag}\n\nsinkhole probe ${tag}\n`;
    return `printf %s ${shQuote(msg)} | sendmail -oi -f sinkhole-probe@sinkhole.test ${shQuote(rcpt)}`;
  },
  mailq(): string {
    return "mailq";
  },
  /** Removes queued messages with a sinkhole.test recipient; prints each removed queue id. */
  purge(queueDir: string): string {
    const q = shQuote(queueDir);
    return `for f in $(grep -l '^R.*@sinkhole\\.test' ${q}/qf* 2>/dev/null); do ` +
      `id=\${f##*/qf}; rm -f "$f" ${q}/"df$id" && echo "$id"; done; true`;
  },
  /** Counts queued sinkhole.test messages older than `minutes`. */
  staleCount(queueDir: string, minutes: number): string {
    return `find ${shQuote(queueDir)} -name 'qf*' -mmin +${Math.max(0, Math.floor(minutes))} ` +
      `-exec grep -l '^R.*@sinkhole\\.test' {} + 2>/dev/null | wc -l`;
  },
};
