/** The framer and the message reader, without TCP: lines, limits, dot-unstuffing, sizes, headers. */
import { assert, assertEquals } from "../rig/assert.ts";
import {
  LineFramer,
  type LineSink,
  logLine,
  MAX_COMMAND_LINE,
  MAX_COMMENT_DEPTH,
  MAX_LOGGED_HEADER_BYTES,
  MAX_MESSAGE_ID_FIELD,
  MAX_MESSAGE_ID_LENGTH,
  MAX_TEXT_LINE,
  messageIdByGrammar,
  MessageReader,
  parseMessageId,
} from "../listener.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Feeds chunks through one framer with a fixed limit; returns what the sink was told, in order. */
function frame(chunks: string[], limit: number, stopAfter = Infinity): { events: string[]; rest: number[] } {
  const framer = new LineFramer();
  const events: string[] = [];
  let lines = 0;
  const sink: LineSink = {
    limit: () => limit,
    more: () => lines < stopAfter,
    overflow: () => events.push("overflow"),
    line: (buf, start, length, bare) => {
      lines++;
      events.push(
        (buf === undefined ? `long(${length})` : JSON.stringify(dec.decode(buf.subarray(start, start + length)))) +
          (bare ? " bare" : ""),
      );
    },
  };
  const rest = chunks.map((c) => {
    const bytes = enc.encode(c);
    return bytes.length - framer.feed(bytes, sink);
  });
  return { events, rest };
}

const L = MAX_COMMAND_LINE;
const FRAMES: [string, string[], string[]][] = [
  ["whole lines in one read", ["EHLO a\r\nNOOP\r\n"], ['"EHLO a\\r\\n"', '"NOOP\\r\\n"']],
  ["a line split across reads, CR and LF apart", ["NO", "OP\r", "\n"], ['"NOOP\\r\\n"']],
  ["a bare LF ends a line too, and is reported", ["NOOP\nQUIT\r\n"], ['"NOOP\\n" bare', '"QUIT\\r\\n"']],
  ["a bare CR inside a line is reported", ["NO\rOP\r\n"], ['"NO\\rOP\\r\\n" bare']],
  ["an empty line of a bare LF is reported", ["\n\r\n"], ['"\\n" bare', '"\\r\\n"']],
  ["a CR LF split across reads is not bare", ["NOOP\r", "\n"], ['"NOOP\\r\\n"']],
  ["a bare LF after a CR that ended the last read", ["NOOP\r", "x\n"], ['"NOOP\\rx\\n" bare']],
  ["a bare LF alone across reads", ["NOOP", "\n"], ['"NOOP\\n" bare']],
  ["smuggling shapes: LF.LF, CRLF.LF, LF.CRLF", ["a\n.\nb\r\n.\nc\n.\r\n"], [
    '"a\\n" bare',
    '".\\n" bare',
    '"b\\r\\n"',
    '".\\n" bare',
    '"c\\n" bare',
    '".\\r\\n"',
  ]],
  ["no line end yet: nothing", ["NOOP"], []],
  ["exactly at the limit", ["x".repeat(L - 2) + "\r\n"], [JSON.stringify("x".repeat(L - 2) + "\r\n")]],
  ["one over, in one read: overflow, then the long line", ["x".repeat(L - 1) + "\r\n"], ["overflow", `long(${L + 1})`]],
  [
    "over the limit across reads: overflow once, when crossed",
    ["x".repeat(300), "x".repeat(300), "x".repeat(300) + "\r\nNOOP\r\n"],
    ["overflow", "long(902)", '"NOOP\\r\\n"'],
  ],
];

Deno.test("framer: lines, line ends and the limit, in one read or many", () => {
  for (const [what, chunks, events] of FRAMES) assertEquals(frame(chunks, L).events, events, what);
});

Deno.test("framer: stops when the sink says so and returns the rest, unread", () => {
  const { events, rest } = frame(["A\r\nB\r\nC\r\n"], L, 1);
  assertEquals(events, ['"A\\r\\n"']);
  assertEquals(rest, [6], "B and C are handed back");
});

Deno.test("framer: frames only chunk[from, to): a line end past `to` is not seen, the rest of a line waits for the next feed", () => {
  const framer = new LineFramer();
  const seen: string[] = [];
  const sink: LineSink = {
    limit: () => L,
    more: () => true,
    overflow: () => seen.push("overflow"),
    line: (buf, start, length, bare) =>
      seen.push(dec.decode(buf!.subarray(start, start + length)) + (bare ? " bare" : "")),
  };
  const chunk = enc.encode("AAA\r\nBB\r\nCC\r\n");
  assertEquals(framer.feed(chunk, sink, 5, 9), 9);
  assertEquals(seen, ["BB\r\n"], "the line between from and to, at its offset");
  assertEquals(framer.feed(chunk, sink, 9, 12), 12);
  assertEquals([seen.length, framer.pending], [1, 3], "CC\r: its LF is past `to`");
  assertEquals(framer.feed(chunk, sink, 12, 13), 13);
  assertEquals(seen, ["BB\r\n", "CC\r\n"], "ended by the next feed, not bare");
});

