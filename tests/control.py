"""A test that is not Deno: it drives the listener over its control port only (urllib), and
real sendmail delivers (tests/control_test.ts builds the sendmail and starts the listener).

  SINKHOLE_CONTROL_URL  the listener's control port, http://HOST:PORT
  SENDMAIL              the test MTA's sendmail command (rig/sendmail.ts: its own .cf and queue)

Each round: `defer first=2`, one message submitted to sendmail's queue, three queue runs
(three delivery attempts), and the ledger must say 421, 421, 250 with intervals; then
DELETE /attempts, and the next round must start again at attempt 1. Prints one JSON line.
"""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

CONTROL = os.environ["SINKHOLE_CONTROL_URL"]
SENDMAIL = os.environ["SENDMAIL"]
RCPT = "python@sinkhole.test"


def call(method, path, body=None):
    data = None if body is None else body.encode()
    req = urllib.request.Request(CONTROL + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def sendmail(*args, stdin=None):
    done = subprocess.run([SENDMAIL, *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout + done.stderr


def attempts():
    status, messages = call("GET", "/attempts?rcpt=" + urllib.parse.quote(RCPT))
    assert status == 200, messages
    return messages


def one_round(n):
    status, body = call("PUT", "/mode", "defer first=2")
    assert (status, body["mode"], body["source"]) == (200, "defer first=2", "control"), body
    # Queued, not delivered (-odq): each queue run below is one delivery attempt.
    sendmail("-odq", "-oi", "-f", "tester@origin.test", RCPT, stdin=f"Subject: round {n}\n\nhello\n")
    for _ in range(3):
        sendmail("-q", "-v")
    messages = attempts()
    assert len(messages) == 1, messages
    m = messages[0]
    codes = [a.get("code") for a in m["attempts"]]
    assert codes == [421, 421, 250], codes
    assert [a["attempt"] for a in m["attempts"]] == [1, 2, 3], m
    assert [a["stage"] for a in m["attempts"]] == ["rcpt", "rcpt", "eod"], m
    intervals = [a.get("intervalS") for a in m["attempts"]]
    assert intervals[0] is None and all(isinstance(i, (int, float)) and i >= 0 for i in intervals[1:]), intervals
    assert (m["deliveries"], m["duplicate"], m["bounced"]) == (1, False, False), m
    message_id = m["attempts"][2].get("messageId")
    assert message_id, m
    status, by_id = call("GET", "/attempts?messageId=" + urllib.parse.quote(message_id))
    assert status == 200 and [x["key"] for x in by_id] == [m["key"]], by_id
    status, forgot = call("DELETE", "/attempts")
    assert status == 200 and forgot["forgot"]["attempts"] >= 1, forgot
    assert attempts() == [], "DELETE /attempts leaves nothing to serve"
    return codes, intervals


def invalid_changes_nothing():
    before = call("GET", "/mode")[1]
    status, body = call("PUT", "/mode", "defer first=0")
    after = call("GET", "/mode")[1]
    assert status == 400, body
    assert after == before, (before, after)
    return body["error"]


rounds = [one_round(n) for n in (1, 2)]
reason = invalid_changes_nothing()
print(json.dumps({"rounds": rounds, "invalid": reason}))
sys.exit(0)
