/** The stream checks of docs/PROTOCOL.md §7, the CLI's cases one by one. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { u64 } from "../src/protocol/bytes.js";
import { type Chain, NO_PREVIOUS } from "../src/protocol/envelope.js";
import { Streams, type Verdict, describe } from "../src/protocol/streams.js";

type Msg = [Chain, Uint8Array];

/** A device's stream of `n` messages linked by their hashes. */
function stream(device: number, n: number, membership: number): Msg[] {
  const out: Msg[] = [];
  let prev = NO_PREVIOUS;
  for (let seq = 1n; seq <= BigInt(n); seq++) {
    const hash = new Uint8Array(32).fill(device);
    hash.set(u64(seq));
    out.push([
      {
        device: new Uint8Array(16).fill(device),
        seq,
        prev,
        sentAtMs: seq,
        membership: new Uint8Array(32).fill(membership),
        keyCommitment: new Uint8Array(32),
      },
      hash,
    ]);
    prev = hash;
  }
  return out;
}

const ALICE = "alice";
const feed = (s: Streams, m: Msg, live: boolean): Verdict => s.observe(ALICE, 3n, m[0], m[1], live);
const CLEAN: Verdict = { show: true, warnings: [] };

test("an intact stream raises nothing", () => {
  const s = new Streams();
  for (const m of stream(1, 5, 0)) assert.deepEqual(feed(s, m, true), CLEAN);
});

test("a dropped message is a gap and a late one is out of order", () => {
  const msgs = stream(1, 4, 0);
  const s = new Streams();
  feed(s, msgs[0]!, true);
  assert.deepEqual(feed(s, msgs[2]!, true).warnings, [{ kind: "gap", missing: 1n }]);
  assert.deepEqual(feed(s, msgs[1]!, true).warnings, [{ kind: "out-of-order", newest: 3n }]);
  assert.deepEqual(feed(s, msgs[3]!, true), CLEAN);
  // In history read on request, older messages are expected.
  const h = new Streams();
  feed(h, msgs[3]!, false);
  assert.deepEqual(feed(h, msgs[0]!, false), CLEAN);
});

test("a replay is not shown and a fork is flagged", () => {
  const msgs = stream(1, 3, 0);
  const s = new Streams();
  feed(s, msgs[0]!, true);
  feed(s, msgs[1]!, true);
  assert.deepEqual(feed(s, msgs[1]!, true), { show: false, warnings: [{ kind: "replayed" }] });
  // Another message in place 2 (the sender equivocates).
  assert.deepEqual(feed(s, [msgs[1]![0], new Uint8Array(32).fill(99)], true).warnings, [{ kind: "forked" }]);
  // Place 3 naming something else than the message seen in place 2.
  const wrong: Msg = [{ ...msgs[2]![0], prev: new Uint8Array(32).fill(98) }, msgs[2]![1]];
  assert.deepEqual(feed(s, wrong, true).warnings, [{ kind: "forked" }]);
});

test("what is saved carries gaps across reloads but not replays", () => {
  const msgs = stream(1, 4, 0);
  const s = new Streams();
  feed(s, msgs[0]!, true);
  feed(s, msgs[1]!, true);
  const again = Streams.restore(JSON.parse(JSON.stringify(s.save())));
  // Reconnecting replays recent history: already seen, no warning.
  assert.deepEqual(feed(again, msgs[1]!, false), CLEAN);
  assert.deepEqual(feed(again, msgs[3]!, true).warnings, [{ kind: "gap", missing: 1n }]);
});

test("devices are separate streams and memberships are compared", () => {
  const s = new Streams();
  const [laptop, phone] = [stream(1, 2, 5), stream(2, 2, 5)];
  for (const m of [laptop[0]!, phone[0]!, laptop[1]!, phone[1]!]) assert.deepEqual(feed(s, m, true), CLEAN);
  s.sawMembership(3n, new Uint8Array(32).fill(6));
  assert.deepEqual(feed(s, stream(3, 1, 5)[0]!, true).warnings, [{ kind: "membership-differs", revision: 3n }]);
  assert.deepEqual(s.observe(ALICE, 3n, null, new Uint8Array(32), true).warnings, [{ kind: "unsequenced" }]);
  assert.match(describe({ kind: "gap", missing: 2n }), /^2 earlier message/);
});

test("replay memory is bounded", () => {
  const s = new Streams();
  const msgs = stream(1, 5000, 0);
  for (const m of msgs) feed(s, m, true);
  // The first messages fell out of memory: shown again, as a stale number.
  assert.deepEqual(feed(s, msgs[0]!, true).warnings, [{ kind: "out-of-order", newest: 5000n }]);
  // Recent ones are still recognised.
  assert.equal(feed(s, msgs[4999]!, true).show, false);
});