Deno.test("framer: the limit is asked per line (commands, then a data line after DATA)", () => {
  const framer = new LineFramer();
  const seen: string[] = [];
  let limit = L;
  const sink: LineSink = {
    limit: () => limit,
    more: () => true,
    overflow: () => seen.push("overflow"),
    line: (buf, start, length, _bare) => {
      const text = buf && dec.decode(buf.subarray(start, start + length));
      seen.push(text ? text.trimEnd() : `long(${length})`);
      if (text?.startsWith("DATA")) limit = MAX_TEXT_LINE;
    },
  };
  const body = "y".repeat(800);
  framer.feed(enc.encode(`${"x".repeat(800)}\r\nDATA\r\n${body}\r\n`), sink);
  assertEquals(seen, ["overflow", "long(802)", "DATA", body]);
  assertEquals(framer.pending, 0);
  framer.feed(enc.encode("part"), sink);
  assertEquals(framer.pending, 4, "a line begun and not ended");
});

/** Reads message lines (each with CRLF unless it ends in LF already); returns the reader and where it ended. */
function read(lines: string[], capture = true, buffer?: Uint8Array): { m: MessageReader; endedAt: number } {
  const m = new MessageReader(capture, buffer);
  for (const [i, line] of lines.entries()) {
    const text = /\n$/.test(line) ? line : line + "\r\n";
    const bytes = enc.encode(text);
    const read = m.line(bytes.length > MAX_TEXT_LINE ? undefined : bytes, 0, bytes.length, false);
    if (read === "end") return { m, endedAt: i };
  }
  return { m, endedAt: -1 };
}

Deno.test("message reader: end of data, dot-unstuffing and size", () => {
  const { m, endedAt } = read(["Subject: s", "", "..dot", "body", ".", "after"]);
  assertEquals(endedAt, 4, "the lone dot ends the message");
  // "Subject: s\r\n" 12 + "\r\n" 2 + ".dot\r\n" 6 + "body\r\n" 6
  assertEquals(m.summary, { size: 26, longLine: false });
  assertEquals(m.headers, ["Subject: s"]);
  assertEquals(m.truncated, false);
});

Deno.test("message reader: headers unfolded, capped and flagged; not kept unless asked", () => {
  assertEquals(read(["Subject: a", "  folded", "X: y", "", "Not: a header"]).m.headers, ["Subject: a folded", "X: y"]);
  const many = Array.from({ length: 400 }, (_, i) => `X-Filler-${i}: ${"y".repeat(60)}`);
  const capped = read([...many, "", "body"]).m;
  assertEquals(capped.truncated, true);
  assertEquals(capped.headers.join("").length <= MAX_LOGGED_HEADER_BYTES, true);
  const off = read(["Subject: a", "", "b"], false).m;
  assertEquals([off.headers, off.truncated], [[], false]);
});

Deno.test("message reader: a session's header buffer, reused, holds only the message being read", () => {
  const buffer = new Uint8Array(MAX_LOGGED_HEADER_BYTES);
  const first = read([`Subject: ${"a".repeat(300)}`, "X-First: 1", "", "b", "."], true, buffer).m;
  assertEquals(first.headers, [`Subject: ${"a".repeat(300)}`, "X-First: 1"]);
  const second = read(["To: <b@sinkhole.test>", "", "."], true, buffer).m;
  assertEquals(second.headers, ["To: <b@sinkhole.test>"], "nothing of the first message's longer fields");
  assertEquals(read(["", "body", "."], true, buffer).m.headers, [], "a message without headers says none");
});

