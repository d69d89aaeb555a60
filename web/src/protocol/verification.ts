/**
 * Comparing keys out of band (docs/PROTOCOL.md §9): safety numbers and
 * room fingerprints, the same digits the CLI shows.
 */
import { concat, domain, sha256, u16 } from "./bytes.js";
import type { PublicKey } from "./keys.js";
import { membershipHash } from "./envelope.js";

/** Six groups of five digits from `h[0..30]`. */
function digits30(h: Uint8Array): string[] {
  const groups = [];
  for (let i = 0; i < 30; i += 5) {
    let n = 0n;
    for (const b of h.subarray(i, i + 5)) n = (n << 8n) | BigInt(b);
    groups.push((n % 100000n).toString().padStart(5, "0"));
  }
  return groups;
}

async function personCode(key: PublicKey): Promise<string[]> {
  return digits30(
    await sha256(concat(domain("saferchat/safety-number/v1"), key.handle, u16(key.der.length), key.der)),
  );
}

/** The safety number of two members: the same whichever side asks. */
export async function safetyNumber(a: PublicKey, b: PublicKey): Promise<string> {
  const halves = [(await personCode(a)).join(" "), (await personCode(b)).join(" ")];
  halves.sort();
  return halves.join(" ");
}

/** The room fingerprint at `revision` of its members with keys. */
export async function roomFingerprint(room: string, revision: bigint, members: PublicKey[]): Promise<string> {
  const membership = await membershipHash(room, revision, members);
  return digits30(await sha256(domain("saferchat/room-fingerprint/v1"), membership)).join(" ");
}
