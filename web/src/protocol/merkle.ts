/**
 * The Merkle tree over an envelope's wrapped keys (docs/PROTOCOL.md §4):
 * RFC 6962 §2.1, leaves in handle order.
 */
import { sha256 } from "./bytes.js";

/** At most this many hashes in an audit path (as the node and CLI). */
export const PATH_HASHES_MAX = 32;

/** `SHA-256(0x00 ‖ recipient handle ‖ wrapped key)`. */
export function leafHash(recipient: Uint8Array, wrapped: Uint8Array): Promise<Uint8Array> {
  return sha256(Uint8Array.of(0), recipient, wrapped);
}

function nodeHash(left: Uint8Array, right: Uint8Array): Promise<Uint8Array> {
  return sha256(Uint8Array.of(1), left, right);
}

/** The largest power of two strictly less than `n` (n ≥ 2). */
function split(n: number): number {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}

/** The root of leaves (at least one). */
export async function root(leaves: Uint8Array[]): Promise<Uint8Array> {
  if (leaves.length === 0) throw new RangeError("a Merkle tree needs at least one leaf");
  if (leaves.length === 1) return leaves[0]!;
  const k = split(leaves.length);
  return nodeHash(await root(leaves.slice(0, k)), await root(leaves.slice(k)));
}

/** The audit path of leaf `index`, from the leaf up to the root. */
export async function path(leaves: Uint8Array[], index: number): Promise<Uint8Array[]> {
  if (index < 0 || index >= leaves.length) throw new RangeError("no such leaf");
  if (leaves.length === 1) return [];
  const k = split(leaves.length);
  if (index < k) return [...(await path(leaves.slice(0, k), index)), await root(leaves.slice(k))];
  return [...(await path(leaves.slice(k), index - k)), await root(leaves.slice(0, k))];
}

/**
 * The root recomputed from one leaf, its index among `count` leaves and its
 * audit path; `null` when they do not fit together.
 */
export async function rootFromPath(
  leaf: Uint8Array,
  index: number,
  count: number,
  proof: Uint8Array[],
): Promise<Uint8Array | null> {
  if (index < 0 || index >= count) return null;
  if (count === 1) return proof.length === 0 ? leaf : null;
  if (proof.length === 0) return null;
  const sibling = proof[proof.length - 1]!;
  const rest = proof.slice(0, -1);
  const k = split(count);
  if (index < k) {
    const left = await rootFromPath(leaf, index, k, rest);
    return left && nodeHash(left, sibling);
  }
  const right = await rootFromPath(leaf, index - k, count - k, rest);
  return right && nodeHash(sibling, right);
}

/** Every hash in `proof` is 32 bytes and there are few enough of them. */
export function wellFormed(proof: Uint8Array[]): boolean {
  return proof.length <= PATH_HASHES_MAX && proof.every((h) => h.length === 32);
}