/** The header section cut to `MAX_LOGGED_HEADER_BYTES`: whole fields, in order, LF between them (one octet each). */
const H = MAX_LOGGED_HEADER_BYTES;
const fill = (n: number) => "f".repeat(n);
/** Fields of 994 octets: four and "A: 1" fit (3984 octets), a fifth does not. */
const bs = (n: number) => Array.from({ length: n }, (_, i) => `B${i}: ${fill(990)}`);
const abs = (n: number) => Array.from({ length: n }, () => "a:b");
/** [what, header lines, fields logged, truncated] */
const CAPTURES: [string, string[], string[], boolean][] = [
  [
    "folded fields are unfolded",
    ["Subject: a", "  folded", "\tagain ", "X: y"],
    ["Subject: a folded again", "X: y"],
    false,
  ],
  // 1023 fields "a:b" and their separators are 4091 octets: "a:bc" and its LF make 4096.
  ["fields that fill the capture exactly: all kept", [...abs(1023), "a:bc"], [...abs(1023), "a:bc"], false],
  ["one octet more: the last field is left out whole", [...abs(1023), "a:bcd"], abs(1023), true],
  [
    "many short lines: whole fields up to the cap",
    Array.from({ length: 2000 }, () => "a:b"),
    abs(Math.floor((H + 1) / 4)),
    true,
  ],
  [
    "a folded field over the cap is left out whole, and the fields after it",
    ["A: 1", "B: start", ...Array.from({ length: 10 }, () => ` ${fill(900)}`), "C: 3"],
    ["A: 1"],
    true,
  ],
  [
    "a skipped field's continuation lines are never added to another field",
    ["A: 1", ...bs(4), `B5: ${fill(990)}`, " short", " cont", "C: 3"],
    ["A: 1", ...bs(4)],
    true,
  ],
  [
    "folding made of many one-octet lines costs its octets, not its lines",
    ["A: x", ...Array.from({ length: 5000 }, () => " y")],
    [],
    true,
  ],
  ["a header line over 1000 octets: its field is left out", ["A: 1", `B: ${fill(MAX_TEXT_LINE)}`, "C: 3"], [], true],
];

Deno.test("message reader: the header capture keeps whole fields, apart, up to its octets, whatever their shape", () => {
  for (const [what, lines, fields, truncated] of CAPTURES) {
    const { m } = read([...lines, "", "body"]);
    assertEquals([m.headers, m.truncated], [fields, truncated], what);
    assertEquals(m.headers.join("\n").length <= H, true, what);
  }
});

Deno.test("message reader: a line over 1000 octets is counted and flagged, not kept", () => {
  const { m } = read(["Subject: x", "", "L".repeat(MAX_TEXT_LINE * 2), "."]);
  assertEquals(m.longLine, true);
  assertEquals(m.size, 12 + 2 + MAX_TEXT_LINE * 2 + 2);
  assertEquals(read(["X-Long: " + "h".repeat(MAX_TEXT_LINE), ""]).m.truncated, true, "a long header line truncates");
});

Deno.test("message reader: the end is .CRLF only; a bare line end is answered, never taken for the end", () => {
  const m = new MessageReader();
  const line = (t: string, bare = false) => m.line(enc.encode(t), 0, t.length, bare);
  assertEquals(line("body\r\n"), "more");
  assertEquals(line(".\n", true), "bare", "LF.LF is no end of data");
  assertEquals(new MessageReader().line(enc.encode(".\r\n"), 0, 3, false), "end");
  assertEquals(new MessageReader().line(enc.encode("x\r\n.\r\n"), 3, 3, false), "end", "at an offset");
  assertEquals(new MessageReader().line(undefined, 0, 2000, true), "bare", "a long bare line too");
});

