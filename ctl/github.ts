/** The scheduled check's GitHub issue: one issue (marked by a label), opened, updated, closed. */
import { Octokit } from "@octokit/rest";

export const CHECK_LABEL = "sinkhole-check";

export interface IssueResult {
  action: "opened" | "updated" | "closed" | "none";
  number?: number;
}

export function github(opts: { token: string; repository: string; baseUrl?: string }) {
  const [owner, repo] = opts.repository.split("/");
  if (!owner || !repo) throw new Error(`GITHUB_REPOSITORY must be owner/name, got ${JSON.stringify(opts.repository)}`);
  const octokit = new Octokit({ auth: opts.token, baseUrl: opts.baseUrl, request: { retries: 0 } });
  return {
    /** Opens or updates the one labelled issue when there are findings; closes it when clean. */
    async reconcile(environment: string, findings: string[]): Promise<IssueResult> {
      const title = `sinkhole check: ${environment}`;
      const open = await octokit.issues.listForRepo({ owner, repo, state: "open", labels: CHECK_LABEL, per_page: 100 });
      const existing = open.data.find((i) => i.title === title);
      if (findings.length === 0) {
        if (!existing) return { action: "none" };
        await octokit.issues.createComment({
          owner,
          repo,
          issue_number: existing.number,
          body: "All clean now: closing.",
        });
        await octokit.issues.update({ owner, repo, issue_number: existing.number, state: "closed" });
        return { action: "closed", number: existing.number };
      }
      const body = [
        `The scheduled sinkhole check found ${findings.length} problem(s) in **${environment}**:`,
        "",
        ...findings.map((f) => `- ${f}`),
        "",
        "Run the `sinkhole-cleanup` workflow (or `deno task ctl cleanup --env " + environment + "`) and see " +
        "docs/runbook.md. This issue closes itself when the check is clean.",
      ].join("\n");
      if (existing) {
        await octokit.issues.update({ owner, repo, issue_number: existing.number, body });
        return { action: "updated", number: existing.number };
      }
      const created = await octokit.issues.create({ owner, repo, title, body, labels: [CHECK_LABEL] });
      return { action: "opened", number: created.data.number };
    },
  };
}
