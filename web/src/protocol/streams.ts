/**
 * What a recipient checks about each sender device's stream of messages
 * in a room (envelope v1.1, docs/PROTOCOL.md §7): nothing dropped,
 * replayed or reordered unnoticed, and the sender saw the same members at
 * that revision. The same rules, in the same order, as the CLI's
 * `client/src/streams.rs`: a pure tracker the session feeds live
 * deliveries and history in order, saved with the device so the checks
 * carry across reloads.
 */
import { equal, fromHex, toHex } from "./bytes.js";
import type { Chain } from "./envelope.js";

/** Messages remembered per page load to recognise a replay. */
const SHOWN_MAX = 4096;
/** Membership revisions remembered per room. */
const REVISIONS_MAX = 256;

/** Something a recipient should be told about a message. */
export type Warning =
  | { kind: "gap"; missing: bigint }
  | { kind: "out-of-order"; newest: bigint }
  | { kind: "replayed" }
  | { kind: "forked" }
  | { kind: "membership-differs"; revision: bigint }
  | { kind: "unsequenced" };

/** The sentence the CLI prints for a warning. */
export function describe(w: Warning): string {
  switch (w.kind) {
    case "gap":
      return `${w.missing} earlier message(s) from this sender's device did not arrive (dropped, or not loaded)`;
    case "out-of-order":
      return `arrived out of order: a later message (number ${w.newest}) from this device came first`;
    case "replayed":
      return "a replay of a message already shown: not shown again";
    case "forked":
      return "this device's messages fork: another message claims this place (sender equivocating, or a forgery)";
    case "membership-differs":
      return `the sender saw other members at revision ${w.revision} than you were shown: the server may be showing members different lists`;
    case "unsequenced":
      return "old envelope format (v1): order and membership not checked";
  }
}

/** What `observe` decided. */
export interface Verdict {
  /** Whether to show the message (false for a replay). */
  readonly show: boolean;
  readonly warnings: Warning[];
}

interface Seen {
  seq: bigint;
  hash: Uint8Array;
}

/** What is saved of `Streams` between page loads (JSON-safe). */
export interface SavedStreams {
  last: Array<{ sender: string; device: string; seq: string; hash: string }>;
  memberships: Array<[string, string]>;
}

/** The streams of one room as this member saw them. */
export class Streams {
  private readonly last = new Map<string, Seen>();
  private readonly memberships = new Map<bigint, Uint8Array>();
  private readonly shown = new Map<string, Uint8Array>();

  /** The streams as saved. */
  static restore(saved: SavedStreams): Streams {
    const s = new Streams();
    for (const l of saved.last) {
      s.last.set(streamKey(l.sender, fromHex(l.device)), { seq: BigInt(l.seq), hash: fromHex(l.hash) });
    }
    for (const [r, h] of saved.memberships) s.sawMembership(BigInt(r), fromHex(h));
    return s;
  }

  /** What to save (replays are recognised within one page load only). */
  save(): SavedStreams {
    return {
      last: [...this.last].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([k, seen]) => {
        const [sender, device] = k.split(":") as [string, string];
        return { sender, device, seq: seen.seq.toString(), hash: toHex(seen.hash) };
      }),
      memberships: [...this.memberships].map(([r, h]) => [r.toString(), toHex(h)]),
    };
  }

  /** Records this member's own view of the membership at `revision`. */
  sawMembership(revision: bigint, hash: Uint8Array): void {
    this.memberships.set(revision, hash);
    while (this.memberships.size > REVISIONS_MAX) {
      const oldest = [...this.memberships.keys()].reduce((a, b) => (a < b ? a : b));
      this.memberships.delete(oldest);
    }
  }

  /**
   * Judges one verified message from `sender` at `revision` with `chain`
   * (null: envelope v1) and message hash `hash`. `live`: a delivery as it
   * happens, rather than history read on request.
   */
  observe(sender: string, revision: bigint, chain: Chain | null, hash: Uint8Array, live: boolean): Verdict {
    if (!chain) return { show: true, warnings: [{ kind: "unsequenced" }] };
    const warnings: Warning[] = [];
    const mine = this.memberships.get(revision);
    if (mine && !equal(mine, chain.membership)) warnings.push({ kind: "membership-differs", revision });
    const id = streamKey(sender, chain.device);
    const shownKey = `${id}#${chain.seq}`;
    const seenBefore = this.shown.get(shownKey);
    if (seenBefore && equal(seenBefore, hash)) return { show: false, warnings: [{ kind: "replayed" }] };
    if (seenBefore) warnings.push({ kind: "forked" });
    else this.remember(shownKey, hash);
    const forked = warnings.some((w) => w.kind === "forked");
    const last = this.last.get(id);
    if (last) {
      if (chain.seq === last.seq + 1n && !equal(chain.prev, last.hash) && !forked) {
        warnings.push({ kind: "forked" });
      } else if (chain.seq > last.seq + 1n) {
        warnings.push({ kind: "gap", missing: chain.seq - last.seq - 1n });
      } else if (chain.seq === last.seq && !equal(hash, last.hash) && !forked) {
        warnings.push({ kind: "forked" });
      } else if (chain.seq < last.seq && live) {
        warnings.push({ kind: "out-of-order", newest: last.seq });
      }
    }
    if (!last || chain.seq > last.seq) this.last.set(id, { seq: chain.seq, hash });
    return { show: true, warnings };
  }

  private remember(key: string, hash: Uint8Array): void {
    this.shown.set(key, hash);
    if (this.shown.size > SHOWN_MAX) this.shown.delete(this.shown.keys().next().value!);
  }
}

function streamKey(sender: string, device: Uint8Array): string {
  return `${sender}:${toHex(device)}`;
}