Deno.test("Message-ID: the RFC 5322 grammar, not a pattern: folded, commented, quoted, literal, UTF-8, garbage, bounded", () => {
  // [the field's value (after "Message-ID:"), the msg-id taken (undefined: none)]
  const long = "x".repeat(400);
  const ROWS: [string, string | undefined][] = [
    [" <a.b@c.test>", "<a.b@c.test>"],
    ["<a@c.test>", "<a@c.test>"],
    [" <a@c.test>  ", "<a@c.test>"],
    [" (a comment) <a@c.test> (another (nested) one)", "<a@c.test>"],
    [" (\\) quoted-pair) <a@c.test>", "<a@c.test>"],
    ['  <"quoted id-left"@c.test>', '<"quoted id-left"@c.test>'],
    ['  <"with > and \\" in it"@c.test>', '<"with > and \\" in it"@c.test>'],
    [" <a@[192.0.2.1]>", "<a@[192.0.2.1]>"], // a no-fold-literal
    [" <a@[no fold]>", undefined], // no whitespace in one
    ["\r\n <folded@c.test>", "<folded@c.test>"], // folded after the colon (unfolded: CRLF removed)
    [" <a@c.test>\r\n (a comment on the next line)", "<a@c.test>"],
    [" <a . b @ c . test>", "<a.b@c.test>"], // obs-id-left, obs-id-right: CFWS around dots and @
    [" <a(comment).b@c.test>", "<a.b@c.test>"],
    [" <line\u2028separator@c.test>", "<line\u2028separator@c.test>"], // RFC 6532 UTF-8, not a regex's "."
    [" <para\u2029graph@c.test>", "<para\u2029graph@c.test>"],
    [" <ü@bücher.test>", "<ü@bücher.test>"],
    [" <>", undefined],
    [" a@c.test", undefined],
    [" <a@c.test", undefined],
    [" <a@c.test> trailing", undefined],
    [" <a@c.test> (unclosed comment", undefined],
    [" <a@@c.test>", undefined],
    [" <a\u0001b@c.test>", undefined], // a control character is no atext
    [' <"unclosed@c.test>', undefined],
    [" <a@c.test><b@c.test>", undefined],
    [" " + "(".repeat(MAX_COMMENT_DEPTH + 1) + ")".repeat(MAX_COMMENT_DEPTH + 1) + "<a@c.test>", undefined],
    [" " + "(".repeat(MAX_COMMENT_DEPTH) + ")".repeat(MAX_COMMENT_DEPTH) + "<a@c.test>", "<a@c.test>"],
    [` <${long}@c.test>`, `<${long}@c.test>`.slice(0, MAX_MESSAGE_ID_LENGTH)], // over-long: bounded
    [` <${"y".repeat(MAX_MESSAGE_ID_FIELD)}@c.test>`, undefined], // past the field's bound: not read
    ["", undefined],
  ];
  for (const [value, id] of ROWS) assertEquals(parseMessageId(value), id, JSON.stringify(value));

  // The fast path (one regular expression for `<dot-atom@dot-atom>`) answers exactly as the grammar does:
  // values built from atext, dots, "@", "<", ">", whitespace and a few characters the grammar treats apart.
  const pieces = [
    "a",
    "Z",
    "0",
    "_",
    "!",
    "~",
    "'",
    "`",
    ".",
    "..",
    "@",
    "<",
    ">",
    " ",
    "\t",
    "\r\n",
    '"',
    "(",
    ")",
    "[",
    "]",
    "ü",
  ];
  let state = 7;
  const pick = () => pieces[(state = (state * 1103515245 + 12345) & 0x7fffffff) % pieces.length];
  for (let n = 0; n < 20_000; n++) {
    const len = 1 + (n % 9);
    const middle = Array.from({ length: len }, pick).join("");
    const values = [
      `<${middle}>`,
      ` <${middle}@c.test> `,
      `<a${middle}b@c${middle}d>`,
      `${middle}<a@c>`,
      `<a@c>${middle}`,
      middle,
    ];
    for (const value of values) {
      assertEquals(parseMessageId(value), messageIdByGrammar(value), JSON.stringify(value));
    }
  }

  // The reader takes the first Message-ID field, its folded lines unfolded, and parses it.
  const read = (...lines: string[]) => {
    const r = new MessageReader();
    for (const l of [...lines, "", "body"]) r.line(new TextEncoder().encode(l + "\r\n"), 0, l.length + 2);
    return r.messageId;
  };
  assertEquals(read("Message-ID:", " <folded@c.test>"), "<folded@c.test>");
  assertEquals(read("Message-Id: <a@c.test>", "Subject: s"), "<a@c.test>");
  assertEquals(read("message-id: <a@c.test>", "\t(comment)", "Message-ID: <second@c.test>"), "<a@c.test>");
  assertEquals(read("Subject: s", "Message-ID: <line\u2028sep@c.test>"), "<line\u2028sep@c.test>");
  assertEquals(read("Message-ID: garbage"), undefined);
  assertEquals(read("Subject: <a@c.test>"), undefined);
  // A folded line over MAX_TEXT_LINE: part of the field was not read, so no ID is taken.
  const r = new MessageReader();
  r.line(new TextEncoder().encode("Message-ID: <a@c.test\r\n"), 0, 23);
  r.line(undefined, 0, 2000);
  r.line(new TextEncoder().encode(" >\r\n"), 0, 4);
  assertEquals(r.messageId, undefined);
  // The log escapes what it logs: the line separator is \u2028 in the JSON line, which stays one line.
  const line = new TextDecoder().decode(logLine({
    event: "attempt",
    key: "a@o.test > b@s.test",
    attempt: 1,
    from: "a@o.test",
    rcpt: "b@s.test",
    stage: "eod",
    code: 250,
    messageId: "<line\u2028sep\u0085@c.test>",
    client: "192.0.2.1",
    tls: false,
    mode: "accept",
  }));
  assert(line.includes("<line\\u2028sep\\u0085@c.test>") && !line.includes("\u2028"), line);
  assertEquals(JSON.parse(line).messageId, "<line\u2028sep\u0085@c.test>");
});
